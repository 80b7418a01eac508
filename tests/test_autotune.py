"""The persistent per-GPU autotune cache (tritonslide/tuning.py) and the ``@tuned`` decorator (kernels/_autotune.py).

Tiny kernels of tests/autotune_kernels.py run in Triton's interpreter; an injected timer ranks their configs
deterministically (BLOCK=32 fastest, then 64, then 16), so every test knows the winner without timing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tests import autotune_kernels as ak  # noqa: E402
from tritonslide import tuning  # noqa: E402
from tritonslide.kernels import _autotune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MS = {16: 3.0, 32: 1.0, 64: 2.0}
INTERP = {"name": "triton-interpreter", "capability": [0, 0]}

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("the autotune tests launch their kernels on CPU tensors in Triton's interpreter",
                allow_module_level=True)


class Timer:
    """The injected timer: runs each trial ``runs`` times (the hooks must hold on every run) and returns MS."""

    def __init__(self, ms=MS, runs=1, fail=()):
        self.ms, self.runs, self.fail, self.calls = dict(ms), runs, set(fail), []

    def __call__(self, name, config, launch):
        self.calls.append((name, config.kwargs["BLOCK"]))
        if config.kwargs["BLOCK"] in self.fail:
            raise RuntimeError(f"out of resources (BLOCK={config.kwargs['BLOCK']})")
        for _ in range(self.runs):
            launch()
        return self.ms[config.kwargs["BLOCK"]]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private user cache folder and shipped folder, fresh statistics, kernels that remember nothing."""
    monkeypatch.setenv("TRITONSLIDE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITONSLIDE_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "shipped")
    tuning.reset_stats()
    for kernel in ak.KERNELS:
        kernel.forget()
    ak.HOOK_CALLS.clear()
    yield tmp_path / "cache"
    _autotune.set_timer(None)
    for kernel in ak.KERNELS:
        kernel.forget()


@pytest.fixture
def timer():
    t = Timer()
    _autotune.set_timer(t)
    return t


def user_file() -> Path:
    return tuning.user_cache_path(INTERP)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def entries(path: Path, kernel=ak.scale_kernel) -> dict:
    return load(path)["kernels"][kernel.name]["entries"]


def rewrite(path: Path, edit) -> None:
    data = load(path)
    edit(data)
    path.write_text(json.dumps(data))


def run_scale(n=100, dtype=torch.float32):
    x = torch.randn(n).to(dtype)
    y = ak.scale(x, 2.0)
    torch.testing.assert_close(y, x * 2.0)  # the reference: plain torch
    return ak.scale_kernel.best_config.kwargs["BLOCK"]


def tuning_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "autotune cache" in str(w.message)]


# ---------------------------------------------------------------------------------------------------- settings
def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONSLIDE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TRITONSLIDE_CACHE_DIR")
    assert tuning.cache_dir() == tmp_path / "xdg" / "tritonslide"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "tritonslide"


def test_identity_and_paths_without_cuda():
    assert tuning.gpu_identity(torch.device("cpu")) == INTERP
    assert tuning.user_cache_path(INTERP).name == "autotune-triton-interpreter-sm00.json"
    h200 = {"name": "NVIDIA H200", "capability": [9, 0]}
    assert tuning.user_cache_path(h200) == tuning.cache_dir() / "autotune-nvidia-h200-sm90.json"
    assert tuning.shipped_path(h200) == tuning.SHIPPED_DIR / "nvidia-h200.json"


def test_identity_of_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H200 #{index}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    tuning._cuda_identity.cache_clear()
    try:
        assert tuning.gpu_identity("cuda:1") == {"name": "NVIDIA H200 #1", "capability": [9, 0]}
        assert tuning.gpu_identity(torch.device("cuda", 0))["name"] == "NVIDIA H200 #0"
    finally:
        tuning._cuda_identity.cache_clear()


