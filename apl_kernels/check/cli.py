"""``python -m apl_kernels.check``: the phases in order, within the device's budget."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from apl_kernels.files import atomic_write_text
from apl_kernels.reproduce.store import WriteError, prepare_output
from .common import Check
from .environment import environment, load_backends
from .integration import integration
from .parity import parity
from .report import markdown, summary
from .speed import speed, training


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
    summary_line = sys.modules[__package__].__doc__.splitlines()[0]  # the package's docstring
    parser = argparse.ArgumentParser(prog="python -m apl_kernels.check", description=summary_line)
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
    report = args.out if args.out.suffix == ".md" else args.out / f"apl-check-{str(device).replace(':', '-')}.md"
    try:  # before any check runs: a report that cannot be written would be lost after them
        prepare_output(report.parent)
    except WriteError as err:
        print(f"apl_kernels.check: cannot write the report {report}: {err}", file=sys.stderr)
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


