"""Every fused backend on every device it runs on here, against the reference: parity, call
semantics, autograd, the ops' checks, opcheck and torch.compile.

Each test is parametrized by (device, backend) pairs (cases.FUSED): the C++ kernel on CPU tensors,
the Triton kernels under the interpreter on CPU tensors (without a GPU), and on a GPU machine the
Triton and CUDA C++ kernels on CUDA tensors. Tolerances are cases.assert_parity's one rule.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import apl_kernels as ak
from apl_kernels import backends
from apl_kernels.backends import contract, fused
from apl_kernels.catalogue import FOCAL, make_spec, members
from apl_kernels.options import CallOptions
from cases import (
    FUSED, FUSED_IDS, LOSS_CASES, LOSS_IDS, TARGET_MODES, check_parity, clamp_levels, gradient_roundings,
    is_interpreted, make_target, off_kinks, random_logits, random_target, run, sample_inputs,
)

F = ak.functional
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# The interpreter runs the Triton kernels' Python on NumPy, so interpreted backends get fewer shapes.
SHAPES = [(1, 2), (9, 3), (33, 10), (17, 100), (6, 1000), (3, 4099)]
INTERPRETED_SHAPES = [(3, 2), (3, 10), (3, 100), (2, 1000), (2, 5000)]
MODES = ("none", "random-upstream", "mean", "sum")


def upstream_for(mode, n, dtype, seed):
    """(reduction, upstream) of a mode: backward of loss.sum() (stride 0), a random upstream
    gradient, a plain loss.backward() of a mean, and a scaled sum."""
    if mode == "random-upstream":
        g = torch.Generator().manual_seed(seed)
        return "none", torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    if mode == "sum":
        return "sum", torch.tensor(2.5, dtype=dtype)
    return mode, "sum"


def combos(index, device, backend):
    """(dtype, shape, target mode, mode) of a loss case: every dtype at every shape, target modes and
    modes rotating with the shape and the case, so every pair meets across the cases; interpreted
    backends take one shape per dtype, rotating. Targets with a coefficient on every label
    (smoothed, probabilities) stop at K = 100: the independent formulas sum over every label
    (O(K^2) per row); larger K are tested with one-hot targets (and with smoothing at
    vocabulary size, against the reference)."""
    if is_interpreted(device, backend):
        chosen = [(dtype, INTERPRETED_SHAPES[(index + j) % len(INTERPRETED_SHAPES)],
                   TARGET_MODES[(index + j) % len(TARGET_MODES)], MODES[(index + 2 * j) % len(MODES)])
                  for j, dtype in enumerate(DTYPES + (torch.float32,))]
    else:
        chosen = [(dtype, shape, TARGET_MODES[(index + j) % len(TARGET_MODES)], MODES[(index + j + i) % len(MODES)])
                  for i, dtype in enumerate(DTYPES) for j, shape in enumerate(SHAPES)]
    one_hot = ("index", "weighted")
    return [(dtype, shape, mode if shape[1] <= 100 or mode in one_hot else one_hot[shape[1] % 2], reduction)
            for dtype, shape, mode, reduction in chosen]


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_parity_with_reference(case, device, backend, seed):
    name, params = case
    for j, (dtype, (n, k), target_mode, mode) in enumerate(combos(LOSS_CASES.index(case), device, backend)):
        z = random_logits(n, k, seed + j, dtype=dtype)
        target, options = make_target(target_mode, n, k, seed + j)
        reduction, upstream = upstream_for(mode, n, dtype, seed + j)
        check_parity(z, target, name, params, backend, device, reduction, upstream,
                     gradient_roundings(device, backend, dtype, upstream), **options)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if not is_interpreted(*p)],
                         ids=[i for p, i in zip(FUSED, FUSED_IDS) if not is_interpreted(*p)])
@pytest.mark.parametrize("name,params", [("nce+rce", {}), ("nfl+mae", {"official_grad": True}), ("ngce+nce", {}),
                                         ("sce", {}), ("nce+nnce", {}), ("nce+agce", {"a": 6.0, "q": 1.5})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_at_vocabulary_size(name, params, dtype, device, backend, seed):
    for n, target_mode in ((1, "index"), (3, "weighted")):
        z = random_logits(n, 50257, seed + n, dtype=dtype)
        target, options = make_target(target_mode, n, 50257, seed + n)
        check_parity(z, target, name, params, backend, device, **options)
    # Smoothing puts a coefficient on all 50257 labels: against the reference computed in float64.
    z = off_kinks(random_logits(2, 50257, seed, dtype=dtype), clamp_levels(params))
    target = random_target(2, 50257, seed)
    got = run(z.to(device), target.to(device), name, params, backend, label_smoothing=0.1)
    want = run(z.double(), target, name, params, "torch", label_smoothing=0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=2**-7, atol=1e-5 * w.abs().max().item())


# ---------------------------------------------------------------- call semantics


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["nce+mae", "nfl+rce", "ngce", "nrce", "nce+nnce"])
def test_ignore_index_and_reductions(name, reduction, device, backend, seed):
    n, k = 12, 13
    z = random_logits(n, k, seed, dtype=torch.float64)
    z[0] = float("nan")  # ignored: must not leak
    for ignore_index, options in ((255, {}), (3, {"weight": torch.rand(k, dtype=torch.float64) + 0.1})):
        y = random_target(n, k, seed)
        y[::4] = ignore_index  # an ignore_index inside [0, K) is ignored too
        values, grads = run(z.to(device), y.to(device), name, {}, backend, reduction, ignore_index=ignore_index,
                            **dict(options))
        want = run(z, y, name, {}, "torch", reduction, ignore_index=ignore_index, **dict(options))
        torch.testing.assert_close(values.cpu(), want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads.cpu(), want[1], rtol=1e-10, atol=1e-12)
        ignored = y == ignore_index
        assert torch.all(grads.cpu()[ignored] == 0)
        if reduction == "none":
            assert torch.all(values.cpu()[ignored] == 0)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(reduction, device, backend):
    loss, grad = run(torch.randn(5, 7, device=device), torch.full((5,), -100, device=device), "nce+rce", {}, backend,
                     reduction)
    assert torch.all(loss == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_empty_batch(device, backend):
    for reduction in ("mean", "sum", "none"):
        for target in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 7)):
            loss, grad = run(torch.randn(0, 7, device=device), target.to(device), "nce+rce", {}, backend, reduction)
            assert loss.numel() == (0 if reduction == "none" else 1) and grad.shape == (0, 7)
            assert torch.all(loss == 0)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name", ["nce+rce", "nfl+mae", "ngce+rce", "nfl+nnfl"])
def test_non_contiguous_transposed_and_spatial_inputs(name, device, backend, seed):
    k, n = 11, 10
    base = random_logits(k, 2 * n, seed, dtype=torch.float32).to(device)  # (K, 2N) storage
    y = random_target(n, k, seed).to(device)
    probabilities = torch.softmax(random_logits(n, 2 * k, seed + 1), 1).to(device)[:, ::2]  # strided targets
    layouts = (base.t()[::2], random_logits(n, 2 * k, seed, dtype=torch.float32).to(device)[:, ::2],
               base.t()[1::2].contiguous())
    for z in layouts:
        for target in (y, probabilities):
            strided = run(z, target, name, {}, backend)
            contiguous = run(z.contiguous(), target.contiguous(), name, {}, backend)
            # The same kernel reads the same numbers: bit-identical.
            assert torch.equal(strided[0], contiguous[0]) and torch.equal(strided[1], contiguous[1])
    check_parity(layouts[0].cpu(), y.cpu(), name, {}, backend, device)
    # (N, K, d1, d2) against the reference, index and probability targets.
    z = random_logits(2 * 3 * 4, 6, seed, dtype=torch.float64).reshape(2, 3, 4, 6).movedim(-1, 1)
    targets = (random_target(24, 6, seed).reshape(2, 3, 4),
               torch.softmax(random_logits(24, 6, seed + 1), 1).reshape(2, 3, 4, 6).movedim(-1, 1))
    for target in targets:
        for reduction in ("none", "mean"):
            got = run(z.to(device), target.to(device), name, {}, backend, reduction)
            want = run(z, target, name, {}, "torch", reduction)
            assert got[0].shape == want[0].shape and got[1].shape == z.shape
            for g, w in zip(got, want):
                torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name", ["nfl", "nfl+nnfl", "nce+rce"])
def test_parity_on_a_row_whose_one_minus_p_is_below_float64_epsilon(name, device, backend):
    # The row of a seed that once failed: 1 - p at the label is 1.1e-16, so the float32 kernels'
    # focal terms are 0 (log s rounds to 0, as in log_softmax) and the float64 truth's are 5e-29;
    # both are far below RTOL times the row's terms, which the formulas now compute without
    # rounding that 1 - p to 0.
    z = torch.tensor([[-0.36693716, -15.418117, 0.35638043, 0.71380252, -8.0226078, 0.17821571, 2.7967277,
                       41.515484, -0.045759462, -2.741355, 4.670567]])
    check_parity(z, torch.tensor([7]), name, {}, backend, device)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name", ["nce+rce", "nfl+rce", "ngce+mae", "nce+aul"])
def test_random_scaled_and_stride_zero_upstream_gradients(name, device, backend, seed):
    z = random_logits(16, 9, seed, dtype=torch.float64)
    y = random_target(16, 9, seed)
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(32, dtype=torch.float64, generator=g)[::2]  # a non-contiguous upstream
    for reduction, up in (("none", upstream), ("none", "sum"), ("mean", torch.tensor(3.0, dtype=torch.float64)),
                          ("sum", torch.tensor(-0.5, dtype=torch.float64))):
        got = run(z.to(device), y.to(device), name, {}, backend, reduction, up if isinstance(up, str) else up.to(device))
        want = run(z, y, name, {}, "torch", reduction, up)
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_forward_without_grad_matches(device, backend, seed):
    z = random_logits(12, 30, seed, dtype=torch.float32).to(device)
    y = random_target(12, 30, seed).to(device)
    with torch.no_grad():
        inference = F.nfl_rce(z, y, backend=backend)
    assert inference.grad_fn is None
    assert torch.equal(inference, run(z, y, "nfl+rce", {}, backend, "mean")[0])


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_bitwise_reproducible(device, backend, seed):
    z = random_logits(300, 517, seed, dtype=torch.float32).to(device)
    y = random_target(300, 517, seed).to(device)
    first = run(z, y, "nfl+rce", {}, backend, "mean")
    second = run(z, y, "nfl+rce", {}, backend, "mean")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


EDGE_CASES = [("nce+rce", {}), ("nfl+mae", {"official_grad": True}), ("ngce", {}), ("nfl", {}), ("ce", {}),
              ("nce+nnce", {}), ("nfl+nnfl", {}), ("nce+agce", {}), ("gce+nce", {})]


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name,params", EDGE_CASES, ids=[n for n, _ in EDGE_CASES])
def test_masked_and_extreme_logits(name, params, device, backend, seed):
    z = random_logits(6, 8, seed, dtype=torch.float32)
    z[:, 3] = float("-inf")  # a masked class, never the label
    z[1, 0], z[2, 1] = 1e4, -1e4
    z[4] = torch.tensor([30.0, -30.0, 0, float("-inf"), 0, 0, 0, 0])  # p[y] == 1 in float32
    y = torch.tensor([0, 0, 2, 4, 0, 7])
    got = run(z.to(device), y.to(device), name, params, backend)
    want = run(z, y, name, params, "torch")
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and torch.isfinite(w).all()
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    assert torch.all(got[1][:, 3] == 0)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("case", LOSS_CASES[::4], ids=LOSS_IDS[::4])
def test_undefined_rows_give_nan_like_the_reference(case, device, backend):
    """A NaN or +inf logit, or a row of -inf, has no softmax: NaN, never a clamp's number."""
    name, params = case
    z = torch.randn(5, 6)
    z[1, 2] = float("nan")
    z[2, 4] = float("inf")
    z[3] = float("-inf")
    y = torch.tensor([0, 1, 2, 3, 4])
    for b, d in ((backend, device), ("torch", "cpu")):
        loss, grad = run(z.to(d), y.to(d), name, params, b)
        assert torch.isnan(loss[1:4]).all() and torch.isnan(grad[1:4]).all(), b
        assert torch.isfinite(loss[[0, 4]]).all() and torch.isfinite(grad[[0, 4]]).all(), b


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_out_of_range_labels(device, backend):
    """On CPU every public form raises naming the label and its position. The GPU kernels never
    synchronize to check: a row whose label is out of range gets a NaN loss and gradient, and
    nothing outside the row is read."""
    z = torch.randn(4, 6, device=device)
    op = resolve_op(backend, device)
    for bad in (6, -1, 1 << 40):
        y = torch.tensor([1, bad, 5, -100], device=device)
        if device == "cpu":
            with pytest.raises(ValueError, match=rf"target {bad} at flat position 1 is outside \[0, 6\)"):
                F.nce_rce(z, y, backend=backend)
        if backend != "cpp":
            loss, _ = op(z, y, None, *contract.op_arguments(make_spec("nce+rce"), CallOptions("none"), contract.NO_GRAD))
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all() and loss[3] == 0


