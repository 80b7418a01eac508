"""Helpers of the GPU kernel benchmarks (``bench/test_*_gpu.py``): timing with pytest-benchmark, the record, the
results file named by GPU, and the measured copy bandwidth (the memory floor of a pass that reads its input once).

A GPU benchmark times every variant of a case in the same run; ``bench/conftest.py`` pairs each record with the
variants named in its ``compare_to`` (same ``group``) and stores ``ratio_vs[<variant>] = baseline_p50 / p50``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch

from bench.utils import RESULTS_DIR, environment, quantiles
from tritonslide._dispatch import gpu_slug

ROUNDS = 50
WARMUP = 10


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


def time_cuda(benchmark, fn: Callable[[], Any], rounds: int = ROUNDS, warmup: int = WARMUP) -> dict[str, Any]:
    """Time ``fn`` with pytest-benchmark, synchronizing after every call; returns the timing part of a record."""

    def step():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    data = list(benchmark.stats.stats.data) if benchmark.stats is not None else []
    if not data:  # --benchmark-disable
        return {}
    p20, p50, p80 = quantiles(data)
    return {"rounds": len(data), "warmup_rounds": warmup, "mean_s": sum(data) / len(data), "min_s": min(data),
            "p20_s": p20, "p50_s": p50, "p80_s": p80}


@lru_cache(maxsize=1)
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 50 copies of 1 GiB."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def memory_floor_s(*tensors: torch.Tensor) -> float:
    """Seconds to read ``tensors`` once at the measured copy bandwidth."""
    return sum(t.numel() * t.element_size() for t in tensors) / copy_bandwidth()
