"""What every phase of the check shares: its budgets and plans, the Check being filled, progress lines."""

from __future__ import annotations

import os
import random
import re
import sys
import time
from pathlib import Path

import torch

from apl_kernels.testing.cases import is_interpreted


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
