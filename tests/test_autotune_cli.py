"""``tritonslide autotune``: usage errors, the CUDA requirement, --show / --clear, and the interpreter dry run that
bench/gpu_check.sh --dry-run relies on (the tuning mechanism itself is tested in tests/test_autotune.py)."""

from __future__ import annotations

import pytest

from tests.triton_utils import requires_triton
from tritonslide import cli, tuning


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONSLIDE_CACHE_DIR", str(tmp_path / "cache"))
    yield


def test_without_cuda_or_interpreter_exits_2_naming_cuda(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["autotune", "--model", "alexnet"]) == 2
    err = capsys.readouterr().err
    assert "tritonslide autotune: error:" in err and "CUDA" in err


def test_unknown_model_exits_2(capsys):
    assert cli.main(["autotune", "--model", "no_such_net"]) == 2
    assert "no_such_net" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "lowrank"], "lowrank"),  # no Triton kernels: nothing to tune
    (["--dtype", "fp64"], "fp64"),
    (["--mode", "eval"], "eval"),
    (["--batch", "0"], ">= 1"),
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["autotune", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_show_and_clear(tmp_path, capsys):
    identity = {"name": "NVIDIA Test GPU", "capability": [9, 0]}
    path = tuning.user_cache_path(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"format": 1, "gpu": "NVIDIA Test GPU", "capability": [9, 0], "triton": "0", "kernels": {}}')
    assert cli.main(["autotune", "--show"]) == 0
    assert str(path) in capsys.readouterr().out
    assert cli.main(["autotune", "--clear"]) == 0
    assert not path.exists()
    assert "removed 1 cache file" in capsys.readouterr().out


@requires_triton
def test_interpreter_dry_run_meets_every_kernel(capsys):
    """The digits CNN patched with every method that has kernels, forward and backward, in the interpreter: the
    steps of a GPU run (nothing is timed: one config per list)."""
    tuning.reset_stats()
    code = cli.main(["autotune", "--model", "digits_cnn", "--batch", "2", "--image-size", "8", "--dtype", "fp32",
                     "--methods", "alsh,sketch,milf", "--mode", "inference,train"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dry run" in out
    for method in ("alsh", "sketch", "milf"):
        assert f"digits_cnn {method} fp32 inference+train" in out
