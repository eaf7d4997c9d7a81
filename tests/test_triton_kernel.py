"""The Triton kernels' own checks; what every fused backend shares (parity with the reference, call
semantics, autograd, the ops' errors, opcheck) is in test_backends.py.

Here: the element math and the launch table; the chunked row path and the gradient computed in
forward (GRAD_IN_FORWARD), which test_backends.py's shapes and autograd never reach; the bytes each
path moves (counted per element in the interpreter, against the table of docs/kernels.md) and the
launches per call; the device guard. What the compiled kernels show (registers, spills, offsets,
stable specializations, Inductor's access analysis) is in test_triton_compile.py. Without a GPU the
kernels run under TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import apl_kernels as ak
from apl_kernels import backends
from apl_kernels.backends import contract, fused
from apl_kernels.backends.triton import ops as triton_backend
from apl_kernels.backends.triton import rowmath
from apl_kernels.catalogue import make_spec
from apl_kernels.options import CallOptions
from cases import UNIT_ROUNDOFF, check_parity, make_target, random_logits, random_target, term_magnitudes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = triton_backend.INTERPRETED
ROOT = Path(__file__).resolve().parent.parent
assert CUDA or INTERPRETED, "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="counts the interpreter's loads and stores")
# The interpreter evaluates both sides of every tl.where with NumPy (0 * inf in the unused side at
# masked classes, log 0): its warnings are not results.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def op_arguments(name, reduction="mean", grad_mode=contract.GRAD_IN_BACKWARD, label_smoothing=0.0, **params):
    return contract.op_arguments(make_spec(name, **params), CallOptions(reduction, label_smoothing=label_smoothing),
                              grad_mode)


def use_small_tiles(monkeypatch):
    """Rows of more than 64 classes (32 with dense coefficients) stream through chunks of 16 (8 in
    float64): the chunked path at sizes the interpreter runs quickly, with a partial last chunk."""
    monkeypatch.setattr(triton_backend, "ON_CHIP", {False: 64, True: 64})
    monkeypatch.setattr(triton_backend, "ON_CHIP_DENSE", {False: 32, True: 32})
    monkeypatch.setattr(triton_backend, "CHUNK", {False: 16, True: 8})
    monkeypatch.setattr(triton_backend, "CHUNK_DENSE", {False: 16, True: 8})


@pytest.fixture
def small_tiles(monkeypatch):
    use_small_tiles(monkeypatch)


# ---------------------------------------------------------------- element math, launch table, interpreter


@triton.jit
def _one_minus_exp_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, rowmath.one_minus_exp(x), mask=offsets < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_minus_exp_matches_expm1(dtype):
    # Both branches (series for |x| < ln 2, 1 - exp(x) below), their boundary, tiny x, -inf.
    x = -torch.cat([
        torch.logspace(-37 if dtype == torch.float32 else -300, 1.5, 1900, dtype=torch.float64),
        torch.linspace(0.69, 0.70, 100, dtype=torch.float64),
        torch.tensor([0.0, math.log(2), float("inf")], dtype=torch.float64),
    ]).to(dtype).to(DEVICE)
    out = torch.empty_like(x)
    _one_minus_exp_kernel[(1,)](x, out, len(x), BLOCK=triton.next_power_of_2(len(x)))
    x, out = x.cpu(), out.cpu()
    want = -torch.expm1(x.double())
    # Series: Horner rounding, ~2 ulp; below -ln 2: exp's error times p/(1 - p) <= 1, and GPU
    # exp is the approximate ex2 (~2 ulp): at most 4 ulp; torch.expm1 itself is within 1.
    four_units = 4 * torch.finfo(dtype).eps / 2
    error = (out.double() - want).abs() / want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert error.max() <= four_units, (error.max(), x[error.argmax()])
    assert out[-1] == 1 and out[-3] == 0


def test_launch_table():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        wide = dtype == torch.float64
        for dense in (False, True):
            on_chip = (triton_backend.ON_CHIP_DENSE if dense else triton_backend.ON_CHIP)[wide]
            for k in (2, 10, 100, 1000, 2049, 4096, 5000, 16384, 16385, 32000, 50257, 262144):
                launch = triton_backend.launch_config(k, dtype, dense)
                assert launch.block & (launch.block - 1) == 0 and launch.warps & (launch.warps - 1) == 0
                # Whole rows up to the on-chip limit, else chunks; several rows a program at small K.
                assert launch.chunked == (triton.next_power_of_2(k) > on_chip)
                chunk = (triton_backend.CHUNK_DENSE if dense else triton_backend.CHUNK)[wide]
                assert launch.block == (chunk if launch.chunked else triton.next_power_of_2(k))
                backward = triton_backend.launch_config(k, dtype, dense, backward=True)
                assert backward.block == min(launch.block, chunk) and backward.chunked == (k > backward.block)
                # A chunk is one program of CHUNK_WARPS under its register budget, within the cap.
                for plan in (launch, backward):
                    if plan.chunked:
                        assert (plan.rows, plan.warps) == (1, triton_backend.CHUNK_WARPS)
                        assert plan.registers == triton_backend.CHUNK_REGISTERS[wide] <= 65536 // (32 * plan.warps)
                    else:
                        assert plan.registers == triton_backend.ON_CHIP_REGISTERS[wide]
                if launch.chunked:
                    continue
                # Each thread holds PER_THREAD elements of the tile (fewer only in a one-warp program);
                # where rows share a program, a warp's lanes hold BLOCK_K / 32 each, at least 4.
                small = max(triton_backend.SMALL_ROW_PER_THREAD, launch.block // 32)
                want = min((triton_backend.PER_THREAD_DENSE if dense else triton_backend.PER_THREAD)[wide], small)
                assert launch.rows == 1 or launch.rows * launch.block == 4 * 32 * want
                per_thread = launch.rows * launch.block // (32 * launch.warps)
                assert per_thread == want or (launch.warps == 1 and per_thread < want)
                # A row spreads over min(BLOCK_K, 32) lanes: a thread holds at most 4 rows' values, and
                # one where a row gives each lane 4 elements or more.
                assert launch.rows * min(launch.block, 32) <= 4 * 32 * launch.warps
                assert launch.block < 128 or launch.rows <= launch.warps
                assert 1 <= launch.warps <= triton_backend.MAX_WARPS


@triton.jit
def _to_bfloat16_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))


@pytest.mark.skipif(CUDA, reason="GPUs convert float32 to bfloat16 rounding to nearest even")
def test_interpreter_truncates_float32_to_bfloat16():
    # Why test_backends.gradient_roundings counts bfloat16 twice under the interpreter (its
    # cast_impl drops the low bits): when this fails, the interpreter rounds, and the allowance can go.
    x = torch.tensor([1 + 2.0**-8 + 2.0**-10, -(3 + 2.0**-7 + 2.0**-9)])  # above the midpoints
    out = torch.empty(2, dtype=torch.bfloat16)
    _to_bfloat16_kernel[(1,)](x, out, BLOCK=2)
    assert torch.equal(x.to(torch.bfloat16), torch.tensor([1 + 2.0**-7, -(3 + 2.0**-6)], dtype=torch.bfloat16))
    assert torch.equal(out, torch.tensor([1.0, -3.0], dtype=torch.bfloat16))


# ---------------------------------------------------------------- paths test_backends.py does not reach

@needs_interpreter
@pytest.mark.parametrize("k", [2, 10, 33, 100, 200, 500])
def test_small_row_tiles_match_the_reference(k, seed):
    """Each tile of several rows a program (256 x 2, 32 x 16, 8 x 64, 4 x 128, 4 x 256, 4 x 512):
    more rows than a program holds, the last program partial; test_backends.py's interpreted shapes
    have fewer rows than one program."""
    modes = ["index", "weighted", "smoothed", "probabilities"]
    reductions = ["none", "mean", "sum"]
    for j, (dtype, name) in enumerate([(torch.float32, "nfl+nnfl"), (torch.float64, "nce+agce")]):
        # dense float64 rows hold fewer elements a thread (PER_THREAD_DENSE), so fewer rows a program
        rows = max(triton_backend.launch_config(k, dtype, True).rows, triton_backend.launch_config(k, dtype).rows)
        assert rows > 1
        n = rows + 3
        mode = modes[(seed + j) % len(modes)]
        z = random_logits(n, k, seed + j, dtype=dtype)
        target, options = make_target(mode, n, k, seed + j)
        check_parity(z, target, name, {}, "triton", "cpu", reductions[(seed + j) % 3], **options)


CHUNKED_CASES = [("nfl+nnfl", {}), ("nce+rce", {}), ("ngce+mae", {"q": 0.3}), ("ce", {}), ("nce+agce", {}),
                 ("fl+nrce", {"official_grad": True})]


@needs_interpreter
@pytest.mark.parametrize("name,params", CHUNKED_CASES, ids=[n for n, _ in CHUNKED_CASES])
def test_chunked_rows_match_the_reference(name, params, small_tiles, seed):
    """Rows longer than the on-chip limit: online max and sum, a second pass (last chunk first)
    for the terms that need one, the gradient chunk by chunk; every target mode and reduction."""
    for j, (dtype, mode, reduction) in enumerate([(torch.float64, "index", "mean"), (torch.float32, "weighted", "none"),
                                                  (torch.float64, "smoothed", "sum"),
                                                  (torch.float32, "probabilities", "mean")]):
        k = 100 if mode in ("index", "weighted") else 50  # chunks of 16 (8 in float64), the last partial
        z = random_logits(3, k, seed + j, dtype=dtype)
        target, options = make_target(mode, 3, k, seed + j)
        assert triton_backend.launch_config(k, dtype, mode in ("smoothed", "probabilities")).chunked
        check_parity(z, target, name, params, "triton", "cpu", reduction, **options)


def gradient_in_forward_and_backward(z, target, weight, args):
    """The GRAD_IN_FORWARD op's loss and saved gradient, and the GRAD_IN_BACKWARD op's loss and
    backward gradient for an upstream gradient of 1."""
    bases, coefficients, options = args
    in_forward, in_backward = ([*options[:3], mode, *options[4:]]
                               for mode in (contract.GRAD_IN_FORWARD, contract.GRAD_IN_BACKWARD))
    forward_loss, saved = torch.ops.apl.triton_loss(z, target, weight, bases, coefficients, in_forward)
    loss, stats = torch.ops.apl.triton_loss(z, target, weight, bases, coefficients, in_backward)
    ones = torch.ones(loss.shape, dtype=loss.dtype, device=loss.device)
    grad = torch.ops.apl.triton_loss_backward(z, target, weight, stats, ones, bases, coefficients, in_backward)
    return (forward_loss, saved), (loss, grad)


@pytest.mark.parametrize("chunked", [False, True], ids=["on-chip", "chunked"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradient_in_forward_equals_gradient_in_backward(reduction, chunked, monkeypatch, seed):
    """GRAD_IN_FORWARD (what the fused linear + loss calls on chunks) writes, for an upstream
    gradient of 1 and divided by the mean's divisor, the gradient that backward writes."""
    if chunked:
        if not INTERPRETED:
            pytest.skip("small tiles are for the interpreter")
        use_small_tiles(monkeypatch)
    k = 100 if chunked else 30
    for j, (name, mode) in enumerate([("nfl+rce", "index"), ("nce+nnce", "weighted"), ("ngce", "probabilities"),
                                      ("nce+agce", "smoothed")]):
        z = random_logits(6, k, seed + j, dtype=torch.float64)
        target, options = make_target(mode, 6, k, seed + j)
        if mode != "probabilities":
            target[1] = -100  # an ignored row
        weight = options.get("weight")
        args = op_arguments(name, reduction, label_smoothing=options.get("label_smoothing", 0.0))
        (forward_loss, saved), (loss, grad) = gradient_in_forward_and_backward(
            z.to(DEVICE), target.to(DEVICE), None if weight is None else weight.to(DEVICE), args)
        torch.testing.assert_close(forward_loss, loss, rtol=0, atol=0)
        # The same arithmetic but for the mean's divisor D: GRAD_IN_FORWARD sums the class weights
        # with torch before the launch, the forward kernel in program order, so with class weights
        # the two D differ by up to N - 1 roundings (N positive weights). Each path scales the row's
        # coefficients by 1 / D and rounds each term of h[i] - p[i] H about 3 times after that: the
        # two differ by at most 6 roundings of each term plus D's difference times the element.
        # (Bit-identical without class weights; relative to the element alone, where it cancels,
        # the difference reached 1.9e-14 in about one seed of 55.)
        _, terms = term_magnitudes(z, target, name, {}, reduction, "sum", **options)
        u = UNIT_ROUNDOFF[torch.float64]
        error = (saved.cpu() - grad.cpu()).abs()
        allowed = 6 * u * terms + z.shape[0] * u * grad.cpu().abs()
        assert bool((error <= allowed).all()), (error / allowed).nan_to_num(0).max()
        assert saved.shape == z.shape and saved.dtype == z.dtype and saved.is_contiguous()


