"""Training loops of the learned estimator, with accelerate: device placement, mixed precision,
several processes (`accelerate launch`, `torchrun`: GPUs, or CPU processes over gloo), and resumable
checkpoints.

Stage 0 fits the wide regression on post-hoc features by L-BFGS (its L2 strength chosen on held-back
rows). Stage 1 fits the deep parts on sampled run sets (cascade prefixes and random subsets up to the
depth cap), with early stopping on held-back rows. Between them, the gain of each
post-hoc move (ex-ante logit to post-hoc logit, one for models run and one for the others) is fitted on the
held-back rows, so that a move is only as large as it is informative. Stage 2 freezes them and fits the
variance head on the moves the router can make: how far each model's estimate moves when that model runs
next, from states below the depth cap.

With N processes, every batch of stage 1 is split among them (`batch_size` stays the global batch, so
the optimization takes the same steps as one process would) and their gradients averaged; the held-back
loss and the moves of stage 2 are computed a share per process and combined, so every process takes the
same early-stopping decisions and fits the same variance head. Stage 0 is small and runs on each.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from router_train import distributed
from router_train.outputs import atomic_write_json, staged_output_dir

from .features import AnswerFeatures
from .network import QualityNet, starts_from_answer, wide_features
from .run_sets import sample_run_sets, sample_states

Logger = Callable[[dict], None]


@dataclass
class QualityData:
    """Per-row inputs and targets: a frozen embedding (or token ids for a fine-tuned encoder), answer
    features and the true qualities."""

    answers: AnswerFeatures
    quality: torch.Tensor  # (n, k) float32 targets in [0, 1]
    source: torch.Tensor  # (n,) long source tag index, 0 = unknown
    prior: torch.Tensor  # (n, k) prior logits (training rows: leave-one-out)
    prior_blind: torch.Tensor  # (n, k) the same without the source tag (for source dropout)
    calibrated: torch.Tensor  # (n, k) calibrated confidence logits of the answers (see confidence.py)
    embedding: torch.Tensor | None = None  # (n, d)
    tokens: dict[str, torch.Tensor] | None = None  # input_ids, attention_mask (n, L)

    def batch(self, rows: torch.Tensor, device: torch.device) -> dict:
        rows = rows.cpu()
        out = {"answers": AnswerFeatures(*(getattr(self.answers, f)[rows].to(device) for f in AnswerFeatures.__dataclass_fields__))}
        out["source"] = self.source[rows].to(device)
        out["prior"] = self.prior[rows].to(device)
        out["calibrated"] = self.calibrated[rows].to(device)
        if self.embedding is not None:
            out["embedding"] = self.embedding[rows].to(device)
        else:
            out["tokens"] = {name: t[rows].to(device) for name, t in self.tokens.items()}
        out["quality"] = self.quality[rows].to(device)
        return out


class LearnedModule(nn.Module):
    """The network with, in fine-tuning mode, the text encoder in front of it."""

    def __init__(self, net: QualityNet, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.encoder = encoder

    def embed(self, batch: dict) -> torch.Tensor:
        if self.encoder is None:
            return batch["embedding"]
        return self.encoder(batch["tokens"]["input_ids"], batch["tokens"]["attention_mask"])

    def forward(self, batch: dict, run: torch.Tensor, ante: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(quality logits, token states) for a batch of rows with run sets `run` (`ante`: see QualityNet)."""
        return self.net(self.embed(batch), batch["answers"], run, batch["prior"], batch["calibrated"], batch["source"],
                        ante)


@dataclass
class TrainSettings:
    """Optimization settings of stage 1 and 2."""

    max_depth: int = 3
    per_row: int = 1  # training states per row and epoch
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 4
    shallow_c: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])  # stage-0 inverse L2 strengths tried
    shallow_states: int = 20_000  # most training states stage 0 fits on
    source_dropout: float = 0.2  # share of training states whose source tag is hidden (serving may not know it)
    variance_epochs: int = 5
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    seed: int = 0


