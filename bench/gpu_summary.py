"""Markdown summary of a GPU benchmark results file (``bench/results/<gpu>.json``): the end of ``bench/gpu_check.sh``.

    python -m bench.gpu_summary bench/results/<gpu>.json

One row per timed record that names baselines (``compare_to``): its group and variant, p50, and the ratios
``baseline p50 / p50`` (> 1: faster than that baseline) that ``bench/conftest.py`` stored, plus the memory-floor
ratio where the record has one (p50 / time to read the inputs once: 1 is the floor). Records from a dry run
(``scale == "dry"``: CPU, interpreter, tiny shapes) are labelled as such: they are no measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summary_rows(records: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, rec in sorted(records.items(), key=lambda kv: (kv[1].get("group", ""), kv[0])):
        if "p50_s" not in rec or not rec.get("compare_to"):
            continue
        ratios = ", ".join(f"{v:.2f}x vs {k}" for k, v in sorted(rec.get("ratio_vs", {}).items()))
        floor = rec.get("floor_ratio")
        rows.append([
            rec.get("group", name), rec.get("variant", ""), rec.get("dtype", ""), f"{rec['p50_s'] * 1e3:.3f}",
            ratios or "(baseline missing)", "" if floor is None else f"{floor:.2f}",
            rec.get("scale", "full"),
        ])
    return rows


def markdown(records: dict[str, dict[str, Any]]) -> str:
    header = ["group", "variant", "dtype", "p50 ms", "speed vs baselines", "p50 / memory floor", "scale"]
    rows = summary_rows(records)
    if not rows:
        return "no benchmark records with baselines in this file"
    first = next(iter(records.values()))
    head = (f"{first.get('device', '?')}, torch {first.get('torch_version', '?')}, Triton "
            f"{first.get('triton_version', '?')}, commit {first.get('git_commit', '?')}")
    if any(r[-1] == "dry" for r in rows):
        head += " (DRY RUN: CPU interpreter, tiny shapes; not a measurement)"
    lines = [head, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.results.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
