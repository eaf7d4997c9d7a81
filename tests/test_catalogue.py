"""The catalogue is the one list of base losses and parameters: the C++/CUDA header, the fused ops'
contract and the docs follow it (checked here), so adding a loss touches the few files
CONTRIBUTING.md names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import apl_kernels as ak
from apl_kernels import backends
from apl_kernels.backends import contract
from apl_kernels.testing import cases, formulas
from apl_kernels.catalogue import BASE_LOSSES, BASES, FAMILIES, PARAMETERS, make_spec
from apl_kernels.options import CallOptions

ROOT = Path(__file__).resolve().parent.parent


def header(name: str) -> str:
    return (ROOT / "csrc" / name).read_text()


def test_the_generated_header_is_current():
    """csrc/apl_catalogue.h (the C++ enum of bases, their families, the ops' positions and codes)
    is generated from the catalogue and the contract: regenerate it with
    `python -m apl_kernels.backends.contract` after changing either."""
    assert header("apl_catalogue.h") == contract.header()


def test_the_generated_header_follows_the_catalogue():
    text = contract.header()
    enum = re.search(r"enum Base : int \{(.*?)\};", text, re.S).group(1)
    assert [item.strip() for item in enum.split(",") if item.strip()] == (
        [f"k{name.upper()} = {i}" for i, name in enumerate(BASE_LOSSES)] + [f"kNumBases = {len(BASES)}"])
    assert re.findall(r"X\((\w+)\)", text[text.index("#define APL_BASES"):]) == [b.upper() for b in BASE_LOSSES]
    cases = dict(re.findall(r"case k(\w+): return k(\w+);", text))
    assert cases == {base.name.upper(): base.family.title() for base in BASES}
    assert f"kNumCoefficients = {len(PARAMETERS) + 1}" in text and f"kStats = {contract.STATS};" in text


def test_no_kernel_switch_falls_through_to_a_base():
    """Every dispatch over bases in C++ is made from APL_BASES: no hand-written case list, and no
    `default:` that computes some base's loss for an index it does not know."""
    for name in ("apl_rowmath.h", "apl_cpu.cpp", "apl_op.h", "apl_cuda_rows.h", "apl_cuda.cu"):
        text = header(name)
        assert not re.search(r"default:.*k[A-Z]+\b", text), name
        assert not re.search(r"case k(" + "|".join(b.upper() for b in BASE_LOSSES) + r"):", text), name


def test_the_ops_coefficients_and_options_are_the_contracts():
    spec = make_spec("nfl+nnfl", alpha=2.0, gamma=1.5, min_prob=1e-5)
    bases, coefficients, options = contract.op_arguments(spec, CallOptions("sum", 7, 0.25), contract.GRAD_IN_BACKWARD)
    assert bases == (BASE_LOSSES.index("nfl"), BASE_LOSSES.index("nnfl"))
    assert coefficients == (2.0, 1.0, 1.5, 0.7, 1.0, 1e-5, 0.25)  # weights, gamma, q, a, min_prob, smoothing
    assert options == (7, contract.REDUCTION_CODES["sum"], 0, contract.GRAD_IN_BACKWARD, 0)
    z, y = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)
    call = contract.decode(z, y, None, bases, coefficients, options)
    assert (call.bases, call.weights, call.gamma, call.q, call.a, call.min_prob, call.label_smoothing) == (
        bases, (2.0, 1.0), 1.5, 0.7, 1.0, 1e-5, 0.25)
    assert (call.ignore_index, call.reduction, call.official_grad, call.grad_mode, call.target_grad, call.dense) == (
        7, contract.REDUCTION_CODES["sum"], False, contract.GRAD_IN_BACKWARD, False, True)
    # The targets' gradient: for probability targets with a gradient mode only.
    *_, options = contract.op_arguments(spec, CallOptions("sum"), contract.GRAD_IN_FORWARD, target_grad=True)
    assert options[contract.TARGET_GRAD] == 1
    assert contract.decode(z, torch.rand(3, 4), None, bases, coefficients, options).target_grad
    for target, mode in ((y, contract.GRAD_IN_FORWARD), (torch.rand(3, 4), contract.NO_GRAD)):
        bad = list(options)
        bad[contract.GRAD_MODE] = mode
        with pytest.raises(ValueError, match="target_grad"):
            contract.decode(z, target, None, bases, coefficients, bad)


