"""apl-kernels: the normalized and Active Passive losses of Ma et al. (ICML 2020).

    import apl_kernels as ak
    criterion = ak.NCEMAE(alpha=1.0, beta=1.0)   # where you wrote nn.CrossEntropyLoss()
    loss = criterion(logits, target)
"""

from . import functional
from .backends import available_backends
from .catalogue import available_losses
from .nn import (
    APLLoss, CE, FL, GCE, GCEMAE, GCENCE, GCERCE, MAE, MAERCE, NCE, NCEMAE, NCERCE, NFL, NFLMAE,
    NFLNCE, NFLRCE, NGCE, NGCEMAE, NGCENCE, NGCERCE, NMAE, NRCE, RCE, SCE, Loss, get_loss,
)

__version__ = "0.1.0"

__all__ = [
    "APLLoss", "CE", "FL", "GCE", "GCEMAE", "GCENCE", "GCERCE", "MAE", "MAERCE", "NCE", "NCEMAE",
    "NCERCE", "NFL", "NFLMAE", "NFLNCE", "NFLRCE", "NGCE", "NGCEMAE", "NGCENCE", "NGCERCE", "NMAE",
    "NRCE", "RCE", "SCE", "Loss", "available_backends", "available_losses", "functional", "get_loss",
]
