"""Runs independent pieces of a CPU op on several threads, one intra-op thread each (issue #15).

The per-sample convolution is a loop of small convolutions, one per group of samples that share their sets
(mostly one sample each), and a batch-1 convolution keeps two intra-op threads poorly busy. PyTorch releases the
GIL inside its kernels, so worker threads that each run part of the groups keep the cores busy and overlap one
part's Python and gathers with another's convolutions. Measured on this 2-core CPU (batch 64, interleaved, best of
8 rounds), AlexNet conv2-conv5's per-sample calls: 99 / 54 / 66 / 49 ms on one thread of calls -> 75 / 47 / 56 / 46
ms on two workers with full-size inputs, 74 / 46 / 60 / 43 -> 69 / 43 / 55 / 42 ms with compact inputs; VGG-11 per
sample, whole model: 8.49 -> 7.37 s (best of 4, per batch 6.10 s).

Each worker runs its convolutions on ONE intra-op thread (OpenMP's thread count is per thread), so ``n`` workers
use ``n`` cores and a 16-core machine runs 16 workers, not 16 teams of 16 threads. ``n`` is the calling thread's
``torch.get_num_threads()``; ``TRITONSLIDE_CPU_WORKERS=1`` turns the threads off (``=k`` caps them at ``k``).

Only where autograd will differentiate the call: the op layer passes ``will_backward`` and an inference forward
(``torch.no_grad`` / ``inference_mode``) runs its groups on the calling thread with that thread's intra-op threads.
Measured 2026-12-03 on the faster 2-core AMD EPYC (batch 64, 224 px, old / new interleaved in one process, best of
the rounds, outputs bitwise equal): per-sample eval AlexNet 0.258 -> 0.237 s and 0.216 -> 0.195 s (seeds 0 / 1),
ResNet-18 1.27 -> 1.19 s, VGG-11 equal within 2% (1.71 / 1.73 s, 2.31 / 2.33 s); a training step (forward and
backward) on AlexNet was 1.15-1.24x slower with every call on the calling thread and 1.08-1.12x slower with only
the forward there, so training keeps the workers in both. The likely cause: the calling thread's OpenMP team, busy
just before (hashing, pooling), spins while the workers run (the README's *CPU tips*, ``OMP_WAIT_POLICY``).

Pieces are split in a fixed way (largest first onto the least loaded worker, by a cost the caller gives), so a
run's partition, and any sum the caller makes over the parts in part order, is the same every time.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# a piece list runs on threads only when its most loaded worker gets at most this share of the total cost: a
# loop whose largest piece dominates runs faster on the caller's own intra-op threads. A judgment, not a
# measurement: with two workers, 75% leaves at most 1.33x, about what a second intra-op thread gives one
# convolution here (a one-thread loop of per-sample convolutions ran 1.2-1.75x slower than a two-thread one)
_BALANCE = 0.75

_lock = threading.Lock()
# one pool per (process, size), kept for the process' life: replacing a pool when the thread count changes could
# shut it down under another thread that is about to submit to it; a forked child's key differs from its parent's
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def workers() -> int:
    """How many worker threads a parallel op uses from the calling thread (1: none)."""
    n = torch.get_num_threads()
    cap = os.environ.get("TRITONSLIDE_CPU_WORKERS", "")
    if cap:
        try:
            n = min(n, int(cap))
        except ValueError:
            raise ValueError(f"TRITONSLIDE_CPU_WORKERS must be an integer, got {cap!r}") from None
    return max(1, n)


def _one_thread(barrier: threading.Barrier) -> None:
    # the first call in a thread sets its OpenMP count from the process-wide one (restored to the caller's below),
    # so make it before setting this thread's own count
    torch.get_num_threads()
    torch.set_num_threads(1)
    barrier.wait(timeout=60)


def _get_pool(n: int) -> ThreadPoolExecutor:
    """The shared pool of ``n`` one-thread workers of this process."""
    key = (os.getpid(), n)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            main_threads = torch.get_num_threads()
            barrier = threading.Barrier(n)
            pool = ThreadPoolExecutor(n, thread_name_prefix="tritonslide-cpu", initializer=_one_thread,
                                      initargs=(barrier,))
            # n tasks while every started worker waits at the barrier: the pool starts all n workers now
            for f in [pool.submit(int) for _ in range(n)]:
                f.result()
            # torch.set_num_threads(1) in a worker also changed the process-wide count that new threads start
            # with; set it back to the caller's (the caller's own OpenMP count never changed)
            torch.set_num_threads(main_threads)
            _pools[key] = pool
        return pool


def partition(costs: Sequence[float], n: int) -> list[list[int]]:
    """Indices of ``costs`` in ``n`` parts of about equal total: largest first onto the least loaded part (ties to
    the lower part), each part in increasing index order. Deterministic."""
    loads = [0.0] * n
    parts: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        p = min(range(n), key=lambda p: (loads[p], p))
        loads[p] += costs[i]
        parts[p].append(i)
    return [sorted(p) for p in parts if p]


def map_parts(body: Callable[[list[T]], R], items: Sequence[T], costs: Sequence[float]) -> list[R]:
    """``[body(part) for part in parts]`` with ``items`` split into parts by ``costs``, the parts run on the worker
    threads when that pays (more than one worker, and no part above ``_BALANCE`` of the total cost), else one part
    of every item run here. ``body`` runs with the caller's inference mode and without autograd recording, and
    must write only what its own items own."""
    n = min(workers(), len(items))
    parts = partition(costs, n) if n > 1 else []
    total = float(sum(costs))
    if len(parts) < 2 or total <= 0 or max(sum(costs[i] for i in p) for p in parts) > _BALANCE * total:
        return [body(list(items))]
    inference = torch.is_inference_mode_enabled()

    def run(part: list[int]) -> R:
        # grad mode and inference mode are per thread: a worker starts with neither as the caller has them
        with torch.inference_mode(inference), torch.no_grad():
            return body([items[i] for i in part])

    pool = _get_pool(workers())
    return [f.result() for f in [pool.submit(run, p) for p in parts]]
