"""Tests of `router_train.table`: reading each file format, validation messages, splits and table views."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from router_train.table import NO_FINITE_CONFIDENCE, RoutingTable, check_cost_spread, load_table, load_train_test

MODELS = ("small", "medium", "large")
PRICES = {"small": 0.001, "medium": 0.01, "large": 0.1}


def long_table(n: int = 6, *, split: bool = True, seed: int = 0) -> pd.DataFrame:
    """A complete long-format table of n queries × the three models, with every optional column."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n):
        for j, model in enumerate(MODELS):
            rows.append(
                {
                    "query_id": f"q{q}",
                    "query": f"question {q}?",
                    "model": model,
                    "quality": float(rng.integers(0, 2)),
                    "cost": PRICES[model] * (1 + q / 10),
                    "source": "math" if q % 2 else "trivia",
                    "split": "test" if q % 3 == 2 else "train",
                    "answer": None if (q + j) % 4 == 0 else "ABCD"[(q + j) % 4],
                    "confidence": math.nan if (q + j) % 5 == 0 else -0.1 * (q + j + 1),
                    "tokens_in": 100.0 + q,
                    "tokens_out": math.nan if q == 1 else 10.0 * (j + 1),
                    "latency_ms": 50.0 * (j + 1),
                }
            )
    df = pd.DataFrame(rows)
    return df if split else df.drop(columns="split")


def write(df: pd.DataFrame, path: Path) -> Path:
    """Write `df` in the format named by the extension of `path`."""
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        # The json module writes floats exactly (pandas' to_json rounds to 15 digits); NaN becomes null.
        records = df.astype(object).where(df.notna(), None).to_dict("records")
        lines = [json.dumps(r) for r in records]
        path.write_text("\n".join(lines) if path.suffix == ".jsonl" else "[" + ",\n".join(lines) + "]")
    return path


def load(tmp_path: Path, df: pd.DataFrame, ext: str = "parquet", **kwargs) -> RoutingTable:
    """Write `df` under tmp_path and load it."""
    return load_table(write(df, tmp_path / f"table.{ext}"), **kwargs)


def assert_same(a: RoutingTable, b: RoutingTable) -> None:
    """Two tables hold the same names, texts, answers and tensors (NaN equal to NaN)."""
    assert (a.models, a.query_ids, a.queries, a.sources, a.answers) == (
        b.models,
        b.query_ids,
        b.queries,
        b.sources,
        b.answers,
    )
    assert torch.equal(a.is_test, b.is_test)
    for name in ("quality", "cost", "confidence", "tokens_in", "tokens_out"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype == torch.float64, name
            torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("ext", ["csv", "jsonl", "json"])
def test_every_format_loads_to_the_same_table(tmp_path: Path, ext: str) -> None:
    df = long_table()
    reference = load(tmp_path, df, "parquet")
    assert_same(load(tmp_path, df, ext), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"table.parquet", f"table.{ext}"})  # no cache files


@pytest.mark.parametrize("sep, ext", [(";", "csv"), ("\t", "tsv"), ("|", "csv")])
def test_other_delimiters_are_sniffed(tmp_path: Path, sep: str, ext: str) -> None:
    df = long_table()
    df["query"] = [f"question {q}, with a comma, or two?" for q in range(len(df))]  # commas inside fields
    path = tmp_path / f"table.{ext}"
    df.to_csv(path, sep=sep, index=False)
    assert_same(load_table(path), load(tmp_path, df, "csv"))


