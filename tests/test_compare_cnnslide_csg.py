"""``tritonslide compare`` sections ``cnnslide`` (CNN-SLIDE Fig. 3/4, shared/papers/000) and ``csg`` (associative
convolution Table 1/2, shared/papers/003), run at shrunk scales (the modules' QUICK knobs) so each test stays short."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch

import tritonslide
from tritonslide import demo
from tritonslide.compare import Context, _finite, cnnslide, csg, run_section
from tritonslide.models import ResNet, resnet56

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sklearn", "tqdm", "matplotlib")),
    reason="needs pip install 'tritonslide[demo]'",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- cnnslide
@pytest.fixture(scope="module")
def cnnslide_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnnslide")
    with pytest.MonkeyPatch.context() as mp:
        # one step per epoch, two epochs (so ALSH re-hashes once), both quick nets, 16 images each
        mp.setattr(cnnslide, "QUICK", cnnslide.Scale(nets=("cnn3", "cnn8"), epochs=2, train_subset=16,
                                                      test_subset=16, batch_size=16))
        section = run_section("cnnslide", Context(out_dir=out, progress=False, seed=0))
    return section, out


def test_cnnslide_has_every_net_and_variant_with_the_layers_it_converts(cnnslide_run):
    section, _ = cnnslide_run
    assert [(r["net"], r["variant"]) for r in section.rows] == [
        (net, v) for net in ("cnn3", "cnn8") for v in ("vanilla", "lsh", "sketch", "lsh+sketch")]
    converted = {(r["net"], r["variant"]): r["converted"] for r in section.rows}
    assert converted[("cnn3", "vanilla")] == converted[("cnn8", "vanilla")] == ""
    assert converted[("cnn3", "lsh")] == converted[("cnn3", "lsh+sketch")] == "conv2,conv3"
    assert converted[("cnn8", "lsh")] == "conv2,conv4,conv6"  # sec. 5.1: every even layer of the 8-layer CNN
    # a 32->32 sketch of k=16, 2 sketches holds as many parameters as the dense conv: patch leaves it dense, and says so
    assert converted[("cnn8", "sketch")] == converted[("cnn8", "lsh+sketch")] == "conv4,conv6"
    assert any("cnn8 sketch" in n and "conv2" in n for n in section.notes)
    for r in section.rows:
        assert r["steps"] == 2 and r["steps_per_epoch"] == 1 and r["train_images"] == 16 and r["test_images"] == 16
        assert 0.0 <= r["accuracy"] <= 100.0
        if r["variant"] in ("lsh", "lsh+sketch"):
            assert 0.0 < r["active_fraction_train"] <= 1.0
        else:
            assert r["active_fraction_train"] is None


def test_cnnslide_ratios_follow_from_the_stored_times(cnnslide_run):
    section, _ = cnnslide_run
    for net in ("cnn3", "cnn8"):
        rows = {r["variant"]: r for r in section.rows if r["net"] == net}
        base = rows["vanilla"]
        for r in rows.values():
            assert r["timing"] == "median step x steps per epoch"  # the CPU
            assert r["epoch_s"] == r["epoch_s_median"]
            assert math.isclose(r["epoch_s_median"], r["step_ms_median"] / 1e3 * r["steps_per_epoch"], rel_tol=1e-9)
            assert math.isclose(r["epoch_s_sum"], r["step_ms_mean"] / 1e3 * r["steps"] / r["epochs"], rel_tol=1e-9)
            assert math.isclose(r["time_ratio"], r["epoch_s"] / base["epoch_s"], rel_tol=1e-12)
            assert math.isclose(r["time_ratio_sum"], r["epoch_s_sum"] / base["epoch_s_sum"], rel_tol=1e-12)
            assert math.isclose(r["acc_points"], r["accuracy"] - base["accuracy"], abs_tol=1e-9)
        milf = rows["lsh+sketch"]
        assert math.isclose(milf["time_vs_lsh"], milf["epoch_s"] / rows["lsh"]["epoch_s"], rel_tol=1e-12)
        assert math.isclose(milf["time_vs_sketch"], milf["epoch_s"] / rows["sketch"]["epoch_s"], rel_tol=1e-12)
        assert base["time_ratio"] == 1.0 and base["acc_points"] == 0.0


def test_cnnslide_markdown_plot_and_paper_figures(cnnslide_run):
    section, out = cnnslide_run
    md = section.markdown
    # the paper's figures, in their own columns
    for quoted in ("~0.70x (about 30% less)", "about 15% less", "about 2-3% lower", "about 5% lower", "~29%",
                   "paper: time vs vanilla", "paper: acc vs vanilla (points)", "~-5", "~-2 to -3"):
        assert quoted in md, quoted
    # ours, as stored
    for r in section.rows:
        assert f"| {r['net']} | {r['variant']} |" in md
        assert f"{r['time_ratio']:.2f}x" in md and f"{r['acc_points']:+.1f}" in md
    assert "What differs from the paper" in md and "vgg_style runs with `--full` only" in md
    assert section.plots == ["cnnslide_time_accuracy.png"]
    assert (out / section.plots[0]).read_bytes()[:8] == PNG_MAGIC
    assert all(p["paper"].startswith("Chadha") and p["source"] for p in section.paper)
    json.dumps(_finite({"rows": section.rows, "paper": section.paper}), allow_nan=False)


def test_cnnslide_variants_use_the_demo_configs():
    """The demo patches conv2 and conv3 of its 3-layer CNN; the section's cnn3 variants get the same configs, except
    the selection: the section runs CNN-SLIDE's per-batch sets, the demo the package default (per sample)."""

    def same_but_selection(config):
        data = config.to_dict()
        for d in (data, data.get("alsh", {})):
            d.pop("selection", None)
        return data

    per_epoch = 7
    demo_fns = {"lsh": demo._alsh, "sketch": demo._sketch, "lsh+sketch": demo._milf}
    for variant, fn in demo_fns.items():
        theirs = fn(demo.three_layer_cnn(), per_epoch)
        ours = cnnslide.patch_variant(cnnslide.NETS["cnn3"](), variant, cnnslide.LAYERS["cnn3"], per_epoch)
        for name in ("conv2", "conv3"):
            assert type(getattr(ours, name)) is type(getattr(theirs, name))
            assert same_but_selection(getattr(ours, name).config) == same_but_selection(getattr(theirs, name).config)
            if variant != "sketch":
                assert getattr(ours, name).alsh_config.selection == "batch"


