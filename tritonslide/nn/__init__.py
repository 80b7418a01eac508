"""tritonslide layers. Each has ``from_dense(module, config)``; ``tritonslide.patch`` swaps them in."""

from tritonslide.nn._common import looks_untrained
from tritonslide.nn.alsh import ALSHConv2d, ALSHLayerStats, ALSHSelector
from tritonslide.nn.batchnorm import ImputedBatchNorm2d, ImputedSyncBatchNorm
from tritonslide.nn.csg import CSGConv2d, SliceGenerator
from tritonslide.nn.lowrank import LowRankConv2d
from tritonslide.nn.milf import MILFConv2d
from tritonslide.nn.sketch import SketchConv2d, SketchLinear

__all__ = [
    "ALSHConv2d", "ALSHLayerStats", "ALSHSelector", "CSGConv2d", "ImputedBatchNorm2d", "ImputedSyncBatchNorm",
    "LowRankConv2d", "MILFConv2d", "SketchConv2d", "SketchLinear", "SliceGenerator", "looks_untrained",
]
