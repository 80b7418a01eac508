"""Tensor sketching: SK-CONV and SK-FC layers whose weight is never formed (Kasiviswanathan, Narodytska, Jin,
shared/papers/004, Def. 1-4, eq. 1, 2, 4, Theorems 3.1-3.2).

Notation of the paper: a conv kernel ``K`` is ``d2 x h x w x d1`` (in x kh x kw x out); ``mat_4(K)`` is the
``(d2 h w) x d1`` matrix ``W.flatten(1).T`` of a PyTorch weight ``W`` (O, C, kh, kw), and a layer's output is
``I_in mat_4(K)`` with ``I_in`` the im2col matrix. With ``l`` pairs, eq. 2 reads

    I_out^ = 1/(2l) sum_i  I_in mat_4(S1_i) U1_i  +  I_in U2_i^T mat_4(S2_i)

- output side (mode ``"output"``, the terms ``S1_i x_4 U1_i^T``): ``S1_i`` (d2 h w x k) trainable, ``U1_i``
  (k x d1) a fixed random matrix;
- input side (mode ``"input"``, the terms ``S2_i (.) U2_i^T``): by the definition of ``(.)`` (eq. under 1 and
  footnote 5, ``mat_4(S2_i (.) U2_i^T) = U2_i^T mat_4(S2_i)``) ``U2_i`` is a (k h w) x (d2 h w) random matrix
  and ``mat_4(S2_i)`` (k h w x d1) is trainable.

What a layer can represent is therefore ``{U1^T S1 + S2 U2}`` (as O x d2 h w matrices, the l pairs stacked): the
weights whose output side lies in the row space of the stacked ``U1`` plus those whose input side lies in the row
space of the stacked ``U2``. The layer keeps, as its fixed buffers, an orthonormal basis of each of those row spaces:
``u1``, ``u2`` are the polar factors ``(U U^T)^(-1/2) U`` of the stacked random matrices (the orthonormal matrices
closest to them). This is a change of basis inside the sketch, not of the layer's function class, and it is what
makes the layer train like the dense one with the dense layer's optimizer: under SGD the weight a sketch represents
moves by ``-lr g^2 (P1 G + G P2)`` for the dense gradient ``G``, with ``P1``, ``P2`` the projections on the two row
spaces and ``g = 1 / sqrt(m)`` (``m`` the number of modes), i.e. at most the dense step, in every direction. With the
paper's scaled signs the step is ``-lr / (m l)^2 (U1^T U1 G + G U2^T U2)``, and ``U1^T U1`` has eigenvalues near
``d1 / k``: 32x the dense learning rate on a 512-channel layer at k = 16 (VGG-11 diverged at SGD lr 0.01).

Each term is one sketch-then-unsketch chain ``y = conv(conv(x, A), B as 1x1)`` of :func:`tritonslide.ops.
sketch_conv2d` with ``B @ A.flatten(1)`` the term's (O, d2 h w) weight: output side ``A = S1`` (l k, C, kh, kw)
[trainable], ``B = g u1^T`` (O, l k) [fixed]; input side ``A = g u2`` as (l k kh kw, C, kh, kw) [fixed],
``B = S2`` (O, l k kh kw) [trainable]. Both sides are concatenated along ``r``, so a layer's forward is ONE op call,
and the gradients are those of sec. 3.1 in this basis (``dL/dS1 = g u1 G^T I_in``, ``dL/dS2 = g G^T I_in u2^T``).

Starting from a dense layer (``SketchConfig.init``): ``"fit"`` solves the least-squares problem
``min ||W - g (u1^T S1 + S2 u2)||_F`` (``S1 = u1 W / g``, ``S2 = (W - P1 W) u2^T / g``), the projection of ``W``
on the representable set, so the error never exceeds ``||W||`` (for the output side alone it is
``||(I - P1) W||``; a random row space keeps about ``l k / d1`` of any weight's energy); ``"unbiased"`` sets the
sketches so that the layer is exactly the paper's estimator built from the raw random matrices
(``S1_i = U1_i W``, ``S2_i = W U2_i^T``, scale ``1 / (m l)``), unbiased with the variance of Theorems 3.1 / 3.2;
``"scratch"`` ignores ``W`` and draws the sketches at the dense layer's default output scale.

Cost per output position: ``r C kh kw + O r`` multiply-adds with ``r = l k`` (output side) plus ``l k kh kw``
(input side). The output side (CNN-SLIDE's sketch conv) is cheaper than the dense ``O C kh kw`` when ``l k < O``
roughly; the input side's ``k kh kw`` intermediate channels make it dearer than the dense conv for 3x3 kernels
unless ``l k kh kw < O`` (the paper's ``O(h2 w2 l k (d1 + d2))`` ignores h and w). Both reduce parameters.

SK-FC (eq. 4) is the same with ``kh = kw = 1``: ``U1_i^T S1_i h`` and ``S2_i U2_i h``.

Random matrices, from a ``torch.Generator`` seeded with the layer seed: a matrix with ``rows`` rows is
``Z / sqrt(rows)`` with ``Z`` +-1 (``"sign"``, Def. 1) or ``U(-1, 1) * sqrt(3 / rows)`` (``"uniform"``, CNN-SLIDE's
R, shared/papers/000 sec. 4.2); both give ``E[U^T U] = I``, which is what makes the paper's estimator unbiased.
Only their orthonormal bases are kept (buffers, never trained, footnote 6); ``init="unbiased"`` draws the raw
matrices again from the seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.utils import _pair

from tritonslide import ops
from tritonslide._registry import MethodSpec, register_method
from tritonslide.configs import SketchConfig
from tritonslide.nn._common import (
    ConfigState,
    autocast_on,
    check_conv_input,
    conv_out_hw,
    conv_unconvertible_reason,
    dense_conv_like,
    explicit_padding,
    layer_seed,
    resolve_init,
)


def random_matrices(
    gen: torch.Generator, count: int, rows: int, cols: int, distribution: str
) -> torch.Tensor:
    """``count`` independent (rows, cols) float64 matrices with ``E[U^T U] = I``: scaled signs (Def. 1) or scaled
    ``U(-1, 1)`` (CNN-SLIDE, variance 1/3 per entry, hence the ``sqrt(3)``)."""
    if distribution == "sign":
        z = torch.randint(0, 2, (count, rows, cols), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        return z / math.sqrt(rows)
    return (torch.rand(count, rows, cols, generator=gen, dtype=torch.float64) * 2 - 1) * math.sqrt(3 / rows)


def orthonormal_rows(m: torch.Tensor) -> torch.Tensor:
    """The polar factor ``(M M^T)^(-1/2) M`` of an (R, D) matrix (``P Q^T`` of its thin SVD ``P S Q^T``): the
    orthonormal matrix closest to ``M`` with the same row space. Rows are orthonormal when R <= D; with R > D the
    columns are (``M^T M`` has full rank D almost surely)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def _modes(config: SketchConfig) -> tuple[bool, bool]:
    return config.mode in ("output", "both"), config.mode in ("input", "both")


