"""The text encoder and its embedding cache, on a tiny random BERT (plus one check of the packaged MiniLM)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import tiny_encoder_dir

from estimators.encoder import EmbeddingCache, EncoderConfig, LoraSettings, MemoEmbedder, TextEncoder, cached

TEXTS = [
    "what is the capital of france",
    "cat",
    "how many fish are in the river one two three four five",
    "xyzzy words the tokenizer does not know",
    "",
    "write code to solve the question",
    "the dog sat on the mat",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_encoder_dir(tmp_path_factory.mktemp("tiny"))


def tiny(path: Path, **config) -> TextEncoder:
    return TextEncoder(EncoderConfig(name_or_path=str(path), max_length=32, **config))


class CountingEmbedder:
    """Wraps an encoder and counts `encode` calls."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.calls = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        return self.encoder.encode(texts)

    def identity(self) -> dict:
        return self.encoder.identity()


def test_encode_shapes_dtype_and_normalization(tiny_dir: Path) -> None:
    encoder = tiny(tiny_dir)
    embeddings = encoder.encode(TEXTS)
    assert encoder.dim == 32
    assert embeddings.shape == (len(TEXTS), 32)
    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert encoder.encode([]).shape == (0, 32)

    raw = tiny(tiny_dir, normalize=False).encode(TEXTS)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-2)
    assert torch.allclose(F.normalize(raw, dim=1), embeddings, atol=1e-6)

    batch = encoder.tokenize(TEXTS)
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        assert torch.allclose(encoder(**batch), embeddings, atol=1e-6)


def test_encode_is_invariant_to_batching_padding_and_order(tiny_dir: Path) -> None:
    encoder = tiny(tiny_dir)
    reference = torch.cat([encoder.encode([text]) for text in TEXTS])  # no padding at all
    for batch_size in (1, 2, 3, 100):
        assert torch.allclose(encoder.encode(TEXTS, batch_size=batch_size), reference, atol=1e-6)
    assert torch.allclose(encoder.encode(TEXTS[::-1], batch_size=2), reference.flip(0), atol=1e-6)


def test_encode_restores_training_mode(tiny_dir: Path) -> None:
    encoder = tiny(tiny_dir).train()
    first = encoder.encode(TEXTS)
    assert encoder.training
    assert torch.equal(encoder.encode(TEXTS), first)  # dropout off while encoding


def test_long_texts_are_truncated_to_max_length(tiny_dir: Path) -> None:
    encoder = TextEncoder(EncoderConfig(name_or_path=str(tiny_dir), max_length=8))
    words = "one two three four five six seven eight nine ten".split()
    long, kept = encoder.encode([" ".join(words), " ".join(words[:6])])  # [CLS] + 6 words + [SEP]
    assert torch.allclose(long, kept, atol=1e-6)


