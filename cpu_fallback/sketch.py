"""Sketch-then-unsketch chains in PyTorch: ``y = B (A * x) + b`` without forming the O x C x kh x kw weight.

Kasiviswanathan, Narodytska, Jin (shared/papers/004), eq. 2 and 4: every SK-CONV / SK-FC term is a product
``I_in mat(A)^T B^T`` of the im2col matrix with an r-column factor ``A`` and an O x r factor ``B``; the terms are
concatenated along r, so one chain computes the whole layer. The gradients are those of sec. 3.1 (for
``S_1``: ``I_in^T G U_1^T``, for ``S_2``: ``U_2 I_in^T G``, for the input: ``G B A``), here for the factors as a
whole. Only the rows ``out_idx`` of ``B`` are computed; the other output channels are zero (as in active_conv2d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._format import zeros_like_format


def _scatter_channels(y_act: torch.Tensor, out_idx: torch.Tensor | None, o: int, dim: int) -> torch.Tensor:
    if out_idx is None or out_idx.numel() == o:
        return y_act
    shape = list(y_act.shape)
    shape[dim] = o
    return zeros_like_format(y_act, *shape).index_copy_(dim, out_idx, y_act)


def _rows(t: torch.Tensor | None, out_idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or out_idx is None or out_idx.numel() == t.shape[0]:
        return t
    return t.index_select(0, out_idx)


def torch_sketch_conv2d(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, z)``: ``z = conv2d(x, A)`` (N, r, H', W') is kept for the backward pass."""
    z = F.conv2d(x, a, None, stride, padding, dilation)
    b_act = _rows(b, out_idx)
    if b_act.shape[0] == 0:  # no active row (conv2d has no zero-filter form)
        y_act = zeros_like_format(z, z.shape[0], 0, *z.shape[2:])
    else:
        y_act = F.conv2d(z, b_act[:, :, None, None], _rows(bias, out_idx))
    return _scatter_channels(y_act, out_idx, b.shape[0], 1), z


def torch_sketch_conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    z: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs: tuple[bool, bool, bool, bool],
):
    """Gradients (dx, dA, dB, db); dB and db are zero outside ``out_idx``."""
    need_x, need_a, need_b, need_bias = needs[0], needs[1], needs[2], needs[3] and has_bias
    o = b.shape[0]
    g = grad_y if out_idx is None or out_idx.numel() == o else grad_y.index_select(1, out_idx)
    b_act = _rows(b, out_idx)
    dx = da = db = dbias = None
    if need_b:
        db_act = torch.einsum("nohw,nrhw->or", g, z)
        db = _scatter_channels(db_act, out_idx, o, 0)
    if need_bias:
        dbias = _scatter_channels(g.sum((0, 2, 3)), out_idx, o, 0)
    if need_x or need_a:
        if b_act.shape[0] == 0:  # no active row: nothing flows back
            dz = torch.zeros_like(z)
        else:
            dz = F.conv2d(g, b_act.t()[:, :, None, None])  # (N, r, H', W') = B^T g per position
        dx, da, _ = torch.ops.aten.convolution_backward(
            dz, x, a, None, list(stride), list(padding), list(dilation), False, [0, 0], 1, [need_x, need_a, False]
        )
    return dx, da, db, dbias


def torch_sketch_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, z)`` with ``z = x A^T`` (..., r) and ``y = z B^T + bias`` (..., out)."""
    z = x @ a.t()
    y_act = F.linear(z, _rows(b, out_idx), _rows(bias, out_idx))
    return _scatter_channels(y_act, out_idx, b.shape[0], -1), z


def torch_sketch_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    z: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
):
    need_x, need_a, need_b, need_bias = needs[0], needs[1], needs[2], needs[3] and has_bias
    o = b.shape[0]
    g = grad_y if out_idx is None or out_idx.numel() == o else grad_y.index_select(-1, out_idx)
    g2, z2, x2 = g.reshape(-1, g.shape[-1]), z.reshape(-1, z.shape[-1]), x.reshape(-1, x.shape[-1])
    b_act = _rows(b, out_idx)
    dx = da = db = dbias = None
    if need_b:
        db = _scatter_channels(g2.t() @ z2, out_idx, o, 0)
    if need_bias:
        dbias = _scatter_channels(g2.sum(0), out_idx, o, 0)
    if need_x or need_a:
        dz = g2 @ b_act  # (M, r)
        if need_x:
            dx = (dz @ a).view(x.shape)
        if need_a:
            da = dz.t() @ x2
    return dx, da, db, dbias
