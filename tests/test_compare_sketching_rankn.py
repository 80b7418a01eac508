"""``tritonslide compare`` sections ``sketching`` (tensor sketching, shared/papers/004, Theorems 3.1 / 3.2) and
``rankn`` (Rank-N, shared/papers/002, sec. IX, XIII-XIV), run at a shrunken scale through their module knobs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritonslide.compare import Context, Section, rankn, run_section, sketching

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sklearn", "matplotlib", "pytest_benchmark")),
    reason="needs pip install 'tritonslide[demo]'",
)

# one epoch on the 8x8 digits: the two sections share the trained CNN through sketching.trained_cnn3's cache
TINY_TRAIN = {"quick": {"size": 8, "epochs": 1}, "full": {"size": 8, "epochs": 1}}
TINY_SKETCH = {"ks": (4, 8), "pairs": (1, 2), "draws": 3, "batch": 32, "mlp_epochs": 1}
TINY_RANKN = {"ranks": (1, 2, 3, 4, 5), "error_batch": 32, "time_batch": 1, "time_hw": 12, "blocks": 2, "rounds": 1,
              "model_images": 16, "model_batch": 16, "model_blocks": 1, "model_rounds": 1}


def _run(key: str, module, settings: dict, out: Path) -> Section:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sketching, "TRAIN", TINY_TRAIN)
        mp.setitem(module.SETTINGS, "quick", settings)
        return run_section(key, Context(out_dir=out, progress=False, seed=0))


@pytest.fixture(scope="module")
def sketch_section(tmp_path_factory) -> tuple[Section, Path]:
    out = tmp_path_factory.mktemp("sketching")
    return _run("sketching", sketching, TINY_SKETCH, out), out


@pytest.fixture(scope="module")
def rankn_section(tmp_path_factory) -> tuple[Section, Path]:
    out = tmp_path_factory.mktemp("rankn")
    return _run("rankn", rankn, TINY_RANKN, out), out


# ---------------------------------------------------------------------------------------------- shared training
def test_trained_cnn3_is_cached_and_shared_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = sketching.trained_cnn3(0, 1, 8)
    assert torch.equal(state, torch.random.get_rng_state())
    assert sketching.trained_cnn3(0, 1, 8) is first  # one training per process per (seed, epochs, size)
    assert rankn.trained_cnn3 is sketching.trained_cnn3
    assert first.model.conv3.weight.shape == (64, 64, 3, 3) and 0.1 < first.accuracy <= 1.0
    assert sketching.digits(0, 8).x_test.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError):
        sketching.digits(0, 16)


# ---------------------------------------------------------------------------------------------- sketching
def test_probe_errors_and_bound_match_a_plain_reference():
    """The Gram-matrix errors and Theorem 3.1's right-hand side against direct convolutions and unfold (a plain
    reference), on an odd-sized layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(3, 5, 6, 5)
    probe = sketching.Probe("c", conv, x)
    w = conv.weight.detach().double()
    y = F.conv2d(x.double(), w, None, padding=1)
    cols = F.unfold(x.double(), 3, padding=1)  # (N, C*9, L): the im2col matrix of eq. 2
    assert math.isclose(probe.y_sq, float(y.pow(2).sum()), rel_tol=1e-9)
    assert math.isclose(probe.col_sq, float(cols.pow(2).sum()), rel_tol=1e-9)
    w_hat = w + 0.1 * torch.randn_like(w)
    ref = float((F.conv2d(x.double(), w_hat, None, padding=1) - y).norm() / y.norm())
    assert math.isclose(probe.output_error(w_hat), ref, rel_tol=1e-9)
    lk, d1 = 2 * 3, 7
    thm = d1 * float(y.pow(2).sum()) / lk + float(cols.pow(2).sum()) * float(w.pow(2).sum()) / (lk * 9)
    assert math.isclose(probe.bound("both", 3, 2), math.sqrt(thm / float(y.pow(2).sum())), rel_tol=1e-9)
    assert math.isclose(probe.bound("output", 3, 2), math.sqrt(2 * d1 / lk), rel_tol=1e-12)
    lin = nn.Linear(9, 11).requires_grad_(False)
    h = torch.randn(4, 9)
    fc = sketching.Probe("f", lin, h)
    a = h.double() @ lin.weight.double().T
    assert fc.taps == 1 and math.isclose(fc.y_sq, float(a.pow(2).sum()), rel_tol=1e-9)
    assert fc.params(2, 3, "both") == 3 * 2 * (11 + 9)  # l k (d1 + d2), sec. 3.2