def test_max_length_beyond_the_models_positions_is_rejected(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(EncoderConfig(name_or_path=str(tiny_dir), max_length=65))


def test_identity_changes_with_the_model_files_and_settings(tmp_path: Path) -> None:
    path = tiny_encoder_dir(tmp_path / "model", seed=0)
    identity = tiny(path).identity()
    assert identity == tiny(path).identity()
    assert set(identity) == {"name_or_path", "revision", "max_length", "normalize", "lora"}
    assert identity != tiny(path, normalize=False).identity()
    assert identity != TextEncoder(EncoderConfig(name_or_path=str(path), max_length=16)).identity()
    tiny_encoder_dir(path, seed=1)  # same folder, new weights
    changed = tiny(path).identity()
    assert changed["name_or_path"] == identity["name_or_path"]
    assert changed["revision"] != identity["revision"]


def test_cache_hit_does_not_encode_and_returns_identical_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    embedder = CountingEmbedder(tiny(tiny_dir))
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.get(embedder, TEXTS)
    assert embedder.calls == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    second = EmbeddingCache(tmp_path / "cache").get(embedder, TEXTS)
    assert embedder.calls == 1
    assert torch.equal(first, second)
    assert not list((tmp_path / "cache").glob("*.tmp"))

    cache.get(embedder, TEXTS[::-1])  # other order: other key
    cache.get(embedder, ["a b", "c"])
    cache.get(embedder, ["a", "b c"])  # same characters, split differently
    assert embedder.calls == 4
    other = CountingEmbedder(tiny(tiny_dir, normalize=False))
    cache.get(other, TEXTS)
    assert other.calls == 1


def test_cached_encodes_once_per_text_list_and_passes_through_without_a_directory(tiny_dir: Path, tmp_path: Path) -> None:
    embedder = CountingEmbedder(tiny(tiny_dir))
    assert cached(embedder, None) is embedder and cached(embedder, "") is embedder
    wrapped = cached(embedder, tmp_path / "cache", progress=False)
    first, second = wrapped.encode(TEXTS), wrapped.encode(TEXTS)
    assert embedder.calls == 1 and torch.equal(first, second)
    assert wrapped.identity() == embedder.identity()


def test_memo_embeds_each_text_once_across_subsets_and_orders(tiny_dir: Path, tmp_path: Path) -> None:
    encoder = tiny(tiny_dir)
    seen: list[str] = []

    class Recording(CountingEmbedder):
        def encode(self, texts: list[str]) -> torch.Tensor:
            seen.extend(texts)
            return super().encode(texts)

    memo = MemoEmbedder(Recording(encoder))
    full = memo.encode(TEXTS)
    subset = TEXTS[4:] + TEXTS[:2] + ["a new text", "a new text"]
    again = cached(memo, tmp_path / "cache", progress=False).encode(subset)  # a subset misses the disk cache
    assert seen == TEXTS + ["a new text"]  # only the unseen text, once
    assert torch.equal(again[:5], torch.cat([full[4:], full[:2]])) and torch.equal(again[5], again[6])
    assert torch.allclose(again[5], encoder.encode(["a new text"])[0], atol=1e-6)
    assert memo.encode([]).shape == (0, encoder.dim) and memo.identity() == encoder.identity()


def test_memo_remembers_embeddings_read_from_the_disk_cache(tiny_dir: Path, tmp_path: Path) -> None:
    # cross-fitting: the final estimator's texts hit the disk cache, then each fold asks for a subset of them
    encoder = tiny(tiny_dir)
    expected = cached(MemoEmbedder(encoder), tmp_path, progress=False).encode(TEXTS)  # writes the cache file
    counting = CountingEmbedder(encoder)
    memo = MemoEmbedder(counting)
    assert torch.equal(cached(memo, tmp_path, progress=False).encode(TEXTS), expected)  # read from disk
    assert counting.calls == 0
    assert torch.equal(memo.encode(TEXTS[2:5]), expected[2:5]) and counting.calls == 0


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda path: path.write_bytes(b"\x00\x01 not a safetensors file"),
        lambda path: path.write_bytes(path.read_bytes()[:40]),
        lambda path: save_file({"other": torch.zeros(2, 3)}, path),
        lambda path: save_file({"embeddings": torch.zeros(2, 3)}, path),
    ],
    ids=["garbage", "truncated", "wrong-key", "wrong-shape"],
)
def test_corrupt_cache_file_is_recomputed(tiny_dir: Path, tmp_path: Path, corrupt) -> None:
    embedder = CountingEmbedder(tiny(tiny_dir))
    cache = EmbeddingCache(tmp_path)
    expected = cache.get(embedder, TEXTS)
    (path,) = tmp_path.glob("*.safetensors")
    corrupt(path)
    with pytest.warns(UserWarning, match="recomputing"):
        again = cache.get(embedder, TEXTS)
    assert embedder.calls == 2
    assert torch.equal(again, expected)
    assert torch.equal(load_file(path)["embeddings"], expected)


