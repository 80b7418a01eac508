"""The registry of methods that ``tritonslide.patch`` applies (one handler per config type, as torchao does).

Each layer module registers its method at import time; this module imports no layer, so there is no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class MethodSpec:
    """How ``patch`` applies one method.

    converters: (dense module type, tritonslide layer class) pairs; the first whose type matches converts the
        module with ``layer_cls.from_dense(module, config, name=qualified_name, context=context)``.
    unconvertible_reason(module, config): why a matched module stays dense (listed in patch's one warning), or
        None.
    make_context(model, config, targets, **options): built once per ``patch`` call, after the modules to convert
        (``targets``) are known, and handed to every ``from_dense`` (CSG's one shared generator, fitted to the
        targets); None when the method needs none.
    options: the keyword arguments of ``patch`` that this method takes (passed to ``make_context``).
    """

    name: str
    config_cls: type
    converters: tuple[tuple[type, type], ...]
    unconvertible_reason: Callable[[nn.Module, Any], str | None]
    make_context: Callable[..., Any] | None = None
    options: tuple[str, ...] = ()

    def layer_for(self, module: nn.Module) -> type | None:
        return next((layer for dense, layer in self.converters if isinstance(module, dense)), None)


METHODS: dict[str, MethodSpec] = {}
# every tritonslide layer class, for unpatch / idempotence
LAYER_TYPES: list[type] = []


def register_method(spec: MethodSpec) -> None:
    """Register a method so that ``patch(model, spec.name)`` and ``patch(model, spec.config_cls(...))`` work."""
    METHODS[spec.name] = spec
    for _, layer in spec.converters:
        if layer not in LAYER_TYPES:
            LAYER_TYPES.append(layer)


def is_tritonslide_layer(module: nn.Module) -> bool:
    return isinstance(module, tuple(LAYER_TYPES))


def method_of(module: nn.Module) -> str | None:
    """The registered method whose layers include ``type(module)`` (exactly), or None."""
    return next((s.name for s in METHODS.values() if any(type(module) is layer for _, layer in s.converters)), None)
