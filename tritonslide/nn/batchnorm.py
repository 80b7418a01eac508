"""BatchNorm after an ALSH or MILF layer: channels the layer did not compute are imputed by their mean.

An ALSH layer computes only its active filters and returns zero in the others (per batch: the batch's set; per
sample: each sample's). A plain ``nn.BatchNorm2d`` after it takes those zeros for outputs: in training its batch
statistics and its running statistics mix them in (a channel inactive for a whole batch pulls the running variance
towards 0, so in eval the same channel, active, is divided by too small a deviation), and it maps an inactive channel
to ``-mean / std * gamma + beta`` as if the filter had answered 0. The thesis (Feeney 2019, sec. 4.2) picks the filters
*likely to give large outputs* and treats the rest as not computed, not as zero; the dense model's BatchNorm saw
those outputs, which sit around the channel's mean.

:class:`ImputedBatchNorm2d` reads a channel that is zero over a sample's whole plane as not computed and imputes it by
the channel's mean, which BatchNorm maps to ``beta``:

* training: mean and variance over the planes that were computed (N_c samples x H x W values for channel c), the
  running statistics updated from them (unbiased variance, PyTorch's momentum rule), computed planes normalized with
  them, not-computed planes set to ``beta``. A channel with fewer than 2 computed values in the batch has no usable
  variance: it is normalized with its running statistics (which it does not update). A channel computed in fewer
  than ``min_sample_fraction`` (default half) of the batch's samples, which only per-sample active sets give, is
  normalized with its running statistics too (no gradient through the statistics), though its batch statistics
  still update them: its few samples, and on small maps its few values (two 1x1 planes on MobileNetV2's last layers
  at 16 px), give variances down to 1e-7 and gradients of thousands;
* eval: computed planes as ``nn.BatchNorm2d`` in eval (running statistics), not-computed ones ``beta``.

With every plane computed it is ``nn.BatchNorm2d`` (the same Parameters and buffers, so the same ``state_dict``).
Whether a plane was computed is read from the tensor (all of its H x W values exactly zero), so the module needs no
link to the layer and no host synchronization; a computed plane that is exactly zero everywhere (every read channel
zero, no bias) is imputed too, which is what its layer's sparsity means.

``tritonslide.patch`` puts one in place of each ``BatchNorm2d`` that an ALSH / MILF layer feeds (the next module
registered in the same parent, as in ``nn.Sequential(conv, bn)`` or torchvision's ``conv1`` / ``bn1``, or found by
tracing the model: ``tritonslide.impute_batchnorms``); ``unpatch`` puts the plain module back.

:class:`ImputedSyncBatchNorm` is the same rule for ``nn.SyncBatchNorm``: under ``torch.distributed`` its training
statistics are those of every rank's computed planes (one process's on the concatenated batch), and its backward sums
over them. ``patch`` pairs a ``SyncBatchNorm`` with it; ``tritonslide.convert_sync_batchnorm`` converts a patched model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# Below this many computed values a channel's batch variance is not used (a single value has none).
MIN_COMPUTED = 2
# Below this fraction of the batch's samples computing a channel its batch statistics normalize nothing (they still
# update the running statistics). Per-sample sets only (a per-batch set computes a channel in every sample or none).
# Fresh MobileNetV2, per-sample training, SGD lr 0.01, batch 8, largest gradient over 10 steps (README): at 16 / 32 px
# 7,320 / 1,020 with no fraction, 204,000 / 92 with 0.25, 2.8 / 0.46 with 0.5.
MIN_SAMPLE_FRACTION = 0.5


class _ImputedNorm:
    """What :class:`ImputedBatchNorm2d` and :class:`ImputedSyncBatchNorm` share: the forward and the running
    statistics' update. ``_plain`` is the torch class each replaces (what ``to_batchnorm`` gives back)."""

    _plain: type
    layer_name: str = ""
    # see MIN_SAMPLE_FRACTION; set it on an instance to change one layer (0 uses every channel's batch statistics)
    min_sample_fraction: float = MIN_SAMPLE_FRACTION

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, name: str = ""):
        """The same Parameters and buffers as ``bn`` (an optimizer that holds them keeps working), ``bn``'s mode."""
        if type(bn) is not cls._plain:
            raise TypeError(f"{cls.__name__}.from_batchnorm: expected an nn.{cls._plain.__name__}, got "
                            f"{type(bn).__name__}")
        new = _share_state(bn, _like(cls, bn))
        new.layer_name = name
        return new

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """The plain torch module with the same Parameters and buffers (what ``unpatch`` puts back)."""
        return _share_state(self, _like(self._plain, self))

    def _sync_group(self):
        """The process group whose batches the training statistics span, or None for this process's batch only."""
        return None

    def _check_input(self, x: torch.Tensor) -> None:
        name = f"{type(self).__name__} {self.layer_name or '<unnamed>'}"
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected an input of shape (N, {self.num_features}, H, W), got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        computed = _computed(x)
        gamma = self.weight if self.affine else None
        beta = self.bias if self.affine else None
        if not (self.training or self.running_mean is None):  # eval: the running statistics, no gradient to them
            a, b = _plane_coefficients(computed, self.running_mean, torch.rsqrt(self.running_var + self.eps),
                                       gamma, beta, x.dtype)
            return _apply(x, a, b)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y, mean, var, count = _ImputedBatchNorm.apply(x.to(acc), computed, gamma, beta, self.running_mean,
                                                      self.running_var, self.eps, self.min_sample_fraction,
                                                      self._sync_group())
        if self.training and self.track_running_stats and self.running_mean is not None:
            self._update_running(mean, var, count, count >= MIN_COMPUTED)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor,
                        usable: torch.Tensor) -> None:
        """PyTorch's rule (``momentum``, or the cumulative average when it is None) on the usable channels only."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.copy_(torch.where(usable, torch.lerp(self.running_mean, mean.to(self.running_mean.dtype),
                                                                factor), self.running_mean))
        self.running_var.copy_(torch.where(usable, torch.lerp(self.running_var, unbiased.to(self.running_var.dtype),
                                                               factor), self.running_var))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", not-computed channels imputed by their mean"


class ImputedBatchNorm2d(_ImputedNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose statistics skip not-computed (all-zero) planes and whose output there is ``beta``
    (the channel's mean imputed); see the module docstring. Build it with :meth:`from_batchnorm`."""

    _plain = nn.BatchNorm2d


