"""The fused linear + loss (apl_kernels/linear.py) against the materialized reference: values and the
gradients of hidden, weight and bias in float64 and float32, every loss, target kind, reduction,
chunking (ragged last chunks), bias or none, strided weights; the other fused backends (Triton under
the interpreter without a GPU); gradcheck; no (N, K) allocation; autograd edge cases; bf16 and
autocast; torch.compile, torch.func and opcheck; the module forms; input errors.

Exact logits: hidden, weight and bias hold small dyadic numbers (k/8, j/16, i/128), so that every
logit ``hidden @ weight.T + bias`` is exact in float32 and float64 whatever the order of the
matmul's sums. The float64 truth (the reference on the same inputs) therefore sees the logits the
fused path sees, and cases.assert_parity's rule applies, carried through the matmuls: the op's
gradient G of the logits is off by at most RTOL times its row's term magnitude M (formulas.py)
plus a rounding of G; ``G @ weight`` then sums K products, each off by that times |weight|, plus
K roundings (K u < RTOL here: 0.3 RTOL in float32 with K = 50), so its magnitude is
``max_k M[n] * sum_k |weight[k, h]| + (|G| @ |weight|)[n, h]``; likewise for ``G.T @ hidden`` and the
bias' column sums.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import apl_kernels.linear as AL
from apl_kernels.backends import contract
from apl_kernels.catalogue import NAMED_PAIRS, make_spec
from apl_kernels.functional import apl_loss
from apl_kernels.options import CallOptions
from apl_kernels.testing.cases import (
    FUSED, INTERPRETED, LOSS_CASES, LOSS_IDS, assert_parity, random_probabilities, random_weight,
)
from apl_kernels.testing.formulas import coefficients, loss_and_grad

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run_linear  # noqa: E402  (bench/run_linear.py: its allocation records)

N, H, K, CHUNK = 37, 16, 50, 16  # three chunks, the last one ragged (5 rows)
TARGET_MODES = ("index", "smoothed", "weighted", "probabilities")


def exact_inputs(seed: int, n: int = N, h: int = H, k: int = K, dtype=torch.float64):
    """hidden (n, h), weight (k, h), bias (k) of dyadic numbers: every logit exact in float32.
    Rows of every character: moderate, confident (x8: p < 1e-7 somewhere), near-uniform (/32)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-16, 17, (n, h), generator=g, dtype=torch.float64) / 8
    hidden[1::3] *= 8
    hidden[2::3] /= 32
    weight = torch.randint(-16, 17, (k, h), generator=g, dtype=torch.float64) / 16
    bias = torch.randint(-128, 129, (k,), generator=g, dtype=torch.float64) / 128
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


def make_target(mode: str, seed: int, n: int = N, k: int = K, ignore_index: int = -100):
    """A target of ``mode`` (index targets with some ignored rows) and the options it goes with."""
    if mode == "probabilities":
        return random_probabilities(n, k, seed), {"class_weight": random_weight(k, seed), "label_smoothing": 0.05}
    target = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed + 1))
    target[3::7] = ignore_index
    options = {"ignore_index": ignore_index}
    if mode == "smoothed":
        options["label_smoothing"] = 0.1
    if mode == "weighted":
        options["class_weight"] = random_weight(k, seed)
    return target, options


