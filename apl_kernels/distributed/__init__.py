"""Losses over a process group (torch.distributed): the exact global mean of a loss
(:mod:`.global_mean`)."""

from .global_mean import GlobalMeanLoss, average, global_divisor, global_mean, mean_divisor

__all__ = ["GlobalMeanLoss", "average", "global_divisor", "global_mean", "mean_divisor"]
