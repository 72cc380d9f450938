"""The learned quality estimator: text encoder + one network for every run set, calibrated Σ, cost model.

- Ex-ante (nothing run): a prior read off the most similar training queries (same source tag when
  known) corrected by an MLP on the query embedding; post-hoc: the same network given the run models'
  answers (confidence and completion length calibrated per model and source, agreement), through a transformer over
  model tokens and a wide regression on post-hoc features. One forward pass estimates all k models.
- Two modes: a frozen encoder with embeddings computed once and cached (fast on CPU), or LoRA
  fine-tuning of the encoder through peft (GPU).
- Post-hoc moves are only as large as they are informative: for models run and not run, a gain of the
  move from the ex-ante logit, fitted by log-loss on held-back rows (on mmlu_pro a lone answer letter
  says little, and the raw network over-read it; with log-prob confidences the gains stay near 1).
- Σ: a variance head predicts how far each estimate moves when its model runs next (a transition the
  router can make below the depth cap); on held-back rows its scale is calibrated so that intervals
  q̂ ± z·σ cover that move at the stated rate, and correlations of the moves per run-set size give the
  off-diagonal terms.
- Trained on a table with no answers, confidences or completion lengths, running a model reveals nothing: every
  estimate stays the ex-ante one and Σ is 0 (`posthoc: false` in the export), so cascade routing
  decides as routing does instead of paying for runs that cannot change an estimate.
- Saved as `estimator.safetensors` (all tensors) + `estimator.json` (config), like a peft adapter.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from router_train.manifest import read_manifest
from router_train.outputs import atomic_write_bytes, atomic_write_json
from router_train.table import RoutingTable

from .base import Embedder, Estimate, Features, QualityEstimator
from .confidence import ConfidenceCalibrator
from .cost import CostModel
from .encoder import EncoderConfig, LoraSettings, ShardedEmbedder, TextEncoder, cached
from .features import AnswerFeatures, answer_features
from .neighbors import NeighborPrior
from .network import NetConfig, QualityNet
from .training import (
    LearnedModule, Logger, QualityData, TrainSettings, below_cap, fit_move_gains, shared_residuals, train_quality,
    train_variance,
)

FORMAT = "router-train-learned"
VERSION = 2
_ANSWER_FIELDS = tuple(AnswerFeatures.__dataclass_fields__)
_MEMBER_FEATURES = ("prior", "calibrated", "ante")  # what differs between the members of an ensemble (per seed)


@dataclass
class LearnedConfig:
    """Everything that defines a learned estimator before training."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    finetune: bool = False  # LoRA fine-tuning of the encoder (encoder.lora or default LoraSettings)
    hidden: int = 128
    layers: int = 0  # attention layers between the model tokens (0: tokens without attention; see benchmarks/ablation.py)
    heads: int = 4
    dropout: float = 0.1
    train: TrainSettings = field(default_factory=TrainSettings)
    val_fraction: float = 0.15  # held-back training rows: early stopping and Σ calibration
    coverage: float = 0.9  # stated coverage of the intervals q̂ ± z σ
    neighbors: int = 0  # training queries the prior is read from (0: per-source means; 0 when fine-tuning)
    neighbor_shrink: float = 20.0
    embedding_cache: str | None = ".cache/embeddings"
    ensemble: int = 1  # estimators trained at seeds seed, seed + 1, ...; their estimates averaged (a deep ensemble)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble (estimator.ensemble in a recipe) is the number of estimators averaged, at least 1; got {self.ensemble}")
        if self.ensemble > 1 and self.finetune:
            raise ValueError("ensemble > 1 needs a frozen encoder (finetune: false): the members share it")
        if not 0.0 < self.coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1), got {self.coverage}")