def test_the_mean_divisor_is_the_references_rule():
    """One rule for every path: the summed class weight of the counted rows (their number without
    weights; the number of rows for probabilities), 1 when that is 0; over the last row dimension."""
    y = torch.tensor([[0, 2, -100], [-100, -100, -100]])
    w = torch.tensor([0.5, 2.0, 3.0])
    assert contract.mean_divisor(y, None, -100, torch.float64).tolist() == [2.0, 1.0]
    assert contract.mean_divisor(y, w, -100, torch.float64).tolist() == [3.5, 1.0]
    assert contract.mean_divisor(y[0], w, 2, torch.float32).item() == 0.5 + 1  # -100 is a label (weight 1) here
    assert contract.mean_divisor(torch.rand(2, 5, 3), None, -100, torch.float32).tolist() == [5.0, 5.0]
    assert contract.mean_divisor(torch.rand(0, 3), w, -100, torch.float32).item() == 1.0


def test_every_base_has_a_module_a_reference_function_and_a_docs_entry():
    from apl_kernels.reference import BASE_FUNCTIONS

    docs = (ROOT / "docs" / "losses.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for base in BASES:
        assert getattr(ak, base.module).loss_name == base.name
        assert base.name in BASE_FUNCTIONS
        assert f"| `{base.name}` |" in docs and f"| `{base.name}` |" in readme, base.name


def backends_here() -> list[tuple[str, str]]:
    """(backend, device) of every registered backend on every device it serves here: taken from the
    registry, so that a backend added to it is held to every base too."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return [(name, device) for name, backend in backends.REGISTRY.items() for device in devices
            if backend.serves(device)]


@pytest.mark.parametrize("base", BASE_LOSSES)
@pytest.mark.parametrize("mode", ["index", "probabilities"])
def test_every_base_of_the_catalogue_is_computed_by_every_backend(base, mode, seed):
    """Each base of the catalogue (not a list of them: a base added to catalogue.BASES comes in by
    itself) on every backend that runs here, one-hot and dense rows: value and gradient against the
    independent formulas (apl_kernels.testing.formulas), which is what CONTRIBUTING.md's files
    must give. A base without its C++ element does not compile, one without its Triton element
    does not trace; one left out of the reference has no function: each fails here."""
    here = backends_here()
    assert {"torch", "cpp"} <= {name for name, _ in here}
    z = cases.random_logits(6, 7, seed)
    target, _ = cases.make_target(mode, 6, 7, seed)
    for name, device in here:
        # The tolerance rule of every parity test: against the reference in float64 (itself held to
        # the independent formulas here), with the formulas' magnitudes.
        cases.check_parity(z, target, base, {}, name, device)
        if name == "torch":
            value, grad = cases.run(z, target, base, {}, "torch")
            want_value, want_grad, grad_terms, sensitivities, value_terms = (
                torch.from_numpy(x) for x in formulas.loss_and_grad(z.numpy(), target.numpy(), base))
            cases.assert_parity(value, want_value, torch.maximum(value_terms + sensitivities, want_value.abs()),
                                torch.float64, 1, f"{base} reference value")
            cases.assert_parity(grad, want_grad, grad_terms, torch.float64, 1, f"{base} reference gradient")


@pytest.mark.parametrize("name,params,value,grad_sum", [
    ("anorm", {"a": 1.5, "p": 0.9}, 1.360013, 0.560523),
    ("anorm", {"a": 5.0, "p": 1.5}, 1.339005, 0.644944),
])
def test_split_family_anchors_on_every_backend(name, params, value, grad_sum):
    """docs/losses.md's ANorm anchors (the official ANL code, float64) on every backend here: the
    split family's one-hot rows (V at the label, W elsewhere) in every kernel."""
    from test_reference import ANCHOR_LOGITS, ANCHOR_TARGET
    for backend, device in backends_here():
        loss, grad = cases.run(ANCHOR_LOGITS.to(device), ANCHOR_TARGET.to(device), name, params, backend,
                               reduction="mean")
        assert abs(loss.item() - value) <= 5e-7, (backend, loss.item(), value)
        assert abs(grad.abs().sum().item() - grad_sum) <= 5e-7, (backend, grad.abs().sum().item(), grad_sum)
