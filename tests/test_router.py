"""Serving with `CascadeRouter`: decisions follow the kernel, budgets interpolate, bad input and broken
checkpoints fail with messages that name the field, and concurrent callers get consistent answers."""

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from estimators.learned import LearnedEstimator
from router_train import CascadeRouter
from router_train.manifest import seal


@pytest.fixture(scope="module")
def export(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def router(export):
    lo, hi = json.loads((export / "manifest.json").read_text())["budgets"][::4]
    return CascadeRouter.load(export, budget=(lo + hi) / 2)


def test_first_step_runs_a_model_and_later_steps_stop_or_continue(router):
    queries = [f"what is {i} plus {i}" for i in range(6)]
    first = router.route_batch(queries)
    assert all(d.next_model in router.models and d.answer_model is None and d.step == 0 for d in first)
    assert all(set(d.quality) == set(router.models) and all(0 < q < 1 for q in d.quality.values()) for d in first)
    observed = [[{"model": d.next_model, "answer": "B", "confidence": -0.1}] for d in first]
    second = router.route_batch(queries, observed)
    for d, seen in zip(second, observed):
        assert d.step == 1 and d.answer_model == seen[0]["model"]
        assert d.next_model is None or d.next_model not in {s["model"] for s in seen}
        assert seen[0]["model"] in d.plan


def test_decisions_are_deterministic_and_independent_of_batching(router):
    queries = [f"the cat sat on mat {i}" for i in range(10)]
    whole = router.route_batch(queries)
    parts = router.route_batch(queries[:4]) + router.route_batch(queries[4:])
    assert [d.next_model for d in whole] == [d.next_model for d in parts]
    again = CascadeRouter.load(router.path, budget=router.budget).route_batch(queries)
    assert [d.to_dict() for d in again] == [d.to_dict() for d in whole]


def test_budget_interpolates_between_calibrated_strategies(router):
    budgets = router.budgets
    exact = router.strategy(budgets[1])
    assert exact.lambdas == tuple(router.manifest["strategies"]["cascade_routing"][1]["lambdas"])
    mid = router.strategy((budgets[1] + budgets[2]) / 2)
    a, b = router.strategy(budgets[1]), router.strategy(budgets[2])
    for x, lo, hi in zip(mid.lambdas, a.lambdas, b.lambdas):
        assert min(lo, hi) - 1e-9 <= x <= max(lo, hi) + 1e-9
    with pytest.raises(ValueError, match="outside the calibrated range"):
        router.route_batch(["q"], budget=budgets[-1] * 2)
    for bad in (math.nan, 10**400, -(10**400)):
        with pytest.raises(ValueError, match="outside the calibrated range"):
            router.route_batch(["q"], budget=bad)
    for bad in ("1e-4", True, [budgets[1]]):
        with pytest.raises(ValueError, match=r"budget must be a number in the calibrated range .* got (str|bool|list)"):
            router.route_batch(["q"], budget=bad)


@pytest.mark.parametrize("mode", ["routing", "cascade", "cascade_routing"])
def test_modes(router, mode):
    first = router.route_batch(["what is one plus two"], mode=mode)[0]
    if mode == "cascade":
        assert first.next_model == router.models[0]
    observed = [[{"model": first.next_model, "answer": "A"}]]
    second = router.route_batch(["what is one plus two"], observed, mode=mode)[0]
    if mode == "routing":
        assert second.next_model is None and second.answer_model == first.next_model


@pytest.mark.parametrize(
    "queries, observed, message",
    [
        ("just one", None, "queries must be a list of strings"),
        (["ok", 3], None, r"queries\[1\] must be a string"),
        (["a", "b"], [[]], "observed must have one list per query: 2 queries, got 1"),
        (["a"], [[{"model": "gpt-9"}]], r"observed\[0\]\[0\].model 'gpt-9' is not in the checkpoint"),
        (["a"], [[{"model": "model-1"}, {"model": "model-1"}]], r"observed\[0\]: model 'model-1' is observed twice"),
        (["a", "b"], [[], [{"model": "model-0", "confidence": math.nan}]], r"observed\[1\]\[0\].confidence is nan"),
        (["a"], [[{"model": "model-0", "confidnce": -1.0}]], r"observed\[0\]\[0\] has unknown field\(s\) \['confidnce'\]"),
        (["a"], [[{"model": "model-0", "answer": 7}]], r"observed\[0\]\[0\].answer must be a string"),
        (["a"], [[{"model": "model-0", "tokens_out": -3}]], r"observed\[0\]\[0\].tokens_out must be >= 0"),
        (["a"], ["model-0"], r"observed\[0\] must be a list"),
        (["a", "b\ud800"], None, r"queries\[1\] is not valid Unicode text \(it holds a lone surrogate\)"),
        (["a"], [[{"model": "model-0", "tokens_out": 10**400}]], r"observed\[0\]\[0\].tokens_out is an integer beyond"),
        (["a"], [[{"model": "model-0", "confidence": -10**400}]], r"observed\[0\]\[0\].confidence is an integer beyond"),
        (["a"], [[{"model": ["model-0"]}]], r"observed\[0\]\[0\].model \['model-0'\] is not in the checkpoint"),
    ],
)
def test_bad_input_names_the_query_and_field(router, queries, observed, message):
    with pytest.raises(ValueError, match=message):
        router.route_batch(queries, observed)


def test_sources_must_be_strings(router):
    with pytest.raises(ValueError, match=r"sources\[1\] must be a string, got list"):
        router.route_batch(["a", "b"], sources=["task0", ["task1"]])


@pytest.mark.parametrize("mode", ["cascade", "threshold_cascade"])
def test_cascades_are_served_uncapped(router, mode):
    """The export's cascades may run all 4 models although cascade routing is capped at 3."""
    assert router.strategy(mode=mode).max_depth == len(router.models) == 4
    observed = [[{"model": m, "answer": "A", "confidence": -2.0} for m in router.models[:3]]]
    decision = router.route_batch(["what is one plus two"], observed, mode=mode)[0]
    assert decision.step == 3 and decision.next_model in (None, router.models[3])


def test_a_positive_log_probability_counts_as_zero(router):
    """A confidence above 0 (a unit error) made NaN estimates and failed the whole batch."""
    def decide(confidence):
        observed = [[], [{"model": router.models[0], "answer": "A", "confidence": confidence}]]
        return [d.to_dict() for d in router.route_batch(["what is two plus two", "the capital of france"], observed)]
    assert decide(46.0) == decide(1e10) == decide(0.0) != decide(-3.0)


def test_cascade_mode_needs_runs_in_cost_order(router):
    with pytest.raises(ValueError, match="query 0 is not a prefix"):
        router.route_batch(["x"], [[{"model": router.models[2]}]], mode="cascade")


def test_broken_checkpoints_fail_at_load(export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "estimator.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['estimator.safetensors'\]"):
        CascadeRouter.load(broken)
    shutil.rmtree(broken)
    shutil.copytree(export, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["manifest_version"] = 7
    (broken / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(ValueError, match="unknown manifest format 'router-train' version 7"):
        CascadeRouter.load(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CascadeRouter.load(tmp_path / "nowhere")
    (broken / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="manifest.json must hold a JSON object, got a list"):
        CascadeRouter.load(broken)


def copy_export(export, to):
    """A plain copy of the export's files (the run path is a symlink to its version directory)."""
    shutil.copytree(export, to)
    return to


def test_changed_files_fail_the_checksum_at_load(export, router, tmp_path):
    flipped = copy_export(export, tmp_path / "flipped")
    weights = bytearray((flipped / "estimator.safetensors").read_bytes())
    middle = len(weights) // 2
    weights[middle:middle + 4096] = bytes(b ^ 0xFF for b in weights[middle:middle + 4096])
    (flipped / "estimator.safetensors").write_bytes(weights)
    for load in (CascadeRouter.load, LearnedEstimator.load):
        with pytest.raises(ValueError, match=r"flipped/estimator.safetensors does not match its SHA-256"):
            load(flipped)

    edited = copy_export(export, tmp_path / "edited")  # the model lists edited alike in both JSON files
    for name in ("manifest.json", "estimator.json"):
        data = json.loads((edited / name).read_text())
        data["models"] = ["model-0", "model-2", "model-1"]
        (edited / name).write_text(json.dumps(seal(data) if name == "manifest.json" else data))
    with pytest.raises(ValueError, match="edited/estimator.json does not match its SHA-256"):
        CascadeRouter.load(edited)
    (edited / "manifest.json").unlink()  # without a manifest, the estimator's own lists disagree
    with pytest.raises(ValueError, match=r"estimator.json: 'models' lists .* but the network has 4 model outputs"):
        LearnedEstimator.load(edited)

    extra = copy_export(export, tmp_path / "extra")
    manifest = json.loads((extra / "manifest.json").read_text())
    manifest["files"]["../escape"] = manifest["files"]["metrics.json"]
    (extra / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(ValueError, match="names '../escape', which is not a file of the export"):
        CascadeRouter.load(extra)
    (extra / "metrics.json").unlink()
    del manifest["files"]["../escape"]
    (extra / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(FileNotFoundError, match="extra/metrics.json is missing"):
        CascadeRouter.load(extra)


def test_a_changed_value_in_the_manifest_fails_its_own_checksum(export, tmp_path):
    """A budget or λ changed in manifest.json would change decisions silently; a re-indent changes nothing."""
    original = json.loads((export / "manifest.json").read_text())
    assert original["manifest_sha256"]
    edited = copy_export(export, tmp_path / "edited")
    manifest = dict(original, budgets=[b * 1.01 for b in original["budgets"]])
    (edited / "manifest.json").write_text(json.dumps(manifest))
    for load in (CascadeRouter.load, LearnedEstimator.load):
        with pytest.raises(ValueError, match=r"edited/manifest.json does not match its own SHA-256 \(manifest_sha256\)"):
            load(edited)
    (edited / "manifest.json").write_text(json.dumps(original, indent=None, sort_keys=True))
    assert CascadeRouter.load(edited).manifest == original
    del original["manifest_sha256"]  # an export written before the seal loads unchecked
    (edited / "manifest.json").write_text(json.dumps(original))
    assert CascadeRouter.load(edited).budgets == original["budgets"]


@pytest.mark.parametrize("name, damage", [
    ("estimator.safetensors", lambda data: data[: len(data) // 2]),
    ("estimator.safetensors", lambda data: b"\xff" * 16 + data[16:]),
    ("estimator.json", lambda data: data[: len(data) // 2]),
])
def test_corrupt_estimator_files_are_named(export, tmp_path, name, damage):
    broken = copy_export(export, tmp_path / "broken")
    (broken / name).write_bytes(damage((broken / name).read_bytes()))
    with pytest.raises(ValueError, match=f"broken/{name} does not match its SHA-256"):
        CascadeRouter.load(broken)
    (broken / "manifest.json").unlink()
    kind = "a readable safetensors file" if name.endswith("safetensors") else "valid JSON"
    with pytest.raises(ValueError, match=f"broken/{name} is not {kind} .*corrupt or truncated"):
        LearnedEstimator.load(broken)


def test_concurrent_callers_get_the_same_decisions(router):
    queries = [f"question {i} about the river" for i in range(40)]
    expected = [d.next_model for d in router.route_batch(queries)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: router.route_batch([q])[0].next_model, queries))
    assert got == expected


def test_embedding_cache_is_bounded_and_reused(export):
    small = CascadeRouter.load(export, cache_size=3)
    calls = []
    encoder = small.estimator._encoder()
    original = encoder.encode
    encoder.encode = lambda texts: calls.append(list(texts)) or original(texts)
    small.route_batch(["a cat", "a dog", "a cat"])
    small.route_batch(["a cat", "a bird", "the sun", "the moon"])
    assert calls == [["a cat", "a dog"], ["a bird", "the sun", "the moon"]]
    assert len(small._cache) == 3
    assert torch.is_tensor(next(iter(small._cache.values())))


def test_an_int8_encoder_routes_like_the_float_one(export, router):
    """`quantize="int8"` (CPU only): the same kind of decisions from slightly different embeddings."""
    quantized = CascadeRouter.load(export, budget=router.budget, quantize="int8")
    queries = [f"what is {i} plus {i}" for i in range(40)]
    a, b = router.route_batch(queries), quantized.route_batch(queries)
    assert sum(d.next_model == e.next_model for d, e in zip(a, b)) >= 30
    with pytest.raises(ValueError, match="for CPU inference"):
        CascadeRouter.load(export, device="cuda", quantize="int8")
