"""Helpers of the GPU kernel benchmarks (``bench/test_*_gpu.py``): their scales, timing with pytest-benchmark, the
record, the results file named by GPU, the measured copy bandwidth (the memory floor of a pass that reads its input
once), and the cost model that ``--bench-budget`` trims the case list with.

A GPU benchmark times every variant of a case in the same run; ``bench/conftest.py`` pairs each record with the
variants named in its ``compare_to`` (same ``group``) and stores ``ratio_vs[<variant>] = baseline_p50 / p50``.

Scales (``--bench-scale``, registered in ``bench/conftest.py``):

- ``full``: every case of each file, on CUDA (skipped without);
- ``quick``: per file a few representative layers covering each kernel family against its baselines, fp16 and bf16,
  10 rounds after 2 warmups; about 4 minutes for the four files on one H100 (the cost model below);
- ``dry``: the code paths of ``quick`` on the CPU, the kernels in Triton's interpreter (``TRITON_INTERPRET=1``),
  tiny shapes, 1 round, no warmup; its records say ``"scale": "dry"`` and are not measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch

from bench.utils import RESULTS_DIR, environment, quantiles
from tritonslide._dispatch import gpu_slug

ROUNDS = 50
WARMUP = 10

SCALES = ("full", "quick", "dry")
# quick: 10 rounds keep the p20-p80 spread of a 0.1-5 ms call within a few percent on a quiet GPU; the untimed first
# call of each case compiles and autotunes, 2 warmups settle clocks and allocator. dry: one call, nothing measured.
SCALE_ROUNDS = {"quick": (10, 2), "dry": (1, 0)}
# The dtypes of a scale: full keeps each file's own; quick runs fp16 and bf16 (issue #13); dry runs fp16 and, for
# bf16, fp32: Triton's interpreter has no bf16 tl.dot (the kernels return garbage in bf16 there).
DRY_DTYPE = {"fp16": "fp16", "bf16": "fp32", "fp32": "fp32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bench_scale(config) -> str:
    """The ``--bench-scale`` of the run (``full`` when the option is absent, e.g. outside bench/)."""
    return config.getoption("--bench-scale", default="full") or "full"


def rounds_for(scale: str, full: tuple[int, int]) -> tuple[int, int]:
    """(rounds, warmup) of ``scale``; ``full`` is the file's own pair."""
    return SCALE_ROUNDS.get(scale, full)


def scale_dtypes(scale: str, full: tuple[str, ...]) -> list[str]:
    """The dtype names a file runs at ``scale``: its own at full, fp16 and bf16 at quick, dry's stand-ins at dry."""
    if scale == "full":
        return list(full)
    quick = ["fp16", "bf16"]
    return quick if scale == "quick" else [DRY_DTYPE[d] for d in quick]


def scale_device(scale: str) -> torch.device:
    """Where a benchmark of ``scale`` runs: the CPU (Triton's interpreter) for dry, else CUDA."""
    return torch.device("cpu") if scale == "dry" else torch.device("cuda")


