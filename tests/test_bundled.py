"""The bundled MMLU-Pro sample and the script that makes it: complete queries of the chosen models only,
every (source, split) group kept, the same sample for the same seed."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from factories import random_frame

from router_train import train as recipe

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_bundled", ROOT / "scripts" / "make_bundled_mmlu_pro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subsample_keeps_complete_queries_of_every_group_by_seed():
    script = _script()
    frame = random_frame(300, 5, seed=3)
    frame["source"] = [f"task{int(q[1:]) % 4}" for q in frame["query_id"]]
    frame = frame[~((frame.query_id == "q0150") & (frame.model == "model-1"))]  # q0150 lacks model-1
    frame = frame[~frame.query_id.isin(["q0007", "q0011"]) | (frame.model != "model-4")]  # these lack model-4
    frame = frame[frame.model != "model-0"]  # a model not chosen: no query is incomplete for lack of it
    models = ("model-3", "model-1", "model-4")
    sample = script.subsample(frame, models, 60, seed=0)
    assert list(sample.columns) == [c for c in script.COLUMNS if c in frame.columns]
    assert set(sample.groupby("query_id")["model"].apply(tuple)) == {models}  # each query: all, in this order
    ids = set(sample.query_id)
    assert "q0150" not in ids and not ids & {"q0007", "q0011"} and 55 <= len(ids) <= 65
    complete = frame[~frame.query_id.isin(["q0150", "q0007", "q0011"])].drop_duplicates("query_id")
    groups = sample.drop_duplicates("query_id").groupby(["source", "split"]).size()
    expected = complete.groupby(["source", "split"]).size() * len(ids) / len(complete)
    assert set(groups.index) == set(expected.index) and (abs(groups - expected) <= 1.5).all()
    pd.testing.assert_frame_equal(sample, script.subsample(frame, models, 60, seed=0))
    assert set(script.subsample(frame, models, 60, seed=1).query_id) != ids
    with pytest.raises(ValueError, match=r"models \['model-9'\] are not in the table"):
        script.subsample(frame, ("model-1", "model-9"), 60, seed=0)
    with pytest.raises(ValueError, match="n_queries=400 exceeds the 297 queries"):
        script.subsample(frame, models, 400, seed=0)


def test_the_bundled_sample_is_what_the_script_describes():
    script = _script()
    frame = pd.read_parquet(recipe.bundled_dataset("mmlu_pro_sample"))
    assert list(frame.columns) == list(script.COLUMNS)
    assert set(frame.groupby("query_id")["model"].apply(tuple)) == {script.MODELS}
    assert frame.query_id.nunique() == 1999 and frame.source.nunique() == 14
    assert frame.answer.notna().mean() > 0.95 and frame.quality.isin([0.0, 1.0]).all()
    assert recipe.bundled_dataset("mmlu_pro_sample").stat().st_size < 2_000_000
