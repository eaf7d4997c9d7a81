"""``python -m apl_kernels.check``, as a user runs it: the quick CPU check passes here and its report
names every catalogue loss for the C++ backend; ``--device cuda`` without a GPU says so in one line.

The command runs in a subprocess with this session's environment, so it reuses the suite's
extension build (APL_KERNELS_BUILD_DIR), but without the suite's TRITON_INTERPRET=1, as in a
user's shell: the command must set it itself for CPU tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from apl_kernels.catalogue import available_losses


def run_check(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "apl_kernels.check", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=env)


def parity_table(report: str) -> dict[str, dict[str, str]]:
    """The report's parity table: case id -> backend -> cell."""
    section = report.split("## Parity")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_quick_cpu_check_passes_and_reports_every_loss(tmp_path):
    # --out as the report's own path, in a folder that does not exist yet (as bench/results/cpu-check.md)
    result = run_check("--device", "cpu", "--quick", "--out", str(tmp_path / "reports" / "cpu-check.md"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    report = (tmp_path / "reports" / "cpu-check.md").read_text()
    parity = parity_table(report)
    for name in available_losses():
        assert parity[name]["cpp"].startswith("ok"), (name, parity.get(name))
    summary = result.stdout.strip().splitlines()
    assert summary[0].startswith("apl-kernels check on cpu (--quick): PASS")
    # The same summary is printed and heads the report.
    assert "\n".join(f"- {line}" for line in summary) in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, --device cuda runs the GPU check")
def test_device_cuda_without_a_gpu_exits_2_in_one_line(tmp_path):
    result = run_check("--device", "cuda", "--out", str(tmp_path), cwd=tmp_path)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_unwritable_out_is_refused_in_one_line_before_any_check(tmp_path):
    # A path under a file can be written by no one (root included): refused at once with exit code 2,
    # as the other argument errors, not after the checks with an OSError traceback.
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "reports", tmp_path / "file" / "cpu-check.md"):
        result = run_check("--device", "cpu", "--quick", "--out", str(out), cwd=tmp_path)
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, lines
        assert "--out" in lines[0] and str(out) in lines[0] and "Traceback" not in lines[0], lines
