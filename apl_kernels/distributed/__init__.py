"""Losses over process groups (torch.distributed).

``global_mean`` / ``GlobalMeanLoss``: the exact mean of a loss over the global batch of data-parallel
ranks whose divisors differ (``ignore_index``, class weights). ``class_parallel_loss`` /
``ClassParallelLoss``: logits split over ranks by class (Megatron-LM's ColumnParallelLinear,
DTensor's ``Shard(-1)``); ``class_parallel_linear_loss``: the classifier's rows split over ranks,
with the fused linear + loss's chunking. docs/losses.md, "Class-parallel losses".
"""

from .class_parallel import ClassParallelLoss, class_parallel_linear_loss, class_parallel_loss
from .global_mean import GlobalMeanLoss, average, global_divisor, global_mean, mean_divisor

__all__ = ["ClassParallelLoss", "GlobalMeanLoss", "average", "class_parallel_linear_loss", "class_parallel_loss",
           "global_divisor", "global_mean", "mean_divisor"]
