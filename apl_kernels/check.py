"""Check this installation: the fused backends of one device against the reference, with torch, and their speed.

``python -m apl_kernels.check [--device cpu|cuda|cuda:N] [--quick] [--out DIR]``:

1. Environment: versions, compilers, CPU vector width, GPU, and which backends run on the device
   (and why the others do not).
2. Parity: every case of the test suite (``apl_kernels.testing.cases.LOSS_CASES``) on every fused
   backend of the device against the reference, held to the suite's tolerance rule.
3. Integration: ``torch.library.opcheck`` of the fused ops, ``torch.compile(fullgraph=True)`` of a
   small model with each fused backend, and on CUDA a CUDA-graph capture and replay.
4. Speed (not with ``--quick``): forward plus backward against the reference, ``torch.compile`` of
   it, ``F.cross_entropy`` and a copy of the same bytes; then CNN8's training throughput.

Writes ``apl-check-<device>.md`` into ``--out`` (or to ``--out`` itself, a path ending in ``.md``)
and prints its summary. Exit code 0 when everything ran passes, 1 when something failed, 2 without
the requested device. Every phase is budgeted by time (at most 5 minutes on a GPU); what a budget
cut is reported as not run. Inputs are fresh each
run; ``APL_TEST_SEED=<seed>`` (printed) repeats one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

# torch imports triton (when installed): main() makes sure TRITON_INTERPRET was set as the device
# needs before that (see there).
import apl_kernels as ak
from apl_kernels import backends, reference
from apl_kernels.backends import fused
from apl_kernels.catalogue import make_spec
from apl_kernels.files import atomic_write_text
from apl_kernels.options import CallOptions
from apl_kernels.testing.cases import (
    LOSS_CASES, SPEED_SHAPES, TARGET_MODES, case_id, check_parity, gradient_roundings, is_interpreted, make_target,
    random_logits, sample_inputs,
)

BUDGET_S = {"cuda": 280.0, "cpu": 600.0}  # on a GPU the whole command, imports included, within 5 minutes
QUICK_CPU_BUDGET_S = 165.0  # --quick on a 2-core CPU must end within 3 minutes
REPORT_RESERVE_S = 5.0

# Parity: one round per dtype (float32 first: a budget cut leaves the most useful ones done); within
# a round each case takes its K, target, upstream gradient and layout by rotation, so that over the
# cases every pair of them meets.
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
KS = (2, 10, 1000, 50257)
INTERPRETED_KS = (2, 10, 100, 1000)  # the interpreter runs the kernels' Python: small shapes only
ROWS = {2: 65, 10: 33, 100: 9, 1000: 9, 50257: 2}
INTERPRETED_ROWS = 4
# (reduction, upstream gradient): backward of loss.sum() (an expanded, stride-0 gradient of ones), a
# random upstream gradient, loss.backward() of a mean, and a sum scaled by 2.5.
UPSTREAMS = {"sum of none": ("none", "sum"), "random": ("none", None), "mean": ("mean", "sum"),
             "scaled sum": ("sum", 2.5)}
LAYOUTS = ("contiguous", "column-major")  # column-major logits keep their strides on the way to a GPU

SPEED_LOSSES = ("nce+mae", "nce+rce", "nfl+rce")
SPEED_DTYPES = (torch.float32, torch.bfloat16)
TRAIN_BATCH = 128


class Progress:
    """A tqdm bar on a terminal, otherwise a plain line every 15 s and at the end of a phase."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done, self.failed = phase, total, 0, 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=phase, file=sys.stderr, leave=False, dynamic_ncols=True)
        else:
            self._line()

    def _line(self) -> None:
        failed = f", {self.failed} failed" if self.failed else ""
        print(f"apl_kernels.check: {self.phase} {self.done}/{self.total}{failed} "
              f"({time.monotonic() - self.started:.0f} s)", file=sys.stderr, flush=True)
        self.last = time.monotonic()

    def step(self, note: str = "", failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix_str(note, refresh=False)
        elif time.monotonic() - self.last > 15:
            self._line()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()


class Check:
    """One run of the command: its device, budget, results and failures."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        self.device, self.quick = device, quick
        self.started = time.monotonic()
        budget = QUICK_CPU_BUDGET_S if quick and device.type == "cpu" else BUDGET_S[device.type]
        self.end = self.started + budget - REPORT_RESERVE_S
        self.seed = int(os.environ.get("APL_TEST_SEED", random.SystemRandom().randrange(2**31)))
        self.failures: list[str] = []
        self.environment: list[str] = []
        self.environment_summary: list[str] = []
        self.backend_rows: list[list[str]] = []
        self.fused: list[str] = []  # fused backends that run on the device here
        self.parity: dict[str, dict[str, list[int]]] = {}  # backend -> case id -> [passed, failed]
        self.parity_not_run: dict[str, int] = {}
        self.integration: list[list[str]] = []  # [check, backend, result, detail]
        self.speed_rows: list[list[str]] = []
        self.speed_notes: list[str] = []
        self.training_rows: list[list[str]] = []
        self.lost_device = ""  # why the GPU cannot run anything more, once it cannot

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def interpreted(self, backend: str) -> bool:
        return is_interpreted(self.device.type, backend)

    def timed(self) -> list[str]:
        """The fused backends worth timing (the interpreter is tested, never timed)."""
        return [b for b in self.fused if not self.interpreted(b)]

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def fail(self, line: str, progress: Progress | None = None) -> None:
        self.failures.append(line)
        (progress.write if progress else print)(f"FAIL {line}")
        if self.cuda and not self.lost_device:
            try:  # an illegal access or a device-side assert leaves the context unusable
                torch.cuda.synchronize(self.device)
            except RuntimeError as err:
                self.lost_device = f"the CUDA context is unusable after this failure ({short(err)})"


def short(err: BaseException, limit: int = 600) -> str:
    """One line: the error's type and start, and for torch.compile's errors the last frames of the
    user code it traced (where tracing stopped)."""
    message = str(err).split("from user code:")
    text = " ".join(message[0].split("  Hint:")[0].split())
    text = text[:limit] + ("..." if len(text) > limit else "")
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', "".join(message[1:]))
    traced = "; ".join(f"{Path(file).name}:{line} in {function}" for file, line, function in frames[-2:])
    return f"{type(err).__name__}: {text}{f' (traced to {traced})' if traced else ''}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------- 1. environment


def first_line(command: list[str], match: str = "") -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if match in line and line.strip()]
    return lines[0] if lines else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(check: Check) -> None:
    from torch.utils.cpp_extension import CUDA_HOME

    from apl_kernels.backends import cpp

    if torch.version.cuda:
        accelerator = f"CUDA {torch.version.cuda}"
    else:
        accelerator = f"ROCm {torch.version.hip}" if torch.version.hip else "no CUDA"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        triton = f"triton {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton = "triton: not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    compiler = os.environ.get("CXX", "c++")
    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    nvcc_version = first_line([str(nvcc), "--version"], "release") if nvcc and nvcc.is_file() else None
    lines = [
        f"Python {platform.python_version()} ({platform.system()} {platform.machine()}); apl_kernels "
        f"{ak.__version__} ({Path(ak.__file__).parent})",
        f"torch {torch.__version__} ({accelerator}{f', cuDNN {cudnn}' if cudnn else ''})",
        triton + (" (TRITON_INTERPRET=1: its kernels run under the interpreter on CPU tensors)" if interpret else ""),
        f"C++ compiler: {first_line([compiler, '--version']) or f'{compiler} not found'}",
        f"nvcc: {f'{nvcc_version} ({nvcc})' if nvcc_version else 'not found'}",
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch's vector width "
        f"{torch.backends.cpu.get_cpu_capability()} (the C++ kernel is built for {cpp._vector_flags()[0]})",
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings of a busy machine vary)",
        f"extension build cache: {os.environ.get('APL_KERNELS_BUILD_DIR') or Path.home() / '.cache' / 'apl_kernels'}",
    ]
    if check.cuda:
        p = torch.cuda.get_device_properties(check.device)
        lines.append(f"GPU {check.device}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{p.major}.{p.minor}, {p.multi_processor_count} SMs ({torch.cuda.device_count()} visible)")
    else:
        lines.append(f"GPU: {'none visible' if not torch.cuda.is_available() else 'not checked (--device cpu)'}")
    check.environment = lines
    check.environment_summary = [lines[1], lines[2], lines[-1]]  # torch, triton, GPU


def load_backends(check: Check) -> None:
    """Load every backend that serves the device (a first use compiles the extension) and say why
    the others cannot run. A backend missing its tools (no triton, no nvcc) is a fact of this
    machine; one that fails to build or load is a failure."""
    from apl_kernels.backends import cpp

    kind = check.device.type
    progress = Progress("loading backends (a first use compiles the C++/CUDA extension)", len(backends.REGISTRY))
    for name, backend in backends.REGISTRY.items():
        started = time.monotonic()
        if not backend.serves(kind):
            check.backend_rows.append([name, "no", f"serves {', '.join(backend.device_types())} tensors only"])
            progress.step(name)
            continue
        try:
            ok, why = backend.available(), backend.error
        except Exception as err:  # noqa: BLE001 - a loader's bug is reported, not raised
            ok, why = False, short(err)
        seconds = time.monotonic() - started
        if ok:
            how = " under the interpreter" if check.interpreted(name) else ""
            loaded = f", loaded in {seconds:.0f} s" if seconds >= 1 else ""
            check.backend_rows.append([name, "yes", f"available{how}{loaded}"])
            check.fused += [name] if name != "torch" else []
        else:
            missing_tools = (name == "cuda" and cpp.cuda_unavailable_reason() is not None) or (
                name == "triton" and importlib.util.find_spec("triton") is None)
            check.backend_rows.append([name, "no", why])
            if not missing_tools:
                check.fail(f"backend {name} cannot load on {kind}: {why}", progress)
        progress.step(name)
    progress.close()
    if not check.fused:
        check.fail(f"no fused backend runs on {kind} here: losses fall back to the PyTorch reference")


# ---------------------------------------------------------------- 2. parity


def parity_plan(check: Check, backend: str) -> list[tuple]:
    """(case index, dtype, rows, K, target mode, upstream, layout, ignore_index) of every check."""
    ks = INTERPRETED_KS if check.interpreted(backend) else KS
    plan = []
    for r, dtype in enumerate(DTYPES):
        for i in range(len(LOSS_CASES)):
            k = ks[(i + r) % len(ks)]
            if check.quick and k == KS[-1] and (r or i % 4):
                k = 1000  # --quick: the vocabulary size for a few cases (its float64 truth takes ~1 s here)
            mode = TARGET_MODES[(i // 4 + r) % len(TARGET_MODES)]
            if k > 100 and mode in ("smoothed", "probabilities"):
                mode = ("index", "weighted")[(i + r) % 2]  # the formulas are O(K^2) per row for those
            upstream = list(UPSTREAMS)[(i // 2 + r) % len(UPSTREAMS)]
            rows = INTERPRETED_ROWS if check.interpreted(backend) else ROWS[k]
            plan.append((i, dtype, rows, k, mode, upstream, LAYOUTS[(i // 3 + r) % 2], (-100, 0)[r % 2]))
    return plan


def parity_check(check: Check, backend: str, item: tuple, seed: int) -> None:
    i, dtype, n, k, mode, upstream_name, layout, ignore_index = item
    name, params = LOSS_CASES[i]
    z = random_logits(n, k, seed, dtype=dtype)
    if layout == "column-major":
        z = z.t().contiguous().t()
    target, options = make_target(mode, n, k, seed)
    if not target.is_floating_point():
        target[::5] = ignore_index  # with ignore_index 0, every label 0 is ignored too
        options["ignore_index"] = ignore_index
    reduction, upstream = UPSTREAMS[upstream_name]
    if upstream is None:
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    elif not isinstance(upstream, str):
        upstream = torch.tensor(upstream, dtype=dtype)
    roundings = gradient_roundings(check.device.type, backend, dtype, upstream)
    check_parity(z, target, name, params, backend, str(check.device), reduction, upstream, roundings, **options)


def parity(check: Check, deadline: float) -> None:
    """Each backend in turn, with an equal share of the time left (a fast one leaves its rest to the
    next; the Triton kernels compile each specialization on first use)."""
    for position, backend in enumerate(check.fused):
        plan = parity_plan(check, backend)
        own_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(check.fused) - position)
        progress = Progress(f"parity {backend}", len(plan))
        cases = check.parity[backend] = {}
        for j, (i, dtype, n, k, mode, upstream, layout, ignore_index) in enumerate(plan):
            if time.monotonic() > own_deadline or check.lost_device:
                check.parity_not_run[backend] = len(plan) - j
                break
            counts = cases.setdefault(case_id(LOSS_CASES[i]), [0, 0])
            failed = True
            try:
                parity_check(check, backend, plan[j], check.seed + j)
                failed = False
            except Exception as err:  # noqa: BLE001 - every failure is reported, then the next case runs
                check.fail(f"parity {backend} {case_id(LOSS_CASES[i])} {dtype_name(dtype)} ({n}, {k}) {layout}, "
                           f"{mode} targets, ignore_index {ignore_index}, upstream {upstream} "
                           f"(APL_TEST_SEED={check.seed}): {short(err)}", progress)
            counts[failed] += 1
            progress.step(case_id(LOSS_CASES[i]), failed)
        progress.close()


# ---------------------------------------------------------------- 3. integration


def small_problem(check: Check, backend: str):
    """A small model, a fused criterion and a batch, on the device."""
    g = torch.Generator().manual_seed(check.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10)).to(check.device)
    weight = (torch.rand(10, generator=g) + 0.5).to(check.device)
    criterion = ak.NFLRCE(1.0, 0.5, official_grad=True, weight=weight, label_smoothing=0.1, backend=backend)
    batches = [(torch.randn(64, 16, generator=g).to(check.device), torch.randint(0, 10, (64,), generator=g).to(
        check.device)) for _ in range(3)]
    return model, criterion, batches


def loss_and_grads(model, fn, x, y) -> list[torch.Tensor]:
    """The loss of ``fn(x, y)`` and the model's gradients, computed without touching ``.grad``."""
    loss = fn(x, y)
    return [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def opcheck(check: Check, backend: str) -> str:
    op = backends.resolve(backend, check.device.type).load().op
    mode = fused.GRAD_IN_FORWARD if backend == "cpp" else fused.GRAD_IN_BACKWARD
    samples = list(sample_inputs(str(check.device), mode))
    for index, args in enumerate(samples):
        try:
            torch.library.opcheck(op, args)
        except Exception as err:
            raise AssertionError(f"sample {index} of sample_inputs: {short(err)}") from None
    return f"{op}, {len(samples)} samples"


def compiled_matches_eager(check: Check, backend: str) -> str:
    """The first call is the compiled one, as in a user's compiled training step."""
    model, criterion, batches = small_problem(check, backend)
    torch._dynamo.reset()

    def forward(x, y):
        return criterion(model(x), y)

    compiled = torch.compile(forward, fullgraph=True)
    for x, y in batches[:2]:
        try:
            got = loss_and_grads(model, compiled, x, y)
        except Exception as err:
            loss_and_grads(model, forward, x, y)  # raises here if the eager call fails too
            torch._dynamo.reset()
            try:
                loss_and_grads(model, torch.compile(forward, fullgraph=True), x, y)
                after = "compiles after one eager call"
            except Exception:  # noqa: BLE001
                after = "fails after an eager call too"
            raise AssertionError(f"fails when compiled before any eager call ({after}): {short(err)}") from None
        assert_close(got, loss_and_grads(model, forward, x, y))
    return "loss and gradients of a compiled Linear-ReLU-Linear + NFL+RCE match eager on 2 batches"


def graph_matches_eager(check: Check, backend: str) -> str:
    """Capture forward plus backward in a CUDA graph (warmed up on a side stream, as
    torch.cuda.graph's documentation does), replay it on new data, compare with eager."""
    model, criterion, batches = small_problem(check, backend)
    static_x, static_y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream(check.device)
    side.wait_stream(torch.cuda.current_stream(check.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            criterion(model(static_x), static_y).backward()
    torch.cuda.current_stream(check.device).wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = criterion(model(static_x), static_y)
        static_loss.backward()
    for x, y in batches[1:]:  # two replays: the second finds what the first left (counters, buffers)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize(check.device)
        got = [static_loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]
        assert_close(got, loss_and_grads(model, lambda a, b: criterion(model(a), b), x, y))
    return "forward plus backward captured once, replayed on 2 new batches, match eager"


def integration(check: Check) -> None:
    checks = [("opcheck", b, opcheck) for b in check.fused]
    checks += [("torch.compile(fullgraph=True)", b, compiled_matches_eager) for b in check.fused]
    if check.cuda:
        checks += [("CUDA graph", b, graph_matches_eager) for b in check.fused]
    progress = Progress("integration", len(checks))
    for what, backend, fn in checks:
        started = time.monotonic()
        if check.lost_device:
            check.integration.append([what, backend, "not run", check.lost_device])
        elif what.startswith("torch.compile") and check.interpreted(backend):
            # Under the interpreter the op is opaque to torch.compile (it cannot trace interpreted
            # kernels): the GPU run covers it.
            check.integration.append([what, backend, "not run", "the interpreter's kernels cannot be traced"])
        else:
            try:
                detail = fn(check, backend)
                check.integration.append([what, backend, "ok", f"{detail} ({time.monotonic() - started:.0f} s)"])
            except Exception as err:  # noqa: BLE001
                check.integration.append([what, backend, "FAIL", short(err)])
                check.fail(f"{what} {backend}: {short(err)}", progress)
        progress.step(f"{what} {backend}")
    progress.close()


# ---------------------------------------------------------------- 4. speed and training


def measure(check: Check, step, seconds: float) -> float:
    """Median seconds of ``step`` over batches of calls filling about ``seconds`` (one untimed
    call first: compilation, caches, the allocator)."""
    step()
    check.sync()
    started = time.perf_counter()
    step()
    check.sync()
    once = max(time.perf_counter() - started, 1e-7)
    calls = max(1, min(10000, int(seconds / 10 / once)))
    samples, end = [], time.perf_counter() + seconds
    while len(samples) < 3 or (time.perf_counter() < end and len(samples) < 10):
        started = time.perf_counter()
        for _ in range(calls):
            step()
        check.sync()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def peak_bytes(check: Check, step) -> int | None:
    """Memory one call allocates beyond what was allocated before it (CUDA only)."""
    if not check.cuda:
        return None
    check.sync()
    before = torch.cuda.memory_allocated(check.device)
    torch.cuda.reset_peak_memory_stats(check.device)
    step()
    check.sync()
    return torch.cuda.max_memory_allocated(check.device) - before


def reference_function(name: str):
    spec = make_spec(name)
    return lambda logits, target: reference.reference_loss(logits, target, None, spec, CallOptions())


def speed(check: Check, deadline: float) -> None:
    device = check.device
    g = torch.Generator(device=device).manual_seed(check.seed)
    combos = [(shape, dtype) for shape in SPEED_SHAPES[device.type] for dtype in SPEED_DTYPES]
    data = {(s, d): ((torch.randn(*s, generator=g, device=device) * 3).to(d),
                     torch.randint(0, s[1], (s[0],), generator=g, device=device)) for s, d in combos}
    compiled: dict = {}

    def function(impl: str, name: str, dtype):
        if impl in check.fused:
            return ak.get_loss(name, backend=impl)
        if impl == "eager":
            return reference_function(name)
        if impl == "F.cross_entropy":
            return nn.functional.cross_entropy
        if (name, dtype) not in compiled:  # compiled once per loss and dtype, outside the timings
            compiled[(name, dtype)] = torch.compile(reference_function(name), dynamic=True)
        return compiled[(name, dtype)]

    def step_of(impl: str, name: str, combo):
        logits, target = data[combo]
        if impl == "copy":
            destination = torch.empty_like(logits)
            return lambda: destination.copy_(logits)
        fn = function(impl, name, combo[1])
        return lambda: fn(logits.detach().requires_grad_(), target).backward()

    # Run in order of worth (a budget cut drops the last: compiled baselines), report by shape.
    items = [("copy", "", c) for c in combos]
    items += [(b, n, c) for b in check.timed() for c in combos for n in SPEED_LOSSES]
    items += [("F.cross_entropy", "", c) for c in combos]
    items += [(impl, n, c) for impl in ("eager", "torch.compile") for c in combos for n in SPEED_LOSSES]
    results: dict = {}
    progress = Progress("speed", len(items))
    for position, (impl, name, combo) in enumerate(items):
        if check.lost_device or time.monotonic() > deadline:
            check.speed_notes.append(f"{len(items) - position} of {len(items)} timings not run: "
                                     f"{check.lost_device or 'the time budget ran out'}")
            break
        seconds = min(2.0, max(0.05, (deadline - time.monotonic()) / (len(items) - position) / 2))
        try:
            if impl == "torch.compile" and (name, combo[1]) not in compiled and deadline - time.monotonic() < 30:
                raise TimeoutError("not run: too little time left to compile")
            step = step_of(impl, name, combo)
            results[(impl, name, combo)] = (measure(check, step, seconds), peak_bytes(check, step))
        except Exception as err:  # noqa: BLE001
            results[(impl, name, combo)] = short(err, 120)
            if impl in check.fused:
                check.fail(f"speed {impl} {name} {dtype_name(combo[1])} {combo[0]}: {short(err)}", progress)
        progress.step(f"{impl} {name} {combo[0][0]}x{combo[0][1]}")
    progress.close()
    for (n, k), dtype in combos:
        copy = results.get(("copy", "", ((n, k), dtype)))
        bytes_moved = 2 * n * k * dtype.itemsize + 8 * n  # read logits and labels, write the gradient
        for impl, name, combo in items:
            if combo != ((n, k), dtype) or (impl, name, combo) not in results:
                continue
            result, eager = results[(impl, name, combo)], results.get(("eager", name, combo))
            if isinstance(result, str):
                check.speed_rows.append([f"{n} x {k}", dtype_name(dtype), name, impl, result, "", "", "", ""])
                continue
            seconds, peak = result
            moved = 2 * n * k * dtype.itemsize if impl == "copy" else bytes_moved
            copy_rate = 2 * n * k * dtype.itemsize / copy[0] if isinstance(copy, tuple) else None
            fused_ratio = impl in check.fused and isinstance(eager, tuple)
            check.speed_rows.append([
                f"{n} x {k}", dtype_name(dtype), name or "-", impl, f"{seconds * 1e3:.3g}",
                f"{moved / seconds / 1e9:.3g}",
                f"{100 * moved / seconds / copy_rate:.0f} %" if copy_rate else "",
                f"{eager[0] / seconds:.2f}" if fused_ratio else "", "" if peak is None else f"{peak / 2**20:.1f}"])


def training(check: Check, deadline: float) -> None:
    """CNN8 (the paper's CIFAR-10 network) at batch 128, SGD as the reproduction trains it, on
    synthetic CIFAR-10-shaped data resident on the device: images per second per loss backend."""
    from apl_kernels.reproduce.models import CNN8
    from apl_kernels.reproduce.settings import training_settings

    settings = training_settings("cifar10")
    g = torch.Generator(device=check.device).manual_seed(check.seed)
    images = torch.randn(16 * TRAIN_BATCH, *CNN8.input_shape, generator=g, device=check.device)
    labels = torch.randint(0, 10, (images.shape[0],), generator=g, device=check.device)
    impls = ["torch"] + check.timed() + ["F.cross_entropy"]
    progress = Progress("training", len(impls))
    for position, impl in enumerate(impls):
        if check.lost_device or time.monotonic() > deadline:
            check.training_rows.append([impl, "not run (time budget)", "", ""])
            continue
        torch.manual_seed(check.seed)
        model = CNN8().to(check.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
        criterion = nn.CrossEntropyLoss() if impl == "F.cross_entropy" else ak.NCERCE(backend=impl)
        steps = [0]

        def step():
            start = steps[0] * TRAIN_BATCH % images.shape[0]
            steps[0] += 1
            loss = criterion(model(images[start:start + TRAIN_BATCH]), labels[start:start + TRAIN_BATCH])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()

        try:
            seconds = measure(check, step, (deadline - time.monotonic()) / (len(impls) - position) / 2)
            loss_name = "cross entropy" if impl == "F.cross_entropy" else "nce+rce"
            check.training_rows.append([impl, loss_name, f"{TRAIN_BATCH / seconds:.0f}", f"{seconds * 1e3:.1f}"])
        except Exception as err:  # noqa: BLE001
            check.training_rows.append([impl, "", short(err, 120), ""])
            if impl in check.fused:
                check.fail(f"training {impl}: {short(err)}", progress)
        progress.step(impl)
    progress.close()


# ---------------------------------------------------------------- 5. report


def summary(check: Check, report: Path) -> list[str]:
    elapsed = time.monotonic() - check.started
    verdict = "FAIL" if check.failures else "PASS"
    lines = [f"apl-kernels check on {check.device}{' (--quick)' if check.quick else ''}: {verdict} in "
             f"{elapsed:.0f} s, {len(check.failures)} failure(s); inputs from APL_TEST_SEED={check.seed}"]
    lines += check.environment_summary
    lines.append(f"backends on {check.device.type}: " + "; ".join(
        f"{name}: {why}" for name, _, why in check.backend_rows))
    for backend, cases in check.parity.items():
        passed, failed = sum(c[0] for c in cases.values()), sum(c[1] for c in cases.values())
        not_run = check.parity_not_run.get(backend, 0)
        lines.append(f"parity {backend}: {passed} passed, {failed} failed"
                     f"{f', {not_run} not run (time budget)' if not_run else ''}; {len(cases)} of "
                     f"{len(LOSS_CASES)} cases, float32, bfloat16, float64, K up to "
                     f"{max(INTERPRETED_KS if check.interpreted(backend) else KS)}")
    for what in dict.fromkeys(row[0] for row in check.integration):
        lines.append(f"{what}: " + ", ".join(f"{b} {result}" for w, b, result, _ in check.integration if w == what))
    if not check.cuda:
        lines.append("CUDA graph: not on CPU")
    if check.quick:
        lines.append("speed and training: not run (--quick)")
    else:
        for backend in check.timed():
            rows = [r for r in check.speed_rows if r[3] == backend and r[6]]
            if rows:
                shares = [int(r[6].rstrip(" %")) for r in rows]
                ratios = [float(r[7]) for r in rows if r[7]]
                lines.append(f"speed {backend} (forward plus backward, {len(rows)} timings): {min(shares)} to "
                             f"{max(shares)} % of copy bandwidth"
                             f"{f', {min(ratios):.1f} to {max(ratios):.1f} x eager' if ratios else ''}")
        copies = [float(r[5]) for r in check.speed_rows if r[3] == "copy"]
        if copies:
            lines.append(f"copy bandwidth measured: up to {max(copies):.1f} GB/s")
        lines += [f"speed: {note}" for note in check.speed_notes]
        lines.append("CNN8 training, images/s: " + ", ".join(f"{r[0]} {r[2]}" for r in check.training_rows))
    lines += [f"failure: {line}" for line in check.failures[:20]]
    if len(check.failures) > 20:
        lines.append(f"... and {len(check.failures) - 20} more failures in the report")
    lines.append(f"report: {report}")
    return lines


def markdown(check: Check, lines: list[str]) -> str:
    parts = [f"# apl-kernels check: {check.device}{' (--quick)' if check.quick else ''}", "## Summary",
             "\n".join(f"- {line}" for line in lines), "## Environment", "\n".join(f"- {e}" for e in check.environment),
             f"Backends on {check.device.type} tensors:", table(["backend", "runs here", "status"], check.backend_rows),
             "## Parity with the reference",
             "Each case of the test suite's `LOSS_CASES` (apl_kernels/testing/cases.py), held to its tolerance rule "
             "(`assert_parity`): value and gradient against the float64 reference on the same rounded inputs. "
             "Per case and backend: checks passed / run, over float32, bfloat16 and float64 with rotating K, index, "
             "weighted, smoothed and probability targets, ignore_index, upstream gradients (the stride-0 gradient "
             "of `.sum()`, random, mean, scaled sum) and contiguous or column-major logits."]
    backends_run = list(check.parity)
    rows = []
    for case in LOSS_CASES:
        cells = []
        for b in backends_run:
            passed, failed = check.parity[b].get(case_id(case), [0, 0])
            cells.append(f"{'FAIL' if failed else 'ok'} {passed}/{passed + failed}" if passed + failed else "not run")
        rows.append([case_id(case)] + cells)
    parts.append(table(["case"] + backends_run, rows) if backends_run else "No fused backend ran.")
    parts += ["## Integration", table(["check", "backend", "result", "detail"], check.integration)]
    if not check.quick:
        parts += ["## Speed: forward plus backward",
                  "Median time of one forward plus `backward()` (mean reduction, index targets); GB/s counts the bytes "
                  "a fused forward plus backward must move (read the logits and the labels, write the gradient: "
                  "`2·N·K·bytes + 8·N`), copy moves `2·N·K·bytes`; % of the copy's bandwidth at the same shape "
                  "and dtype, measured in this run; x eager: the reference's time over this one; peak: memory one "
                  "call allocates beyond its inputs (CUDA only).",
                  table(["N x K", "dtype", "loss", "impl", "median ms", "GB/s", "% of copy", "x eager", "peak MiB"],
                        check.speed_rows), "\n".join(f"- {note}" for note in check.speed_notes),
                  f"## Training throughput: CNN8, batch {TRAIN_BATCH}, synthetic CIFAR-10-shaped data on the device",
                  table(["loss backend", "loss", "images/s", "ms per step"], check.training_rows)]
    if check.failures:
        parts += ["## Failures", "\n".join(f"- {line}" for line in check.failures)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------- main


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apl_kernels.check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=parse_device, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--quick", action="store_true", help="environment, parity and integration; no timings")
    parser.add_argument("--out", type=Path, default=Path.cwd(),
                        help="the folder apl-check-<device>.md is written to, or the report's own path (*.md)")
    args = parser.parse_args(argv)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        name = "" if device.index is None else f" {device}"
        print(f"apl_kernels.check: no CUDA device{name} here (torch {torch.__version__}, {torch.cuda.device_count()} "
              f"visible): run `python -m apl_kernels.check --device cpu`", file=sys.stderr)
        return 2
    # On CPU the Triton kernels run under the interpreter, on a GPU they must be compiled: TRITON_INTERPRET
    # says which, and it must be set before triton is imported (torch imports it, and triton's own
    # @triton.jit functions, tl.max and tl.sum among them, are made then). Set here too late, the
    # command runs itself again with it set (or unset) from the start.
    wanted = "1" if device.type == "cpu" else None
    if os.environ.get("TRITON_INTERPRET") != wanted:
        if wanted:
            os.environ["TRITON_INTERPRET"] = wanted
        else:
            os.environ.pop("TRITON_INTERPRET", None)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "apl_kernels.check",
                                  *(sys.argv[1:] if argv is None else argv)])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")  # NumPy's, in interpreted code
    check = Check(device, args.quick)
    report = args.out if args.out.suffix == ".md" else args.out / f"apl-check-{str(device).replace(':', '-')}.md"
    environment(check)
    load_backends(check)
    integration_reserve = 60.0 if check.cuda else 45.0
    parity(check, time.monotonic() + (check.remaining() - integration_reserve) * (1.0 if args.quick else 0.5))
    integration(check)
    if not args.quick:
        speed(check, time.monotonic() + check.remaining() * 0.75)
        training(check, time.monotonic() + check.remaining())
    lines = summary(check, report)
    atomic_write_text(report, markdown(check, lines))
    print("\n".join(lines))
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