def test_out_of_range_label_in_a_mean_makes_the_loss_nan_and_its_row_only(seed):
    z = random_logits(4, 6, seed, dtype=torch.float32).to(DEVICE)
    y = torch.tensor([1, 6, 5, -100], device=DEVICE)  # 6 is out of range: never read
    args = op_arguments("nce+rce")
    loss, stats = torch.ops.apl.triton_loss(z, y, None, *args)
    grad = torch.ops.apl.triton_loss_backward(z, y, None, stats, torch.ones((), device=DEVICE), *args)
    assert torch.isnan(loss) and torch.isnan(grad[1]).all()
    assert torch.isfinite(grad[[0, 2]]).all() and torch.all(grad[3] == 0)


def test_the_reduction_counter_is_reset_and_kept(seed):
    """The last program sets the persistent counter back to 0: the next call needs no clearing."""
    z = random_logits(40, 9, seed, dtype=torch.float32).to(DEVICE)
    y = random_target(40, 9, seed).to(DEVICE)
    args = op_arguments("nfl+rce", "sum", contract.NO_GRAD)
    first = torch.ops.apl.triton_loss(z, y, None, *args)[0]
    counters = dict(triton_backend.COUNTERS)
    assert counters and all(int(c) == 0 for c in counters.values())
    second = torch.ops.apl.triton_loss(z, y, None, *args)[0]
    assert torch.equal(first, second) and all(triton_backend.COUNTERS[key] is c for key, c in counters.items())


