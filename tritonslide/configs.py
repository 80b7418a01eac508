"""Configs of the tritonslide methods: frozen dataclasses that check their fields and serialize to a dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


def _check_int(cls: str, name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{cls}.{name} must be {bound}, got {value}")


class _ConfigBase:
    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields plus ``method``; :meth:`from_dict` inverts it."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__}.from_dict: got a config of method {method!r}, expected {cls.method!r}")
        return cls(**data)


@dataclass(frozen=True)
class ALSHConfig(_ConfigBase):
    """Hyperplane ALSH convolution (Feeney 2019, shared/papers/001, sec. 3.3.1, 4.1, 5.1.1).

    tables (L) and bits (K): L hash tables of K concatenated hyperplane bits each (gap amplification, 3.2.4).
    top_buckets: the most frequent query codes taken per table (5 in the thesis; 1 is the plain mode of 4.2).
    m: number of terms the P transform appends, ``0.5 - ||w||^(2^i)`` for i = 1..m (eq. 3.5); Q appends m zeros.
    norm_bound (U): filters are scaled by ``U / max ||w||`` before P so that ``||w|| <= U < 1`` (3.3.1).
    seed: seed of the random hyperplanes (each patched layer mixes in its qualified name).
    rebuild_every: re-hash the filters every this many training forwards; None rebuilds only on demand
        (``tritonslide.rebuild_tables``). The thesis rebuilt once per epoch (5.3.2).
    min_active: lower bound on the active set; filters whose buckets collected the most query votes fill it up,
        so the set is never empty (NaN inputs included).
    share_active_set: read only the previous ALSH layer's active channels when ``patch`` linked the two
        (last-active-set sharing, Alg. 6).
    """

    tables: int = 3
    bits: int = 5
    top_buckets: int = 5
    m: int = 2
    norm_bound: float = 0.75
    seed: int = 0
    rebuild_every: int | None = None
    min_active: int = 1
    share_active_set: bool = True

    method: ClassVar[str] = "alsh"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(name, "tables", self.tables, 1, 64)
        _check_int(name, "bits", self.bits, 1, 16)
        _check_int(name, "top_buckets", self.top_buckets, 1, 1 << self.bits)
        _check_int(name, "m", self.m, 0, 8)
        if isinstance(self.norm_bound, bool) or not isinstance(self.norm_bound, (int, float)):
            raise TypeError(f"{name}.norm_bound must be a float, got {self.norm_bound!r}")
        if not 0.0 < float(self.norm_bound) < 1.0:
            raise ValueError(f"{name}.norm_bound (U) must lie in (0, 1), got {self.norm_bound}")
        _check_int(name, "seed", self.seed, 0)
        if self.rebuild_every is not None:
            _check_int(name, "rebuild_every", self.rebuild_every, 1)
        _check_int(name, "min_active", self.min_active, 1)
        if not isinstance(self.share_active_set, bool):
            raise TypeError(f"{name}.share_active_set must be a bool, got {self.share_active_set!r}")

    @property
    def covers_all_codes(self) -> bool:
        """True when every bucket is taken, so every filter is active (the layer equals the dense conv)."""
        return self.top_buckets >= 1 << self.bits


__all__ = ["ALSHConfig"]