def dry_conv(kernel_size: int = 3, padding: int = 1, stride: int = 1, in_channels: int = 16,
             out_channels: int = 16, size: int = 8, batch: int = 2) -> tuple[torch.nn.Conv2d, tuple[int, ...]]:
    """A tiny conv (default init, seed 0) and its input shape, for dry runs: 16 channels keep the kernels on the
    paths of the real layers (the hash kernel switches to its row-segment order below 16 channels)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
    finally:
        torch.random.set_rng_state(gen_state)
    return conv, (batch, in_channels, size, size)


def scale_cases(scale: str, cases: list[tuple], quick: tuple, dry_case: tuple,
                quick_id=lambda case: case[0]) -> list[tuple]:
    """A benchmark file's case list at ``scale``: all ``cases`` (full), those whose ``quick_id`` is in ``quick``, or
    the one tiny ``dry_case`` (dry)."""
    if scale == "full":
        return cases
    if scale == "quick":
        return [c for c in cases if quick_id(c) in quick]
    return [dry_case]


def results_path():
    """bench/results/<gpu>.json (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``), cpu.json without CUDA."""
    if not torch.cuda.is_available():
        return RESULTS_DIR / "cpu.json"
    return RESULTS_DIR / f"{gpu_slug(torch.cuda.get_device_name())}.json"


def gpu_environment() -> dict[str, Any]:
    import triton

    env = environment()
    props = torch.cuda.get_device_properties(0)
    env.update(
        device=f"cuda: {props.name}",
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        sm_count=props.multi_processor_count,
        cuda_version=torch.version.cuda,
        triton_version=triton.__version__,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
    )
    return env


def synchronize(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU, whose calls return when done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(benchmark, fn: Callable[[], Any], rounds: int = ROUNDS, warmup: int = WARMUP,
              device: torch.device | str = "cuda") -> dict[str, Any]:
    """Time ``fn`` with pytest-benchmark, synchronizing ``device`` after every call (nothing to wait for on the
    CPU, where dry runs time); returns the timing part of a record."""

    def step():
        out = fn()
        synchronize(device)
        return out

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    data = list(benchmark.stats.stats.data) if benchmark.stats is not None else []
    if not data:  # --benchmark-disable
        return {}
    p20, p50, p80 = quantiles(data)
    return {"rounds": len(data), "warmup_rounds": warmup, "mean_s": sum(data) / len(data), "min_s": min(data),
            "p20_s": p20, "p50_s": p50, "p80_s": p80}


@lru_cache(maxsize=4)
def copy_bandwidth(device: str = "cuda") -> float:
    """Copy bandwidth of ``device`` in bytes/s (read + write counted): on CUDA the median of device-to-device
    copies of 1 GiB (``triton.testing.do_bench``), on the CPU (dry runs) the median of 5 copies of 16 MiB."""
    if torch.device(device).type != "cuda":
        src = torch.empty(2**22, dtype=torch.float32)
        dst = torch.empty_like(src)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return 2 * src.numel() * src.element_size() / sorted(times)[2]
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def memory_floor_s(*tensors: torch.Tensor) -> float:
    """Seconds to read ``tensors`` once at the measured copy bandwidth of their device."""
    return sum(t.numel() * t.element_size() for t in tensors) / copy_bandwidth(tensors[0].device.type)


# ---------------------------------------------------------------------------------------------------- cost model
# Estimates for one H100 / H200 with a cold Triton cache (the lent machine starts bare), used to predict a run's
# length and to trim its case list to --bench-budget; never recorded as a measurement.
# One Triton compile of one config (TTIR to cubin): bench.aot's full plan (bench/results/aot.json, sm_90) took a
# median of 3.1 / 3.3 / 3.9 s per config for the active conv's fwd / dX / dW kernels, 4.0 s for the hash kernel and
# 2.3-4.7 s for the sketch kernels, on 2 vCPUs of the CI machine (AMD EPYC) and including ~0.3 s of cuobjdump per
# config; a GPU host's core is about twice as fast: 1.5 s.
COMPILE_S = 1.5
# Autotuning one config for one key: Triton's do_bench runs 25 ms of warmup and 100 ms of timed calls (each after an
# L2 flush), plus its first call and the launches: ~0.15 s.
TUNE_S = 0.15
TEST_S = 0.15  # pytest, pytest-benchmark and the record of one test
STARTUP_S = 20.0  # interpreter, torch / triton imports, CUDA context, the copy-bandwidth measurement
# Effective rates of one timed call: a third of the H100 SXM's dense bf16 peak (990 TFLOP/s; cuDNN reaches about
# half of it on these batch-64 convs, untuned kernels less) and 2 TB/s of its 3.35 TB/s HBM3 (copies reach ~2.6).
FLOPS = 330e12
BANDWIDTH = 2.0e12
LAUNCH_S = 20e-6  # host side of one op call (torch dispatch, Triton's launcher): the floor of a tiny call
CPU_RANDN_S = 1e-8  # one element of torch.randn on the host (the active conv file draws its inputs there)
# Configs each kernel compiles per specialization: bench/results/aot.json (fp16 / bf16, sm_90, after the kernels'
# own pruning; NCHW inputs with index sets, as the benchmarks call them). The sketch's linear layer: all its
# backward kernels together.
CONFIGS = {
    "active_fwd": 7, "active_dx": 7, "active_dw": 6, "hash": 7, "hash_atomic": 1,
    "sample_fwd": 6, "sample_dx": 5, "sample_dw": 2,  # the per-sample launches: the PER_SAMPLE subsets
    "sketch_fwd": 4, "sketch_dz": 3, "sketch_db": 3, "sketch_da": 3, "sketch_dx": 2,
    "sketch_linear_fwd": 3, "sketch_linear_bwd": 20,
}
DTYPE_RANK = {"bf16": 0, "fp16": 1, "fp32": 2}
FRACTION_RANK = {None: 0, 0.5: 0, 1.0: 1, 0.25: 2}


@dataclass(frozen=True)
class CaseCost:
    """Estimated cost of one benchmark test.

    ``group``: its pytest-benchmark group, kept or dropped as a whole (a variant is worthless without the
    baselines its ratios are taken against). ``rank``: :func:`priority`, smaller first. ``run_s``: the test's own
    seconds (overhead, untimed first call, warmup and rounds). ``once``: one-time costs, ``(key, seconds)``, paid by
    the first kept test that needs them: a kernel compiled for one specialization (``compile:``), an autotune key
    (``tune:``), inputs shared by a group (``inputs:``).
    """

    group: str
    rank: tuple
    run_s: float
    once: tuple[tuple[str, float], ...] = ()


def compile_cost(kernel: str, spec: str) -> tuple[str, float]:
    """Compiling every config of ``kernel`` for one specialization (constexprs, dtype, divisibility of the ints)."""
    return f"compile:{kernel}:{spec}", CONFIGS[kernel] * COMPILE_S


def tune_cost(kernel: str, key: str) -> tuple[str, float]:
    """Autotuning ``kernel`` over its configs for one autotune key."""
    return f"tune:{kernel}:{key}", CONFIGS[kernel] * TUNE_S


def hash_compile_spec(conv: torch.nn.Conv2d, shape: Sequence[int], dtype: str) -> str:
    """What one compile of the hash kernel is specialized on: the input's channels and output size are constexprs,
    as are the conv's geometry and the dtype (shared by the hash and ALSH layer files)."""
    return f"{'x'.join(map(str, shape))}|k{conv.kernel_size}s{conv.stride}p{conv.padding}|{dtype}"


