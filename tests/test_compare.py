"""``tritonslide compare``'s framework: section selection, usage errors, report.md / results.json, a failing section.
(Each section's own figures are tested in tests/test_compare_<sections>.py.)"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from tritonslide import cli, compare
from tritonslide.compare import Context, Section


def test_parse_sections_keeps_report_order_and_names_bad_ones():
    assert compare.parse_sections(None) == list(compare.SECTIONS)
    assert compare.parse_sections("all") == list(compare.SECTIONS)
    assert compare.parse_sections("rankn,table51") == ["table51", "rankn"]
    with pytest.raises(compare.CompareUsageError, match="nope"):
        compare.parse_sections("table51,nope")


@pytest.mark.parametrize("argv, needle", [
    (["--sections", "nope"], "nope"),
    (["--device", "cuda"], "CUDA"),
])
def test_usage_errors_exit_2(argv, needle, capsys, tmp_path):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("CUDA present")
    assert cli.main(["compare", "--out", str(tmp_path / "r"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_quick_and_full_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--quick", "--full"])
    assert info.value.code == 2


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["compare", "--out", str(f), "--sections", "rankn"]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.fixture
def fake_sections(monkeypatch):
    """Two sections backed by an in-memory module: one that works (with a plot and a NaN figure), one that fails."""
    module = types.ModuleType("tritonslide.compare._fake")

    def run(ctx: Context) -> Section:
        if ctx.seed == 13:
            raise RuntimeError("boom")
        (ctx.out_dir / "fake.png").write_bytes(b"\x89PNG")
        return Section(markdown="| ours | paper |\n|---|---|\n| 1.5 | 1.61 |", rows=[{"ratio": 1.5, "nan": math.nan}],
                       paper=[{"source": "Table 5.1", "ratio": 1.61}], plots=["fake.png"], notes=["quick: scaled"])

    module.run = run
    monkeypatch.setitem(sys.modules, "tritonslide.compare._fake", module)
    monkeypatch.setattr(compare, "SECTIONS", {"fake": ("_fake", "A fake section")})
    return module


def test_report_and_results(fake_sections, tmp_path):
    ctx = Context(out_dir=tmp_path / "out", progress=False)
    results = compare.run_report(ctx, ["fake"])
    assert results["failed"] == {}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## A fake section" in report and "| 1.5 | 1.61 |" in report and "![fake](fake.png)" in report
    assert "quick" in report and "quick: scaled" in report
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    sec = data["sections"]["fake"]
    assert sec["rows"] == [{"ratio": 1.5, "nan": None}]  # JSON has no NaN
    assert sec["paper"][0]["ratio"] == 1.61 and sec["plots"] == ["fake.png"] and sec["seconds"] >= 0
    assert data["scale"] == "quick" and data["environment"]["torch_version"]


def test_a_failing_section_is_reported_and_exits_1(fake_sections, tmp_path, capsys):
    code = cli.main(["compare", "--out", str(tmp_path / "o"), "--seed", "13", "--no-progress"])
    assert code == 1
    assert "boom" in capsys.readouterr().err
    assert "This section failed" in (tmp_path / "o" / "report.md").read_text()
    assert json.loads((tmp_path / "o" / "results.json").read_text())["failed"] == {"fake": "RuntimeError: boom"}


def test_the_whole_quick_report_builds_through_the_cli(monkeypatch, tmp_path, capsys):
    """``tritonslide compare --quick`` end to end with every real section, each shrunk through its module's knobs
    (each section's figures are checked in its own test file): report.md holds every title, results.json rows
    and plots for each, and every plot file exists."""
    from tritonslide.compare import cnnslide, csg, methods, rankn, selection, sketching, table51

    monkeypatch.setattr(table51, "MODELS", {"alexnet": table51.MODELS["alexnet"]})
    monkeypatch.setattr(table51, "QUICK", table51.Scale(batch=1, size=63, rounds=1, warmup=0, threads=(1,)))
    monkeypatch.setattr(cnnslide, "QUICK", cnnslide.Scale(nets=("cnn3",), epochs=1, train_subset=16, test_subset=16,
                                                          batch_size=16))
    monkeypatch.setattr(csg, "QUICK", csg.Scale(epochs=1, net="cnn3", train_subset=16, test_subset=16,
                                                batch_size=16))
    monkeypatch.setattr(sketching, "TRAIN", {"quick": {"size": 8, "epochs": 1}, "full": {"size": 8, "epochs": 1}})
    monkeypatch.setitem(sketching.SETTINGS, "quick", {"ks": (4,), "pairs": (1,), "draws": 2, "batch": 16,
                                                      "mlp_epochs": 1})
    monkeypatch.setitem(rankn.SETTINGS, "quick", {"ranks": (1, 3), "error_batch": 16, "time_batch": 1, "time_hw": 8,
                                                  "blocks": 1, "rounds": 1, "model_images": 16, "model_batch": 16,
                                                  "model_blocks": 1, "model_rounds": 1})
    monkeypatch.setattr(methods, "QUICK", methods.Scale(net="demo_cnn_8x8", epochs=1))
    monkeypatch.setattr(selection, "QUICK", selection.Scale(nets=("cnn3",), epochs=1, train_subset=16, batch=1,
                                                            size=63, rounds=1, threads=1))
    monkeypatch.setattr(selection, "IMAGENET_MODELS", {"alexnet": selection.IMAGENET_MODELS["alexnet"]})
    out = tmp_path / "report"
    assert cli.main(["compare", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert data["failed"] == {} and list(data["sections"]) == list(compare.SECTIONS)
    for key, (_, title) in compare.SECTIONS.items():
        assert f"## {title}" in report
        section = data["sections"][key]
        assert section["rows"] and section["paper"] and section["plots"], key
        assert all((out / p).is_file() for p in section["plots"]), key
