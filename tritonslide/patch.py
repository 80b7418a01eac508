"""Model surgery: ``patch`` / ``unpatch`` swap layers in place through a handler registered per method.

Modelled on torchao's ``quantize_(model, config, filter_fn)``: the list of modules is copied before anything is
swapped, configs are dataclasses, the new layers reuse the original Parameters (an optimizer that holds them keeps
working), and nothing is monkey-patched globally.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import tritonslide.nn  # noqa: F401 - importing the layers registers their methods
from tritonslide._registry import METHODS, MethodSpec, is_tritonslide_layer, method_of
from tritonslide.configs import SELECTIONS, ALSHConfig, MILFConfig
from tritonslide.nn._common import resolve_init, same_config
from tritonslide.nn.alsh import ALSHLayerStats, ALSHSelector
from tritonslide.nn.batchnorm import ImputedBatchNorm2d, ImputedSyncBatchNorm, _ImputedNorm

FilterFn = Callable[[nn.Module, str], bool]
# A config object of a registered method, its name ("alsh", "sketch", ...), or None for ALSHConfig().
ConfigLike = Any


def available_methods() -> list[str]:
    return sorted(METHODS)


# Modules that map a zero channel to a zero channel and never mix channels, so an ALSH layer after them can read
# only the previous ALSH layer's active channels (Alg. 6). Exact types only: a subclass may override forward.
# BatchNorm is not here: it maps 0 to -mean/std * gamma + beta. Nor is PReLU: its per-channel weights would not
# line up with the compact activations that linked layers hand over (only the active channels).
ZERO_PRESERVING: frozenset[type] = frozenset({
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Softsign,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d,
})


def _resolve_config(config: ConfigLike):
    if config is None:
        return ALSHConfig()
    if isinstance(config, str):
        spec = METHODS.get(config.lower())
        if spec is None:
            raise ValueError(f"tritonslide.patch: unknown method {config!r}; available: {available_methods()}")
        return spec.config_cls()
    for spec in METHODS.values():
        if isinstance(config, spec.config_cls):
            return config
    raise TypeError(
        f"tritonslide.patch: config must be None, a method name {available_methods()} or one of their config "
        f"objects, got {type(config).__name__}"
    )


def _spec_for(config) -> MethodSpec:
    return next(s for s in METHODS.values() if isinstance(config, s.config_cls))


def _is_conv_like(module: nn.Module) -> bool:
    """Dense convolutions and the tritonslide layers that replace them (``replaces`` class attribute)."""
    return isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) or getattr(type(module), "replaces", None) is nn.Conv2d


def _first_conv_name(model: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if _is_conv_like(m)), None)


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _default_filter(model: nn.Module) -> FilterFn:
    """The papers keep the first convolution dense (CNN-SLIDE sec. 5, CSG sec. 3): every conv but the first. A
    model that is itself a convolution has no other to convert, so it is converted."""
    first = None if _is_conv_like(model) else _first_conv_name(model)
    return lambda module, fqn: fqn != first


def _init_of(config) -> str | None:
    """The ``init`` of a config (MILF: its sketch's); None for ALSH, which has none."""
    return config.sketch.init if isinstance(config, MILFConfig) else getattr(config, "init", None)


def _with_init(config, init: str | None):
    """``config`` with its ``init`` (MILF: its sketch's) replaced; ALSH reuses the dense weights and has none."""
    if init is None:
        return config
    if isinstance(config, MILFConfig):
        return dataclasses.replace(config, sketch=dataclasses.replace(config.sketch, init=init))
    if not any(f.name == "init" for f in dataclasses.fields(config)):
        raise TypeError(
            f"tritonslide.patch: init= applies to the methods that factor the weight (sketch, milf, lowrank, csg); "
            f"{type(config).__name__} reuses the dense Parameters"
        )
    return dataclasses.replace(config, init=init)


def patch(
    model: nn.Module,
    config: ConfigLike = None,
    *,
    filter_fn: FilterFn | None = None,
    init: str | None = None,
    batchnorm: str = "impute",
    **options: Any,
) -> nn.Module:
    """Swap the convolutions of ``model`` for tritonslide layers, in place; returns ``model``.

    ``config``: a config object or a method name (``"alsh"``, ``"sketch"``, ``"milf"``, ``"lowrank"``, ``"csg"``);
    None means ``ALSHConfig()``. By default every module the method converts (``nn.Conv2d``; ``nn.Linear`` too
    for sketching) except the first convolution of the model is converted; ``filter_fn(module, qualified_name)
    -> bool`` overrides that choice. When ``model`` itself is a convolution it is converted and the new layer
    returned (there is no parent to swap it in): use the return value.

    ``init`` overrides the config's ``init`` (sketch, milf, lowrank, csg): ``"fit"`` fits the new factors to the
    dense weights (a trained model: the error is at most the weight's norm), ``"scratch"`` draws them at the dense
    layer's default output scale (a model about to be trained from scratch), ``"unbiased"`` (sketch, milf) is the
    paper's estimator; ``"auto"`` (the configs' default) takes ``"scratch"`` when every layer to convert is
    statistically indistinguishable from a random init (:func:`tritonslide.nn.looks_untrained`: a fresh model),
    else ``"fit"``. The converted layers' ``config.init`` records the choice.
    Method options: ``generator=`` (csg) a pre-trained :class:`~tritonslide.nn.SliceGenerator` to use as the
    shared generator (sec. 4.3; frozen when ``CSGConfig(freeze_generator=True)``).

    Layers already converted are left as they are, so patching twice changes nothing; layers that a filter
    selects but that hold another method or config keep them, listed in a warning. Targets that cannot be
    converted (groups > 1, non-zero padding modes, transposed convolutions) stay dense and are listed in one
    warning. Consecutive ALSH layers inside an ``nn.Sequential`` separated only by zero-preserving modules are
    linked for last-active-set sharing.

    ``batchnorm``: ``"impute"`` (the default) turns each ``nn.BatchNorm2d`` that an ALSH or MILF layer feeds (the
    next module registered in the same parent, or by ``torch.fx`` data flow: :func:`impute_batchnorms`) into an
    :class:`~tritonslide.nn.ImputedBatchNorm2d`, same Parameters and buffers, which imputes the channels the layer
    did not compute by their mean instead of taking them for zeros (its docstring; README *BatchNorm after ALSH
    layers*), and each such ``nn.SyncBatchNorm`` into an
    :class:`~tritonslide.nn.ImputedSyncBatchNorm`; ``"keep"`` leaves every BatchNorm as it is. To synchronize
    BatchNorm after ``patch``, use :func:`convert_sync_batchnorm` (torch's own turns the imputing ones plain).
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"tritonslide.patch: batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    config = _with_init(_resolve_config(config), init)
    spec = _spec_for(config)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = f"takes only {list(spec.options)}" if spec.options else "takes no options"
        raise TypeError(f"tritonslide.patch: unexpected keyword(s) {unknown} for method {spec.name!r}, which {takes}")
    keep = filter_fn if filter_fn is not None else _default_filter(model)
    skipped: list[str] = []
    kept: list[str] = []
    targets: list[tuple[str, nn.Module]] = []
    for fqn, module in list(model.named_modules()):  # a copy: the tree changes below
        if is_tritonslide_layer(module):
            if keep(module, fqn) and not same_config(module.config, config):
                kept.append(f"{fqn or '<model>'} ({method_of(module)})")
            continue
        if spec.layer_for(module) is None or not keep(module, fqn):
            continue
        reason = spec.unconvertible_reason(module, config)
        if reason is not None:
            skipped.append(f"{fqn or '<model>'} ({reason})")
            continue
        targets.append((fqn, module))
    if kept:
        warnings.warn(
            f"tritonslide.patch: {len(kept)} layer(s) already converted keep their method and config instead of "
            f"{spec.name!r}: " + ", ".join(kept) + " (unpatch first to convert them again)", UserWarning, stacklevel=2
        )
    if skipped:
        warnings.warn(
            f"tritonslide.patch: {len(skipped)} layer(s) left dense: " + ", ".join(skipped), UserWarning, stacklevel=2
        )
    convs = [] if filter_fn is not None or targets or kept or skipped else [
        (fqn, m) for fqn, m in model.named_modules() if _is_conv_like(m)
    ]
    if len(convs) == 1:
        first, only = convs[0]
        if spec.layer_for(only) is not None and not is_tritonslide_layer(only):
            warnings.warn(
                f"tritonslide.patch: nothing converted: the only convolution, {first!r}, is the model's first, which "
                f"stays dense by default (as in the papers); pass filter_fn=lambda module, name: True to convert it",
                UserWarning, stacklevel=2,
            )
    if _init_of(config) == "auto":
        config = _with_init(config, resolve_init("auto", [m.weight for _, m in targets]))
    context = None
    if spec.make_context is not None:
        context = spec.make_context(model, config, [m for _, m in targets], **options)
    for fqn, module in targets:
        new = spec.layer_for(module).from_dense(module, config, name=fqn, context=context)
        # the replacement takes the replaced module's mode: a patched eval() model stays in eval (ALSH layers would
        # otherwise count training steps, rebuild tables and choose per batch in eval)
        new.train(module.training)
        if fqn == "":
            model = new
        else:
            _set_submodule(model, fqn, new)
    link_active_sets(model)
    if batchnorm == "impute":
        impute_batchnorms(model)
    if targets:
        _warn_sample_training_with_batchnorm(model, "tritonslide.patch")
    return model


BATCHNORM_MODES = ("impute", "keep")


def impute_batchnorms(model: nn.Module, trace: bool = True) -> list[tuple[str, str]]:
    """Turn every plain ``nn.BatchNorm2d`` (``nn.SyncBatchNorm``) that an ALSH or MILF layer feeds into an
    :class:`~tritonslide.nn.ImputedBatchNorm2d` (:class:`~tritonslide.nn.ImputedSyncBatchNorm`) sharing its
    Parameters and buffers, in place; returns (layer, BatchNorm) name pairs, the layer being one ALSH layer that
    feeds the BatchNorm. ``patch`` calls it (its ``batchnorm="impute"``). Two rules, their union:

    * registration order: the BatchNorm is the next module registered after the layer in the same parent, with as
      many features as the layer has filters (``nn.Sequential(conv, bn)``, torchvision's ``conv1`` / ``bn1``);
    * data flow (``trace=True``): ``torch.fx`` traces the model (tritonslide layers and BatchNorms as leaves), and a
      BatchNorm whose input is an ALSH layer's output, through modules and functions that keep a zero plane zero
      (ReLU-like activations, pooling, dropout, ``torch.cat``), is paired: DenseNet's ``norm1`` after the
      concatenation of earlier layers' outputs, its transitions' norms. A model that does not trace is paired by
      registration order only, with a warning where a plain BatchNorm is left.
    """
    pairs = []
    for parent_name, parent in list(model.named_modules()):
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if (isinstance(a, ALSHSelector) and type(b) in _IMPUTED_FORM
                    and b.num_features == a.out_channels):
                fqn = f"{parent_name}.{name_b}" if parent_name else name_b
                setattr(parent, name_b, _IMPUTED_FORM[type(b)].from_batchnorm(b, fqn))
                pairs.append((f"{parent_name}.{name_a}" if parent_name else name_a, fqn))
    if not trace or not any(type(m) in _IMPUTED_FORM for m in model.modules()) \
            or not any(isinstance(m, ALSHSelector) for m in model.modules()):
        return pairs
    try:
        fed = _batchnorms_fed_by_alsh(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: registration order is the fallback
        plain = [name for name, m in model.named_modules() if type(m) in _IMPUTED_FORM]
        warnings.warn(
            f"tritonslide.impute_batchnorms: torch.fx could not trace {type(model).__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}), so BatchNorms were paired "
            f"with ALSH layers by registration order only; {len(plain)} stay plain. Convert one that an ALSH layer "
            f"feeds with tritonslide.nn.ImputedBatchNorm2d.from_batchnorm.", UserWarning, stacklevel=3)
        return pairs
    for fqn, source in fed.items():
        module = model.get_submodule(fqn)
        if type(module) in _IMPUTED_FORM and fqn:
            _set_submodule(model, fqn, _IMPUTED_FORM[type(module)].from_batchnorm(module, fqn))
            pairs.append((source, fqn))
    return pairs


# What keeps a plane that is zero everywhere zero (and mixes no channels into it), besides ZERO_PRESERVING modules:
# the data-flow walk of impute_batchnorms passes through these on its way from a BatchNorm back to an ALSH layer.
_ZERO_PRESERVING_FUNCTIONS = frozenset({
    torch.cat, torch.concat, torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
    F.hardswish, F.hardtanh, F.mish, torch.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_max_pool2d,
    F.adaptive_avg_pool2d, F.dropout, F.dropout2d,
})
_ZERO_PRESERVING_METHODS = frozenset({"relu", "relu_", "contiguous", "clone", "tanh"})


class _LeafTracer(torch.fx.Tracer):
    """Records tritonslide layers and BatchNorms as calls without tracing into them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (is_tritonslide_layer(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)
                or super().is_leaf_module(m, qualname))


def _batchnorms_fed_by_alsh(model: nn.Module) -> dict[str, str]:
    """{BatchNorm name: an ALSH layer's name} for each BatchNorm of ``model`` whose traced input reaches an ALSH layer's
    output through zero-preserving steps only (any input of a ``torch.cat``). Raises whatever tracing raises."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    memo: dict[torch.fx.Node, str | None] = {}

    def source(node) -> str | None:
        if isinstance(node, (list, tuple)):
            return next((found for found in map(source, node) if found), None)
        if not isinstance(node, torch.fx.Node):
            return None
        if node not in memo:
            found = None
            if node.op == "call_module":
                module = modules[node.target]
                if isinstance(module, ALSHSelector):
                    found = node.target
                elif type(module) in ZERO_PRESERVING and node.args:
                    found = source(node.args[0])
            elif node.op == "call_function" and node.target in _ZERO_PRESERVING_FUNCTIONS and node.args:
                found = source(node.args[0])
            elif node.op == "call_method" and node.target in _ZERO_PRESERVING_METHODS and node.args:
                found = source(node.args[0])
            memo[node] = found
        return memo[node]

    fed = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm) \
                and node.args and (found := source(node.args[0])):
            fed.setdefault(node.target, found)
    return fed


_IMPUTED_FORM = {nn.BatchNorm2d: ImputedBatchNorm2d, nn.SyncBatchNorm: ImputedSyncBatchNorm}


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for a patched model: every BatchNorm becomes an
    ``nn.SyncBatchNorm`` as torch's function makes it, except that each :class:`~tritonslide.nn.ImputedBatchNorm2d`
    becomes an :class:`~tritonslide.nn.ImputedSyncBatchNorm` (torch's function alone would turn it into a plain
    ``nn.SyncBatchNorm``, which takes the channels an ALSH layer did not compute for zeros). The same Parameters and
    buffers; returns the converted model (a new module where ``model`` itself is a BatchNorm, as torch's)."""
    imputed = [fqn for fqn, m in model.named_modules() if isinstance(m, _ImputedNorm)]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for fqn in imputed:
        plain = converted.get_submodule(fqn) if fqn else converted
        new = ImputedSyncBatchNorm.from_batchnorm(plain, fqn)
        if not fqn:
            return new
        _set_submodule(converted, fqn, new)
    return converted


def _warn_sample_training_with_batchnorm(model: nn.Module, api: str) -> None:
    """A UserWarning when ALSH / MILF layers of ``model`` train per sample (``selection="sample"``) and the model has
    plain BatchNorm layers: after an ALSH layer a plain one takes the channels not computed for zeros and, per
    sample, gets statistics from few values (``ALSHConfig.selection``). The imputing ones that ``patch`` puts there
    are stable (README, *BatchNorm after ALSH layers*). The graph is not traced, so any plain BatchNorm of the model
    counts; the message names them."""
    if not any(isinstance(m, ALSHSelector) and m.alsh_config.selection == "sample" for m in model.modules()):
        return
    plain = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _ImputedNorm)]
    if not plain:
        return
    shown = ", ".join(plain[:3]) + (f" and {len(plain) - 3} more" if len(plain) > 3 else "")
    warnings.warn(
        f"{api}: selection='sample' also trains with per-sample active sets, and this model has {len(plain)} plain "
        f"BatchNorm layer(s) ({shown}). Right after an ALSH layer a plain BatchNorm takes the channels not computed "
        f"for zeros and gets a channel's statistics from the few samples that computed it: a fresh MobileNetV2 "
        f"reached NaN in 3 SGD steps. patch's batchnorm='impute' (the default) converts each BatchNorm that directly "
        f"follows an ALSH layer into one that imputes them (stable per sample); a plain one elsewhere is only a "
        f"risk if an ALSH layer feeds it. selection='auto' (the default) trains per batch and evaluates per sample.",
        UserWarning, stacklevel=3)


