"""The CPU fallback's worker threads (cpu_fallback/_workers.py): partition, thread state, and the per-sample
convolution run on them against the same convolution run in one thread."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from tritonslide.cpu_fallback import _workers
from tritonslide.cpu_fallback.sample_conv2d import torch_sample_conv2d, torch_sample_conv2d_backward

pytestmark = pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads for 2 workers")


def test_partition_covers_every_index_once_and_balances_largest_first():
    costs = [7.0, 1.0, 3.0, 3.0, 5.0, 2.0, 2.0, 9.0]
    parts = _workers.partition(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    assert all(p == sorted(p) for p in parts)
    loads = sorted(sum(costs[i] for i in p) for p in parts)
    assert loads == [10.0, 11.0, 11.0]  # largest first: {9, 2}, {7, 3, 1}, {5, 3, 2}
    assert parts == _workers.partition(costs, 3)  # the same every time


def test_map_parts_runs_on_one_thread_workers_with_the_callers_modes():
    seen = []
    both = threading.Barrier(2, timeout=30)  # the two parts run at the same time, on two threads

    def body(part):
        both.wait()
        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled()))
        return sum(part)

    threads = torch.get_num_threads()
    with torch.inference_mode():
        out = _workers.map_parts(body, list(range(8)), [1.0] * 8)
    assert sum(out) == 28 and len(out) == 2
    assert all(name.startswith("tritonslide-cpu") and n == 1 and not grad and inference
               for name, n, grad, inference in seen)
    assert len({name for name, *_ in seen}) == 2
    seen.clear()
    _workers.map_parts(body, list(range(8)), [1.0] * 8)
    assert all(not grad and not inference for _, _, grad, inference in seen)
    # the caller's count, and the count a new thread starts with, are what they were
    assert torch.get_num_threads() == threads
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [threads]


def test_map_parts_stays_on_the_caller_when_off_or_unbalanced(monkeypatch):
    names = []

    def body(part):
        names.append(threading.current_thread().name)
        return part

    # one piece holds most of the cost: faster on the caller's own intra-op threads
    assert _workers.map_parts(body, [0, 1, 2], [10.0, 1.0, 1.0]) == [[0, 1, 2]]
    monkeypatch.setenv("TRITONSLIDE_CPU_WORKERS", "1")
    assert _workers.map_parts(body, list(range(6)), [1.0] * 6) == [list(range(6))]
    assert names == [threading.current_thread().name] * 2
    monkeypatch.setenv("TRITONSLIDE_CPU_WORKERS", "two")
    with pytest.raises(ValueError, match="TRITONSLIDE_CPU_WORKERS must be an integer"):
        _workers.map_parts(body, list(range(6)), [1.0] * 6)


def _child(queue):
    queue.put(sum(_workers.map_parts(sum, list(range(10)), [1.0] * 10)))


def test_a_forked_child_gets_its_own_workers():
    _workers.map_parts(sum, list(range(4)), [1.0] * 4)  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == 45


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, o = 9, 13, 11
    x = torch.randn(n, c, 10, 9, generator=g)
    w = torch.randn(o, c, 3, 3, generator=g)
    b = torch.randn(o, generator=g)
    out_idx = torch.stack([torch.randperm(o, generator=g) for _ in range(n)])
    in_idx = torch.stack([torch.randperm(c, generator=g) for _ in range(n)])
    out_count = torch.randint(1, o + 1, (n,), generator=g)
    in_count = torch.randint(1, c + 1, (n,), generator=g)
    valid_o = torch.arange(o)[None, :] < out_count[:, None]
    valid_i = torch.arange(c)[None, :] < in_count[:, None]
    # each row's first count entries sorted (the op's contract); the rest stays as padding
    out_idx = torch.where(valid_o, out_idx.masked_fill(~valid_o, o).sort(1).values, out_idx)
    in_idx = torch.where(valid_i, in_idx.masked_fill(~valid_i, c).sort(1).values, in_idx)
    return x, w, b, out_idx, out_count, in_idx, in_count


def test_sample_conv_on_workers_equals_one_thread_and_repeats_bitwise(monkeypatch):
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "groups")  # the group loop is what runs on the workers
    x, w, b, out_idx, out_count, in_idx, in_count = _case()
    geom = ((1, 2), (1, 0), (1, 1))
    grad_y = torch.randn(x.shape[0], w.shape[0], 10, 4)

    def run():
        y = torch_sample_conv2d(x, w, b, out_idx, out_count, in_idx, in_count, *geom)
        grads = torch_sample_conv2d_backward(grad_y, x, w, True, out_idx, out_count, in_idx, in_count, *geom,
                                             (True, True, True))
        return (y, *grads)

    threaded, again = run(), run()
    for a, b_ in zip(threaded, again):
        assert torch.equal(a, b_)  # fixed partition, parts summed in order
    monkeypatch.setenv("TRITONSLIDE_CPU_WORKERS", "1")
    for a, b_ in zip(threaded, run()):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_an_inference_forward_runs_the_groups_on_the_caller_and_a_training_forward_on_the_workers(monkeypatch):
    """The op layer passes ``will_backward``: without autograd the group loop runs on the calling thread (its
    intra-op threads; faster for eval on the measured CPU, see _workers.py), in a training forward on the workers;
    the two give the same output up to rounding, and the training forward's gradients are those of the loop."""
    from tritonslide import ops
    from tritonslide.cpu_fallback import sample_conv2d as sc

    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "groups")
    calls = []
    real = sc.map_parts
    monkeypatch.setattr(sc, "map_parts", lambda *a: calls.append(a) or real(*a))
    x, w, b, out_idx, out_count, in_idx, in_count = _case(1)
    geom = ((1, 2), (1, 0), (1, 1))

    def forward(x_, w_, b_):
        return ops.active_conv2d(x_, w_, b_, out_idx, in_idx, *geom, out_count=out_count, in_count=in_count)

    with torch.no_grad():
        eval_y = forward(x, w, b)
    with torch.inference_mode():
        inference_y = forward(x, w, b)
    assert calls == []
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    train_y = forward(xg, wg, bg)
    assert len(calls) == 1  # the forward; the backward below runs on the workers as before
    assert torch.equal(inference_y, eval_y)
    # one or two intra-op threads per group may block a convolution differently: equal up to rounding
    torch.testing.assert_close(train_y.detach(), eval_y, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn_like(train_y)
    train_y.backward(grad_y)
    expected = torch_sample_conv2d_backward(grad_y, x, w, True, out_idx, out_count, in_idx, in_count, *geom,
                                            (True, True, True))
    for got, want in zip((xg.grad, wg.grad, bg.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
