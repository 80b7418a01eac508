"""tritonslide under torch.distributed: DistributedDataParallel keeps the ranks of every method identical, and
``ALSHConfig.sync_active_set`` makes each rank choose the filters one process would choose on the global batch.

Two gloo processes on localhost, started once for the module (``torch.multiprocessing.spawn``: starting a process
costs an import of torch, seconds on a 2-core CPU). The workers run every case in a process group of its own (a fresh
file store per case, so a case that fails on one rank times out on the other and the next case starts clean) and save
what each rank computed, or its traceback, to ``<case>.rank<r>.pt``; the tests compare the files, so a mismatch fails
with an assertion message in the parent."""

import copy
import datetime
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import tritonslide
from tritonslide.configs import ALSHConfig, CSGConfig, LowRankConfig, MILFConfig, SketchConfig
from tritonslide.nn import (
    ALSHConv2d,
    ALSHSelector,
    CSGConv2d,
    ImputedBatchNorm2d,
    ImputedSyncBatchNorm,
    LowRankConv2d,
    MILFConv2d,
    SketchConv2d,
)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)

WORLD = 2
BATCH = 4  # per rank in the active-set test (6 per rank in training)
# MILFConfig's default sketch (k = 32) has more parameters than the tiny CNN's 16->24 and 24->24 convs, so patch would
# leave every layer dense; k = 16 converts both.
MILF_SKETCH = SketchConfig(k=16, pairs=1, mode="output", distribution="uniform")
# ALSH's default tables (L = 3, K = 5, top 5 buckets) keep 8-13 of the 24 filters of the tiny CNN's layers active.
TRAIN_CONFIGS = {
    "alsh": ALSHConfig(),  # each rank chooses its filters from its own batch
    "alsh_sync": ALSHConfig(sync_active_set=True, selection="batch"),  # sync is about the per-batch set
    # per-sample training (issue #15): every sample's own set, dW summed over each rank's samples, then all-reduced
    "alsh_sample": ALSHConfig(selection="sample"),
    "milf_sample": MILFConfig(sketch=MILF_SKETCH, alsh=ALSHConfig(selection="sample")),
    "sketch": SketchConfig(),
    "milf": MILFConfig(sketch=MILF_SKETCH),
    "lowrank": LowRankConfig(),
    "csg": CSGConfig(),
}
LAYERS = {"alsh": ALSHConv2d, "alsh_sync": ALSHConv2d, "alsh_sample": ALSHConv2d, "milf_sample": MILFConv2d,
          "sketch": SketchConv2d, "milf": MILFConv2d, "lowrank": LowRankConv2d, "csg": CSGConv2d}
SYNC_METHODS = ("alsh", "milf")


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )


def build(config, seed: int = 0) -> nn.Sequential:
    """The same patched model in every process: the same seed, and patch derives each layer's hyperplanes and sketch
    matrices from the config's seed and the layer's name."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers left dense (the first conv, the 10-class head)
        return tritonslide.patch(tiny_cnn(), config)


def alsh_layers(model: nn.Module) -> list[ALSHSelector]:
    return [m for m in model.modules() if isinstance(m, ALSHSelector)]


def active_counts(model: nn.Module) -> list[tuple[int, int] | None]:
    return [m.last_active_counts for m in alsh_layers(model)]


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (the statistics buffers stat_* and last_active are not persistent)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def sync_config(method: str, sync: bool):
    alsh = ALSHConfig(sync_active_set=sync, selection="batch")  # sync is about the per-batch set, in eval too
    return alsh if method == "alsh" else MILFConfig(sketch=MILF_SKETCH, alsh=alsh)


def global_batch() -> torch.Tensor:
    return torch.randn(WORLD * BATCH, 3, 12, 12, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------------- the workers
def _train(rank: int, case: str) -> dict:
    """3 SGD steps of DDP on this rank's own random data."""
    model = build(TRAIN_CONFIGS[case])
    init = tensors(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank trains on different data
    counts = []
    for _ in range(3):
        x, target = torch.randn(6, 3, 12, 12, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(ddp(x), target).backward()
        opt.step()
        counts.append(active_counts(model))
    return {
        "init": init, "final": tensors(model), "counts": counts,
        "params": [name for name, _ in model.named_parameters()],
        "extra": {k: v for k, v in model.state_dict().items() if not isinstance(v, torch.Tensor)},
    }


def _choose(rank: int, method: str) -> dict:
    """The eval-mode output on this rank's rows of the global batch, with and without sync_active_set."""
    x = global_batch()[rank * BATCH: (rank + 1) * BATCH]
    result = {}
    for sync in (True, False):
        model = build(sync_config(method, sync)).eval()
        with torch.no_grad():
            result[sync] = (model(x), active_counts(model))
    return result


def _empty(rank: int, method: str) -> dict:
    """With sync_active_set, rank 1's batch is empty: it still joins every layer's all-reduce (with a zero
    histogram), so rank 0 chooses from its own rows alone and neither rank waits for a collective."""
    x = global_batch()[:BATCH] if rank == 0 else global_batch()[:0]
    model = build(sync_config(method, True)).eval()
    with torch.no_grad():
        y = model(x)
    dist.barrier()  # the collectives of both ranks were paired up
    return {"y": y}


# ImputedSyncBatchNorm: how many of the global batch's 8 samples each rank holds
BN_SPLITS = {"even": 4, "uneven": 6, "empty": 8}
BN_SHAPES = {"planes": (8, 6, 3, 4), "points": (8, 4, 1, 1)}


def bn_case(shape_name: str) -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    """A float64 BatchNorm with random affine and running statistics, a global batch whose planes are zero in a
    pattern that covers every case (see ``bn_input``), and an output gradient."""
    shape = BN_SHAPES[shape_name]
    g = torch.Generator().manual_seed(11)
    bn = nn.BatchNorm2d(shape[1], momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.5, 0.5, generator=g)
        bn.running_mean.uniform_(-0.2, 0.2, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    return bn, bn_input(shape, g), torch.randn(shape, generator=g, dtype=torch.float64)


def bn_input(shape, g: torch.Generator) -> torch.Tensor:
    """Values with whole planes zeroed (not computed). Channel 0: no sample computed; 1: every sample; 2: only
    sample 0 (rank 0's); 3: samples 0 and 7, one on each rank in the even split, so with 1x1 planes each rank alone
    has one value (no usable variance) and together they have two; the others at random."""
    x = 3.0 + torch.randn(shape, generator=g, dtype=torch.float64)  # a mean far from 0, as after ReLU + bias
    keep = torch.rand(shape[:2], generator=g) < 0.5
    keep[:, 0], keep[:, 1], keep[:, 2], keep[:, 3] = False, True, False, False
    keep[0, 2] = keep[0, 3] = keep[7, 3] = True
    return x * keep[:, :, None, None]


def _bn(rank: int, case: str) -> dict:
    """One training forward and backward of ImputedSyncBatchNorm on this rank's rows of the global batch, then an
    eval forward on the same rows."""
    split, shape_name = case.split("/")
    bn, x, gy = bn_case(shape_name)
    lo, hi = (0, BN_SPLITS[split]) if rank == 0 else (BN_SPLITS[split], len(x))
    layer = ImputedSyncBatchNorm.from_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(bn), "bn").train()
    xr = x[lo:hi].clone().requires_grad_(True)
    y = layer(xr)
    (y * gy[lo:hi]).sum().backward()
    with torch.no_grad():
        y_eval = layer.eval()(x[lo:hi])
    return {"y": y.detach(), "dx": xr.grad, "dgamma": layer.weight.grad, "dbeta": layer.bias.grad,
            "mean": layer.running_mean, "var": layer.running_var, "tracked": layer.num_batches_tracked,
            "y_eval": y_eval}


def _bn_compiled(rank: int, _: object) -> dict:
    """ImputedSyncBatchNorm under torch.compile(fullgraph=True) on two ranks, against the same module in eager."""
    bn, x, gy = bn_case("planes")
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    got = {}
    for name in ("eager", "compiled"):
        layer = ImputedSyncBatchNorm.from_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn)), "bn")
        run = torch.compile(layer, backend="aot_eager", fullgraph=True) if name == "compiled" else layer
        xr = x[rows].clone().requires_grad_(True)
        y = run(xr)
        (y * gy[rows]).sum().backward()
        got[name] = (y.detach(), xr.grad, layer.weight.grad, layer.running_var)
    return got


def bn_cnn() -> nn.Sequential:
    """BatchNorm after the two convolutions that patch converts (the 3-channel first one stays dense: torch's own
    SyncBatchNorm would refuse CPU tensors)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
        nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )


def build_bn_cnn(sync_bn: bool) -> nn.Module:
    """The BatchNorm CNN patched with synchronized per-batch active sets (the sets one process would choose for the
    global batch), its BatchNorms synchronized too when ``sync_bn``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = tritonslide.patch(bn_cnn(), ALSHConfig(sync_active_set=True, selection="batch"))
    return tritonslide.convert_sync_batchnorm(model) if sync_bn else model


def bn_cnn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD * BATCH, 3, 10, 10, generator=g), torch.randint(0, 10, (WORLD * BATCH,), generator=g)