def sketch_weight_params(out_features: int, fan_in_shape: tuple[int, ...], config: SketchConfig) -> int:
    """Trainable sketch entries (bias excluded): ``l k d2 h w`` for the S1 and ``l k h w d1`` for the S2 tensors,
    ``l h w k (d1 + d2)`` in all (sec. 3.1; ``l k (d1 + d2)`` for SK-FC, sec. 3.2)."""
    out_side, in_side = _modes(config)
    fan_in, taps = math.prod(fan_in_shape), math.prod(fan_in_shape[1:])
    return config.pairs * config.k * (fan_in * out_side + out_features * taps * in_side)


def lazy_module_reason(module: nn.Module) -> str | None:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialized lazy module (run one forward first)"
    return None


def linear_unconvertible_reason(module: nn.Module) -> str | None:
    """Why an ``nn.Linear`` cannot become a SketchLinear. Subclasses are refused: ``nn.MultiheadAttention``'s
    ``out_proj`` (NonDynamicallyQuantizableLinear) is read through ``.weight`` and never called."""
    if type(module) is not nn.Linear:
        return f"an nn.Linear subclass ({type(module).__name__})"
    return None


def sketch_size_reason(module: nn.Module, config: SketchConfig) -> str | None:
    """A layer stays dense when its sketch would not be smaller (counts include the bias, kept as is)."""
    if isinstance(module, nn.Linear):
        out_features, fan_in_shape = module.out_features, (module.in_features,)
    else:
        out_features, fan_in_shape = module.out_channels, (module.in_channels, *_pair(module.kernel_size))
    bias = module.bias.numel() if module.bias is not None else 0
    sketch = sketch_weight_params(out_features, fan_in_shape, config) + bias
    dense = module.weight.numel() + bias
    return f"sketch has {sketch} >= {dense} dense parameters" if sketch >= dense else None


