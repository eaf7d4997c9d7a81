"""The Triton backend under the interpreter (TRITON_INTERPRET=1, the CPU test mode) as the C++ path
is: safe to call from several threads at once."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

import apl_kernels as ak
from apl_kernels.backends.triton import ops as triton_backend
from cases import make_target, random_logits

INTERPRETED = triton_backend.INTERPRETED
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, in interpreted code


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's launches; a GPU runs its own")
def test_threads_calling_interpreted_kernels_get_the_single_threaded_bits(seed):
    """Triton's interpreter patches its language module for the time of a launch: launches from
    several threads at once raised InterpreterError or mixed their values. Serialized, 8 threads
    get exactly what one thread gets (forward and backward, one-hot and dense, with the in-kernel
    reduction's shared counter)."""

    def call(i):
        z = random_logits(6, 5 + i % 3, seed + i, dtype=torch.float32).requires_grad_()
        target, options = make_target(("index", "probabilities")[i % 2], 6, z.shape[1], seed + i)
        loss = ak.functional.apl_loss(z, target, "nce+rce", reduction=("mean", "none")[i % 2], backend="triton",
                                      **options)
        loss.sum().backward()
        return loss.detach(), z.grad

    want = [call(i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            futures = [pool.submit(call, i) for i in range(8)]
            got = [future.result(timeout=600) for future in futures]
            for (value, grad), (want_value, want_grad) in zip(got, want):
                assert torch.equal(value, want_value) and torch.equal(grad, want_grad)
