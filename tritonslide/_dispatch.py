"""Per-shape choice between a Triton kernel and the PyTorch path on a GPU, decided by measurement.

The ``auto`` backend runs the Triton kernel of an op on CUDA tensors unless the measured table of this GPU says the
PyTorch path (cuDNN on the gathered operands) was faster for that shape: then the op runs that path, so a layer is
never slower than the best path measured. Tables are package data, ``tritonslide/dispatch/<gpu>.json`` (``<gpu>``:
the device name, lower case, non-alphanumerics as ``-``), written from the GPU benchmark records by
``python -m bench.dispatch_table bench/results/<gpu>.json`` together with the device, versions and commit of the
measurement. A GPU without a table runs the kernels everywhere. A forced backend (``use_backend``) ignores tables.

Entry key of ``active_conv2d``: dtype, input shape, weight shape, stride, padding, dilation and pass (``forward``
when no gradient will be taken, else ``forward+backward``); among the measured active fractions of that key the
nearest one (in ratio) to the call's fraction of active output filters decides.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import torch

DISPATCH_DIR = Path(__file__).resolve().parent / "dispatch"


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def conv_key(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, backward: bool) -> str:
    dtype = str(x.dtype).replace("torch.", "")
    return "|".join((
        dtype, "x".join(map(str, x.shape)), "x".join(map(str, weight.shape)), f"s{stride[0]},{stride[1]}",
        f"p{padding[0]},{padding[1]}", f"d{dilation[0]},{dilation[1]}", "forward+backward" if backward else "forward",
    ))


@lru_cache(maxsize=None)
def load_table(path: Path) -> dict[str, dict[str, list[tuple[float, str]]]]:
    """``{op: {key: [(fraction, backend), ...]}}`` of one table file; empty when the file does not exist."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    table: dict[str, dict[str, list[tuple[float, str]]]] = {}
    for entry in data.get("entries", []):
        table.setdefault(entry["op"], {}).setdefault(entry["key"], []).append(
            (float(entry["fraction"]), entry["backend"])
        )
    return table


def has_measurements(op: str, device: torch.device) -> bool:
    """Whether this GPU's table has entries for ``op`` (callers skip building a key when not)."""
    return device.type == "cuda" and op in _table_of_gpu(torch.cuda.get_device_name(device))


def measured_backend(op: str, device: torch.device, key: str, fraction: float) -> str | None:
    """The backend measured fastest for ``op`` at ``key`` on this GPU (nearest measured fraction), or None."""
    if device.type != "cuda":
        return None
    return lookup(_table_of_gpu(torch.cuda.get_device_name(device)), op, key, fraction)


@lru_cache(maxsize=None)
def _table_of_gpu(name: str) -> dict:
    return load_table(DISPATCH_DIR / f"{gpu_slug(name)}.json")


def lookup(table: dict, op: str, key: str, fraction: float) -> str | None:
    rows = table.get(op, {}).get(key)
    if not rows:
        return None
    fraction = max(fraction, 1e-6)
    return min(rows, key=lambda row: abs(math.log(row[0] / fraction)))[1]