def _states(n_rows: int, k: int, settings: TrainSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed evaluation states: every prefix up to the depth cap and two random subsets per row."""
    gen = torch.Generator().manual_seed(seed)
    return sample_run_sets(n_rows, k, settings.max_depth, 2, gen)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), target)


SPARSE_MIN_FEATURES = 512
"""Wide features (`network.wide_size`: 29 models of 14 sources give 1,160, 9 models of 5 sources 189) from which
stage 0 fits on a sparse matrix on the CPU: with fewer the dense product is as fast or faster (rlc_train's 9
models, 150 queries: 1.5 s dense, 2.6 s sparse)."""


def fit_shallow(
    net: QualityNet, data: QualityData, fit_rows: torch.Tensor, val_rows: torch.Tensor, settings: TrainSettings,
    sparse: bool | None = None,
) -> float:
    """Stage 0: fit the wide regression (the deep parts are still zero) to convergence by L-BFGS, like the
    reference's logistic regressions, for each L2 strength of `settings.shallow_c` (strongest first, each
    fit starting from the previous one); keep the one with the lowest loss on the held-back rows' states.
    At most `settings.shallow_states` training states are used (a seeded subsample), which bounds the
    cost for many models and queries. `sparse` (None: on the CPU from `SPARSE_MIN_FEATURES` features on)
    fits on a sparse matrix of the raw features, most of which are zero (29 models, depth 3: ~1,160
    features, a few dozen non-zero per state): the same regression, its L-BFGS 3.8x and a whole network
    2.3x faster on 2,000 queries of mmlu_pro (benchmarks/fit_time.py). Returns the chosen C."""
    k = data.quality.shape[1]
    device = net.readout.device

    def design(rows: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        index, run = sample_run_sets(len(rows), k, settings.max_depth, 4, generator)
        if index.numel() > settings.shallow_states:
            keep = torch.randperm(index.numel(), generator=generator)[: settings.shallow_states].sort().values
            index, run = index[keep], run[keep]
        rows = rows[index]
        answers = data.answers.rows(rows)
        wide = wide_features(answers, run, data.calibrated[rows], data.prior[rows], data.source[rows],
                             net.config.n_sources)
        base = torch.where(starts_from_answer(answers, run), data.calibrated[rows], data.prior[rows])
        return wide.to(device), base.to(device), data.quality[rows].to(device), run.to(device)

    wide, base, target, run = design(fit_rows, settings.seed + 5)
    val_wide, val_base, val_target, val_run = design(val_rows, settings.seed + 6)
    net.wide_mean.copy_(wide.mean(0))
    net.wide_scale.copy_(wide.std(0).clamp(min=1e-3))
    if sparse is None:
        sparse = device.type == "cpu" and wide.shape[1] >= SPARSE_MIN_FEATURES
    if sparse:
        with warnings.catch_warnings():  # torch's note that sparse CSR is a beta layout: said once per fit, to no use
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            wide, val_wide = wide.to_sparse_csr(), val_wide.to_sparse_csr()
    best = (math.inf, None, None)
    nn.init.zeros_(net.wide.weight)
    nn.init.zeros_(net.wide.bias)
    for c in sorted(settings.shallow_c):
        optimizer = torch.optim.LBFGS(list(net.wide.parameters()), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        penalty = 0.5 / (c * len(fit_rows))

        def closure() -> torch.Tensor:
            # k independent regressions: mean loss over states summed over targets, as sklearn's per model
            optimizer.zero_grad()
            fitted = nn.functional.binary_cross_entropy_with_logits(net.shallow(wide, base, run), target, reduction="none")
            loss = fitted.mean(0).sum() + penalty * net.wide.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            val = float(_loss(net.shallow(val_wide, val_base, val_run), val_target))
        if val < best[0]:
            best = (val, c, {n: p.detach().clone() for n, p in net.wide.state_dict().items()})
    net.wide.load_state_dict(best[2])
    return best[1]


def train_quality(
    module: LearnedModule,
    data: QualityData,
    fit_rows: torch.Tensor,
    val_rows: torch.Tensor,
    settings: TrainSettings,
    *,
    state_dir: Path | None = None,
    log: Logger | None = None,
) -> list[dict]:
    """Stages 0 and 1: fit the wide regression, then the deep parts (and LoRA weights) with early stopping
    against the stage-0 model; resumes from `state_dir`.

    Returns the per-epoch history; the module ends with the weights of the best validation epoch.
    """
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # the variance head (stage 2) takes no part in stage 1's loss: DDP must not wait for its gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if settings.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size {settings.batch_size} must be a multiple of the {accelerator.num_processes} "
            "processes: each takes an equal share of every batch; change train.batch_size or the process count"
        )
    k = data.quality.shape[1]
    resuming = state_dir is not None and (state_dir / "progress.json").exists()
    if not resuming:
        fit_shallow(module.net, data, fit_rows, val_rows, settings)
    module.net.wide.requires_grad_(False)  # stage 0 fitted it to convergence; the deep parts learn the rest
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    module, optimizer = accelerator.prepare(module, optimizer)
    device = accelerator.device
    val_rows_idx, val_run = _states(len(val_rows), k, settings, settings.seed + 10_000)
    val_rows_idx = val_rows[val_rows_idx]

    progress = {"epoch": 0, "best_val": math.inf, "bad_epochs": 0, "history": []}
    best = None
    if resuming:
        accelerator.load_state(str(state_dir / "accelerate"))
        progress = json.loads((state_dir / "progress.json").read_text())
        if (state_dir / "best.safetensors").exists():
            best = load_file(str(state_dir / "best.safetensors"))
    else:
        progress["best_val"] = evaluate_loss(module, data, val_rows_idx, val_run, settings.batch_size, accelerator)
        progress["history"].append({"epoch": 0, "val_loss": progress["best_val"]})
        best = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(module).state_dict().items()}

    while progress["epoch"] < settings.epochs and progress["bad_epochs"] < settings.patience:
        epoch = progress["epoch"]
        gen = torch.Generator().manual_seed(settings.seed + epoch)
        rows, run = sample_states(len(fit_rows), k, settings.max_depth, settings.per_row, gen)
        loader = DataLoader(
            TensorDataset(fit_rows[rows], run),
            batch_size=settings.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch),
        )
        loader = accelerator.prepare(loader)
        module.train()
        total, count = 0.0, 0
        for batch_rows, batch_run in loader:
            batch = data.batch(batch_rows, device)
            hide = (torch.rand(len(batch_rows), generator=gen) < settings.source_dropout).to(device)
            batch["source"] = batch["source"].masked_fill(hide, 0)
            batch["prior"] = torch.where(hide.unsqueeze(1), data.prior_blind[batch_rows.cpu()].to(device), batch["prior"])
            with accelerator.autocast():
                logits, _ = module(batch, batch_run)
            loss = _loss(logits, batch["quality"])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            total += float(loss.detach()) * len(batch_rows)
            count += len(batch_rows)
        total, count = distributed.all_sum([total, count])
        val = evaluate_loss(module, data, val_rows_idx, val_run, settings.batch_size, accelerator)
        record = {"epoch": epoch + 1, "train_loss": total / max(count, 1), "val_loss": val}
        progress["history"].append(record)
        if val < progress["best_val"] - 1e-5:
            progress.update(best_val=val, bad_epochs=0)
            best = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(module).state_dict().items()}
        else:
            progress["bad_epochs"] += 1
        progress["epoch"] = epoch + 1
        if log is not None:
            log(record)
        if state_dir is not None and accelerator.is_main_process:
            # the whole epoch's state replaces the last one at once: an interrupt while saving leaves the
            # previous epoch's weights, optimizer and progress together, and resuming stays exact
            with staged_output_dir(state_dir, overwrite=True, flag="state_dir") as staging:
                accelerator.save_state(str(staging / "accelerate"))
                if best is not None:
                    save_file({n: t.contiguous() for n, t in best.items()}, str(staging / "best.safetensors"))
                atomic_write_json(staging / "progress.json", progress)
    unwrapped = accelerator.unwrap_model(module)
    if best is not None:
        unwrapped.load_state_dict(best)
    return progress["history"]


@torch.no_grad()
def evaluate_loss(module, data: QualityData, rows, run, batch_size: int, accelerator: Accelerator) -> float:
    """Mean binary cross-entropy of the quality head on fixed (row, run set) states; each process scores
    its share of them and all get the same mean."""
    module.eval()
    n = len(rows)
    part = distributed.shard(n)
    rows, run = rows[part], run[part]
    total = 0.0
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        batch = data.batch(rows[sl], accelerator.device)
        with accelerator.autocast():
            logits, _ = module(batch, run[sl].to(accelerator.device))
        total += float(_loss(logits, batch["quality"])) * len(rows[sl])
    (total,) = distributed.all_sum([total])
    return total / max(n, 1)


@torch.no_grad()
def residuals(
    module: LearnedModule, data: QualityData, rows: torch.Tensor, run: torch.Tensor, batch_size: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(moves, token states) for each (row, run set) state: move j = the estimate of model j once j has run
    (run ∪ {j}) − its estimate now; 0 for models already run. These are the transitions a router makes."""
    module.eval()
    out_r, out_h = [], []
    k = data.quality.shape[1]
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        batch = data.batch(rows[sl], device)
        r = run[sl].to(device)
        # the ex-ante logits do not depend on the run set: one pass for the k + 1 run sets of the batch
        ante = module(batch, torch.zeros_like(r))[0] if module.net.move_gain is not None else None
        logits, hidden = module(batch, r, ante)
        now = torch.sigmoid(logits.float())
        moves = torch.zeros_like(now)
        for j in range(k):
            todo = ~r[:, j]
            if not bool(todo.any()):
                continue
            after = r.clone()
            after[:, j] = True
            logits_j, _ = module(batch, after, ante)
            moves[:, j] = torch.where(todo, torch.sigmoid(logits_j[:, j].float()) - now[:, j], 0.0)
        out_r.append(moves.cpu())
        out_h.append(hidden.float().cpu())
    return torch.cat(out_r), torch.cat(out_h)


