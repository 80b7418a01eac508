"""The measured per-shape choice between the Triton kernel and the torch path (tritonslide/_dispatch.py) and the
table written from GPU benchmark records (bench/dispatch_table.py)."""

import json

import torch

from bench.dispatch_table import entries_from_records, main
from tritonslide import _dispatch


def record(fraction, ratio, pass_="forward", dtype="bf16"):
    return {"op": "active_conv2d", "variant": "triton", "ratio_vs": {"dense": 1.0, "torch_best": ratio},
            "dtype": dtype, "shape": [64, 192, 13, 13], "weight_shape": [384, 192, 3, 3], "stride": [1, 1],
            "padding": [1, 1], "dilation": [1, 1], "pass": pass_, "fraction": fraction,
            "device": "cuda: NVIDIA H100 80GB HBM3", "torch_version": "2.11", "triton_version": "3.6",
            "git_commit": "abc", "timestamp": "t"}


def test_op_key_equals_the_key_written_from_the_records():
    x = torch.empty(64, 192, 13, 13, dtype=torch.bfloat16, device="meta")
    w = torch.empty(384, 192, 3, 3, dtype=torch.bfloat16, device="meta")
    (entry,) = entries_from_records({"b": record(0.5, 0.8)})
    assert entry["key"] == _dispatch.conv_key(x, w, (1, 1), (1, 1), (1, 1), backward=False)
    assert entry["backend"] == "torch"
    assert _dispatch.conv_key(x, w, (1, 1), (1, 1), (1, 1), backward=True).endswith("|forward+backward")


def test_nearest_measured_fraction_decides(tmp_path):
    records = {"a": record(1.0, 1.3), "b": record(0.5, 1.1), "c": record(0.25, 0.7),
               "d": record(0.25, 1.2, pass_="forward+backward"), "e": {"op": "active_conv2d", "variant": "dense"}}
    out = main([str(_write(tmp_path, records)), "--out", str(tmp_path / "gpu.json")])
    data = json.loads(out.read_text())
    assert data["device"] == "cuda: NVIDIA H100 80GB HBM3" and data["triton_version"] == "3.6"
    table = _dispatch.load_table(out)
    key = entries_from_records({"c": records["c"]})[0]["key"]
    assert _dispatch.lookup(table, "active_conv2d", key, 0.2) == "torch"
    assert _dispatch.lookup(table, "active_conv2d", key, 0.3) == "torch"
    assert _dispatch.lookup(table, "active_conv2d", key, 0.45) == "triton"
    assert _dispatch.lookup(table, "active_conv2d", key, 0.9) == "triton"
    assert _dispatch.lookup(table, "active_conv2d", key.replace("|forward", "|forward+backward"), 0.25) == "triton"
    assert _dispatch.lookup(table, "active_conv2d", key.replace("bfloat16", "float32"), 0.25) is None
    assert _dispatch.lookup(table, "sketch_conv2d", key, 0.25) is None


def test_no_table_and_cpu_tensors_mean_no_choice(tmp_path):
    assert _dispatch.load_table(tmp_path / "missing.json") == {}
    assert _dispatch.measured_backend("active_conv2d", torch.device("cpu"), "k", 0.5) is None
    assert _dispatch.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def _write(tmp_path, records):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    return path


def test_cpu_tensors_have_no_measurements():
    assert not _dispatch.has_measurements("active_conv2d", torch.device("cpu"))
