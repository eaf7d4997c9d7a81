"""The fused linear + loss's gradient of probability targets that require grad (issue #27, section 1):
values and the gradients of hidden, weight, bias and target against the materialized reference
(test_linear's exact dyadic logits and its rule; test_target_grad's for the targets' gradient), for
every reduction and upstream gradient (a scalar, a random one per row, a stride-0 one), with and
without class weights and label smoothing, several chunks with a ragged last one, one row, strided
inputs; the other fused backends (Triton under the interpreter); gradcheck in float64; the split
family's refusal as its op's; the one (N, K) allocation; torch.compile, torch.func and opcheck.
"""

from __future__ import annotations

import pytest
import torch

import apl_kernels.linear as AL
from apl_kernels.backends import contract
from apl_kernels.catalogue import make_spec
from apl_kernels.functional import apl_loss
from apl_kernels.options import CallOptions
from apl_kernels.testing.cases import (
    FUSED, FUSED_IDS, INTERPRETED, LOSS_CASES, assert_parity, random_probabilities, random_weight,
)

from test_linear import CHUNK, H, K, N, check_parity, exact_inputs, run, run_linear

UPSTREAMS = ("random-upstream", "stride-0", "mean", "sum")


def upstream_of(mode: str, rows: int, seed: int) -> tuple[str, torch.Tensor]:
    """(reduction, upstream): a random one per row, a stride-0 one (a scalar that run() expands: as
    loss.sum().backward() gives), a mean's scaled 1, a scaled sum."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random-upstream":
        return "none", torch.randn(rows, generator=g, dtype=torch.float64)
    if mode == "stride-0":
        return "none", torch.rand((), generator=g, dtype=torch.float64) + 0.5
    return mode, torch.rand((), generator=g, dtype=torch.float64) * 2 - 0.5


def op_refuses(name: str, params: dict, backend: str = "cpp", device: str = "cpu") -> bool:
    """Whether the fused op refuses the targets' gradient of loss ``name`` (the split family's, until
    its kernels give it): linear_loss must then refuse it alike, and otherwise give it."""
    z = torch.randn(2, 3, device=device, requires_grad=True)
    t = torch.full((2, 3), 1 / 3, device=device, requires_grad=True)
    try:
        apl_loss(z, t, name, backend=backend, **params)
    except ValueError as err:
        assert "no gradient of the probability targets" in str(err)
        return True
    return False


def target_of(n: int, k: int, seed: int, strided: bool) -> torch.Tensor:
    """Probability targets that require grad, read through transposed storage when ``strided``."""
    t = random_probabilities(n, k, seed)
    return (t.t().contiguous().t() if strided else t).requires_grad_()


def options_of(index: int, seed: int, k: int) -> dict:
    """Class weights and label smoothing, each on or off as the case and seed say."""
    r = index + seed
    options = {"class_weight": random_weight(k, seed)} if r % 2 else {}
    return options | ({"label_smoothing": 0.1} if (r // 2) % 2 else {})


CASES = [(dtype, mode, shape) for dtype in (torch.float64, torch.float32) for mode in UPSTREAMS
         for shape in ("chunks", "one-row")]


@pytest.mark.parametrize("dtype,mode,shape", CASES, ids=[f"{str(d)[6:]}-{m}-{s}" for d, m, s in CASES])
def test_parity_with_materialized_reference(dtype, mode, shape, seed):
    """The value and the gradients of hidden, weight, bias and target on the C++ kernel: N = 37 rows in
    chunks of 16 (the last ragged) or one row, K = 50 classes; a catalogue loss per case and seed,
    strided hidden, weight and targets in turn, a bias or none."""
    index = CASES.index((dtype, mode, shape))
    name, params = LOSS_CASES[(seed + 5 * index) % len(LOSS_CASES)]
    n = N if shape == "chunks" else 1
    hidden, weight, bias = exact_inputs(seed, n=n)
    if (index + seed) % 3 == 0:  # strided: every other column of wider ones
        hidden = torch.stack([hidden, hidden], 2).reshape(n, 2 * H)[:, ::2]
        weight = torch.stack([weight, weight], 2).reshape(K, 2 * H)[:, ::2]
    bias = None if (index + seed) % 4 == 1 else bias
    target = target_of(n, K, seed, strided=(index + seed) % 3 == 1)
    options = options_of(index, seed, K)
    reduction, upstream = upstream_of(mode, n, seed)
    where = f"{name} {params} {dtype} {mode} {shape} {sorted(options)} bias={bias is not None}"
    if op_refuses(name, params):
        with pytest.raises(ValueError, match="no gradient of the probability targets.*backend='torch'"):
            AL.linear_loss(hidden, weight, target, name, bias=bias, reduction=reduction, chunk_size=CHUNK, **options,
                           **params)  # in forward, for `none` too (whose gradient backward computes)
        return
    check_parity(hidden, weight, bias, target, name, params, reduction, upstream, dtype, where=where, **options)


# The other fused backends: on a GPU machine Triton and CUDA, without one Triton under the interpreter.
OTHERS = [(device, backend) for device, backend in FUSED if backend != "cpp"]
OTHER_CASES = [(pair, mode) for pair in OTHERS for mode in UPSTREAMS]


@pytest.mark.parametrize("pair,mode", OTHER_CASES, ids=[f"{b}-{d}-{m}" for (d, b), m in OTHER_CASES])
def test_parity_of_other_backends(pair, mode, seed):
    device, backend = pair
    index = OTHER_CASES.index((pair, mode))
    name, params = LOSS_CASES[(seed + 5 * index) % len(LOSS_CASES)]
    n, chunk = (9, 4) if INTERPRETED and device == "cpu" else (N, CHUNK)
    hidden, weight, bias = exact_inputs(seed, n=n)
    target = target_of(n, K, seed, strided=index % 2 == 1)
    options = options_of(index, seed, K)
    reduction, upstream = upstream_of(mode, n, seed)
    if op_refuses(name, params, backend, device):
        with pytest.raises(ValueError, match="no gradient of the probability targets"):
            run(hidden, weight, bias, target, name, params, reduction, upstream, backend, chunk, device, **options)
        return
    check_parity(hidden, weight, bias, target, name, params, reduction, upstream, torch.float32,
                 where=f"{backend} {device} {name} {params} {mode} {sorted(options)}", device=device, backend=backend,
                 chunk_size=chunk, **options)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction, device, backend, seed):
    """float64 gradcheck in hidden, weight, bias and the targets, with class weights and label
    smoothing, in chunks of 2 rows (the last ragged)."""
    hidden, weight, bias = (x.to(device).requires_grad_() for x in exact_inputs(seed, n=3, h=2, k=4))
    target = random_probabilities(3, 4, seed).to(device).requires_grad_()
    class_weight = random_weight(4, seed).to(device)

    def loss(h, w, b, t):
        return AL.linear_loss(h, w, t, "nce+rce", bias=b, reduction=reduction, chunk_size=2, class_weight=class_weight,
                              label_smoothing=0.1, backend=backend)

    assert torch.autograd.gradcheck(loss, (hidden / 4, weight, bias, target))


def test_targets_alone_and_no_grad(seed):
    """Frozen hidden, weight and bias: the targets alone get their gradient (the reference's); under
    no_grad nothing is computed but the value."""
    hidden, weight, bias = exact_inputs(seed)
    target = random_probabilities(N, K, seed).requires_grad_()
    grads = []
    for backend in ("auto", "torch"):
        loss = AL.linear_loss(hidden, weight, target, "nfl+rce", bias=bias, chunk_size=CHUNK, backend=backend)
        grads.append(torch.autograd.grad(loss * 1.5, target)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        value = AL.linear_loss(hidden, weight, target, "nfl+rce", bias=bias, chunk_size=CHUNK)
    assert not value.requires_grad


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast"])
def test_targets_of_another_dtype_and_autocast(autocast, seed):
    """float64 targets of float32 hidden states, plain or under CPU autocast to bfloat16 (bf16 logits
    into the loss): the targets' gradient is float64 (the op's pair in the promoted dtype) and equals
    the float64 reference on the logits the loss saw, within float32 arithmetic (test_target_grad's
    rule); the value and the other gradients are those of float32 targets (the kernel reads the
    targets in float32 either way), bit for bit."""
    from test_target_grad import target_magnitudes

    hidden, weight, bias = (x.float() for x in exact_inputs(seed))
    target = random_probabilities(N, K, seed)
    results = []
    for t in (target, target.float()):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias, t)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = AL.linear_loss(leaves[0], leaves[1], leaves[3], "nfl+nnfl", bias=leaves[2], chunk_size=CHUNK)
            z = torch.nn.functional.linear(hidden, weight, bias).double()  # the logits the loss sees
        loss.backward(torch.tensor(1.5))
        results.append((loss.detach(), *(x.grad for x in leaves)))
    for a, b in zip(results[0][:4], results[1][:4]):
        assert torch.equal(a, b)
    t64 = target.clone().requires_grad_()
    truth = torch.autograd.grad(apl_loss(z, t64, "nfl+nnfl", backend="torch") * 1.5, t64)[0]
    assert results[0][4].dtype == torch.float64
    magnitude = target_magnitudes(z, "nfl+nnfl", {}, None, 0.0, "mean", torch.tensor(1.5))
    assert_parity(results[0][4], truth, magnitude, torch.float32, roundings=4, where=f"autocast={autocast}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_targets_gradient_is_the_one_n_by_k_allocation(reduction, seed):
    """With the targets' gradient, one allocation of N x K elements (that gradient, the size of the
    targets themselves) in forward plus backward, and none other of half that size; a chunk's pair
    of gradients (2 x chunk x K) is all the op adds per chunk."""
    n, h, k, chunk = 512, 16, 2000, 64
    hidden, weight, bias = (x.float().requires_grad_() for x in exact_inputs(seed, n, h, k))
    target = random_probabilities(n, k, seed).float().requires_grad_()

    def linear():
        AL.linear_loss(hidden, weight, target, "nce+rce", bias=bias, chunk_size=chunk,
                       reduction=reduction).sum().backward()

    full = n * k * 4
    sizes = [size for size, _ in run_linear.allocations(linear) if size >= full / 2]
    assert sizes == [full], sizes
    assert 2 * chunk * k * 4 < full / 2 and target.grad.shape == (n, k)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_and_repeated_backward(reduction, seed):
    """With retain_graph a second backward gets the same targets' gradient (the saved one is not handed
    out and scaled in place)."""
    hidden, weight, bias = (x.requires_grad_() for x in exact_inputs(seed))
    target = random_probabilities(N, K, seed).requires_grad_()
    loss = AL.linear_loss(hidden, weight, target, "nce+mae", bias=bias, reduction=reduction, chunk_size=CHUNK)
    loss = loss.sum() * 3
    first = torch.autograd.grad(loss, (hidden, target), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, target))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph(seed):
    """Both reductions in one graph without a break, the targets' gradient with the others."""
    torch._dynamo.reset()
    hidden, weight, bias = (x.float().requires_grad_() for x in exact_inputs(seed))
    target = random_probabilities(N, K, seed).float()
    criterion = AL.LinearNCERCE(1.0, 0.5, reduction="none", chunk_size=CHUNK, label_smoothing=0.1)

    def step(h, w, b, t):
        return AL.linear_loss(h, w, t, "nfl+rce", bias=b, gamma=0.3, chunk_size=CHUNK) + criterion(h, w, t, b).mean()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias, target)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    assert results[0][4] is not None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_func_grad_vjp_and_per_sample_vmap(reduction, seed):
    """torch.func.grad in all four inputs and vjp equal autograd's; vmap(grad) over samples equals one
    call per sample; a derivative of the targets' gradient is refused, never a silent zero."""
    from torch.func import grad, vjp, vmap

    hidden, weight, bias = exact_inputs(seed)
    target = random_probabilities(N, K, seed)
    options = {"class_weight": random_weight(K, seed), "label_smoothing": 0.1}

    def loss(h, w, b, t):
        return AL.linear_loss(h, w, t, "nce+agce", bias=b, reduction=reduction, chunk_size=CHUNK, **options)

    expected = run(hidden, weight, bias, target.requires_grad_(), "nce+agce", {}, reduction, torch.tensor(1.0),
                   **options)
    target = target.detach()
    for got, want in zip(grad(lambda *x: loss(*x).sum(), argnums=(0, 1, 2, 3))(hidden, weight, bias, target),
                         expected[1:]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    value, pullback = vjp(lambda t: loss(hidden, weight, bias, t), target)
    cotangent = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=value.dtype)
    want = run(hidden, weight, bias, target.requires_grad_(), "nce+agce", {}, reduction, cotangent, **options)[4]
    torch.testing.assert_close(pullback(cotangent)[0], want, rtol=1e-13, atol=1e-15)
    target = target.detach()
    per_sample = vmap(grad(lambda h, t: loss(h[None], weight, bias, t[None]).sum(), argnums=1))(hidden[:4], target[:4])
    for i in range(4):
        one = run(hidden[i:i + 1], weight, bias, target[i:i + 1].clone().requires_grad_(), "nce+agce", {}, reduction,
                  torch.tensor(1.0), **options)
        torch.testing.assert_close(per_sample[i], one[4][0], rtol=1e-13, atol=1e-15)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        grad(lambda t: (grad(lambda u: loss(hidden, weight, bias, u).sum())(t) ** 2).sum())(target)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction, seed):
    """The custom ops' schemas and fakes with the targets' gradient among the outputs."""
    hidden, weight, bias = exact_inputs(seed, n=9)
    target, class_weight = random_probabilities(9, K, seed), random_weight(K, seed)
    arguments = ("cpp", *contract.op_arguments(make_spec("nfl+rce"), CallOptions(reduction), contract.GRAD_IN_FORWARD),
                 4, [True, False, True, True])
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(AL._linear_loss_op, (hidden, weight, bias, target, class_weight, *arguments),
                          test_utils=utils)
    torch.library.opcheck(AL._linear_loss_backward_op, (hidden, weight, None, target, None, torch.rand(9),
                                                        *arguments), test_utils=utils)