# ---------------------------------------------------------------- launches, bytes, device


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch of the ops, by kernel name, with the launch's arguments."""
    seen = []
    launch = triton_backend.launch

    def recording(kernel, grid, *args, **meta):
        seen.append((kernel.fn.__name__, dict(zip(kernel.arg_names, args)), meta))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "launch", recording)
    return seen


# aten ops that allocate or view: no kernel launch on a GPU.
NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}


def aten_launches(fn):
    """The aten ops that ``fn`` runs outside the Triton kernels (each would be a launch on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    kernels = [(e.time_range.start, e.time_range.end) for e in profile.events() if e.name == "apl::triton_launch"]
    return [e.name for e in profile.events() if e.name.startswith("aten::") and e.name not in NO_LAUNCH
            and not any(start <= e.time_range.start <= end for start, end in kernels)]


def test_launches_per_call(launches, monkeypatch, seed):
    """A forward plus backward is two launches, an evaluation forward one; nothing else runs on the
    device (the reduction's counter is created once per stream, before this count)."""
    launch = triton_backend.launch

    def marked(kernel, grid, *args, **meta):
        with torch.profiler.record_function("apl::triton_launch"):
            launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "launch", marked)
    z = random_logits(20, 9, seed, dtype=torch.float32).to(DEVICE)
    y = random_target(20, 9, seed).to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        args = op_arguments("nfl+rce", reduction)
        loss, stats = torch.ops.apl.triton_loss(z, y, None, *args)  # creates the counter
        launches.clear()
        upstream = torch.ones(loss.shape, device=DEVICE)
        assert aten_launches(lambda: torch.ops.apl.triton_loss(z, y, None, *args)) == []
        assert aten_launches(lambda: torch.ops.apl.triton_loss_backward(z, y, None, stats, upstream, *args)) == []
        no_grad = op_arguments("nfl+rce", reduction, contract.NO_GRAD)
        assert aten_launches(lambda: torch.ops.apl.triton_loss(z, y, None, *no_grad)) == []
        assert [name for name, _, _ in launches] == ["forward_kernel", "backward_kernel", "forward_kernel"]
        # Through autograd: the forward and backward kernels, once each; the logits read in place.
        launches.clear()
        x = z.t().contiguous().t().requires_grad_()
        ak.functional.nfl_rce(x, y, reduction=reduction, backend="triton").sum().backward()
        assert [name for name, _, _ in launches] == ["forward_kernel", "backward_kernel"]
        assert all(arguments["logits_ptr"] is x for _, arguments, _ in launches)
        launches.clear()
        with torch.no_grad():
            ak.functional.nfl_rce(z, y, reduction=reduction, backend="triton")
        assert [(name, meta["GRAD_MODE"]) for name, _, meta in launches] == [("forward_kernel", contract.NO_GRAD)]


