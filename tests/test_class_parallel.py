"""Class-parallel losses (apl_kernels.distributed): logits and classifier split over gloo process
groups of 2, 3 and 4 CPU processes with uneven splits (one rank holds a single class), against the
single-process losses on the whole logits, with the collectives of each call counted.

Each test starts one process group that runs many cases (tests/class_parallel_worker.py), under a
timeout: a collective that never completes fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apl_kernels.distributed import class_parallel
from apl_kernels.catalogue import available_losses, make_spec
from apl_kernels.testing.cases import LOSS_CASES, TARGET_MODES

WORKER = Path(__file__).with_name("class_parallel_worker.py")
TIMEOUT = 300  # seconds for a whole group's job (the collectives themselves time out after 60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(job: str, world: int, seed: int, tmp_path: Path) -> list[dict]:
    """Run ``job`` on ``world`` processes; their reports, rank by rank."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), job, str(r), str(world), str(port), str(seed),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and (tmp_path / f"rank{r}.json").exists(), f"rank {r} failed:\n{output[-3000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def assert_no_failures(reports: list[dict]) -> None:
    failures = [f for report in reports for f in report["failures"]]
    assert not failures, f"{sum(r['failed'] for r in reports)} failures, first ones:\n" + "\n".join(failures[:10])


def test_cases_cover_the_catalogue():
    """The parity jobs iterate testing.cases.LOSS_CASES: every catalogue loss and pair is in it."""
    assert {name for name, _ in LOSS_CASES} == set(available_losses())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_loss_matches_the_single_process_loss(world, seed, tmp_path):
    """Values and this rank's columns of the gradient equal the reference on the gathered logits
    (the suite's tolerance rule), every loss and pair, every target mode (index with an ignored row,
    smoothed, weighted, probabilities with weights and smoothing) dealt over the three group sizes,
    float64 and float32, reductions in turn; and each call makes exactly 2 all-reduces in forward and
    no collective in backward."""
    reports = run_group("parity", world, seed, tmp_path)
    assert_no_failures(reports)
    calls = sum((i + j) % 3 == world - 2 for i in range(len(LOSS_CASES)) for j in range(len(TARGET_MODES)))
    for report in reports:
        assert report["counts"] == {"(2, 0)": calls}


def test_linear_loss_matches_the_single_device_linear_loss(seed, tmp_path):
    """hidden's, the weight shard's and the bias shard's gradients and the value equal linear_loss on
    the whole classifier; 2 all-reduces in forward, 1 (hidden's gradient) in backward."""
    reports = run_group("linear", 3, seed, tmp_path)
    assert_no_failures(reports)
    for report in reports:
        assert report["counts"] == {"(2, 1)": 10}


def test_dtensor_logits_through_the_ordinary_losses(seed, tmp_path):
    """A DTensor sharded on the class dimension goes through apl_loss, the named functions and the
    modules with the explicit form's value and gradient; a replicated one is refused naming it."""
    assert_no_failures(run_group("dtensor", 3, seed, tmp_path))


def test_bad_input_raises_on_every_rank(seed, tmp_path):
    """Overlapping or gapped shards, disagreeing num_classes / parameters / official_grad /
    reduction, one rank's target out of range, a wrong weight slice: every rank raises a clear
    error (no hang), and the group then still computes a correct loss."""
    reports = run_group("errors", 2, seed, tmp_path)
    expected = {"overlap": "cover", "gap": "cover", "num_classes": "num_classes", "target": "outside [0",
                "params": "disagree", "official_grad": "disagree", "reduction": "disagree", "weight_size": "weight"}
    for rank, report in enumerate(reports):
        for label, text in expected.items():
            message = report["raised"][label]
            assert message is not None, f"rank {rank}: {label} was accepted"
            if label in ("target", "weight_size") and "invalid" in message:
                continue  # the rank without the bad input says which rank has it
            assert text in message, f"rank {rank} {label}: {message}"
        value, want = report["after"]
        assert abs(value - want) <= 1e-12 * max(1.0, abs(want))


def test_num_sums_and_backend_checked_without_a_group():
    """Refusals that need no process group: a fused backend name, and no torch.distributed."""
    assert class_parallel.num_sums(make_spec("nfl+nnfl")) == 4
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backend"):
        class_parallel.class_parallel_loss(z, torch.zeros(2, dtype=torch.long), "ce", class_offset=0, num_classes=3,
                                           backend="cpp")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            class_parallel.class_parallel_loss(z, torch.zeros(2, dtype=torch.long), "ce", class_offset=0,
                                               num_classes=3)
