"""Write the per-shape dispatch table of a GPU from its benchmark records (see ``tritonslide/_dispatch.py``).

    python -m bench.dispatch_table bench/results/<gpu>.json [--out tritonslide/dispatch/<gpu>.json]
    python -m bench.dispatch_table $TMPDIR/dry.json --include-dry --out $TMPDIR/dispatch.json  # tests the script

Every ``triton`` record of ``bench/test_active_conv2d_gpu.py`` whose ``ratio_vs["torch_best"]`` (torch p50 / Triton
p50) is below 1 becomes an entry choosing ``torch`` for its shape, dtype, pass and active fraction; where Triton
won, an entry choosing ``triton`` keeps the measurement on record. The file also records the device, versions and
commit of the measurement. Records of a dry run (``"scale": "dry"``: tiny shapes in Triton's interpreter on the CPU)
are not measurements and are skipped (``--include-dry`` takes them, to exercise this script without a GPU; it needs
``--out``, so that no package table is written from them); those of a quick run (``--bench-scale quick``: fewer
layers and rounds) are used, and each entry names the scale it came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tritonslide._dispatch import DISPATCH_DIR, gpu_slug


def measured(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The records that are measurements: all but those of dry runs."""
    return {name: rec for name, rec in records.items() if rec.get("scale") != "dry"}


def entries_from_records(records: dict[str, dict[str, Any]], include_dry: bool = False) -> list[dict[str, Any]]:
    entries = []
    for name, rec in sorted((records if include_dry else measured(records)).items()):
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
                        "benchmark": name, "scale": rec.get("scale", "full")})
    return entries


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--include-dry", action="store_true",
                        help="take the records of dry runs too (testing this script; needs --out)")
    args = parser.parse_args(argv)
    if args.include_dry and args.out is None:
        parser.error("--include-dry needs --out: a table from dry records must not land in tritonslide/dispatch/")
    records = json.loads(args.results.read_text(encoding="utf-8"))
    entries = entries_from_records(records, args.include_dry)
    if not entries:
        dry = len(records) - len(measured(records))
        skipped = f" ({dry} records of a dry run skipped: --bench-scale dry does not measure)" if dry else ""
        raise SystemExit(f"{args.results}: no active_conv2d Triton records with a torch_best ratio{skipped}")
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
