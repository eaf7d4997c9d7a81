"""bench/run.py: partial runs never overwrite the committed report, its -k filter works, pytest-
benchmark's own tables stay out of the output, a report of one K is readable, files get the umask's mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import run as bench_run  # noqa: E402  (bench/run.py)

COMMITTED = [ROOT / "bench" / "results" / name for name in ("cpu.md", "cpu.png")]


def committed_bytes() -> list[bytes | None]:
    return [path.read_bytes() if path.exists() else None for path in COMMITTED]


@pytest.mark.parametrize("argv,partial", [
    ([], False), (["--quick"], True), (["-k", "nce+rce"], True), (["--benchmark-max-time=1"], True),
    (["--json", "old.json"], True),
])
def test_only_a_full_run_writes_the_committed_report(argv, partial):
    args, pytest_args = bench_run.parse(argv)
    assert bench_run.output_dir(args, pytest_args) == (bench_run.PARTIAL if partial else bench_run.RESULTS)
    args, pytest_args = bench_run.parse([*argv, "--out", "elsewhere"])
    assert bench_run.output_dir(args, pytest_args) == Path("elsewhere")
    if "-k" in argv:
        assert pytest_args == ["-k", "nce+rce"]


def benchmark_json(path: Path) -> Path:
    """A pytest-benchmark JSON of one shape (one K), as bench_losses.py's benchmarks record it."""
    benchmarks = []
    for mode in ("forward", "forward+backward"):
        for impl, median in (("cpp", 1e-4), ("eager", 4e-4), ("compile", 2e-4), ("cross_entropy", 9e-5)):
            loss = "cross_entropy" if impl == "cross_entropy" else "nce+rce"
            info = {"device": "cpu", "impl": impl, "n": 128, "k": 10, "dtype": "float32", "mode": mode,
                    "bytes_moved": 2 * 128 * 10 * 4 + 128 * 8, "loss": loss, "saved_bytes": 5120}
            benchmarks.append({"extra_info": info, "stats": {"median": median}})
    copy = {"device": "cpu", "impl": "copy", "n": 128, "k": 10, "dtype": "float32", "mode": "copy",
            "bytes_moved": 2 * 128 * 10 * 4 + 128 * 8, "loss": "copy"}
    benchmarks.append({"extra_info": copy, "stats": {"median": 5e-6}})
    path.write_text(json.dumps({"benchmarks": benchmarks, "machine_info": {"cpu": {"brand_raw": "test CPU"}}}))
    return path


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_report_of_one_k_is_written_where_asked_with_the_umask_mode(umask, tmp_path, capsys):
    before = committed_bytes()
    previous = os.umask(umask)
    try:
        assert bench_run.main(["--json", str(benchmark_json(tmp_path / "b.json")), "--out", str(tmp_path / "r")]) == 0
    finally:
        os.umask(previous)
    report, plot = tmp_path / "r" / "cpu.md", tmp_path / "r" / "cpu.png"
    # x eager, x compile, and the time over F.cross_entropy's (1e-4 / 9e-5)
    assert "| 128 x 10 | float32 | nce+rce | cpp | 0.100 ms | 4.00 | 2.00 | 1.11 |" in report.read_text()
    assert "A partial run or a rebuild" in report.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {oct(p.stat().st_mode & 0o777) for p in (report, plot)} == {oct(0o666 & ~umask)}
    assert committed_bytes() == before
    assert "wrote " in capsys.readouterr().out


def test_a_filtered_run_keeps_pytest_benchmark_tables_out_and_the_committed_report_intact(tmp_path):
    before = committed_bytes()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "-k", "floor and 128x10 and float32",
         "--out", str(tmp_path), "--benchmark-max-time=0.01", "--benchmark-min-rounds=2"],  # pytest options pass
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1",  # two threads on shared cores can wait on each other for long
                 PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Name (time in" not in result.stdout and "benchmark '" not in result.stdout
    report = (tmp_path / "cpu.md").read_text()
    assert "| 128 x 10 | float32 | cross_entropy | cross_entropy |" in report and "bfloat16" not in report
    assert "4096" not in report  # the filter held
    assert committed_bytes() == before
