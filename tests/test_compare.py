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
