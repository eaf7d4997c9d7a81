"""``python -m apl_kernels.reproduce`` end to end: sharded, interrupted and concurrent grids, the
headline and the log lines, damaged and leftover files, locks, options validated before any
training, CIFAR-N human labels, and the files' modes.

The grids train a small CIFAR-10 written in torchvision's on-disk layout (tests/reproduce_support.py)
or scikit-learn's digits, through the loader users run.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from apl_kernels.reproduce import cli, cost, grid, report, settings, store, train
from reproduce_support import (cifar_train_labels, human_label_sets, interrupted_runs, json_files, run_main, spawn_held,
                               trained_count, write_cifar10, write_human_labels)


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, np.random.default_rng(12345))
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One CPU thread: these small networks gain little from two, and lose much when other
    processes share the cores. main() also sets threads (--threads): restore them after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRID = ["--dataset", "cifar10", "--losses", "ce,nce+rce", "--noise", "sym:0.4", "asym:0.2",
        "--seeds", "1", "--epochs", "2", "--backend", "torch", "--no-progress", "--threads", "1"]


def test_cli_interrupted_sharded_grid_finishes_only_missing_runs_and_writes_every_output(
        cifar10_root, tmp_path, capsys):
    out = tmp_path / "grid"
    common = [*GRID, "--data-dir", cifar10_root, "--out", out]
    runs = grid.build_grid("cifar10", ["ce", "nce+rce"], cli.parse_noise("sym:0.4 asym:0.2"), [1], 2)
    shard_ids = [{f"{run.run_id}.json" for run in grid.shard(runs, i, 2)} for i in range(2)]

    # 1. Shard 0/2 in a separate process, interrupted (Ctrl-C) once its first run is written and
    #    its second has a checkpoint (the child waits there: spawn_held).
    child = spawn_held([*common, "--shard", "0/2"])
    deadline = time.monotonic() + 240
    while not (json_files(out) and interrupted_runs(out)) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "run the same command again" in stderr.strip().splitlines()[-1]
    first = json_files(out)
    assert first and set(first) < shard_ids[0]
    started = sorted(interrupted_runs(out))
    assert started

    # 2. The same command again trains only the missing runs of shard 0, a line for each (the output
    #    is not a terminal), and ends with the headline.
    code, stdout, _ = run_main([*common, "--shard", "0/2"], capsys)
    assert code == 0 and trained_count(stdout) == len(shard_ids[0]) - len(first)
    run_lines = [line for line in stdout.splitlines() if "% clean test accuracy (2 epochs," in line]
    assert len(run_lines) == trained_count(stdout)
    second = json_files(out)
    assert set(second) == shard_ids[0]
    assert all(second[name] == content for name, content in first.items())  # not trained again
    for run_id in started:  # a run interrupted mid-way continued from its epoch-1 checkpoint
        assert json.loads(second[f"{run_id}.json"])["resumed_at_epochs"] == [1]

    # 3. Shard 1/2 trains exactly the rest: together the shards cover the grid once.
    code, stdout, _ = run_main([*common, "--shard", "1/2"], capsys)
    assert code == 0 and trained_count(stdout) == len(shard_ids[1])
    final = json_files(out)
    assert set(final) == shard_ids[0] | shard_ids[1] == {f"{run.run_id}.json" for run in runs}
    assert all(final[name] == content for name, content in second.items())

    # 4. The whole grid again: nothing left to train; the headline has every cell, beside the paper.
    code, stdout, _ = run_main(common, capsys)
    assert code == 0 and trained_count(stdout) == 0
    headline = stdout[stdout.index("Clean test accuracy (%) at the last epoch, CIFAR-10, 1 seed"):]
    assert "in brackets ours minus the paper's number" in headline
    for run in runs:
        record = json.loads(final[f"{run.run_id}.json"])
        paper_mean = next(r["mean"] for r in settings.paper_results() if (r["dataset"], r["noise"], r["rate"],
                          r["loss"]) == ("cifar10", run.noise, run.rate, run.loss))
        assert f"{record['final_test_acc']:.2f} ({record['final_test_acc'] - paper_mean:+.2f})" in headline
    assert [line.split()[0] for line in headline.splitlines() if line.split()[:1] in (["best"], ["worst"])] == [
        "best", "worst"]
    assert str(out / "results.md") in headline.splitlines()[-1]

    # 5. Every output file.
    assert not list((out / "checkpoints").glob("*"))
    for content in final.values():
        record = json.loads(content)
        assert record["status"] == "finished" and record["epochs_done"] == 2
        assert all(len(record["history"][m]) == 2 for m in train.METRICS)
        assert np.allclose(np.sum(record["noise"]["transition"], axis=1), 1.0)
        assert record["wall_time_s"] > 0 and record["best_epoch"] in (1, 2)
    paper = {(r["noise"], r["rate"], r["loss"]): r["mean"] for r in settings.paper_results()
             if r["dataset"] == "cifar10"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(runs)
    for row in rows:
        published = paper[row["noise"], float(row["rate"]), row["loss"]]
        assert float(row["paper_mean"]) == published
        assert float(row["diff"]) == pytest.approx(float(row["mean"]) - published, abs=2e-4)
    markdown = (out / "results.md").read_text()
    assert f"paper {paper['sym', 0.4, 'ce']:.2f}" in markdown and "trained 2 epoch(s)" in markdown
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["grid_cifar10.png", "test_acc_cifar10_asym0.2.png", "test_acc_cifar10_sym0.4.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    # 6. --report rebuilds the tables and plots from the run files alone.
    csv_before = (out / "results.csv").read_bytes()
    (out / "results.md").unlink()
    for plot in (out / "plots").glob("*.png"):
        plot.unlink()
    code, stdout, _ = run_main(["--report", out], capsys)
    assert code == 0 and (out / "results.md").read_text() == markdown
    assert (out / "results.csv").read_bytes() == csv_before
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == plots

    # 7. The same directory with other settings is refused, not mixed.
    code, _, stderr = run_main([*common[:-2], "--out", out, "--epochs", "3"], capsys)
    assert code == 2 and "use another --out" in stderr and stderr.count("\n") == 1


def test_dry_run_lists_the_runs_and_ends_with_its_summary(tmp_path, capsys):
    code, stdout, _ = run_main(["--preset", "quick", "--dry-run", "--backend", "torch", "--out", tmp_path], capsys)
    assert code == 0
    lines = stdout.splitlines()
    quick = settings.PRESETS["quick"]
    count = len(quick.losses) * len(cli.parse_noise(quick.noise))
    assert all(line.strip().startswith("digits_") and "to run" in line for line in lines[:count])
    summary = lines[count:]  # after the runs: how many, the threads, the cost
    assert summary[0].startswith(f"{count} runs, 0 already done: digits, ")
    assert not any(line.startswith("data: ") for line in summary)  # digits is bundled
    assert "PFLOP" in summary[-2] and "hours on this device" in summary[-1]
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_dry_run_exits_2_after_its_summary_when_its_data_is_missing(tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--losses", "ce", "--noise", "sym:0.4", "--seeds", "1", "--backend", "torch",
            "--threads", "1", "--data-dir", tmp_path / "data", "--out", tmp_path / "out", "--dry-run"]
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 2 and stdout.splitlines()[0].strip().startswith("cifar10_ce_sym0.4_seed1 ")
    data = [line for line in stdout.splitlines() if line.startswith("data: ")]
    assert len(data) == 1 and "CIFAR-10 not found" in data[0] and "hours on this device" in stdout.splitlines()[-1]
    assert stderr == ("python -m apl_kernels.reproduce: error: the data of this plan is missing: the data: line "
                      "above says how to get it\n")
    code, stdout, stderr = run_main([*argv, "--download"], capsys)  # --download would fetch it: the plan can run
    assert code == 0 and stderr == "" and "data: not in " in stdout and "--download fetches it" in stdout
    # CIFAR-N's label files cannot be downloaded: missing, they stop the plan even with --download
    code, stdout, stderr = run_main([*argv, "--noise", "human:aggre", "--download"], capsys)
    assert code == 2 and "data: CIFAR-10_human.pt not found" in stdout and "the data of this plan is missing" in stderr


def test_forward_macs_of_cnn8():
    from apl_kernels.reproduce.models import CNN8

    convs = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 196, 8), (196, 196, 8)]
    expected = sum(cin * 9 * cout * side * side for cin, cout, side in convs) + 3136 * 256 + 256 * 10
    assert cost.forward_macs(CNN8(), (3, 32, 32)) == expected


@pytest.mark.parametrize("argv,message", [
    (["--noise", "sym:abc"], "bad --noise 'sym:abc': rate 'abc' is not a number in [0, 1]"),
    (["--noise", "gauss:0.2"], "bad --noise 'gauss:0.2': write KIND:RATE[,RATE...] with KIND one of sym,"),
    (["--noise", "sym:1.5"], "rate '1.5' is not a number in [0, 1]"),
    (["--losses", "ce,bogus"], "unknown loss 'bogus' in --losses; available: ce, fl,"),
    (["--shard", "2/2"], "bad --shard '2/2': write INDEX/COUNT with 0 <= INDEX < COUNT"),
    (["--seeds", "one"], "bad --seeds 'one'"),
    (["--noise", "asym-sim:0.2"], "noise asym-sim is CIFAR-10's; the dataset is digits"),
    (["--device", "gpu"], "bad --device 'gpu': write cpu, cuda or cuda:N"),
    (["--bf16"], "--bf16 is a CUDA option"),
    (["--backend", "foo"], "unknown backend 'foo'; known: auto, torch"),
    (["--l1", "-1"], "bad --l1 -1.0: the penalty delta must be a number >= 0"),
    (["--json"], "--json prints the run plan of --dry-run: add --dry-run"),
    (["--noise", "human:aggre"], "human noise is CIFAR-10N's and CIFAR-100N's; the dataset is digits"),
])
def test_bad_input_gives_a_one_line_error_saying_what_to_do(argv, message, tmp_path, capsys):
    dry_run = [] if "--json" in argv else ["--dry-run"]
    code, stdout, stderr = run_main(["--preset", "quick", *argv, "--out", tmp_path, *dry_run], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("python -m apl_kernels.reproduce: error: ")
    assert message in stderr


def test_missing_dataset_directory_says_how_to_get_it(tmp_path, capsys):
    code, _, stderr = run_main(["--dataset", "cifar10", "--losses", "ce", "--noise", "sym:0.2", "--seeds", "1",
                                "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out", "--device", "cpu",
                                "--no-progress"], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert "CIFAR-10 not found" in stderr and "--data-dir" in stderr and "--download" in stderr


# ---------------------------------------------------------------------------------------------
# Options validated before any training: one line each, nothing trained

QUICK_ONE_RUN = ["--preset", "quick", "--losses", "ce", "--noise", "sym:0.2", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("where", ["/proc/apl-results", "a file"])
def test_an_unwritable_out_is_refused_before_training(where, tmp_path, capsys):
    out = Path(where) if where.startswith("/") else tmp_path / "file"
    if where == "a file":
        out.write_text("not a directory")
    code, stdout, stderr = run_main([*QUICK_ONE_RUN, "--out", out], capsys)
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert f"--out {out} is not a directory this process can write to" in stderr and "choose another --out" in stderr
    assert "trained" not in stdout and "[1/1]" not in stdout


def test_the_triton_backend_on_cpu_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test suite runs Triton on CPU tensors
    code, _, stderr = run_main([*QUICK_ONE_RUN, "--backend", "triton", "--out", tmp_path], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert "backend 'triton' does not run on cpu tensors" in stderr
    assert not (tmp_path / "runs").exists()


def test_a_full_disk_stops_with_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, _, stderr = run_main([*QUICK_ONE_RUN, "--backend", "torch", "--out", tmp_path], capsys)
    assert code == 1 and stderr.count("\n") == 1, stderr
    checkpoint = tmp_path / "checkpoints" / "digits_ce_sym0.2_seed1.pt"
    assert f"could not write {checkpoint} (No space left on device)" in stderr and "free some space" in stderr
    assert not list(tmp_path.glob("*/*.tmp")) and not list(tmp_path.glob("*/.*.tmp"))


# ---------------------------------------------------------------------------------------------
# Damaged and leftover files, locks, concurrent processes

def quick_grid(out, *extra):
    return ["--preset", "quick", "--losses", "ce,nce", "--noise", "sym:0.4", "--seeds", "1,2", "--epochs", "2",
            "--backend", "torch", "--threads", "1", "--no-progress", "--out", out, *extra]


def test_damaged_results_and_leftovers_are_handled_at_the_next_start(tmp_path, capsys, seed):
    out = tmp_path / "grid"
    code, stdout, _ = run_main(quick_grid(out), capsys)
    assert code == 0 and trained_count(stdout) == 4
    runs = sorted((out / "runs").glob("*.json"))
    good = runs[0].read_bytes()
    runs[1].write_bytes(b"")  # empty
    rng = np.random.default_rng(seed)
    runs[2].write_bytes(good[: rng.integers(1, len(good))])  # truncated
    runs[3].write_bytes(rng.bytes(300))  # random bytes
    stale = out / "runs" / f".{runs[0].name}.abc123.tmp"
    stale.write_bytes(b"{half a json")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    stale_lock = out / "locks" / f".{runs[1].stem}.lock.ghi789.tmp"  # an interrupted lock takeover's
    stale_lock.write_bytes(b"{")
    os.utime(stale_lock, (time.time() - 3600, time.time() - 3600))
    fresh = out / "checkpoints" / ".other.pt.def456.tmp"  # maybe another process's write in progress
    fresh.write_bytes(b"...")

    # --report skips and names each damaged file
    code, _, stderr = run_main(["--report", out], capsys)
    assert code == 0
    for damaged in runs[1:]:
        assert f"skipped {damaged}: damaged" in stderr
    assert "| ce |" in (out / "results.md").read_text() or "| nce |" in (out / "results.md").read_text()

    # --dry-run lists them as damaged and changes nothing
    code, stdout, _ = run_main([*quick_grid(out), "--dry-run"], capsys)
    assert code == 0 and stdout.count(" damaged ") == 3 and not list(out.glob("runs/*.corrupt"))

    # training moves them aside, retrains their runs, and removes the stale temporary file
    code, stdout, stderr = run_main(quick_grid(out), capsys)
    assert code == 0 and trained_count(stdout) == 3
    for damaged in runs[1:]:
        assert f"warning: {damaged} is damaged" in stderr and "will be trained again" in stderr
        assert damaged.with_name(damaged.name + ".corrupt").exists()
        assert json.loads(damaged.read_text())["status"] == "finished"
    assert runs[0].read_bytes() == good and not stale.exists() and not stale_lock.exists() and fresh.exists()


def set_path(record: dict, keys: str, value) -> None:
    *parents, last = keys.split(".")
    for key in parents:
        record = record[key]
    record[last] = value


def drop_path(record: dict, keys: str) -> None:
    *parents, last = keys.split(".")
    for key in parents:
        record = record[key]
    del record[last]


# Valid JSON, not a valid result: each broke a reader (report, plots, headline) with a traceback.
MALFORMED = {
    "history {}": lambda r: set_path(r, "history", {}),
    "test_acc text": lambda r: set_path(r, "history.test_acc", "garbage"),
    "test_acc with text": lambda r: set_path(r, "history.test_acc", [50.0, "garbage"]),
    "final_test_acc text": lambda r: set_path(r, "final_test_acc", "garbage"),
    "no final_test_acc": lambda r: drop_path(r, "final_test_acc"),
    "no status": lambda r: drop_path(r, "status"),
    "no realized rate": lambda r: drop_path(r, "noise.realized_rate"),
    "unknown dataset": lambda r: set_path(r, "config.dataset", "nowhere"),
    "unknown noise": lambda r: set_path(r, "config.noise", "gauss"),
    "config a list": lambda r: set_path(r, "config", []),
}


def test_malformed_results_are_damaged_for_every_reader(tmp_path, capsys, seed):
    out = tmp_path / "grid"
    code, stdout, _ = run_main(quick_grid(out, "--seeds", "1,2,3"), capsys)
    assert code == 0 and trained_count(stdout) == 6
    runs = sorted((out / "runs").glob("*.json"))
    rng = np.random.default_rng(seed)
    kinds = [list(MALFORMED)[i] for i in rng.choice(len(MALFORMED), 5, replace=False)]
    for path, kind in zip(runs[1:], kinds):
        record = json.loads(path.read_text())
        MALFORMED[kind](record)
        path.write_text(json.dumps(record))

    code, _, stderr = run_main(["--report", out], capsys)
    assert code == 0, (kinds, stderr)
    for damaged in runs[1:]:
        assert f"skipped {damaged}: damaged (not a run result: " in stderr, (kinds, stderr)

    code, stdout, _ = run_main([*quick_grid(out, "--seeds", "1,2,3"), "--dry-run"], capsys)
    assert code == 0 and stdout.count(" damaged ") == 5, (kinds, stdout)

    code, stdout, stderr = run_main(quick_grid(out, "--seeds", "1,2,3"), capsys)
    assert code == 0 and trained_count(stdout) == 5, (kinds, stderr)
    for damaged in runs[1:]:
        assert f"warning: {damaged} is damaged (not a run result: " in stderr
        assert damaged.with_name(damaged.name + ".corrupt").exists()
        assert json.loads(damaged.read_text())["status"] == "finished"


def test_locks_are_taken_over_only_when_their_owner_is_gone(tmp_path):
    path = tmp_path / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        assert store.RunLock.acquire(path) is None  # its owner is alive
        os.utime(path, (time.time() - store.STALE_LOCK_S - 1,) * 2)
        stale_by_age = store.RunLock.acquire(path)  # no heartbeat for too long: taken over
        assert stale_by_age is not None
        stale_by_age.release()
        assert not path.exists()
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = store.RunLock.acquire(path)  # its owner is gone: taken over
    assert lock is not None and json.loads(path.read_text())["pid"] == os.getpid()
    assert store.RunLock.acquire(path) is None  # held, by a live process (this one)
    lock.release()
    assert not path.exists()


@pytest.mark.parametrize("content", ["empty", "random bytes", "a JSON list"])
def test_an_unreadable_lock_is_taken_over_with_a_warning(content, tmp_path, capsys, seed):
    path = tmp_path / "locks" / "run.lock"
    path.parent.mkdir()
    path.write_bytes({"empty": b"", "random bytes": np.random.default_rng(seed).bytes(64),
                      "a JSON list": b"[1, 2]"}[content])
    lock = store.RunLock.acquire(path)  # locks are written whole: this is damage, not a write in progress
    assert lock is not None and json.loads(path.read_text())["pid"] == os.getpid()
    assert f"warning: {path} is not a readable lock" in capsys.readouterr().err
    lock.release()
    assert not path.exists() and not list(path.parent.iterdir())


def test_a_lock_taken_over_by_another_process_meanwhile_is_left_to_it(tmp_path, monkeypatch):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1234567, "host": socket.gethostname(), "token": "dead"}))
    other = {"pid": os.getpid(), "host": socket.gethostname(), "token": "other"}

    def dead_but_taken_over_meanwhile(pid):
        # While this process judges the dead owner's lock, another takes it over and writes its own.
        path.unlink()
        path.write_text(json.dumps(other))
        return False

    monkeypatch.setattr(store, "process_alive", dead_but_taken_over_meanwhile)
    assert store.RunLock.acquire(path) is None
    assert json.loads(path.read_text()) == other and [p.name for p in tmp_path.iterdir()] == ["run.lock"]


def test_a_disk_full_at_the_first_lock_stops_in_one_line_and_the_next_start_does_not_wait(tmp_path, capsys,
                                                                                         monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        code, stdout, stderr = run_main([*QUICK_ONE_RUN, "--backend", "torch", "--out", tmp_path], capsys)
    lock = tmp_path / "locks" / "digits_ce_sym0.2_seed1.lock"
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert f"could not write {lock} (No space left on device)" in stderr and "free some space" in stderr
    assert not list((tmp_path / "locks").iterdir())  # no lock, whole or empty, and no temporary
    code, stdout, stderr = run_main([*QUICK_ONE_RUN, "--backend", "torch", "--out", tmp_path], capsys)
    assert code == 0 and trained_count(stdout) == 1 and "waiting" not in stdout + stderr


def test_atomic_write_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    import stat

    from apl_kernels import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        directory = stat.S_ISDIR(os.fstat(fd).st_mode)
        events.append("fsync directory" if directory else "fsync file")
        if directory:
            raise OSError(22, "Invalid argument")  # some systems cannot: ignored
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda *args: events.append("rename") or real_replace(*args))
    files.atomic_write_text(tmp_path / "a.txt", "text")
    assert events == ["fsync file", "rename", "fsync directory"]
    assert (tmp_path / "a.txt").read_text() == "text" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_two_trainers_of_the_same_grid_share_its_runs(tmp_path, monkeypatch):
    """Two trainers of one grid in one directory (threads here, so that their timing is fixed: the
    first holds its first run until the second has trained one) train every run exactly once."""
    import threading

    runs = grid.build_grid("digits", ["ce", "nce", "mae"], [("sym", 0.4), ("asym", 0.2)], [1], epochs=2)
    second_trained_one = threading.Event()
    trained_by: dict[str, list[str]] = {"first": [], "second": []}
    real_train_run = grid.train_run

    def train_run(run, *args, **kwargs):
        name = threading.current_thread().name
        record = real_train_run(run, *args, **kwargs)
        if name == "first" and not trained_by["first"]:
            second_trained_one.wait(60)
        trained_by[name].append(run.run_id)
        if name == "second":
            second_trained_one.set()
        return record

    monkeypatch.setattr(grid, "train_run", train_run)
    monkeypatch.setattr(grid, "POLL_S", 0.05)
    options = train.Options(backend="torch", progress=False)
    results = {}
    threads = [threading.Thread(target=lambda n=name: results.setdefault(n, grid.run_grid(runs, tmp_path, options)),
                                name=name) for name in ("first", "second")]
    threads[0].start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("locks/*.lock")) and time.monotonic() < deadline:
        time.sleep(0.01)
    threads[1].start()  # while the first holds its first run
    for thread in threads:
        thread.join(300)
    assert trained_by["first"] and trained_by["second"]
    assert sorted(trained_by["first"] + trained_by["second"]) == sorted(run.run_id for run in runs)
    assert [run.run_id for run in results["first"] + results["second"]].count(runs[0].run_id) == 1
    records = [json.loads(content) for content in json_files(tmp_path).values()]
    assert len(records) == len(runs) and all(r["resumed_at_epochs"] == [] for r in records)
    assert not list((tmp_path / "locks").glob("*.lock"))


@pytest.mark.parametrize("taken_at_epoch", [1, 3])
@pytest.mark.parametrize("other", ["finished meanwhile", "still training"])
def test_a_run_whose_lock_was_taken_over_while_stopped_is_left_to_the_new_owner(taken_at_epoch, other, tmp_path,
                                                                               monkeypatch, capsys):
    """A trainer stopped past the stale-lock limit (SIGSTOP, a suspended laptop) loses its lock to
    another process, which trains the run; woken, the first writes neither checkpoint nor result.
    The stop is simulated: after epoch ``taken_at_epoch`` of 3 the lock becomes another's, whose
    result is written at once or a second later."""
    import threading

    run = grid.build_grid("digits", ["ce"], [("sym", 0.4)], [1], epochs=3)[0]
    lock, result = grid.lock_path(tmp_path, run), grid.result_path(tmp_path, run)
    theirs = {"config": run.to_dict(), "status": "finished", "final_test_acc": 12.5, "best_test_acc": 12.5,
              "noise": {"realized_rate": 0.4}, "history": {"test_acc": [12.5]}}
    new_owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": "the other process"}  # alive
    timers = []

    def other_finishes():
        store.write_text(result, json.dumps(theirs))
        grid.checkpoint_path(tmp_path, run).unlink(missing_ok=True)
        lock.unlink()

    real_train_run = grid.train_run

    def stopped_train_run(*args, on_epoch=None, **kwargs):
        def after_epoch(epoch, record):
            if epoch == taken_at_epoch:  # woken after the lock went stale and was taken over
                lock.unlink()
                lock.write_text(json.dumps(new_owner))
                if other == "finished meanwhile":
                    other_finishes()
                else:
                    timers.append(threading.Timer(1.0, other_finishes))
                    timers[-1].start()
        return real_train_run(*args, on_epoch=after_epoch, **kwargs)

    monkeypatch.setattr(grid, "train_run", stopped_train_run)
    monkeypatch.setattr(grid, "POLL_S", 0.05)
    trained = grid.run_grid([run], tmp_path, train.Options(backend="torch", progress=False))
    for timer in timers:
        timer.join(30)
    assert trained == []
    assert json.loads(result.read_text()) == theirs  # kept, not overwritten
    assert not grid.checkpoint_path(tmp_path, run).exists() and not lock.exists()
    err = capsys.readouterr().err
    assert f"warning: {run.run_id}: this process lost its lock {lock}" in err and "its result kept" in err


def test_a_lock_released_before_its_owner_is_read_is_not_announced(tmp_path, monkeypatch, capsys):
    run = grid.build_grid("digits", ["ce"], [("sym", 0.4)], [1], epochs=1)[0]
    real_acquire, looks = store.RunLock.acquire, []

    def held_at_the_first_look(path):
        looks.append(path)  # the first look: another process holds the lock, and releases it at once
        return None if len(looks) == 1 else real_acquire(path)

    monkeypatch.setattr(store.RunLock, "acquire", held_at_the_first_look)
    monkeypatch.setattr(grid, "POLL_S", 0.01)
    assert grid.run_grid([run], tmp_path, train.Options(backend="torch", progress=False)) == [run]
    out = capsys.readouterr().out
    assert len(looks) == 2 and "pid ?" not in out and "waiting" not in out, out


# ---------------------------------------------------------------------------------------------
# Output: the headline, log lines, files' modes, threads

def test_without_a_terminal_a_long_run_logs_its_epochs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grid, "LOG_EVERY_S", 0.0)
    code, stdout, _ = run_main(quick_grid(tmp_path, "--losses", "ce", "--seeds", "1"), capsys)
    assert code == 0
    assert "  digits_ce_sym0.4_seed1: epoch 1/2, test accuracy" in stdout
    assert "[1/1] ce sym 0.4 seed 1: " in stdout


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_are_created_with_the_umask_mode(umask, tmp_path, capsys):
    previous = os.umask(umask)
    try:
        code, _, _ = run_main(quick_grid(tmp_path, "--losses", "ce", "--seeds", "1"), capsys)
    finally:
        os.umask(previous)
    assert code == 0
    written = [*tmp_path.glob("runs/*.json"), tmp_path / "results.md", tmp_path / "results.csv",
               *tmp_path.glob("plots/*.png")]
    assert len(written) == 5
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(0o666 & ~umask)}


def test_threads_are_measured_when_not_given(tmp_path, capsys):
    threads, line = cost.choose_threads("digits", "torch")
    assert 1 <= threads <= torch.get_num_threads() and "digits_cnn at batch 128" in line and "1: " in line
    code, stdout, _ = run_main(["--preset", "paper", "--dataset", "digits", "--losses", "ce", "--noise", "sym:0.0",
                                "--seeds", "1", "--backend", "torch", "--out", tmp_path, "--dry-run"], capsys)
    assert code == 0 and "CPU threads: " in stdout and "the fastest for digits_cnn" in stdout


# ---------------------------------------------------------------------------------------------
# CIFAR-10N human labels end to end

def test_cifar10n_grid_end_to_end(tmp_path, capsys, seed):
    rng = np.random.default_rng(seed)
    write_cifar10(tmp_path, rng)
    clean = cifar_train_labels(tmp_path, "cifar10")
    sets = human_label_sets(clean, "cifar10", rng)
    code, stdout, _ = run_main(["--preset", "cifar10n", "--losses", "ce", "--seeds", "1", "--data-dir", tmp_path,
                                "--out", tmp_path / "out", "--epochs", "1", "--threads", "1", "--backend", "torch",
                                "--dry-run"], capsys)
    data_lines = [line for line in stdout.splitlines() if line.startswith("data: ")]
    assert code == 2 and len(data_lines) == 1 and "CIFAR-10_human.pt not found" in data_lines[0]
    write_human_labels(tmp_path, "cifar10", clean, sets)
    code, stdout, stderr = run_main(["--preset", "cifar10n", "--losses", "ce", "--noise", "human:aggre,worse",
                                     "--seeds", "1", "--epochs", "1", "--backend", "torch", "--threads", "1",
                                     "--no-progress", "--data-dir", tmp_path, "--out", tmp_path / "out"], capsys)
    assert code == 0, stderr
    assert trained_count(stdout) == 2 and "human aggre" in stdout and "human worse" in stdout
    for name in ("aggre", "worse"):
        record = json.loads((tmp_path / "out" / "runs" / f"cifar10_ce_human-{name}_seed1.json").read_text())
        noisy = sets[f"{name}_label"]
        assert record["config"]["rate"] == name
        assert record["noise"]["realized_rate"] == pytest.approx(np.mean(noisy != clean))
        counts = np.zeros((10, 10))
        np.add.at(counts, (clean, noisy), 1)
        assert np.allclose(record["noise"]["transition"], counts / counts.sum(1, keepdims=True), atol=1e-6)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| loss | human aggre | human worse |" in markdown and "CIFAR-N's human labels" in markdown
    assert (tmp_path / "out" / "plots" / "test_acc_cifar10_human-aggre.png").exists()


def test_the_quick_grid_ends_with_a_sentence_from_its_numbers_and_what_its_files_hold(tmp_path, capsys):
    code, stdout, _ = run_main(quick_grid(tmp_path, "--losses", "ce,nce,nce+rce", "--noise", "sym:0.0,0.4",
                                          "--seeds", "1"), capsys)
    assert code == 0
    final = {(r["config"]["loss"], r["config"]["rate"]): r["final_test_acc"]
             for r in map(json.loads, json_files(tmp_path).values())}
    robust = sorted(final[loss, 0.4] for loss in ("nce", "nce+rce"))
    sentence, files = stdout.rstrip().splitlines()[-3], stdout.rstrip().splitlines()[-1]
    assert sentence == (f"At 40 % symmetric label noise cross entropy ends at {final['ce', 0.4]:.1f} % clean test "
                        f"accuracy and the 2 robust losses at {robust[0]:.1f} to {robust[1]:.1f} % (median "
                        f"{np.median(robust):.1f} %).")
    # digits: one seed and no published numbers, so the files hold neither std nor paper numbers
    assert files.startswith(f"files: {tmp_path / 'results.md'} (the tables, one seed, and notes on the settings)")
    assert "std" not in files and "paper" not in files
    two_seeds = report.summarize([dict(r, config=dict(r["config"], seed=s)) for s in (1, 2)
                                  for r in map(json.loads, json_files(tmp_path).values())])
    assert "(the tables, mean ± std over 2 seeds, and notes" in report.files_line(two_seeds, tmp_path)
    assert "means over 2 seeds" in report.takeaway(two_seeds)


def test_a_resumed_run_says_from_which_epoch(tmp_path, capsys, monkeypatch):
    real_train_run = grid.train_run

    def stopped_after_epoch_1(*args, on_epoch=None, **kwargs):
        def after_epoch(epoch, record):
            raise KeyboardInterrupt  # Ctrl-C once epoch 1's checkpoint is written
        return real_train_run(*args, on_epoch=after_epoch, **kwargs)

    argv = quick_grid(tmp_path, "--losses", "ce", "--seeds", "1")
    with monkeypatch.context() as patch:
        patch.setattr(grid, "train_run", stopped_after_epoch_1)
        code, _, _ = run_main(argv, capsys)
    assert code == 130
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0
    line = next(line for line in stdout.splitlines() if line.startswith("[1/1] "))
    assert line.startswith("[1/1] ce sym 0.4 seed 1: ") and "(2 epochs, resumed from epoch 1, " in line
    fresh = grid.run_line(grid.build_grid("digits", ["ce"], [("sym", 0.4)], [1], 2)[0],
                          {"status": "finished", "final_test_acc": 50.0, "epochs_done": 2, "wall_time_s": 1.0,
                           "resumed_at_epochs": []}, 1, 1)
    assert "resumed" not in fresh and fresh.endswith("(2 epochs, 1.0 s)")
