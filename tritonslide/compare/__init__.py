"""``tritonslide compare``: the papers' experiments rerun offline on this machine, beside the papers' own figures.

Each section is a module of this package with a ``run(ctx: Context) -> Section`` function. A section reproduces one
claim of one paper in ``shared/papers/`` at a scale this machine can run (``--quick``: minutes on a 2-core CPU for the
whole report; ``--full``: the papers' scale where it is feasible), and returns its figures as rows, its markdown
(tables with the paper's figures in their own columns beside ours, and what differs in the setting) and its plots
(PNG files written into ``ctx.out_dir``). :func:`run_report` runs the chosen sections and writes ``report.md`` and
``results.json`` (every figure, the environment, the commit).

Sections (``SECTIONS``, in report order):

* ``table51``: Feeney (2019) Table 5.1, AlexNet / VGG-11 forward time per batch, dense vs ALSH (paper 001);
* ``cnnslide``: CNN-SLIDE Fig. 3/4, vanilla / LSH / sketch / LSH+sketch training time and accuracy (paper 000);
* ``csg``: associative convolution Table 1, ResNet-56 parameters dense vs CSG, and a CSG model trained (paper 003);
* ``sketching``: tensor sketching, output error against k and l with Theorem 3.1/3.2's bound (paper 004);
* ``rankn``: Rank-N, error and time against rank 1..5 for both schemes (paper 002);
* ``methods``: every method on one trained network: accuracy after conversion and fine-tuning, cost, step time;
* ``selection``: per-sample vs per-batch ALSH active sets, accuracy, active fraction and time (issue #15).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# key -> (module in this package, one-line description); the report follows this order
SECTIONS: dict[str, tuple[str, str]] = {
    "table51": ("table51", "Feeney 2019, Table 5.1: AlexNet / VGG-11 forward time, dense vs ALSH"),
    "cnnslide": ("cnnslide", "CNN-SLIDE, Fig. 3/4: vanilla, LSH, sketch, LSH+sketch on three CNNs"),
    "csg": ("csg", "Associative convolution, Table 1: ResNet-56 parameters, CSG trained"),
    "sketching": ("sketching", "Tensor sketching: output error against k and l, Theorems 3.1/3.2"),
    "rankn": ("rankn", "Rank-N: error and time against rank, both schemes"),
    "methods": ("methods", "Every method on one trained network"),
    "selection": ("selection", "Per-sample vs per-batch ALSH active sets (no paper: beyond the anchors)"),
}
SCALES = ("quick", "full")


@dataclass(frozen=True)
class Context:
    """What every section gets. ``scale``: ``"quick"`` (the whole report within ~3 minutes on a 2-core CPU: small
    inputs, few epochs; each section states how it scaled the paper's setting down) or ``"full"`` (the papers'
    settings where this machine can run them). ``out_dir``: where the section writes its plots. ``device``: where
    models run (``cuda`` runs the Triton kernels through the ``auto`` backend). ``seed``: every random choice
    (weights, data split, batch order, hashes) derives from it. ``progress``: show tqdm bars."""

    scale: str = "quick"
    device: torch.device = torch.device("cpu")
    out_dir: Path = Path(".")
    seed: int = 0
    progress: bool = True

    @property
    def quick(self) -> bool:
        return self.scale == "quick"


@dataclass
class Section:
    """One section of the report.

    ``markdown``: the section's body (no title line: the report adds ``## title``): tables with the paper's figures
    in their own columns beside ours, then what differs from the paper's setting and why the numbers may differ.
    ``rows``: every figure as flat dicts (JSON-able: numbers, strings, None), the same figures as the tables.
    ``paper``: the paper's figures this section is compared with (as dicts, with their source: table / figure).
    ``plots``: file names (relative to the output folder) of the PNGs the section wrote. ``notes``: short remarks
    (e.g. "quick: batch 8 instead of 64"). ``key``/``title`` are filled by the runner."""

    markdown: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    paper: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    key: str = ""
    title: str = ""
    seconds: float = 0.0


class CompareUsageError(ValueError):
    """A bad argument of ``tritonslide compare`` (exit code 2)."""


def parse_sections(text: str | None) -> list[str]:
    """``"table51,rankn"`` -> ``["table51", "rankn"]`` (report order); None or ``"all"`` -> every section."""
    if text is None or text.strip() == "all":
        return list(SECTIONS)
    asked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in asked if t not in SECTIONS]
    if unknown or not asked:
        raise CompareUsageError(f"unknown section(s) {', '.join(unknown) or repr(text)}; expected a comma-separated "
                                f"subset of {', '.join(SECTIONS)} (or all)")
    return [k for k in SECTIONS if k in asked]


def run_section(key: str, ctx: Context) -> Section:
    module = importlib.import_module(f"{__name__}.{SECTIONS[key][0]}")
    start = time.perf_counter()
    section = module.run(ctx)
    section.seconds = time.perf_counter() - start
    section.key, section.title = key, SECTIONS[key][1]
    return section


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: they become None (and tuples lists, tensors numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_report(ctx: Context, sections: list[str]) -> dict[str, Any]:
    """Run ``sections`` (keys of :data:`SECTIONS`) and write ``report.md`` and ``results.json`` into
    ``ctx.out_dir``; returns the results dict. A section that raises is recorded with its error and the report
    goes on (its markdown says it failed); the caller decides the exit code from ``results["failed"]``."""
    from tritonslide._benchtools import environment

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    if ctx.device.type == "cuda":
        from tritonslide._benchtools import gpu_environment

        env = gpu_environment()
    done: list[Section] = []
    failed: dict[str, str] = {}
    start = time.perf_counter()
    for key in sections:
        try:
            done.append(run_section(key, ctx))
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others' figures
            failed[key] = f"{type(exc).__name__}: {exc}"
            done.append(Section(markdown=f"**This section failed:** `{failed[key]}`", key=key,
                                title=SECTIONS[key][1]))
    results = {
        "scale": ctx.scale, "device": str(ctx.device), "seed": ctx.seed, "environment": env,
        "seconds": time.perf_counter() - start, "failed": failed,
        "sections": {s.key: {k: v for k, v in dataclasses.asdict(s).items() if k not in ("key", "markdown")}
                     for s in done},
    }
    (ctx.out_dir / "results.json").write_text(json.dumps(_finite(results), indent=1) + "\n", encoding="utf-8")
    (ctx.out_dir / "report.md").write_text(report_markdown(ctx, env, done, results["seconds"]), encoding="utf-8")
    return results


def report_markdown(ctx: Context, env: dict[str, Any], sections: list[Section], seconds: float) -> str:
    scale = ("quick (scaled down: each section says how; `--full` for the papers' settings)" if ctx.quick
             else "full (the papers' settings where this machine can run them)")
    lines = [
        "# tritonslide compare: the papers' experiments on this machine",
        "",
        f"- device: {env.get('device')}, {env.get('torch_threads')} torch thread(s); torch {env.get('torch_version')}, "
        f"tritonslide {env.get('tritonslide_version')}, commit {env.get('git_commit')}",
        f"- scale: {scale}; seed {ctx.seed}; {seconds:.0f} s in all; {env.get('timestamp')}",
        "- paper figures are quoted from `shared/papers/` in their own columns; ours were measured by this run, with"
        " the baseline in the same process",
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", "", s.markdown.strip(), ""]
        lines += [f"![{s.key}]({p})" for p in s.plots]
        if s.plots:
            lines.append("")
        if s.notes:
            lines += [f"- {n}" for n in s.notes] + [""]
        lines += [f"*{s.seconds:.1f} s*", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- command line
def add_parser(commands) -> Any:
    """Register ``compare`` on the ``tritonslide`` command's subparsers."""
    p = commands.add_parser(
        "compare",
        help="rerun the papers' experiments on this machine and write a report beside the papers' figures",
        description="Rerun the experiments of the five papers behind tritonslide (shared/papers/) on this machine and "
        "write DIR/report.md (tables with the papers' figures beside ours), DIR/results.json and PNG plots. "
        "--quick (default) scales them down to a few minutes on a laptop CPU; --full runs the papers' settings.",
    )
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="minutes on a 2-core CPU; every section says how it scaled down (default)")
    scale.add_argument("--full", dest="scale", action="store_const", const="full", help="the papers' settings")
    p.set_defaults(scale="quick")
    p.add_argument("--sections", default="all",
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (default all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models run (default cpu)")
    p.add_argument("--out", default="compare-report", help="output folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    """The ``compare`` command; returns the exit code (2: usage error, 1: a section failed)."""
    import sys

    from tritonslide.compare._common import require_dependencies

    def usage(message: str) -> int:
        print(f"tritonslide compare: error: {message}", file=sys.stderr)
        return 2

    try:
        sections = parse_sections(args.sections)
    except CompareUsageError as exc:
        return usage(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        return usage("--device cuda needs CUDA (torch.cuda.is_available() is False)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return usage(f"--out {out} exists and is not a folder")
    try:
        require_dependencies()
    except ImportError as exc:
        print(f"tritonslide compare: error: {exc}", file=sys.stderr)
        return 1
    ctx = Context(scale=args.scale, device=torch.device(args.device), out_dir=out, seed=args.seed,
                  progress=not args.no_progress)
    results = run_report(ctx, sections)
    print((out / "report.md").read_text(encoding="utf-8"))
    plots = sum(len(s["plots"]) for s in results["sections"].values())
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and {plots} plot(s) in {results['seconds']:.0f} s")
    for key, error in results["failed"].items():
        print(f"tritonslide compare: section {key} failed: {error}", file=sys.stderr)
    return 1 if results["failed"] else 0
