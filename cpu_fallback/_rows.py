"""Per-sample compact tensors (issue #15) at full size: channel ``j`` of sample ``n`` is channel ``idx[n, j]``."""

from __future__ import annotations

import torch

from ._format import is_channels_last


def rows_valid(idx: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
    """(N, k) bool: which entries of the index rows are in use (the first ``count[n]`` of row ``n``)."""
    if count is None:
        return torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    return torch.arange(idx.shape[1], device=idx.device)[None, :] < count[:, None]


def expand_rows(xc: torch.Tensor, idx: torch.Tensor, count: torch.Tensor | None, size: int,
                memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """A per-sample compact tensor (N, k, H, W) at full size (N, size, H, W): channel ``j`` of sample ``n`` goes to
    channel ``idx[n, j]`` for ``j < count[n]``; every other channel is zero (what past a count is never read). Laid
    out as ``xc`` unless ``memory_format`` says otherwise.

    A gather, not a scatter: each full-size channel reads its source row of ``xc`` or an appended zero channel, by
    the inverse of the rows (one small scatter of indices). NCHW: one ``index_select`` of whole (H, W) planes;
    channels_last: a ``gather`` along the innermost dimension. AlexNet's per-sample inputs at batch 64 (1 thread,
    this team's CPU), e.g. (64, 38 -> 64, 27, 27) and (64, 150 -> 384, 13, 13): 3.7 / 4.1 ms by scatter against
    1.0 / 1.6 ms (NCHW) and 4.1 / 5.9 against 2.4 / 3.8 ms (channels_last)."""
    n, k = idx.shape
    hw = xc.shape[2:]
    valid = rows_valid(idx, count)
    # inverse[n, c]: the entry of row n that holds channel c, or k (the zero channel); entries past a count (which
    # may repeat an active index) write to the spare column ``size``, dropped
    inverse = torch.full((n, size + 1), k, dtype=torch.int64, device=idx.device)
    inverse.scatter_(1, torch.where(valid, idx, size), torch.arange(k, device=idx.device).expand(n, k))
    inverse = inverse[:, :size]
    channels_last = is_channels_last(xc) if memory_format is None else memory_format == torch.channels_last
    if channels_last:
        src = torch.cat([xc, xc.new_zeros((n, 1, *hw))], 1).permute(0, 2, 3, 1)
        return src.gather(3, inverse[:, None, None, :].expand(n, *hw, size)).permute(0, 3, 1, 2)
    planes = torch.cat([xc.reshape(n * k, -1), xc.new_zeros((1, hw.numel()))])
    rows = torch.where(inverse < k, inverse + k * torch.arange(n, device=idx.device)[:, None], n * k)
    return planes.index_select(0, rows.view(-1)).view(n, size, *hw)