def unpatch(model: nn.Module) -> nn.Module:
    """Turn every tritonslide layer back into its dense module with the same Parameters, and every
    :class:`~tritonslide.nn.ImputedBatchNorm2d` (:class:`~tritonslide.nn.ImputedSyncBatchNorm`) back into
    ``nn.BatchNorm2d`` (``nn.SyncBatchNorm``); returns ``model``."""
    _unlink_all(model)
    if is_tritonslide_layer(model):
        return model.to_dense().train(model.training)
    for fqn, module in list(model.named_modules()):
        if isinstance(module, _ImputedNorm) and fqn:
            _set_submodule(model, fqn, module.to_batchnorm())
    for fqn, module in list(model.named_modules()):
        if is_tritonslide_layer(module) and fqn:
            _set_submodule(model, fqn, module.to_dense().train(module.training))
    return model


# ---------------------------------------------------------------------- last-active-set sharing
def _chain_enter(module: nn.Module, args) -> None:
    """Forward pre-hook of a linked nn.Sequential: no active set from an earlier call is ever read, and linked
    producers may hand the next layer their active channels alone (Alg. 6) for the duration of this call."""
    for child in module.children():
        if isinstance(child, ALSHSelector):
            child._published_active = None
            child._emit_compact = True


def _chain_exit(module: nn.Module, args, output) -> None:
    """Forward hook (always called, exceptions included): outside the Sequential's own call, layers called
    directly return full-size outputs."""
    for child in module.children():
        if isinstance(child, ALSHSelector):
            child._published_active = None
            child._emit_compact = False