def test_unreadable_files_are_reported_in_one_line(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("query_id;query;model;quality;cost\nq0;hi;small;1;0.1\nq1;a;b;small;1;0.1\n")
    not_parquet = tmp_path / "table.parquet"
    not_parquet.write_text("not a parquet file")
    truncated = tmp_path / "table.jsonl"
    truncated.write_text('{"query_id": "q0", "query": "x"}\n{"query_id": [\n')
    for path, match in [
        (ragged, r"ragged.csv: cannot read it as a csv table \(delimiter ';'.*Expected 5 fields in line 3, saw 6"),
        (not_parquet, r"table.parquet: cannot read it as a parquet table: "),
        (truncated, r"table.jsonl: cannot read it as a json table: "),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            load_table(path)
        assert "\n" not in str(info.value)


def test_json_arrays_keep_infinities(tmp_path: Path) -> None:
    """A JSON array as Python's json module writes it (Infinity, NaN): read as written, not as null."""
    df = long_table()
    df.loc[0, "confidence"] = math.inf
    with pytest.raises(ValueError, match=r"column 'confidence': 1 value\(s\) are \+inf, e.g. at row 0"):
        load(tmp_path, df, "json")
    df.loc[0, "confidence"] = -math.inf  # an underflowed log-probability: the model's lowest, not unknown
    table = load(tmp_path, df, "json")
    assert table.confidence[table.query_ids.index("q0"), table.model_index("small")] == -0.5
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep.json: cannot read it as a json table: maximum recursion depth"):
        load_table(deep)


def test_json_rows_must_be_objects(tmp_path: Path) -> None:
    """A `null` row crashed the process in pyarrow's reader; other non-objects are named too."""
    row = json.dumps(long_table().astype(object).iloc[0].to_dict())
    for name, text, match in [
        ("nulls.jsonl", "null\n" + row, r"row 0 is null, not an object of column values"),
        ("nulls.json", f"[{row}, null]", r"row 1 is null, not an object of column values"),
        ("number.jsonl", row + "\n\n5\n", r"row 1 is 5, not an object"),
        ("broken.jsonl", row + "\n{\"query_id\": \n", r"line 2: Expecting value: line 1 column 14"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: cannot read it as a json table: {match}"):
            load_table(tmp_path / name)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef")  # a third of a byte-order mark
    with pytest.raises(ValueError, match=r"bom.jsonl: cannot read it as a json table: 'utf-8' codec can't decode"):
        load_table(tmp_path / "bom.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (row + "\n").encode())
    assert load_table(tmp_path / "bom.jsonl").query_ids == ["q0"]  # a whole one is skipped


def test_empty_model_names_are_rejected(tmp_path: Path) -> None:
    df = long_table()
    df.loc[4, "model"] = " "
    with pytest.raises(ValueError, match=r"column 'model': 1 empty model name\(s\), e.g. at row 4 \(query_id 'q1'"):
        load(tmp_path, df)


def test_cost_outliers_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = long_table()
    load(tmp_path, df)
    assert "warning" not in capsys.readouterr().err
    df.loc[(df.query_id == "q3") & (df.model == "small"), "cost"] = 1e6  # a unit error in a log
    table = load(tmp_path, df)
    err = capsys.readouterr().err
    assert "warning:" in err and "model 'small': 1 cell(s), largest 1e+06 at query_id 'q3'" in err
    assert "medium" not in err
    assert table.cost[table.query_ids.index("q3"), table.model_index("small")] == 1e6  # warned, not changed


def test_train_and_test_tables_must_have_the_same_models(tmp_path: Path) -> None:
    df = long_table(split=False)
    train = write(df, tmp_path / "train.parquet")
    lacking = write(df[df.model != "large"], tmp_path / "lacking.csv")
    extra = df[df.model == "large"].assign(model="huge")
    adding = write(pd.concat([df, extra]), tmp_path / "adding.csv")
    with pytest.raises(ValueError, match=r"test table .*lacking.csv lacks model\(s\) \['large'\] of the training"):
        load_train_test(train, lacking)
    with pytest.raises(ValueError, match=r"test table .*adding.csv adds model\(s\) \['huge'\] that the training table"):
        load_train_test(train, adding)
    with pytest.raises(ValueError, match=r"models \(of .*lacking.csv\): unknown model\(s\) \['large'\]"):
        load_train_test(train, lacking, models=["small", "large"])
    fit, test = load_train_test(train, adding, models=["large", "small"])
    assert fit.models == test.models == ["small", "large"] and not fit.is_test.any() and test.is_test.all()


def test_a_separate_test_table_names_the_sources_training_lacks(tmp_path: Path, capsys) -> None:
    """Test queries of a source absent from training are served by pooled fits: the loader says so."""
    df = long_table(9)
    train = write(df, tmp_path / "train.csv")
    shifted = df.assign(source=np.where(df.query_id.isin(["q0", "q3"]), "law", df.source))
    shifted.loc[shifted.query_id == "q4", "source"] = None  # no source: nothing to name
    load_train_test(train, write(df, tmp_path / "same.csv"))
    assert "note:" not in capsys.readouterr().err
    load_train_test(train, write(shifted, tmp_path / "shifted.csv"))
    err = capsys.readouterr().err
    assert re.search(r"note: 2 of 9 queries of the test table .*shifted.csv come from source\(s\) \['law'\] absent "
                     r"from the training table .*train.csv", err), err


def test_routing_needs_two_models_of_different_cost(tmp_path: Path) -> None:
    table = load(tmp_path, long_table())
    check_cost_spread(table, "t")
    with pytest.raises(ValueError, match=r"t: routing needs at least two models of different mean cost, got 1"):
        check_cost_spread(table.select_models(["medium"]), "t")
    same = long_table().assign(cost=0.01)
    with pytest.raises(ValueError, match=r"got 3 model\(s\) .* all at mean cost 0.01"):
        check_cost_spread(load(tmp_path, same), "t")


def test_dense_layout(tmp_path: Path) -> None:
    df = long_table()
    table = load(tmp_path, df)
    assert (table.n, table.k) == (6, 3)
    assert table.models == ["small", "medium", "large"]
    assert table.query_ids == [f"q{q}" for q in range(6)]
    assert table.sources[:2] == ["trivia", "math"]
    assert table.is_test.tolist() == [q % 3 == 2 for q in range(6)]
    for row in df.itertuples():
        i, j = table.query_ids.index(row.query_id), table.model_index(row.model)
        assert table.quality[i, j].item() == row.quality
        assert table.cost[i, j].item() == row.cost
        assert table.answers[i][j] == (row.answer if isinstance(row.answer, str) else None)
        assert torch.equal(table.confidence[i, j], torch.tensor(row.confidence, dtype=torch.float64)) or (
            math.isnan(row.confidence) and table.confidence[i, j].isnan()
        )
    assert table.tokens_out[1].isnan().all() and not table.tokens_in.isnan().any()


def test_numeric_ids_become_strings(tmp_path: Path) -> None:
    df = long_table(2).assign(query_id=lambda d: d["query_id"].str[1:].astype(int))
    assert load(tmp_path, df, "jsonl").query_ids == ["0", "1"]
    csv = long_table(2).assign(query_id=lambda d: d["query_id"].str.replace("q", "00"))
    assert load(tmp_path, csv, "csv").query_ids == ["000", "001"]


def test_models_ordered_by_mean_train_cost_then_name(tmp_path: Path) -> None:
    df = long_table(3)
    train = df["split"] == "train"
    # On train rows: zeta and alpha tie (0.5), beta costs 1; the test rows would reverse that order.
    df["model"] = df["model"].map({"small": "zeta", "medium": "alpha", "large": "beta"})
    df["cost"] = np.where(train, df["model"].map({"zeta": 0.5, "alpha": 0.5, "beta": 1.0}), 0.0)
    df.loc[~train & (df["model"] != "beta"), "cost"] = 9.0
    assert load(tmp_path, df).models == ["alpha", "zeta", "beta"]
    # Without train rows the order comes from all rows: beta (1/3 on average) first.
    assert load(tmp_path, df, all_split="test").models == ["beta", "alpha", "zeta"]


def test_models_argument_keeps_and_orders(tmp_path: Path) -> None:
    table = load(tmp_path, long_table(), models=["large", "small"])
    assert table.models == ["small", "large"]
    assert table.quality.shape == (6, 2)
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['huge'\].*available models: \['large', 'medium', 'sm"):
        load(tmp_path, long_table(), models=["small", "huge"])


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("quality", math.nan, r"column 'quality'.*NaN or outside \[0, 1\].*row 4 \(query_id 'q1', model 'medium'\)"),
        ("quality", 1.5, r"column 'quality'.*1\.5 at row 4 .*rescale"),
        ("cost", math.nan, r"column 'cost'.*NaN, infinite or negative.*row 4"),
        ("cost", math.inf, r"column 'cost'.*inf at row 4"),
        ("cost", -0.01, r"column 'cost'.*-0\.01 at row 4.*>= 0"),
        ("split", "validation", r"column 'split'.*'validation' at row 4.*train/test.*split=\"seeded\""),
        ("tokens_in", math.inf, r"column 'tokens_in'.*infinite or negative.*row 4"),
        ("tokens_out", -3.0, r"column 'tokens_out'.*-3\.0 at row 4"),
        ("confidence", math.inf, r"column 'confidence'.*\+inf.*row 4.*fix"),
    ],
)
def test_bad_values_are_reported(tmp_path: Path, column: str, value: object, match: str) -> None:
    df = long_table()
    df.loc[4, column] = value
    with pytest.raises(ValueError, match=match):
        load(tmp_path, df)


def test_non_numeric_and_null_cells(tmp_path: Path) -> None:
    df = long_table().astype({"quality": object})
    df.loc[2, "quality"] = "good"
    with pytest.raises(ValueError, match=r"column 'quality'.*not numbers.*'good' at row 2"):
        load(tmp_path, df, "csv")
    df = long_table()
    df.loc[3, "model"] = None
    with pytest.raises(ValueError, match=r"column 'model'.*null.*row 3"):
        load(tmp_path, df)


def test_missing_column(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['cost'\].*columns present: \['query_id'"):
        load(tmp_path, long_table().drop(columns="cost"))


def test_unsupported_extension_and_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "table.txt"
    path.write_text("query_id,query\n")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.txt'.*\.parquet"):
        load_table(path)
    for ext in ("parquet", "csv", "jsonl", "json"):
        with pytest.raises(ValueError, match="table is empty"):
            load(tmp_path, long_table().iloc[:0], ext)


def test_duplicate_rows(tmp_path: Path) -> None:
    df = long_table()
    df = pd.concat([df, df.iloc[[4]]], ignore_index=True)
    with pytest.raises(ValueError, match=r"'query_id', 'model'.*1 duplicate.*row 18 .*'q1'.*'medium'.*repeats row 4"):
        load(tmp_path, df)


def test_query_split_both_ways(tmp_path: Path) -> None:
    df = long_table()
    df.loc[1, "split"] = "test"
    with pytest.raises(ValueError, match=r"column 'split'.*disagree.*query_id 'q0'"):
        load(tmp_path, df)
    assert load(tmp_path, df, split="seeded").n == 6


def test_bad_arguments(tmp_path: Path) -> None:
    path = write(long_table(), tmp_path / "table.parquet")
    for kwargs, match in [
        ({"missing": "skip"}, "missing must be"),
        ({"split": "random"}, "split must be"),
        ({"all_split": "val"}, "all_split must be"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_table(path, **kwargs)


def test_missing_cells_error_or_drop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = long_table().drop(index=[4, 10])  # q1 lacks medium, q3 lacks small
    with pytest.raises(ValueError, match=r"2 of 6 queries lack.*query q1 lacks medium.*missing=\"drop\".*--missing"):
        load(tmp_path, df)
    table = load(tmp_path, df, missing="drop")
    assert table.query_ids == ["q0", "q2", "q4", "q5"]
    assert "dropped 2 of 6 queries missing a model's row (e.g. query q1 lacks medium)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no query has a row for every model"):
        load(tmp_path, long_table(2).drop(index=[0, 4]), missing="drop")
    # Choosing models every query has avoids the drop.
    assert load(tmp_path, long_table().drop(index=[4]), models=["small", "large"]).n == 6


def test_split_column_and_all_split(tmp_path: Path) -> None:
    df = long_table()
    expected = [q % 3 == 2 for q in range(6)]
    assert load(tmp_path, df, split="column").is_test.tolist() == expected
    assert load(tmp_path, df, split="auto").is_test.tolist() == expected
    assert not load(tmp_path, df, all_split="train").is_test.any()
    assert load(tmp_path, df, all_split="test").is_test.all()
    with pytest.raises(ValueError, match=r"column 'split'.*no split column.*split=\"seeded\""):
        load(tmp_path, long_table(split=False), split="column")


def test_seeded_split_is_deterministic_and_row_order_free(tmp_path: Path) -> None:
    df = long_table(40)
    first = load(tmp_path, df, split="seeded", seed=3)
    assert int(first.is_test.sum()) == 8
    assert torch.equal(load(tmp_path, df, split="seeded", seed=3).is_test, first.is_test)
    assert not torch.equal(load(tmp_path, df, split="seeded", seed=4).is_test, first.is_test)
    shuffled = load(tmp_path, df.sample(frac=1.0, random_state=1), split="seeded", seed=3)
    assert shuffled.query_ids != first.query_ids
    by_id = dict(zip(first.query_ids, first.is_test.tolist()))
    assert dict(zip(shuffled.query_ids, shuffled.is_test.tolist())) == by_id
    assert int(load(tmp_path, df, split="seeded", test_fraction=0.5).is_test.sum()) == 20


def test_auto_split_falls_back_to_seeded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeded = load(tmp_path, long_table(20), split="seeded", seed=1).is_test
    assert torch.equal(load(tmp_path, long_table(20, split=False), seed=1).is_test, seeded)
    assert "no split column" in capsys.readouterr().err
    only_train = long_table(20).assign(split="train")
    assert torch.equal(load(tmp_path, only_train, seed=1).is_test, seeded)
    assert "only train rows" in capsys.readouterr().err
    assert not load(tmp_path, only_train, split="column").is_test.any()


def test_negative_infinite_confidence_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = long_table(3)
    small, large = df["model"] == "small", df["model"] == "large"
    df.loc[small, "confidence"] = [-1.0, -math.inf, -3.0]
    df.loc[large, "confidence"] = -math.inf
    table = load(tmp_path, df)
    assert table.confidence[:, table.model_index("small")].tolist() == [-1.0, -3.0, -3.0]
    assert table.confidence[:, table.model_index("large")].tolist() == [NO_FINITE_CONFIDENCE] * 3
    assert torch.isfinite(table.confidence).sum() + table.confidence.isnan().sum() == 9
    assert "replaced 4 -inf confidences" in capsys.readouterr().err


def test_optional_columns_absent_or_null(tmp_path: Path) -> None:
    bare = load(tmp_path, long_table().drop(columns=["source", "answer", "confidence", "tokens_in", "tokens_out"]))
    assert bare.sources == [""] * 6
    assert (bare.answers, bare.confidence, bare.tokens_in, bare.tokens_out) == (None, None, None, None)
    nulls = long_table().assign(answer=None, confidence=math.nan)
    table = load(tmp_path, nulls)
    assert table.answers is None and table.confidence is None and table.tokens_in is not None


def test_first_query_text_wins(tmp_path: Path) -> None:
    df = long_table(2)
    df.loc[1, "query"] = "a different wording"
    assert load(tmp_path, df).queries == ["question 0?", "question 1?"]


def test_subset_train_test(tmp_path: Path) -> None:
    table = load(tmp_path, long_table())
    train, test = table.train(), table.test()
    assert train.query_ids == ["q0", "q1", "q3", "q4"] and test.query_ids == ["q2", "q5"]
    assert not train.is_test.any() and test.is_test.all()
    assert torch.equal(test.quality, table.quality[[2, 5]])
    assert test.answers == [table.answers[2], table.answers[5]]
    for rows in ([5, 2], np.array([5, 2]), torch.tensor([5, 2])):
        picked = table.subset(rows)
        assert picked.query_ids == ["q5", "q2"] and picked.models == table.models
        assert torch.equal(picked.tokens_in, table.tokens_in[[5, 2]])
    mask = [True, False, False, False, False, True]
    assert table.subset(mask).query_ids == table.subset(np.array(mask)).query_ids == ["q0", "q5"]
    assert table.subset([]).n == 0
    with pytest.raises(ValueError, match="boolean mask"):
        table.subset([True, False])


def test_select_models_and_model_index(tmp_path: Path) -> None:
    table = load(tmp_path, long_table())
    chosen = table.select_models(["large", "small"])
    assert chosen.models == ["small", "large"]
    assert torch.equal(chosen.cost, table.cost[:, [0, 2]])
    assert [row[1] for row in chosen.answers] == [row[2] for row in table.answers]
    assert chosen.query_ids == table.query_ids
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['tiny'\].*available models: \['small', 'medium', 'la"):
        table.select_models(["tiny"])
    with pytest.raises(ValueError, match=r"unknown model 'tiny'.*available models"):
        table.model_index("tiny")
    assert table.model_index("large") == 2


def test_in_model_order_aligns_a_test_table_to_training_order(tmp_path):
    table = load(tmp_path, long_table())
    order = list(reversed(table.models))
    aligned = table.in_model_order(order)
    assert aligned.models == order
    assert torch.equal(aligned.cost[:, 0], table.cost[:, -1])
    with pytest.raises(ValueError, match="nope"):
        table.in_model_order(["nope"])
