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


# ALSHConfig.selection: one active set per sample, per batch, or per batch in training and per sample in eval
SELECTIONS = ("auto", "batch", "sample")


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
    sync_active_set: under ``torch.distributed`` (DDP), all-reduce each layer's bucket histogram over the ranks of
        the default process group before choosing, so every rank computes the same filters: those a single process
        would choose for the concatenated global batch. One all-reduce of L * 2**K int64 per layer and step. Off by
        default: each rank then chooses from its own batch (DDP still averages the gradients of all filters).
        Ignored without an initialized process group of more than one rank and where the set is chosen per sample;
        not part of a layer's saved identity (a state_dict loads whatever this flag).
    selection: who shares an active set (issue #15). ``"sample"``: every sample's own histogram (over its own
        patches) picks its own filters, and a linked next layer reads each sample's own active channels, so a
        sample's output never depends on its batch companions. ``"batch"``: one set from the histogram of the
        whole batch (the thesis' setting), in training and in eval: a prediction then depends on the batch it is
        served in. ``"auto"`` (default): per batch while training, per sample in eval. Not part of a layer's saved
        identity. Default chosen by measurement (README, "Per-sample active sets"): per-sample training takes
        1.45-2.1x the per-batch step on a CPU (more than dense training on the digits CNNs) and, tested per sample,
        scored about the same as per-batch training on the digits CNNs without BatchNorm (cnn3 96.1 vs 95.3%, cnn8
        86.7 vs 88.7%, four seeds) and higher where BatchNorm follows the ALSH layers (cnn3_bn 98.1 vs 96.4%; a
        DenseNet whose ALSH outputs reach BatchNorm through concatenations 97.3 vs 69.4%). So training stays per
        batch by default (cheaper) and ``"sample"`` is a choice where the accuracy is worth the time. With a plain
        BatchNorm after the layer per-sample training is unstable (a channel active in a few samples of the batch
        gets tiny batch statistics: on a fresh MobileNetV2 the largest gradient was 350x-5000x the per-batch one,
        and SGD reached NaN in 3 steps); the imputing BatchNorm that ``tritonslide.patch`` puts there
        (``ImputedBatchNorm2d``) is stable, and ``patch`` / ``set_selection`` warn when ``"sample"`` meets a model
        with plain BatchNorm layers.
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
    sync_active_set: bool = False
    selection: str = "auto"

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
        for flag in ("share_active_set", "sync_active_set"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{name}.{flag} must be a bool, got {getattr(self, flag)!r}")
        _check_choice(name, "selection", self.selection, SELECTIONS)

    def per_sample(self, training: bool) -> bool:
        """Whether a layer in this mode (``module.training``) chooses one active set per sample."""
        return self.selection == "sample" or (self.selection == "auto" and not training)

    @property
    def covers_all_codes(self) -> bool:
        """True when every bucket is taken, so every filter is active (the layer equals the dense conv)."""
        return self.top_buckets >= 1 << self.bits



def _check_choice(cls: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{cls}.{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class SketchConfig(_ConfigBase):
    """Tensor sketching: SK-CONV / SK-FC (Kasiviswanathan et al., shared/papers/004, Def. 1-4, eq. 1, 2, 4).

    k: sketch size. pairs (l): number of independent sketch pairs averaged.
    mode: ``"output"`` keeps the terms ``S1 x_4 U1^T`` (the output side sketched, mat(S1) = mat(K) U1^T),
        ``"input"`` the terms ``S2 (.) U2^T`` (the input side sketched, mat(S2) = U2 mat(K)), ``"both"`` both, as
        in eq. 1 / 4 (scale ``1 / (2 l)``; ``1 / l`` with one mode).
    distribution: of the fixed random matrices: ``"sign"`` is Def. 1 (``Z / sqrt(k)``, entries +-1);
        ``"uniform"`` is CNN-SLIDE's ``U(-1, 1)`` (shared/papers/000, sec. 4.2), scaled by ``sqrt(3 / k)`` so that
        ``E[U^T U] = I`` as well, which keeps the estimator unbiased. CNN-SLIDE's sketch conv with ``s`` sketches
        of width ``k`` is ``SketchConfig(k=k, pairs=s, mode="output", distribution="uniform")``.
    seed: seed of the random matrices (each patched layer mixes in its qualified name).
    init: how ``from_dense`` (so ``patch``) sets the sketches from a dense layer's weight ``W``:
        ``"fit"``: least squares given the fixed random matrices, i.e. the projection of ``W`` on what the sketch
        can represent; the weight (and output) error is at most ``||W||`` and the smallest the budget allows.
        ``"unbiased"``: the paper's estimator (Theorems 3.1 / 3.2), unbiased but with a relative error of about
        ``sqrt(d1 / (l k))`` per layer, which compounds through depth. ``"scratch"``: ``W`` is ignored and the
        sketches are drawn so that the layer has ``nn.Conv2d`` / ``nn.Linear``'s default output scale (training
        from scratch: a fit keeps only about ``sqrt(l k / d1)`` of a random weight's output scale); the sketches get
        the dense weight's norm. ``"auto"`` (default): ``patch`` takes ``"scratch"`` when every layer it converts
        is statistically indistinguishable from a random init (:func:`tritonslide.nn.looks_untrained`: a fresh
        model), ``"fit"`` otherwise; ``from_dense`` on its own fits.
    """

    k: int = 16
    pairs: int = 1
    # "output" by default: on a 3x3 conv the input side's chain is k*kh*kw = 144 channels wide per pair, which made
    # layers of a small CNN cost 3.1-3.6x the dense multiply-adds with mode "both" (k=16); the output side costs
    # l*k*(C*kh*kw + O) per position, well under the dense O*C*kh*kw. Both modes are unbiased.
    mode: str = "output"
    distribution: str = "sign"
    seed: int = 0
    init: str = "auto"

    method: ClassVar[str] = "sketch"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(name, "k", self.k, 1)
        _check_int(name, "pairs", self.pairs, 1)
        _check_choice(name, "mode", self.mode, ("output", "input", "both"))
        _check_choice(name, "distribution", self.distribution, ("sign", "uniform"))
        _check_int(name, "seed", self.seed, 0)
        _check_choice(name, "init", self.init, ("auto", "fit", "unbiased", "scratch"))


@dataclass(frozen=True)
class MILFConfig(_ConfigBase):
    """CNN-SLIDE / MILF (shared/papers/000, sec. 4.3): ALSH filter selection on a sketched convolution.

    sketch: the sketch layer's config; the default is CNN-SLIDE's own sketch conv (sec. 4.2: output side, uniform
        random matrices) of width k = 32 (the paper gives no k). alsh: the ALSH tables and selection (sec. 4.1,
        Feeney 2019).
    """

    # k = 32, not SketchConfig's 16: converting the trained 3-layer digits CNN (98.0%) and fine-tuning it as long as
    # it trained (`tritonslide demo --convert`, 3 batch orders) gave 95.1-96.0% at k = 16, 97.1-97.6% at k = 32
    # (ALSH selection on top of the sketch loses more than either alone: sketch k = 16 alone reached 97.8%).
    sketch: SketchConfig = SketchConfig(k=32, pairs=1, mode="output", distribution="uniform")
    alsh: ALSHConfig = ALSHConfig()

    method: ClassVar[str] = "milf"

    def __post_init__(self) -> None:
        if not isinstance(self.sketch, SketchConfig):
            raise TypeError(f"MILFConfig.sketch must be a SketchConfig, got {type(self.sketch).__name__}")
        if not isinstance(self.alsh, ALSHConfig):
            raise TypeError(f"MILFConfig.alsh must be an ALSHConfig, got {type(self.alsh).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sketch": self.sketch.to_dict(), "alsh": self.alsh.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MILFConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"MILFConfig.from_dict: got a config of method {method!r}, expected 'milf'")
        return cls(
            sketch=SketchConfig.from_dict(data.get("sketch", {})), alsh=ALSHConfig.from_dict(data.get("alsh", {}))
        )


@dataclass(frozen=True)
class LowRankConfig(_ConfigBase):
    """Rank-N filter approximation (Jaladi, shared/papers/002, sec. VI-IX).

    scheme ``"filter"``: every 2-D filter slice ``W[o, c]`` replaced by its best rank-``rank`` approximation
        (truncated SVD, Eckart-Young); equal to the dense conv at full rank (``rank >= min(kh, kw)``). It runs as
        separable vertical-then-horizontal convolutions only where that saves multiply-adds and memory (it keeps
        C*O*rank intermediate maps: on 3x3 kernels only rank 1 saves, and only for small layers); otherwise as one
        conv with the rebuilt kernel. It holds ``rank*(kh+kw)`` numbers per slice, so on 3x3 kernels it saves
        parameters only at rank 1; the default rank 8 is capped to 3 there (exact, twice the dense parameters).
    scheme ``"channel"``: ``rank`` separable basis filters shared across channels: a vertical conv C -> rank
        (kh x 1), then a horizontal conv rank -> O (1 x kw), with weights from the SVD of the kernel reshaped to
        (C*kh) x (O*kw); the form that is cheaper than the dense conv on ordinary layers.
    ``rank`` is capped at each layer's full rank (where the layer is exact).
    init: how ``from_dense`` (so ``patch``) sets the factors: ``"fit"``, the truncated SVD (the best rank-r
        approximation, Eckart-Young); ``"scratch"``, the dense weight ignored, random factors scaled to the
        dense weight's norm (training from scratch); ``"auto"`` (default): ``patch`` takes ``"scratch"`` when every
        layer it converts is statistically indistinguishable from a random init
        (:func:`tritonslide.nn.looks_untrained`: a fresh model), ``"fit"`` otherwise; ``from_dense`` fits.
    """

    rank: int = 8
    scheme: str = "channel"
    init: str = "auto"

    method: ClassVar[str] = "lowrank"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(name, "rank", self.rank, 1)
        _check_choice(name, "scheme", self.scheme, ("filter", "channel"))
        _check_choice(name, "init", self.init, ("auto", "fit", "scratch"))


@dataclass(frozen=True)
class CSGConfig(_ConfigBase):
    """Associative convolution with a Convolutional Slice Generator (Omidvar et al., shared/papers/003, 3.1-3.2).

    slice_shape: (out, in, kh, kw) of one generated slice; a layer's kernel is tiled by slices, partial slices
        covering channel counts the slice shape does not divide. code_size: length of each slice's code vector.
    freeze_generator: keep the shared generator A_CSG fixed (a pre-trained generator, sec. 4.3).
    seed: seed of the generator's initialization.
    init: how ``from_dense`` (so ``patch``) sets codes and generator: ``"fit"``, codes by least squares against
        the generator, and a generator that ``patch`` creates fitted first to the slices of the layers it converts
        (alternating least squares); ``"scratch"``, the dense weights ignored, random codes scaled to the dense
        weight's norm (training from scratch); ``"auto"`` (default): ``patch`` takes ``"scratch"`` when every layer
        it converts is statistically indistinguishable from a random init (:func:`tritonslide.nn.looks_untrained`:
        a fresh model), ``"fit"`` otherwise; ``from_dense`` fits. A pre-trained generator (``patch(...,
        generator=g)`` or one already in the model) is never refitted.
    """

    slice_shape: tuple[int, int, int, int] = (16, 16, 3, 3)
    code_size: int = 128
    freeze_generator: bool = False
    seed: int = 0
    init: str = "auto"

    method: ClassVar[str] = "csg"

    def __post_init__(self) -> None:
        name = type(self).__name__
        shape = tuple(self.slice_shape) if isinstance(self.slice_shape, (tuple, list)) else self.slice_shape
        if not isinstance(shape, tuple) or len(shape) != 4:
            raise ValueError(f"{name}.slice_shape must be 4 ints (out, in, kh, kw), got {self.slice_shape!r}")
        for i, v in enumerate(shape):
            _check_int(name, f"slice_shape[{i}]", v, 1)
        object.__setattr__(self, "slice_shape", shape)  # lists from a dict round trip become a tuple
        _check_int(name, "code_size", self.code_size, 1)
        if not isinstance(self.freeze_generator, bool):
            raise TypeError(f"{name}.freeze_generator must be a bool, got {self.freeze_generator!r}")
        _check_int(name, "seed", self.seed, 0)
        _check_choice(name, "init", self.init, ("auto", "fit", "scratch"))


__all__ = ["ALSHConfig", "CSGConfig", "LowRankConfig", "MILFConfig", "SketchConfig"]