def test_lora_leaves_only_adapters_trainable_and_gives_them_gradients(tiny_dir: Path) -> None:
    encoder = tiny(tiny_dir)
    encoder.enable_lora(LoraSettings(r=4))
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(".query." in name for name in trainable) and any(".value." in name for name in trainable)
    assert not any(".key." in name for name in trainable)
    encoder.train()
    encoder(**encoder.tokenize(TEXTS))[:, 0].sum().backward()
    for name, p in encoder.named_parameters():
        assert (p.grad is not None) == (name in trainable)
    assert any(p.grad.abs().sum() > 0 for name, p in encoder.named_parameters() if "lora_B" in name)
    with pytest.raises(ValueError, match="already"):
        encoder.enable_lora(LoraSettings())


def test_lora_weights_round_trip_after_a_training_step(tiny_dir: Path, tmp_path: Path) -> None:
    settings = LoraSettings(r=4, alpha=8)
    encoder = tiny(tiny_dir, lora=settings)
    before, identity_before = encoder.encode(TEXTS), encoder.identity()
    assert identity_before["lora"] and "lora_weights" in identity_before

    encoder.train()
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=0.5)
    encoder(**encoder.tokenize(TEXTS))[:, 0].sum().backward()
    optimizer.step()
    trained = encoder.encode(TEXTS)
    assert not torch.allclose(trained, before, atol=1e-4)
    assert encoder.identity() != identity_before

    state = encoder.lora_state_dict()
    assert state and all("lora_" in name for name in state)
    save_file(state, tmp_path / "lora.safetensors")
    fresh = tiny(tiny_dir)
    fresh.enable_lora(settings)
    fresh.load_lora_state_dict(load_file(tmp_path / "lora.safetensors"))
    assert torch.equal(fresh.encode(TEXTS), trained)
    assert fresh.identity() == encoder.identity()

    with pytest.raises(ValueError, match="do not fit"):
        tiny(tiny_dir, lora=LoraSettings(r=4, target_modules=["query"])).load_lora_state_dict(state)
    with pytest.raises(ValueError, match="not enabled"):
        tiny(tiny_dir).lora_state_dict()


def test_a_path_that_is_neither_folder_nor_hub_id_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name_or_path=.*missing.*local model folder"):
        TextEncoder(EncoderConfig(name_or_path=str(tmp_path / "missing")))


def test_a_hub_id_in_the_offline_cache_loads_with_its_commit_as_revision(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-bert"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    encoder = TextEncoder(EncoderConfig(name_or_path="tiny-org/tiny-bert", max_length=32))
    assert encoder.identity()["revision"] == commit
    assert torch.allclose(encoder.encode(TEXTS), tiny(tiny_dir).encode(TEXTS), atol=1e-6)


def test_default_encoder_loads_offline_and_embeds_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = TextEncoder()
    assert encoder.identity()["name_or_path"] == "default" and encoder.dim == 384
    query, paraphrase, unrelated = encoder.encode(
        [
            "What is the capital city of France?",
            "Which city is France's capital?",
            "Write a Python function that sorts a list of integers.",
        ]
    )
    assert query.shape == (384,)
    assert torch.allclose(torch.stack([query, paraphrase, unrelated]).norm(dim=1), torch.ones(3), atol=1e-5)
    assert query @ paraphrase > query @ unrelated + 0.3


def test_int8_encoder_is_quantized_keyed_apart_and_close_to_float(tiny_dir: Path) -> None:
    texts = ["a short query", "another, somewhat longer query about cats and dogs", "x"]
    float_encoder, int8_encoder = tiny(tiny_dir), tiny(tiny_dir, quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in int8_encoder.modules())
    assert int8_encoder.identity() == float_encoder.identity() | {"quantize": "int8"}  # never served from a float cache
    a, b = float_encoder.encode(texts), int8_encoder.encode(texts)
    assert b.shape == a.shape and not torch.equal(a, b)
    assert F.cosine_similarity(a, b).min() > 0.95
    with pytest.raises(ValueError, match="quantize must be 'int8' or None"):
        tiny(tiny_dir, quantize="int4")
    with pytest.raises(ValueError, match="LoRA"):
        tiny(tiny_dir, quantize="int8", lora=LoraSettings())
    with pytest.raises(ValueError, match="LoRA needs the float encoder"):
        int8_encoder.enable_lora(LoraSettings())