def run(hidden, weight, bias, target, name, params, reduction, upstream, backend="auto", chunk_size=CHUNK,
        device="cpu", **options):
    """Loss and the gradients of hidden, weight and bias (None for a bias of None), on the CPU; and of
    the probability targets, fifth, when ``target`` requires grad (strides kept: views stay views)."""
    leaves = [x.detach().to(device).requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    target_grad = target.requires_grad
    target = target.detach().to(device).requires_grad_(target_grad)
    options = {k: v.to(device) for k, v in options.items() if isinstance(v, torch.Tensor)} | \
        {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}
    loss = AL.linear_loss(leaves[0], leaves[1], target, name, bias=leaves[2], reduction=reduction,
                          chunk_size=chunk_size, backend=backend, **options, **params)
    loss.backward(upstream.to(device, loss.dtype).expand(loss.shape))
    leaves += [target] if target_grad else []
    return tuple(x.detach().cpu() if x is not None else None for x in (loss, *(x.grad if x is not None else None
                                                                             for x in leaves)))


def check_parity(hidden, weight, bias, target, name, params, reduction, upstream, dtype, where="",
                 device="cpu", backend="auto", **options):
    """The fused path in ``dtype`` against the float64 reference on the same values (module docstring);
    the targets' gradient too when ``target`` requires grad."""
    cast = {k: v.to(dtype) if k == "class_weight" else v for k, v in options.items()}
    probabilities = target.is_floating_point()
    got = run(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
              target.to(dtype) if probabilities else target, name, params, reduction, upstream, backend,
              device=device, **cast)
    weights64 = {k: v.to(dtype).double() if k == "class_weight" else v for k, v in options.items()}
    target64 = target.to(dtype).double() if probabilities else target
    truth = run(hidden, weight, bias, target64, name, params, reduction, upstream.double(), backend="torch",
                **weights64)
    assert all(x is None or x.dtype == dtype for x in got), where
    # Magnitudes: the formulas' terms of each row's value and gradient, scaled as the loss is.
    z = F.linear(hidden, weight, bias).numpy()
    np_options = {"weight": None if "class_weight" not in weights64 else weights64["class_weight"].numpy(),
                  "label_smoothing": options.get("label_smoothing", 0.0),
                  "ignore_index": options.get("ignore_index", -100)}
    _, grad, grad_terms, sensitivity, value_terms = (torch.from_numpy(x) for x in loss_and_grad(
        z, target64.detach().numpy(), name, **np_options, **params))
    # A value's terms, and lp's rounding times the value's sensitivity to lp (cases.check_parity's rule).
    value_terms = value_terms + sensitivity * (1 + 2 * torch.from_numpy(z).abs().amax(1) + math.log(z.shape[1]))
    mean = reduction == "mean"
    divisor = (coefficients(target64.detach().numpy(), z.shape[1], **np_options)[1].sum() or 1.0) if mean else 1.0
    scale = upstream.double().expand(z.shape[0] if reduction == "none" else ()).reshape(-1, 1) / divisor
    grad, row_terms = grad * scale, grad_terms.amax(1, keepdim=True) * scale.abs()
    value_terms = value_terms * scale.abs()[:, 0]
    value_terms = value_terms if reduction == "none" else value_terms.sum().reshape(1)
    assert_parity(got[0], truth[0], torch.maximum(value_terms, truth[0].abs().reshape(value_terms.shape)), dtype,
                  where=where + " value")
    # Each element of G is off by RTOL times its row's largest term, plus a rounding of |G|.
    g_error = row_terms.expand_as(grad) + grad.abs()
    magnitudes = (g_error @ weight.abs(), g_error.t() @ hidden.abs(), g_error.sum(0))
    for label, g, t, m in zip(("hidden", "weight", "bias"), got[1:], truth[1:], magnitudes):
        if t is None:
            assert g is None, where
            continue
        assert_parity(g, t, m, dtype, where=f"{where} grad {label}")
    if target.requires_grad:  # each element from the exact logits: test_target_grad's rule, 4 roundings (the
        # op's output, the upstream's rounding to dtype and its product, a mean's division)
        from test_target_grad import target_magnitudes
        assert got[4].dtype == dtype and got[4].shape == target.shape, where
        magnitude = target_magnitudes(torch.from_numpy(z), name, params, weights64.get("class_weight"),
                                      np_options["label_smoothing"], reduction, upstream)
        assert_parity(got[4], truth[4], magnitude, dtype, roundings=4, where=f"{where} grad target")


CASES = [(dtype, mode, reduction) for dtype in (torch.float64, torch.float32) for mode in TARGET_MODES
         for reduction in ("mean", "sum", "none")]


@pytest.mark.parametrize("dtype,mode,reduction", CASES,
                         ids=[f"{str(d)[6:]}-{m}-{r}" for d, m, r in CASES])
def test_parity_with_materialized_reference(dtype, mode, reduction, seed):
    """Values and all three gradients; a loss of the catalogue per case (they all pass through the same
    op: test_every_loss covers them all), with or without bias, contiguous or strided weight."""
    index = CASES.index((dtype, mode, reduction))
    name, params = LOSS_CASES[(seed + 7 * index) % len(LOSS_CASES)]
    hidden, weight, bias = exact_inputs(seed)
    if index % 2:
        bias = None
    if index % 3 == 0:  # a strided weight: every other column of a wider one
        weight = torch.stack([weight, weight], 2).reshape(K, 2 * H)[:, ::2]
        assert not weight.is_contiguous()
    target, options = make_target(mode, seed, ignore_index=-100 if index % 4 else 5)
    upstream = torch.rand(N if reduction == "none" else (), generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
    check_parity(hidden, weight, bias, target, name, params, reduction, upstream, dtype,
                 where=f"{name} {params} {dtype} {mode} {reduction} bias={bias is not None}", **options)


# The other fused backends (the C++ kernel is the one above): on a GPU machine the Triton and CUDA
# kernels, and without one the Triton kernels under the interpreter (slow: fewer, smaller cases).
OTHERS = [(device, backend) for device, backend in FUSED if backend != "cpp"]
OTHER_CASES = [(pair, mode, reduction) for pair in OTHERS for mode in ("weighted", "probabilities")
               for reduction in ("mean", "none")]


@pytest.mark.parametrize("pair,mode,reduction", OTHER_CASES,
                         ids=[f"{b}-{d}-{m}-{r}" for (d, b), m, r in OTHER_CASES])
def test_parity_of_other_backends(pair, mode, reduction, seed):
    device, backend = pair
    index = OTHER_CASES.index((pair, mode, reduction))
    name, params = LOSS_CASES[(seed + 7 * index) % len(LOSS_CASES)]
    n, chunk = (9, 4) if INTERPRETED and device == "cpu" else (N, CHUNK)
    hidden, weight, bias = exact_inputs(seed, n=n)
    target, options = make_target(mode, seed, n=n)
    upstream = torch.rand(n if reduction == "none" else (), generator=torch.Generator().manual_seed(seed)) + 0.5
    check_parity(hidden, weight, bias, target, name, params, reduction, upstream, torch.float32,
                 where=f"{backend} {device} {name} {params} {mode} {reduction}", device=device, backend=backend,
                 chunk_size=chunk, **options)


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_every_loss(case, seed):
    name, params = case
    hidden, weight, bias = exact_inputs(seed, n=9)
    target = torch.randint(0, K, (9,), generator=torch.Generator().manual_seed(seed))
    check_parity(hidden, weight, bias, target, name, params, "mean", torch.tensor(1.0), torch.float64,
                 where=f"{name} {params}")


@pytest.mark.parametrize("chunk_size", [1, 7, N, 1000, None])
def test_chunk_sizes_agree(chunk_size, seed):
    """Any chunking (one row, a divisor-free size, exactly N, more than N, the default) gives the result
    of one chunk, up to the order of the weight gradient's sums over chunks."""
    hidden, weight, bias = exact_inputs(seed)
    target, options = make_target("weighted", seed)
    upstream = torch.tensor(1.5, dtype=torch.float64)
    whole = run(hidden, weight, bias, target, "nfl+rce", {}, "mean", upstream, chunk_size=N, **options)
    chunked = run(hidden, weight, bias, target, "nfl+rce", {}, "mean", upstream, chunk_size=chunk_size, **options)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction, seed):
    hidden, weight, bias = (x.requires_grad_() for x in exact_inputs(seed, n=5, h=3, k=4))
    target = torch.tensor([0, 3, -100, 1, 2])

    def loss(h, w, b):
        return AL.linear_loss(h, w, target, "nce+rce", bias=b, reduction=reduction, chunk_size=2)

    assert torch.autograd.gradcheck(loss, (hidden / 4, weight, bias))


def test_never_allocates_the_logits(seed):
    """No allocation of N x K elements (or half of it) in forward plus backward, and a peak of about one
    chunk's logits and gradient; the materialized path, measured the same way, allocates N x K."""
    n, h, k, chunk = 512, 16, 2000, 64
    hidden, weight, bias = (x.float().requires_grad_() for x in exact_inputs(seed, n, h, k))
    target = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))

    def linear():
        AL.linear_loss(hidden, weight, target, "nfl+rce", bias=bias, chunk_size=chunk).backward()

    def materialized():
        apl_loss(F.linear(hidden, weight, bias), target, "nfl+rce").backward()

    full = n * k * 4
    assert max(size for size, _ in run_linear.allocations(materialized)) >= full  # the records see it
    for x in (hidden, weight, bias):
        x.grad = None
    sizes = [size for size, _ in run_linear.allocations(linear)]
    assert max(sizes) <= max(chunk * k * 4, k * h * 4) < full / 2
    for x in (hidden, weight, bias):
        x.grad = None
    peak = run_linear.peak_memory(linear, lambda: [hidden.grad, weight.grad, bias.grad])
    assert peak <= 2 * chunk * k * 4 + 64 * 1024, peak


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_logits_workspace_per_call(reduction, seed):
    """The chunks' logits go into one workspace allocated once per call (linear._workspace, a mapping
    of its own, returned to the system when freed), and the CPU op writes each chunk's gradient over
    them (apl::fused_loss_): nothing chunk-sized goes through the C heap (blocks freed and allocated
    again there beside the large gradients fragment it: bench/run_linear.py --rss). For ``none``,
    forward (no gradient) and backward (which recomputes the logits) each have one workspace."""
    n, h, k, chunk = 256, 16, 3000, 64  # 4 chunks; a chunk's logits (768 KB) outsize every other tensor
    hidden, weight, bias = (x.float().requires_grad_() for x in exact_inputs(seed, n, h, k))
    target = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    workspaces, allocate = [], AL._workspace

    def workspace(shape, like):
        workspaces.append(shape)
        return allocate(shape, like)

    def linear():
        AL.linear_loss(hidden, weight, target, "nce+rce", bias=bias, chunk_size=chunk,
                       reduction=reduction).sum().backward()

    with mock.patch.object(AL, "_workspace", workspace):
        sizes = [size for size, _ in run_linear.allocations(linear) if size >= chunk * k * 4]
    assert n // chunk == 4 and sizes == [] and workspaces == [(chunk, k)] * (1 if reduction == "mean" else 2)
    # and the workspace gives the values of a materialized call
    grads = [x.grad.clone() for x in (hidden, weight, bias)]
    for x in (hidden, weight, bias):
        x.grad = None
    apl_loss(F.linear(hidden, weight, bias), target, "nce+rce", reduction=reduction).sum().backward()
    for mine, reference in zip(grads, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_and_repeated_backward(reduction, seed):
    """With retain_graph, a second backward gets the same gradients (the saved ones are not handed out)."""
    hidden, weight, bias = (x.requires_grad_() for x in exact_inputs(seed))
    target, _ = make_target("index", seed)
    loss = AL.linear_loss(hidden, weight, target, "nce+mae", bias=bias, reduction=reduction, chunk_size=CHUNK)
    loss = loss.sum() * 3
    first = torch.autograd.grad(loss, (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight, bias))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_partial_gradients_and_no_grad(seed):
    """A frozen weight gets no gradient and the others are right; under no_grad only the value is made."""
    hidden, weight, bias = exact_inputs(seed)
    target, _ = make_target("index", seed)
    h = hidden.clone().requires_grad_()
    loss = AL.linear_loss(h, weight, target, "ngce+mae", bias=bias, chunk_size=CHUNK)
    loss.backward()
    expected = run(hidden, weight, bias, target, "ngce+mae", {}, "mean", torch.tensor(1.0))
    torch.testing.assert_close(h.grad, expected[1], rtol=1e-13, atol=1e-15)
    assert weight.grad is None and bias.grad is None
    with torch.no_grad():
        value = AL.linear_loss(hidden, weight, target, "ngce+mae", bias=bias, chunk_size=CHUNK)
    torch.testing.assert_close(value, expected[0], rtol=1e-13, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vjp_and_create_graph_give_the_gradient_and_refuse_its_derivative(reduction, seed):
    """torch.func.vjp's pullback (backward with create_graph=True) and jacrev equal the reference's;
    a derivative of the gradient (double backward, grad of grad) raises, never a silent zero."""
    from torch.func import grad, jacrev, vjp

    hidden, weight, bias = exact_inputs(seed)
    target, options = make_target("weighted", seed)

    def loss(h, w, backend="auto"):
        return AL.linear_loss(h, w, target, "nfl+rce", bias=bias, reduction=reduction, chunk_size=CHUNK,
                              backend=backend, **options)

    value, pullback = vjp(loss, hidden, weight)
    cotangent = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=value.dtype)
    expected = run(hidden, weight, bias, target, "nfl+rce", {}, reduction, cotangent, **options)
    for got, want in zip(pullback(cotangent), expected[1:3]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(jacrev(loss)(hidden, weight), jacrev(lambda h, w: loss(h, w, "torch"))(hidden, weight),
                               rtol=1e-10, atol=1e-12)
    h = hidden.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(h, weight).sum(), h, create_graph=True)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        torch.autograd.grad((gradient ** 2).sum(), h)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        grad(lambda x: (grad(lambda y: loss(y, weight).sum())(x) ** 2).sum())(hidden)
    reference = grad(lambda x: (grad(lambda y: loss(y, weight, "torch").sum())(x) ** 2).sum())(hidden)
    assert reference.abs().sum() > 0


def test_empty_batch():
    hidden, weight = torch.zeros(0, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    loss = AL.linear_loss(hidden, weight, torch.zeros(0, dtype=torch.long), "nce+rce")
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 4) and weight.grad.abs().sum() == 0


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_bfloat16_follows_the_materialized_path(autocast, seed):
    """bf16 inputs, or float32 ones under CPU autocast to bf16: bf16 matmuls and bf16 logits into the
    loss, as F.linear then the fused loss (the logits' float32 sums are exact here and round to the
    same bf16 values in both); the loss in float32 under autocast; gradients within bf16 roundings."""
    dtype = torch.float32 if autocast else torch.bfloat16
    hidden, weight, bias = exact_inputs(seed, dtype=dtype)
    target, _ = make_target("index", seed)
    results = []
    for fused_linear in (True, False):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (AL.linear_loss(leaves[0], leaves[1], target, "nce+rce", bias=leaves[2], chunk_size=CHUNK)
                    if fused_linear else apl_loss(F.linear(*leaves), target, "nce+rce"))
        loss.backward()
        results.append((loss, *(x.grad for x in leaves)))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == (torch.float32 if autocast else torch.bfloat16)
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * b.float().abs().max().item())