def shared_residuals(
    module: LearnedModule, data: QualityData, rows: torch.Tensor, run: torch.Tensor, batch_size: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residuals` of every state, each process of a multi-process run computing a share of them."""
    part = distributed.shard(len(rows))
    if len(rows[part]):
        moves, hidden = residuals(module, data, rows[part], run[part], batch_size, device)
    else:  # more processes than states
        k = data.quality.shape[1]
        moves, hidden = torch.zeros(0, k), torch.zeros(0, k, module.net.config.hidden)
    return distributed.gather_shards(moves, len(rows)), distributed.gather_shards(hidden, len(rows))


def below_cap(rows: torch.Tensor, run: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The states from which the router can still run a model (fewer than `max_depth` run)."""
    keep = run.sum(1) < max_depth
    return rows[keep], run[keep]


MOVE_GAIN_GRID = tuple(i / 20 for i in range(41))
"""Gains tried for the post-hoc moves: 0 (a move that does not inform) to 2."""


@torch.no_grad()
def fit_move_gains(
    module: LearnedModule, data: QualityData, rows: torch.Tensor, settings: TrainSettings
) -> torch.Tensor:
    """For models not run and models run, the gain g of the post-hoc logit move that minimizes the log-loss
    of sigmoid(ex-ante + g · (post-hoc − ex-ante)) over sampled run sets of `rows` (held back from
    training): a network that over-reads a weak signal (an answer letter alone) is shrunk towards its
    ex-ante estimate, one that reads it well keeps g ≈ 1. Two gains only: with one per run-set size as well,
    fitted on 15 % of the training queries, cascade routing did worse on 5 rlc_train splits (−0.04 against
    +0.12 AUC over no gains). Gain 1 where a group has no state."""
    device = next(module.parameters()).device
    k = data.quality.shape[1]
    depth = min(settings.max_depth, k)
    position, run = sample_run_sets(len(rows), k, depth, 4, torch.Generator().manual_seed(settings.seed + 50_000))
    keep = run.any(1)
    position, run = position[keep], run[keep]
    gain = torch.ones(2, dtype=torch.float64)
    if not len(position):
        return gain

    def logits(states: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(states), settings.batch_size):
            batch = data.batch(states[start : start + settings.batch_size], device)
            out.append(module(batch, run[start : start + settings.batch_size].to(device))[0].double().cpu())
        return torch.cat(out)

    saved, module.net.move_gain = module.net.move_gain, None
    module.eval()
    ante = logits(rows, torch.zeros(len(rows), k, dtype=torch.bool))[position]  # one pass per row, not per state
    post = logits(rows[position], run)
    module.net.move_gain = saved
    truth = data.quality[rows[position]].double()
    grid = torch.tensor(MOVE_GAIN_GRID, dtype=torch.float64)
    for ran in (False, True):
        cell = run == ran
        if not bool(cell.any()):
            continue
        base, move, y = ante[cell], post[cell] - ante[cell], truth[cell]
        losses = torch.stack([nn.functional.binary_cross_entropy_with_logits(base + g * move, y) for g in grid])
        gain[int(ran)] = grid[int(losses.argmin())]
    return gain


def train_variance(
    module: LearnedModule, data: QualityData, fit_rows: torch.Tensor, settings: TrainSettings, log: Logger | None = None
) -> None:
    """Stage 2: fit the variance head by Gaussian likelihood of the moves of models not yet run."""
    device = next(module.parameters()).device
    k = data.quality.shape[1]
    rows, run = _states(len(fit_rows), k, settings, settings.seed + 20_000)
    rows, run = below_cap(fit_rows[rows], run, settings.max_depth)
    resid, hidden = shared_residuals(module, data, rows, run, settings.batch_size, device)
    head = module.net.variance_head
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed + 30_000)
    for epoch in range(settings.variance_epochs):
        order = torch.randperm(len(rows), generator=gen)
        total = 0.0
        for start in range(0, len(rows), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            free = ~run[idx]
            log_var = module.net.log_variance(hidden[idx].to(device), run[idx].to(device)).cpu()
            nll = 0.5 * (log_var + resid[idx] ** 2 / log_var.exp())
            loss = (nll * free).sum() / free.sum().clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        if log is not None:
            log({"variance_epoch": epoch + 1, "variance_nll": total / len(rows)})
