"""``tritonslide demo``: the dense-vs-ALSH run of CNN-SLIDE sec. 5 (shared/papers/000_619cf88339ee9234.txt) on
scikit-learn's digits, through ``run_demo`` and through the command line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import tritonslide
from tritonslide import cli, demo

needs_demo_extras = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("tqdm") is None,
    reason="needs pip install 'tritonslide[demo]'",
)


@pytest.fixture(scope="module")
def one_epoch_rows() -> list[dict]:
    return demo.run_demo(epochs=1, progress=False)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # the installed package (the editable install maps kernels/ and cpu_fallback/ into it), not a PYTHONPATH copy
    return subprocess.run([sys.executable, "-m", "tritonslide", *args], capture_output=True, text=True, timeout=120)


def test_three_layer_cnn_patches_conv2_and_conv3_and_links_them():
    model = demo.three_layer_cnn()
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    tritonslide.patch(model, tritonslide.ALSHConfig(rebuild_every=3))
    assert isinstance(model.conv1, torch.nn.Conv2d)  # the first conv stays dense (CNN-SLIDE sec. 5, thesis)
    assert isinstance(model.conv2, tritonslide.nn.ALSHConv2d)
    assert isinstance(model.conv3, tritonslide.nn.ALSHConv2d)
    assert tritonslide.link_active_sets(model) == [("conv2", "conv3")]


@needs_demo_extras
def test_digits_split_is_stratified_and_standardized():
    data = demo.load_digits_split(seed=0)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_test.shape[1:] == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert abs(len(data.y_test) / 1797 - 0.25) < 0.01
    # stratified: every class keeps its share of the test set within one image
    train_counts, test_counts = torch.bincount(data.y_train), torch.bincount(data.y_test)
    assert torch.all((test_counts - (train_counts + test_counts) * len(data.y_test) / 1797).abs() <= 1)
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-4
    same = demo.load_digits_split(seed=0)
    assert torch.equal(same.x_test, data.x_test) and torch.equal(same.y_train, data.y_train)


@needs_demo_extras
def test_run_demo_one_epoch_learns_and_reports_active_fractions(one_epoch_rows):
    rows = {row["method"]: row for row in one_epoch_rows}
    assert list(rows) == ["dense", "alsh", "sketch", "milf", "lowrank", "csg"]
    n_train_steps = -(-1347 // 64)
    for row in rows.values():
        assert row["steps"] == n_train_steps
        assert row["step_ms"] > 0 and row["step_ms_median"] > 0
    assert rows["dense"]["step_ratio"] == 1.0
    # chance is 10%. Measured with seed 0 after one epoch: dense 74%, ALSH 50% (33-53% over seeds 0-3).
    assert rows["dense"]["accuracy"] > 0.5
    assert rows["alsh"]["accuracy"] > 0.25
    # every method learns in one epoch (chance 10%)
    assert all(rows[m]["accuracy"] > 0.2 for m in ("sketch", "milf", "lowrank", "csg")), rows
    # sketching and Rank-N shrink conv2/conv3; CSG's shared 294,912-number generator outweighs these tiny layers
    assert rows["sketch"]["params"] < rows["dense"]["params"] and rows["lowrank"]["params"] < rows["sketch"]["params"]
    assert rows["csg"]["params"] > rows["dense"]["params"] == rows["alsh"]["params"]
    for method in ("dense", "sketch", "lowrank", "csg"):
        assert rows[method]["active_train"] == {} and rows[method]["active_eval"] == {}
    for method in ("alsh", "milf"):
        for key in ("active_train", "active_eval"):
            fractions = rows[method][key]
            assert set(fractions) == {"conv2", "conv3"}
            assert all(0.0 < f <= 1.0 for f in fractions.values()), fractions


@needs_demo_extras
def test_format_table_has_a_row_per_variant_and_dashes_for_dense(one_epoch_rows):
    table = demo.format_table(one_epoch_rows)
    lines = table.splitlines()
    assert "conv2 active train/eval" in lines[0] and "conv3 active train/eval" in lines[0]
    dense_line = next(line for line in lines if line.startswith("dense"))
    alsh_line = next(line for line in lines if line.startswith("alsh"))
    assert dense_line.split()[-2:] == ["-", "-"]
    assert "-" not in alsh_line.split()[-6:]


def test_run_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        demo.run_demo(epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        demo.run_demo(batch_size=0, progress=False)


@needs_demo_extras
def test_cli_demo_one_epoch_prints_the_table():
    proc = _run_cli("demo", "--epochs", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "method" in out and "test acc %" in out
    assert any(line.startswith("dense") for line in out.splitlines())
    assert any(line.startswith("alsh") for line in out.splitlines())
    assert "step-time ratio alsh/dense" in out
    assert "step/s" not in proc.stderr  # --no-progress: no tqdm bar


def test_cli_without_command_prints_help_and_exits_2():
    proc = _run_cli()
    assert proc.returncode == 2
    assert "usage: tritonslide" in proc.stderr and "demo" in proc.stderr


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"tritonslide {tritonslide.__version__}"


def test_cli_demo_without_demo_extras_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    assert cli.main(["demo", "--epochs", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "pip install 'tritonslide[demo]'" in err
