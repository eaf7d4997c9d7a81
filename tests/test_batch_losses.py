"""ANL-CE-ER (apl_kernels.batch_losses): the spec's anchors (official formulas, float64), its
refusals, gradcheck, and q̄ synchronized over 2 processes equal to one process on the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apl_kernels
from apl_kernels.batch_losses import ANLCEER, anl_ce_er, entropy_term

from webvision_support import run_ranks

Z1 = [2.0, 0.5, -1.0, 0.0, 1.0, -0.5, 0.3, -2.0, 0.8, 0.1]
Z2 = [-1.0, 3.0, 0.2, 0.1, -0.3, 0.0, 1.5, -0.7, 0.4, 2.2]
ANCHOR_LOGITS = [Z1, Z2, [0.0] * 10, [8.0] + [-4.0] * 9]
ANCHOR_LABELS = [0, 9, 3, 0]


@pytest.mark.parametrize("alpha, beta, lamb, value, grad_sum", [
    (5.0, 5.0, 2.0, 5.168705, 1.061891),
    (10.0, 1.0, 0.01, 1.296540, 0.487159),
])
def test_the_spec_anchors(alpha, beta, lamb, value, grad_sum):
    z = torch.tensor(ANCHOR_LOGITS, dtype=torch.float64, requires_grad=True)
    loss = ANLCEER(alpha, beta, lamb)(z, torch.tensor(ANCHOR_LABELS))
    loss.backward()
    assert loss.item() == pytest.approx(value, abs=5e-7)
    assert z.grad.abs().sum().item() == pytest.approx(grad_sum, abs=5e-7)
    assert entropy_term(F.softmax(z.detach(), 1), 1e-7).item() == pytest.approx(0.365506, abs=5e-7)


def naive(z: torch.Tensor, y: torch.Tensor, alpha, beta, lamb, m) -> torch.Tensor:
    """The formulas written out row by row (another order of operations than the module's)."""
    rows = []
    p = torch.softmax(z, 1)
    for i in range(z.shape[0]):
        lp = torch.log(p[i])
        v = torch.log(p[i].clamp(m, 1 - m)) + -math.log(m)
        rows.append(alpha * lp[y[i]] / lp.sum() + beta * (1 - v[y[i]] / v.sum()))
    clamped = p.clamp(m, 1 - m)
    q = (clamped.sum(0) / clamped.sum()).clamp(m, 1 - m)
    return torch.stack(rows).mean() + lamb * (math.log(z.shape[1]) + (q * q.log()).sum())


def test_against_the_formulas_written_out_and_gradcheck(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
    z = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g)
    alpha, beta, lamb = (torch.rand(3, generator=g, dtype=torch.float64) * 5).tolist()
    got = anl_ce_er(z, y, alpha, beta, lamb)
    want = naive(z, y, alpha, beta, lamb, 1e-7)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: anl_ce_er(x, y, alpha, beta, lamb), (z,))
    assert anl_ce_er(z, y, alpha, beta, lamb, reduction="sum").item() == pytest.approx(n * got.item(), rel=1e-12)
    low = anl_ce_er(z.detach().float(), y, alpha, beta, lamb)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(got.item(), rel=1e-4, abs=1e-5)
    half = anl_ce_er(z.detach().bfloat16(), y, alpha, beta, lamb)
    assert half.dtype == torch.bfloat16 and math.isfinite(half.item())


def test_refusals_and_names():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="no reduction='none': its entropy term is of the whole batch"):
        ANLCEER(reduction="none")
    with pytest.raises(ValueError, match="no reduction='none'"):
        anl_ce_er(z, y, reduction="none")
    with pytest.raises(ValueError, match="target out of range"):
        anl_ce_er(z, torch.tensor([0, 1, 3, -100]))
    with pytest.raises(ValueError, match=r"logits \(N, K\) and class indices \(N\)"):
        anl_ce_er(z, torch.rand(4, 3))
    with pytest.raises(ValueError, match="min_prob must be in"):
        ANLCEER(min_prob=0.5)
    with pytest.raises(ValueError, match="lamb must be a finite number"):
        ANLCEER(lamb=float("nan"))
    for name in ("anl-ce-er", "ANL_CE_ER", " anl-ce-er "):
        module = apl_kernels.get_loss(name, alpha=5.0, beta=5.0, lamb=2.0)
        assert isinstance(module, ANLCEER) and module.lamb == 2.0
    assert apl_kernels.ANLCEER is ANLCEER


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 6, (12,), generator=g)


def ranks_part(rank: int, world: int, seed: int) -> dict:
    x, y = batch(seed)
    rows = slice(rank * 6, rank * 6 + 6)
    result = {}
    for sync in (True, False):
        torch.manual_seed(seed)
        model = nn.parallel.DistributedDataParallel(nn.Linear(6, 6).double())
        loss = ANLCEER(5.0, 5.0, 2.0, sync=sync)(model(x[rows]), y[rows])
        loss.backward()
        value = loss.detach().clone()
        torch.distributed.all_reduce(value)
        result[sync] = {"value": value.item() / world, "grads": [p.grad for p in model.parameters()]}
    return result


def test_synchronized_batch_entropy_over_two_processes_is_the_whole_batch(tmp_path, seed):
    """The official single-process code's q̄ is over the whole batch: sync=True on 2 ranks of 6
    rows each reproduces it (value and DDP's averaged gradients); sync=False is another loss."""
    ranks = run_ranks("test_batch_losses:ranks_part", 2, tmp_path, seed=seed)
    x, y = batch(seed)
    torch.manual_seed(seed)
    model = nn.Linear(6, 6).double()
    loss = ANLCEER(5.0, 5.0, 2.0)(model(x), y)
    loss.backward()
    for result in ranks:
        assert result[True]["value"] == pytest.approx(loss.item(), rel=1e-13)
        for got, want in zip(result[True]["grads"], (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14)
        assert abs(result[False]["value"] - loss.item()) > 1e-8


def test_the_reproduction_trains_it_with_its_published_config(tmp_path, capsys):
    from apl_kernels.reproduce import cli

    out = tmp_path / "out"
    code = cli.main(["--preset", "anl", "--dataset", "cifar100", "--losses", "anl-ce-er", "--noise", "sym:0.4",
                     "--seeds", "1", "--dry-run", "--json", "--data-dir", str(tmp_path), "--out", str(out)])
    assert code == 2  # the plan, and the status of a plan whose data is missing
    import json

    plan = json.loads(capsys.readouterr().out)
    assert plan["loss_params"] == {"alpha": 10.0, "beta": 1.0, "lamb": 0.01, "min_prob": 1e-7}
    assert plan["settings"]["weight_decay"] == 0.0 and plan["settings"]["l1"] == 5e-7
    assert cli.main(["--preset", "quick", "--losses", "anl-ce-er", "--noise", "sym:0.4", "--epochs", "2",
                     "--backend", "torch", "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / "runs" / "digits_anl-ce-er_sym0.4_seed1.json").read_text())
    assert record["status"] == "finished" and record["config"]["loss_params"]["lamb"] == 2.0
    assert record["settings"]["l1"] == 5e-5 and all(math.isfinite(v) for v in record["history"]["train_loss"])