def resolve_op(backend, device):
    backends.resolve(backend, device)  # loads it: the op exists from then on
    return torch.ops.apl.triton_loss if backend == "triton" else torch.ops.apl.fused_loss


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_handed_out_never_alias_what_a_later_backward_reads(reduction, device, backend, seed):
    z = random_logits(8, 5, seed, dtype=torch.float64).to(device).requires_grad_()
    y = random_target(8, 5, seed).to(device)
    # The backend's own gradient (deterministic, so bit-equal each time): parity with the
    # reference is tested elsewhere, here only that no later backward reads damaged memory.
    want = torch.autograd.grad(F.nce_rce(z, y, reduction=reduction, backend=backend).sum(), z)[0].clone()
    for damage in (lambda g: g.add_(1), lambda g: g.mul_(2), lambda g: g.data.zero_()):
        loss = F.nce_rce(z, y, reduction=reduction, backend=backend).sum()
        (first,) = torch.autograd.grad(loss, z, retain_graph=True)
        damage(first)
        (second,) = torch.autograd.grad(loss, z, retain_graph=True)
        torch.testing.assert_close(second, want, rtol=0, atol=0)
        # In a tensor hook, as an optimizer's gradient processing may do.
        handle = z.register_hook(lambda g: g.mul_(2))
        try:
            loss.backward(retain_graph=True)
        finally:
            handle.remove()
        (third,) = torch.autograd.grad(loss, z)
        torch.testing.assert_close(third, want, rtol=0, atol=0)
        z.grad = None


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_gradients_of_class_weights_are_refused_not_none(device, backend, seed):
    """F.cross_entropy differentiates class weights; the fused ops do not, and say so rather than
    leave a gradient of None. (Probability targets get theirs: tests/test_target_grad.py.)"""
    z = random_logits(4, 5, seed).to(device).requires_grad_()
    weight = (torch.rand(5, device=device) + 0.5).requires_grad_()
    target = random_target(4, 5, seed).to(device)
    with pytest.raises(ValueError, match="no gradient of the class weights"):
        F.nce_rce(z, target, weight=weight, backend=backend)
    with torch.no_grad():  # evaluation asks for no gradient at all
        F.nce_rce(z, target, weight=weight, backend=backend)
    F.nce_rce(z, target, weight=weight.detach(), backend=backend).backward()
    F.nce_rce(z, target, weight=weight, backend="torch").backward()  # the reference differentiates them
    assert weight.grad is not None


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_backward_twice_and_accumulation(device, backend, seed):
    z = random_logits(8, 5, seed, dtype=torch.float64).to(device).requires_grad_()
    y = random_target(8, 5, seed).to(device)
    loss = F.nce_rce(z, y, backend=backend)
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first, rtol=1e-15, atol=0)
    z.grad = None
    F.nce_rce(z, y, backend=backend).backward()
    F.nce_rce(z, y, backend=backend).backward()
    torch.testing.assert_close(z.grad, 2 * first, rtol=1e-15, atol=0)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_calls_are_the_same_without_the_private_below_autograd_guard(reduction, device, backend, seed,
                                                                           monkeypatch):
    """An eager call dispatches its op below autograd with a private torch guard (fused.below_autograd);
    without it (a torch that dropped it) the op's own autograd kernel hands the call on: the same
    loss and gradient, bit for bit."""
    z = random_logits(8, 5, seed).to(device)
    y = random_target(8, 5, seed).to(device)

    def loss_and_gradient():
        x = z.detach().requires_grad_()
        loss = F.nce_rce(x, y, reduction=reduction, backend=backend)
        loss.sum().backward()
        return loss, x.grad

    want = loss_and_gradient()
    monkeypatch.setattr(fused, "below_autograd", contextlib.nullcontext)
    torch.testing.assert_close(loss_and_gradient(), want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name,params", [("nce+rce", {}), ("nfl+nnfl", {}), ("ngce", {"q": 0.3}), ("nce+ael", {})])
def test_gradcheck_with_default_arguments(name, params, device, backend, seed):
    """torch.autograd.gradcheck as users call it (undefined upstream gradients included), in
    float64, for index targets and probabilities with weights and smoothing."""
    z = random_logits(4, 6, seed, dtype=torch.float64).to(device).requires_grad_()
    for target, options in ((random_target(4, 6, seed), {}),
                            (torch.softmax(random_logits(4, 6, seed + 1), 1), {"label_smoothing": 0.1})):
        target = target.to(device)
        for reduction in ("none", "mean"):
            assert torch.autograd.gradcheck(
                lambda x: F.apl_loss(x, target, name, reduction=reduction, backend=backend, **params, **options), (z,))


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_gives_the_gradient_and_refuses_its_derivative(reduction, device, backend, seed):
    """backward with create_graph=True (as torch.func's vjp and gradient penalties run it) gives the
    first derivative; differentiating that gradient raises, never a silent zero."""
    z = random_logits(4, 5, seed, dtype=torch.float64).to(device).requires_grad_()
    target = random_target(4, 5, seed).to(device)
    want = torch.autograd.grad(F.nce_mae(z, target, reduction=reduction, backend="torch").sum(), z)[0]
    loss = F.nce_mae(z, target, reduction=reduction, backend=backend).sum()
    (gradient,) = torch.autograd.grad(loss, z, create_graph=True)
    torch.testing.assert_close(gradient.detach(), want, rtol=1e-10, atol=1e-12)
    assert gradient.requires_grad  # connected to what refuses its derivative
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        torch.autograd.grad((gradient ** 2).sum(), z)
    loss = F.nce_mae(z, target, reduction=reduction, backend=backend).sum()
    loss.backward(create_graph=True)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        (z.grad ** 2).sum().backward()


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_create_graph_through_the_ops_called_directly_is_refused(device, backend, seed):
    """The ops' own autograd (for direct callers) keeps no differentiable path to its saved
    output, so there create_graph=True is refused at once."""
    op = resolve_op(backend, device)
    mode = contract.GRAD_IN_FORWARD if backend == "cpp" else contract.GRAD_IN_BACKWARD
    z = random_logits(4, 5, seed, dtype=torch.float64).to(device).requires_grad_()
    spec, options = make_spec("nce+mae"), CallOptions(reduction="sum")
    loss, _ = op.default(z, random_target(4, 5, seed).to(device), None, *contract.op_arguments(spec, options, mode))
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_meta_tensors_give_shapes_or_a_clear_error(device, backend):
    z = torch.randn(6, 9, device="meta", requires_grad=True)
    for target in (torch.zeros(6, dtype=torch.long, device="meta"), torch.zeros(6, 9, device="meta")):
        for reduction, shape in (("none", (6,)), ("mean", ())):
            loss = F.nce_rce(z, target, reduction=reduction)  # auto: the reference computes shapes
            assert loss.shape == shape and loss.device.type == "meta"
        with pytest.raises(ValueError, match=f"backend '{backend}' does not run on meta tensors"):
            F.nce_rce(z, target, backend=backend)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name", ["nnce", "nfl+nnfl"])
def test_min_prob_above_its_limit_for_k_is_refused_and_the_limit_is_exact(name, device, backend, seed):
    """A min_prob at which every probability of a row can be at most min_prob (K · min_prob >= 1)
    would make nnce and nnfl 0/0: refused for every backend alike; at the limit, 1/(2K), the
    fused backends match the reference, a uniform row (every p = 2 · min_prob) included."""
    z = random_logits(6, 5, seed)
    z[0] = 0.0
    y = random_target(6, 5, seed)
    for refused in (0.2, 0.1 + 1e-9):
        with pytest.raises(ValueError, match=r"min_prob = .* is too large for K = 5 classes: .* min_prob <= 1/\(2K\) = 0.1"):
            F.apl_loss(z.to(device), y.to(device), name, min_prob=refused, backend=backend)
    for dtype in (torch.float64, torch.float32):
        check_parity(z.to(dtype), y, name, {"min_prob": 0.1}, backend, device)


# ---------------------------------------------------------------- the ops, called directly


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_opcheck(device, backend):
    op = resolve_op(backend, device)
    mode = contract.GRAD_IN_FORWARD if backend == "cpp" else contract.GRAD_IN_BACKWARD
    for args in sample_inputs(device, mode):
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_ops_reject_bad_arguments_with_the_same_errors(device, backend):
    op = resolve_op(backend, device)
    z, y = torch.randn(4, 10, device=device), torch.tensor([0, 1, 2, 3], device=device)
    ce, coefficients, options = [0], [1.0, 0.5, 0.7, 1.0, 1e-7, 0.0], [-100, 1, 0, 1, 0]
    op(z, y, None, ce, coefficients, [-100, 1, 0, 0, 0])
    soft = torch.rand(4, 10, device=device)
    cases = [
        ((z[0], y, None, ce, coefficients, options), ValueError, "2-D"),
        ((z, y.int(), None, ce, coefficients, options), TypeError, "int64"),
        ((z.int(), y, None, ce, coefficients, options), TypeError, "float16, bfloat16, float32 or float64"),
        ((z, torch.rand(4, 9, device=device), None, ce, coefficients, options), ValueError, "probability targets"),
        ((z, y, torch.ones(3, device=device), ce, coefficients, options), ValueError, "one weight per class"),
        ((z, y, None, [42], coefficients, options), ValueError, "unknown base loss index 42"),
        ((z, y, None, [0, 1, 2], [1.0] * 3 + coefficients[1:], options), ValueError, "1 or 2 terms"),
        ((z, y, None, ce, [1.0, 0.5], options), ValueError, "then gamma, q, a, min_prob and label_smoothing"),
        ((z, y, None, [2], [1.0, 0.5, 0.0, 1.0, 1e-7, 0.0], options), ValueError, "q must be"),
        ((z, y, None, ce, [1.0, -0.5, 0.7, 1.0, 1e-7, 0.0], options), ValueError, "gamma must be"),
        ((z, y, None, ce, [float("inf"), 0.5, 0.7, 1.0, 1e-7, 0.0], options), ValueError, "weights must be finite"),
        ((z, y, None, ce, [1.0, 0.5, 0.7, 1.0, 1.0, 0.0], options), ValueError, "min_prob"),
        ((z, y, None, ce, [1.0, 0.5, 0.7, 1.0, 1e-7, 1.5], options), ValueError, "label_smoothing"),
        ((z, y, None, ce, coefficients, [-100, 7, 0, 1, 0]), ValueError, "reduction code"),
        ((z, y, None, ce, coefficients, [-100, 1, 0, 1]), ValueError, "options must be"),
        ((z, y, None, ce, coefficients, [-100, 1, 2, 1, 0]), ValueError, "must be 0 or 1"),
        ((z, y, None, ce, coefficients, [-100, 1, 0, 1, 1]), ValueError, "target_grad"),  # labels: no gradient
        ((z, soft, None, ce, coefficients, [-100, 1, 0, 0, 1]), ValueError, "target_grad"),  # none computed
        ((z, soft, None, ce, coefficients, [-100, 1, 0, 1, 2]), ValueError, "target_grad"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            op(*args)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if not is_interpreted(*p)],
                         ids=[i for p, i in zip(FUSED, FUSED_IDS) if not is_interpreted(*p)])
def test_torch_compile_fullgraph_matches_eager(device, backend, seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(device)
    criterion = ak.NFLRCE(1.0, 1.0, official_grad=True, backend=backend, label_smoothing=0.1)
    x = torch.randn(64, 12, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)

    def step(inputs, labels):
        return criterion(model(inputs), labels)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        model.zero_grad()
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CE is F.cross_entropy


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + FUSED, ids=["torch-cpu"] + FUSED_IDS)
@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
@pytest.mark.parametrize("spatial", [False, True], ids=["2d", "4d"])
def test_ce_equals_cross_entropy_in_every_argument(target_kind, spatial, device, backend, seed):
    """Every combination of target kind, class weights, label smoothing, ignore_index, reduction and
    (N, K, d1, d2) shape: values and gradients equal F.cross_entropy's."""
    k = 7
    shape = (4, k, 3, 2) if spatial else (12, k)
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(device)
    if target_kind == "index":
        target = torch.randint(0, k, shape[:1] + shape[2:], generator=g)
        target.view(-1)[::5] = 2  # some rows of the class that will be ignored
    else:
        target = torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), 1)
    target = target.to(device)
    weight = (torch.rand(k, generator=g, dtype=torch.float64) + 0.2).to(device)
    for use_weight in (False, True):
        for smoothing in (0.0, 0.3):
            for ignore_index in ((-100, 2) if target_kind == "index" else (-100,)):
                for reduction in ("none", "mean", "sum"):
                    w = weight if use_weight else None
                    kw = dict(weight=w, label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction)
                    x = z.clone().requires_grad_()
                    ours = F.ce(x, target, backend=backend, **kw)
                    ours.sum().backward()
                    x2 = z.clone().requires_grad_()
                    theirs = torch.nn.functional.cross_entropy(x2, target, **kw)
                    theirs.sum().backward()
                    where = f"{kw}"
                    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=where)
                    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12, msg=where)


def test_every_focal_case_is_tested_in_both_gradient_modes():
    names = {name for name, params in LOSS_CASES if params.get("official_grad")}
    assert names >= {name for name, _ in LOSS_CASES if FOCAL & set(members(name))}
