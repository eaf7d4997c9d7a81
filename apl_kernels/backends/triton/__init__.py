"""Fused Triton kernels: ``backend="triton"``, the default for CUDA tensors.

Two ops with the contract of ``contract.py``: ``apl::triton_loss`` (one kernel launch: the rows'
statistics, their losses and, for ``mean``/``sum``, the reduced loss) and
``apl::triton_loss_backward`` (one launch: the gradient, times the upstream gradient). The math is
``csrc/apl_rowmath.h``'s, written here once more in Triton; docs/kernels.md ("Triton") gives the
design, the launch table and the bytes each path moves. Read top to bottom:

* ``rowmath.py``: the row math (apl_rowmath.h): each base's element ``V, V'``, a row's sums, value
  and gradient coefficients;
* ``tiles.py``: what the kernels load and store, a tile of rows and classes at a time;
* ``forward.py``: the forward kernel (losses, records or gradient, the in-kernel reduction);
* ``backward.py``: the backward kernel (the gradient from the records);
* ``ops.py``: the launch table, the kernels' arguments and the ops.

Under ``TRITON_INTERPRET=1`` (set before this package is imported) the kernels run on CPU tensors:
that is how they are tested without a GPU.
"""

from .ops import INTERPRETED, load, triton_loss, triton_loss_backward

__all__ = ["INTERPRETED", "load", "triton_loss", "triton_loss_backward"]
