"""tritonslide: cheaper convolutional and linear layers with hashing and sketching.

Public API: ``patch`` / ``unpatch`` (model surgery), the configs, ``tritonslide.nn`` (layers), ``tritonslide.models``
(standard architectures with torchvision's layer shapes and names), ``tritonslide.ops``
(the op layer with its Triton and PyTorch backends), ``use_backend``, ``rebuild_tables``, ``set_selection``,
``impute_batchnorms``, ``convert_sync_batchnorm``, ``stats``, ``summary``, ``TrainAndReplace``.
"""

from tritonslide import models, nn, ops
from tritonslide._backend import current_backend, use_backend
from tritonslide.configs import ALSHConfig, CSGConfig, LowRankConfig, MILFConfig, SketchConfig
from tritonslide.patch import (
    TrainAndReplace,
    available_methods,
    convert_sync_batchnorm,
    impute_batchnorms,
    link_active_sets,
    patch,
    rebuild_tables,
    reset_stats,
    set_selection,
    stats,
    unpatch,
)
from tritonslide.summary import LayerCost, ModelSummary, summary

__version__ = "0.1.0"

__all__ = [
    "ALSHConfig",
    "CSGConfig",
    "LayerCost",
    "LowRankConfig",
    "MILFConfig",
    "ModelSummary",
    "SketchConfig",
    "summary",
    "TrainAndReplace",
    "available_methods",
    "convert_sync_batchnorm",
    "current_backend",
    "impute_batchnorms",
    "link_active_sets",
    "models",
    "nn",
    "ops",
    "patch",
    "rebuild_tables",
    "reset_stats",
    "set_selection",
    "stats",
    "unpatch",
    "use_backend",
]
