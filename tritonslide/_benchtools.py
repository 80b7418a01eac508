"""Pieces every benchmark records: the environment (device, versions, commit), timing statistics, the machine load.

Shared by ``tritonslide bench`` (:mod:`tritonslide.benchmark`) and the repository's ``bench/`` scripts, which are
not installed with the package and import these from here (``bench/utils.py`` re-exports them). A benchmark records
a ratio against its baseline measured in the same run, with the device, versions, commit, timestamp and p20/p50/p80
(STYLE.md practice 7; the record follows Liger-Kernel's ``benchmark/scripts/utils.py``).

Timing reuses pytest-benchmark's machinery (its timer and its ``Stats``), which only the ``bench`` extra installs
(``pip install 'tritonslide[bench]'``): it is imported inside :func:`time_calls`, so this module imports without it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# The checkout this package would be part of: tritonslide/ sits at the repository root (next to pyproject.toml).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

BENCH_INSTALL_HINT = "pip install 'tritonslide[bench]'"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path | str | None = None) -> str | None:
    """HEAD's hash of the checkout at ``root`` (default: the one holding this package), with ``-dirty`` when the
    working tree has tracked changes (the numbers may not be HEAD's); None when ``root`` is not the top of a git
    checkout (an installed wheel: site-packages may sit inside some other repository, whose commit says nothing).
    ``$TRITONSLIDE_GIT_COMMIT``, when set, is taken as it is: bench/gpu_check.sh sets it, since the GPU machine gets a
    copy of the tree without ``.git``."""
    if os.environ.get("TRITONSLIDE_GIT_COMMIT") and root is None:
        return os.environ["TRITONSLIDE_GIT_COMMIT"]
    root = Path(root) if root is not None else PACKAGE_ROOT
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        if Path(top).resolve() != root.resolve():
            return None
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment() -> dict[str, Any]:
    """Where a CPU measurement ran: CPU model, threads, versions, the commit (None outside a checkout: then the
    package version says which code ran) and a UTC timestamp."""
    from tritonslide import __version__

    return {
        "device": f"cpu: {cpu_model()}",
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "tritonslide_version": __version__,
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def gpu_environment(device: int | str | torch.device | None = None) -> dict[str, Any]:
    """:func:`environment` plus the GPU: name, compute capability, memory, SM count, CUDA version and the TF32
    switches (they change what a float32 matmul or convolution computes, and how fast)."""
    env = environment()
    if isinstance(device, int):
        index = device
    else:
        index = torch.device(device).index if device is not None else None
        index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    env.update(
        device=f"cuda: {props.name}",
        gpu_name=props.name,
        gpu_capability=f"{props.major}.{props.minor}",
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        sm_count=props.multi_processor_count,
        cuda_version=torch.version.cuda,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
    )
    return env


class OtherLoad:
    """Share of the machine's CPU time that other processes used while the block ran (Linux /proc/stat).

    The benchmark machine may be shared: a dense and an ALSH run timed while something else was busy are not
    comparable, so the share is recorded next to every timing (None where /proc/stat is missing).
    """

    def __enter__(self) -> "OtherLoad":
        self.value: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        (busy0, total0, own0), (busy1, total1, own1) = self._start, end
        if total1 > total0:
            self.value = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (total1 - total0))

    @staticmethod
    def _sample() -> tuple[int, int, float] | None:
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.times()
        own = (ticks.user + ticks.system) * os.sysconf("SC_CLK_TCK")
        # busy = everything but idle and iowait, in clock ticks summed over CPUs
        return sum(fields) - fields[3] - fields[4], sum(fields), own


def quantiles(data: list[float], qs: tuple[float, ...] = (0.2, 0.5, 0.8)) -> list[float]:
    """Linear-interpolation quantiles (numpy's default), as Liger-Kernel reports p20/p50/p80."""
    return [float(v) for v in np.quantile(np.asarray(data, dtype=np.float64), qs)]


def time_calls(
    fn: Callable[[], Any], rounds: int, warmup: int, synchronize: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Time ``rounds`` calls of ``fn`` (after ``warmup`` untimed ones) with pytest-benchmark's timer, one call per
    round, and summarize them with pytest-benchmark's ``Stats`` plus p20/p50/p80 (:func:`quantiles`).

    ``synchronize`` (``torch.cuda.synchronize`` on a GPU) runs before the clock starts and before it stops, so a
    round holds the kernels that call launched and nothing queued earlier. Returns seconds: ``min_s``, ``max_s``,
    ``mean_s``, ``stddev_s``, ``median_s``, ``iqr_s``, ``p20_s``, ``p50_s``, ``p80_s``, ``ops`` (calls per second),
    ``rounds``, ``warmup_rounds``, every round (``data_s``) and the share of the CPUs other processes used meanwhile
    (``other_cpu_load``, :class:`OtherLoad`).
    """
    return time_interleaved({"fn": fn}, rounds, warmup, synchronize)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, synchronize: Callable[[], None] | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`time_calls` for several functions at once, round-robin: each round calls every function once, in
    order, so a slow phase of a shared machine lands on all of them alike instead of on whichever ran then (a
    baseline and its variants timed one after the other moved by 30% between runs here). Same keys per function;
    ``other_cpu_load`` covers the whole loop."""
    from pytest_benchmark.stats import Stats
    from pytest_benchmark.timers import default_timer

    sync = synchronize or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    stats = {name: Stats() for name in fns}
    with OtherLoad() as load:
        for _ in range(rounds):
            for name, fn in fns.items():
                sync()
                start = default_timer()
                fn()
                sync()
                stats[name].update(default_timer() - start)
    out = {}
    for name, st in stats.items():
        p20, p50, p80 = quantiles(st.data)
        out[name] = {
            "rounds": st.rounds, "warmup_rounds": warmup,
            "min_s": st.min, "max_s": st.max, "mean_s": st.mean, "stddev_s": st.stddev,
            "median_s": st.median, "iqr_s": st.iqr, "ops": st.ops,
            "p20_s": p20, "p50_s": p50, "p80_s": p80,
            "data_s": list(st.data), "other_cpu_load": load.value,
        }
    return out


# torchvision's ImageNet normalization, as used by the thesis (shared/papers/001, sec. 5.2).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_crops(n: int = 64, size: int = 224, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float32 random crops of scikit-learn's two sample photographs, ImageNet-normalized.

    Crops alternate between china.jpg and flower.jpg (427x640 each); positions come from a seeded generator.
    Real photographs matter: the ALSH active fraction depends on the statistics of the input patches.
    """
    from sklearn.datasets import load_sample_images  # reads JPEGs with pillow

    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        top = int(rng.integers(0, img.shape[0] - size + 1))
        left = int(rng.integers(0, img.shape[1] - size + 1))
        crops.append(img[top : top + size, left : left + size])
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
