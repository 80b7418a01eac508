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
  only the codes (and biases) train. To fit the codes against a pre-trained generator, pass it as ``context`` to
  ``CSGConv2d.from_dense``, or let ``patch`` find it: ``make_context`` reuses any :class:`SliceGenerator` of the
  config's shape inside the patched module, so ``patch(nn.ModuleDict({"model": model, "csg": generator}), cfg)``
  converts ``model`` against it without changing ``model``'s forward (setting ``model.csg = generator`` works for
  custom modules too, but not for an ``nn.Sequential``, which would call it).

Converting a trained conv (``from_dense``) fits the codes by least squares against the generator. With a random
generator the fit keeps only about ``n_c / (s1 s2 s3 s4)`` = 128 / 2304 = 5.6% of the energy of an unstructured
kernel (relative error ~0.97): the paper does not convert trained convs; it trains codes and CSG from scratch
(4.2), or codes from scratch against a CSG pre-trained with another network (4.3). :meth:`SliceGenerator.fit_`
sets ``A_CSG`` to the best linear generator for given dense kernels (truncated SVD of their slices, Eckart-Young),
after which ``from_dense`` starts closer to the dense layers, exactly on them when they hold at most n_c whole
slices in all (an extension of the paper; unstructured 256->256 kernels stay at a relative error of ~0.89).
"""

from __future__ import annotations

import itertools
import math
import weakref
from types import SimpleNamespace
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
    Initialization (the paper says only "random initial values", 4.2): ``N(0, 1 / n_c)`` entries from a
    ``torch.Generator`` seeded with ``seed``, so a slice has the variance of its code's entries; codes drawn like
    ``nn.Conv2d``'s weights then give generated kernels with ``nn.Conv2d``'s initial variance. ``frozen=True``
    (a pre-trained CSG, 4.3) sets ``requires_grad=False``; the generator stays a submodule (saved, moved by ``.to()``).
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
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(numel, self.code_size, generator=gen, dtype=torch.float32) / math.sqrt(self.code_size)
        self.weight = nn.Parameter(a.to(device=device, dtype=dtype), requires_grad=not frozen)

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
    def fit_(self, weights: Iterable[torch.Tensor]) -> "SliceGenerator":
        """Set ``A_CSG`` to the best generator for the whole slices of ``weights`` (dense (O, C, kh, kw) kernels).

        Stacking the vectorized slices as the rows of ``T`` (N, S), ``min_A sum_i min_c ||A c - t_i||^2`` is solved
        by the top ``n_c`` right singular vectors of ``T`` (Eckart-Young); the columns are scaled to norm
        ``sqrt(S / n_c)``, the expected norm under the random init, so codes keep their scale. Edge (partial)
        slices are left out: their missing entries are not zeros to be fitted. Not in the paper (an extension
        that makes ``from_dense`` start close to trained weights); fit codes afterwards (``CSGConv2d.fit_codes_``).
        """
        rows, numel = [], self.weight.shape[0]
        if self.code_size > numel:
            raise ValueError(f"SliceGenerator.fit_: code_size {self.code_size} exceeds the {numel} entries of a slice")
        for w in weights:
            if w.dim() != 4:
                raise ValueError(f"SliceGenerator.fit_: expected (O, C, kh, kw) kernels, got shape {tuple(w.shape)}")
            idx, extent = next(_tile_groups(tuple(w.shape), self.slice_shape))  # the first group: whole tiles
            if extent == self.slice_shape:
                rows.append(split_slices(w.detach().double().cpu(), self.slice_shape)[idx].reshape(-1, numel))
        if not rows:
            raise ValueError(f"SliceGenerator.fit_: no kernel holds a whole {list(self.slice_shape)} slice")
        t = torch.cat(rows)
        # full_matrices: with fewer slices than n_c the remaining columns are an orthonormal completion
        _, _, vh = torch.linalg.svd(t, full_matrices=True)
        a = vh[: self.code_size].T * math.sqrt(numel / self.code_size)
        self.weight.copy_(a.to(self.weight))
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

    ``codes``: Parameter (n_o, n_i, n_h, n_w, n_c), one code vector per slice of the kernel tiling (2.1.1);
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
        grid = _grid(self.weight_shape, config.slice_shape)
        self.codes = nn.Parameter(torch.empty(*grid, config.code_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if _init_params:
            # codes ~ U(-b, b) with nn.Conv2d's bound b = 1 / sqrt(fan_in); with A_CSG ~ N(0, 1/n_c) every generated
            # weight then has nn.Conv2d's variance b^2 / 3 (kaiming_uniform with a = sqrt(5)).
            bound = 1 / math.sqrt(in_channels * self.kernel_size[0] * self.kernel_size[1])
            with torch.no_grad():
                self.codes.uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias.uniform_(-bound, bound)

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
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv), conv.dilation,
            conv.bias is not None, config, generator=context, seed=layer_seed(config.seed, name),
            device=conv.weight.device, dtype=conv.weight.dtype, _init_params=False, _name=name,
        )
        layer.fit_codes_(conv.weight)
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
        codes = torch.zeros(self.codes.shape, dtype=torch.float64)
        for idx, extent in _tile_groups(self.weight_shape, s):
            if extent not in pinvs:
                pinvs[extent] = torch.linalg.pinv(a[: extent[0], : extent[1], : extent[2], : extent[3]].flatten(0, 3))
            b = tiles[idx][..., : extent[0], : extent[1], : extent[2], : extent[3]]
            codes[idx] = (b.flatten(4) @ pinvs[extent].T).reshape(*b.shape[:4], n_c)
        self.codes.copy_(codes)

    def generated_weight(self) -> torch.Tensor:
        """The (O, C, kh, kw) kernel ``assemble(A_CSG c_i)`` (eq. 1), differentiable in the codes and ``A_CSG``."""
        return assemble_slices(self.generator(self.codes), self.weight_shape)

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
        # check_conv_input reads `.weight` only for its dtype and device: hand it the codes instead of generating
        spec = SimpleNamespace(
            display_name=self.display_name, in_channels=self.in_channels, kernel_size=self.kernel_size,
            padding=self.padding, dilation=self.dilation, weight=self.codes,
        )
        check_conv_input(spec, x)
        y = F.conv2d(x, self.generated_weight(), self.bias, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------ accounting
    @property
    def num_slices(self) -> int:
        return math.prod(self.codes.shape[:4])

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
            f"padding={self.padding}, dilation={self.dilation}, slices={list(self.codes.shape[:4])} of "
            f"{list(self.config.slice_shape)}, code_size={self.config.code_size}, bias={self.bias is not None}"
        )


def make_context(model: nn.Module, config: CSGConfig) -> SliceGenerator:
    """The one generator ``patch`` hands to every converted layer (one ``A_CSG`` per network, 3.1).

    A :class:`SliceGenerator` of the config's slice shape and code size already in ``model`` (one of an earlier
    patch, of ``TrainAndReplace``, or a pre-trained one attached by the user) is reused, its ``requires_grad`` set
    by ``config.freeze_generator``; otherwise a new one seeded with ``config.seed`` on the device and dtype of the
    model's first ``nn.Conv2d``.
    """
    for module in model.modules():
        if isinstance(module, SliceGenerator) and module.matches(config):
            module.weight.requires_grad_(not config.freeze_generator)
            return module
    ref = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    return SliceGenerator.from_config(config, **factory)


register_method(
    MethodSpec(
        name="csg",
        config_cls=CSGConfig,
        converters=((nn.Conv2d, CSGConv2d), (nn.ConvTranspose2d, CSGConv2d)),
        unconvertible_reason=lambda module, config: conv_unconvertible_reason(module),
        make_context=make_context,
    )
)
