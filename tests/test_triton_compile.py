"""The Triton kernels as a GPU would run them, compiled without one: in subprocesses without the
interpreter, a stub driver gives Triton's launcher an sm_80 or sm_90 target, and the ops' own host
code (their launch table, arguments and specialization) runs with ``launch`` compiling instead of
launching. What the compiled code must show: no register spill in any specialization the ops
launch, no 32-bit arithmetic on a row count or a stride (whose products pass 2^31), the same binary
whatever the arguments' values and layout, and Inductor's access analysis finding only the outputs
written. The kernels' math runs under the interpreter in test_triton_kernel.py and test_backends.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

from apl_kernels.backends import contract

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# Run in a subprocess without TRITON_INTERPRET: a stub driver gives Triton's launcher the target
# APL_TEST_ARCH (90 unless set), and the ops' own host code runs with launch compiling
# (JITFunction.run with warmup) instead of launching. call() makes R rows of K classes (R and K are
# specialized on their divisibility by 16: both kinds are launched), with or without class weights.
STUB_DRIVER = """
import json, os, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget

class StubDriver:
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0
    def get_current_target(self):
        return GPUTarget("cuda", int(os.environ.get("APL_TEST_ARCH", "90")), 32)
    def get_active_torch_device(self):
        return torch.device("cpu")

triton.runtime.driver.set_active(StubDriver())
from apl_kernels.backends import contract
from apl_kernels.backends.triton import ops as tb, tiles
from apl_kernels.catalogue import make_spec
from apl_kernels.options import CallOptions
tb.INTERPRETED = True  # the ops' checks then take CPU tensors
launches = []
wrapped_launch = tb.launch
tb.launch = lambda kernel, grid, *args, **meta: launches.append((kernel, grid, args, meta))

def call(name, dtype, k, target, reduction, grad_mode, ignore_index=-100, transposed=False, rows=4, weighted=False,
         target_grad=False, **params):
    launches.clear()
    dtype = getattr(torch, dtype)
    z = torch.empty(k, rows, dtype=dtype).t() if transposed else torch.empty(rows, k, dtype=dtype)
    y = torch.zeros(rows, k) if target == "probabilities" else torch.zeros(rows, dtype=torch.long)
    weight = torch.ones(k) if weighted else None
    options = CallOptions(reduction, ignore_index, label_smoothing=0.1 * (target == "smoothed"))
    args = contract.op_arguments(make_spec(name, **params), options, grad_mode, target_grad)
    tb.triton_loss(z, y, weight, *args)
    if grad_mode == contract.GRAD_IN_BACKWARD:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad_loss = torch.empty(rows if reduction == "none" else (), dtype=acc)
        tb.triton_loss_backward(z, y, weight, torch.empty(rows + 1, contract.STATS, dtype=acc), grad_loss, *args)
    return list(launches)

"""

RESOURCES = """
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def resources(kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (f.split(":") for f in out.split("Function")[1].split() if ":" in f)
            if value.isdigit()}
"""

COMPILE_SCRIPT = STUB_DRIVER + RESOURCES + """
def compile_all(config):
    return [(kernel, kernel.run(*args, grid=grid, warmup=True, **meta), meta)
            for kernel, grid, args, meta in call(*config)]

for config in json.loads(sys.argv[1]):
    for kernel, binary, meta in compile_all(config):
        print(json.dumps({"config": config, "kernel": kernel.fn.__name__, "warps": meta["num_warps"],
                          "block": meta["BLOCK_K"], "rows": meta["ROWS"], **resources(binary)}), flush=True)
# Floats, ignore_index and the logits' layout never change the specialization: weights and gamma
# of 0.0 (whose bits would otherwise be an i32), ignore_index 1 (an int equal to 1 would otherwise
# be a constant), transposed logits (whose loads would otherwise not be vectorized like contiguous
# ones, so that their sums would be taken in another order).
kernels = (tb.forward_kernel, tb.backward_kernel)
for kernel in kernels:  # the names match the parameters (a misspelt one would be ignored)
    assert {p.name for p in kernel.params if p.do_not_specialize} == set(tiles.UNSPECIALIZED), kernel.do_not_specialize
    assert {p.name for p in kernel.params if p.do_not_specialize_on_alignment} == set(tiles.UNALIGNED)
