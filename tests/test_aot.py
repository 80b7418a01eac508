"""bench.aot compiles a kernel config for a real GPU target on the CPU and reports its fields (no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parent.parent

# In a fresh process: the test session sets TRITON_INTERPRET=1, under which the kernels are interpreter functions
# and their autotune lists are cut to one config; the AOT report needs the real JIT functions and lists.
_SCRIPT = """
import json
from bench.aot import attach_ratios, build_plan, compile_job, _dense_key
jobs, _ = build_plan("ci", [90])
job = next(j for j in jobs if j["kernel"] == "active_fwd")
dense = next(j for j in jobs if j["kernel"] == "dense_gemm" and _dense_key(j) == _dense_key(job))
records = [compile_job(dense), compile_job(job)]
attach_ratios(records)
print(json.dumps(records, default=str))
"""


def test_aot_compiles_one_active_fwd_config():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dense, rec = json.loads(out.stdout.strip().splitlines()[-1])
    for r in (dense, rec):
        assert r["ok"], r.get("error")
        for field in ("regs", "spill_bytes", "smem", "mma", "loads", "ldg_width_bits", "sass_instructions",
                      "main_loop", "ptx"):
            assert field in r, field
        assert 0 < r["regs"] <= 255
        assert r["main_loop"]["instructions"] > 0
        # sm_90 with fp16 operands: the dot lowers to wgmma
        assert any(op.startswith("HGMMA") for op in r["mma"]), r["mma"]
        assert r["ptx"]["wgmma.mma_async"] > 0
    assert rec["loop_ratio_vs_dense"] > 0
    # NHWC x and (O, kh, kw, C) weights with a 16-aligned channel count: the operand tiles of the main loop arrive by
    # 16-byte cp.async, never as 2-byte scalar loads
    assert rec["main_loop"]["ldgsts"] > 0
    assert "16" not in rec["main_loop"]["ldg_bits"]


def _record(**over):
    rec = {"kernel": "active_fwd", "variant": "v", "case": {"shape": "vgg11_256x256_3x3@28"}, "dtype": "fp16",
           "target": 90, "ok": True, "spill_bytes": 0, "mma": {"HGMMA.64x64x16.F32": 2},
           "config": {"kwargs": {"BLOCK_M": 64}, "num_warps": 4, "num_stages": 3},
           "main_loop": {"ldg_bits": {}, "ldgsts": 2}}
    rec.update(over)
    return rec


def test_gate_flags_each_static_target():
    from bench.aot import gate

    assert gate([_record()]) == []
    assert gate([_record(dtype="fp32", mma={})]) == []  # IEEE fp32 runs on FMA units by definition
    assert gate([_record(kernel="dense_gemm", spill_bytes=64)]) == []  # the anchor is not gated
    cases = {
        "compile error": _record(ok=False, error="CompilationError: boom"),
        "spills 24 B": _record(spill_bytes=24),
        "no tensor-core instruction": _record(dtype="bf16", mma={}),
        "2-byte scalar loads": _record(main_loop={"ldg_bits": {"16": 8}, "ldgsts": 0}),
    }
    for what, rec in cases.items():
        problems = gate([rec])
        assert len(problems) == 1 and what in problems[0], (what, problems)
    # AlexNet's 3-channel conv1 takes the small-C (ROWS) paths of the active, per-sample and sketch kernels: vectors
    # are enforced there; the degenerate 1x1 layer has no such path
    scalar = {"ldg_bits": {"16": 8}, "ldgsts": 0}
    conv1 = {"shape": "alexnet_conv1_3x64_11x11s4"}
    assert len(gate([_record(case=conv1, main_loop=scalar)])) == 1
    assert len(gate([_record(kernel="sample_fwd", case=conv1, main_loop=scalar)])) == 1
    assert gate([_record(case={"shape": "degenerate_4x4_3x3@1"}, main_loop=scalar)]) == []
