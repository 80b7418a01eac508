"""tritonslide.ops.alsh_active_set (top-bucket selection on device, fixed-size index buffer + count) against a
plain loop over tables, buckets and filters."""

import pytest
import torch

from tritonslide import ops


def loop_reference(hist, filter_codes, top_buckets, min_active):
    """Deliberately plain: rank the buckets of every table, take the top ones, walk every filter."""
    n_tables, n_buckets = hist.shape
    chosen = []
    for t in range(n_tables):
        order = sorted(range(n_buckets), key=lambda b: (-int(hist[t, b]), b))  # ties to the lower code
        # codes no query hit are never taken, unless top_buckets covers every code (then every filter is active)
        chosen.append(set(order[:top_buckets]) if top_buckets >= n_buckets
                      else {b for b in order[:top_buckets] if int(hist[t, b]) > 0})
    n_filters = filter_codes.shape[0]
    active = [any(int(filter_codes[o, t]) in chosen[t] for t in range(n_tables)) for o in range(n_filters)]
    missing = min(min_active, n_filters) - sum(active)
    if missing > 0:
        votes = [sum(int(hist[t, int(filter_codes[o, t])]) for t in range(n_tables)) for o in range(n_filters)]
        for o in sorted((o for o in range(n_filters) if not active[o]), key=lambda o: (-votes[o], o))[:missing]:
            active[o] = True
    return [o for o in range(n_filters) if active[o]]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n_tables", "bits", "n_filters", "top", "min_active"),
                         [(3, 5, 37, 5, 1), (2, 3, 13, 1, 1), (4, 4, 50, 2, 20), (1, 2, 7, 4, 1), (3, 6, 9, 3, 0)])
def test_matches_loop_reference(seed, n_tables, bits, n_filters, top, min_active):
    gen = torch.Generator().manual_seed(seed)
    # small counts: many ties between buckets, which the rule breaks towards the lower code
    hist = torch.randint(0, 4, (n_tables, 1 << bits), generator=gen)
    codes = torch.randint(0, 1 << bits, (n_filters, n_tables), generator=gen)
    idx, count = ops.alsh_active_set(hist, codes, top, min_active)
    expected = loop_reference(hist, codes, top, min_active)
    assert idx.dtype == torch.int64 and idx.shape == (n_filters,)
    assert count.dtype == torch.int64 and count.dim() == 0
    assert int(count) == len(expected)
    assert idx[: int(count)].tolist() == expected
    rest = idx[int(count):].tolist()
    assert rest == sorted(set(range(n_filters)) - set(expected))  # padding: the inactive filters, ascending


def test_all_buckets_taken_means_all_filters():
    hist = torch.randint(0, 9, (2, 8))
    idx, count = ops.alsh_active_set(hist, torch.randint(0, 8, (6, 2)), 8, 1)
    assert int(count) == 6 and idx.tolist() == list(range(6))


def test_bad_arguments_name_the_op():
    hist = torch.zeros(3, 8, dtype=torch.int64)
    codes = torch.zeros(5, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"alsh_active_set: expected hist"):
        ops.alsh_active_set(hist.float(), codes, 2)
    with pytest.raises(TypeError, match=r"alsh_active_set: expected filter_codes"):
        ops.alsh_active_set(hist, codes.int(), 2)
    with pytest.raises(ValueError, match=r"3 tables but hist has 2"):
        ops.alsh_active_set(hist[:2], codes, 2)
    with pytest.raises(ValueError, match=r"2\*\*K columns"):
        ops.alsh_active_set(hist[:, :6], codes, 2)
    with pytest.raises(ValueError, match=r"top_buckets must be an int >= 1"):
        ops.alsh_active_set(hist, codes, 0)
    with pytest.raises(ValueError, match=r"filter_codes must lie in \[0, 8\)"):
        ops.alsh_active_set(hist, codes + 8, 2)


def test_codes_no_query_hit_are_never_taken():
    # sample 0 filled one bucket per table (a blank image: every patch has the same code), sample 1 many; a tie at
    # zero must not add the lowest empty codes' filters
    n_tables, n_buckets = 2, 16
    hist = torch.zeros(2, n_tables, n_buckets, dtype=torch.int64)
    hist[0, 0, 9] = 169
    hist[0, 1, 4] = 169
    hist[1] = torch.arange(1, n_buckets + 1).expand(n_tables, -1)  # every bucket hit; the top 5 are 11-15
    codes = torch.tensor([[9, 0], [0, 4], [1, 1], [2, 3], [3, 2], [12, 12], [0, 0]])
    idx, count = ops.alsh_active_set(hist, codes, 5, 1)
    assert idx[0, : int(count[0])].tolist() == [0, 1]  # filter 0 by table 0's code 9, filter 1 by table 1's code 4
    assert idx[1, : int(count[1])].tolist() == [5]
    for n in range(2):
        assert idx[n, : int(count[n])].tolist() == loop_reference(hist[n], codes, 5, 1)
    # min_active still fills up, by votes (filters 0 and 1 hold all of sample 0's votes), then the lower index
    idx, count = ops.alsh_active_set(hist[0], codes, 5, 4)
    assert idx[: int(count)].tolist() == [0, 1, 2, 3]
