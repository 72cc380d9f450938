"""Throughput of `CascadeRouter.route_batch` end to end (encoder + estimator + kernel) and of its parts.

    python benchmarks/route_batch.py [--checkpoint checkpoints/default] [--sizes 1,64,1024] [--int8]

For each batch size: a first step of new queries (embeddings computed: the encoder dominates), the bare
encoder on the same texts, a later step of the same queries with one model observed (embeddings
cached), the estimator alone and the kernel alone, in queries/s; on CPU and, when present, CUDA, and
with `--int8` also on CPU with the dynamically int8-quantized encoder. Queries come from the bundled
dataset. Prints last `route_batch_vs_encoder: <ratio>`: new-query throughput over the bare encoder's
at the largest batch (float, CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from router_train import CascadeRouter
from router_train.kernel import decide
from router_train.table import load_table
from router_train.train import bundled_dataset


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (seconds), synchronizing CUDA."""
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench(router: CascadeRouter, queries: list[str], size: int, repeats: int) -> dict[str, float]:
    """Queries/s of the parts for one batch size."""
    batch = queries[:size]
    first_model = router.models[0]
    observed = [[{"model": first_model, "answer": "A"}] for _ in batch]

    def cold() -> None:
        router._cache.clear()
        router.route_batch(batch)

    cold_s = timed(cold, repeats)
    encoder = router.estimator._encoder()
    encoder_s = timed(lambda: encoder.encode(batch), repeats)
    router.route_batch(batch)  # fill the embedding cache
    warm_s = timed(lambda: router.route_batch(batch, observed), repeats)
    table, run = router._table(batch, router.check(batch, observed), None)
    features = router.estimator.featurize(table, embeddings=router._embeddings(batch))
    rows = torch.arange(len(batch))
    estimator_s = timed(lambda: router.estimator.predict(features, rows, run), repeats)
    est = router.estimator.predict(features, rows, torch.zeros_like(run))
    strategy = router.strategy()
    args = [x.to(router.device) for x in (est.quality, est.cost, torch.zeros_like(run))]
    cov = est.cov.to(router.device)
    kernel_s = timed(lambda: decide(*args, strategy, cov=cov, config=router.kernel), repeats)
    return {name: size / s for name, s in
            (("end_to_end_new", cold_s), ("encoder", encoder_s), ("end_to_end_cached", warm_s),
             ("estimator", estimator_s), ("kernel", kernel_s))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/default", help="an export (run `make train` first)")
    p.add_argument("--sizes", default="1,64,1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--int8", action="store_true", help="also time the int8-quantized encoder on CPU")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    table = load_table(bundled_dataset())
    queries = list(dict.fromkeys(table.queries))[: max(sizes)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    variants = [("cpu", None)] + ([("cpu", "int8")] if args.int8 else []) + (
        [("cuda", None)] if torch.cuda.is_available() else [])
    ratio = None
    for device, quantize in variants:
        router = CascadeRouter.load(args.checkpoint, device=device, quantize=quantize)
        if device == "cuda":
            router.estimator._encoder().to("cuda")
            print(f"cuda: {torch.cuda.get_device_name()}")
        label = device + (f" {quantize}" if quantize else "")
        for size in sizes:
            r = bench(router, queries, size, args.repeats)
            print(f"{label:8s} batch {size:5d}: end-to-end {r['end_to_end_new']:9.1f} q/s (new queries; bare encoder "
                  f"{r['encoder']:9.1f} q/s, {r['end_to_end_new'] / r['encoder']:6.1%}), {r['end_to_end_cached']:9.1f} "
                  f"q/s (embeddings cached); estimator {r['estimator']:10.1f} q/s; kernel {r['kernel']:10.1f} q/s")
            if (device, quantize) == ("cpu", None) and size == max(sizes):
                ratio = r["end_to_end_new"] / r["encoder"]
    print(f"route_batch_vs_encoder: {ratio:.3f}")


if __name__ == "__main__":
    main()