def test_launches_happen_on_the_logits_device(monkeypatch, seed):
    """Triton launches on the current device: every launch runs inside the logits' device guard,
    and the guard of a tensor on cuda:1 selects cuda:1 (as far as this can be seen without a GPU)."""
    guarded = []

    class Guard:
        def __init__(self, tensor):
            self.device = tensor.device

        def __enter__(self):
            guarded.append(self.device)

        def __exit__(self, *exc):
            guarded.append(None)

    monkeypatch.setattr(triton_backend, "on_device", Guard)
    launch = triton_backend.launch
    monkeypatch.setattr(triton_backend, "launch", lambda *a, **m: (launch(*a, **m), guarded.append("launch")))
    z = random_logits(4, 9, seed, dtype=torch.float32).to(DEVICE).requires_grad_()
    ak.functional.nce_rce(z, random_target(4, 9, seed).to(DEVICE), backend="triton").backward()
    assert guarded == [z.device, "launch", None] * 2
    monkeypatch.undo()
    monkeypatch.setattr(fused, "traced", lambda tensor: False)

    class OnSecondGPU:
        device = torch.device("cuda", 1)

    guard = triton_backend.on_device(OnSecondGPU())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


# Which docs/kernels.md row each measured path is: (loss, target mode, grad mode, K), run with the
# small_tiles fixture (more than 64 classes, or 32 dense, are chunked).
BYTE_PATHS = {
    "forward, one-hot, on chip": ("nfl+rce", "index", contract.GRAD_IN_BACKWARD, 50),
    "forward, one-hot, chunked, no term with a pass": ("nce+mae", "index", contract.GRAD_IN_BACKWARD, 100),
    "forward, one-hot, chunked, a term with a pass": ("nfl+rce", "index", contract.GRAD_IN_BACKWARD, 100),
    "forward, probabilities, on chip": ("nce+rce", "probabilities", contract.GRAD_IN_BACKWARD, 20),
    "forward, probabilities, chunked": ("nce+rce", "probabilities", contract.GRAD_IN_BACKWARD, 50),
    "forward without gradient (evaluation), one-hot, on chip": ("nfl+rce", "index", contract.NO_GRAD, 50),
    "backward, one-hot": ("nfl+rce", "index", contract.GRAD_IN_BACKWARD, 100),
    "backward, probabilities": ("nce+rce", "probabilities", contract.GRAD_IN_BACKWARD, 50),
    "GRAD_IN_FORWARD, one-hot, on chip": ("nfl+rce", "index", contract.GRAD_IN_FORWARD, 50),
    "GRAD_IN_FORWARD, one-hot, chunked, a term with a pass": ("nfl+rce", "index", contract.GRAD_IN_FORWARD, 100),
}


