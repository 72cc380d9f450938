"""The fused CPU kernel: expected max, cost and choice of every candidate in one C pass per query.

The torch backends materialize a `(queries, candidates, samples)` tensor and then reduce it; at k = 11,
depth 5 and 100 samples that is 100k values per query, so their time goes to memory traffic and to the
dozen torch operations between. Here one small C function (`fused_body.h`) walks each query's
candidates depth first, keeping one running-max vector per subset size (a few KiB, in L1), and returns
the chosen supermodel directly. Same candidates, recurrences and tie rule as `build_candidates` +
`choose` with the `levels` backend, so the decisions are those of the torch path up to float rounding
of the sample means (the same rounding the `zeta` and `levels` backends differ by).

The C source is compiled once per machine with the system C compiler (`$CC`, else `cc`) into a cache
folder (`$ROUTER_TRAIN_CACHE`, else `~/.cache/router-train`) and loaded with ctypes; ctypes releases
the GIL, so rows are split over `torch.get_num_threads()` threads. Where no compiler works, `available()`
is False and the kernel's `auto` method keeps the torch backends (CPU and CUDA alike).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .subsets import SubsetTable, run_masks

_HERE = Path(__file__).resolve().parent
_SOURCES = (_HERE / "fused.c", _HERE / "fused_body.h")
_FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
"""`-ffp-contract=off`: no fused multiply-adds, so `E - λ cost` rounds as in torch's float64 arithmetic."""
_TUNING = (("-march=native", "-mprefer-vector-width=256"), ("-march=native",), ())
"""Tried in turn until one compiles: this CPU's instructions (256-bit vectors were the fastest on a
2-core AVX-512 VM, 16 against 25 µs per decision); the last, plain `-O3`, builds anywhere."""
MIN_ROWS_PER_THREAD = 64
"""Fewer rows than this per thread are not worth a thread."""
MIN_LOOKUPS_PER_THREAD = 1 << 15
"""A λ table lookup is a few memory reads per row: fewer rows than this per thread are not worth a thread."""
_FUNCTIONS = {torch.float32: "rt_decide_f32", torch.float64: "rt_decide_f64"}
_VALUES = {torch.float32: "rt_values_f32", torch.float64: "rt_values_f64"}


def _cache_dir() -> Path:
    return Path(os.environ.get("ROUTER_TRAIN_CACHE") or Path.home() / ".cache" / "router-train") / "kernels"


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("flags", "model name"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(compiler: str, target: Path) -> None:
    """Compile the sources into `target` atomically (a temporary file renamed into place), with the first
    of `_TUNING` the compiler accepts; the last error if none does."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".so")
    os.close(fd)
    try:
        for i, tuning in enumerate(_TUNING):
            try:
                subprocess.run([compiler, *_FLAGS, *tuning, "-I", str(_HERE), "-o", tmp, str(_SOURCES[0])],
                               check=True, capture_output=True, text=True, timeout=120)
                break
            except subprocess.CalledProcessError:
                if i == len(_TUNING) - 1:
                    raise
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel (compiled on first use, then cached on disk); None, with one warning, where no C
    compiler works (the torch backends are used instead)."""
    compiler = os.environ.get("CC") or "cc"
    digest = hashlib.sha256()
    for part in (*(p.read_bytes() for p in _SOURCES), repr((_FLAGS, _TUNING)).encode(), compiler.encode(),
                 _cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    target = _cache_dir() / f"fused-{digest.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            if shutil.which(compiler) is None:
                raise OSError(f"no C compiler {compiler!r} on PATH")
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"the fused decision kernel is unavailable ({detail}); using the torch backends "
                      "(set CC to a working C compiler to enable it)", RuntimeWarning, stacklevel=2)
        return None
    i64, ptr, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    common = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr]
    for names, extra in ((_FUNCTIONS, [ptr, ctypes.c_int, ptr, ptr, dbl, dbl, ptr, ptr]), (_VALUES, [ptr, ptr])):
        for name in names.values():
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = common + extra
    lib.rt_lambda_table.restype = ctypes.c_int
    lib.rt_lambda_table.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, dbl, dbl, dbl, ptr, ptr, ptr, ptr]
    lib.rt_lookup.restype = ctypes.c_int
    lib.rt_lookup.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, dbl, ptr, ptr, ptr]
    return lib


def available() -> bool:
    """Whether the fused kernel can run here."""
    return library() is not None


