"""Class-parallel losses (apl_kernels.distributed): logits and classifier split over gloo process
groups of 2, 3 and 4 CPU processes with uneven splits (one rank holds a single class), against the
single-process losses on the whole logits, with the collectives of each call counted.

Each test starts one process group that runs many cases (tests/class_parallel_worker.py), under a
timeout: a collective that never completes fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apl_kernels.distributed import class_parallel
from apl_kernels.catalogue import available_losses, make_spec
from apl_kernels.options import CallOptions
from apl_kernels.testing.cases import LOSS_CASES, TARGET_MODES

WORKER = Path(__file__).with_name("class_parallel_worker.py")
TIMEOUT = 600  # seconds for a whole group's jobs (the collectives themselves time out after 180)


def run_group(jobs: list[str], world: int, seeds: list[int], out: Path) -> list[dict]:
    """Run ``jobs`` for each seed on ``world`` processes; their reports, rank by rank ({job: [per seed]})."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    # The ranks meet in a file in ``out``, not at a TCP port (one found free can be taken before they meet).
    command = [sys.executable, str(WORKER), ",".join(jobs), "RANK", str(world), ",".join(map(str, seeds)), str(out)]
    procs = [subprocess.Popen([str(r) if a == "RANK" else a for a in command], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
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
        assert proc.returncode == 0 and (out / f"rank{r}.json").exists(), f"rank {r} failed:\n{output[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


# One process group per size runs every job of that size (starting processes dominates the time).
GROUP_JOBS = {2: ["parity", "errors"], 3: ["parity", "linear", "dtensor", "extras"], 4: ["parity"]}
_REPORTS: dict = {}


def reports_of(job: str, world: int, base_seed: int, tmp_path_factory) -> list[dict]:
    """The reports of ``job`` on the group of ``world`` processes (run once per base seed)."""
    key = (world, base_seed)
    if key not in _REPORTS:
        seed = (base_seed + 7919 * world) % 2**31
        _REPORTS[key] = run_group(GROUP_JOBS[world], world, [seed], tmp_path_factory.mktemp(f"group{world}"))
    return [report[job][0] for report in _REPORTS[key]]


def assert_no_failures(reports: list[dict]) -> None:
    failures = [f for report in reports for f in report["failures"]]
    assert not failures, f"{sum(r['failed'] for r in reports)} failures, first ones:\n" + "\n".join(failures[:10])


def test_cases_cover_the_catalogue():
    """The parity jobs iterate testing.cases.LOSS_CASES: every catalogue loss and pair is in it."""
    assert {name for name, _ in LOSS_CASES} == set(available_losses())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_loss_matches_the_single_process_loss(world, base_seed, tmp_path_factory):
    """Values and the gradient (each rank's columns, gathered) equal the reference on the whole
    logits within the suite's tolerance rule (the probability targets' gradient too, which they
    require), and the loss is the same on every rank: every loss
    and pair, every target mode (index with an ignored row, smoothed, weighted, probabilities with
    weights and smoothing) dealt over the three group sizes, float64 on 2 ranks, float32 on 3, both
    on 4, reductions in turn, uneven splits with a rank of one class, each with the fused C++ shard
    kernel and the PyTorch formulation; and each call makes exactly 2 all-reduces in forward and no
    collective in backward."""
    reports = reports_of("parity", world, base_seed, tmp_path_factory)
    assert_no_failures(reports)
    calls = 2 * sum((i + j) % 3 == world - 2 for i in range(len(LOSS_CASES)) for j in range(len(TARGET_MODES)))
    for report in reports:
        assert report["counts"] == {"(2, 0)": calls}


def test_linear_loss_matches_the_single_device_linear_loss(base_seed, tmp_path_factory):
    """hidden's, the weight shard's and the bias shard's gradients (and the probability targets') and
    the value equal linear_loss on the whole classifier (3 ranks, float64 and float32, chunks of 4
    rows, the fused C++ shard kernel and the PyTorch formulation); 2 all-reduces in forward, 1
    (hidden's gradient) in backward."""
    reports = reports_of("linear", 3, base_seed, tmp_path_factory)
    assert_no_failures(reports)
    for report in reports:
        assert report["counts"] == {"(2, 1)": 20}


def test_dtensor_logits_through_the_ordinary_losses(base_seed, tmp_path_factory):
    """A DTensor sharded on the class dimension goes through apl_loss, the named functions and the
    modules with the single-process value and gradient; a replicated one is refused naming the
    explicit form."""
    assert_no_failures(reports_of("dtensor", 3, base_seed, tmp_path_factory))


def test_spatial_noncontiguous_bfloat16_module_and_no_grad(base_seed, tmp_path_factory):
    """(N, K, d) logits, a non-contiguous shard, bfloat16 (returned and differentiated in bfloat16),
    the module form, a call without gradients, rows whose part on one rank is all masked (-inf)
    with negative logits elsewhere (both backends, float64 and float32): the single-process
    results; the call's inputs and sums released by backward (kept with retain_graph=True); and
    backward(create_graph=True) raises (first derivatives only)."""
    assert_no_failures(reports_of("extras", 3, base_seed, tmp_path_factory))


def test_bad_input_raises_on_every_rank(base_seed, tmp_path_factory):
    """Overlapping shards, shards short of num_classes, disagreeing num_classes / parameters /
    official_grad / reduction / targets' gradient, one rank's target out of range, a wrong weight
    slice (size, dtype, or one that requires grad), one rank's spatial target of the wrong shape or
    classifier bias of the wrong size: every rank raises a clear error (no hang), and the group then still computes a correct loss."""
    reports = reports_of("errors", 2, base_seed, tmp_path_factory)
    expected = {"overlap": "cover", "gap": "cover", "num_classes": "num_classes", "target": "outside [0",
                "params": "disagree", "official_grad": "disagree", "reduction": "disagree", "weight_size": "weight",
                "target_grad": "require grad", "weight_dtype": "1-D floating", "weight_grad": "class weights",
                "spatial_target": "target has shape", "bias": "bias_shard"}
    one_rank = ("target", "weight_size", "weight_dtype", "weight_grad", "spatial_target", "bias")
    for rank, report in enumerate(reports):
        for label, text in expected.items():
            message = report["raised"][label]
            assert message is not None, f"rank {rank}: {label} was accepted"
            if label in one_rank and "invalid" in message:
                continue  # the rank without the bad input says which rank has it
            assert text in message, f"rank {rank} {label}: {message}"
        value, want = report["after"]
        assert abs(value - want) <= 1e-12 * max(1.0, abs(want))


def test_the_benchmark_runs(tmp_path):
    """bench/run_class_parallel.py on tiny shapes (so that it never rots): a report with both paths."""
    bench = WORKER.parent.parent / "bench" / "run_class_parallel.py"
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    subprocess.run([sys.executable, str(bench), "--quick", "--workloads", "linear", "--backend", "auto,torch",
                    "--out", str(tmp_path)], env=env, check=True, timeout=TIMEOUT, capture_output=True)
    text = (tmp_path / "class-parallel-cpu.md").read_text()
    for backend in ("auto", "torch"):
        assert f"| linear | 64 × 16 × 1000 | single process, backend {backend} |" in text
        assert f"| linear | 64 × 16 × 1000 | class-parallel, backend {backend}, largest of 2 |" in text


def test_num_sums_and_backend_checked_without_a_group():
    """Refusals that need no process group: a backend that takes whole rows, and no torch.distributed."""
    assert class_parallel.num_sums(make_spec("nfl+nnfl")) == 4
    z = torch.zeros(2, 3)
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="backend"):
            class_parallel.class_parallel_loss(z, torch.zeros(2, dtype=torch.long), "ce", class_offset=0,
                                               num_classes=3, backend=backend)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            class_parallel.class_parallel_loss(z, torch.zeros(2, dtype=torch.long), "ce", class_offset=0,
                                               num_classes=3)


def test_shard_ops_refuse_bad_arguments():
    """The fused shard ops (called by the class-parallel path with arguments it made) refuse a label
    column outside [-1, K_r), a record of the wrong shape or dtype, too few global classes, a gradient
    output that overlaps the logits without being them, and a targets' gradient output that overlaps
    any other argument, with errors that say so."""
    from apl_kernels.backends import contract, resolve

    resolve("cpp", "cpu")  # loads the ops
    z = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, -1, 3])
    record = torch.zeros(3, contract.STATS, dtype=torch.float64)
    counted = torch.ones(3, dtype=torch.bool)
    args = contract.op_arguments(make_spec("nce+rce"), CallOptions("mean", -100, 0.0, "auto"),
                                 contract.GRAD_IN_FORWARD)
    assert torch.ops.apl.shard_sums(z, labels, None, record, counted, *args, 10).shape == (3, 2, 4)
    with pytest.raises(ValueError, match=r"label column 4 at row 1 is outside \[-1, 4\)"):
        torch.ops.apl.shard_sums(z, torch.tensor([0, 4, 3]), None, record, counted, *args, 10)
    for bad_record in (record[:, :5], record.float()):
        with pytest.raises(ValueError, match="record must be a contiguous float64"):
            torch.ops.apl.shard_sums(z, labels, None, bad_record, counted, *args, 10)
        with pytest.raises(ValueError, match="record must be a contiguous float64"):
            torch.ops.apl.shard_gradient(z, labels, None, bad_record, counted, *args, 10, torch.empty_like(z), None)
    with pytest.raises(ValueError, match="number of classes"):
        torch.ops.apl.shard_sums(z, labels, None, record, counted, *args, 3)
    rows = torch.randn(4, 4, dtype=torch.float64)
    torch.ops.apl.shard_gradient(rows[:3], labels, None, record, counted, *args, 10, rows[:3], None)  # in place
    with pytest.raises(ValueError, match="must be the logits themselves or not share their memory"):
        torch.ops.apl.shard_gradient(rows[:3], labels, None, record, counted, *args, 10, rows[1:], None)
    probabilities = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1)
    target_args = contract.op_arguments(make_spec("nce+rce"), CallOptions("mean", -100, 0.0, "auto"),
                                        contract.GRAD_IN_FORWARD, True)
    grad = torch.empty_like(z)
    for overlapping in (grad, z, probabilities):
        with pytest.raises(ValueError, match="target_grad must not share memory"):
            torch.ops.apl.shard_gradient(z, probabilities, None, record, counted, *target_args, 10, grad, overlapping)
