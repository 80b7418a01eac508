"""Backend selection: one place, explicit requests that cannot run raise, Triton stays optional."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonslide
from tritonslide import kernels, ops
from tritonslide._backend import current_backend, resolve_backend


def test_default_is_auto_and_cpu_tensors_run_torch(monkeypatch):
    monkeypatch.delenv("TRITONSLIDE_BACKEND", raising=False)
    assert current_backend() == "auto"
    assert resolve_backend("active_conv2d", torch.zeros(1)) == "torch"


def test_context_manager_restores_and_plain_call_persists():
    with tritonslide.use_backend("torch"):
        assert current_backend() == "torch"
        with tritonslide.use_backend("auto"):
            assert current_backend() == "auto"
        assert current_backend() == "torch"
    assert current_backend() == "auto"
    choice = tritonslide.use_backend("torch")  # a plain call stays in effect ...
    try:
        assert current_backend() == "torch"
    finally:
        choice.__exit__(None, None, None)  # ... until undone
    assert current_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("TRITONSLIDE_BACKEND", "torch")
    assert current_backend() == "torch"
    monkeypatch.setenv("TRITONSLIDE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TRITONSLIDE_BACKEND"):
        current_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        tritonslide.use_backend("numpy")


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with tritonslide.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not installed"):
        ops.active_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3))


@pytest.mark.skipif(not kernels.has_triton(), reason="Triton is not installed")
def test_forced_triton_names_the_missing_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "TRITON_OPS", frozenset())  # as before a kernel file lands
    x = torch.randn(1, 2, 4, 4)
    with tritonslide.use_backend("triton"):
        with pytest.raises(NotImplementedError, match=r"ops\.active_conv2d.*issue #5"):
            ops.active_conv2d(x, torch.randn(3, 2, 3, 3))
        with pytest.raises(NotImplementedError, match=r"ops\.hash_histogram.*issue #4"):
            ops.hash_histogram(x, torch.randn(4, 2, 3, 3), 2)


def test_triton_ops_are_the_kernel_files_present():
    present = {p.stem for p in Path(kernels.__file__).parent.glob("*.py")}
    expected = {op for op, (module, _) in kernels._PLANNED.items() if module in present}
    assert kernels.TRITON_OPS == expected


def test_auto_never_picks_a_missing_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_OPS", frozenset())
    fake_cuda = torch.empty(0, device="meta")  # not CUDA either: auto must pick torch
    assert resolve_backend("active_conv2d", fake_cuda) == "torch"


def test_import_without_triton():
    """`import tritonslide` and the CPU path work where Triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, tritonslide\n"
        "from tritonslide import kernels\n"
        "assert not kernels.has_triton()\n"
        "m = tritonslide.patch(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)))\n"
        "assert m(torch.randn(2, 3, 9, 9)).shape == (2, 8, 5, 5)\n"
        "with tritonslide.use_backend('triton'):\n"
        "    try:\n"
        "        m(torch.randn(2, 3, 9, 9))\n"
        "    except RuntimeError as e:\n"
        "        assert 'not installed' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('forced triton without Triton must raise')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_fallback_never_imports_triton():
    code = "import sys; import tritonslide.cpu_fallback, tritonslide.ops; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