def applies(method: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a `KernelConfig.method` takes the fused kernel for tensors of `dtype` on `device`: `fused`
    always (a clear error where it cannot run), `auto` on CPU for float32/64 where it compiled."""
    if method == "fused":
        if device.type != "cpu":
            raise ValueError(f"KernelConfig.method 'fused' runs on CPU only, the inputs are on {device}; use 'auto'")
        if dtype not in _FUNCTIONS:
            raise ValueError(f"KernelConfig.method 'fused' takes float32 or float64, got {dtype}; use 'auto'")
        if not available():
            raise ValueError("KernelConfig.method 'fused' needs a working C compiler (set CC); use 'auto' to fall back")
        return True
    return method == "auto" and device.type == "cpu" and dtype in _FUNCTIONS and available()


def _library() -> ctypes.CDLL:
    """The compiled kernel, or a RuntimeError where it is unavailable (callers check `applies` first)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the fused kernel is unavailable (no working C compiler): use method 'levels' or 'zeta'")
    return lib


@functools.lru_cache(maxsize=128)
def walk(table: SubsetTable) -> dict[str, torch.Tensor]:
    """The table's arrays as the C code reads them: a depth-first order of the subsets (each right after
    its parent's subtree starts, so one running max per size suffices), sizes, parents, added elements and
    membership bitmasks."""
    children: list[list[int]] = [[] for _ in range(table.count)]
    for j in range(1, table.count):
        children[int(table.parent[j])].append(j)
    order, stack = [], [0]
    while stack:
        j = stack.pop()
        order.append(j)
        stack.extend(reversed(children[j]))
    return {
        "order": torch.tensor(order, dtype=torch.long),
        "size": table.size.contiguous(),
        "parent": table.parent.contiguous(),
        "added": table.added.contiguous(),
        "rel": run_masks(table.bits).contiguous(),
    }


def _in_threads(rows: int, part, min_rows: int = MIN_ROWS_PER_THREAD) -> None:
    """`part((begin, end))` over `rows` rows split into `torch.get_num_threads()` ranges of at least `min_rows`,
    in threads (ctypes releases the GIL); a MemoryError if a part could not allocate its scratch memory."""
    threads = max(1, min(torch.get_num_threads(), rows // min_rows))
    edges = [rows * i // threads for i in range(threads + 1)]
    parts = list(zip(edges[:-1], edges[1:]))
    if threads == 1:
        codes = [part(parts[0])]
    else:
        with ThreadPoolExecutor(threads) as pool:
            codes = list(pool.map(part, parts))
    if any(codes):
        raise MemoryError("the fused kernel could not allocate its scratch memory")


def _inputs(x: torch.Tensor, quality: torch.Tensor | None, cost: torch.Tensor, run: torch.Tensor, table: SubsetTable):
    """The library and the C functions' leading arguments (a tuple to pass on) for rows of one step."""
    lib = _library()
    if x.dtype not in _FUNCTIONS:
        raise ValueError(f"the fused kernel takes float32 or float64 samples, got {x.dtype}")
    b, s, k = x.shape
    walked = walk(table)
    keep = [x.contiguous(), None if quality is None else quality.to(x.dtype).contiguous(),
            cost.to(torch.float64).contiguous(), run.to(torch.uint8).contiguous()]
    args = (k, s, keep[0].data_ptr(), None if keep[1] is None else keep[1].data_ptr(), keep[2].data_ptr(),
            keep[3].data_ptr(), k - table.n, table.count, *(walked[f].data_ptr() for f in ("order", "size", "parent", "added")))
    return lib, args, keep


def candidate_values(
    x: torch.Tensor, quality: torch.Tensor | None, cost: torch.Tensor, run: torch.Tensor, table: SubsetTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[max] in `x`'s dtype, cost in float64) of every candidate of the table, `(B, M)` each, for B CPU rows
    that all have `t = k - table.n` models run: `build_candidates`' values with the `levels` backend,
    without its `(B, M, samples)` intermediate. Arguments as for `decide_rows`."""
    lib, args, keep = _inputs(x, quality, cost, run, table)
    b = x.shape[0]
    value = torch.empty(b, table.count, dtype=torch.float64)
    total = torch.empty(b, table.count, dtype=torch.float64)
    fn = getattr(lib, _VALUES[x.dtype])
    _in_threads(b, lambda bounds: fn(bounds[0], bounds[1], *args, value.data_ptr(), total.data_ptr()))
    return value.to(x.dtype), total


def decide_rows(
    x: torch.Tensor,
    quality: torch.Tensor | None,
    cost: torch.Tensor,
    run: torch.Tensor,
    table: SubsetTable,
    lam: torch.Tensor,
    expensive: torch.Tensor,
    *,
    force_order: bool,
    tie_tol: float,
    cost_rtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next model, supermodel bitmask) per row, for B CPU rows that all have `t = k - table.n` models run.

    `x` (B, S, k) holds the quality samples (S = 1: the point estimates), `quality` (B, k) the estimates
    that one-model supermodels are valued at exactly (None without Σ), both float32 or float64; `cost`
    (B, k) float64; `run` (B, k) bool; `lam` (B,) float64; `expensive` (B,) bool.
    """
    lib, args, keep = _inputs(x, quality, cost, run, table)
    b = x.shape[0]
    rel = walk(table)["rel"]
    lam = lam.to(torch.float64).contiguous()
    dear = expensive.to(torch.uint8).contiguous()
    next_model = torch.empty(b, dtype=torch.long)
    supermodel = torch.empty(b, dtype=torch.long)
    fn = getattr(lib, _FUNCTIONS[x.dtype])
    _in_threads(b, lambda bounds: fn(bounds[0], bounds[1], *args, rel.data_ptr(), int(force_order), lam.data_ptr(),
                                     dear.data_ptr(), tie_tol, cost_rtol, next_model.data_ptr(), supermodel.data_ptr()))
    return next_model, supermodel


def lambda_table_arrays(
    value: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor, width: torch.Tensor, *, tie_tol: float,
    cost_rtol: float, safety: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lambda_table._build_block` for B CPU states (B, w), each over its first `width[b]` columns:
    (breaks, offsets, pick, safe) as `LambdaTable` holds them, computed per state in C (O(width²) work and
    memory O(width) per thread, where the torch version holds (states, 2·width, width) tensors)."""
    lib = _library()
    b, w = value.shape
    value, cost = value.to(torch.float64).contiguous(), cost.to(torch.float64).contiguous()
    valid8, width = valid.to(torch.uint8).contiguous(), width.to(torch.long).contiguous()
    room = 2 * width + 1  # intervals at most: 2 breakpoints per candidate
    start = torch.cat([torch.zeros(1, dtype=torch.long), room.cumsum(0)[:-1]]).contiguous()
    total = int(room.sum())
    breaks = torch.empty(total, dtype=torch.float64)
    pick = torch.empty(total, 2, dtype=torch.int16)
    safe = torch.empty(total, 2, dtype=torch.float64)
    count = torch.empty(b, dtype=torch.long)
    _in_threads(b, lambda bounds: lib.rt_lambda_table(
        bounds[0], bounds[1], w, value.data_ptr(), cost.data_ptr(), valid8.data_ptr(), width.data_ptr(),
        start.data_ptr(), tie_tol, cost_rtol, safety, breaks.data_ptr(), pick.data_ptr(), safe.data_ptr(),
        count.data_ptr()))
    slot = torch.arange(total) - torch.repeat_interleave(start, room)  # interval m of its state
    state_count = torch.repeat_interleave(count, room)
    keep_interval, keep_break = slot <= state_count, slot < state_count
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
    return breaks[keep_break], offsets, pick[keep_interval], safe[keep_interval]


def lambda_lookup(
    span: torch.Tensor, breaks: torch.Tensor, pick: torch.Tensor, safe: torch.Tensor, slots: torch.Tensor,
    lam: float, expensive: torch.Tensor, stable: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`LambdaTable.lookup` of the states `slots` in one C pass per state (a binary search in its own
    breakpoints, then its interval's pick and certain range), where the torch version makes a dozen passes
    over the looked-up rows (and, for many of them, one over every breakpoint of the table)."""
    lib = _library()
    m = slots.numel()
    tensors = [span.contiguous(), breaks.contiguous(), pick.contiguous(), safe.contiguous(),
               slots.to(torch.long).contiguous(), expensive.to(torch.uint8).contiguous()]
    picked = torch.empty(m, dtype=torch.long)
    sure = torch.empty(m, dtype=torch.uint8)
    ranges = torch.empty(m, 2, dtype=torch.float64) if stable else None
    out = ranges.data_ptr() if ranges is not None else None
    _in_threads(m, lambda bounds: lib.rt_lookup(bounds[0], bounds[1], *(t.data_ptr() for t in tensors), float(lam),
                                                picked.data_ptr(), sure.data_ptr(), out), MIN_LOOKUPS_PER_THREAD)
    return picked, sure.bool(), ranges