def docs_byte_table() -> dict[str, tuple[int, int, int]]:
    """docs/kernels.md's byte table: per path, the multiples of N K b (logits read, gradient
    written) and of N K b_t (probability targets read)."""
    text = (ROOT / "docs" / "kernels.md").read_text()
    table = text[text.index("| Path | Logits read"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = tuple(int(c.split()[0]) if c[0].isdigit() else 0 for c in cells[1:4])
    return rows


@needs_interpreter
def test_bytes_moved_match_the_docs_table(launches, monkeypatch, small_tiles, seed):
    """Every load and store of the kernels, counted per element in the interpreter: the N K terms
    of each path are the docs table's, the rest is O(N)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    accesses = []
    load, store = builder.create_masked_load, builder.create_masked_store

    def counted(kind, real):
        def access(ptrs, value_or_mask, *rest):
            mask = rest[0] if kind == "write" else value_or_mask
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            accesses.append((kind, ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)], size))
            return real(ptrs, value_or_mask, *rest)
        return access

    monkeypatch.setattr(builder, "create_masked_load", counted("read", load))
    monkeypatch.setattr(builder, "create_masked_store", counted("write", store))
    table = docs_byte_table()
    assert set(table) == set(BYTE_PATHS)
    n = 5
    for path, (name, mode, grad_mode, k) in BYTE_PATHS.items():
        z = random_logits(n, k, seed, dtype=torch.bfloat16)
        target = make_target(mode, n, k, seed)[0]
        target = target.float() if mode == "probabilities" else target  # b_t = 4
        args = op_arguments(name, "mean", grad_mode)
        loss, saved = torch.ops.apl.triton_loss(z, target, None, *args)
        launches.clear()
        accesses.clear()
        if path.startswith("backward"):
            torch.ops.apl.triton_loss_backward(z, target, None, saved, torch.ones(()), *args)
        else:
            torch.ops.apl.triton_loss(z, target, None, *args)
        (_, arguments, meta), = launches
        totals = Counter()
        for kind, addresses, size in accesses:
            for arg, tensor in arguments.items():
                if isinstance(tensor, torch.Tensor):
                    start = tensor.untyped_storage().data_ptr()
                    inside = (addresses >= start) & (addresses < start + tensor.untyped_storage().nbytes())
                    totals[arg, kind] += int(inside.sum()) * size
        logits_reads, grad_writes, target_reads = table[path]
        one_hot = mode == "index"
        where = f"{path}: {dict(totals)}"
        # The one-hot paths read each row's label logit once more (N b: O(N)).
        assert totals["logits_ptr", "read"] == (logits_reads * k + one_hot) * n * 2, where
        assert totals["grad_ptr", "write"] + (grad_mode == contract.GRAD_IN_FORWARD) * totals["saved_ptr", "write"] \
            == grad_writes * n * k * 2, where
        assert totals["target_ptr", "read"] == (target_reads * n * k * 4 if not one_hot else 8 * n), where
        programs = triton.cdiv(n, meta["ROWS"])
        rest = sum(v for (arg, kind), v in totals.items() if arg not in ("logits_ptr", "target_ptr", "grad_ptr")
                   and not (arg == "saved_ptr" and grad_mode == contract.GRAD_IN_FORWARD))
        assert rest <= 48 * (n + 1) + 64 * programs, where  # records, weights, losses, partials: O(N)


# ---------------------------------------------------------------- GPU-only


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors_and_the_op_refuses_cpu_tensors():
    assert backends.resolve("auto", "cuda").name == "triton"
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        torch.ops.apl.triton_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), None, *op_arguments("ce"))