def test_sketching_rows_cover_the_grid(sketch_section):
    section, _ = sketch_section
    json.dumps(section.rows)
    json.dumps(section.paper)
    grid = [r for r in section.rows if r["kind"] == "grid"]
    keys = {(r["layer"], r["mode"], r["init"], r["k"], r["l"]) for r in grid}
    want = {(layer, mode, init, k, pairs) for layer in ("conv3", "fc1") for mode in sketching.MODES
            for init in sketching.INITS for k in TINY_SKETCH["ks"] for pairs in TINY_SKETCH["pairs"]}
    assert want <= keys
    for r in grid:
        # the parameter count of sec. 3.1 / 3.2: l h w k (d1 + d2) with mode "both", l k d2 h w with "output"
        taps = 9 if r["layer"] == "conv3" else 1
        d1 = 64 if r["layer"] == "conv3" else sketching.MLP_HIDDEN
        d2 = 64
        expected = r["l"] * r["k"] * taps * (d1 + d2) if r["mode"] == "both" else r["l"] * r["k"] * taps * d2
        assert r["params"] == expected
        assert r["measured"] == (r["params"] < r["dense_params"])
        if r["measured"]:
            assert len(r["rel_errors"]) == TINY_SKETCH["draws"]
    assert sum(r["measured"] for r in grid) >= len(want) // 2
    rates = [r for r in section.rows if r["kind"] == "paper_rate"]
    assert [r["paper_compression_rate"] for r in rates] == [p["compression_rate"] for p in sketching.PAPER_RATES]
    assert all(r["compression_rate"] <= r["paper_compression_rate"] for r in rates)


def test_unbiased_error_is_below_the_theorem_bound_at_fixed_seeds(sketch_section):
    """Statistical test, seeds 0..2: the bound is on E||y^ - y||^2, so the mean of the squared errors over the draws
    (the RMS) is compared with it; with one side the RMS should also sit near its exact value sqrt((d1-1)/(l k))."""
    section, _ = sketch_section
    unbiased = [r for r in section.rows if r["kind"] == "grid" and r["init"] == "unbiased" and r["measured"]]
    assert unbiased
    for r in unbiased:
        assert r["rel_error_rms"] <= r["bound"], r
        if r["mode"] == "output":
            d1 = 64 if r["layer"] == "conv3" else sketching.MLP_HIDDEN
            assert 0.6 < r["rel_error_rms"] / math.sqrt((d1 - 1) / (r["k"] * r["l"])) < 1.4, r
    fit = [r for r in section.rows if r["kind"] == "grid" and r["init"] == "fit" and r["measured"]]
    assert all(r["weight_error_mean"] <= 1.0 + 1e-6 for r in fit)  # least squares: a projection of W
    checks = [r for r in section.rows if r["kind"] == "forward_check"]
    assert len(checks) == 2 * len(sketching.MODES) * len(sketching.INITS)
    assert all(c["abs_diff"] < 1e-4 for c in checks)