def _unlink_all(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ALSHSelector):
            object.__setattr__(module, "_share_source", None)
            module._publish = module._compact_ok = module._emit_compact = False
            module._published_active = None
        if isinstance(module, nn.Sequential):
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _chain_enter]:
                del module._forward_pre_hooks[key]
            for key in [k for k, hook in module._forward_hooks.items() if hook is _chain_exit]:
                del module._forward_hooks[key]
                module._forward_hooks_always_called.pop(key, None)


def link_active_sets(model: nn.Module) -> list[tuple[str, str]]:
    """(Re)build the last-active-set links of ``model``; returns the linked (producer, consumer) names.

    Only direct children of one ``nn.Sequential`` are linked, and only across modules in
    :data:`ZERO_PRESERVING`: anything that cannot be proven to keep inactive channels at zero breaks the chain.
    While the Sequential runs, a linked ALSH layer hands the next one only its active channels (Alg. 6), so the
    modules between them (activations, pools, dropout) see N x |active| x H x W tensors; called on their own,
    layers return full-size outputs.
    """
    _unlink_all(model)
    names = {id(m): n for n, m in model.named_modules()}
    links: list[tuple[str, str]] = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prev: ALSHSelector | None = None
        linked_here = False
        for child in seq.children():
            if isinstance(child, ALSHSelector):
                if (
                    prev is not None
                    and child.alsh_config.share_active_set
                    and prev.out_channels == child.in_channels
                    and prev.planes.device == child.planes.device
                ):
                    object.__setattr__(child, "_share_source", prev)
                    prev._publish = True
                    prev._compact_ok = child.accepts_compact_input
                    links.append((names[id(prev)], names[id(child)]))
                    linked_here = True
                prev = child
            elif type(child) not in ZERO_PRESERVING:
                prev = None
        if linked_here:
            seq.register_forward_pre_hook(_chain_enter)
            seq.register_forward_hook(_chain_exit, always_call=True)
    return links


