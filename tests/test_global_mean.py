"""The exact global mean of a loss over a process group (apl_kernels.distributed.global_mean):
2 gloo processes on CPU against one process holding the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import apl_kernels
from apl_kernels.distributed import GlobalMeanLoss, average, global_mean, mean_divisor

from webvision_support import run_ranks

ROWS, CLASSES, FEATURES = 13, 7, 5
IGNORE = -1


def whole_batch(seed: int):
    """Float64 features, targets with ignored rows (more on rank 1's part than rank 0's), weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (ROWS,), generator=g)
    y[[6, 8, 9, 12]] = IGNORE
    weight = torch.rand(CLASSES, generator=g, dtype=torch.float64) + 0.1
    return x, y, weight


def criteria(weight, reduction):
    return {"nce+rce": apl_kernels.NCERCE(50.0, 0.1, weight=weight, ignore_index=IGNORE, reduction=reduction,
                                          backend="torch"),
            "torch-ce": nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE, reduction=reduction)}


def model_for(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, CLASSES).double()


SPLIT = 5  # rank 0 rows [0, 5), rank 1 rows [5, 13): uneven, and different divisors


def ranks_part(rank: int, world: int, seed: int) -> dict:
    """One rank: its share's value and DDP's averaged gradients, and the naive mean of means."""
    x, y, weight = whole_batch(seed)
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, ROWS)
    results = {}
    for name, criterion in criteria(weight, "sum").items():
        model = nn.parallel.DistributedDataParallel(model_for(seed))
        share = GlobalMeanLoss(criterion)(model(x[rows]), y[rows])
        share.backward()
        naive_model = nn.parallel.DistributedDataParallel(model_for(seed))
        naive = criteria(weight, "mean")[name](naive_model(x[rows]), y[rows])
        naive.backward()
        results[name] = {"value": average(share).item(), "grads": [p.grad for p in model.parameters()],
                         "naive_value": average(naive).item(),
                         "naive_grads": [p.grad for p in naive_model.parameters()]}
    return results


def test_the_global_mean_over_two_processes_is_the_one_process_mean(tmp_path, seed):
    ranks = run_ranks("test_global_mean:ranks_part", 2, tmp_path, seed=seed)
    x, y, weight = whole_batch(seed)
    for name, criterion in criteria(weight, "mean").items():
        model = model_for(seed)
        loss = criterion(model(x), y)
        loss.backward()
        for result in ranks:
            r = result[name]
            assert r["value"] == pytest.approx(loss.item(), rel=1e-13, abs=0)
            for got, want in zip(r["grads"], (p.grad for p in model.parameters())):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
            # the mean of per-rank means is another number: the test can tell them apart
            assert abs(r["naive_value"] - loss.item()) > 1e-6 * abs(loss.item())
            assert not torch.allclose(r["naive_grads"][0], model.weight.grad, rtol=1e-6, atol=0)


def test_one_process_is_the_ordinary_mean_and_zero_divisor_gives_zero(seed):
    x, y, weight = whole_batch(seed)
    logits = x @ torch.randn(FEATURES, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for name, criterion in criteria(weight, "sum").items():
        got = GlobalMeanLoss(criterion)(logits, y)
        want = criteria(weight, "mean")[name](logits, y)
        assert got.item() == pytest.approx(want.item(), rel=1e-14)
    everything_ignored = torch.full_like(y, IGNORE)
    z = logits.clone().requires_grad_()
    zero = GlobalMeanLoss(criteria(weight, "sum")["nce+rce"])(z, everything_ignored)
    zero.backward()
    assert zero.item() == 0.0 and torch.all(z.grad == 0)


def test_mean_divisor_follows_torch_rules(seed):
    x, y, weight = whole_batch(seed)
    assert mean_divisor(y, ignore_index=IGNORE).item() == (y != IGNORE).sum().item()
    assert mean_divisor(y, weight, IGNORE).item() == pytest.approx(weight[y[y != IGNORE]].sum().item(), rel=1e-15)
    probabilities = torch.rand(4, CLASSES, 3, dtype=torch.float64)
    assert mean_divisor(probabilities).item() == 12
    with pytest.raises(ValueError, match="reduction='sum'"):
        GlobalMeanLoss(nn.CrossEntropyLoss())
    assert global_mean(torch.tensor(6.0), torch.tensor(3.0)).item() == 2.0
