"""Write the per-shape dispatch table of a GPU from its benchmark records (see ``tritonslide/_dispatch.py``).

    python -m bench.dispatch_table bench/results/<gpu>.json [--out tritonslide/dispatch/<gpu>.json]

Every ``triton`` record of ``bench/test_active_conv2d_gpu.py`` whose ``ratio_vs["torch_best"]`` (torch p50 / Triton
p50) is below 1 becomes an entry choosing ``torch`` for its shape, dtype, pass and active fraction; where Triton
won, an entry choosing ``triton`` keeps the measurement on record. The file also records the device, versions and
commit of the measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tritonslide._dispatch import DISPATCH_DIR, gpu_slug


def entries_from_records(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    entries = []
    for name, rec in sorted(records.items()):
        if rec.get("op") != "active_conv2d" or rec.get("variant") != "triton" or "torch_best" not in rec.get(
            "ratio_vs", {}
        ):
            continue
        if rec.get("memory_format", "nchw") != "nchw":
            continue
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[rec["dtype"]]
        stride, padding, dilation = rec["stride"], rec["padding"], rec["dilation"]
        key = "|".join((
            dtype, "x".join(map(str, rec["shape"])), "x".join(map(str, rec["weight_shape"])),
            f"s{stride[0]},{stride[1]}", f"p{padding[0]},{padding[1]}", f"d{dilation[0]},{dilation[1]}", rec["pass"],
        ))
        ratio = rec["ratio_vs"]["torch_best"]
        entries.append({"op": "active_conv2d", "key": key, "fraction": rec["fraction"],
                        "backend": "triton" if ratio >= 1.0 else "torch", "triton_over_torch_speed": ratio,
                        "benchmark": name})
    return entries


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    records = json.loads(args.results.read_text(encoding="utf-8"))
    entries = entries_from_records(records)
    if not entries:
        raise SystemExit(f"{args.results}: no active_conv2d Triton records with a torch_best ratio")
    first = next(records[e["benchmark"]] for e in entries)
    device = first["device"].removeprefix("cuda: ")
    out = args.out or DISPATCH_DIR / f"{gpu_slug(device)}.json"
    meta = {k: first.get(k) for k in ("device", "torch_version", "triton_version", "cuda_version", "git_commit",
                                      "timestamp")}
    out.write_text(json.dumps({**meta, "entries": entries}, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: {sum(e['backend'] == 'torch' for e in entries)} of {len(entries)} shapes run the torch path")
    return out


if __name__ == "__main__":
    main()
