"""torch.compile and torch.export of patched models: one graph, no recompiles, the eager results.

Every op is a registered custom op (tritonslide/_library.py), the backend choice is a guarded global, and the
layers keep their per-step state in buffers, so a patched CNN traces into a single graph. Backend ``aot_eager``
(Dynamo + AOTAutograd, no code generation) keeps these tests fast; one test runs Inductor on the smallest model.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tritonslide import ALSHConfig, MILFConfig, ops
from tritonslide.models import resnet18

METHODS = ("alsh", "sketch", "milf", "lowrank", "csg")
# the target: compiled and eager agree to 1e-4
ATOL = 1e-4


def small_cnn() -> nn.Sequential:
    """conv2 -> conv3 is a linked ALSH pair (only ReLU / MaxPool between them): the compact hand-off of Alg. 6 is
    traced too. Channel counts are large enough that every method converts conv2 and conv3."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(48, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def config_for(method: str):
    # partial active sets (top_buckets < 2**bits) and a rebuild schedule: the compiled graph must follow both. Per
    # batch: these tests cover the exact-set / compact hand-off machinery (unbacked sizes); per-sample sets (the
    # default) compile through tests/test_sample_selection.py
    alsh = ALSHConfig(tables=2, bits=4, top_buckets=3, rebuild_every=2, selection="batch")
    return {"alsh": alsh, "milf": MILFConfig(alsh=alsh)}.get(method, method)


def patched(method: str, model: nn.Module | None = None) -> nn.Module:
    with pytest.warns(UserWarning) if method == "sketch" else contextlib.nullcontext():
        model = tritonslide.patch(model if model is not None else small_cnn(), config_for(method))
    converted = [m for m in model.modules() if tritonslide._registry.is_tritonslide_layer(m)]
    assert len(converted) >= 2, f"{method}: expected at least two converted layers"
    return model



@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same_step(out, ref, model, twin, atol: float = ATOL, rtol: float = 0.0) -> None:
    """The compiled ``model``'s output and Parameter gradients equal the eager ``twin``'s (one weighted loss)."""
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=f"{name}")


