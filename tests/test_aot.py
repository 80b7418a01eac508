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
    # the launcher's specialization: unit strides of the NCHW tensors are constexprs
    assert "sxw" in rec["constexpr_args"]
