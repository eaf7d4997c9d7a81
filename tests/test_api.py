"""The public API: names, modules, functional forms, backends, and every bad input."""

from __future__ import annotations

import inspect

import pytest
import torch

import apl_kernels as ak
from apl_kernels.catalogue import NAMED_PAIRS, available_losses
from cases import random_logits, random_target

F = ak.functional

MODULES = {
    "ce": ak.CE, "fl": ak.FL, "gce": ak.GCE, "sce": ak.SCE, "mae": ak.MAE, "rce": ak.RCE,
    "nce": ak.NCE, "nfl": ak.NFL, "ngce": ak.NGCE, "nmae": ak.NMAE, "nrce": ak.NRCE,
    "nce+mae": ak.NCEMAE, "nce+rce": ak.NCERCE, "nfl+mae": ak.NFLMAE, "nfl+rce": ak.NFLRCE,
    "ngce+mae": ak.NGCEMAE, "ngce+rce": ak.NGCERCE, "gce+mae": ak.GCEMAE, "gce+rce": ak.GCERCE,
    "gce+nce": ak.GCENCE, "mae+rce": ak.MAERCE, "nfl+nce": ak.NFLNCE, "ngce+nce": ak.NGCENCE,
    "nnce": ak.NNCE, "nnfl": ak.NNFL, "agce": ak.AGCE, "aul": ak.AUL, "ael": ak.AEL, "nce+agce": ak.NCEAGCE,
    "nce+aul": ak.NCEAUL, "nce+ael": ak.NCEAEL, "nce+nnce": ak.ANLCE, "nfl+nnfl": ak.ANLFL,
    "anorm": ak.ANorm, "nce+anorm": ak.NCEANorm,
}


def test_available_losses_lists_every_spec_name():
    names = ak.available_losses()
    assert len(names) == len(set(names))
    for name in MODULES:
        assert name in names
    for active in ("ce", "fl", "gce", "nce", "nfl", "ngce"):
        for passive in ("mae", "rce", "nmae", "nrce"):
            assert f"{active}+{passive}" in names
    assert all(name == name.lower() for name in names)