def sketch_unconvertible_reason(module: nn.Module, config: SketchConfig) -> str | None:
    """Why ``patch`` leaves ``module`` dense: the conv reasons of ALSH (groups, padding mode, transposed), a
    Linear subclass, an unmaterialized lazy module, or a sketch with at least as many parameters as the layer
    (a 10-class head, say: such a layer is never converted, whatever ``filter_fn`` says)."""
    reason = lazy_module_reason(module)
    if reason is None:
        is_linear = isinstance(module, nn.Linear)
        reason = linear_unconvertible_reason(module) if is_linear else conv_unconvertible_reason(module)
    return reason or sketch_size_reason(module, config)


def check_layer_config(config: Any, cls: type, who: str):
    config = cls() if config is None else config
    if not isinstance(config, cls):
        raise TypeError(f"{who}: expected a {cls.__name__}, got {type(config).__name__}")
    return config


class SketchFactors(ConfigState, nn.Module):
    """The sketch Parameters and random buffers of one layer: SketchConv2d, SketchLinear and MILFConv2d.

    With ``l = pairs``, ``fan_in_shape`` (C, kh, kw) or (in,), ``F = prod(fan_in_shape)`` and ``taps = kh kw``
    (1 for SK-FC); all Parameters and buffers are at most 3-d, so ``.to(memory_format=torch.channels_last)`` leaves
    them alone:

    - ``s1`` Parameter (l, k, F): ``S1`` (output side; None without it), ``A`` of the chain;
    - ``u1`` buffer (l, k, O): the orthonormal basis of the stacked ``U1_i``'s row space;
    - ``u2`` buffer (l, k*taps, F): the same for the stacked ``U2_i`` ((k h w) x (d2 h w) each);
    - ``s2`` Parameter (l, O, k*taps): ``S2`` (input side; None without it), ``B`` of the chain;
    - ``bias`` Parameter (O,) or None.

    Subclasses call :meth:`_init_sketch` in ``__init__`` and :meth:`_load_dense` in ``from_dense``.
    """

    config: Any

    def _init_sketch(
        self,
        out_features: int,
        fan_in_shape: tuple[int, ...],
        sketch_config: SketchConfig,
        seed: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        init_weights: bool,
    ) -> None:
        cfg = self.sketch_config = sketch_config
        self.fan_in_shape, self._out = tuple(int(d) for d in fan_in_shape), int(out_features)
        self._name = getattr(self, "_name", "")
        self._sketch_seed = int(seed)  # only to draw the raw matrices again for init="unbiased"
        fan_in, taps = math.prod(self.fan_in_shape), math.prod(self.fan_in_shape[1:])
        pairs, k, o = cfg.pairs, cfg.k, self._out
        out_side, in_side = _modes(cfg)
        factory = {"device": device, "dtype": torch.get_default_dtype() if dtype is None else dtype}
        raw1, raw2 = self._raw_matrices()
        u1 = orthonormal_rows(raw1.reshape(pairs * k, o)).view(raw1.shape).to(**factory) if out_side else None
        u2 = orthonormal_rows(raw2.reshape(-1, fan_in)).view(raw2.shape).to(**factory) if in_side else None
        self.register_buffer("u1", u1)
        self.register_buffer("u2", u2)
        s1 = nn.Parameter(torch.empty(pairs, k, fan_in, **factory)) if out_side else None
        self.register_parameter("s1", s1)
        self.register_parameter("s2", nn.Parameter(torch.empty(pairs, o, k * taps, **factory)) if in_side else None)
        self.register_parameter("bias", nn.Parameter(torch.empty(o, **factory)) if bias else None)
        if init_weights:
            self.reset_parameters()

    def _raw_matrices(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The paper's random matrices (float64, CPU): ``U1`` (l, k, O) for all pairs first, then ``U2``
        (l, k taps, F), so a layer's matrices depend on (seed, mode, shapes) only."""
        cfg = self.sketch_config
        fan_in, taps = math.prod(self.fan_in_shape), math.prod(self.fan_in_shape[1:])
        out_side, in_side = _modes(cfg)
        gen = torch.Generator().manual_seed(self._sketch_seed)
        u1 = random_matrices(gen, cfg.pairs, cfg.k, self._out, cfg.distribution) if out_side else None
        u2 = random_matrices(gen, cfg.pairs, cfg.k * taps, fan_in, cfg.distribution) if in_side else None
        return u1, u2

    @property
    def _g(self) -> float:
        """The scale of the fixed parts, ``1 / sqrt(m)``: with both modes each side moves at most half the dense
        step under SGD, so together at most the dense step."""
        return 1.0 / math.sqrt(sum(_modes(self.sketch_config)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Training from scratch: the reconstructed weight gets nn.Conv2d / nn.Linear's default scale.

        An entry of the output side's weight is ``g sum_r u1[r, o] S1[r, j]``; the columns of ``u1`` have mean
        squared norm ``rank1 / O`` (``rank1 = min(l k, O)``, orthonormal rows), so with i.i.d. entries of variance
        ``s^2`` its variance is ``g^2 rank1 s^2 / O``; the input side's is ``g^2 rank2 s^2 / F`` likewise. The
        default init (kaiming_uniform with a = sqrt(5)) has variance ``1 / (3 F)``; each of the ``m = 1 / g^2``
        modes takes ``1 / m`` of it, so ``U(-b, b)`` with ``b = sqrt(O / (F rank1))`` (S1) and
        ``b = sqrt(1 / rank2)`` (S2). The bias is nn's ``U(-1/sqrt(F), 1/sqrt(F))``. Draws use the global RNG, as
        nn layers do. (MILF: the tables follow only after ``rebuild_tables``.)
        """
        fan_in = math.prod(self.fan_in_shape)
        if self.s1 is not None:
            rank1 = min(self.u1.shape[0] * self.u1.shape[1], self._out)
            bound = math.sqrt(self._out / (fan_in * rank1))
            self.s1.uniform_(-bound, bound)
        if self.s2 is not None:
            rank2 = min(self.u2.shape[0] * self.u2.shape[1], fan_in)
            self.s2.uniform_(-1 / math.sqrt(rank2), 1 / math.sqrt(rank2))
        if self.bias is not None:
            self.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    @torch.no_grad()
    def _load_dense(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        """Set the sketches from a dense weight as ``sketch_config.init`` says (see the module docstring), in
        float64; the bias Parameter is reused (an optimizer holding it keeps working)."""
        init = resolve_init(self.sketch_config.init, [])
        self.bias = bias
        if init == "scratch":  # the dense layer's own init scale (torchvision's kaiming_normal, say), not nn's
            self.bias = None  # so that reset_parameters keeps the dense layer's bias
            self.reset_parameters()
            self.bias = bias
            scale = weight.detach().norm() / self.reconstructed_weight().norm().clamp_min(1e-30)
            for s in (self.s1, self.s2):
                if s is not None:
                    s.mul_(scale.to(s))
            return
        w = weight.detach().flatten(1).to(device="cpu", dtype=torch.float64)
        if init == "unbiased":  # the paper's estimate with the raw matrices (scale 1 / (m l)), fitted exactly below
            raw1, raw2 = self._raw_matrices()
            scale, estimate = 1.0 / (sum(_modes(self.sketch_config)) * self.sketch_config.pairs), 0
            if raw1 is not None:
                estimate = estimate + scale * torch.einsum("lko,lkp,pf->of", raw1, raw1, w)
            if raw2 is not None:
                estimate = estimate + scale * torch.einsum("op,lrp,lrf->of", w, raw2, raw2)
            w = estimate
        g, rest = self._g, w
        if self.s1 is not None:
            u1 = self.u1.to(device="cpu", dtype=torch.float64).flatten(0, 1)  # (l k, O)
            s1 = u1 @ w / g
            self.s1.copy_(s1.view(self.s1.shape))
            rest = w - u1.T @ s1 * g  # the part the output side cannot represent
        if self.s2 is not None:
            u2 = self.u2.to(device="cpu", dtype=torch.float64).flatten(0, 1)  # (l k taps, F)
            s2 = rest @ u2.T / g  # (O, l k taps)
            self.s2.copy_(s2.view(self._out, *self.s2.shape[::2]).transpose(0, 1))

    # ------------------------------------------------------------------ the one chain
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the chain: A (r, *fan_in_shape), B (O, r), the output-side terms first; the scale ``g``
        multiplies the fixed parts. A small copy (the factors), never the O x C x kh x kw weight."""
        o, g = self._out, self._g
        a_parts, b_parts = [], []
        if self.s1 is not None:
            a_parts.append(self.s1.reshape(-1, *self.fan_in_shape))
            b_parts.append(self.u1.permute(2, 0, 1).reshape(o, -1) * g)
        if self.s2 is not None:
            a_parts.append(self.u2.reshape(-1, *self.fan_in_shape) * g)
            b_parts.append(self.s2.transpose(0, 1).reshape(o, -1))
        if len(a_parts) == 1:
            return a_parts[0], b_parts[0]
        return torch.cat(a_parts), torch.cat(b_parts, 1)

    def reconstructed_weight(self) -> torch.Tensor:
        """The effective dense weight ``B @ A.flatten(1)`` (O, *fan_in_shape): for ``to_dense`` and the MILF tables,
        never used by ``forward``. Differentiable."""
        a, b = self.factors()
        return (b @ a.flatten(1)).view(self._out, *self.fan_in_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed weight, formed on every access (as torch.nn.utils.parametrize does) for code that
        reads ``.weight`` (patch's link check); ``forward`` never reads it."""
        return self.reconstructed_weight()

    def _reference(self) -> torch.Tensor:
        """A Parameter that carries the layer's dtype and device (for input checks)."""
        return self.s1 if self.s1 is not None else self.s2

    def _sketch_rank(self) -> int:
        """``r``: columns of B, ``l (k + k kh kw)`` for "both"."""
        out_side, in_side = _modes(self.sketch_config)
        taps = math.prod(self.fan_in_shape[1:])
        return self.sketch_config.pairs * self.sketch_config.k * (out_side + taps * in_side)

    def param_count(self) -> int:
        """Trainable parameters: ``l h w k (d1 + d2)`` (mode "both"; one side's share with one mode) plus the bias."""
        bias = self.bias.numel() if self.bias is not None else 0
        return sketch_weight_params(self._out, self.fan_in_shape, self.sketch_config) + bias

    def dense_macs(self, out_h: int = 1, out_w: int = 1) -> int:
        return self._out * math.prod(self.fan_in_shape) * out_h * out_w

    def macs(self, out_h: int = 1, out_w: int = 1) -> int:
        """Multiply-adds per sample of the chain: ``r C kh kw`` (conv with A) + ``O r`` (1x1 with B) per output
        position, i.e. ``O(h2 w2 l k (d1 + d2))`` up to the kh kw of the first conv (sec. 3.1)."""
        r = self._sketch_rank()
        return (r * math.prod(self.fan_in_shape) + self._out * r) * out_h * out_w

    # ------------------------------------------------------------------ state
    def display_name(self) -> str:
        cls = type(self).__name__
        return f"{cls} '{self._name}'" if self._name else f"{cls}({self.fan_in_shape[0]}->{self._out})"

    # the same config check as the ALSH layers (one implementation): the config travels as extra state and a
    # state_dict saved with another config is refused with a ValueError naming the layer

    def sketch_repr(self) -> str:
        c = self.sketch_config
        return f"k={c.k}, pairs={c.pairs}, mode={c.mode!r}, distribution={c.distribution!r}"


def set_conv_geometry(layer: nn.Module, in_channels, out_channels, kernel_size, stride, padding, dilation) -> None:
    layer.in_channels, layer.out_channels = int(in_channels), int(out_channels)
    layer.kernel_size, layer.stride = tuple(_pair(kernel_size)), tuple(_pair(stride))
    layer.padding, layer.dilation = tuple(_pair(padding)), tuple(_pair(dilation))


def check_sketch_conv_input(layer: SketchFactors, x: torch.Tensor) -> None:
    """``check_conv_input`` with the layer's dtype and device taken from a sketch Parameter (``.weight`` would
    form the full weight)."""
    check_conv_input(layer, x, ref=layer._reference())


def conv_from_dense(cls: type, conv: nn.Conv2d, config: Any, sketch_config: SketchConfig, name: str, **kwargs):
    """Build ``cls`` (a SketchFactors conv layer) from ``conv`` on its device and dtype, the sketches set as
    ``sketch_config.init`` says (:meth:`SketchFactors._load_dense`).

    Raises ValueError for layers no sketch conv can replace (groups, padding modes, transposed); a sketch larger
    than the layer is allowed here (only ``patch`` skips those)."""
    reason = lazy_module_reason(conv) or conv_unconvertible_reason(conv)
    if reason is not None:
        raise ValueError(f"{cls.__name__}.from_dense({name or type(conv).__name__}): cannot convert: {reason}")
    layer = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv), conv.dilation,
        conv.bias is not None, config, device=conv.weight.device, dtype=conv.weight.dtype, _init_weights=False,
        **kwargs,
    )
    layer._load_dense(conv.weight, conv.bias)
    layer._name = name
    return layer


class SketchConv2d(SketchFactors):
    """SK-CONV (Def. 3, eq. 1-2): drop-in for ``nn.Conv2d`` (groups=1, zero padding) computed as ONE
    :func:`tritonslide.ops.sketch_conv2d` chain; see the module docstring for the factors and
    :class:`SketchFactors` for the Parameters and buffers."""

    replaces = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        config: SketchConfig | None = None,
        *,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.config = check_layer_config(config, SketchConfig, "SketchConv2d")
        self._name = ""
        set_conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation)
        self._init_sketch(out_channels, (self.in_channels, *self.kernel_size), self.config,
                          self.config.seed if seed is None else seed, bias, device, dtype, _init_weights)

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, config: SketchConfig | None = None, *, name: str = "", context: Any = None
    ) -> "SketchConv2d":
        """Sketch a trained ``nn.Conv2d``: with ``init="fit"`` (and ``"auto"``, here) the least-squares sketches
        (relative weight error at most 1); with ``init="unbiased"`` Theorem 3.1's estimator, an unbiased estimate of
        the conv's output with ``E||err||_F^2 <= d1 ||I_in * K||^2 / (l k) + ||I_in||^2 ||K||^2 / (l k h w)``.
        ``name`` (the qualified name ``patch`` passes) is mixed into the seed so that layers get independent random
        matrices."""
        config = check_layer_config(config, SketchConfig, "SketchConv2d.from_dense")
        return conv_from_dense(cls, conv, config, config, name, seed=layer_seed(config.seed, name))

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the reconstructed weight (a new Parameter) and the same bias Parameter."""
        return dense_conv_like(self, nn.Parameter(self.reconstructed_weight().detach().clone()), self.bias)

    def output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, self.out_channels, *conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        check_sketch_conv_input(self, x)
        a, b = self.factors()
        y = ops.sketch_conv2d(x, a, b, self.bias, None, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {self.sketch_repr()}, bias={self.bias is not None}"
        )


class SketchLinear(SketchFactors):
    """SK-FC (Def. 4, eq. 4): drop-in for ``nn.Linear``, ``a^ = g sum_i u1_i^T S1_i h + S2_i u2_i h + b`` (``u``
    the orthonormal bases of the random matrices' row spaces, ``g = 1 / sqrt(m)``, see the module docstring),
    computed as ONE :func:`tritonslide.ops.sketch_linear` chain (``A = [S1_i; g u2_i]``, ``B = [g u1_i^T, S2_i]``).
    Parameters ``s1`` (l, k, in) and ``s2`` (l, out, k); buffers ``u1`` (l, k, out), ``u2`` (l, k, in)."""

    replaces = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: SketchConfig | None = None,
        *,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.config = check_layer_config(config, SketchConfig, "SketchLinear")
        self._name = ""
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_sketch(out_features, (self.in_features,), self.config,
                          self.config.seed if seed is None else seed, bias, device, dtype, _init_weights)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, config: SketchConfig | None = None, *, name: str = "", context: Any = None
    ) -> "SketchLinear":
        """Sketch a trained ``nn.Linear``: least squares with ``init="fit"`` (and ``"auto"``, here); with
        ``init="unbiased"`` Theorem 3.2's estimator (``S1_i = U1_i W``, ``S2_i = W U2_i^T``; unbiased, with
        ``E||a^ - a||^2 <= d1 ||W h||^2 / (l k) + ||W||_F^2 ||h||^2 / (l k)``)."""
        config = check_layer_config(config, SketchConfig, "SketchLinear.from_dense")
        reason = lazy_module_reason(linear) or linear_unconvertible_reason(linear)
        if reason is not None:
            raise ValueError(f"SketchLinear.from_dense({name or type(linear).__name__}): cannot convert: {reason}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                    seed=layer_seed(config.seed, name), device=linear.weight.device, dtype=linear.weight.dtype,
                    _init_weights=False)
        layer._load_dense(linear.weight, linear.bias)
        layer._name = name
        return layer

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the reconstructed weight (a new Parameter) and the same bias Parameter."""
        weight = self.reconstructed_weight().detach().clone()
        dense = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                   device=weight.device, dtype=weight.dtype)
        dense.weight = nn.Parameter(weight)
        if self.bias is not None:
            dense.bias = self.bias
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self._reference()  # the name is read only on the error paths (torch.compile never guards on it)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.display_name()}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.display_name()}: expected input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        if x.device != ref.device:
            raise ValueError(f"{self.display_name()}: input is on {x.device} but the layer is on {ref.device}")
        if x.dtype != ref.dtype and not (x.is_floating_point() and autocast_on(x.device.type)):
            raise TypeError(f"{self.display_name()}: expected a {ref.dtype} input (the layer's dtype), got {x.dtype}")
        a, b = self.factors()
        return ops.sketch_linear(x, a, b, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.sketch_repr()}, "
                f"bias={self.bias is not None}")


register_method(
    MethodSpec(
        name="sketch",
        config_cls=SketchConfig,
        converters=((nn.Conv2d, SketchConv2d), (nn.ConvTranspose2d, SketchConv2d), (nn.Linear, SketchLinear)),
        unconvertible_reason=sketch_unconvertible_reason,
    )
)
