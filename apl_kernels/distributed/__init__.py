"""Losses over process groups (torch.distributed).

``class_parallel_loss`` / ``ClassParallelLoss``: logits split over ranks by class (Megatron-LM's
ColumnParallelLinear, DTensor's ``Shard(-1)``); ``class_parallel_linear_loss``: the classifier's
rows split over ranks, with the fused linear + loss's chunking. docs/losses.md, "Class-parallel losses".
"""

from .class_parallel import ClassParallelLoss, class_parallel_linear_loss, class_parallel_loss

__all__ = ["ClassParallelLoss", "class_parallel_linear_loss", "class_parallel_loss"]
