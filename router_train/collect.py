"""Build a routing table from your own endpoints: every model of a backends file on every query, graded
against the query's reference answer.

    python -m router_train.collect --backends B.yaml --queries Q.jsonl --grader choice --out TABLE.parquet

Query rows (JSONL or Parquet): `query_id`, `query`, `reference` (the correct answer), optional `source`.
Each query is sent as one user message; calls run concurrently, at most each backend's `concurrency` at
a time, and are retried with exponential backoff on 429, 5xx and connection errors. The features come
from `router_train.live` (the gateway's code): `answer` by the backends file's extractor, `confidence`,
tokens, cost, latency. Graders: `choice` (the response's multiple-choice letter equals the reference's),
`number` (its last number equals the reference's, to 1e-6 relative), `exact` (the extracted answer equals
the reference after lower-casing, collapsing whitespace and stripping surrounding punctuation),
`contains` (the normalized reference occurs in the normalized response).

Every finished call is appended at once to `TABLE.parquet.partial.jsonl`; an interrupted run (Ctrl-C, a
crash, calls that kept failing) resumes from it when run again with the same queries and backends,
repeating no finished call. When every call is done, the long-format routing table (`router_train.table`)
is written atomically and the partial file removed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .backends import Backends, load_backends
from .cli import add_debug_flag, user_errors
from .live import BackendError, Pool, extract
from .outputs import atomic_write_bytes

GRADERS = ("choice", "number", "exact", "contains")
FORMAT = "router-train-collect"


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".,;:!?\"'()[]{} ")


def _number(text: str) -> float | None:
    found = extract(text, "number")
    return None if found is None else float(found[0])


def grade(grader: str, text: str, answer: str | None, reference: str) -> float:
    """Quality 1.0 or 0.0 of a response `text` (whose extracted answer is `answer`) against `reference`."""
    if grader == "choice":
        ours, theirs = extract(text, "choice"), extract(reference, "choice")
        return float(ours is not None and theirs is not None and ours[0] == theirs[0])
    if grader == "number":
        ours, theirs = _number(text), _number(reference)
        return float(ours is not None and theirs is not None and math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9))
    if grader == "exact":
        return float(answer is not None and _normalize(answer) == _normalize(reference))
    if grader == "contains":
        return float(_normalize(reference) in _normalize(text))
    raise ValueError(f"grader must be one of {list(GRADERS)}, got {grader!r}")


def read_queries(path: str | os.PathLike, grader: str) -> pd.DataFrame:
    """Query rows with string `query_id`, `query`, `reference` (and `source` when present), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"queries file {path} not found")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        try:
            frame = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: {e}") from None
    else:
        raise ValueError(f"{path}: queries must be .jsonl, .json or .parquet, got {path.suffix!r}")
    missing = [c for c in ("query_id", "query", "reference") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; each row needs query_id, query, reference "
                         f"(and optionally source); columns present: {list(frame.columns)}")
    columns = ["query_id", "query", "reference"] + (["source"] if "source" in frame.columns else [])
    frame = frame[columns].reset_index(drop=True)
    for column in columns:
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"{path}: row {int(empty.idxmax())} has no {column}; fill it in or drop the row")
        frame[column] = frame[column].astype(str)
    duplicated = frame.query_id.duplicated()
    if duplicated.any():
        raise ValueError(f"{path}: query_id {frame.query_id[duplicated.idxmax()]!r} appears more than once")
    if grader in ("choice", "number"):
        kind = "a letter A-J" if grader == "choice" else "a number"
        for i, reference in enumerate(frame.reference):
            if extract(reference, grader) is None:
                raise ValueError(f"{path}: row {i} reference {reference!r} holds no {kind}, as --grader {grader} needs")
    return frame


def fingerprint(queries: pd.DataFrame, backends: Backends) -> str:
    """What a finished call depends on: the queries' texts, each model's endpoint, id, sampling and prices,
    and the extractor. A partial output made with other values cannot be resumed."""
    calls = {name: {k: v for k, v in asdict(b).items() if k not in ("timeout", "concurrency", "api_key_env")}
             for name, b in backends.models.items()}
    data = {"queries": queries[["query_id", "query"]].values.tolist(), "calls": calls, "extractor": backends.extractor}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def read_partial(path: Path, print_=print) -> tuple[str | None, list[dict]]:
    """The fingerprint and finished calls of a partial output; an incomplete last line (a write cut short)
    is dropped from the file."""
    if not path.exists():
        return None, []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print_(f"{path}: dropping an incomplete last line (the previous run stopped while writing it)")
        with open(path, "r+b") as f:
            f.truncate(end)
    lines = data[:end].decode("utf-8").splitlines()
    if not lines:
        return None, []
    try:
        header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged ({e}); delete it to collect from scratch") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a partial output of router_train.collect; move it away")
    return header.get("fingerprint"), rows