def _bn_ddp(rank: int, sync_bn: bool) -> dict:
    """One data-parallel training step of the patched BatchNorm CNN on this rank's half of the global batch. The
    gradients are averaged by hand as DDP averages them: DDP refuses any SyncBatchNorm in a CPU module (torch's
    check, for its own SyncBatchNorm's sake), though ImputedSyncBatchNorm runs on CPU tensors."""
    model = build_bn_cnn(sync_bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = bn_cnn_batch()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = model(x[rows])
    F.cross_entropy(out, target[rows]).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    opt.step()
    return {"out": out.detach(), "final": tensors(model), "counts": active_counts(model),
            "types": [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]}


CASES = {**{f"train_{c}": (_train, c) for c in TRAIN_CONFIGS}, **{f"sync_{m}": (_choose, m) for m in SYNC_METHODS},
         **{f"empty_{m}": (_empty, m) for m in SYNC_METHODS},
         **{f"bn_{split}_{shape}": (_bn, f"{split}/{shape}") for split in BN_SPLITS for shape in BN_SHAPES},
         **{f"bn_ddp_{sync}": (_bn_ddp, sync) for sync in (True, False)}, "bn_compiled": (_bn_compiled, None)}


def _worker(rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    for name, (fn, arg) in CASES.items():
        # A collective that a failed rank never joins raises after the timeout on the other rank instead of hanging.
        dist.init_process_group("gloo", init_method=f"file://{out / name}.store", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = fn(rank, arg)
        except Exception:
            result = {"error": traceback.format_exc()}
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"{name}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(out,), nprocs=WORLD, join=True)

    def load(name: str) -> list[dict]:
        ranks = [torch.load(out / f"{name}.rank{r}.pt") for r in range(WORLD)]
        errors = [f"rank {r} raised\n{got['error']}" for r, got in enumerate(ranks) if "error" in got]
        if errors:
            pytest.fail(f"{name}: " + "\n".join(errors), pytrace=False)
        return ranks

    return load


# ---------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", list(TRAIN_CONFIGS))
def test_ddp_keeps_ranks_identical(case, results):
    assert any(isinstance(m, LAYERS[case]) for m in build(TRAIN_CONFIGS[case]).modules()), f"{case}: none converted"
    ranks = results(f"train_{case}")
    ref = ranks[0]
    for r, got in enumerate(ranks[1:], 1):
        for when in ("init", "final"):
            assert got[when].keys() == ref[when].keys()
            differ = [k for k in ref[when] if not torch.equal(got[when][k], ref[when][k])]
            assert not differ, f"{case}: rank {r} differs from rank 0 ({when} state) in {differ}"
        assert got["extra"] == ref["extra"], f"{case}: rank {r}'s configs (extra state) differ from rank 0's"
    unchanged = [k for k in ref["params"] if torch.equal(ref["final"][k], ref["init"][k])]
    assert not unchanged, f"{case}: parameters not trained: {unchanged}"
    if LAYERS[case] in (ALSHConv2d, MILFConv2d):  # the sets were partial, so the ranks could have diverged
        assert any(o < 24 for step in ref["counts"] for o, _ in step), f"{case}: all filters active {ref['counts']}"
    if case == "alsh_sync":  # the same histograms, so the same sets (compared here by their sizes)
        assert ranks[1]["counts"] == ref["counts"], f"active set sizes per step: {[g['counts'] for g in ranks]}"


@pytest.mark.parametrize("method", SYNC_METHODS)
def test_sync_active_set_matches_single_process_choice(method, results):
    # one process without a process group (sync_active_set is then ignored) on the whole batch
    model = build(sync_config(method, True)).eval()
    with torch.no_grad():
        full = model(global_batch())
    counts = active_counts(model)
    assert any(o < m.out_channels for (o, _), m in zip(counts, alsh_layers(model))), f"all filters active: {counts}"

    ranks = results(f"sync_{method}")
    for r, got in enumerate(ranks):
        y, rank_counts = got[True]
        torch.testing.assert_close(y, full[r * BATCH: (r + 1) * BATCH], atol=1e-5, rtol=0,
                                   msg=lambda m, r=r: f"{method}: rank {r} with sync_active_set: {m}")
        assert rank_counts == counts, f"{method}: rank {r} chose {rank_counts} active filters, one process {counts}"
    # Without the sync each rank chooses from its own half. With the default tables (L = 3, K = 5, top 5 buckets) that
    # changes the set of both ranks in both methods, so the check above would catch a sync that does nothing. (With
    # L = 2, K = 4, top 2 the two most frequent codes of half of this batch were those of the whole batch: every
    # rank's own choice was already the global one.)
    unsynced = [not torch.allclose(got[False][0], full[r * BATCH: (r + 1) * BATCH], atol=1e-5, rtol=0)
                for r, got in enumerate(ranks)]
    assert any(unsynced), f"{method}: every rank's own choice already equals the global one; the test shows nothing"


@pytest.mark.parametrize("method", SYNC_METHODS)
def test_sync_active_set_with_an_empty_rank(method, results):
    model = build(sync_config(method, True)).eval()
    with torch.no_grad():
        alone = model(global_batch()[:BATCH])
    ranks = results(f"empty_{method}")
    torch.testing.assert_close(ranks[0]["y"], alone, atol=1e-5, rtol=0)
    assert ranks[1]["y"].shape == (0, 10)


@pytest.mark.parametrize("shape", list(BN_SHAPES))
@pytest.mark.parametrize("split", list(BN_SPLITS))
def test_imputed_sync_batchnorm_matches_one_process_on_the_global_batch(split, shape, results):
    """Each rank's rows of the output and of dx, the sum of the ranks' dgamma / dbeta (DDP sums, then averages,
    them) and every rank's running statistics equal ImputedBatchNorm2d's in one process on the whole batch."""
    bn, x, gy = bn_case(shape)
    one = ImputedBatchNorm2d.from_batchnorm(bn, "bn").train()
    xg = x.clone().requires_grad_(True)
    y = one(xg)
    (y * gy).sum().backward()
    with torch.no_grad():
        y_eval = one.eval()(x)
    ranks = results(f"bn_{split}_{shape}")
    cut = BN_SPLITS[split]
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(torch.cat([got["y"] for got in ranks]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([got["dx"] for got in ranks]), xg.grad, **tol)
    torch.testing.assert_close(sum(got["dgamma"] for got in ranks), one.weight.grad, **tol)
    torch.testing.assert_close(sum(got["dbeta"] for got in ranks), one.bias.grad, **tol)
    torch.testing.assert_close(torch.cat([got["y_eval"] for got in ranks]), y_eval, **tol)
    for got in ranks:
        torch.testing.assert_close(got["mean"], one.running_mean, **tol)
        torch.testing.assert_close(got["var"], one.running_var, **tol)
        assert int(got["tracked"]) == int(one.num_batches_tracked) == 1
    # the case covers what it says: a rank alone would have normalized differently
    own = ImputedBatchNorm2d.from_batchnorm(bn_case(shape)[0], "bn").train()
    with torch.no_grad():
        alone = own(x[:cut])
    if split != "empty":
        assert not torch.allclose(alone, y[:cut].detach(), atol=1e-6), "rank 0 alone gives the global statistics"
    if shape == "points":  # channel 3 has one value per rank: usable only together (the running stats moved)
        assert one.running_var[3] != bn_case(shape)[0].running_var[3]


@pytest.mark.parametrize("sync_bn", [True, False])
def test_ddp_with_imputed_sync_batchnorm_trains_like_one_process(sync_bn, results):
    """A patched BatchNorm CNN (synchronized active sets) converted by tritonslide.convert_sync_batchnorm: one
    data-parallel step on two halves gives the outputs, Parameters and running statistics of one process's step on
    the whole batch. Without the conversion each rank's BatchNorm statistics are its own half's, and they differ."""
    ranks = results(f"bn_ddp_{sync_bn}")
    model = build_bn_cnn(False).train()
    converted = [type(m).__name__ for m in build_bn_cnn(True).modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert converted == ["ImputedSyncBatchNorm", "ImputedSyncBatchNorm"], converted
    assert ranks[0]["types"] == (converted if sync_bn else ["ImputedBatchNorm2d", "ImputedBatchNorm2d"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = bn_cnn_batch()
    out = model(x)
    F.cross_entropy(out, target).backward()
    opt.step()
    counts = active_counts(model)
    assert any(o < 24 for o, _ in counts), f"all filters active: {counts}"
    state = tensors(model)
    same = []
    for r, got in enumerate(ranks):
        assert got["counts"] == counts, f"rank {r} chose {got['counts']} active filters, one process {counts}"
        rows = slice(r * BATCH, (r + 1) * BATCH)
        same.append(torch.allclose(got["out"], out[rows].detach(), rtol=1e-4, atol=1e-5))
        if sync_bn:
            assert same[-1], f"rank {r}'s output differs from one process's"
            for k, v in state.items():
                torch.testing.assert_close(got["final"][k], v, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=k, r=r: f"rank {r}, {k}: {m}")
    if not sync_bn:
        assert not all(same), "without synchronized BatchNorm the ranks matched one process: the test shows nothing"


def test_imputed_sync_batchnorm_compiles_under_a_process_group(results):
    for r, got in enumerate(results("bn_compiled")):
        for eager, compiled in zip(got["eager"], got["compiled"]):
            torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12, msg=lambda m, r=r: f"rank {r}: {m}")