def test_mode_from_env_override_and_bad_value(monkeypatch, timer):
    assert tuning.autotune_mode() == "cached"
    monkeypatch.setenv("TRITONSLIDE_AUTOTUNE", "off")
    assert tuning.autotune_mode() == "off"
    with tuning.override_mode("full"):
        assert tuning.autotune_mode() == "full"
    assert tuning.autotune_mode() == "off"
    monkeypatch.setenv("TRITONSLIDE_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match=r"TRITONSLIDE_AUTOTUNE='fast'.*full, cached, off"):
        tuning.autotune_mode()
    with pytest.raises(ValueError, match="TRITONSLIDE_AUTOTUNE"):
        run_scale()  # a launch that needs the mode reports the variable too
    with pytest.raises(ValueError, match="full, cached, off"):
        with tuning.override_mode("fast"):
            pass


def test_decorated_kernels_expose_what_bench_aot_reads():
    from tritonslide.kernels import active_conv2d, hash_histogram, sketch

    dw = active_conv2d._active_conv2d_bwd_dw_kernel
    assert dw.name == "active_conv2d._active_conv2d_bwd_dw_kernel"
    assert dw.fn.arg_names[:3] == ["g_ptr", "x_ptr", "rows_ptr"] and dw.configs
    assert dw.early_config_prune is active_conv2d._prune_dw and "K_RED" in dw.key
    assert hash_histogram._hash_histogram_fwd_kernel.reset_to_zero == ["hist_ptr"]
    assert sketch._sketch_conv2d_fwd_kernel.name == "sketch._sketch_conv2d_fwd_kernel"
    assert len(dw.source_hash) == 16 and dw.source_hash != sketch._sketch_conv2d_fwd_kernel.source_hash


def test_bad_argument_names_are_refused():
    with pytest.raises(ValueError, match="NOPE"):
        _autotune.tuned(ak.CONFIGS, key=["NOPE"])(ak.scale_kernel.fn)
    with pytest.raises(ValueError, match="perf_model"):
        _autotune.tuned(ak.CONFIGS, key=["N"], prune_configs_by={"perf_model": None})(ak.scale_kernel.fn)
    x = torch.randn(100)
    with pytest.raises(ValueError, match="BLOCK"):  # a launch may not set what the configs set
        ak.scale_kernel[(4,)](x, torch.empty_like(x), N=100, alpha=1.0, BLOCK=32)


# ---------------------------------------------------------------------------------------------------- tuning
def test_fastest_config_wins_and_is_written(timer):
    assert run_scale() == 32
    assert timer.calls == [(ak.scale_kernel.name, b) for b in ak.BLOCKS]
    assert tuning.stats() == {"tuned": 1, "cache_hits": 0, "heuristic": 0, "single": 0}
    (key, entry), = entries(user_file()).items()
    assert key == "N=100;x_ptr=float32,y_ptr=float32"
    assert entry["kwargs"] == {"BLOCK": 32} and entry["num_warps"] == 4 and entry["num_stages"] == 1
    assert entry["ms"] == 1.0 and sorted(entry["timings_ms"].values()) == [1.0, 2.0, 3.0] and entry["tuned_at"]
    data = load(user_file())
    assert (data["format"], data["gpu"], data["capability"]) == (1, "triton-interpreter", [0, 0])
    assert data["triton"] == __import__("triton").__version__
    assert data["kernels"][ak.scale_kernel.name]["source"] == ak.scale_kernel.source_hash
    # the same key again: from memory; another dtype is another key
    assert run_scale() == 32 and len(timer.calls) == 3
    run_scale(dtype=torch.float16)
    assert len(timer.calls) == 6 and len(entries(user_file())) == 2


def test_bucketed_key_tunes_once_per_power_of_two(timer):
    """Sizes 70..128 share the entry N=128 (one tuning, the others from memory and, in a new process, the file);
    129 is the next bucket. Every launch computes its own size right."""
    for n in (100, 70, 128, 129):
        x = torch.randn(n)
        torch.testing.assert_close(ak.bucketed_scale(x, 2.0), x * 2.0)
    assert [b for _, b in timer.calls] == list(ak.BLOCKS) * 2
    assert sorted(entries(user_file(), ak.bucketed_scale_kernel)) == ["N=128;x_ptr=float32,y_ptr=float32",
                                                                      "N=256;x_ptr=float32,y_ptr=float32"]
    ak.bucketed_scale_kernel.forget()
    ak.bucketed_scale(torch.randn(90), 1.0)
    assert len(timer.calls) == 6 and tuning.stats()["cache_hits"] == 1


def test_default_timer_under_the_interpreter():
    """No injected timer: the interpreter's wall-clock median ranks the configs (do_bench needs CUDA events)."""
    assert run_scale() in ak.BLOCKS
    (entry,) = entries(user_file()).values()
    assert len(entry["timings_ms"]) == 3 and all(ms > 0 for ms in entry["timings_ms"].values())
    assert entry["ms"] == min(entry["timings_ms"].values())


def test_single_config_after_pruning_is_neither_timed_nor_written(timer):
    assert run_scale(n=10) == 16
    assert timer.calls == [] and tuning.stats()["single"] == 1 and not user_file().exists()


def test_winner_persists_across_processes(timer, cache):
    run_scale()
    script = (
        "import json, torch\n"
        "from tests import autotune_kernels as ak\n"
        "from tritonslide import tuning\n"
        "from tritonslide.kernels import _autotune\n"
        "calls = []\n"
        "_autotune.set_timer(lambda name, config, launch: calls.append(name) or 1.0)\n"
        "x = torch.randn(100)\n"
        "assert torch.equal(ak.scale(x, 2.0), x * 2.0)\n"
        "print(json.dumps({'calls': len(calls), 'stats': tuning.stats(),\n"
        "                  'block': ak.scale_kernel.best_config.kwargs['BLOCK']}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITONSLIDE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("TRITONSLIDE_AUTOTUNE", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"calls": 0, "block": 32, "stats": {"tuned": 0, "cache_hits": 1, "heuristic": 0, "single": 0}}


def test_hooks_run_before_every_trial_and_the_final_launch(timer):
    """sum_kernel accumulates with atomics into a buffer zeroed by reset_to_zero and one zeroed by its configs'
    pre_hook; the launcher fills both with garbage. Each config runs twice while tuning."""
    timer.runs = 2
    x = torch.randn(200)
    out, count = ak.total(x)
    torch.testing.assert_close(out, x.sum().reshape(1), rtol=1e-5, atol=1e-5)
    assert count.item() == 200
    assert ak.HOOK_CALLS == [16, 16, 32, 32, 64, 64, 32]  # every trial, then the final launch with the winner
    out, count = ak.total(x)  # from memory: the hooks still run
    torch.testing.assert_close(out, x.sum().reshape(1), rtol=1e-5, atol=1e-5)
    assert count.item() == 200 and ak.HOOK_CALLS[-1] == 32 and len(timer.calls) == 3


def test_restore_value_undoes_every_trial(timer):
    timer.runs = 3
    y = torch.arange(50, dtype=torch.float32)
    ak.add_one_(y)
    torch.testing.assert_close(y, torch.arange(50, dtype=torch.float32) + 1)  # 9 trial runs undone, one kept


def test_failing_configs_are_skipped_and_recorded(timer):
    timer.fail = {32}
    assert run_scale() == 64
    (entry,) = entries(user_file()).values()
    assert "out of resources" in entry["errors"]["BLOCK=32,warps=4,stages=1"]
    assert set(entry["timings_ms"]) == {"BLOCK=16,warps=4,stages=1", "BLOCK=64,warps=4,stages=1"}


def test_all_configs_failing_raises_naming_the_kernel(timer):
    timer.fail = set(ak.BLOCKS)
    with pytest.raises(Exception, match="scale_kernel") as info:
        run_scale()
    assert "out of resources" in str(info.value) or "out of resources" in str(info.value.__cause__)
    assert not user_file().exists()


# ---------------------------------------------------------------------------------------------------- modes
def test_off_uses_the_first_pruned_config_without_timing(monkeypatch, timer):
    monkeypatch.setenv("TRITONSLIDE_AUTOTUNE", "off")
    assert run_scale() == 16
    assert timer.calls == [] and tuning.stats()["heuristic"] == 1 and not user_file().exists()
    # a file entry still counts in "off"; leaving "off" re-decides the heuristic key
    monkeypatch.delenv("TRITONSLIDE_AUTOTUNE")
    assert run_scale() == 32 and len(timer.calls) == 3
    ak.scale_kernel.forget()
    monkeypatch.setenv("TRITONSLIDE_AUTOTUNE", "off")
    assert run_scale() == 32 and len(timer.calls) == 3 and tuning.stats()["cache_hits"] == 1


def test_full_retunes_keys_the_file_holds(timer):
    run_scale()
    ak.scale_kernel.forget()
    timer.ms = {16: 3.0, 32: 2.0, 64: 1.0}  # the GPU changed its mind: 64 is now fastest
    assert run_scale() == 32 and len(timer.calls) == 3  # cached: served by the file, not timed
    with tuning.override_mode("full"):
        assert run_scale() == 64 and len(timer.calls) == 6
        assert run_scale() == 64 and len(timer.calls) == 6  # tuned in this process: not again
    assert entries(user_file())["N=100;x_ptr=float32,y_ptr=float32"]["kwargs"] == {"BLOCK": 64}
    assert tuning.stats() == {"tuned": 2, "cache_hits": 1, "heuristic": 0, "single": 0}


def test_full_from_the_environment(monkeypatch, timer):
    run_scale()
    ak.scale_kernel.forget()
    monkeypatch.setenv("TRITONSLIDE_AUTOTUNE", "full")
    run_scale()
    assert len(timer.calls) == 6 and tuning.stats()["cache_hits"] == 0


# ---------------------------------------------------------------------------------------------------- stale files
@pytest.mark.parametrize("field, value, why", [
    ("triton", "0.0.1", "Triton 0.0.1"),
    ("format", 99, "format 99"),
    ("gpu", "NVIDIA A100", "NVIDIA A100"),
])
def test_stale_file_is_ignored_with_one_warning_and_rewritten(timer, field, value, why):
    run_scale()
    rewrite(user_file(), lambda d: d.update({field: value}))
    ak.scale_kernel.forget()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run_scale() == 32
        run_scale(n=200)  # another key reads the same file: no second warning
    (message,) = tuning_warnings(record)
    assert str(user_file()) in message and why in message
    assert len(timer.calls) == 9 and load(user_file())[field] != value  # retuned, rewritten for this Triton / GPU
    assert len(entries(user_file())) == 2


def test_changed_source_hash_retunes_with_one_warning(timer):
    run_scale()
    rewrite(user_file(), lambda d: d["kernels"][ak.scale_kernel.name].update(source="0123456789abcdef"))
    ak.scale_kernel.forget()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_scale()
        run_scale(n=200)
    (message,) = tuning_warnings(record)
    assert ak.scale_kernel.name in message and "0123456789abcdef" in message
    assert len(timer.calls) == 9
    assert load(user_file())["kernels"][ak.scale_kernel.name]["source"] == ak.scale_kernel.source_hash


def test_source_hash_covers_the_jit_helpers_a_kernel_calls(monkeypatch):
    """Editing a ``@triton.jit`` helper changes the hash of every kernel calling it (its entries are then stale);
    a kernel that does not call it keeps its hash."""
    import triton

    from tritonslide.kernels._autotune import _base_function, source_hash

    def hashes():
        return [source_hash(k.fn, k.configs) for k in (ak.add_one_kernel, ak.scale_kernel)]

    before = hashes()
    assert before == [ak.add_one_kernel.source_hash, ak.scale_kernel.source_hash]

    @triton.jit
    def plus_one(v):
        return v + 2.0

    monkeypatch.setitem(_base_function(ak.add_one_kernel.fn).__globals__, "plus_one", plus_one)
    after = hashes()
    assert after[0] != before[0] and after[1] == before[1]


def test_corrupt_file_is_ignored_with_one_warning_and_replaced(timer):
    user_file().parent.mkdir(parents=True)
    user_file().write_text('{"format": 1, "kernels": ')
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run_scale() == 32
        run_scale(n=200)
    (message,) = tuning_warnings(record)
    assert str(user_file()) in message and "unreadable" in message
    assert len(entries(user_file())) == 2


def test_entry_whose_config_is_gone_is_ignored(timer):
    run_scale()
    rewrite(user_file(), lambda d: [e.update(kwargs={"BLOCK": 128}) for e in entries_of(d)])
    ak.scale_kernel.forget()
    assert run_scale() == 32 and len(timer.calls) == 6


def entries_of(data: dict) -> list[dict]:
    return list(data["kernels"][ak.scale_kernel.name]["entries"].values())


def test_unwritable_folder_warns_once_and_keeps_the_winner_in_memory(monkeypatch, tmp_path, timer):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TRITONSLIDE_CACHE_DIR", str(blocker / "cache"))  # a folder under a file: never creatable
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run_scale() == 32
        run_scale(n=200)
        assert run_scale() == 32
    (message,) = tuning_warnings(record)
    assert "not writable" in message and len(timer.calls) == 6


# ---------------------------------------------------------------------------------------------------- shipped files
def test_shipped_defaults_under_the_user_cache(timer):
    run_scale()  # a real entry, then moved to the shipped folder with another winner
    shipped = tuning.shipped_path(INTERP)
    shipped.parent.mkdir(parents=True)
    data = load(user_file())
    for e in entries_of(data):
        e["kwargs"] = {"BLOCK": 64}
    shipped.write_text(json.dumps(data))
    user_file().unlink()
    ak.scale_kernel.forget()
    assert run_scale() == 64 and len(timer.calls) == 3  # the shipped entry, no timing
    for e in entries_of(data):
        e["kwargs"] = {"BLOCK": 16}
    user_file().write_text(json.dumps(data))
    ak.scale_kernel.forget()
    assert run_scale() == 16 and len(timer.calls) == 3  # the user's entry wins
    assert tuning.stats()["cache_hits"] == 2


def test_describe_and_clear(timer):
    run_scale()
    run_scale(dtype=torch.float16)
    shipped = tuning.shipped_path({"name": "NVIDIA H200", "capability": [9, 0]})
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"format": 1, "gpu": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0",
                                   "kernels": {}}))
    text = tuning.describe()
    assert str(user_file()) in text and str(shipped) in text and "NVIDIA H200 sm_90, Triton 3.6.0" in text
    assert f"{ak.scale_kernel.name} (source {ak.scale_kernel.source_hash}): 2 entries" in text
    assert "N=100;x_ptr=float16,y_ptr=float16 -> BLOCK=32,warps=4,stages=1 (1 ms)" in text
    assert tuning.cache_files() == [user_file()]
    assert tuning.clear() == [user_file()]
    assert not user_file().exists() and shipped.exists() and tuning.cache_files() == []
    assert "no autotune files" not in tuning.describe()  # the shipped file is still listed


# ---------------------------------------------------------------------------------------------------- writers
def test_concurrent_writers_keep_every_entry(cache):
    """Two processes recording keys into the same file at once: the file stays whole and holds every entry."""
    script = (
        "import sys\n"
        "from tritonslide import tuning\n"
        "ident = {'name': 'triton-interpreter', 'capability': [0, 0]}\n"
        "for i in range(25):\n"
        "    tuning.record(ident, 'k.k', 'src', f'{sys.argv[1]}{i}', {'kwargs': {}, 'num_warps': 4, 'num_stages': 1},\n"
        "                  triton='9.9')\n"
    )
    env = {**os.environ, "TRITONSLIDE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, tag], cwd=ROOT, env=env) for tag in "ab"]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    data = load(user_file())
    assert sorted(data["kernels"]["k.k"]["entries"]) == sorted(f"{t}{i}" for t in "ab" for i in range(25))
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]
