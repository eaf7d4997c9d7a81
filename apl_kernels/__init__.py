"""apl-kernels: robust losses for noisy labels, fused.

The normalized and Active Passive losses of Ma et al. (ICML 2020), the Active Negative Loss
(Ye et al., NeurIPS 2023) and the asymmetric losses (Zhou et al., ICML 2021), as drop-in
replacements for ``nn.CrossEntropyLoss``::

    import apl_kernels as ak
    criterion = ak.NCEMAE(alpha=1.0, beta=1.0)   # where you wrote nn.CrossEntropyLoss()
    loss = criterion(logits, target)

For very large K, ``ak.LinearLoss("nce+rce", 1.0, 1.0)(hidden, head.weight, target, head.bias)``
computes the loss of a linear layer's output without the (N, K) logits (``apl_kernels.linear``).
The contract every backend follows is docs/losses.md.
"""

import importlib

from . import functional, nn
from .backends import available_backends
from .batch_losses import ANLCEER, anl_ce_er
from .catalogue import available_losses
from .nn import APLLoss, Loss, get_loss

# The fused linear + loss is imported on first use: it marks functions for torch.compile
# (torch.compiler.assume_constant_result), which imports Dynamo, seconds that a user of the loss
# modules alone need not wait.
_LINEAR = ("LinearLoss", "get_linear_loss", "linear_loss")


def __getattr__(name: str):
    if name == "linear" or name in _LINEAR:
        linear = importlib.import_module(".linear", __name__)  # (sets this module's `linear`)
        globals().update({attr: getattr(linear, attr) for attr in _LINEAR})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"linear", *_LINEAR})


# The loss modules, one per single loss and named pair of the catalogue: CE, NCE, ..., NCEMAE, ...
globals().update({cls.__name__: cls for cls in nn.NAMED_MODULES.values()})

__version__ = "0.2.0"

__all__ = sorted(cls.__name__ for cls in nn.NAMED_MODULES.values()) + [
    "ANLCEER", "APLLoss", "Loss", "anl_ce_er", "available_backends", "available_losses", "functional",
    "get_linear_loss", "get_loss", "linear", "linear_loss", "LinearLoss",
]
