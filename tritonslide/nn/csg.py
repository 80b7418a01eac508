"""Associative convolution: kernels generated slice by slice from code vectors by one shared linear map.

Omidvar et al., "Associative Convolutional Layers", shared/papers/003:
- slices (2.1.1): the kernel ``W`` (O, C, kh, kw) of every converted layer is partitioned into
  ``ceil(O/s1) ceil(C/s2) ceil(kh/s3) ceil(kw/s4)`` slices of shape ``(s1, s2, s3, s4)`` (default [16, 16, 3, 3],
  3.2); footnote 4: "additional slices for fractional partitions and only use part of the final slice(s)", so a
  tile at an edge is cropped. The rule covers every kernel size (Fig. 1: 6x6 kernels from 3x3 slices), so a 1x1
  or 5x5 conv is converted too, with partial slices in the kernel dims (the experiments of 4.2 only converted
  3x3 layers; pass ``filter_fn`` to ``patch`` to do the same).
- code vectors and the CSG (2.1.2, 3.1, eq. 1): ``vec(k_i) = A_CSG c_i`` with ``A_CSG`` of shape
  (s1 s2 s3 s4, n_c) and one code vector ``c_i`` (n_c = ``code_size``, default 128, 18x fewer than 2304, 3.2) per
  slice: a single linear map without bias, as in eq. 1 (the authors' code is ``nn.Linear(n_c, 2304, bias=False)``).
  One ``A_CSG`` is shared by every converted layer of the network; the first conv stays dense (2.1.1, 4.2).
- the forward generates the full kernel from the codes and runs a plain convolution with it (what the authors'
  code does); autograd carries the gradient to the codes and to ``A_CSG``. Slices are placed as the tiles of the
  text (2.1.1, Fig. 1); the authors' code views the generated vectors row-major as the padded kernel, which is the
  same tiling only when the padded input-channel count equals s2 (any fixed placement trains alike from scratch).
- a pre-trained, frozen CSG (4.3): ``CSGConfig(freeze_generator=True)`` gives ``A_CSG`` ``requires_grad=False``;
  only the codes (and biases) train. ``patch(model, cfg, generator=g)`` converts ``model`` against a pre-trained
  ``g``; ``make_context`` also reuses any :class:`SliceGenerator` of the config's shape already inside the patched
  module (an earlier patch's, or one attached by the user), and ``CSGConv2d.from_dense(conv, cfg, context=g)``
  converts a single layer against ``g``.

Converting a trained conv (``from_dense``) fits the codes by least squares against the generator. With a random
generator the fit keeps only about ``n_c / (s1 s2 s3 s4)`` = 128 / 2304 = 5.6% of the energy of an unstructured
kernel (relative error ~0.97): the paper does not convert trained convs; it trains codes and CSG from scratch
(4.2), or codes from scratch against a CSG pre-trained with another network (4.3). So when ``patch`` creates the
generator for a trained model it first fits it to the kernels it converts (:meth:`SliceGenerator.fit_`: truncated
SVD of their slices, Eckart-Young, then alternating least squares over every tile, partial ones included), after
which the layers start closer to the dense ones, exactly on them when they hold at most n_c whole slices in all
(an extension of the paper; unstructured 256->256 kernels stay at a relative error of ~0.89). A fresh model
(``init="auto"`` resolving to ``"scratch"``) gets random codes at the dense layers' scale instead.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from tritonslide._registry import MethodSpec, register_method
from tritonslide.configs import CSGConfig
from tritonslide.nn._common import (
    ConfigState,
    check_conv_input,
    conv_out_hw,
    conv_unconvertible_reason,
    dense_conv_like,
    explicit_padding,
    layer_seed,
    resolve_init,
)

Shape4 = tuple[int, int, int, int]


def _grid(shape: Shape4, slice_shape: Shape4) -> Shape4:
    """Slices per dim: ceil(s_d / hat s_d) (2.1.1)."""
    return tuple(-(-n // s) for n, s in zip(shape, slice_shape))


def assemble_slices(slices: torch.Tensor, shape: Shape4) -> torch.Tensor:
    """(n_o, n_i, n_h, n_w, s1, s2, s3, s4) slices -> the (O, C, kh, kw) kernel: tile ``(a, b, c, d)`` covers
    ``W[a s1:(a+1) s1, b s2:(b+1) s2, c s3:(c+1) s3, d s4:(d+1) s4]``; the parts of edge tiles that fall outside
    the kernel are dropped (footnote 4)."""
    g, s = slices.shape[:4], slices.shape[4:]
    full = slices.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(g[0] * s[0], g[1] * s[1], g[2] * s[2], g[3] * s[3])
    return full[: shape[0], : shape[1], : shape[2], : shape[3]]


def split_slices(weight: torch.Tensor, slice_shape: Shape4) -> torch.Tensor:
    """Inverse of :func:`assemble_slices`: the kernel zero-padded to whole slices, as (n_o, n_i, n_h, n_w, *slice)."""
    g = _grid(tuple(weight.shape), slice_shape)
    pad = [0, 0] * 4
    for d in range(4):  # F.pad lists the last dim first
        pad[2 * (3 - d) + 1] = g[d] * slice_shape[d] - weight.shape[d]
    w = F.pad(weight, pad)
    s = slice_shape
    return w.reshape(g[0], s[0], g[1], s[1], g[2], s[2], g[3], s[3]).permute(0, 2, 4, 6, 1, 3, 5, 7)


def _tile_groups(shape: Shape4, slice_shape: Shape4):
    """Tiles grouped by the part of the slice they use: yields (index slices into the tile grid, present extent).

    Along each dim every tile but the last is whole, so there are at most 2**4 groups."""
    per_dim = []
    for n, s in zip(shape, slice_shape):
        g, rest = -(-n // s), n % s
        if rest == 0:
            per_dim.append([(slice(0, g), s)])
        else:
            per_dim.append([(slice(0, g - 1), s), (slice(g - 1, g), rest)] if g > 1 else [(slice(0, 1), rest)])
    for combo in itertools.product(*per_dim):
        idx, extent = zip(*combo)
        if all(i.stop > i.start for i in idx):
            yield idx, extent


def _present_entries(slice_shape: Shape4, extent: Shape4) -> torch.Tensor:
    """Flat indices (row-major in the slice) of the entries of a tile cropped to ``extent``."""
    mask = torch.zeros(slice_shape, dtype=torch.bool)
    mask[: extent[0], : extent[1], : extent[2], : extent[3]] = True
    return mask.flatten().nonzero().flatten()


def _orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """The Q of ``a``'s QR with the signs of R's diagonal made positive (unique for a full-rank ``a``)."""
    q, r = torch.linalg.qr(a)
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q)


# generator -> (the float64 CPU copy of A_CSG the entries were computed from, {present extent: pinv(A_t)}); weak
# keys, so a dropped generator frees its entry; compared by value, as `.data` writes do not bump `_version`
_PINV_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pinv_cache(generator: nn.Module, a: torch.Tensor) -> dict[Shape4, torch.Tensor]:
    hit = _PINV_CACHE.get(generator)
    if hit is None or not torch.equal(hit[0], a):
        hit = _PINV_CACHE[generator] = (a.clone(), {})  # a clone: `a` may share the live weight's storage
    return hit[1]


class SliceGenerator(nn.Module):
    """The Convolutional Slice Generator ``A_CSG`` (sec. 3.1, eq. 1): ``vec(slice) = A_CSG c``, no bias.

    ``weight`` is ``A_CSG``, shape (s1 s2 s3 s4, n_c) (``nn.Linear``'s layout, so ``forward`` is ``F.linear``).
    Initialization (the paper says only "random initial values", 4.2): a random matrix with orthonormal columns
    (the Q of a seeded Gaussian matrix's QR), ``A_CSG^T A_CSG = I``. The scale matters for training with the
    dense model's optimizer: under SGD a code's step moves its slice by ``-lr A A^T G``, i.e. at most the dense
    step (a projection of it); with ``N(0, 1/n_c)`` entries ``A A^T`` has eigenvalues near ``S / n_c`` = 18, and
    converted networks diverged at the dense learning rate. ``frozen=True`` (a pre-trained CSG, 4.3) sets
    ``requires_grad=False``; the generator stays a submodule (saved, moved by ``.to()``).
    """

    def __init__(
        self,
        slice_shape: Shape4 = (16, 16, 3, 3),
        code_size: int = 128,
        *,
        seed: int = 0,
        frozen: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cfg = CSGConfig(slice_shape=tuple(slice_shape), code_size=code_size)  # validates both
        self.slice_shape: Shape4 = cfg.slice_shape
        self.code_size = cfg.code_size
        numel = math.prod(self.slice_shape)
        if self.code_size > numel:
            raise ValueError(f"SliceGenerator: code_size {self.code_size} exceeds the {numel} entries of a slice")
        gen = torch.Generator().manual_seed(seed)
        a = _orthonormal_columns(torch.randn(numel, self.code_size, generator=gen, dtype=torch.float64))
        self.weight = nn.Parameter(a.to(device=device, dtype=dtype or torch.get_default_dtype()),
                                   requires_grad=not frozen)

    @classmethod
    def from_config(
        cls, config: CSGConfig, *, seed: int | None = None, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SliceGenerator":
        return cls(config.slice_shape, config.code_size, seed=config.seed if seed is None else seed,
                   frozen=config.freeze_generator, device=device, dtype=dtype)

    @property
    def frozen(self) -> bool:
        return not self.weight.requires_grad

    def matches(self, config: CSGConfig) -> bool:
        return self.slice_shape == tuple(config.slice_shape) and self.code_size == config.code_size

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., n_c) codes -> (..., s1, s2, s3, s4) slices."""
        return F.linear(codes, self.weight).unflatten(-1, self.slice_shape)

    @torch.no_grad()
    def fit_(self, weights: Iterable[torch.Tensor], steps: int = 3) -> "SliceGenerator":
        """Set ``A_CSG`` to the generator that best represents the dense (O, C, kh, kw) ``weights``, each tile
        with its own least-squares code: ``min_A sum_t min_c ||A_t c - w_t||^2`` over every tile of every kernel,
        ``A_t`` the rows of ``A`` of the entries that lie inside the kernel (edge tiles are partial).

        Start: the top ``n_c`` right singular vectors of the matrix of whole slices (Eckart-Young: the optimum
        when every tile is whole); without whole slices, the current ``A``. Then ``steps`` rounds of alternating
        least squares over all tiles, partial ones included: codes per tile given ``A``, then each row of ``A``
        given the codes of the tiles that contain its entry (a round never increases the error). The columns are
        orthonormalized at the end (a change of basis of the code space: the fit is unchanged). Not in the paper
        (which trains the CSG from random values, 4.2): it lets ``patch`` convert a trained network.
        """
        numel, n_c, s = self.weight.shape[0], self.code_size, self.slice_shape
        groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (entry indices inside a slice, tiles (n, P))
        whole = []
        for w in weights:
            if w.dim() != 4:
                raise ValueError(f"SliceGenerator.fit_: expected (O, C, kh, kw) kernels, got shape {tuple(w.shape)}")
            tiles = split_slices(w.detach().to(device="cpu", dtype=torch.float64), s)
            for idx, extent in _tile_groups(tuple(w.shape), s):
                b = tiles[idx][..., : extent[0], : extent[1], : extent[2], : extent[3]].reshape(-1, math.prod(extent))
                groups.append((_present_entries(s, extent), b))
                if extent == s:
                    whole.append(b)
        if not groups:
            raise ValueError("SliceGenerator.fit_: no kernel to fit")
        if whole:
            # full_matrices: with fewer slices than n_c the remaining columns are an orthonormal completion
            a = torch.linalg.svd(torch.cat(whole), full_matrices=True)[2][:n_c].T
        else:
            a = self.weight.detach().to(device="cpu", dtype=torch.float64, copy=True)  # rows are updated in place
        # rows of A: entry e is fitted by the tiles whose group covers it; entries sharing the same set of covering
        # groups share one Gram matrix (at most 16 distinct sets). Sets and padded tiles do not change over steps.
        cover = torch.zeros(len(groups), numel, dtype=torch.bool)
        padded = []
        for g, (ent, b) in enumerate(groups):
            cover[g, ent] = True
            padded.append(torch.zeros(b.shape[0], numel, dtype=torch.float64).index_copy_(1, ent, b))
        patterns, which = torch.unique(cover.T, dim=0, return_inverse=True)
        blocks = [((which == p).nonzero().flatten(), pattern.nonzero().flatten().tolist())
                  for p, pattern in enumerate(patterns) if pattern.any()]
        for _ in range(steps):
            codes = [b @ torch.linalg.pinv(a[ent]).T for ent, b in groups]
            for rows, members in blocks:
                gram = sum(codes[g].T @ codes[g] for g in members)
                rhs = sum(padded[g][:, rows].T @ codes[g] for g in members)
                a[rows] = rhs @ torch.linalg.pinv(gram)
        self.weight.copy_(_orthonormal_columns(a).to(self.weight))
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": ConfigState.STATE_FORMAT, "slice_shape": list(self.slice_shape), "code_size": self.code_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = (list(state.get("slice_shape", ())), state.get("code_size")) if isinstance(state, dict) else None
        if saved != (list(self.slice_shape), self.code_size):
            raise ValueError(
                f"SliceGenerator: the state_dict holds a generator of slice shape / code size {saved}, this one has "
                f"{(list(self.slice_shape), self.code_size)}"
            )

    def extra_repr(self) -> str:
        return f"slice_shape={list(self.slice_shape)}, code_size={self.code_size}, frozen={self.frozen}"


class CSGConv2d(ConfigState, nn.Module):
    """Drop-in for ``nn.Conv2d`` (groups=1, zero padding) whose kernel is generated by a :class:`SliceGenerator`.

    ``codes``: Parameter (n_o n_i n_h n_w, n_c), one code vector per slice of the kernel tiling (2.1.1), tiles in
    row-major order of the (n_o, n_i, n_h, n_w) grid (:attr:`grid`; :meth:`codes_grid` is that view); 2-d, so
    ``.to(memory_format=torch.channels_last)`` leaves it alone;
    ``generator``: the ``A_CSG`` submodule, usually one module shared by every layer of the model (``patch``);
    ``bias``: as in ``nn.Conv2d``. Forward: ``conv2d(x, W, bias)`` with ``W = assemble(A_CSG codes)`` (eq. 1), the
    kernel generated once per forward (O C kh kw values, plus the cropped parts of edge slices).
    """

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
        config: CSGConfig | None = None,
        *,
        generator: SliceGenerator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init_params: bool = True,
        _name: str = "",
    ) -> None:
        super().__init__()
        config = CSGConfig() if config is None else config
        if not isinstance(config, CSGConfig):
            raise TypeError(f"CSGConv2d: expected a CSGConfig, got {type(config).__name__}")
        self.config = config
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = tuple(_pair(kernel_size)), tuple(_pair(stride))
        self.padding, self.dilation = tuple(_pair(padding)), tuple(_pair(dilation))
        self._name = _name
        factory = {"device": device, "dtype": dtype}
        if generator is None:
            generator = SliceGenerator.from_config(config, seed=seed, **factory)
        self._check_generator(generator, torch.empty(0, **factory))
        self.generator = generator
        self.grid: Shape4 = _grid(self.weight_shape, config.slice_shape)
        self.codes = nn.Parameter(torch.empty(math.prod(self.grid), config.code_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if _init_params:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Codes for training from scratch: ``U(-b, b)`` with ``b = sqrt(S / (n_c fan_in))``. A_CSG's columns are
        orthonormal, so its rows have mean squared norm ``n_c / S`` and every generated weight has variance
        ``(n_c / S) b^2 / 3 = 1 / (3 fan_in)``, nn.Conv2d's (kaiming_uniform with a = sqrt(5)). The bias is
        nn.Conv2d's ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. Draws use the global RNG, as nn layers do."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        numel, n_c = math.prod(self.config.slice_shape), self.config.code_size
        bound = math.sqrt(numel / (n_c * fan_in))
        self.codes.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def codes_grid(self) -> torch.Tensor:
        """``codes`` viewed as (n_o, n_i, n_h, n_w, n_c), one code per tile of the kernel grid."""
        return self.codes.view(*self.grid, self.config.code_size)

    @property
    def weight_shape(self) -> Shape4:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _check_generator(self, generator: Any, like: torch.Tensor) -> None:
        who = self.display_name()
        if not isinstance(generator, SliceGenerator):
            raise TypeError(f"{who}: expected a SliceGenerator, got {type(generator).__name__}")
        if not generator.matches(self.config):
            raise ValueError(
                f"{who}: the generator makes {list(generator.slice_shape)} slices from codes of size "
                f"{generator.code_size}, the config asks for {list(self.config.slice_shape)} / {self.config.code_size}"
            )
        w = generator.weight
        if w.dtype != like.dtype or w.device != like.device:
            raise ValueError(f"{who}: the generator is a {w.dtype} tensor on {w.device}, the layer is {like.dtype} "
                             f"on {like.device}")

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, config: CSGConfig | None = None, *, name: str = "", context: Any = None
    ) -> "CSGConv2d":
        """Convert a trained ``nn.Conv2d``: codes fitted by least squares (:meth:`fit_codes_`) against ``context``
        (the shared :class:`SliceGenerator` from ``make_context``) or, without one, a generator of the layer's own
        seeded with ``layer_seed(config.seed, name)``. The bias Parameter is reused. A generator passed in keeps its
        ``requires_grad`` (``make_context`` sets it from ``config.freeze_generator``)."""
        config = CSGConfig() if config is None else config
        if not isinstance(config, CSGConfig):
            raise TypeError(f"CSGConv2d.from_dense: expected a CSGConfig, got {type(config).__name__}")
        reason = conv_unconvertible_reason(conv)
        if reason is not None:
            raise ValueError(f"CSGConv2d.from_dense({name or type(conv).__name__}): cannot convert: {reason}")
        init = resolve_init(config.init, [])
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv), conv.dilation,
            conv.bias is not None, config, generator=context, seed=layer_seed(config.seed, name),
            device=conv.weight.device, dtype=conv.weight.dtype, _init_params=init == "scratch", _name=name,
        )
        if init == "fit":
            layer.fit_codes_(conv.weight)
        else:  # "scratch": the dense layer's own init scale (torchvision's kaiming_normal, say), not nn's default
            with torch.no_grad():
                scale = conv.weight.detach().norm() / layer.generated_weight().norm().clamp_min(1e-30)
                layer.codes.mul_(scale.to(layer.codes))
        if conv.bias is not None:
            layer.bias = conv.bias
        return layer

    # ------------------------------------------------------------------ codes and the generated kernel
    @torch.no_grad()
    def fit_codes_(self, weight: torch.Tensor) -> None:
        """Least-squares codes for a dense kernel ``weight`` (O, C, kh, kw) under the current generator.

        Per tile: ``c = argmin ||A_t c - vec(W_tile)||^2`` where ``A_t`` keeps the rows of ``A_CSG`` of the slice
        entries that lie inside the kernel (an edge tile's cropped entries do not enter its system). Solved as
        ``c = pinv(A_t) vec(W_tile)`` in float64 on the CPU for every tile of a group that shares ``A_t`` (at most
        16 groups): the minimum-norm least-squares solution, also when ``A_t`` has fewer rows than ``n_c`` (a 1x1
        edge tile of one channel; CUDA's ``lstsq`` has only ``gels``, which needs full column rank). The
        pseudo-inverses are cached per generator while ``A_CSG`` is unchanged: the 54 converted layers of a
        ResNet-56 then share one SVD of the 2304 x 128 matrix (~12 ms each on one CPU thread, 0.3 s with two
        threads on a loaded 2-core machine).
        """
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{self.display_name()}: expected a kernel of shape {self.weight_shape}, got "
                             f"{tuple(weight.shape)}")
        s, n_c = self.config.slice_shape, self.config.code_size
        a = self.generator.weight.detach().to(device="cpu", dtype=torch.float64)
        pinvs = _pinv_cache(self.generator, a)
        a = a.reshape(*s, n_c)
        tiles = split_slices(weight.detach().to(device="cpu", dtype=torch.float64), s)
        codes = torch.zeros(*self.grid, n_c, dtype=torch.float64)
        for idx, extent in _tile_groups(self.weight_shape, s):
            if extent not in pinvs:
                pinvs[extent] = torch.linalg.pinv(a[: extent[0], : extent[1], : extent[2], : extent[3]].flatten(0, 3))
            b = tiles[idx][..., : extent[0], : extent[1], : extent[2], : extent[3]]
            codes[idx] = (b.flatten(4) @ pinvs[extent].T).reshape(*b.shape[:4], n_c)
        self.codes.copy_(codes.view(self.codes.shape))

    def generated_weight(self) -> torch.Tensor:
        """The (O, C, kh, kw) kernel ``assemble(A_CSG c_i)`` (eq. 1), differentiable in the codes and ``A_CSG``."""
        return assemble_slices(self.generator(self.codes_grid()), self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The generated kernel (computed on every access), so code written for ``nn.Conv2d`` can read it."""
        return self.generated_weight()

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the generated kernel as a new Parameter and the same bias Parameter."""
        weight = nn.Parameter(self.generated_weight().detach().clone())
        return dense_conv_like(self, weight, self.bias)

    def display_name(self) -> str:
        cls = type(self).__name__
        return f"{cls} '{self._name}'" if self._name else f"{cls}({self.in_channels}->{self.out_channels})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        # the layer's dtype and device from the codes (``.weight`` would generate the kernel)
        check_conv_input(self, x, ref=self.codes)
        y = F.conv2d(x, self.generated_weight(), self.bias, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------ accounting
    @property
    def num_slices(self) -> int:
        return math.prod(self.grid)

    def param_count(self) -> int:
        """The layer's own Parameters: codes (one n_c vector per slice) and bias. The shared generator is counted
        once per model by :meth:`generator_param_count` (the paper's |G|, 3.1; Table 1 counts it once, 4.3 not at
        all when it is pre-trained and fixed)."""
        return self.codes.numel() + (self.bias.numel() if self.bias is not None else 0)

    def generator_param_count(self) -> int:
        return self.generator.weight.numel()

    def dense_macs(self, out_h: int, out_w: int) -> int:
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * out_h * out_w

    def macs(self, out_h: int, out_w: int) -> int:
        """Per sample, the convolution with the generated kernel: the dense layer's count. Generating the kernel
        costs :meth:`generation_macs` once per forward, whatever the batch size, so it is not in a per-sample
        count (for 256->256 3x3 at 32x32: 75.5M per forward vs 604M per sample)."""
        return self.dense_macs(out_h, out_w)

    def generation_macs(self) -> int:
        """Multiply-adds of ``A_CSG c_i`` for every slice, edge slices whole: num_slices * s1 s2 s3 s4 * n_c."""
        return self.num_slices * math.prod(self.config.slice_shape) * self.config.code_size

    def output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, self.out_channels, *conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation))

    # ------------------------------------------------------------------ state

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, slices={list(self.grid)} of "
            f"{list(self.config.slice_shape)}, code_size={self.config.code_size}, bias={self.bias is not None}"
        )


