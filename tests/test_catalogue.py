"""The catalogue is the one list of base losses and parameters: the C++/CUDA header, the fused ops'
contract and the docs follow it (checked here), so adding a loss touches the few files
CONTRIBUTING.md names."""

from __future__ import annotations

import re
from pathlib import Path

import apl_kernels as ak
from apl_kernels.backends import fused
from apl_kernels.catalogue import BASE_LOSSES, BASES, FAMILIES, PARAMETERS, make_spec
from apl_kernels.options import CallOptions

ROOT = Path(__file__).resolve().parent.parent


def header(name: str) -> str:
    return (ROOT / "csrc" / name).read_text()


def test_the_header_enum_is_the_catalogues_list():
    body = re.search(r"enum Base : int \{(.*?)\};", header("apl_rowmath.h"), re.S).group(1)
    names = [item.strip() for item in body.replace("\n", " ").split(",")]
    assert names[0] == "kCE = 0" and names[-1] == "kNumBases"
    assert [n.removesuffix(" = 0") for n in names[:-1]] == ["k" + name.upper() for name in BASE_LOSSES]


def test_the_header_families_are_the_catalogues():
    """apl_rowmath.h's Family enum and family_of switch follow catalogue.FAMILIES and each Base's
    family (the Triton kernels take theirs from the catalogue directly)."""
    text = header("apl_rowmath.h")
    enum = re.search(r"enum Family : int \{(.*?)\};", text, re.S).group(1)
    assert [item.strip().removesuffix(" = 0") for item in enum.split(",")] == ["k" + f.title() for f in FAMILIES]
    body = text[text.index("constexpr int family_of"):text.index("default: return kLocal")]
    cases = re.findall(r"((?:case k\w+:\s*)+)return k(\w+);", body)
    listed = {name[1:].lower(): family.lower() for labels, family in cases for name in re.findall(r"k\w+", labels)}
    assert {base.name: base.family for base in BASES} == {name: listed.get(name, "local") for name in BASE_LOSSES}


def test_the_ops_coefficients_and_stats_match_the_header():
    assert f"constexpr int kNumParameters = {len(PARAMETERS)};" in header("apl_op.h")
    assert f"constexpr int64_t kStats = {fused.STATS};" in header("apl_op.h")
    spec = make_spec("nfl+nnfl", alpha=2.0, gamma=1.5, min_prob=1e-5)
    bases, coefficients, options = fused.op_arguments(spec, CallOptions("sum", 7, 0.25), fused.GRAD_IN_BACKWARD)
    assert bases == (BASE_LOSSES.index("nfl"), BASE_LOSSES.index("nnfl"))
    assert coefficients == (2.0, 1.0, 1.5, 0.7, 1.0, 1e-5, 0.25)  # weights, gamma, q, a, min_prob, smoothing
    assert options == (7, fused.REDUCTION_CODES["sum"], 0, fused.GRAD_IN_BACKWARD)


def test_every_base_has_a_module_a_reference_function_and_a_docs_entry():
    from apl_kernels.reference import BASE_FUNCTIONS

    docs = (ROOT / "docs" / "losses.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for base in BASES:
        assert getattr(ak, base.module).loss_name == base.name
        assert base.name in BASE_FUNCTIONS
        assert f"| `{base.name}` |" in docs and f"| `{base.name}` |" in readme, base.name


def test_contributing_names_at_most_five_package_files_for_a_new_base_loss():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Adding a base loss"):]
    section = section[: section.find("\n## ", 3)] if "\n## " in section[3:] else section
    steps = re.findall(r"^\d+\. `((?:apl_kernels|csrc)/[\w/]+\.(?:py|h))`", section, re.M)  # the numbered steps
    files = set(steps)
    assert 0 < len(files) <= 5, files
    assert all((ROOT / f).exists() for f in files), files
