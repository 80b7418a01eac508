"""tritonslide layers. Each has ``from_dense(module, config)``; ``tritonslide.patch`` swaps them in."""

from tritonslide.nn.alsh import ALSHConv2d, ALSHLayerStats, ALSHSelector

__all__ = ["ALSHConv2d", "ALSHLayerStats", "ALSHSelector"]