def test_sketching_plots_and_markdown(sketch_section):
    section, out = sketch_section
    assert section.plots == ["sketching_error_vs_k.png", "sketching_params_vs_error.png"]
    for name in section.plots:
        assert (out / name).stat().st_size > 1000
    md = section.markdown
    for figure in ("Theorem 3.1", "sqrt(d1 / (l k) + ||I_in||_F^2 ||K||_F^2 / (l k h w ||I_in K||_F^2))",
                   "sqrt(2 d1 / (l k))", "0.15", "0.25", "36.4%", "32.3%", "sec. 5, Fig. 2", "sec. 5, Fig. 3"):
        assert figure in md, figure
    assert "What differs" in md
    sources = {p["source"] for p in section.paper}
    assert {"sec. 3.1, Theorem 3.1", "sec. 3.2, Theorem 3.2", "sec. 5, Places2"} <= sources


# ---------------------------------------------------------------------------------------------- rankn
def test_rankn_rows_cover_every_rank_and_scheme(rankn_section):
    section, _ = rankn_section
    json.dumps(section.rows)
    json.dumps(section.paper)
    ranks, schemes = TINY_RANKN["ranks"], rankn.SCHEMES
    layers = {(r["layer"], r["scheme"], r["rank"]) for r in section.rows if r["kind"] == "layer"}
    assert layers == {(n, s, k) for n in rankn.LAYERS for s in schemes for k in ranks}
    for kind in ("model", "time"):
        assert {(r["scheme"], r["rank"]) for r in section.rows if r["kind"] == kind} == {
            (s, k) for s in schemes for k in ranks}
    for r in section.rows:
        if r["kind"] == "time":
            assert r["time_ratio"] > 0 and r["dense_min_s"] > 0 and r["min_s"] > 0
            assert 0 < r["macs_ratio"] <= 1.0 + 1e-9


def test_rankn_fit_error_decreases_with_rank_and_filter_is_exact_at_three(rankn_section):
    section, _ = rankn_section
    rows = [r for r in section.rows if r["kind"] == "layer"]
    for r in rows:  # the truncated SVD is Eckart-Young's best rank-r approximation (sec. IX)
        assert abs(r["weight_error"] - r["eckart_young"]) < 1e-5, r
    for name in rankn.LAYERS:
        for scheme in rankn.SCHEMES:
            errs = [r["weight_error"] for r in sorted(rows, key=lambda r: r["rank"])
                    if r["layer"] == name and r["scheme"] == scheme]
            assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), (name, scheme, errs)
    for r in rows:
        if r["scheme"] == "filter":
            assert r["effective_rank"] == min(r["rank"], 3) and r["full_rank"] == 3
            if r["rank"] >= 3:  # min(kh, kw) = 3: exact
                assert r["weight_error"] < 1e-5 and r["output_error"] < 1e-5, r
            else:
                assert r["weight_error"] > 1e-3
        if r["scheme"] == "channel" and r["layer"] != "conv1":  # full rank 96 / 192: ranks 1..5 strictly better
            assert r["weight_error"] > 0.05
    conv3 = sorted((r for r in rows if r["layer"] == "conv3" and r["scheme"] == "channel"), key=lambda r: r["rank"])
    assert all(b["weight_error"] < a["weight_error"] for a, b in zip(conv3, conv3[1:]))
    models = {(r["scheme"], r["rank"]): r for r in section.rows if r["kind"] == "model"}
    # an exact conversion predicts what the dense CNN predicts
    assert models[("filter", 3)]["accuracy"] == models[("filter", 3)]["dense_accuracy"]


def test_rankn_plots_and_markdown(rankn_section):
    section, out = rankn_section
    assert section.plots == ["rankn_error.png", "rankn_time.png"]
    for name in section.plots:
        assert (out / name).stat().st_size > 1000
    md = section.markdown
    for figure in ("0.23452", "0.35717", "0.37782", "0.39202", "0.39713", "7.95 s", "8.04 s", "8.35 s", "8.68 s",
                   "9.03 s", "9.10 s"):
        assert figure in md, figure
    assert "What differs" in md
    assert [p["rank"] for p in section.paper if "rank" in p] == [1, 2, 3, 4, 5]
