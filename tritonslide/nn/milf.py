"""MILF (CNN-SLIDE, Chadha, Janardhan, Niverthi, shared/papers/000, sec. 4.3): ALSH filter selection on a
sketched convolution.

The sketch (sec. 4.2; any :class:`~tritonslide.configs.SketchConfig`) reduces the parameters inside each filter,
ALSH (sec. 4.1, Feeney 2019) reduces the number of filters applied. Per batch:

1. the tables index the reconstructed filters ``W = S x R`` (sec. 4.3), i.e. the rows of ``B @ A.flatten(1)``;
   they are formed only when the tables are (re)built, never in ``forward``;
2. every im2col patch is hashed and the active set chosen exactly as :class:`~tritonslide.nn.ALSHConv2d` does
   (the shared :class:`~tritonslide.nn.alsh.ALSHSelector`);
3. ONE :func:`tritonslide.ops.sketch_conv2d` chain computes only the active output channels: the rows ``out_idx``
   of ``B`` (the "reduced sketch tensor S' in R^{s x k x alpha}" of sec. 4.3); the others are zero.

Gradients follow the masked output ``y = m * conv(x, W) + m * bias`` (``m`` the 0/1 mask of the active set): the
B parts (``U1^T`` fixed, ``S2`` trainable) and the bias get gradients in the active rows only, while the A parts
(``S1`` trainable) collect ``g u1[:, act] G_act^T I_in`` from all active outputs (``g = 1 / sqrt(m)``, ``u1`` the
orthonormal basis of the random matrices' row space, see :mod:`tritonslide.nn.sketch`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tritonslide import ops
from tritonslide._registry import MethodSpec, register_method
from tritonslide.configs import MILFConfig
from tritonslide.nn._common import conv_unconvertible_reason, dense_conv_like, layer_seed
from tritonslide.nn.alsh import ALSHSelector, exact_sets
from tritonslide.nn.sketch import (
    SketchFactors,
    check_layer_config,
    check_sketch_conv_input,
    conv_from_dense,
    lazy_module_reason,
    sketch_size_reason,
)


def milf_seeds(config: MILFConfig, name: str) -> tuple[int, int]:
    """(sketch seed, hyperplane seed) of the layer ``name``: the sketch matrices equal those of
    ``SketchConv2d.from_dense(conv, config.sketch, name=name)``; the planes get a salted name so that they are
    independent of the sketch matrices when both configs keep seed 0."""
    return layer_seed(config.sketch.seed, name), layer_seed(config.alsh.seed, name + "/alsh")


class MILFConv2d(ALSHSelector, SketchFactors):
    """Drop-in for ``nn.Conv2d`` (groups=1, zero padding): a sketched conv that computes only the filters ALSH
    selects.

    Parameters and random matrices are those of :class:`~tritonslide.nn.SketchConv2d` (see
    :class:`~tritonslide.nn.sketch.SketchFactors`); the ALSH buffers, the per-batch selection, the table rebuilds
    (``rebuild_every``, ``tritonslide.rebuild_tables``: re-hash after the sketches trained) and last-active-set
    sharing are :class:`~tritonslide.nn.alsh.ALSHSelector`'s. With sharing, only the hashing reads the active
    input channels; the chain reads all of them (``ops.sketch_conv2d`` has no ``in_idx``), and the ones it skips
    would be zero, so the output is the same.
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
        config: MILFConfig | None = None,
        *,
        seed: int | None = None,
        alsh_seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init_weights: bool = True,
    ) -> None:
        """``seed``: of the sketch matrices, ``alsh_seed``: of the hyperplanes; None: ``milf_seeds(config, "")``."""
        super().__init__()
        self.config = check_layer_config(config, MILFConfig, "MILFConv2d")
        default_seed, default_alsh_seed = milf_seeds(self.config, "")
        self._init_alsh(in_channels, out_channels, kernel_size, stride, padding, dilation, self.config.alsh,
                        default_alsh_seed if alsh_seed is None else alsh_seed, device, dtype)
        self._init_sketch(out_channels, (self.in_channels, *self.kernel_size), self.config.sketch,
                          default_seed if seed is None else seed, bias, device, dtype, _init_weights)
        if _init_weights:
            self.rebuild_tables()

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, config: MILFConfig | None = None, *, name: str = "", context: Any = None
    ) -> "MILFConv2d":
        """Sketch a trained ``nn.Conv2d`` as ``SketchConv2d.from_dense`` does (``config.sketch.init``: least
        squares by default, Theorem 3.1's estimator with ``"unbiased"``) and hash the reconstructed filters into
        fresh tables."""
        config = check_layer_config(config, MILFConfig, "MILFConv2d.from_dense")
        seed, alsh_seed = milf_seeds(config, name)
        layer = conv_from_dense(cls, conv, config, config.sketch, name, seed=seed, alsh_seed=alsh_seed)
        layer.rebuild_tables()
        return layer

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the reconstructed weight (all filters, a new Parameter) and the same bias."""
        return dense_conv_like(self, nn.Parameter(self.reconstructed_weight().detach().clone()), self.bias)

    def filter_matrix(self) -> torch.Tensor:
        """(O, C*kh*kw) reconstructed filters ``W = S x R`` (sec. 4.3); formed only when the tables are rebuilt."""
        return self.reconstructed_weight().flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        check_sketch_conv_input(self, x)
        in_idx, in_count, read, _ = self._shared_input()  # a MILF layer reads full inputs (no compact hand-off)
        out_idx = count = None
        # traced: the padded set and its count (no data-dependent shape); per sample: always (N, O) rows + counts
        padded = not exact_sets() or self.per_sample()
        if x.shape[0] > 0:
            out_idx, count = self.active_filters(x, in_idx, in_count, padded=padded)
            if self._publish:  # the output keeps every channel (inactive ones zero): never compact
                self._publish_set(out_idx, count, padded, False)
            self._record_counts(count, read)
        else:
            self.sync_empty_batch()
        a, b = self.factors()
        y = ops.sketch_conv2d(x, a, b, self.bias, out_idx, self.stride, self.padding, self.dilation,
                              out_count=count if padded else None)
        return y.squeeze(0) if unbatched else y

    def macs(self, out_h: int, out_w: int) -> int:
        """Multiply-adds per sample at the last forward's active set: hashing (L*K projections of the read
        channels), the conv with A (all C channels, r outputs) and the 1x1 conv of the active rows of B."""
        o, c = self.last_active_counts or (self.out_channels, self.in_channels)
        taps, r, cfg = self.kernel_size[0] * self.kernel_size[1], self._sketch_rank(), self.alsh_config
        return (cfg.tables * cfg.bits * c * taps + r * self.in_channels * taps + o * r) * out_h * out_w

    def extra_repr(self) -> str:
        return f"{ALSHSelector.extra_repr(self)}, {self.sketch_repr()}, bias={self.bias is not None}"


def milf_unconvertible_reason(module: nn.Module, config: MILFConfig) -> str | None:
    return lazy_module_reason(module) or conv_unconvertible_reason(module) or sketch_size_reason(module, config.sketch)


register_method(
    MethodSpec(
        name="milf",
        config_cls=MILFConfig,
        converters=((nn.Conv2d, MILFConv2d), (nn.ConvTranspose2d, MILFConv2d)),
        unconvertible_reason=milf_unconvertible_reason,
    )
)