# ---------------------------------------------------------------------- maintenance
def rebuild_tables(model: nn.Module) -> int:
    """Re-hash the filters of every ALSH layer (the thesis did it once per epoch); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, ALSHSelector):
            module.rebuild_tables()
            count += 1
    return count


def set_selection(model: nn.Module, selection: str) -> int:
    """Switch who shares an active set (``ALSHConfig.selection``: ``"auto"``, ``"batch"`` or ``"sample"``) in every
    ALSH and MILF layer of ``model``, in place, without re-patching: tables, weights and buffers stay as they are (the
    selection is not part of a layer's saved identity). Returns how many layers changed. E.g. compare a trained
    model's per-sample and per-batch predictions, or serve with per-sample sets a model trained per batch."""
    if selection not in SELECTIONS:
        raise ValueError(f"tritonslide.set_selection: selection must be one of {SELECTIONS}, got {selection!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, ALSHSelector):
            alsh = dataclasses.replace(module.alsh_config, selection=selection)
            module.alsh_config = alsh
            config = module.config
            module.config = (dataclasses.replace(config, alsh=alsh) if isinstance(config, MILFConfig)
                             else alsh if config.method == "alsh" else config)
            count += 1
    if selection == "sample":
        _warn_sample_training_with_batchnorm(model, "tritonslide.set_selection")
    return count


def stats(model: nn.Module) -> dict[str, ALSHLayerStats]:
    """Per ALSH layer (by qualified name): calls, running mean active fraction, bucket max and std (Table 5.5)."""
    return {name: m.stats() for name, m in model.named_modules() if isinstance(m, ALSHSelector)}


def reset_stats(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ALSHSelector):
            module.reset_stats()


class TrainAndReplace:
    """Train-and-replace (Feeney 2019, Alg. 7, Table 5.2): every ``gap`` epochs the deepest remaining dense
    convolution becomes a tritonslide layer, so the network retrains between replacements.

    Call :meth:`step` once at the start of every epoch (epochs count from 1): at epochs ``gap, 2*gap, ...`` it
    replaces one layer and returns its qualified name (None otherwise). The new layer reuses the dense layer's
    Parameters, so the optimizer needs no change. ``filter_fn`` chooses the eligible layers as in :func:`patch`
    (default: every conv but the first).
    """

    def __init__(
        self, model: nn.Module, config: ConfigLike = None, gap: int = 1, *, filter_fn: FilterFn | None = None
    ) -> None:
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"TrainAndReplace: gap must be an int >= 1, got {gap!r}")
        config = _resolve_config(config)
        if _init_of(config) == "auto":
            config = _with_init(config, "fit")  # the layers it replaces have trained (gap epochs at least)
        self.model, self.config, self.gap = model, config, gap
        self.filter_fn = filter_fn if filter_fn is not None else _default_filter(model)
        self.epoch = 0

    def remaining(self) -> list[str]:
        """Qualified names of the dense convolutions still to replace, deepest first."""
        spec = _spec_for(self.config)
        names = [
            fqn for fqn, m in self.model.named_modules()
            if spec.layer_for(m) is not None and not is_tritonslide_layer(m)
            and self.filter_fn(m, fqn) and spec.unconvertible_reason(m, self.config) is None
        ]
        return names[::-1]

    def step(self) -> str | None:
        self.epoch += 1
        if self.epoch % self.gap:
            return None
        todo = self.remaining()
        if not todo:
            return None
        target = todo[0]
        patch(self.model, self.config, filter_fn=lambda module, fqn: fqn == target)
        return target
