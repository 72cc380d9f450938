"""The backends file: the example lists the default checkpoint's models, defaults fill in, and every
mistake (model names unlike the checkpoint's, a bad URL or price, a missing API key) fails at load with
the field named."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from router_train.backends import load_backends

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "backends.example.yaml"


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def one_model(**settings) -> dict:
    return {"models": {"m": {"base_url": "http://127.0.0.1:9/v1", "price_in": 1.0, "price_out": 2.0, **settings}}}


def test_example_lists_the_default_checkpoints_models():
    bundled = sorted(pd.read_parquet(ROOT / "router_train" / "data" / "llmrouter.parquet").model.unique())
    backends = load_backends(EXAMPLE, models=bundled)
    assert sorted(backends.names) == bundled
    gemma = backends.models["gemma-2-9b-it"]
    assert gemma.base_url == "http://127.0.0.1:8001/v1" and gemma.model == "google/gemma-2-9b-it"
    assert gemma.api_key() == "EMPTY" and gemma.concurrency == 64 and gemma.timeout == 60.0
    assert len({b.base_url for b in backends.models.values()}) == 9


def test_example_prices_reproduce_the_tables_costs():
    """The table's cost is price × (input tokens + 256 output tokens): the example's prices give it back."""
    table = pd.read_parquet(ROOT / "router_train" / "data" / "llmrouter.parquet")
    backends = load_backends(EXAMPLE)
    for model, rows in table.groupby("model"):
        b = backends.models[model]
        priced = [b.cost(int(t), 256) for t in rows.tokens_in]
        assert priced == pytest.approx(rows.cost.tolist(), rel=1e-9), model


def test_defaults_and_own_values(tmp_path):
    doc = one_model(timeout=5, model="served-id")
    doc["defaults"] = {"concurrency": 3, "timeout": 7, "max_tokens": 9}
    b = load_backends(write(tmp_path, doc)).models["m"]
    assert (b.timeout, b.concurrency, b.max_tokens, b.model, b.temperature) == (5.0, 3, 9, "served-id", 0.0)
    assert b.cost(1_000_000, 500_000) == pytest.approx(2.0)


def test_checkpoint_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"missing \['model-0'\], not in the checkpoint \['codegemma-7b'.*name each"):
        load_backends(EXAMPLE, models=["gemma-2-9b-it", "model-0"])


def test_checkpoint_manifest_models_must_match(tiny_export, tmp_path):
    models = json.loads((tiny_export / "manifest.json").read_text())["models"]
    doc = {"models": {m: {"base_url": "http://127.0.0.1:9/v1", "price_in": 1, "price_out": 1} for m in models[:3]}}
    doc["models"]["extra-model"] = doc["models"][models[0]]
    with pytest.raises(ValueError, match=r"missing \['model-3'\], not in the checkpoint \['extra-model'\]"):
        load_backends(write(tmp_path, doc), models=models)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"base_url": "127.0.0.1:8001"}, r"models\.m\.base_url must be an http\(s\) URL"),
        ({"price_in": -1.0}, r"models\.m\.price_in must be a price >= 0"),
        ({"price_out": None}, r"models\.m\.price_out must be a price"),
        ({"timeout": 0}, r"models\.m\.timeout must be a positive number"),
        ({"concurrency": 0}, r"models\.m\.concurrency must be an integer >= 1"),
        ({"concurrency": 1.5}, r"models\.m\.concurrency must be int"),
        ({"api_key_env": "ROUTER_TRAIN_TEST_NO_SUCH_KEY"}, r"ROUTER_TRAIN_TEST_NO_SUCH_KEY is not set"),
        ({"colour": "red"}, r"models\.m: unknown key\(s\) \['colour'\]"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        load_backends(write(tmp_path, one_model(**settings)))


def test_bad_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="backends.example.yaml"):
        load_backends(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="extractor must be one of"):
        load_backends(write(tmp_path, {**one_model(), "extractor": "regex"}))
    with pytest.raises(ValueError, match="'models' must map"):
        load_backends(write(tmp_path, {"models": ["m"]}))
    (tmp_path / "bad.yaml").write_text("models: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_backends(tmp_path / "bad.yaml")
    monkeypatch.setenv("ROUTER_TRAIN_TEST_KEY", "sk-test")
    assert load_backends(write(tmp_path, one_model(api_key_env="ROUTER_TRAIN_TEST_KEY"))).models["m"].api_key() == "sk-test"