def _batches(n: int = 3, size: int = 10):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, size, size, generator=gen), torch.randint(0, 10, (6,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_patched_models_have_no_graph_breaks(method):
    small, resnet = patched(method), patched(method, resnet18(num_classes=10))
    for model, x, train in ((small, torch.randn(2, 3, 10, 10), True), (small, torch.randn(2, 3, 10, 10), False),
                            (resnet, torch.randn(2, 3, 32, 32), True)):
        model.train(train)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
        assert explanation.graph_count == 1
        torch._dynamo.reset()


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_equals_eager_and_never_recompiles(method):
    """Three SGD steps, eager and ``torch.compile(fullgraph=True)`` from the same state: the same losses, outputs,
    Parameters and buffers (ALSH: the same active sets, table rebuilds at step 2, statistics); steps 2 and 3 run
    the graph of step 1 (``error_on_recompile``)."""
    model = patched(method)
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(_batches()):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out_c = step(x)
        out_e = eager(x)
        torch.testing.assert_close(out_c, out_e, atol=ATOL, rtol=0)
        for out, opt in ((out_e, opt_e), (out_c, opt_c)):
            F.cross_entropy(out, y).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"{method}: {name} differs")
    if method in ("alsh", "milf"):
        layers = [m for m in compiled.modules() if hasattr(m, "stats")]
        for layer, twin in zip(layers, [m for m in eager.modules() if hasattr(m, "stats")]):
            assert int(layer.steps) == 3 and torch.equal(layer.filter_codes, twin.filter_codes)
            assert layer.last_active_counts == twin.last_active_counts
            assert layer.last_active_counts[0] < layer.out_channels  # the sets were partial


@pytest.mark.parametrize("method", ("alsh", "milf", "sketch"))
def test_a_smaller_last_batch_recompiles_once(method):
    """A new batch size makes Dynamo retrace once with a symbolic batch (automatic dynamic shapes); later sizes
    reuse that graph. The fakes of every op handle the symbolic sizes (the exact active set's bound included)."""
    model = patched(method)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for i, n in enumerate((6, 4, 5, 3)):
        x = torch.randn(n, 3, 10, 10)
        with torch._dynamo.config.patch(error_on_recompile=i > 1):
            out = compiled(x)
        torch.testing.assert_close(out, twin(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ("alsh", "milf"))
def test_exact_sets_trace_with_unbacked_sizes(method):
    """With ``capture_dynamic_output_shape_ops`` linked layers hand over the exact active set, whose length is an
    unbacked symbolic size (the fake of ``tritonslide::active_indices``), and ALSH's compact output of only
    those channels: still one graph, the eager values and gradients."""
    model = patched(method)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 10, 10)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0
        torch._dynamo.reset()
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    _assert_same_step(out, twin(x), model, twin)


def test_inductor_compiles_the_smallest_model():
    """Inductor (C++ code generation on CPU) around the custom ops: forward and backward equal eager."""
    model = patched("alsh")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 10, 10)
    out = torch.compile(model, backend="inductor", fullgraph=True)(x)
    _assert_same_step(out, twin(x), model, twin, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_export_gives_the_eager_output(method):
    """``torch.export`` of a patched model in eval(): the program reproduces eager on the traced input and on a
    new one (the active sets are computed inside the program, not baked in)."""
    model = patched(method).eval()
    x, x_new = torch.randn(4, 3, 10, 10), torch.randn(4, 3, 10, 10) * 2
    program = torch.export.export(model, (x,))
    for inp in (x, x_new):
        torch.testing.assert_close(program.module()(inp), model(inp), atol=ATOL, rtol=0)
    code = program.graph_module.print_readable(print_output=False)  # the no_grad regions are submodules
    expected = {"alsh": "alsh_active_set", "milf": "alsh_active_set", "sketch": "sketch_conv2d"}.get(method)
    if expected is not None:
        assert f"tritonslide.{expected}" in code


def test_export_of_resnet18():
    model = patched("alsh", resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), atol=ATOL, rtol=0)


def test_backend_choice_is_guarded_not_a_graph_break():
    """Changing ``use_backend`` recompiles (a guard on the process-wide choice) instead of reusing a graph traced
    under another choice; neither choice breaks the graph."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    weight = torch.randn(5, 3, 3, 3)

    def fn(x):
        return ops.active_conv2d(x, weight, None, torch.tensor([0, 2, 4]))

    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 7, 7)
    ref = fn(x)
    torch.testing.assert_close(compiled(x), ref)
    assert counter.frame_count == 1
    with tritonslide.use_backend("torch"):
        torch.testing.assert_close(compiled(x), ref)
    assert counter.frame_count == 2
    torch.testing.assert_close(compiled(x), ref)
    assert counter.frame_count == 2  # the first graph again


def test_layer_names_are_not_guarded_on():
    """Renaming a layer (its name appears only in error messages) does not recompile."""
    model = patched("alsh")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 10, 10)
    compiled(x)
    model[2]._name = "renamed"
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)


def test_fake_tensors_give_real_shapes_and_formats():
    """The fake implementations promise what the real ones return (shape, dtype, memory format), which Inductor
    relies on when it plans buffers around the custom ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 5, 9, 11).to(memory_format=torch.channels_last)
    w, idx = torch.randn(7, 5, 3, 3), torch.tensor([1, 4, 6])
    real = ops.active_conv2d(x, w, None, idx, padding=1, compact_output=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.active_conv2d(mode.from_tensor(x), mode.from_tensor(w), None, mode.from_tensor(idx), padding=1,
                                 compact_output=True)
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()


# ---------------------------------------------------------------------- CUDA (run where a GPU is present)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("method", METHODS)
def test_compiled_on_cuda_equals_eager(method, backend):
    """On CUDA the custom ops run the Triton kernels inside the compiled graph: one graph, the eager results."""
    model = patched(method).cuda()
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, 10, 10, device="cuda")
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    _assert_same_step(out, twin(x), model, twin, atol=1e-3, rtol=1e-3)
