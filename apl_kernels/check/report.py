"""Phase 5: the summary and the Markdown report."""

from __future__ import annotations

import time
from pathlib import Path

from apl_kernels.testing.cases import LOSS_CASES, case_id
from .common import Check, INTERPRETED_KS, KS, TRAIN_BATCH, table


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