# ---------------------------------------------------------------------------------------------------- csg
def _plain_csg_count(model: torch.nn.Module, only_3x3: bool, slice_oc=(16, 16), code=128) -> int:
    """A deliberately plain count: every conv but the first becomes ceil(O/16) ceil(C/16) ceil(kh/3) ceil(kw/3)
    codes of 128, plus one 2304 x 128 generator; every other parameter stays."""
    total, generator = 0, 16 * 16 * 3 * 3 * code
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name != "conv1" and (not only_3x3 or m.kernel_size == (3, 3)):
            slices = (-(-m.out_channels // slice_oc[0]) * -(-m.in_channels // slice_oc[1])
                      * -(-m.kernel_size[0] // 3) * -(-m.kernel_size[1] // 3))
            total += slices * code + (m.bias.numel() if m.bias is not None else 0)
        elif not list(m.children()):
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total + generator


def test_resnet56_counts_match_table_1():
    rows = {r["model"]: r for r in csg.resnet_rows(Context(progress=False))}
    model = resnet56()
    assert rows["dense"]["params"] == sum(p.numel() for p in model.parameters()) == 855_770
    assert rows["csg"]["params"] == _plain_csg_count(model, only_3x3=False)
    assert rows["csg_3x3"]["params"] == _plain_csg_count(model, only_3x3=True)
    # the generator counted once, however many layers hold it
    for key in ("csg", "csg_3x3"):
        r = rows[key]
        assert r["generator"] == 2304 * 128 and r["params"] == r["generator"] + r["codes"] + r["other"]
    # without the two projection shortcuts (the paper's option A) the counts are Table 1's
    assert rows["dense"]["params_option_a"] == csg.PAPER_DENSE["params"] == 853_018
    assert rows["csg"]["params_option_a"] == rows["csg_3x3"]["params_option_a"] == csg.PAPER_CSG["params"] == 347_162
    assert rows["csg_3x3_frozen"]["params_option_a"] == csg.PAPER_PRETRAINED["params"] == 52_250
    assert rows["csg_3x3_frozen"]["generator"] == 0 and rows["csg_3x3_frozen"]["generator_all"] == 294_912
    assert f"{rows['csg_3x3']['ratio_option_a']:.2f}" == "2.46" and rows["csg_3x3"]["paper_ratio"] == 2.45
    for r in rows.values():
        assert math.isclose(r["ratio"], rows["dense"]["params"] / r["params"], rel_tol=1e-12)
    # first conv dense, every other conv converted in the default patch
    converted = rows["csg"]["_model"]
    assert isinstance(converted.conv1, torch.nn.Conv2d)
    assert isinstance(converted.layer2[0].downsample[0], tritonslide.nn.CSGConv2d)
    assert isinstance(rows["csg_3x3"]["_model"].layer2[0].downsample[0], torch.nn.Conv2d)


@pytest.fixture(scope="module")
def csg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("csg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(csg, "QUICK", csg.Scale(epochs=2, train_subset=32, test_subset=32, batch_size=32))
        section = run_section("csg", Context(out_dir=out, progress=False, seed=0))
    return section, out


def test_csg_section_rows_ratios_plot_and_paper_figures(csg_run):
    section, out = csg_run
    parts = [r["part"] for r in section.rows]
    assert parts.count("resnet56") == 4 and parts.count("counts") == 4 and parts.count("trained") == 2
    trained = {r["model"]: r for r in section.rows if r["part"] == "trained"}
    dense, model = trained["dense"], trained["csg"]
    assert dense["net"] == "cnn8" and dense["steps"] == 2 and dense["converted"] == ""
    assert model["converted"] == "conv2,conv3,conv4,conv5,conv6"  # the first conv stays dense
    assert model["generator"] == 294_912 and model["params"] == model["generator"] + model["codes"] + model["other"]
    for r in (dense, model):
        assert math.isclose(r["param_ratio"], dense["params"] / r["params"], rel_tol=1e-12)
        assert math.isclose(r["time_ratio"], r["epoch_s"] / dense["epoch_s"], rel_tol=1e-12)
        assert math.isclose(r["acc_points"], r["accuracy"] - dense["accuracy"], abs_tol=1e-9)
    timed = {r["model"]: r for r in section.rows if r["part"] == "resnet56" and "size_mb" in r}
    assert set(timed) == {"dense", "csg"} and timed["csg"]["size_mb"] < timed["dense"]["size_mb"]
    assert timed["csg"]["step_ms"] is None and "train step (`--full` only)" in section.markdown  # quick: not timed
    assert all("_model" not in r for r in section.rows)
    json.dumps(_finite({"rows": section.rows, "paper": section.paper}), allow_nan=False)
    md = section.markdown
    for quoted in ("853,018", "347,162", "52,250", "2.45x", "16.3x", "7.04%", "6.12%", "11.43%", "14.51 s", "14.74 s",
                   "3.33", "1.40", "paper: params (Table 1)", "What differs from the paper"):
        assert quoted in md, quoted
    assert f"{model['acc_points']:+.1f}" in md and f"{model['time_ratio']:.2f}x" in md
    assert section.plots == ["csg_params_accuracy.png"]
    assert (out / section.plots[0]).read_bytes()[:8] == PNG_MAGIC
    assert all(p["paper"].startswith("Omidvar") and p["source"] for p in section.paper)


def test_csg_step_timing_ratio_follows_from_the_stored_times():
    """The ResNet-56 timing path (``--full``), on a ResNet-8 so that it stays short."""
    torch.manual_seed(0)
    small = ResNet([1, 1, 1], [16, 32, 64], 10, 3, "cifar")
    rows = [{"model": "dense", "_model": small},
            {"model": "csg", "_model": tritonslide.patch(copy.deepcopy(small), "csg", init="scratch")}]
    csg.resnet_timing(rows, Context(progress=False), csg.Scale(epochs=1, resnet_batch=2, resnet_rounds=2))
    dense, model = rows
    assert dense["step_ms"] > 0 and model["step_ms"] > 0 and dense["step_ratio"] == 1.0
    assert math.isclose(model["step_ratio"], model["step_ms"] / dense["step_ms"], rel_tol=1e-12)
    assert math.isclose(model["size_ratio"], model["size_mb"] / dense["size_mb"], rel_tol=1e-12)
