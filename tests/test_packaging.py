"""The built wheel holds every subpackage under tritonslide/ and nothing at the top level but tritonslide."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> where it must land in the wheel
MAPPING = {"tritonslide": "tritonslide", "kernels": "tritonslide/kernels", "cpu_fallback": "tritonslide/cpu_fallback"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("tritonslide-*.whl")
    return zipfile.ZipFile(path)


def test_every_source_module_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    expected = set()
    for src, dst in MAPPING.items():
        for file in (ROOT / src).rglob("*.py"):
            rel = file.relative_to(ROOT / src).as_posix()
            expected.add(f"{dst}/{rel}")
    missing = expected - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    for pkg in ("tritonslide", "tritonslide/nn", "tritonslide/kernels", "tritonslide/cpu_fallback"):
        assert f"{pkg}/__init__.py" in names


def test_no_top_level_package_but_tritonslide(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tritonslide"}, tops  # never a top-level `kernels` (another package owns that name on PyPI)


def test_metadata_marks_triton_linux_only_and_declares_the_console_script(wheel):
    meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = wheel.read(meta_name).decode()
    triton = [line for line in meta.splitlines() if line.startswith("Requires-Dist: triton")]
    assert triton and 'sys_platform == "linux"' in triton[0]
    entry = wheel.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert "tritonslide = tritonslide.cli:main" in entry


def test_installed_package_resolves_subpackages():
    """Editable installs map the folders; regular installs put them inside tritonslide/."""
    import tritonslide.cpu_fallback
    import tritonslide.kernels

    for module, folder in ((tritonslide.kernels, "kernels"), (tritonslide.cpu_fallback, "cpu_fallback")):
        path = Path(module.__file__).resolve()
        assert path.parent == ROOT / folder or path.parent.parent.name == "tritonslide", path