class ImputedSyncBatchNorm(_ImputedNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with :class:`ImputedBatchNorm2d`'s rule: in training under ``torch.distributed`` (more
    than one rank in ``process_group``, the default group when None), the statistics are those of the computed
    planes of every rank's batch, as one process would compute them on the concatenated batch, and the input's
    gradient sums over every rank's computed planes. Every rank of the group must run each training forward and
    backward (a rank with an empty batch joins with zero counts). Eval, or one process, needs no collective.

    Unlike ``nn.SyncBatchNorm``, it also runs on CPU tensors (gloo): the collectives are ``all_gather`` of (3, C)
    per-rank moments in the forward (combined by Chan's parallel formula) and ``all_reduce`` of (2, C) sums in the
    backward. Only 4-D inputs, like :class:`ImputedBatchNorm2d`. Build it with :meth:`from_batchnorm` from an
    ``nn.SyncBatchNorm``, or with :func:`tritonslide.convert_sync_batchnorm`."""

    _plain = nn.SyncBatchNorm

    def _sync_group(self):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


def _like(kind: type, bn: nn.Module) -> nn.Module:
    """An empty module of class ``kind`` on the meta device with ``bn``'s hyperparameters (and process group)."""
    extra = {"process_group": bn.process_group} if issubclass(kind, nn.SyncBatchNorm) else {}
    return kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta", **extra)


def _share_state(src: nn.BatchNorm2d, dst: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """``dst`` (built on the meta device) holding ``src``'s Parameters and buffers themselves, in ``src``'s mode."""
    for key in ("weight", "bias"):
        setattr(dst, key, getattr(src, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        dst._buffers[key] = src._buffers.get(key)
    return dst.train(src.training)


def _computed(x: torch.Tensor) -> torch.Tensor:
    """(N, C) bool: the planes of x that are not zero everywhere (two reductions over x, no x-sized temporary; a NaN
    counts as computed)."""
    return (x.amax((2, 3)) != 0) | (x.amin((2, 3)) != 0)


def _plane_coefficients(computed: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor | None,
                        beta: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (N, C), with ``y = a * x + b`` per plane: the normalization and affine map on a computed plane,
    ``a = 0, b = beta`` on a not-computed one."""
    scale = rstd if gamma is None else rstd * gamma
    shift = -mean * scale if beta is None else beta - mean * scale
    keep = computed.to(scale.dtype)
    a = keep * scale
    b = keep * shift if beta is None else keep * shift + (1 - keep) * beta
    return a.to(dtype), b.to(dtype)


def _apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a * x + b`` with (N, C) coefficients, in one pass. A contiguous NCHW x runs it as an eval-mode BatchNorm of
    N*C channels (mean 0, variance 1, eps 0: weight a, bias b; PyTorch's fastest per-channel affine kernel, as fast as
    the plain BatchNorm, where a broadcast addcmul took 1.5x that on (64, 128, 28, 28) on this team's CPU)."""
    n, c, h, w = x.shape
    if out is None and x.is_contiguous() and x.dtype in (torch.float32, torch.float64) and x.numel():
        flat = torch.zeros(n * c, dtype=x.dtype, device=x.device)
        return torch.nn.functional.batch_norm(x.view(1, n * c, h, w), flat, torch.ones_like(flat), a.reshape(-1),
                                              b.reshape(-1), False, 0.0, 0.0).view(n, c, h, w)
    return torch.addcmul(b[:, :, None, None], x, a[:, :, None, None], out=out)


class _ImputedBatchNorm(torch.autograd.Function):
    """Training forward of :class:`ImputedBatchNorm2d` with its gradient written out (BatchNorm's backward over each
    channel's computed planes only), so that neither pass builds x-sized temporaries beyond its own output: autograd
    through the masked statistics took 2.3-5x a plain BatchNorm's forward and backward on ResNet shapes."""

    @staticmethod
    def forward(ctx, x, computed, gamma, beta, running_mean, running_var, eps, sample_fraction, group):
        n, c, h, w = x.shape
        plane_sum = x.sum((2, 3))
        weight = computed.to(x.dtype)
        samples = computed.sum(0)  # (C,) samples that computed each channel
        count = samples * (h * w)  # (C,) computed values per channel
        denom = count.clamp(min=1).to(x.dtype)
        mean = (plane_sum * weight).sum(0) / denom  # the not-computed planes are zero: their sums add nothing
        y = torch.empty_like(x)
        # sum over the computed planes of (x - mean)^2, its squares written where the output goes next
        torch.sub(x, mean[:, None, None], out=y).square_()
        m2 = (y.sum((2, 3)) * weight).sum(0)
        if group is not None:  # every rank's computed planes: this rank's moments combined with the others'
            mean, m2, count, samples, n = _combine_moments(count, mean, m2, samples, n, group)
            denom = count.clamp(min=1).to(x.dtype)
        var = m2 / denom
        usable = (count >= MIN_COMPUTED) & (samples >= sample_fraction * n)
        mean_used, var_used = mean, var
        if running_mean is not None:  # too few values: the running statistics (no gradient to the statistics)
            mean_used = torch.where(usable, mean, running_mean.to(x.dtype))
            var_used = torch.where(usable, var, running_var.to(x.dtype))
        else:
            usable = torch.ones_like(usable)
        rstd = torch.rsqrt(var_used + eps)
        a, b = _plane_coefficients(computed, mean_used, rstd, gamma, beta, x.dtype)
        _apply(x, a, b, out=y)
        ctx.save_for_backward(x, weight, mean_used, rstd, gamma, usable, denom)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, _mean, _var, _count):
        x, weight, mean, rstd, gamma, usable, denom = ctx.saved_tensors
        gy = gy.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
        dx = torch.empty_like(x)
        g_sum = gy.sum((2, 3))  # (N, C)
        gx_sum = torch.mul(gy, x, out=dx).sum((2, 3))
        s_g = (g_sum * weight).sum(0)  # sums over the computed planes
        s_gxhat = ((gx_sum - mean * g_sum) * weight).sum(0) * rstd
        d_gamma = s_gxhat if ctx.needs_input_grad[2] else None  # this rank's share (DDP averages Parameters' grads)
        if ctx.group is not None:  # the statistics spanned every rank's planes, so do their gradient's sums
            sums = torch.stack((s_g, s_gxhat))
            dist.all_reduce(sums, group=ctx.group)
            s_g, s_gxhat = sums[0], sums[1]
        scale = rstd if gamma is None else rstd * gamma
        stat = usable.to(x.dtype) / denom  # channels normalized by their running statistics pass no gradient there
        k_g = weight * scale
        k_x = -weight * (scale * rstd * s_gxhat * stat)
        k_0 = weight * (scale * stat * (rstd * mean * s_gxhat - s_g))
        torch.addcmul(k_0[:, :, None, None], x, k_x[:, :, None, None], out=dx).addcmul_(gy, k_g[:, :, None, None])
        d_beta = g_sum.sum(0) if ctx.needs_input_grad[3] else None
        return dx, None, d_gamma, d_beta, None, None, None, None, None


def _combine_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, samples: torch.Tensor, n: int,
                     group) -> tuple[torch.Tensor, ...]:
    """Every rank's (mean, sum of squared deviations, computed values, computing samples) per channel and its batch
    size, from each rank's own: one ``all_gather`` of (5, C), combined by Chan et al.'s parallel formula (no
    cancellation of large sums of squares)."""
    local = torch.stack((count.to(mean.dtype), mean, m2, samples.to(mean.dtype), torch.full_like(mean, n)))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    counts, means, m2s, sample_counts, sizes = torch.stack(parts).unbind(1)  # each (world, C)
    total = counts.sum(0)
    combined = (counts * means).sum(0) / total.clamp(min=1)
    m2 = m2s.sum(0) + (counts * (means - combined).square()).sum(0)
    return (combined, m2, total.round().to(count.dtype), sample_counts.sum(0).round().to(samples.dtype),
            sizes.sum(0)[:1].round())


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