def active_compile_spec(conv: torch.nn.Conv2d, shape: Sequence[int], dtype: str) -> str:
    """What one compile of the active conv's kernels is specialized on: the geometry (constexprs), the dtype, and
    whether H and W are multiples of 16 (Triton specializes integer arguments on divisibility by 16; the channel
    counts of these layers, and the products of channels and sizes, all are)."""
    hw16 = shape[2] % 16 == 0 and shape[3] % 16 == 0
    return f"k{conv.kernel_size}s{conv.stride}p{conv.padding}d{conv.dilation}|hw16={hw16}|{dtype}"


def call_s(flops: float = 0.0, nbytes: float = 0.0) -> float:
    """Estimated seconds of one call doing ``flops`` and moving ``nbytes`` (roofline plus the launch floor)."""
    return LAUNCH_S + max(flops / FLOPS, nbytes / BANDWIDTH)


def case_s(call: float, calls: int) -> float:
    """A test's own seconds: the fixed overhead and ``calls`` calls of ``call`` seconds."""
    return TEST_S + calls * call


def priority(dtype: str, pass_: str = "forward", fraction: float | None = None, layer: int = 0) -> tuple:
    """Rank of a case; smaller runs first and is kept first under ``--bench-budget``.

    Forward at active fraction 0.5 (or cases without fractions) first: the issue's headline targets; then bf16
    before fp16 (fp32 last), forward before forward+backward, fraction 1.0 before 0.25, and the file's
    representative layers (the quick list, in its order) before the others. Ties keep the collection order."""
    headline = pass_ == "forward" and fraction in (None, 0.5)
    return (not headline, DTYPE_RANK.get(dtype, 3), pass_ != "forward", FRACTION_RANK.get(fraction, 3), layer)


def layer_rank(case: str, quick: Sequence[str], order: Sequence[str]) -> int:
    """Rank of a layer: its place in the quick list, then its place in the file's full list."""
    if case in quick:
        return list(quick).index(case)
    return len(quick) + (list(order).index(case) if case in order else len(order))


@dataclass
class BudgetPlan:
    """The outcome of :func:`plan_budget`: groups kept and dropped (in rank order) and the estimates."""

    kept: list[str]
    dropped: list[str]
    estimate_s: float  # of the kept groups, with STARTUP_S
    total_s: float  # of every group, with STARTUP_S


def plan_budget(costs: Sequence[CaseCost], budget_s: float | None = None) -> BudgetPlan:
    """Trim a case list to ``budget_s`` seconds: the rule of ``--bench-budget``.

    Groups are visited in rank order (their best case's :func:`priority`, ties in collection order). A group is
    kept when the estimate so far (``STARTUP_S`` plus every kept group) plus its marginal cost fits the budget; the
    marginal cost is the ``run_s`` of its tests plus the one-time costs (compiles, autotune keys, inputs) that no
    kept group has paid yet. A group that does not fit is dropped and the walk goes on: a later group may still fit
    (one that shares compiles already paid). Without a budget every group is kept."""
    groups: dict[str, list[CaseCost]] = {}
    for cost in costs:
        groups.setdefault(cost.group, []).append(cost)
    ordered = sorted(groups, key=lambda g: min(c.rank for c in groups[g]))  # stable: ties keep collection order
    paid: dict[str, float] = {}
    every: dict[str, float] = {}
    kept, dropped = [], []
    estimate = total = STARTUP_S
    for group in ordered:
        once = {k: v for c in groups[group] for k, v in c.once}
        run = sum(c.run_s for c in groups[group])
        total += run + sum(v for k, v in once.items() if k not in every)
        every.update(once)
        marginal = run + sum(v for k, v in once.items() if k not in paid)
        if budget_s is None or estimate + marginal <= budget_s:
            kept.append(group)
            paid.update(once)
            estimate += marginal
        else:
            dropped.append(group)
    return BudgetPlan(kept, dropped, estimate, total)