class LearnedEstimator(QualityEstimator):
    """Learned ex-ante and post-hoc quality estimates with calibrated uncertainty."""

    def __init__(self, config: LearnedConfig = LearnedConfig(), encoder: Embedder | None = None) -> None:
        self.config = config
        self.encoder = encoder
        self.models: list[str] = []
        self.sources: list[str] = []  # source tags seen in training; index i + 1 in the network, 0 = unknown
        self.net: QualityNet | None = None
        self.cost_model = CostModel()
        self.neighbors = NeighborPrior(0 if config.finetune else config.neighbors, config.neighbor_shrink)
        self.calibrator = ConfidenceCalibrator()
        self.scale = 1.0
        self.correlation = torch.ones(1, 1, 1)
        self.posthoc = True  # the training table had answers, confidences or completion lengths: running a model can inform
        self.history: list[dict] = []
        self.members: list[LearnedEstimator] = []  # ensemble > 1: one estimator per seed, estimates averaged

    # -- encoder and features ---------------------------------------------------------------
    def _encoder(self) -> Embedder:
        if self.encoder is None:
            self.encoder = TextEncoder(self.config.encoder)
        return self.encoder

    def embed(self, texts: list[str], progress: bool = False, *, cache: bool = True) -> torch.Tensor:
        """Embeddings of query texts, from the on-disk cache when configured (and `cache`). A bare text encoder
        is shared out among the processes of a multi-process run (a wrapped one, e.g. the recipe's, is already)."""
        encoder = self._encoder()
        if isinstance(encoder, TextEncoder):
            encoder = ShardedEmbedder(encoder)
        return cached(encoder, self.config.embedding_cache if cache else None, progress).encode(texts)

    def featurize(
        self, table: RoutingTable, progress: bool = False, embeddings: torch.Tensor | None = None
    ) -> Features:
        """Per-row features; `embeddings` (n, d) skips the encoder (e.g. a serving cache already has them)."""
        self.check_models(table)
        if self.members:  # the first member's features, and each member's own prior and calibrated confidences
            features = self.members[0].featurize(table, progress, embeddings)
            for i, member in enumerate(self.members):
                own = {n: features[n] for n in _MEMBER_FEATURES} if i == 0 else member._own_features(features)
                features.update({f"member{i}.{n}": v for n, v in own.items()})
            return features
        answers = answer_features(table.answers, table.confidence, table.n, table.k, table.tokens_out)
        features = {f"answers.{f}": getattr(answers, f) for f in _ANSWER_FIELDS}
        features["embedding"] = self.embed(list(table.queries), progress) if embeddings is None else embeddings
        features["source"] = self.source_index(table.sources)
        features.update(self._own_features(features))
        features.update({f"cost.{n}": t for n, t in self.cost_model.featurize(table).items()})
        return features

    def _own_features(self, features: Features) -> Features:
        """The features fitted per estimator (`_MEMBER_FEATURES`), from the shared ones: the prior logits, the
        answers' calibrated confidence logits, and room for each row's ex-ante logits (NaN until `predict`
        first needs them; the same for every run set of a row, so computed once)."""
        source = features["source"]
        prior = self.neighbors.logits(features["embedding"], source)
        return {"prior": prior,
                "calibrated": self.calibrator.transform(features["answers.confidence"],
                                                        features["answers.has_confidence"], source,
                                                        features["answers.tokens_out"],
                                                        features["answers.has_tokens_out"]),
                "ante": torch.full(prior.shape, float("nan"), dtype=torch.float32)}

    def source_index(self, sources: list[str]) -> torch.Tensor:
        """Network index of each source tag: 1 + its position among the training tags, 0 if unknown."""
        lookup = {name: i + 1 for i, name in enumerate(self.sources)}
        return torch.tensor([lookup.get(s, 0) for s in sources], dtype=torch.long)

    # -- training ---------------------------------------------------------------------------
    def fit(self, table: RoutingTable, *, state_dir: Path | None = None, log: Logger | None = None,
            progress: bool = False) -> "LearnedEstimator":
        """Train on all rows of `table` (a held-back share is used for early stopping and Σ); with `ensemble`
        N > 1, N estimators at consecutive seeds (each its own held-back share), sharing the encoder."""
        cfg = self.config
        if cfg.ensemble > 1:
            return self._fit_members(table, state_dir=state_dir, log=log, progress=progress)
        torch.manual_seed(cfg.train.seed)
        self.models = list(table.models)
        self.sources = sorted({s for s in table.sources if s})
        self.cost_model.fit(table)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        order = torch.randperm(table.n, generator=gen)
        n_val = max(1, int(round(cfg.val_fraction * table.n)))
        val_rows, fit_rows = order[:n_val].sort().values, order[n_val:].sort().values
        answers = answer_features(table.answers, table.confidence, table.n, table.k, table.tokens_out)
        self.posthoc = bool(answers.has_answer.any() or answers.has_confidence.any() or answers.has_tokens_out.any())
        quality = table.quality.float()
        source = self.source_index(table.sources)
        encoder = self._encoder()
        embedding = self.embed(list(table.queries), progress)  # (before any fine-tuning) for the prior
        self.neighbors.fit(embedding[fit_rows], quality[fit_rows], source[fit_rows], len(self.sources))
        self.calibrator.fit(answers.confidence[fit_rows], answers.has_confidence[fit_rows], quality[fit_rows],
                            source[fit_rows], len(self.sources), answers.tokens_out[fit_rows],
                            answers.has_tokens_out[fit_rows])
        calibrated = self.calibrator.transform(answers.confidence, answers.has_confidence, source,
                                               answers.tokens_out, answers.has_tokens_out)
        itself = torch.full((table.n,), -1, dtype=torch.long)
        itself[fit_rows] = torch.arange(len(fit_rows))  # a training query is not its own neighbour
        blind = torch.zeros_like(source)
        priors = (self.neighbors.logits(embedding, source, itself), self.neighbors.logits(embedding, blind, itself))
        if cfg.finetune:
            if getattr(encoder, "lora", None) is None:
                encoder.enable_lora(cfg.encoder.lora or LoraSettings())
            tokens = {name: t.cpu() for name, t in encoder.tokenize(list(table.queries)).items()}
            data = QualityData(answers, quality, source, *priors, calibrated, tokens=tokens)
            tuned = encoder
        else:
            data = QualityData(answers, quality, source, *priors, calibrated, embedding=embedding)
            tuned = None
        self.net = QualityNet(
            NetConfig(embedding.shape[1], table.k, cfg.hidden, cfg.layers, cfg.heads, cfg.dropout,
                      n_sources=len(self.sources))
        )
        module = LearnedModule(self.net, tuned)
        self.history = train_quality(module, data, fit_rows, val_rows, cfg.train, state_dir=state_dir, log=log)
        if tuned is not None:  # the tuned encoder is frozen from here: embed each query once, on the training
            # device, instead of running the encoder in every pass below (k + 2 times per state, on the CPU)
            data = replace(data, embedding=self.embed(list(table.queries), progress, cache=False), tokens=None)
            module = LearnedModule(self.net)
            tuned.cpu()
        module = module.cpu()
        if self.posthoc:
            self.net.move_gain = fit_move_gains(module, data, val_rows, cfg.train)
            if log is not None:
                log({"move_gain_not_run": float(self.net.move_gain[0]), "move_gain_run": float(self.net.move_gain[1])})
            train_variance(module, data, fit_rows, cfg.train, log=log)
            self._calibrate(module, data, val_rows)
        else:  # estimates never move, so `predict` gives Σ = 0: the variance head would be fitted for nothing
            self.scale = 0.0  # identity correlations, in float64 as `_calibrate` exports them
            self.correlation = torch.eye(table.k, dtype=torch.float64).repeat(cfg.train.max_depth + 1, 1, 1)
        module.eval()
        return self

    def _fit_members(self, table: RoutingTable, *, state_dir: Path | None, log: Logger | None,
                     progress: bool) -> "LearnedEstimator":
        cfg, encoder = self.config, self._encoder()
        self.members = []
        for i in range(cfg.ensemble):
            member = _member_config(cfg, i)
            where = None if state_dir is None else Path(state_dir) / f"member{i}"
            tagged = None if log is None else (lambda record, i=i: log({**record, "member": i}))
            self.members.append(LearnedEstimator(member, encoder).fit(table, state_dir=where, log=tagged, progress=progress))
        self._adopt_members()
        self.history = [{**h, "member": i} for i, m in enumerate(self.members) for h in m.history]
        return self

    def _adopt_members(self) -> None:
        """What the members share (trained on one table): models, source tags, cost model, post-hoc flag."""
        first = self.members[0]
        self.models, self.sources, self.posthoc, self.cost_model = first.models, first.sources, first.posthoc, first.cost_model
        self.net = first.net  # fitted marker, device and sizes (embedding width) for callers

    def _calibrate(self, module: LearnedModule, data: QualityData, val_rows: torch.Tensor) -> None:
        """Scale σ so that q̂ ± zσ covers the one-step move of each estimate at the stated rate, and estimate
        the moves' correlations per run-set size, on held-back rows."""
        from .run_sets import sample_run_sets

        settings = self.config.train
        k = len(self.models)
        rows, run = sample_run_sets(len(val_rows), k, settings.max_depth, 2,
                                    torch.Generator().manual_seed(settings.seed + 40_000))
        rows, run = below_cap(val_rows[rows], run, settings.max_depth)
        resid, hidden = shared_residuals(module, data, rows, run, settings.batch_size, torch.device("cpu"))
        with torch.no_grad():
            sigma = module.net.log_variance(hidden, run).mul(0.5).exp()
        free = ~run
        z = (resid / sigma)[free].abs()
        target = torch.quantile(z, self.config.coverage).item() if z.numel() else 1.0
        self.scale = target / _normal_quantile(0.5 + self.config.coverage / 2)  # 0 where the moves are all 0
        normalized = resid / sigma  # correlations do not depend on the scale, which may be 0 (a fitted gain of 0)
        sizes = run.sum(1)
        self.correlation = torch.stack(
            [masked_correlation(normalized[sizes == t], free[sizes == t]) for t in range(settings.max_depth + 1)]
        )

    # -- prediction -------------------------------------------------------------------------
    @property
    def uncertain(self) -> bool:
        return self.posthoc  # without a post-hoc path `predict` gives Σ = 0

    @torch.no_grad()
    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        if self.net is None:
            raise RuntimeError("the estimator is not fitted: call fit() or LearnedEstimator.load()")
        if self.members:  # Σ and cost: the first member's, so the others compute their quality alone
            own = [{**features, **{n: features[f"member{i}.{n}"] for n in _MEMBER_FEATURES}}
                   for i in range(len(self.members))]
            first = self.members[0].predict(own[0], rows, run)
            rest = [member._quality(own[i], rows, run)[0] for i, member in enumerate(self.members) if i > 0]
            quality = torch.stack([first.quality, *rest]).mean(0)
            return Estimate(quality=quality, cost=first.cost, cov=first.cov)
        quality, hidden, seen = self._quality(features, rows, run)
        run_d = seen.to(hidden.device)
        sigma = self.net.log_variance(hidden, run_d).mul(0.5).exp().double().cpu() * self.scale
        sigma = sigma.masked_fill(run, 0.0) if self.posthoc else torch.zeros_like(sigma)
        t = seen.sum(1).clamp(max=self.correlation.shape[0] - 1)
        cov = sigma.unsqueeze(2) * self.correlation[t].double() * sigma.unsqueeze(1)
        cost_features = {n[5:]: v for n, v in features.items() if n.startswith("cost.")}
        return Estimate(quality=quality, cost=self.cost_model.predict(cost_features, rows, run), cov=cov)

    def _quality(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(quality (B, k) float64 on the CPU, the network's hidden states, the run mask it saw) of one network."""
        # no answers or confidences in training: running a model teaches nothing, every estimate stays ex-ante
        seen = run if self.posthoc else torch.zeros_like(run)
        self.net.eval()
        ante = self._ante(features, rows) if self.net.move_gain is not None and bool(seen.any()) else None
        embedding, answers, prior, calibrated, source = self._net_inputs(features, rows)
        logits, hidden = self.net(embedding, answers, seen.to(embedding.device), prior, calibrated, source, ante=ante)
        return torch.sigmoid(logits.double()).cpu(), hidden, seen

    def _ante(self, features: Features, rows: torch.Tensor) -> torch.Tensor | None:
        """Ex-ante logits (B, k) of `rows`, kept in the features' `ante` buffer: calibration asks for many run sets
        of each row, and the post-hoc path needs the ex-ante pass for each (None: features without the buffer)."""
        held = features.get("ante")
        if held is None:
            return None
        missing = rows[held[rows, 0].isnan()].unique()
        if missing.numel():
            embedding, answers, prior, calibrated, source = self._net_inputs(features, missing)
            nobody = torch.zeros(missing.numel(), held.shape[1], dtype=torch.bool, device=embedding.device)
            logits, _ = self.net(embedding, answers, nobody, prior, calibrated, source)  # the ex-ante pass
            held[missing] = logits.float().cpu()
        return held[rows].to(self.net.readout.device)

    def _net_inputs(self, features: Features, rows: torch.Tensor) -> tuple:
        """The network's per-row inputs for `rows`, on its device: embedding, answers, prior, calibrated, source."""
        device = self.net.readout.device
        answers = AnswerFeatures(*(features[f"answers.{f}"][rows].to(device) for f in _ANSWER_FIELDS))
        return (features["embedding"][rows].to(device), answers, features["prior"][rows].to(device),
                features["calibrated"][rows].to(device), features["source"][rows].to(device))

    # -- export -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write `estimator.safetensors` and `estimator.json` into `directory` (atomically, file by file)."""
        if self.net is None:
            raise RuntimeError("nothing to save: the estimator is not fitted")
        directory = Path(directory)
        if self.members:
            tensors = {f"member{i}.{n}": t for i, member in enumerate(self.members) for n, t in member._tensors().items()}
        else:
            tensors = self._tensors()
        atomic_write_bytes(directory / "estimator.safetensors", safetensors.torch.save(tensors))
        atomic_write_json(directory / "estimator.json", self.describe())

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every fitted tensor of one estimator, by name."""
        tensors = {f"net.{n}": t.detach().cpu().contiguous() for n, t in self.net.state_dict().items()}
        tensors["calibration.scale"] = torch.tensor([self.scale], dtype=torch.float64)
        tensors["calibration.correlation"] = self.correlation.contiguous()
        if self.net.move_gain is not None:
            tensors["calibration.move_gain"] = self.net.move_gain.contiguous()
        tensors.update({f"cost.{n}": t.contiguous() for n, t in self.cost_model.state_dict().items()})
        tensors.update({f"neighbors.{n}": t.contiguous() for n, t in self.neighbors.state_dict().items()})
        tensors.update({f"calibrator.{n}": t.contiguous() for n, t in self.calibrator.state_dict().items()})
        if self.config.finetune:
            tensors.update({f"lora.{n}": t.detach().cpu().contiguous() for n, t in self._encoder().lora_state_dict().items()})
        return tensors

    def describe(self) -> dict:
        """The JSON config stored beside the weights."""
        cfg = asdict(self.config)
        return {
            "format": FORMAT,
            "version": VERSION,
            "models": self.models,
            "sources": self.sources,
            "config": cfg,
            "net": asdict(self.net.config),
            "encoder_identity": self._encoder().identity(),
            "cost": self.cost_model.config(),
            "posthoc": self.posthoc,
        }

    @classmethod
    def load(
        cls, directory: str | Path, *, device: str = "cpu", encoder: Embedder | None = None, quantize: str | None = None
    ) -> "LearnedEstimator":
        """Rebuild a saved estimator; fails with a message naming the file on missing, corrupt or (when a
        router export's manifest.json is beside it) changed files, shapes or versions. `quantize="int8"`
        runs its (frozen) encoder with dynamically int8-quantized Linear layers: faster on CPU only."""
        if quantize is not None and device != "cpu":
            raise ValueError(f"quantize={quantize!r} is for CPU inference; load on device 'cpu' (got {device!r})")
        directory = Path(directory)
        meta_path, weights_path = directory / "estimator.json", directory / "estimator.safetensors"
        for path in (meta_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: {directory} is not a complete learned-estimator export")
        if (directory / "manifest.json").exists():
            read_manifest(directory)  # checks the SHA-256 of every file of the export
        try:
            meta = json.loads(meta_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{meta_path} is not valid JSON ({e}): corrupt or truncated; export the estimator again"
            ) from None
        if not isinstance(meta, dict):
            raise ValueError(
                f"{meta_path} must hold a JSON object, got a {type(meta).__name__}; export the estimator again"
            )
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(
                f"{meta_path}: unsupported estimator format {meta.get('format')!r} version {meta.get('version')!r}; "
                f"this router-train reads {FORMAT!r} version {VERSION}"
            )
        absent = [key for key in ("models", "sources", "config", "net", "encoder_identity", "cost") if key not in meta]
        if absent:
            raise ValueError(f"{meta_path} lacks the field(s) {absent}; export the estimator again")
        _check_models(meta, meta_path)
        config = _config_from_dict(meta["config"])
        if quantize is not None:
            if config.finetune:
                raise ValueError(f"{meta_path}: quantize={quantize!r} needs a frozen encoder; this one was fine-tuned (LoRA)")
            config.encoder.quantize = quantize
        est = cls(config, encoder)
        est.models = list(meta["models"])
        est.sources = list(meta["sources"])
        est.posthoc = bool(meta.get("posthoc", True))  # exports before this field: post-hoc path on
        try:
            tensors = safetensors.torch.load(weights_path.read_bytes())
        except SafetensorError as e:
            raise ValueError(
                f"{weights_path} is not a readable safetensors file ({e}): corrupt or truncated; "
                "export the estimator again"
            ) from None
        if config.ensemble > 1:
            est.members = []
            for i in range(config.ensemble):
                member = cls(_member_config(config, i), est._encoder())
                member.models, member.sources, member.posthoc = est.models, est.sources, est.posthoc
                member._restore(meta, tensors, f"member{i}.", weights_path)
                member.net.to(device).eval()
                est.members.append(member)
            est._adopt_members()
        else:
            est._restore(meta, tensors, "", weights_path)
        if encoder is None and config.finetune:
            tuned = est._encoder()
            if tuned.lora is None:
                tuned.enable_lora(config.encoder.lora or LoraSettings())
            tuned.load_lora_state_dict({n[5:]: t for n, t in tensors.items() if n.startswith("lora.")})
        encoder_module = est._encoder()
        if isinstance(encoder_module, torch.nn.Module):
            encoder_module.to(device)
        identity = encoder_module.identity()
        saved = meta["encoder_identity"]
        if identity.get("revision") != saved.get("revision"):
            raise ValueError(
                f"{meta_path}: the encoder {identity.get('name_or_path')} (revision {identity.get('revision')}) is not "
                f"the one this estimator was trained with (revision {saved.get('revision')}); point the encoder "
                "to the original model files or retrain"
            )
        est.net.to(device).eval()
        return est

    def _restore(self, meta: dict, tensors: dict, prefix: str, weights_path: Path) -> None:
        """Set the fitted parts of one estimator from the tensors named `prefix` + name."""
        self.net = QualityNet(NetConfig(**meta["net"]))
        _load_prefixed(self.net, tensors, prefix + "net.", weights_path)
        self.scale = float(_take(tensors, prefix + "calibration.scale", weights_path)[0])
        self.correlation = _take(tensors, prefix + "calibration.correlation", weights_path)
        k = len(self.models)
        if self.correlation.shape[1:] != (k, k):
            raise ValueError(f"{weights_path}: {prefix}calibration.correlation has shape "
                             f"{tuple(self.correlation.shape)}, expected (T, {k}, {k})")
        gain = tensors.get(prefix + "calibration.move_gain")  # exports before the gains: moves as trained
        if gain is not None and (gain.shape != (2,) or not bool(torch.isfinite(gain).all())):
            raise ValueError(f"{weights_path}: {prefix}calibration.move_gain must hold 2 finite gains, got {gain.tolist()}; "
                             "export the estimator again")
        self.net.move_gain = gain
        self.neighbors.load_state_dict(
            {n: _take(tensors, f"{prefix}neighbors.{n}", weights_path) for n in ("bank", "quality", "source", "source_mean")}
        )
        self.calibrator.load_state_dict(
            {n: _take(tensors, f"{prefix}calibrator.{n}", weights_path) for n in ("mean", "std", "weight", "bias")}
        )
        cost = prefix + "cost."
        self.cost_model = CostModel.from_config(meta["cost"]).load_state_dict(
            {n[len(cost):]: t for n, t in tensors.items() if n.startswith(cost)}
        )


def _member_config(config: LearnedConfig, i: int) -> LearnedConfig:
    """The config of an ensemble's member i: a single estimator at seed + i."""
    return replace(config, ensemble=1, train=replace(config.train, seed=config.train.seed + i))


def masked_correlation(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Correlation matrix (k, k) of the columns of `values` (N, k) over rows where both entries are masked in;
    identity where there is too little data, and PSD."""
    k = values.shape[1]
    if values.shape[0] < 3:
        return torch.eye(k, dtype=torch.float64)
    v = values.double() * mask
    m = mask.double()
    count = m.t() @ m
    second = v.t() @ v / count.clamp(min=1)
    std = second.diagonal().clamp(min=1e-12).sqrt()
    corr = second / std.unsqueeze(0) / std.unsqueeze(1)
    corr = torch.where(count >= 10, corr, torch.eye(k, dtype=torch.float64)).clamp(-1, 1)
    corr.fill_diagonal_(1.0)
    eigval, eigvec = torch.linalg.eigh((corr + corr.t()) / 2)
    corr = eigvec @ torch.diag(eigval.clamp(min=0)) @ eigvec.t()
    d = corr.diagonal().clamp(min=1e-12).sqrt()
    return corr / d.unsqueeze(0) / d.unsqueeze(1)


def _normal_quantile(p: float) -> float:
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


def _config_from_dict(data: dict) -> LearnedConfig:
    enc = dict(data["encoder"])
    enc["lora"] = LoraSettings(**enc["lora"]) if enc.get("lora") else None
    return LearnedConfig(
        encoder=EncoderConfig(**enc),
        train=TrainSettings(**data["train"]),
        **{k: v for k, v in data.items() if k not in ("encoder", "train")},
    )


def _check_models(meta: dict, path: Path) -> None:
    """The model list of estimator.json: distinct names, as many as the network has outputs, the cost model's."""
    models = meta["models"]
    names = isinstance(models, list) and all(isinstance(m, str) and m for m in models)
    if not names or len(set(models)) < len(models):
        raise ValueError(
            f"{path}: 'models' must be a list of distinct model names, got {models!r}; export the estimator again"
        )
    n_net = meta["net"].get("n_models") if isinstance(meta["net"], dict) else None
    cost_models = meta["cost"].get("models") if isinstance(meta["cost"], dict) else None
    if n_net != len(models) or cost_models != models:
        raise ValueError(
            f"{path}: 'models' lists {models}, but the network has {n_net} model outputs and the cost model "
            f"lists {cost_models}; the file was edited or corrupted: export the estimator again"
        )


def _take(tensors: dict, name: str, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{path}: tensor {name!r} is missing; re-export the estimator")
    return tensors[name]


def _load_prefixed(module: torch.nn.Module, tensors: dict, prefix: str, path: Path) -> None:
    expected = module.state_dict()
    state = {}
    for name, value in expected.items():
        saved = _take(tensors, prefix + name, path)
        if saved.shape != value.shape:
            raise ValueError(
                f"{path}: tensor {prefix + name!r} has shape {tuple(saved.shape)}, expected {tuple(value.shape)}"
            )
        state[name] = saved
    module.load_state_dict(state)
