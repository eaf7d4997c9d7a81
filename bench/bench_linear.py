"""The fused linear + loss benchmark runs end to end on tiny shapes, so that it never rots (the
test suite collects this file); ``python bench/run_linear.py`` measures the real shapes."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_linear  # noqa: E402


def test_run_linear_quick(tmp_path):
    run_linear.main(["--quick", "--out", str(tmp_path)])
    report = (tmp_path / f"linear-{run_linear.DEVICE}.md").read_text()
    assert (tmp_path / f"linear-{run_linear.DEVICE}.png").stat().st_size > 0
    results = [json.loads(line) for line in report.split("```")[1].split("\n") if line.startswith("{")]
    for r in (r for r in results if "chunk" in r):  # the allocator-level records (the RSS ones have no chunk)
        if r["method"] == "linear" and r["chunk"] is None:  # one chunk of logits and gradient, and small change
            assert 0 <= r["peak"] - run_linear.one_chunk(r) < 4096, r
    assert "independent of K beyond one chunk (met)" in report