def test_torch_compile_fullgraph(seed):
    """The functional and the module forms, both reductions, in one graph without a break."""
    torch._dynamo.reset()
    hidden, weight, bias = (x.float().requires_grad_() for x in exact_inputs(seed))
    target, _ = make_target("weighted", seed)
    criterion = AL.LinearNCERCE(1.0, 0.5, reduction="none", chunk_size=CHUNK)

    def step(h, w, b, t):
        return AL.linear_loss(h, w, t, "nfl+rce", bias=b, gamma=0.3, chunk_size=CHUNK) + criterion(h, w, t, b).mean()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        loss = fn(*leaves, target)
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_func_grad_and_per_sample_vmap(reduction, seed):
    """torch.func.grad equals autograd; vmap(grad) over samples (the op's vmap rule) equals one call per
    sample."""
    from torch.func import grad, vmap

    hidden, weight, bias = exact_inputs(seed)
    target, options = make_target("smoothed", seed)

    def loss(h, w, b, t):
        return AL.linear_loss(h, w, t, "nce+agce", bias=b, reduction=reduction, chunk_size=CHUNK, **options).sum()

    expected = run(hidden, weight, bias, target, "nce+agce", {}, reduction, torch.tensor(1.0), **options)
    for got, want in zip(grad(loss, argnums=(0, 1, 2))(hidden, weight, bias, target), expected[1:]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    per_sample = vmap(grad(lambda h, t: loss(h[None], weight, bias, t[None])))(hidden[:6], target[:6])
    for i in range(6):
        one = run(hidden[i:i + 1], weight, bias, target[i:i + 1], "nce+agce", {}, reduction, torch.tensor(1.0),
                  **options)
        torch.testing.assert_close(per_sample[i], one[1][0], rtol=1e-13, atol=1e-15)


def test_modules(seed):
    """LinearLoss and the named pairs: parameters first, class weights as a buffer, Liger's forward."""
    hidden, weight, bias = exact_inputs(seed)
    target, options = make_target("weighted", seed)
    expected = AL.linear_loss(hidden, weight, target, "nfl+rce", bias=bias, alpha=2.0, beta=0.5, gamma=1.5,
                              **options)
    for criterion in (AL.LinearLoss("nfl+rce", 2.0, 0.5, gamma=1.5, **options),
                      AL.LinearNFLRCE(2.0, 0.5, gamma=1.5, **options),
                      AL.get_linear_loss("nfl+rce", alpha=2.0, beta=0.5, gamma=1.5, **options)):
        torch.testing.assert_close(criterion(hidden, weight, target, bias), expected, rtol=1e-14, atol=0)
        assert "class_weight" in dict(criterion.named_buffers())
        assert criterion.double().class_weight.dtype == torch.float64
    assert type(AL.get_linear_loss("nce+rce")) is AL.LinearNCERCE
    assert type(AL.get_linear_loss("ce+nrce")) is AL.LinearLoss
    names = {AL.NAMED_LINEAR_MODULES[name].__name__ for name in NAMED_PAIRS}
    assert names == {f"Linear{module}" for module in NAMED_PAIRS.values()}
    assert repr(AL.LinearLoss("nce+rce", 1.0, 2.0, chunk_size=3)) == \
        "LinearLoss('nce+rce', alpha=1.0, beta=2.0, chunk_size=3)"
    assert "class_weight" in str(inspect.signature(AL.LinearNCEMAE))


def test_bad_input_is_named():
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    bad = [
        (dict(hidden=torch.randn(2, 4, 3)), ValueError, "hidden must have shape"),
        (dict(weight=torch.randn(5, 4)), ValueError, r"weight must have shape \(K, H\) = \(K, 3\)"),
        (dict(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "one floating dtype"),
        (dict(hidden=torch.ones(4, 3, dtype=torch.long)), TypeError, "one floating dtype"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must be None or of shape \(5,\)"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must be N = 4 class indices"),
        (dict(target=torch.rand(4, 4)), ValueError, r"probability targets must have shape \(N, K\) = \(4, 5\)"),
        (dict(target=torch.tensor([0, 1, 7, 3])), ValueError, r"target 7 at flat position 2 is outside \[0, 5\)"),
        (dict(class_weight=torch.rand(4)), ValueError, "class_weight has 4 entries but weight has K = 5"),
        (dict(weight=torch.randn(5, 3, device="meta")), ValueError, "weight is on meta but hidden is on cpu"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
        (dict(chunk_size=2.0), ValueError, "chunk_size must be None or an int >= 1"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="cuda"), ValueError, "does not run on cpu tensors"),
        (dict(class_weight=torch.rand(5, requires_grad=True)), ValueError, "no gradient of the class weights"),
    ]
    for change, error, message in bad:
        args = {"hidden": h, "weight": w, "target": t, **change}
        with pytest.raises(error, match=message):
            AL.linear_loss(args.pop("hidden"), args.pop("weight"), args.pop("target"), "nce+rce", **args)
    with pytest.raises(ValueError, match="chunk_size must be"):
        AL.LinearLoss("nce+rce", chunk_size=-1)
    with pytest.raises(TypeError, match="unexpected parameter"):
        AL.LinearLoss("nce+rce", gamma=1.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction, seed):
    """The custom ops' schemas and fakes (torch.compile traces with the fakes)."""
    hidden, weight, bias = exact_inputs(seed, n=9)
    target, options = make_target("weighted", seed, n=9)
    arguments = ("cpp", *contract.op_arguments(make_spec("nfl+rce"), CallOptions(reduction), contract.GRAD_IN_FORWARD),
                 4, [True, True, True, False])
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(AL._linear_loss_op, (hidden, weight, bias, target, options["class_weight"], *arguments),
                          test_utils=utils)
    torch.library.opcheck(AL._linear_loss_backward_op, (hidden, weight, None, target, None, torch.rand(9),
                                                        *arguments), test_utils=utils)
