"""``tritonslide compare`` section ``selection`` (issue #15), at a tiny scale (module constants shrunk).

Checks what the section returned: a row per (net, trained with, tested with) and per (model, variant), ratios that
follow from the stored figures, batch independence of the per-sample variant, the markdown tables. No time is
asserted (STYLE.md practice 7).
"""

from __future__ import annotations

import json

import pytest
import torch

from tritonslide.compare import Context, selection

for _module in ("sklearn", "matplotlib", "pytest_benchmark", "tqdm"):
    pytest.importorskip(_module)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        # 2 x 3 training steps of cnn3; AlexNet / VGG-11 on two 64-px crops (AlexNet's smallest input is 63 px)
        mp.setattr(selection, "QUICK", selection.Scale(nets=("cnn3",), epochs=1, train_subset=192, batch=2, size=64,
                                                       rounds=1, threads=1))
        section = selection.run(Context(scale="quick", out_dir=out, progress=False))
    return section, threads


def test_digits_rows_cover_every_training_and_test_selection(run):
    section, _ = run
    rows = [r for r in section.rows if r["part"] == "digits"]
    got = {(r["net"], r["trained"], r["tested"]) for r in rows}
    assert got == {("cnn3", t, e) for t in selection.SELECTIONS for e in selection.SELECTIONS}
    for r in rows:
        assert 0 <= r["accuracy"] <= 100 and 0 < r["active_fraction_test"] <= 1
        assert r["train_images"] == 192
    json.dumps(section.rows)


def test_batchnorm_rows_cover_every_start_mode_and_selection(run):
    section, _ = run
    rows = [r for r in section.rows if r["part"] == "batchnorm"]
    got = {(r["start"], r["batchnorm"], r["trained"], r["tested"]) for r in rows}
    tested = selection.SELECTIONS
    want = {("scratch", b, t, e) for b in selection.BATCHNORM_MODES for t in tested for e in tested}
    want |= {("dense", "-", "dense", e) for e in tested}
    want |= {("converted", b, t, e) for b in selection.BATCHNORM_MODES for t in ("none", *tested) for e in tested}
    assert got == want
    for r in rows:
        assert 0 <= r["accuracy"] <= 100
    dense = [r["accuracy"] for r in rows if r["start"] == "dense"]
    assert dense[0] == dense[1]  # the dense net has no selection: both test passes give the same accuracy
    assert "| start | trained with (epochs) | BatchNorm |" in section.markdown


def test_densenet_rows_cover_every_pairing(run):
    section, _ = run
    rows = [r for r in section.rows if r["part"] == "batchnorm_densenet"]
    got = {(r["batchnorm"], r["trained"], r["tested"]): r["imputed_batchnorms"] for r in rows}
    tested = selection.SELECTIONS
    assert set(got) == {(b, t, e) for b, t in [("-", "dense"), ("keep", "batch"), ("order", "batch"),
                                                 ("impute", "batch"), ("impute", "sample")] for e in tested}
    # registration order pairs none of the BatchNorms after the concatenations; the data flow pairs all six
    assert {k[0]: v for k, v in got.items()} == {"-": 0, "keep": 0, "order": 0, "impute": 6}
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
    assert "| BatchNorm | trained with (epochs) | imputing BatchNorms |" in section.markdown


def test_imagenet_rows_ratios_and_batch_independence(run):
    section, threads = run
    rows = [r for r in section.rows if r["part"] == "imagenet"]
    assert {(r["model"], r["variant"]) for r in rows} == {
        (m, v) for m in selection.IMAGENET_MODELS for v in ("dense", "alsh_batch", "alsh_sample")}
    for model in selection.IMAGENET_MODELS:
        by = {r["variant"]: r for r in rows if r["model"] == model}
        assert by["alsh_sample"]["sample_vs_batch"] == pytest.approx(
            by["alsh_sample"]["median_s"] / by["alsh_batch"]["median_s"])
        assert by["alsh_batch"]["vs_dense"] == pytest.approx(by["dense"]["median_s"] / by["alsh_batch"]["median_s"])
        assert by["alsh_sample"]["alone_vs_batch_rel"] <= 1e-5  # per sample: the batch changes nothing
        assert by["alsh_sample"]["alone_vs_batch_argmax_agree"] == 1.0
    assert torch.get_num_threads() == threads


def test_markdown_has_both_tables(run):
    section, _ = run
    assert "| net | trained with | tested with |" in section.markdown
    assert "| model | variant | median s / batch |" in section.markdown
    assert "No paper reports per-sample selection" in section.markdown
