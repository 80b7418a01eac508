"""``tritonslide bench`` (tritonslide/benchmark.py): the JSON record, the ratios, the plot and the usage errors.

Small on purpose: the 3-layer digits CNN of ``tritonslide demo`` at 8x8, batch 2, one or two rounds. Nothing here
asserts a time: only that every number the record holds is the one its own statistics give.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

import tritonslide
from tritonslide import benchmark
from tritonslide._benchtools import quantiles

needs_bench_extras = pytest.mark.skipif(
    importlib.util.find_spec("pytest_benchmark") is None or importlib.util.find_spec("tqdm") is None,
    reason="needs pip install 'tritonslide[bench]'",
)
has_matplotlib = importlib.util.find_spec("matplotlib") is not None

SMALL = ["--model", "digits_cnn", "--image-size", "8", "--batch", "2", "--rounds", "2", "--warmup", "1",
         "--no-progress"]
STAT_KEYS = {"rounds", "warmup_rounds", "min_s", "max_s", "mean_s", "stddev_s", "median_s", "iqr_s", "ops",
             "p20_s", "p50_s", "p80_s", "data_s", "other_cpu_load"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonslide")
    benchmark.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(["bench", *argv])
    return benchmark.run(args)


def _check_stats(stats: dict, rounds: int) -> None:
    assert STAT_KEYS <= set(stats)
    data = stats["data_s"]
    assert stats["rounds"] == len(data) == rounds
    assert stats["min_s"] == min(data) and stats["max_s"] == max(data)
    assert stats["median_s"] == pytest.approx(statistics.median(data), rel=1e-12)
    assert [stats["p20_s"], stats["p50_s"], stats["p80_s"]] == pytest.approx(quantiles(data), rel=1e-12)
    assert stats["min_s"] <= stats["p20_s"] <= stats["p50_s"] <= stats["p80_s"] <= stats["max_s"]
    assert stats["ops"] == pytest.approx(len(data) / sum(data), rel=1e-12)


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory) -> tuple[dict, str, Path | None]:
    """Every method (the default), inference, per layer on, plot when matplotlib is there: run once."""
    out_dir = tmp_path_factory.mktemp("bench")
    out, png = out_dir / "results.json", out_dir / "bench.png"
    argv = [*SMALL, "--out", str(out)] + (["--plot", str(png)] if has_matplotlib else [])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = _run(*argv)
    assert rc == 0, stdout.getvalue()
    return json.loads(out.read_text(encoding="utf-8")), stdout.getvalue(), png if has_matplotlib else None


@needs_bench_extras
def test_record_holds_every_method_end_to_end_with_ratio_from_its_own_stats(inference_run):
    record, _, _ = inference_run
    assert record["arguments"]["methods"] == tritonslide.available_methods()
    assert set(record["methods"]) == set(tritonslide.available_methods())
    assert record["model"]["input_shape"] == [2, 1, 8, 8]
    dense = record["dense"]["end_to_end"]
    _check_stats(dense, rounds=2)
    for method, r in record["methods"].items():
        assert r["status"] == "ok", (method, r.get("error"))
        e2e = r["end_to_end"]
        assert e2e["dense"] == dense  # one dense baseline, measured in the same run
        _check_stats(e2e["method"], rounds=2)
        assert e2e["ratio"] == pytest.approx(e2e["dense"]["p50_s"] / e2e["method"]["p50_s"], rel=1e-12)
        assert r["params_dense"] == sum(p.numel() for p in tritonslide.demo.three_layer_cnn().parameters())
        assert r["replaced_layers"] == ["conv2", "conv3"]  # the first conv stays dense; fc is too small to sketch
    assert record["methods"]["alsh"]["params_method"] == record["methods"]["alsh"]["params_dense"]  # same weights
    assert record["methods"]["lowrank"]["params_method"] < record["methods"]["lowrank"]["params_dense"]


@needs_bench_extras
def test_record_holds_per_layer_rows_with_geometry_input_shape_and_ratio(inference_run):
    record, _, _ = inference_run
    shapes = {"conv2": [2, 32, 8, 8], "conv3": [2, 64, 4, 4]}  # after conv1 / after the first 2x2 max-pool
    for method, r in record["methods"].items():
        rows = {row["layer"]: row for row in r["layers"]}
        assert set(rows) == set(r["replaced_layers"])
        for name, row in rows.items():
            assert row["input_shape"] == shapes[name]
            geometry = row["geometry"]
            assert geometry["type"] == "Conv2d" and geometry["kernel_size"] == [3, 3]
            assert geometry["in_channels"] == shapes[name][1] and geometry["out_channels"] == 64
            _check_stats(row["dense"], rounds=2)
            _check_stats(row["method"], rounds=2)
            assert row["dense"] == record["dense"]["layers"][name]
            assert row["ratio"] == pytest.approx(row["dense"]["p50_s"] / row["method"]["p50_s"], rel=1e-12)
            if method in ("alsh", "milf"):
                assert 0.0 < row["active_fraction"] <= 1.0
                assert row["active_fraction"] == r["active_fraction"][name]
            else:
                assert row["active_fraction"] is None
    for method in ("alsh", "milf"):
        fractions = record["methods"][method]["active_fraction"]
        mean = record["methods"][method]["active_fraction_mean"]
        assert mean == pytest.approx(sum(fractions.values()) / len(fractions))
    assert record["methods"]["sketch"]["active_fraction"] is None


@needs_bench_extras
def test_record_holds_environment_and_arguments(inference_run):
    record, _, _ = inference_run
    env = record["environment"]
    for key in ("device", "cpu_model", "torch_threads", "torch_version", "triton_version", "python_version",
                "tritonslide_version", "git_commit", "timestamp"):
        assert key in env
    assert env["device"].startswith("cpu: ") and env["torch_version"] == torch.__version__
    assert env["tritonslide_version"] == tritonslide.__version__
    args = record["arguments"]
    assert (args["model"], args["batch"], args["image_size"], args["mode"], args["device"], args["dtype"]) == (
        "digits_cnn", 2, 8, "inference", "cpu", "fp32")
    assert (args["rounds"], args["warmup"], args["layers"]) == (2, 1, True)
    assert "ratio" in record["definitions"] and "end_to_end" in record["definitions"]


@needs_bench_extras
def test_printed_tables_name_every_method_and_layer(inference_run):
    record, text, _ = inference_run
    assert "end to end" in text and "per layer" in text
    for method, r in record["methods"].items():
        assert f"{r['end_to_end']['ratio']:.2f}x" in text
        assert method in text
    assert "conv 32->64 k3 s1" in text and "2x32x8x8" in text


@needs_bench_extras
@pytest.mark.skipif(not has_matplotlib, reason="needs matplotlib (pip install 'tritonslide[bench]')")
def test_plot_is_written(inference_run):
    _, _, png = inference_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_bench_extras
def test_train_mode_times_the_step_and_the_layers(tmp_path):
    out = tmp_path / "train.json"
    argv = [*SMALL, "--mode", "train", "--methods", "alsh,lowrank", "--rounds", "1", "--out", str(out)]
    assert _run(*argv) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert list(record["methods"]) == ["alsh", "lowrank"]
    assert "SGD" in record["definitions"]["end_to_end"] and "backward" in record["definitions"]["per_layer"]
    for r in record["methods"].values():
        assert r["end_to_end"]["ratio"] == pytest.approx(
            r["end_to_end"]["dense"]["p50_s"] / r["end_to_end"]["method"]["p50_s"], rel=1e-12)
        assert [row["layer"] for row in r["layers"]] == ["conv2", "conv3"]
        assert all(math.isfinite(row["ratio"]) for row in r["layers"])


@needs_bench_extras
def test_user_model_by_module_attr(tmp_path, monkeypatch):
    (tmp_path / "bench_user_model.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),\n"
        "                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5))\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "user.json"
    argv = ["--model", "bench_user_model:build", "--methods", "alsh,sketch", "--image-size", "6", "--batch", "3",
            "--rounds", "1", "--warmup", "0", "--no-layers", "--no-progress", "--out", str(out)]
    assert _run(*argv) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["model"]["input_shape"] == [3, 2, 6, 6]  # channels from the first convolution
    alsh, sketch = record["methods"]["alsh"], record["methods"]["sketch"]
    assert alsh["status"] == "ok" and alsh["replaced_layers"] == ["2"]
    assert "layers" not in alsh and record["dense"]["layers"] == {}
    # layers this small would grow under sketching, so patch keeps them dense: reported, not an error
    assert sketch["status"] == "not_applicable" and "left dense" in sketch["error"]


@needs_bench_extras
def test_model_that_cannot_run_on_meta_is_checked_by_a_real_forward(tmp_path, monkeypatch):
    (tmp_path / "bench_host_model.py").write_text(
        "from torch import nn\n"
        "class HostRead(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))\n"
        "    def forward(self, x):\n"
        "        assert x.abs().sum().item() >= 0  # a host read: impossible on the meta device\n"
        "        return self.body(x)\n"
        "model = HostRead()\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "host.json"
    argv = ["--model", "bench_host_model:model", "--methods", "alsh", "--image-size", "5", "--batch", "2",
            "--rounds", "1", "--warmup", "0", "--no-progress", "--out", str(out)]
    assert _run(*argv) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["methods"]["alsh"]["replaced_layers"] == ["body.2"]
    assert record["methods"]["alsh"]["layers"][0]["input_shape"] == [2, 8, 5, 5]


@needs_bench_extras
def test_half_precision_on_cpu_runs_or_names_the_dtype(tmp_path, capsys):
    out = tmp_path / "bf16.json"
    rc = _run(*SMALL, "--dtype", "bf16", "--methods", "sketch", "--rounds", "1", "--no-layers", "--out", str(out))
    if rc == 0:
        assert json.loads(out.read_text(encoding="utf-8"))["arguments"]["dtype"] == "bf16"
    else:
        assert rc == 2 and "bf16" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--methods", "alsh,nosuch"], "'nosuch'"),
        (["--methods", ","], "no method"),
        (["--batch", "0"], "--batch"),
        (["--image-size", "-3"], "--image-size"),
        (["--rounds", "x"], "--rounds"),
        (["--mode", "eval"], "--mode"),
        (["--dtype", "fp8"], "--dtype"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, problem, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["bench", "--model", "digits_cnn", "--out", str(tmp_path / "r.json"), *argv])
    assert exc.value.code == 2
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
        (["--model", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["--model", "tritonslide.models:no_such_attr"], "has no attribute 'no_such_attr'"),
        (["--model", "tritonslide:__version__"], "neither an nn.Module nor a callable"),
        (["--model", "digits_cnn", "--image-size", "4"], "does not fit model 'digits_cnn'"),
        (["--model", "resnet56", "--image-size", "1", "--batch", "1", "--mode", "train"], "does not fit"),
    ],
)
def test_bad_model_or_size_exits_2_naming_the_problem(argv, problem, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert _run(*argv, "--rounds", "1", "--no-progress", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert problem in err and "usage:" in err
    assert not out.exists()


def test_output_in_missing_directory_exits_2(capsys, tmp_path):
    assert _run(*SMALL, "--out", str(tmp_path / "missing" / "r.json")) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_device_cuda_without_cuda_exits_2(capsys, tmp_path):
    assert _run(*SMALL, "--device", "cuda", "--out", str(tmp_path / "r.json")) == 2
    assert "CUDA" in capsys.readouterr().err


def test_missing_matplotlib_names_the_bench_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rc = _run(*SMALL, "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'tritonslide[bench]'" in err
    assert not (tmp_path / "r.json").exists()
