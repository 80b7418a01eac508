"""tritonslide.summary: costs against hand-computed formulas; the model's state is left as it was."""

import pytest
from torch import nn

import tritonslide
from tritonslide import ALSHConfig


def model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(),
        nn.Conv2d(12, 10, 1, groups=2), nn.Flatten(), nn.Linear(10 * 3 * 3, 7),
    )


def test_dense_costs_match_formulas():
    s = tritonslide.summary(model(), (2, 3, 7, 7))
    rows = {r.name: r for r in s.layers}
    assert rows["0"].macs_before == 8 * 3 * 9 * 7 * 7 and rows["0"].params_before == 8 * 3 * 9 + 8
    assert rows["2"].macs_before == 12 * 8 * 9 * 3 * 3
    assert rows["4"].macs_before == 10 * 6 * 3 * 3  # groups=2: each output reads 6 channels
    assert rows["6"].macs_before == 90 * 7 and rows["6"].params_after == 90 * 7 + 7
    assert all(r.method == "dense" and r.macs_after == r.macs_before for r in s.layers)
    assert s.totals.macs_before == sum(r.macs_before for r in s.layers)
    assert "total" in str(s) and "params before" in str(s)


def test_alsh_rows_and_state_restored():
    with pytest.warns(UserWarning, match=r"4 \(groups=2\)"):
        m = tritonslide.patch(model(), ALSHConfig(tables=2, bits=3, top_buckets=8))  # every filter active
    m.train()
    s = tritonslide.summary(m, (2, 3, 7, 7))
    row = next(r for r in s.layers if r.name == "2")
    assert row.method == "alsh" and row.params_after == row.params_before
    # all active: the dense conv plus the hashing of L*K = 6 projections per patch
    assert row.macs_after == (12 + 6) * 8 * 9 * 3 * 3
    assert m.training and int(m[2].steps) == 0 and tritonslide.stats(m)["2"].calls == 0