def make_context(
    model: nn.Module, config: CSGConfig, targets: list[nn.Module], generator: SliceGenerator | None = None
) -> SliceGenerator:
    """The one generator ``patch`` hands to every converted layer (one ``A_CSG`` per network, 3.1).

    In order: ``generator`` (``patch(..., generator=g)``: a pre-trained CSG, sec. 4.3); a :class:`SliceGenerator` of
    the config's slice shape and code size already in ``model`` (one of an earlier patch, of ``TrainAndReplace``,
    or a pre-trained one attached by the user); either is used as it is (refitting it would change the layers that
    already use it), its ``requires_grad`` set by ``config.freeze_generator``. Otherwise a new one, seeded with
    ``config.seed``, on the device and dtype of the model's first ``nn.Conv2d``, and with ``init="fit"`` fitted to
    the kernels of ``targets`` (the layers about to be converted, :meth:`SliceGenerator.fit_`).
    """
    if generator is not None:
        if not isinstance(generator, SliceGenerator):
            raise TypeError(f"tritonslide.patch: generator must be a SliceGenerator, got {type(generator).__name__}")
        if not generator.matches(config):
            raise ValueError(
                f"tritonslide.patch: the generator makes {list(generator.slice_shape)} slices from codes of size "
                f"{generator.code_size}, the config asks for {list(config.slice_shape)} / {config.code_size}"
            )
    else:
        generator = next((m for m in model.modules() if isinstance(m, SliceGenerator) and m.matches(config)), None)
    if generator is not None:
        generator.weight.requires_grad_(not config.freeze_generator)
        return generator
    ref = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    generator = SliceGenerator.from_config(config, **factory)
    if targets and resolve_init(config.init, [m.weight for m in targets]) == "fit":
        generator.fit_([m.weight for m in targets])
    return generator


register_method(
    MethodSpec(
        name="csg",
        config_cls=CSGConfig,
        converters=((nn.Conv2d, CSGConv2d), (nn.ConvTranspose2d, CSGConv2d)),
        unconvertible_reason=lambda module, config: conv_unconvertible_reason(module),
        make_context=make_context,
        options=("generator",),
    )
)
