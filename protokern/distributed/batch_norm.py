"""Batch norm across processes.

A data-parallel step equals the single-process step on the whole batch only if batch norm
normalises with the statistics of the whole batch, so `synchronize_batch_norm` swaps every
batch-norm layer for `SyncedBatchNorm`, which sums its statistics across processes (PyTorch's
own ``SyncBatchNorm`` runs only on GPUs).
"""

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from protokern.distributed.collectives import differentiable_sum
from protokern.distributed.processes import is_distributed


class SyncedBatchNorm(_BatchNorm):
    """Batch norm over the union of every process's batch, on any device (gloo or NCCL).

    With one process (or in eval mode) it is `torch.nn.BatchNorm2d`'s computation. With
    several, in training mode, the mean and the (biased) variance of each channel are sums of
    every process's ``(B, C, *)`` input divided by the total count, two passes for accuracy,
    and gradients flow back across processes; the running statistics (unbiased variance) are
    then the same on every process. Processes may hold batches of different sizes.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncedBatchNorm: input must be (B, C, *), got shape "
                             f"{tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        count = input.new_tensor([input.numel() / max(input.shape[1], 1)])
        sums = differentiable_sum(torch.cat([input.sum(dims), count]))
        total = sums[-1].detach()
        mean = sums[:-1] / total
        centered = input - mean.view(shape)
        variance = differentiable_sum((centered * centered).sum(dims)) / total
        output = centered * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                self.running_mean.lerp_(mean.detach(), momentum)
                unbiased = variance.detach() * (total / (total - 1).clamp_min(1))
                self.running_var.lerp_(unbiased, momentum)
        return output


def synchronize_batch_norm(module: nn.Module) -> nn.Module:
    """Replace, in place, every batch-norm layer of ``module`` by a `SyncedBatchNorm` holding
    the same parameter and buffer objects (optimisers built earlier keep working, state-dict
    keys are unchanged). Returns ``module``; already synced layers are left as they are."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, SyncedBatchNorm):
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats)
            for attribute in ("weight", "bias", "running_mean", "running_var",
                              "num_batches_tracked"):
                setattr(synced, attribute, getattr(child, attribute))
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            synchronize_batch_norm(child)
    return module
