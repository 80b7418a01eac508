"""ALSH active-set selection from the query histogram, in PyTorch, with no device-to-host synchronization.

Feeney (2019), shared/papers/001, sec. 4.2 (top-bucket "mode" selection) and Alg. 4: per table the
``top_buckets`` most frequent query codes are taken (only codes that some query hit); a filter is active when its
code in any table is one of them (the union over the L tables). Every step is a fixed-size tensor op, so on CUDA
the whole selection is queued on the device: the result is a fixed-size index buffer plus a device-side count,
which a kernel can read without the host ever learning the size of the active set.
"""

from __future__ import annotations

import torch


def torch_alsh_active_set(
    hist: torch.Tensor, filter_codes: torch.Tensor, top_buckets: int, min_active: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Active filters of one ALSH step as ``(idx, count)``.

    ``hist``: (L, 2**K) query histogram, or (N, L, 2**K) per-sample histograms (one active set per sample);
    ``filter_codes``: (O, L) code of every filter in every table. ``idx`` is an (O,) (or (N, O)) int64
    permutation of ``range(O)`` whose first ``count`` entries are the active filters in ascending order (the rest
    are the inactive ones, also ascending); ``count`` is a 0-d (or (N,)) int64 tensor on the same device. Ties
    between equally frequent codes go to the lower code; a code with no query is never taken (unless
    ``top_buckets`` covers every code: then every filter is active, as in the dense layer). When fewer than
    ``min_active`` filters are active, the filters whose buckets collected the most query votes over all tables are
    added (ties to the lower filter index). Every step is batched over the samples: no loop, no host synchronization.
    """
    single = hist.dim() == 2
    h = hist.unsqueeze(0) if single else hist  # (N, L, B)
    n, n_tables, n_buckets = h.shape
    n_filters = filter_codes.shape[0]
    codes = filter_codes.T.unsqueeze(0).expand(n, n_tables, n_filters)  # (N, L, O)
    if top_buckets >= n_buckets:
        active = torch.ones(n, n_filters, dtype=torch.bool, device=hist.device)
    else:
        top = torch.sort(h, dim=2, descending=True, stable=True).indices[:, :, :top_buckets]
        chosen = torch.zeros(n, n_tables, n_buckets, dtype=torch.bool, device=hist.device)
        chosen.scatter_(2, top, True)
        # a code no query patch hashed to is not a frequent one: a sample whose patches fill fewer than top_buckets
        # buckets of a table (a blank image: every patch in one bucket) takes only the buckets it filled, not the
        # lowest empty codes that a tie at zero would add
        chosen &= h > 0
        active = chosen.gather(2, codes).any(1)  # (N, O)
        # min_active without a host round trip: already-active filters rank first, then by their votes.
        k = min(min_active, n_filters)
        if k > 0:
            votes = h.gather(2, codes).sum(1).to(torch.float64)
            votes = votes + active.to(torch.float64) * (h.sum((1, 2)) + 1)[:, None]
            top_k = torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :k]  # ties: lower index
            active.scatter_(1, top_k, True)
    # A stable sort of the inactive flags puts the active filters first, each group in ascending index order.
    idx = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    count = active.sum(1)
    return (idx[0], count[0]) if single else (idx, count)
