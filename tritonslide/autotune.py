"""``tritonslide autotune``: tune the Triton kernels for the shapes of a model on this GPU, once, and keep the winners.

The kernels pick a launch config (tile sizes, warps, pipeline stages) per shape key. Without a cache each new
process times every config of every new key again (seconds per key, the first batches of a run stall); with one,
a key tuned once on this GPU launches its winner at once. This command builds a model (a standard architecture of
:mod:`tritonslide.models` or the user's own, ``module:attr``), patches it with each method, runs it once per mode so
that every kernel meets every shape key the model gives it, times each key's configs on this GPU and writes the
winners to the per-GPU cache of :mod:`tritonslide.tuning` (``$TRITONSLIDE_CACHE_DIR``, else
``$XDG_CACHE_HOME/tritonslide``, else ``~/.cache/tritonslide``).

Only the methods with Triton kernels have anything to tune: ``alsh`` (hashing + active-filter conv), ``sketch``
(SK-CONV / SK-FC chains) and ``milf`` (both). The batch, image size, dtype and memory format must be those the
model will run with: they are part of the keys.

Without CUDA the command exits 2, except under ``TRITON_INTERPRET=1`` (the dry run of ``bench/gpu_check.sh``),
where it runs the same steps on CPU tensors in Triton's interpreter; nothing is timed there (one config per list).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

from tritonslide import models as _models
from tritonslide._argtypes import csv_list, positive_int
from tritonslide.benchmark import input_shape

# methods whose layers launch Triton kernels (lowrank and csg run dense torch convolutions)
KERNEL_METHODS = ("alsh", "sketch", "milf")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("inference", "train")


class UsageError(ValueError):
    """A bad argument: reported as ``tritonslide autotune: error: ...`` with exit code 2."""


def load_model(spec: str) -> nn.Module:
    """A standard architecture by name or ``module:attr`` (the same resolution as ``tritonslide bench``)."""
    from tritonslide.benchmark import BenchUsageError
    from tritonslide.benchmark import load_model as _load

    try:
        return _load(spec)[0]
    except BenchUsageError as exc:
        raise UsageError(str(exc)) from None




def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``autotune`` on the ``tritonslide`` command's subparsers."""
    p = commands.add_parser(
        "autotune",
        help="tune the Triton kernels for a model's shapes on this GPU and save the winners in the per-GPU cache",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--model", type=csv_list(None, "models"), default=["alexnet"],
                   help="comma-separated standard models (%s) or module:attr (default alexnet)"
                   % ", ".join(_models.available_models()))
    p.add_argument("--methods", type=csv_list(KERNEL_METHODS, "methods"), default=list(KERNEL_METHODS),
                   help="comma-separated methods with Triton kernels (default " + ",".join(KERNEL_METHODS) + ")")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size (default %(default)s)")
    p.add_argument("--image-size", type=positive_int, default=224, help="square input side (default %(default)s)")
    p.add_argument("--dtype", type=csv_list(tuple(DTYPES), "dtypes"), default=["fp16"],
                   help="comma-separated fp16, bf16, fp32 (default fp16)")
    p.add_argument("--mode", type=csv_list(MODES, "modes"), default=list(MODES),
                   help="inference (forward only), train (forward + backward), or both (default both)")
    p.add_argument("--channels-last", action="store_true", help="run the model in channels_last memory format")
    p.add_argument("--all-layers", action="store_true",
                   help="convert every convolution (the first one too; patch's default keeps it dense)")
    p.add_argument("--cached", action="store_true",
                   help="time only keys no cache holds (default: re-time every key the model meets)")
    p.add_argument("--show", action="store_true", help="list the cache files and their entries, then exit")
    p.add_argument("--clear", action="store_true", help="remove this user's cache files (shipped defaults stay)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input (default %(default)s)")
    return p


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return torch.device("cpu")
    raise UsageError("needs CUDA: torch.cuda.is_available() is False, and the kernels are tuned on the GPU they run "
                     "on (set TRITON_INTERPRET=1 for a dry run of the same steps in Triton's interpreter on CPU)")


def _one_pass(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    if mode == "inference":
        model.eval()
        with torch.inference_mode():
            model(x)
    else:
        model.train()
        out = model(x)
        out.float().square().mean().backward()


def tune_model(spec: str, method: str, *, batch: int, image_size: int, dtype: torch.dtype, modes: list[str],
               channels_last: bool = False, all_layers: bool = False, seed: int = 0,
               device: torch.device | None = None) -> float:
    """Patch ``spec``'s model with ``method`` and run it once per mode on ``device`` with the Triton backend forced,
    so that every kernel launch meets its shape key (and tunes it, as the tuning mode in effect says). Returns the
    seconds it took."""
    import tritonslide

    device = device or _device()
    torch.manual_seed(seed)
    model = load_model(spec)  # a fresh model (or a copy of the user's instance): patched in place below
    shape = input_shape(model, batch, image_size)
    filter_fn = (lambda module, name: True) if all_layers else None
    model = tritonslide.patch(model, method, filter_fn=filter_fn)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    start = time.perf_counter()
    with tritonslide.use_backend("triton"):
        for mode in modes:
            _one_pass(model, x, mode)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    """The ``autotune`` command; returns the exit code."""
    from tritonslide import tuning

    if args.clear:
        removed = tuning.clear()
        print(f"removed {len(removed)} cache file(s)" + "".join(f"\n  {p}" for p in removed))
    if args.show:
        print(tuning.describe())
    if args.show or args.clear:
        return 0
    try:
        device = _device()
        for spec in args.model:
            load_model(spec)  # a bad spec fails before any tuning
    except UsageError as exc:
        print(f"tritonslide autotune: error: {exc}", file=sys.stderr)
        return 2
    interpreted = device.type == "cpu"
    if interpreted:
        print("tritonslide autotune: no CUDA; TRITON_INTERPRET=1: dry run in Triton's interpreter on CPU "
              "(one config per list: nothing is timed, nothing is written)")
    identity = tuning.gpu_identity(device)
    tuning.reset_stats()
    total = time.perf_counter()
    with tuning.override_mode("cached" if args.cached else "full"):
        for spec in args.model:
            for dtype_name in args.dtype:
                for method in args.methods:
                    seconds = tune_model(spec, method, batch=args.batch, image_size=args.image_size,
                                         dtype=DTYPES[dtype_name], modes=args.mode, channels_last=args.channels_last,
                                         all_layers=args.all_layers, seed=args.seed, device=device)
                    s = tuning.stats()
                    print(f"{spec} {method} {dtype_name} {'+'.join(args.mode)}: {seconds:.1f} s "
                          f"(keys so far: {s['tuned']} tuned, {s['cache_hits']} from cache)", flush=True)
    s = tuning.stats()
    print(f"{identity['name']} (sm_{identity['capability'][0]}{identity['capability'][1]}): {s['tuned']} key(s) "
          f"tuned, {s['cache_hits']} from cache, in {time.perf_counter() - total:.1f} s; cache: "
          f"{tuning.user_cache_path(identity)}")
    return 0