def test_readme_example():
    loss = ak.NCEMAE(1.0, 1.0)(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_functional_and_get_loss_agree(name, seed):
    z = random_logits(6, 10, seed, dtype=torch.float32)
    y = random_target(6, 10, seed)
    by_module = MODULES[name]()(z, y)
    by_function = getattr(F, name.replace("+", "_"))(z, y)
    by_name = ak.get_loss(name)(z, y)
    by_apl = F.apl_loss(z, y, name)
    assert torch.equal(by_module, by_function) and torch.equal(by_module, by_name)
    assert torch.equal(by_module, by_apl)
    assert type(ak.get_loss(name)) is MODULES[name]


def test_pairs_take_alpha_beta_first(seed):
    z = random_logits(6, 10, seed)
    y = random_target(6, 10, seed)
    pair = ak.NCERCE(2.0, 0.5)(z, y)
    assert torch.allclose(pair, 2.0 * ak.NCE()(z, y) + 0.5 * ak.RCE()(z, y), rtol=1e-14, atol=0)
    assert torch.equal(pair, ak.APLLoss("nce", "rce", 2.0, 0.5)(z, y))
    assert torch.equal(pair, ak.APLLoss("nce", "rce", alpha=2.0, beta=0.5)(z, y))
    assert torch.equal(pair, F.nce_rce(z, y, 2.0, 0.5))
    assert torch.equal(pair, ak.get_loss("NCE+RCE", alpha=2.0, beta=0.5)(z, y))
    generic = ak.get_loss("ce+nrce", alpha=0.3)
    assert isinstance(generic, ak.APLLoss)
    assert torch.allclose(generic(z, y), 0.3 * ak.CE()(z, y) + ak.NRCE()(z, y), rtol=1e-14, atol=0)


def test_sce_is_alpha_ce_plus_beta_rce(seed):
    z = random_logits(6, 10, seed)
    y = random_target(6, 10, seed)
    assert torch.allclose(ak.SCE()(z, y), 0.1 * ak.CE()(z, y) + ak.RCE()(z, y), rtol=1e-14, atol=0)
    assert torch.allclose(ak.SCE(0.5, 2.0)(z, y), 0.5 * ak.CE()(z, y) + 2 * ak.RCE()(z, y), rtol=1e-14, atol=0)


def test_scale_and_parameters(seed):
    z = random_logits(6, 10, seed)
    y = random_target(6, 10, seed)
    assert torch.allclose(ak.NFL(10.0)(z, y), 10 * ak.NFL()(z, y), rtol=1e-14, atol=0)
    assert not torch.equal(ak.FL(gamma=2.0)(z, y), ak.FL()(z, y))
    assert torch.equal(ak.FL(gamma=0.0)(z, y), ak.CE()(z, y))
    assert torch.equal(ak.NGCE(q=0.1)(z, y), F.ngce(z, y, q=0.1))


def test_repr_names_the_loss_and_its_parameters():
    assert repr(ak.NCEMAE(1.0, 1.0)) == "NCEMAE(alpha=1.0, beta=1.0)"
    assert repr(ak.NFL(10.0, gamma=0.5)) == "NFL(scale=10.0, gamma=0.5, official_grad=False)"
    assert repr(ak.GCE(reduction="sum")) == "GCE(scale=1.0, q=0.7, reduction='sum')"
    assert repr(ak.APLLoss("nce", "nrce", 2.0)) == "APLLoss('nce+nrce', alpha=2.0, beta=1.0)"
    assert repr(ak.NGCENCE(q=0.1, ignore_index=255)) == "NGCENCE(alpha=1.0, beta=1.0, q=0.1, ignore_index=255)"
    assert repr(ak.ANLCE(5.0, 5.0, label_smoothing=0.1, weight=torch.ones(3))) == (
        "ANLCE(alpha=5.0, beta=5.0, min_prob=1e-07, label_smoothing=0.1, weight=<3 class weights>)")


def test_modules_have_no_parameters_and_work_in_nn_sequential_training():
    model = torch.nn.Linear(4, 3)
    criterion = ak.NCERCE(1.0, 1.0)
    assert list(criterion.parameters()) == []
    loss = criterion(model(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()


def test_backends():
    assert {"torch", "cpp"} <= set(ak.available_backends("cpu"))
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    # "auto" takes the C++ kernel for CPU tensors once the extension is available.
    assert torch.equal(F.nce(z, y), F.nce(z, y, backend="cpp"))
    assert torch.allclose(F.nce(z, y, backend="torch"), F.nce(z, y), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*available for cpu tensors: torch, cpp"):
        F.nce(z, y, backend="fast")
    with pytest.raises(ValueError, match=r"backend 'cuda' does not run on cpu tensors .*available for cpu tensors: torch, cpp"):
        F.nce(z, y, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ak.NCE(backend="fast")


# ---------------------------------------------------------------- bad input

z10 = torch.randn(4, 10)
y10 = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: F.nce(z10, torch.tensor([0, 10, 2, 3])), ValueError, r"target 10 at flat position 1 is outside \[0, 10\)"),
        (lambda: F.nce(z10, torch.tensor([0, -1, 2, 3])), ValueError, r"target -1 .* not ignore_index \(-100\)"),
        (lambda: F.nce(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), ValueError, r"K = input.shape\[1\] must be >= 2"),
        (lambda: F.nce(z10, torch.tensor([0, 1, 2])), ValueError, r"target shape \(3,\) does not match input shape \(4, 10\)"),
        (lambda: F.nce(torch.randn(4, 10, 3), y10), ValueError,
         r"target shape \(4,\) does not match input shape \(4, 10, 3\): expected \(4, 3\)"),
        (lambda: F.nce(z10, torch.zeros(4, 10, dtype=torch.long)), TypeError,
         r"probability targets must be floating point \(use target.to\(input.dtype\)\)"),
        (lambda: F.nce(torch.randn(10), torch.tensor(1)), ValueError, r"shape \(N, K\)"),
        (lambda: F.nce(z10, y10.to("meta")), ValueError, r"input is on cpu but target is on meta"),
        (lambda: F.nce(z10, y10.bool()), TypeError, r"integer class indices or class probabilities"),
        (lambda: F.nce(torch.randint(0, 5, (4, 10)), y10), TypeError, r"input \(logits\) must be float16, bfloat16, float32 or float64; got torch.int64"),
        (lambda: F.nce(z10.numpy(), y10), TypeError, r"must be tensors"),
        (lambda: ak.GCE(q=-0.5), ValueError, r"q must be in \[1e-30, 100\], got -0.5"),
        (lambda: ak.NGCE(q=0), ValueError, r"q must be in"),
        (lambda: ak.FL(gamma=-1.0), ValueError, r"gamma must be in \[0, 100\], got -1"),
        (lambda: F.nfl_rce(z10, y10, gamma=-0.1), ValueError, r"gamma must be in"),
        (lambda: ak.NCE(scale=float("nan")), ValueError, r"scale must be finite"),
        # What float32 cannot honour is refused once, for every backend (issue 15): no NaN on one
        # backend and an error on another.
        (lambda: ak.GCE(q=1e-50), ValueError, r"q must be in \[1e-30, 100\], got 1e-50"),
        (lambda: ak.NFL(gamma=1e6), ValueError, r"gamma must be in \[0, 100\], got 1e\+06"),
        (lambda: ak.NCE(scale=1e300), ValueError, r"scale must be in \[-1e\+30, 1e\+30\], got 1e\+300"),
        (lambda: ak.NCE(ignore_index=2**70), ValueError, r"ignore_index must fit in int64"),
        (lambda: ak.AUL(a=1.0), ValueError, r"a must be >= 1 \+ 1e-08 for aul"),
        (lambda: ak.AUL(a=1 + 1e-9), ValueError, r"a must be >= 1 \+ 1e-08 for aul .*, got 1.000000001"),
        (lambda: ak.AGCE(a=0.0), ValueError, r"a must be in"),
        (lambda: ak.AGCE(a=10.0, q=50.0), ValueError, r"overflows float32"),
        (lambda: ak.NNCE(min_prob=0.0), ValueError, r"min_prob must be in"),
        (lambda: ak.NNFL(min_prob=1.0), ValueError, r"min_prob must be in"),
        (lambda: ak.NNCE(min_prob=1 - 2**-25), ValueError,
         r"min_prob must be in \[1e-30, 0.9999999403953552\], got 0.9999999701976776"),
        (lambda: F.nce_nnce(z10, y10, min_prob=0.2), ValueError,
         r"min_prob = 0.2 is too large for K = 10 classes: nce\+nnce .* use min_prob <= 1/\(2K\) = 0.05"),
        (lambda: ak.linear_loss(torch.randn(4, 3), torch.randn(10, 3), y10, "nnce", min_prob=0.2), ValueError,
         r"min_prob = 0.2 is too large for K = 10 classes"),
        (lambda: ak.CE(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\], got -0.1"),
        (lambda: ak.CE(label_smoothing=float("nan")), ValueError, r"label_smoothing must be finite"),
        (lambda: F.ce(z10, y10, label_smoothing=1.5), ValueError, r"label_smoothing must be in"),
        (lambda: F.ce(z10, y10, weight=torch.ones(9)), ValueError, r"weight has 9 entries but the input has K = 10"),
        (lambda: F.ce(z10, y10, weight=torch.ones(10, dtype=torch.long)), ValueError, r"1-D floating tensor"),
        (lambda: F.ce(z10, y10, weight=torch.ones(10, device="meta")), ValueError, r"weight is on meta"),
        (lambda: ak.CE(weight=[1.0] * 10), TypeError, r"weight must be a tensor"),
        (lambda: F.ce(z10, torch.rand(4, 9)), ValueError, r"probability targets must have the input's shape"),
        (lambda: F.ce(z10, y10.double()), ValueError, r"class indices must be an integer tensor: use target.long\(\)"),
        (lambda: ak.NCE(gamma=0.5), TypeError, r"unexpected parameter\(s\) gamma; it accepts: scale"),
        (lambda: ak.NCE(official_grad=True), TypeError, r"unexpected parameter\(s\) official_grad"),
        (lambda: ak.NCEMAE(1.0, 1.0, 1.0), TypeError, r"takes at most 2 parameters"),
        (lambda: ak.NCEMAE(1.0, alpha=2.0), TypeError, r"multiple values for alpha"),
        (lambda: ak.get_loss("nce+foo"), ValueError, r"unknown loss 'nce\+foo'; available: ce, fl"),
        (lambda: ak.APLLoss("mae", "nce"), ValueError, r"unknown loss 'mae\+nce'"),
        (lambda: ak.NCE(reduction="avg"), ValueError, r"reduction must be one of mean, sum, none; got 'avg'"),
        (lambda: F.nce(z10, y10, reduction="avg"), ValueError, r"reduction must be one of"),
        (lambda: ak.NCE(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
        (lambda: ak.FL(official_grad=1), TypeError, r"official_grad must be a bool"),
    ],
)
def test_bad_input_raises_with_a_message_that_names_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_out_of_range_target_in_spatial_input_names_its_position():
    y = torch.zeros(2, 3, dtype=torch.long)
    y[1, 2] = 7
    with pytest.raises(ValueError, match=r"target 7 at flat position 5 is outside \[0, 4\)"):
        F.nce_mae(torch.randn(2, 4, 3), y)


def test_ignore_index_is_not_out_of_range():
    y = torch.tensor([0, 255, 2, 3])
    assert torch.isfinite(F.nce(z10, y, ignore_index=255))
    with pytest.raises(ValueError, match="outside"):
        F.nce(z10, y)


def test_integer_target_dtypes_are_accepted():
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(F.nce(z10, y10.to(dtype)), F.nce(z10, y10))


def test_autocast_returns_float32_like_cross_entropy(seed):
    z = random_logits(6, 10, seed, dtype=torch.float32)
    y = random_target(6, 10, seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(z, torch.eye(10))  # bfloat16 under autocast
        assert logits.dtype == torch.bfloat16
        assert torch.nn.functional.cross_entropy(logits, y).dtype == torch.float32
        for backend in ak.available_backends("cpu"):
            loss = ak.NCERCE(backend=backend)(logits, y)
            assert loss.dtype == torch.float32, backend
            # the float32 value, not a bfloat16 rounding of it
            torch.testing.assert_close(loss, ak.NCERCE(backend="torch")(logits.float(), y), rtol=1e-6, atol=0)
    assert ak.NCERCE()(z.bfloat16(), y).dtype == torch.bfloat16  # outside autocast: the input's dtype


@pytest.mark.parametrize("name", available_losses())
def test_every_public_form_documents_itself(name):
    """help() shows the loss's formula, every parameter with its default, the options, shapes and
    an example, for modules and functions alike."""
    function = getattr(F, name.replace("+", "_"))
    forms = [function, ak.get_loss(name).__class__] if name in MODULES else [function]
    for form in forms:
        doc = form.__doc__
        for word in ("Args:", "reduction", "ignore_index", "label_smoothing", "weight", "backend", "Shapes:",
                     "Example::", "Default:"):
            assert word in doc, (name, form, word)
        for param, default in ak.catalogue.accepted_params(name).items():
            assert f"{param}: " in doc and f"Default: {default!r}" in doc, (name, param)
    assert str(inspect.signature(function)).startswith("(input, target")


def test_functional_stub_matches_the_catalogue():
    """functional.pyi spells the generated functions out for editors: regenerate it with
    `python -c "import apl_kernels.functional as F; F.write_stub()"` when the catalogue changes."""
    from pathlib import Path

    stub = Path(F.__file__).with_suffix(".pyi")
    assert stub.read_text() == F.stub(), "functional.pyi is stale: run apl_kernels.functional.write_stub()"


def test_named_modules_cover_the_catalogue():
    assert set(MODULES) == set(ak.catalogue.SINGLES) | set(NAMED_PAIRS)


def test_importing_the_package_leaves_dynamo_and_the_linear_loss_for_first_use():
    """``import apl_kernels`` and a loss module's call do not import Dynamo (seconds at start-up);
    the linear + loss's names load on first use, as the same objects as ``apl_kernels.linear``'s."""
    import subprocess
    import sys

    code = ("import sys, torch, apl_kernels as ak\n"
            "ak.NCEMAE(1.0, 1.0)(torch.randn(4, 10, requires_grad=True), torch.tensor([0, 1, 2, 9])).backward()\n"
            "assert 'torch._dynamo' not in sys.modules and 'apl_kernels.linear' not in sys.modules\n"
            "assert {'linear', 'linear_loss', 'LinearLoss', 'get_linear_loss'} <= set(dir(ak))\n"
            "from apl_kernels import LinearLoss\n"
            "import apl_kernels.linear as AL\n"
            "assert LinearLoss is AL.LinearLoss and ak.linear_loss is AL.linear_loss and ak.linear is AL\n"
            "assert ak.get_linear_loss is AL.get_linear_loss\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
