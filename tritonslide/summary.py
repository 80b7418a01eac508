"""``tritonslide.summary``: per layer, the method, parameters and multiply-adds before and after patching."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tritonslide._registry import is_tritonslide_layer


@dataclass(frozen=True)
class LayerCost:
    name: str
    method: str
    params_before: int
    params_after: int
    macs_before: int  # multiply-adds per sample
    macs_after: int


@dataclass
class ModelSummary:
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def totals(self) -> LayerCost:
        return LayerCost(
            "total", "",
            sum(r.params_before for r in self.layers), sum(r.params_after for r in self.layers),
            sum(r.macs_before for r in self.layers), sum(r.macs_after for r in self.layers),
        )

    def __str__(self) -> str:
        def ratio(after: int, before: int) -> str:
            return f"{after / before:.3f}" if before else "-"

        head = ("layer", "method", "params before", "params after", "ratio", "MACs before", "MACs after", "ratio")
        rows = [
            (r.name, r.method, f"{r.params_before:,}", f"{r.params_after:,}", ratio(r.params_after, r.params_before),
             f"{r.macs_before:,}", f"{r.macs_after:,}", ratio(r.macs_after, r.macs_before))
            for r in [*self.layers, self.totals]
        ]
        widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*row) for row in rows[:-1]]
        lines += ["  ".join("-" * w for w in widths), fmt.format(*rows[-1])]
        return "\n".join(lines) + "\nMACs: multiply-adds per sample of the forward pass, as each layer computes it."


def _dense_cost(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    params = sum(p.numel() for p in module.parameters(recurse=False))
    if isinstance(module, nn.Conv2d):
        return params, module.weight.numel() * out.shape[-2] * out.shape[-1]  # weight holds C / groups channels
    # nn.Linear: one weight multiply per output position and feature
    positions = out[0].numel() // out.shape[-1] if out.dim() > 1 else 1
    return params, module.weight.numel() * positions


def summary(model: nn.Module, input_shape: tuple[int, ...], *, dtype: torch.dtype | None = None) -> ModelSummary:
    """Run one forward on a random input of ``input_shape`` (batch included) and tabulate every convolution and
    linear layer: method (``dense`` for untouched layers), trainable parameters and multiply-adds per sample
    before (the dense layer) and after (the layer as it computes). Data-dependent layers (ALSH, MILF) are
    costed at the active sets of this forward. The model's mode, statistics and step counters are restored.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    records: list[LayerCost] = []
    hooks = []

    def visit(name: str, module: nn.Module):
        def hook(mod, args, out):
            if is_tritonslide_layer(mod):
                if getattr(type(mod), "replaces", None) is nn.Linear:  # positions per sample, features last
                    h, w = (out[0].numel() // out.shape[-1] if out.dim() > 1 else 1), 1
                else:
                    h, w = out.shape[-2], out.shape[-1]
                dense = mod.to_dense()
                before = sum(p.numel() for p in dense.parameters())
                records.append(LayerCost(name, mod.config.method, before, mod.param_count(),
                                         mod.dense_macs(h, w), mod.macs(h, w)))
            else:
                params, macs = _dense_cost(mod, out)
                records.append(LayerCost(name, "dense", params, params, macs, macs))
        return hook

    inside = set()  # submodules of tritonslide layers (a shared generator, say) are part of that layer's cost
    for name, module in model.named_modules():
        if name in inside:
            continue
        if is_tritonslide_layer(module):
            inside.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
        if is_tritonslide_layer(module) or type(module) in (nn.Conv2d, nn.Linear):
            hooks.append(module.register_forward_hook(visit(name or "<model>", module)))
    saved_buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])
    return ModelSummary(records)