binaries = lambda: sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())
before = binaries()
variants = (({"gamma": 0.0, "alpha": 0.0}, 1, True), ({"gamma": 3.5, "beta": 1e-300}, -2**40, False))
for params, ignore_index, transposed in variants:
    config = json.loads(sys.argv[1])[0]
    for kernel, grid, args, meta in call(*config, ignore_index=ignore_index, transposed=transposed, **params):
        kernel.run(*args, grid=grid, warmup=True, **meta)
assert binaries() == before, (before, binaries())
# What torch.compile traces first: the triton_ops on fake CUDA tensors, through wrap_triton's HOP.
from torch._subclasses.fake_tensor import FakeTensorMode
tb.launch = wrapped_launch
with FakeTensorMode():
    z = torch.empty(64, 1000, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(64, dtype=torch.long, device="cuda")
    for reduction, shape in (("none", (64,)), ("mean", ())):
        args = contract.op_arguments(make_spec("nfl+rce"), CallOptions(reduction), contract.GRAD_IN_BACKWARD)
        loss, stats = torch.ops.apl.triton_loss(z, y, None, *args)
        assert loss.shape == shape and loss.dtype == torch.float32 and stats.shape == (65, contract.STATS)
        grad = torch.ops.apl.triton_loss_backward(z, y, None, stats, torch.ones(shape, device="cuda"), *args)
        assert grad.shape == z.shape and grad.dtype == z.dtype and grad.device.type == "cuda"
print("stable and traced ok")
"""


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def start_script(script: str, *args: str, arch: int = 90) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**subprocess_env(), "APL_TEST_ARCH": str(arch)})


def finish_script(process: subprocess.Popen) -> str:
    try:
        out, err = process.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, err[-6000:]
    return out


def run_script(script: str, *args: str, arch: int = 90) -> str:
    return finish_script(start_script(script, *args, arch=arch))


has_ptxas = pytest.mark.skipif(not (TRITON_BIN / "ptxas").exists() and shutil.which("ptxas") is None,
                               reason="no ptxas to compile for a GPU")

# The specializations that matter, with the heaviest losses: each on-chip limit of the launch table
# (float32 one-hot, dense, float64), chunked vocabulary-sized rows, small rows tiled several to a
# program, the gradient in forward, an evaluation forward: (name, dtype, K, target, reduction,
# grad mode).
COMPILE_CONFIGS = [
    ("nfl+nnfl", "float32", 8000, "index", "mean", contract.GRAD_IN_BACKWARD),
    ("nfl+nnfl", "bfloat16", 50257, "index", "mean", contract.GRAD_IN_BACKWARD),
    ("nfl+nnfl", "float64", 2000, "index", "sum", contract.GRAD_IN_BACKWARD),
    ("nfl+rce", "float64", 50000, "index", "mean", contract.GRAD_IN_BACKWARD),
    ("nfl+rce", "float32", 4000, "probabilities", "mean", contract.GRAD_IN_BACKWARD),
    ("nce+aul", "float16", 10, "index", "none", contract.GRAD_IN_BACKWARD),
    ("fl+nrce", "float32", 1000, "smoothed", "sum", contract.GRAD_IN_FORWARD),
    ("ce", "float64", 50000, "index", "mean", contract.NO_GRAD),
    ("nce+anorm", "float64", 2000, "smoothed", "mean", contract.GRAD_IN_BACKWARD),
]


@pytest.mark.skipif(CUDA, reason="on a GPU every other test compiles and runs the kernels")
@has_ptxas
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter runs the kernels' Python, not Triton's compiler: compile the main
    specializations to sm_90 cubins through the ops' own host code, check that none spills from
    register pressure, that argument values do not change the specialization, and that the ops
    trace on fake CUDA tensors as torch.compile traces them."""
    out = run_script(COMPILE_SCRIPT, json.dumps(COMPILE_CONFIGS))
    kernels = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(kernels) == sum(1 + (c[-1] == contract.GRAD_IN_BACKWARD) for c in COMPILE_CONFIGS), out
    assert "stable and traced ok" in out, out
    for kernel in kernels:
        cap = min(255, 65536 // (32 * kernel["warps"]))
        assert kernel["REG"] <= cap and kernel["LOCAL"] == 0, kernel
        # No spill from register pressure: ptxas may keep fewer registers than the cap and spill a
        # few bytes to fit one more program per SM (its occupancy choice), never spill at the cap.
        assert kernel["STACK"] == 0 or kernel["REG"] < cap, kernel


ACCESS_SCRIPT = STUB_DRIVER + """
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
for config in json.loads(sys.argv[1]):
    for kernel, grid, args, meta in call(*config):
        accesses = identify_accessed_tensors(kernel, {**dict(zip(kernel.arg_names, args)), **meta}, {})
        print(json.dumps([config, kernel.fn.__name__, sorted(d.name for d in accesses.read_writes.writes)]))
"""

ACCESS_CONFIGS = [
    (("nfl+rce", "float32", 100, "index", "mean", contract.GRAD_IN_BACKWARD),
     {"forward_kernel": ["counter_ptr", "loss_ptr", "partials_ptr", "saved_ptr"], "backward_kernel": ["grad_ptr"]}),
    (("nce+nnce", "bfloat16", 50000, "probabilities", "none", contract.GRAD_IN_BACKWARD),
     {"forward_kernel": ["loss_ptr", "saved_ptr"], "backward_kernel": ["grad_ptr"]}),
    (("nfl+rce", "float32", 50000, "index", "sum", contract.GRAD_IN_FORWARD),
     {"forward_kernel": ["counter_ptr", "loss_ptr", "partials_ptr", "saved_ptr"]}),
    (("ce", "float32", 10, "index", "none", contract.NO_GRAD), {"forward_kernel": ["loss_ptr"]}),
]


@pytest.mark.skipif(CUDA, reason="Inductor's analysis runs in every torch.compile test on a GPU")
def test_inductor_sees_only_the_outputs_written():
    """torch.compile clones every tensor a user kernel writes: Inductor's access analysis of the
    kernels (their TTIR for sm_90) must find the outputs written, never the logits or targets."""
    out = run_script(ACCESS_SCRIPT, json.dumps([config for config, _ in ACCESS_CONFIGS]))
    written = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    want = [(config, kernel, names) for config, kernels in ACCESS_CONFIGS for kernel, names in kernels.items()]
    assert [(tuple(c), k, w) for c, k, w in written] == want, out


# ---------------------------------------------------------------- the audit: every kind of launch, sm_80 and sm_90

AUDIT_SCRIPT = STUB_DRIVER + RESOURCES + """
ttir = sys.argv[2] if len(sys.argv) > 2 else None
for i, (name, dtype, k, target, reduction, grad_mode, extra) in enumerate(json.loads(sys.argv[1])):
    for kernel, grid, args, meta in call(name, dtype, k, target, reduction, grad_mode, **extra):
        binary = kernel.run(*args, grid=grid, warmup=True, **meta)
        if ttir:
            with open(os.path.join(ttir, f"{i}-{kernel.fn.__name__}.ttir"), "w") as f:
                f.write(binary.asm["ttir"])
        print(json.dumps({"config": [name, dtype, k, target, reduction, grad_mode, extra],
                          "kernel": kernel.fn.__name__, "warps": meta["num_warps"], "block": meta["BLOCK_K"],
                          "rows": meta["ROWS"], **resources(binary)}), flush=True)
"""

GIB, GIF, NO_GRAD = contract.GRAD_IN_BACKWARD, contract.GRAD_IN_FORWARD, contract.NO_GRAD
W, R64 = {"weighted": True}, {"rows": 64}
# What the ops launch, a representative of each kind: each K class of the launch table (several rows
# a program at 2, 10, 100; 200 and 500, a few; one or two at 1000; the on-chip limits, 8000 one-hot
# and 4000 dense in float32, 2000 in float64; chunked at 128000), float32 / bfloat16 / float64
# accumulation, labels, smoothed labels and probabilities, class weights or not, R and K divisible
# by 16 or not, every gradient mode, with the losses that hold the most per row and per element
# (the focal pairs, fl+nrce, agce, fl: the most registers at K = 100 in docs/kernels.md's audit).
AUDIT_CONFIGS = [
    ("nfl+nnfl", "float32", 2, "index", "mean", GIB, R64),
    ("fl", "bfloat16", 2, "smoothed", "sum", GIF, W),
    ("nfl+nnfl", "float64", 10, "index", "sum", GIB, R64),
    ("agce", "float32", 10, "smoothed", "mean", GIB, {}),
    ("fl+nrce", "bfloat16", 16, "probabilities", "mean", GIF, {}),
    ("nfl+nnfl", "float32", 100, "smoothed", "mean", GIF, {}),
    ("fl+nrce", "float32", 100, "index", "mean", GIB, W),
    ("nfl+nnfl", "float64", 100, "index", "mean", GIB, {}),
    ("nce+agce", "bfloat16", 100, "probabilities", "none", GIB, R64),
    ("nfl+nnfl", "float32", 200, "index", "sum", GIF, {}),
    ("fl+nrce", "float64", 500, "smoothed", "mean", GIB, W),
    ("nfl+nnfl", "bfloat16", 1000, "index", "mean", GIB, R64),
    ("fl+nrce", "float32", 1000, "smoothed", "sum", GIF, {}),
    ("nfl+nnfl", "float32", 8000, "index", "mean", GIB, {}),
    ("nfl+rce", "float32", 4000, "probabilities", "mean", GIB, {}),
    ("nfl+nnfl", "float64", 2000, "index", "sum", GIF, {}),
    ("nfl+nnfl", "bfloat16", 128000, "index", "mean", GIB, R64),
    ("nce+agce", "float64", 128000, "smoothed", "mean", GIF, W),
    ("nfl+rce", "float32", 128000, "probabilities", "sum", GIB, {}),
    # chunk loops where ptxas, without the register budget, traded a spill for occupancy
    ("agce", "float32", 128000, "smoothed", "mean", GIF, W),
    ("aul", "bfloat16", 128000, "smoothed", "mean", GIB, W),
    ("nfl+nnfl", "float64", 128000, "smoothed", "mean", GIF, W),
    ("fl+nrce", "float64", 128000, "index", "mean", GIF, W),
    ("fl+nrce", "float32", 128000, "index", "mean", GIB, W),
    ("nce+agce", "bfloat16", 128000, "probabilities", "mean", GIB, {}),
    ("ce", "float32", 128000, "index", "mean", NO_GRAD, {}),
    ("ce", "float64", 10, "index", "none", NO_GRAD, {}),
    # The split family's dense rows take two elements a class (anorm's V and W).
    ("nce+anorm", "float64", 1024, "probabilities", "mean", GIB, {}),
    ("nce+anorm", "float32", 1000, "smoothed", "sum", GIF, {}),
    # The probability targets' gradient (TARGET_GRAD): one more element a class in the gradient's
    # tiles (the split family's V - W: two) and one more sum (its sum W).
    ("nce+anorm", "float32", 4000, "probabilities", "mean", GIB, {"target_grad": True}),
    ("nce+anorm", "bfloat16", 100, "probabilities", "none", GIF, {"target_grad": True, **R64}),
    ("nce+anorm", "float64", 2000, "probabilities", "sum", GIB, {"target_grad": True, **W}),
    ("nce+anorm", "float32", 128000, "probabilities", "mean", GIF, {"target_grad": True, **W}),
    ("nfl+nnfl", "bfloat16", 128000, "probabilities", "mean", GIB, {"target_grad": True}),
]


@pytest.mark.skipif(CUDA, reason="on a GPU every other test compiles the kernels for it")
@has_ptxas
def test_no_launched_specialization_spills_on_sm80_or_sm90():
    """Every kind of launch the ops make, compiled for sm_80 and sm_90 (one process each, at once):
    registers within the cap of the program's warps (65536 / (32 warps), at most 255), no stack
    frame (a spill is stored there, so none either) and no local memory."""
    processes = {arch: start_script(AUDIT_SCRIPT, json.dumps(AUDIT_CONFIGS), arch=arch) for arch in (80, 90)}
    for arch, process in processes.items():
        out = finish_script(process)
        kernels = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(kernels) == sum(1 + (c[5] == GIB) for c in AUDIT_CONFIGS), out
        for kernel in kernels:
            cap = min(255, 65536 // (32 * kernel["warps"]))
            where = (arch, AUDIT_CONFIGS.index(tuple(kernel["config"][:6]) + (kernel["config"][6],)), kernel["kernel"])
            assert kernel["REG"] <= cap and kernel["LOCAL"] == 0 and kernel["STACK"] == 0, (where, kernel)


# ---------------------------------------------------------------- 64-bit offsets

# The kernel arguments that count rows or elements: Triton passes an int below 2^31 as an i32, and a
# product of one (R STATS, a stride times a row or a class) passes 2^31 long before the value does.
WIDE_ARGUMENTS = ("R", "stride_row", "stride_col", "stride_target_row", "stride_target_col", "stride_upstream")
_NAME = r"%[\w.]+"  # an SSA value; "%x#2", the third result of %x, counts as %x


def narrow_arithmetic(ttir: str) -> list[str]:
    """The i32 multiplications and additions in a kernel's TTIR that take a value computed from
    WIDE_ARGUMENTS. A value is computed from them if an operand of the operation that defines it
    is (a loop's induction variable from its bounds, an iter_arg from its initial value); what a
    load returns and what a comparison says are data, not offsets."""
    derived = {f"%{name}" for name in WIDE_ARGUMENTS}
    lines = [line.split(" loc(")[0].strip() for line in ttir.splitlines()]

    def uses(text):
        return bool(derived.intersection(re.findall(_NAME, text)))

    while True:
        count = len(derived)
        for line in lines:
            defined = re.match(rf"({_NAME})(?::\d+)?\s*=\s*(.*)", line)
            if not defined or re.search(r"tt\.load|arith\.cmpi", line):
                continue
            loop = re.search(rf"scf\.for ({_NAME}) = (.*?) step (\S+)(?: iter_args\((.*?)\))?", line)
            if loop:
                if uses(loop.group(2) + " " + loop.group(3)):
                    derived.add(loop.group(1))
                initial = re.findall(rf"({_NAME}) = ({_NAME})", loop.group(4) or "")
                derived.update(arg for arg, value in initial if value in derived)
                if any(value in derived for _, value in initial):
                    derived.add(defined.group(1))
            elif uses(defined.group(2)):
                derived.add(defined.group(1))
        if len(derived) == count:
            break
    return [line for line in lines if re.search(r"arith\.(muli|addi) ", line)
            and re.search(r":\s*(i32|tensor<[\dx]*xi32>)$", line) and uses(line.split("=", 1)[1])]


def test_narrow_arithmetic_finds_32_bit_products_of_row_counts():
    ttir = """
    %R: i32 loc("R"(#loc)), %K: i32 loc("K"(#loc))
    %0 = arith.muli %R, %c8_i32 : i32 loc(#loc1)
    %1 = arith.extsi %R : i32 to i64 loc(#loc2)
    %2 = arith.muli %1, %c8_i64 : i64 loc(#loc3)
    %3 = arith.muli %K, %c8_i32 : i32 loc(#loc4)
    %x:2 = scf.for %i = %c0_i32 to %R step %c1_i32 iter_args(%a = %K, %b = %3) -> (i32, i32)  : i32 {
      %4 = arith.addi %i, %a : tensor<16xi32> loc(#loc5)
      %5 = tt.load %p : tensor<16x!tt.ptr<i32>> loc(#loc6)
      %6 = arith.muli %5, %b : tensor<16xi32> loc(#loc7)
    }
    %7 = arith.muli %x#1, %c2_i32 : i32 loc(#loc8)
    """
    assert narrow_arithmetic(ttir) == ["%0 = arith.muli %R, %c8_i32 : i32", "%4 = arith.addi %i, %a : tensor<16xi32>"]


# Every path of the kernels: on chip and chunked, labels, smoothed labels, probabilities, weights,
# each reduction and gradient mode (AUDIT_CONFIGS's, so that Triton's cache serves either test).
OFFSET_CONFIGS = [AUDIT_CONFIGS[i] for i in (0, 1, 4, 7, 8, 16, 17, 18, 19, 20)]


@pytest.mark.skipif(CUDA, reason="reads the kernels compiled offline")
@has_ptxas
def test_no_offset_is_computed_in_32_bits(tmp_path):
    """R, the rows' count, is an i32 below 2^31 rows, and so are strides: every offset computed from
    them is computed in 64 bits (R STATS, where the mean's divisor is stored and read, passes 2^31
    from 2^28 rows). Products of the classes' count K or of a class index stay below K plus a chunk."""
    out = run_script(AUDIT_SCRIPT, json.dumps(OFFSET_CONFIGS), str(tmp_path))
    files = sorted(tmp_path.glob("*.ttir"))
    assert len(files) == sum(1 + (c[5] == GIB) for c in OFFSET_CONFIGS), out
    for path in files:
        assert narrow_arithmetic(path.read_text()) == [], path.name
