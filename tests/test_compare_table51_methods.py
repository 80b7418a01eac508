"""``tritonslide compare`` sections ``table51`` and ``methods``, run at a tiny scale (module constants shrunk).

Each section runs once per module (a fixture) and the tests check what it returned: a row for every model / variant
or method, ratios that follow from the stored figures, the plot file, the paper's figures in the markdown. No time is
asserted (STYLE.md practice 7).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import tritonslide
from tritonslide._benchtools import sample_crops
from tritonslide.compare import Context, table51
from tritonslide.compare import methods as methods_section
from tritonslide.demo import DigitsSplit, load_digits_split, three_layer_cnn

# the sections import these when they run (the `demo` / `bench` extras)
for _module in ("sklearn", "matplotlib", "pytest_benchmark", "tqdm"):
    pytest.importorskip(_module)


# ---------------------------------------------------------------------------------------------------- table51
@pytest.fixture(scope="module")
def table51_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("table51")
    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        # AlexNet's smallest input is 63x63. One thread and torch's default would double the forwards (and the ~15 s
        # this fixture takes, most of it imports, building VGG-11 and patching copies of it)
        mp.setattr(table51, "QUICK", table51.Scale(batch=2, size=64, rounds=1, warmup=0, threads=(1,)))
        section = table51.run(Context(scale="quick", out_dir=out, progress=False))
    return section, out, threads_before


def test_table51_rows_cover_every_model_variant_and_thread_setting(table51_run):
    section, _, threads_before = table51_run
    labels = {"1"}
    got = {(r["model"], r["variant"], r["threads_label"]) for r in section.rows}
    assert got == {(m, v, t) for m in table51.MODELS for v in table51.VARIANTS for t in labels}
    assert len(section.rows) == len(got)
    assert torch.get_num_threads() == threads_before
    json.dumps(section.rows)  # JSON-able as stored


def test_table51_ratios_and_active_fractions(table51_run):
    section, _, _ = table51_run
    convs = {"alexnet": 5, "vgg11": 8}
    for r in section.rows:
        dense = next(d for d in section.rows if d["model"] == r["model"] and d["variant"] == "dense"
                     and d["threads_label"] == r["threads_label"])
        assert r["speedup"] == pytest.approx(dense["mean_s"] / r["mean_s"])
        assert r["mean_s"] == pytest.approx(sum(r["times_s"]) / len(r["times_s"]))
        assert (r["batch"], r["size"], r["rounds"]) == (2, 64, 1)
        if r["variant"] == "dense":
            assert r["active_fraction"] is None and r["alsh_layers"] == 0 and r["speedup"] == 1.0
        else:
            # every conv, or every conv but the first (patch's default)
            assert r["alsh_layers"] == convs[r["model"]] - (r["variant"] == "alsh_default")
            assert 0.0 < r["active_fraction"] <= 1.0


def test_table51_plot_markdown_and_paper(table51_run):
    section, out, _ = table51_run
    assert section.plots == ["table51_time_per_batch.png"]
    assert (out / section.plots[0]).stat().st_size > 0
    for figure in ("2.94", "1.83", "25.33", "18.54", "1.61x", "1.37x"):
        assert figure in section.markdown
    assert "Quick run: batch 2 at 64x64" in section.markdown
    assert section.markdown.count("| AlexNet |") == 3 and section.markdown.count("| VGG-11 |") == 3
    cifar10 = {p["model"]: p for p in section.paper if p["dataset"] == "CIFAR-10"}
    assert cifar10["alexnet"]["dense_s"] == 2.94 and cifar10["alexnet"]["alsh_s"] == 1.83
    assert cifar10["vgg11"]["speedup"] == pytest.approx(25.33 / 18.54)
    assert all(p["source"].startswith("Feeney 2019 Table 5.1") for p in section.paper)


def test_table51_times_each_thread_setting_and_restores_torchs(tmp_path, monkeypatch):
    # AlexNet only (a VGG-11 costs seconds to build): at one thread and at torch's default, as --full does
    monkeypatch.setattr(table51, "MODELS", {"alexnet": table51.MODELS["alexnet"]})
    monkeypatch.setattr(table51, "QUICK", table51.Scale(batch=1, size=63, rounds=1, warmup=0, threads=(1, None)))
    before = torch.get_num_threads()
    section = table51.run(Context(scale="quick", out_dir=tmp_path, progress=False))
    assert torch.get_num_threads() == before
    assert [(r["variant"], r["threads_label"]) for r in section.rows] == [
        (v, t) for v in table51.VARIANTS for t in ("1", f"default ({before})")]
    assert [r["threads"] for r in section.rows] == [1, None] * len(table51.VARIANTS)
    for r in section.rows:
        dense = next(d for d in section.rows if d["variant"] == "dense" and d["threads"] == r["threads"])
        assert r["speedup"] == pytest.approx(dense["mean_s"] / r["mean_s"])
    assert (tmp_path / "table51_time_per_batch.png").exists()


def test_table51_full_is_the_papers_setting():
    assert (table51.FULL.batch, table51.FULL.size) == (64, 224)
    assert 1 in table51.FULL.threads


def test_photo_crops_are_seeded_normalized_photographs():
    a = sample_crops(3, 67, seed=1)
    assert a.shape == (3, 3, 67, 67) and a.dtype == torch.float32
    assert torch.equal(a, sample_crops(3, 67, seed=1))
    assert not torch.equal(a, sample_crops(3, 67, seed=2))
    # ImageNet normalization of [0, 1] pixels: within [-0.485/0.229, (1-0.406)/0.225]
    assert a.min() >= -2.12 and a.max() <= 2.64
    assert a.std() > 0.3  # a photograph, not a flat image


# ---------------------------------------------------------------------------------------------------- methods
TRAIN_SUBSET = 320


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    threads_before = torch.get_num_threads()
    def small_digits(seed: int) -> DigitsSplit:  # 320 of the 1,347 training images: 5 steps an epoch
        d = load_digits_split(seed)
        return DigitsSplit(d.x_train[:TRAIN_SUBSET], d.y_train[:TRAIN_SUBSET], d.x_test, d.y_test)

    _, make_net, description = methods_section.NETS["demo_cnn_8x8"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(methods_section.NETS, "demo_cnn_8x8", (small_digits, make_net, description))
        mp.setattr(methods_section, "QUICK", methods_section.Scale(net="demo_cnn_8x8", epochs=2))
        section = methods_section.run(Context(scale="quick", out_dir=out, progress=False))
    return section, out, threads_before


def test_methods_rows_for_every_method(methods_run):
    section, _, threads_before = methods_run
    assert [r["method"] for r in section.rows] == ["dense", "alsh", "sketch", "milf", "lowrank", "csg"]
    assert torch.get_num_threads() == threads_before
    steps = 2 * math.ceil(TRAIN_SUBSET / 64)  # two epochs
    for r in section.rows:
        assert r["steps"] == steps
        assert 0.0 <= r["accuracy_converted"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["params"] > 0 and r["macs_per_sample"] > 0
    assert section.rows[0]["output_error"] == 0.0
    assert section.rows[0]["converted_layers"] is None
    for r in section.rows[1:]:
        assert "conv1" not in (r["converted_layers"] or "")  # the first conv stays dense
        assert r["converted_layers"]
    json.dumps(section.rows)


def test_methods_ratios_follow_from_stored_figures(methods_run):
    section, _, _ = methods_run
    dense = section.rows[0]
    for r in section.rows:
        assert r["step_ratio"] == pytest.approx(r["step_ms_median"] / dense["step_ms_median"])
        assert r["params_ratio"] == pytest.approx(dense["params"] / r["params"])
        assert r["macs_ratio"] == pytest.approx(dense["macs_per_sample"] / r["macs_per_sample"])
        assert r["accuracy_change_points"] == pytest.approx(100 * (r["accuracy"] - dense["accuracy"]))
    # ALSH keeps the dense Parameters; low rank 8 of 32->64 and 64->64 3x3 convs has fewer
    by = {r["method"]: r for r in section.rows}
    assert by["alsh"]["params"] == dense["params"]
    assert by["lowrank"]["params"] < dense["params"]


def test_methods_plot_markdown_and_paper(methods_run):
    section, out, _ = methods_run
    assert section.plots == ["methods_accuracy_time.png"]
    assert (out / section.plots[0]).stat().st_size > 0
    for claim in ("2.45", "30%", "87.02", "0.70"):
        assert claim in section.markdown
    assert {p["method"] for p in section.paper} == set(methods_section.METHODS)
    assert all(p["source"] for p in section.paper)
    assert any("left dense: fc" in n for n in section.notes)  # sketch's warning is kept


@pytest.mark.parametrize("method", [None, "lowrank"])
def test_macs_per_sample_matches_summary_for_data_independent_layers(method):
    # tritonslide.summary is the reference for layers whose cost does not depend on the input
    model = three_layer_cnn()
    if method is not None:
        model = tritonslide.patch(model, method)
    x = torch.randn(5, 1, 8, 8)
    assert methods_section.macs_per_sample(model, x) == tritonslide.summary(model, (5, 1, 8, 8)).totals.macs_after


def test_methods_full_trains_longer_on_28x28():
    assert methods_section.FULL.epochs >= 12 and methods_section.FULL.net == "cnn3_28x28"


def test_finetune_interleaved_trains_as_demo_train_does():
    # the interleaved loop must be demo.train's (Adam lr 1e-3, cross-entropy, the seed's batch order), step for step
    from tritonslide.demo import train

    gen = torch.Generator().manual_seed(3)
    data = DigitsSplit(torch.randn(150, 1, 8, 8, generator=gen), torch.randint(0, 10, (150,), generator=gen),
                       torch.randn(10, 1, 8, 8, generator=gen), torch.randint(0, 10, (10,), generator=gen))
    reference, other = three_layer_cnn(), three_layer_cnn()
    copies = {"a": copy.deepcopy(reference), "b": other}
    train(reference, data, epochs=2, batch_size=64, seed=5, progress=False)
    times = methods_section.finetune_interleaved(copies, data, epochs=2, batch_size=64, seed=5, progress=False)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}  # 3 batches (64, 64, 22) x 2 epochs
    for p_ref, p in zip(reference.parameters(), copies["a"].parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
