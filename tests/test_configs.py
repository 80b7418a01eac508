import dataclasses

import pytest

from tritonslide import ALSHConfig


def test_defaults_are_the_thesis_settings():
    c = ALSHConfig()
    assert (c.tables, c.bits, c.top_buckets, c.m) == (3, 5, 5, 2)  # sec. 5.1.1
    assert 0 < c.norm_bound < 1 and c.min_active >= 1 and c.share_active_set and c.rebuild_every is None


def test_frozen_and_round_trips_through_dict():
    c = ALSHConfig(tables=4, bits=6, rebuild_every=10, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits = 3
    d = c.to_dict()
    assert d["method"] == "alsh"
    assert ALSHConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="method"):
        ALSHConfig.from_dict({**d, "method": "csg"})


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"tables": 0}, ValueError),
        ({"bits": 17}, ValueError),
        ({"bits": 2, "top_buckets": 5}, ValueError),
        ({"top_buckets": 0}, ValueError),
        ({"m": -1}, ValueError),
        ({"norm_bound": 1.0}, ValueError),
        ({"norm_bound": "0.5"}, TypeError),
        ({"rebuild_every": 0}, ValueError),
        ({"min_active": 0}, ValueError),
        ({"share_active_set": 1}, TypeError),
        ({"tables": 2.0}, TypeError),
        ({"seed": True}, TypeError),
    ],
)
def test_validation(kwargs, exc):
    with pytest.raises(exc, match="ALSHConfig"):
        ALSHConfig(**kwargs)


def test_covers_all_codes():
    assert ALSHConfig(bits=2, top_buckets=4).covers_all_codes
    assert not ALSHConfig().covers_all_codes
