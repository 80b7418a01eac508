"""``tritonslide bench``: dense PyTorch against each method, on this machine, end to end and per layer.

For one model, input size, mode, device and dtype, every requested method (``tritonslide.patch(model, method)``
with the method's default config, on a copy of the same dense model) is timed against the dense model in the same
process:

* end to end, the whole model. ``inference``: ``model.eval()`` and ``model(x)`` under ``torch.inference_mode()``.
  ``train``: ``model.train()``, then one SGD step: ``zero_grad(set_to_none=True)``, forward, loss, backward,
  ``SGD(lr=1e-4).step()`` (no momentum, so the optimizer keeps no state and costs one pass over the parameters,
  fewer of them for a method that stores fewer). The loss is the cross-entropy against fixed random labels when the
  output is (batch, classes), else the mean square of the output.
* per layer (``--layers``, the default): each layer that the patch replaced, alone, on the input the dense layer
  sees inside the dense network (captured with forward pre-hooks), dense layer against its replacement.
  ``inference``: the layer in eval mode under ``torch.inference_mode()``; ``train``: forward and backward of a
  fixed random output gradient, the input requiring grad (no optimizer step). A replacement runs alone on a copy
  of itself: ALSH layers linked for last-active-set sharing (Alg. 6) then read the full input, as they do outside
  their ``nn.Sequential``; the end-to-end number includes what the hand-off saves.

Timing reuses pytest-benchmark's timer and ``Stats`` (:func:`tritonslide._benchtools.time_calls`): ``--warmup``
untimed calls, then ``--rounds`` timed calls of one step each, synchronized on CUDA. Every ratio is
``dense p50 / method p50`` of the same run: above 1 the method is faster. Inputs are standard normal (seeded); the
active fraction of ALSH and MILF layers depends on the input statistics, so real data may select differently.

The JSON written to ``--out`` holds the environment, the arguments, and per method the end-to-end and per-layer
statistics with their ratios, parameter counts dense vs patched and, for ALSH and MILF, the active fractions of
the timed end-to-end rounds (``tritonslide.stats``). ``--plot`` draws the ratios with matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tritonslide import models
from tritonslide._argtypes import non_negative_int, positive_int
from tritonslide._benchtools import BENCH_INSTALL_HINT, environment, gpu_environment, time_calls
from tritonslide._registry import is_tritonslide_layer

__all__ = ["DTYPES", "MODES", "add_parser", "benchmark", "format_report", "load_model", "plot", "run"]

MODES = ("inference", "train")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_ROUNDS = 10
DEFAULT_WARMUP = 2
# SGD step of the train mode: small enough that the weights barely move over a benchmark's rounds.
TRAIN_LR = 1e-4


class BenchUsageError(ValueError):
    """A bad argument (or combination) that parsing alone cannot catch: ``run`` reports it and returns 2."""


class BenchError(RuntimeError):
    """The dense model itself fails to run: ``run`` reports it and returns 1."""


class MissingBenchDependency(ImportError):
    """pytest-benchmark, tqdm or (for ``--plot``) matplotlib is not installed."""


def _digits_cnn() -> nn.Module:
    from tritonslide.demo import three_layer_cnn

    return three_layer_cnn()


# Models by name: tritonslide.models plus the 3-layer CNN of ``tritonslide demo`` (1x8x8 digits; sizes 8 to 11).
EXTRA_MODELS: dict[str, Callable[[], nn.Module]] = {"digits_cnn": _digits_cnn}


def model_names() -> list[str]:
    return sorted([*models.available_models(), *EXTRA_MODELS])


# ---------------------------------------------------------------------------------------------- argument parsing


def _method_list(text: str) -> list[str]:
    """``alsh,sketch`` -> ``["alsh", "sketch"]`` (order kept, repeats dropped); ``all`` -> every method."""
    available = tritonslide.available_methods()
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no method given; available: {','.join(available)}")
    if names == ["all"]:
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"available: {','.join(available)} (or all)"
        )
    return list(dict.fromkeys(names))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on ``subparsers`` (``parser.add_subparsers()``); returns its parser."""
    parser = subparsers.add_parser(
        "bench",
        help="time dense PyTorch against each method on this machine, end to end and per layer",
        description=(
            "Time a model dense and patched with each method (tritonslide.patch, default configs) in the same "
            "process, end to end and per replaced layer, and write the statistics and ratios (dense p50 / method "
            "p50, > 1: method faster) to a JSON file. Timing uses pytest-benchmark's timer and statistics. Needs "
            f"{BENCH_INSTALL_HINT}."
        ),
    )
    parser.add_argument(
        "--model", required=True,
        help=f"a standard model ({', '.join(model_names())}) or module:attr naming an nn.Module or a callable "
        "returning one (the module is imported with the current directory on sys.path)",
    )
    parser.add_argument(
        "--methods", type=_method_list, default=None,
        help=f"comma-separated methods among {','.join(tritonslide.available_methods())}, or all (default: all)",
    )
    parser.add_argument("--batch", type=positive_int, default=8, help="batch size (default %(default)s)")
    parser.add_argument(
        "--image-size", type=positive_int, default=64,
        help="square input side S: inputs are (batch, C, S, S), C the first convolution's input channels "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--mode", choices=MODES, default="inference",
        help="inference: eval() and a forward under torch.inference_mode(); train: one SGD step (forward, loss, "
        "backward, step); per layer: forward, or forward and backward (default %(default)s)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default %(default)s)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32",
        help="weights and inputs; methods are applied in fp32, then cast (default %(default)s)",
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write the results to")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the ratios into this image (matplotlib)")
    parser.add_argument(
        "--rounds", type=positive_int, default=DEFAULT_ROUNDS, help="timed calls per case (default %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=DEFAULT_WARMUP,
        help="untimed calls before each case (default %(default)s)",
    )
    parser.add_argument(
        "--layers", action=argparse.BooleanOptionalAction, default=True,
        help="also time every replaced layer alone, dense vs method (default: on)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="torch.set_num_threads for the run (default: torch's choice); fewer than the cores on a shared machine",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of weights and inputs (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(bench_parser=parser)
    return parser


# ---------------------------------------------------------------------------------------------- dependencies
def require_bench_dependencies(plot: bool = False) -> None:
    """Raise :class:`MissingBenchDependency` naming the missing packages and the install command."""
    needed = [("pytest_benchmark", "pytest-benchmark"), ("tqdm", "tqdm")]
    if plot:
        needed.append(("matplotlib", "matplotlib"))
    missing = []
    for module, package in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        what = "--plot needs" if missing == ["matplotlib"] else "tritonslide bench needs"
        raise MissingBenchDependency(
            f"{what} {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; run: "
            f"{BENCH_INSTALL_HINT}"
        )


# ---------------------------------------------------------------------------------------------- the model
def load_model(spec: str) -> tuple[nn.Module, str]:
    """The model named ``spec`` (a standard name or ``module:attr``) and a description of where it came from."""
    if spec in EXTRA_MODELS:
        return EXTRA_MODELS[spec](), f"tritonslide.demo.three_layer_cnn ({spec})"
    if spec in models.MODELS:
        return models.get_model(spec), f"tritonslide.models.{spec}"
    if ":" not in spec:
        raise BenchUsageError(
            f"unknown model {spec!r}; available: {', '.join(model_names())}, or module:attr for your own"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BenchUsageError(f"--model {spec!r}: expected module:attr, e.g. mypackage.models:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: a model file in the current directory imports
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise BenchUsageError(f"--model {spec!r}: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BenchUsageError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj), spec
    if not callable(obj):
        raise BenchUsageError(f"--model {spec!r} is a {type(obj).__name__}, neither an nn.Module nor a callable")
    built = obj()
    if not isinstance(built, nn.Module):
        raise BenchUsageError(f"--model {spec!r}: calling it returned a {type(built).__name__}, not an nn.Module")
    return built, spec


def input_shape(model: nn.Module, batch: int, image_size: int) -> tuple[int, ...]:
    """(batch, C, S, S) for a model whose first layer is a convolution, (batch, features) for a linear one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (batch, module.in_channels, image_size, image_size)
        if isinstance(module, nn.Linear):
            return (batch, module.in_features)
    raise BenchUsageError("the model has no nn.Conv2d or nn.Linear: there is nothing for a method to replace")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_input_fits(model: nn.Module, shape: tuple[int, ...], mode: str, name: str, device: torch.device) -> None:
    """Raise :class:`BenchUsageError` when an input of ``shape`` cannot go through ``model`` in ``mode`` (too small
    for its pooling stages, the wrong size for its classifier, one value per channel for train-mode BatchNorm).

    The forward runs on the meta device (no memory, no compute). Some models cannot run there (a forward that reads
    a value on the host); when meta fails, a real forward on a copy decides, so that only a real failure is an error.
    """
    try:
        meta = copy.deepcopy(model).to("meta")
        meta.train(mode == "train")
        with torch.no_grad():
            meta(torch.empty(shape, device="meta"))
        return
    except Exception as exc:
        problem = _first_line(exc)
    try:
        real = copy.deepcopy(model).to(device)
        real.train(mode == "train")
        with torch.no_grad():
            real(torch.zeros(shape, device=device))
        return
    except Exception as exc:
        problem = _first_line(exc) or problem
    minimum = models.MIN_INPUT_SIZE.get(name)
    hint = f" ({name} needs at least {minimum}x{minimum})" if minimum else ""
    raise BenchUsageError(
        f"input {tuple(shape)} does not fit model {name!r}{hint}: {problem}; change --image-size or --batch"
    )


def _param_count(module: nn.Module) -> int:
    """Trainable parameters, each shared tensor once (a CSG generator shared by all layers counts once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _layer_params(module: nn.Module) -> int:
    if hasattr(module, "param_count"):
        return int(module.param_count())
    return _param_count(module)


def _geometry(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Conv2d):
        return {
            "type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
        }
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return {"type": type(module).__name__}


def _geometry_text(g: dict[str, Any]) -> str:
    if g["type"] == "Conv2d":
        k, s = g["kernel_size"], g["stride"]
        kernel = f"{k[0]}" if k[0] == k[1] else f"{k[0]}x{k[1]}"
        stride = f"{s[0]}" if s[0] == s[1] else f"{s[0]}x{s[1]}"
        return f"conv {g['in_channels']}->{g['out_channels']} k{kernel} s{stride}"
    if g["type"] == "Linear":
        return f"linear {g['in_features']}->{g['out_features']}"
    return g["type"]


# ---------------------------------------------------------------------------------------------- timed steps
def _sync_fn(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _loss(out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is not None and out.dim() == 2 and out.shape[0] == labels.shape[0]:
        return F.cross_entropy(out.float(), labels)
    return out.float().square().mean()


def _model_step(model: nn.Module, x: torch.Tensor, mode: str, labels: torch.Tensor | None) -> Callable[[], Any]:
    """One end-to-end step of ``model`` on ``x``: see the module docstring for what each mode holds."""
    if mode == "inference":
        model.eval()

        def infer() -> Any:
            with torch.inference_mode():
                return model(x)

        return infer
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=TRAIN_LR)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model(x), labels).backward()
        opt.step()

    return train_step


def _layer_step(layer: nn.Module, x: torch.Tensor, mode: str, grad: torch.Tensor | None) -> Callable[[], Any]:
    """One call of ``layer`` alone on ``x``: inference forward, or forward and backward of ``grad``."""
    if mode == "inference":
        layer.eval()

        def infer() -> Any:
            with torch.inference_mode():
                return layer(x)

        return infer
    layer.train()
    xg = x.detach().clone().requires_grad_(True)

    def train_step() -> None:
        xg.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(xg)
        out.backward(grad if grad is not None and grad.shape == out.shape else torch.ones_like(out))

    return train_step


def _capture_inputs(model: nn.Module, x: torch.Tensor, names: list[str], mode: str) -> dict[str, torch.Tensor]:
    """The first input each named module of ``model`` receives in one forward on ``x`` (forward pre-hooks)."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in captured and args and isinstance(args[0], torch.Tensor):
                captured[name] = args[0].detach().clone()
        return hook

    hooks = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names if n in modules]
    saved = {n: b.clone() for n, b in model.named_buffers()}  # train-mode BatchNorm moves its running stats
    was_training = model.training
    try:
        model.train(mode == "train")
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    return captured


def _ratio(dense: dict[str, Any], method: dict[str, Any]) -> float:
    return dense["p50_s"] / method["p50_s"] if method["p50_s"] > 0 else math.inf


# ---------------------------------------------------------------------------------------------- the benchmark
class _Progress:
    """A tqdm bar over the timed cases whose total grows as each method's replaced layers become known."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="tritonslide bench", unit="case", file=sys.stderr, leave=False)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements that ``args`` (parsed by the parser of :func:`add_parser`) ask for; return the record.

    Raises :class:`BenchUsageError` for arguments that cannot work (unknown model, input too small, no CUDA, a
    dtype the dense model cannot run in) and :class:`MissingBenchDependency` when the bench extra is missing.
    """
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "is a build without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise BenchUsageError(f"--device cuda: CUDA is not available here (torch {torch.__version__} {why})")
    methods = args.methods if args.methods is not None else tritonslide.available_methods()
    dtype = DTYPES[args.dtype]
    require_bench_dependencies(plot=args.plot is not None)

    torch.manual_seed(args.seed)
    dense, source = load_model(args.model)
    shape = input_shape(dense, args.batch, args.image_size)
    _check_input_fits(dense, shape, args.mode, args.model, device)
    dense = dense.to(device)
    # Methods are applied to an fp32 copy (fitting a factorization wants fp32: CPU SVD has no half precision) and
    # the patched model is then cast; the dense model is cast the same way.
    master = copy.deepcopy(dense)
    dense = dense.to(dtype)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    sync = _sync_fn(device)

    try:
        with torch.no_grad():
            probe = dense.eval()(x)
    except Exception as exc:
        if dtype != torch.float32:
            raise BenchUsageError(
                f"--dtype {args.dtype}: model {args.model!r} does not run in {args.dtype} on {args.device}: "
                f"{_error_text(exc)}; use --dtype fp32"
            ) from None
        raise BenchError(f"model {args.model!r}: the dense forward failed: {_error_text(exc)}") from exc
    labels = None
    if isinstance(probe, torch.Tensor) and probe.dim() == 2:
        labels = torch.randint(probe.shape[1], (probe.shape[0],), generator=gen).to(device)
    del probe

    env = gpu_environment(device) if device.type == "cuda" else environment()
    record: dict[str, Any] = {
        "tool": "tritonslide bench",
        "environment": env,
        "arguments": {
            "model": args.model, "methods": methods, "batch": args.batch, "image_size": args.image_size,
            "mode": args.mode, "device": args.device, "dtype": args.dtype, "rounds": args.rounds,
            "warmup": args.warmup, "layers": args.layers, "seed": args.seed, "threads": getattr(args, "threads", None),
            "out": str(args.out), "plot": str(args.plot) if args.plot is not None else None,
        },
        "model": {"source": source, "class": type(dense).__name__, "input_shape": list(shape),
                  "params": _param_count(dense)},
        "definitions": {
            "timer": "pytest_benchmark.timers.default_timer, one step per round, pytest_benchmark.stats.Stats; "
                     "p20/p50/p80 linear-interpolation quantiles; seconds"
                     + ("; torch.cuda.synchronize before and after every round" if device.type == "cuda" else ""),
            "ratio": "dense p50_s / method p50_s of the same run: > 1 means the method is faster",
            "end_to_end": (
                "model.eval() and model(x) under torch.inference_mode()" if args.mode == "inference" else
                f"model.train(); zero_grad(set_to_none=True), forward, loss (cross-entropy vs fixed random labels "
                f"for (batch, classes) outputs, else mean square), backward, SGD(lr={TRAIN_LR}).step()"
            ),
            "per_layer": (
                "the replaced layer alone on the input the dense layer sees in the dense network, eval mode under "
                "torch.inference_mode()" if args.mode == "inference" else
                "the replaced layer alone on the input the dense layer sees in the dense network (requiring grad), "
                "train mode, forward and backward of a fixed random output gradient, no optimizer step"
            ),
            "inputs": "standard normal, seeded",
        },
        "dense": {},
        "methods": {},
    }

    progress = _Progress(1 + len(methods), enabled=not args.no_progress)
    dense_layers: dict[str, dict[str, Any]] = {}  # dense per-layer stats by name, shared by every method
    try:
        dense_e2e = time_calls(_model_step(dense, x, args.mode, labels), args.rounds, args.warmup, sync)
        record["dense"]["end_to_end"] = dense_e2e
        progress.step("dense")
        for method in methods:
            record["methods"][method] = _bench_method(
                method, args, master, dense, x, labels, dtype, sync, dense_e2e, dense_layers, progress
            )
            gc.collect()
    finally:
        progress.close()
    record["dense"]["layers"] = dense_layers
    return record


def _bench_method(
    method: str,
    args: argparse.Namespace,
    master: nn.Module,
    dense: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    dtype: torch.dtype,
    sync: Callable[[], None] | None,
    dense_e2e: dict[str, Any],
    dense_layers: dict[str, dict[str, Any]],
    progress: _Progress,
) -> dict[str, Any]:
    """Patch a copy of the dense model with ``method`` and time it end to end and layer by layer."""
    torch.manual_seed(args.seed)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patched = tritonslide.patch(copy.deepcopy(master), method).to(dtype)
    except Exception as exc:
        progress.step(method)
        return {"status": "error", "error": f"patch failed: {_error_text(exc)}"}
    replaced = [name for name, m in patched.named_modules() if name and is_tritonslide_layer(m)]
    config = next((m.config.to_dict() for n, m in patched.named_modules() if n in replaced), None)
    result: dict[str, Any] = {
        "status": "ok",
        "config": config,
        "replaced_layers": replaced,
        "params_dense": _param_count(dense),
        "params_method": _param_count(patched),
        "warnings": [str(w.message) for w in caught],
    }
    if not replaced:
        progress.step(method)
        result.update(status="not_applicable", error="the patch replaced no layer" + (
            ": " + "; ".join(result["warnings"]) if result["warnings"] else ""))
        return result

    tritonslide.reset_stats(patched)
    step = _model_step(patched, x, args.mode, labels)
    try:
        for _ in range(args.warmup):
            step()
        tritonslide.reset_stats(patched)  # the active fractions of the timed rounds only
        timed = time_calls(step, args.rounds, 0, sync)
    except Exception as exc:
        progress.step(method)
        result.update(status="error", error=f"{args.mode} step failed: {_error_text(exc)}")
        return result
    timed["warmup_rounds"] = args.warmup
    progress.step(method)
    active = {name: s.active_fraction for name, s in tritonslide.stats(patched).items()}
    result["end_to_end"] = {"dense": dense_e2e, "method": timed, "ratio": _ratio(dense_e2e, timed)}
    result["active_fraction"] = active or None
    result["active_fraction_mean"] = sum(active.values()) / len(active) if active else None
    if not args.layers:
        return result

    progress.add(2 * len(replaced))
    inputs = _capture_inputs(dense, x, replaced, args.mode)
    dense_modules, patched_modules = dict(dense.named_modules()), dict(patched.named_modules())
    rows = []
    for name in replaced:
        d_layer = dense_modules.get(name)
        row: dict[str, Any] = {
            "layer": name,
            "geometry": _geometry(d_layer) if d_layer is not None else None,
            "input_shape": list(inputs[name].shape) if name in inputs else None,
            "params_dense": _layer_params(d_layer) if d_layer is not None else None,
            "params_method": _layer_params(patched_modules[name]),
            "active_fraction": active.get(name),
        }
        if d_layer is None or name not in inputs:
            row["error"] = "the dense layer is not called in the model's forward" if d_layer is not None else (
                "no dense layer of that name")
            progress.step(f"{method} {name}")
            progress.step(f"{method} {name}")
            rows.append(row)
            continue
        xin = inputs[name]
        grad = None
        if args.mode == "train":
            with torch.no_grad():
                out = d_layer(xin)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(args.seed)).to(out)
            del out
        try:
            if name not in dense_layers:
                dense_layers[name] = time_calls(_layer_step(d_layer, xin, args.mode, grad), args.rounds,
                                                args.warmup, sync)
            progress.step(f"dense {name}")
            layer = copy.deepcopy(patched_modules[name])  # alone: no link to a neighbour's active set
            stats = time_calls(_layer_step(layer, xin, args.mode, grad), args.rounds, args.warmup, sync)
            progress.step(f"{method} {name}")
        except Exception as exc:
            row["error"] = _error_text(exc)
            progress.step(f"{method} {name}")
            rows.append(row)
            continue
        row.update(dense=dense_layers[name], method=stats, ratio=_ratio(dense_layers[name], stats))
        rows.append(row)
        del layer
    result["layers"] = rows
    return result


# ---------------------------------------------------------------------------------------------- reporting
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < left else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*r) for r in rows)])


def format_report(record: dict[str, Any]) -> str:
    """The end-to-end table (one row per method) and the per-layer table of a :func:`benchmark` record."""
    env, a = record["environment"], record["arguments"]
    threads = env.get("torch_threads")
    commit = env.get("git_commit") or f"tritonslide {env.get('tritonslide_version')}"
    lines = [
        f"{a['model']} ({record['model']['class']}), input {tuple(record['model']['input_shape'])}, {a['mode']}, "
        f"{a['device']} {a['dtype']}",
        f"{env['device']}, {threads} thread{'s' if threads != 1 else ''}, torch {env['torch_version']}, "
        f"triton {env.get('triton_version')}, {commit}",
        f"{a['rounds']} rounds after {a['warmup']} warmup; times are p50 in ms; ratio = dense p50 / method p50 "
        "(> 1: method faster)",
        "",
        "end to end",
    ]
    dense = record["dense"]["end_to_end"]
    rows: list[list[str]] = []
    problems: list[str] = []
    for method, r in record["methods"].items():
        if r["status"] != "ok":
            rows.append([method, _ms(dense["p50_s"]), "-", "n/a", "-", "-", "-", "-"])
            problems.append(f"{method}: {r['status'].replace('_', ' ')}: {r.get('error', '')}")
            continue
        m = r["end_to_end"]["method"]
        active = "" if r["active_fraction_mean"] is None else f"{r['active_fraction_mean']:.3f}"
        rows.append([method, _ms(dense["p50_s"]), _ms(m["p50_s"]), f"{r['end_to_end']['ratio']:.2f}x",
                     f"{r['params_dense']:,}", f"{r['params_method']:,}", active, str(len(r["replaced_layers"]))])
    lines.append(_table(["method", "dense ms", "method ms", "ratio", "params dense", "params method", "active",
                         "layers"], rows))
    lines += problems
    layer_rows: list[list[str]] = []
    problems = []
    for method, r in record["methods"].items():
        for row in r.get("layers", []):
            geometry = _geometry_text(row["geometry"]) if row.get("geometry") else "-"
            shape = "x".join(map(str, row["input_shape"])) if row.get("input_shape") else "-"
            active = "" if row.get("active_fraction") is None else f"{row['active_fraction']:.3f}"
            if "ratio" not in row:
                layer_rows.append([method, row["layer"], geometry, shape, "-", "-", "n/a", active])
                problems.append(f"{method} {row['layer']}: {row.get('error', '')}")
                continue
            layer_rows.append([method, row["layer"], geometry, shape, _ms(row["dense"]["p50_s"]),
                               _ms(row["method"]["p50_s"]), f"{row['ratio']:.2f}x", active])
    if layer_rows:
        lines += ["", "per layer (alone, on the input the dense layer sees in the network)"]
        table = _table(["method", "layer", "dense layer", "input", "dense ms", "method ms", "ratio", "active"],
                       layer_rows, left=4)
        lines += [table, *problems]
    busy = [v for v in _loads(record) if v is not None and v > 0.05]
    if busy:
        lines.append(f"\nnote: other processes used up to {max(busy):.0%} of the CPUs while timing; ratios may be off")
    notes = sorted({w for r in record["methods"].values() if r["status"] == "ok" for w in r.get("warnings", [])})
    lines += [f"warning: {w}" for w in notes]
    return "\n".join(lines)


def _loads(record: dict[str, Any]) -> list[float | None]:
    loads = [record["dense"]["end_to_end"].get("other_cpu_load")]
    for r in record["methods"].values():
        if "end_to_end" in r:
            loads.append(r["end_to_end"]["method"].get("other_cpu_load"))
        for row in r.get("layers", []):
            loads += [row[k].get("other_cpu_load") for k in ("dense", "method") if k in row]
    return loads


def plot(record: dict[str, Any], path: Path) -> None:
    """Bar charts of the ratios (log scale; bars grow from 1, as fast as dense: up = method faster): end to end
    per method, then per layer with one bar per method."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend is touched
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    methods = [m for m, r in record["methods"].items() if r["status"] == "ok"]
    layer_names = list(dict.fromkeys(row["layer"] for m in methods for row in record["methods"][m].get("layers", [])
                                     if "ratio" in row))
    n_axes = 2 if layer_names else 1
    fig = Figure(figsize=(max(6.0, 0.35 * len(layer_names) * max(1, len(methods)) + 2.0), 4.0 * n_axes),
                 layout="constrained")
    axes = fig.subplots(n_axes, 1, squeeze=False)[:, 0]
    colors = {m: f"C{i}" for i, m in enumerate(record["methods"])}
    a = record["arguments"]
    shown: list[float] = [1.0]

    def bars(ax, xs: list[float], ratios: list[float], width: float, **kw) -> None:
        ax.bar(xs, [r - 1.0 for r in ratios], width, bottom=1.0, **kw)
        shown.extend(ratios)

    ax = axes[0]
    ratios = [record["methods"][m]["end_to_end"]["ratio"] for m in methods]
    bars(ax, list(range(len(methods))), ratios, 0.6, color=[colors[m] for m in methods])
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2f}x", (i, r), ha="center", va="bottom" if r >= 1 else "top", fontsize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_title(f"{a['model']}, batch {a['batch']}, {a['image_size']}x{a['image_size']}, {a['mode']}, "
                 f"{a['device']} {a['dtype']}: end to end")
    if layer_names:
        ax = axes[1]
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            by_layer = {row["layer"]: row["ratio"] for row in record["methods"][m].get("layers", []) if "ratio" in row}
            xs = [i + (j - (len(methods) - 1) / 2) * width for i, n in enumerate(layer_names) if n in by_layer]
            bars(ax, xs, [by_layer[n] for n in layer_names if n in by_layer], width, label=m, color=colors[m])
        ax.set_xticks(range(len(layer_names)), layer_names, rotation=45, ha="right", fontsize=8)
        ax.set_title("per layer (alone)")
        ax.legend(fontsize=8)
    finite = [r for r in shown if r > 0 and math.isfinite(r)]
    low, high = min(finite) / 1.5, max(finite) * 1.5
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("dense p50 / method p50")
    fig.savefig(path, dpi=120)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    """NaN / inf (an active fraction before any call, a zero-time ratio) as null: strict JSON has neither."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _usage_error(args: argparse.Namespace, message: str) -> int:
    parser = getattr(args, "bench_parser", None)
    if parser is not None:
        parser.print_usage(sys.stderr)
    prog = parser.prog if parser is not None else "tritonslide bench"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _check_output_path(path: Path, option: str) -> str | None:
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        return f"{option} {str(path)!r}: directory {str(parent)!r} does not exist"
    if path.is_dir():
        return f"{option} {str(path)!r} is a directory"
    if not os.access(parent, os.W_OK):
        return f"{option} {str(path)!r}: directory {str(parent)!r} is not writable"
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``tritonslide bench`` for parsed ``args``: measure, print the tables, write the JSON (and the plot).

    Returns 0 on success; 2 for a usage error (unknown model, input too small, ``--device cuda`` without CUDA, a
    dtype the dense model cannot run in, an unwritable output path), printed argparse-style; 1 when the bench extra
    is missing, the dense model fails, or some method failed to run (its record then holds the error; the others
    are written as usual). A method that converts no layer of the model is reported as ``not_applicable``.
    """
    for path, option in ((args.out, "--out"), (args.plot, "--plot")):
        problem = _check_output_path(Path(path), option) if path is not None else None
        if problem:
            return _usage_error(args, problem)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        record = benchmark(args)
    except BenchUsageError as exc:
        return _usage_error(args, str(exc))
    except (MissingBenchDependency, BenchError) as exc:
        print(f"tritonslide bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.write_text(json.dumps(_finite(record), indent=1, default=_json_default) + "\n", encoding="utf-8")
    print(format_report(record), flush=True)
    print(f"\nwrote {out}", flush=True)
    if args.plot is not None:
        plot(record, Path(args.plot))
        print(f"wrote {args.plot}", flush=True)
    failed = [m for m, r in record["methods"].items() if r["status"] == "error"]
    if failed:
        print(f"tritonslide bench: {len(failed)} method(s) failed: {', '.join(failed)} (see the table and the JSON)",
              file=sys.stderr)
        return 1
    return 0