async def _collect(queries: pd.DataFrame, backends: Backends, todo: list[tuple[int, str]], partial,
                   retries: int, backoff: float, progress) -> list[str]:
    """Run the calls in `todo` (query row, model); append each finished one to `partial`; returns the
    errors of the calls that failed after their retries."""
    pool = Pool(backends, retries=retries, backoff=backoff)
    queues: dict[str, asyncio.Queue] = {name: asyncio.Queue() for name in backends.names}
    for item in todo:
        queues[item[1]].put_nowait(item)
    errors: list[str] = []

    async def worker(model: str) -> None:
        queue = queues[model]
        while not queue.empty():
            row, _ = queue.get_nowait()
            query_id, query = queries.query_id[row], queries["query"][row]
            try:
                result = await pool.call(model, [{"role": "user", "content": query}])
                if result.cost is None:
                    raise BackendError(model, "the response has no token usage, so the call cannot be priced")
            except BackendError as e:
                errors.append(f"query {query_id}: {e}")
                continue
            record = {"query_id": query_id, "model": model, "text": result.text, **result.features()}
            partial.write(json.dumps(record) + "\n")
            partial.flush()
            progress.update(1)

    try:
        await asyncio.gather(*(worker(name) for name, b in backends.models.items() for _ in range(b.concurrency)))
    finally:
        await pool.close()
    return errors


def table(queries: pd.DataFrame, rows: list[dict], grader: str, models: list[str]) -> pd.DataFrame:
    """The long-format routing table of the finished calls, graded, in query then backends-file order."""
    calls = pd.DataFrame(rows).drop_duplicates(["query_id", "model"], keep="first")
    frame = queries.merge(calls, on="query_id", how="inner", validate="one_to_many")
    frame["quality"] = [grade(grader, t, a, r) for t, a, r in zip(frame.text, frame.answer, frame.reference)]
    frame["query_order"] = frame.query_id.map({q: i for i, q in enumerate(queries.query_id)})
    frame["model_order"] = frame.model.map({m: j for j, m in enumerate(models)})
    frame = frame.sort_values(["query_order", "model_order"])
    columns = ["query_id", "query", "model", "quality", "cost", *(["source"] if "source" in frame else []),
               "answer", "confidence", "tokens_in", "tokens_out", "latency_ms"]
    return frame[columns].reset_index(drop=True)


def collect(backends_path: str, queries_path: str, grader: str, out: str, *, retries: int = 5,
            backoff: float = 0.5, print_=print) -> pd.DataFrame | None:
    """Collect (or finish collecting) a routing table; returns it, or None when calls failed (rerun to retry
    them: finished calls are kept). A failed call is retried up to `retries` times, after `backoff` · 2^attempt
    seconds (times 1 to 2, at random) or what the backend's Retry-After asks."""
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {list(GRADERS)}, got {grader!r}")
    out_path = Path(out)
    if out_path.suffix != ".parquet":
        raise ValueError(f"--out must be a .parquet file, got {out}")
    backends = load_backends(backends_path)
    queries = read_queries(queries_path, grader)
    partial_path = out_path.with_name(out_path.name + ".partial.jsonl")
    stamp = fingerprint(queries, backends)
    found, rows = read_partial(partial_path, print_)
    if found is not None and found != stamp:
        raise ValueError(f"{partial_path} was collected with other queries, backends or extractor; restore them to "
                         "resume, or delete it to collect from scratch")
    done = {(r["query_id"], r["model"]) for r in rows}
    todo = [(i, m) for i in range(len(queries)) for m in backends.names if (queries.query_id[i], m) not in done]
    total = len(queries) * len(backends.names)
    if done:
        print_(f"resuming from {partial_path}: {total - len(todo)} of {total} calls already done")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial_path, "a", encoding="utf-8") as partial:
        if found is None:
            partial.write(json.dumps({"format": FORMAT, "fingerprint": stamp}) + "\n")
            partial.flush()
        with tqdm(total=total, initial=total - len(todo), unit="call", desc="collect", file=sys.stderr) as progress:
            errors = asyncio.run(_collect(queries, backends, todo, partial, retries, backoff, progress))
        os.fsync(partial.fileno())
    if errors:
        print_(f"{len(errors)} of {len(todo)} calls failed after {retries} retries, e.g. {errors[0]}; the "
               f"{total - len(errors)} finished calls are kept in {partial_path}: run the same command to retry")
        return None
    _, rows = read_partial(partial_path, print_)
    frame = table(queries, rows, grader, backends.names)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(out_path, buffer.getvalue())
    partial_path.unlink()
    print_(f"wrote {out_path}: {len(queries)} queries × {len(backends.names)} models, mean quality per model: "
           + ", ".join(f"{m} {q:.3f}" for m, q in frame.groupby("model", sort=False).quality.mean().items()))
    return frame


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router_train.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", required=True, help="backends file (configs/backends.example.yaml)")
    p.add_argument("--queries", required=True, help="JSONL or Parquet rows: query_id, query, reference[, source]")
    p.add_argument("--grader", required=True, choices=GRADERS, help="how a response is graded against the reference")
    p.add_argument("--out", required=True, help="the routing table to write (.parquet)")
    p.add_argument("--retries", type=int, default=5, help="retries per call on 429 / 5xx / connection errors")
    p.add_argument("--backoff", type=float, default=0.5, help="seconds before the first retry, doubling after each")
    add_debug_flag(p)
    args = p.parse_args(argv)
    with user_errors(args.debug):
        try:
            frame = collect(args.backends, args.queries, args.grader, args.out, retries=args.retries,
                        backoff=args.backoff)
        except KeyboardInterrupt:
            print(f"interrupted: the finished calls are kept in {args.out}.partial.jsonl; run the same command "
                  "to resume", file=sys.stderr)
            return 130
    return 0 if frame is not None else 1


if __name__ == "__main__":
    sys.exit(main())
