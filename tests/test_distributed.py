"""tritonslide under torch.distributed: DistributedDataParallel keeps the ranks of every method identical, and
``ALSHConfig.sync_active_set`` makes each rank choose the filters one process would choose on the global batch.

Two gloo processes on localhost, started once for the module (``torch.multiprocessing.spawn``: starting a process
costs an import of torch, seconds on a 2-core CPU). The workers run every case in a process group of its own (a fresh
file store per case, so a case that fails on one rank times out on the other and the next case starts clean) and save
what each rank computed, or its traceback, to ``<case>.rank<r>.pt``; the tests compare the files, so a mismatch fails
with an assertion message in the parent."""

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
from tritonslide.nn import ALSHConv2d, ALSHSelector, CSGConv2d, LowRankConv2d, MILFConv2d, SketchConv2d

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


CASES = {**{f"train_{c}": (_train, c) for c in TRAIN_CONFIGS}, **{f"sync_{m}": (_choose, m) for m in SYNC_METHODS},
         **{f"empty_{m}": (_empty, m) for m in SYNC_METHODS}}


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
