"""A tiny WebVision-mini and ILSVRC2012 val in their real on-disk layouts, and processes of a
torch.distributed group, for the tests. Every process started here runs under a timeout, and so
does every collective inside it (the process group's own timeout): a bug fails, never hangs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WNIDS = [f"n{1440764 + 7 * i:08d}" for i in range(52)]  # sorted; the first 50 are WebVision-mini's
GROUP_TIMEOUT_S = 60  # each collective
PROCESS_TIMEOUT_S = 240  # each command


def write_jpeg(path: Path, rng: np.random.Generator, label: int, size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.int64)
    pixels = np.clip(colour + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_webvision(root: Path, rng: np.random.Generator, train: int = 40, val: int = 12,
                    imagenet_classes: int = 6, mini_list: bool = False) -> dict:
    """WebVision's layout: ``info/train_filelist_google.txt`` (with labels >= 50 that the loader
    must drop; or ``webvision_mini_train.txt`` with ``mini_list``), ``google/qNNNN/*.jpg``,
    ``info/val_filelist.txt`` + ``val_images_256/``, and ``imagenet/val/<wnid>/*.JPEG`` for 52 WordNet
    ids (images in the first ``imagenet_classes`` and in the 51st). Returns the kept labels."""
    (root / "info").mkdir(parents=True)
    lines, kept = [], []
    for i in range(train + 6):
        label = int(rng.integers(0, 50)) if i < train else 50 + i % 2
        name = f"google/q{label + 1:04d}/{i:06d}.jpg"
        write_jpeg(root / name, rng, label)
        lines.append(f"{name} {label}")
        if label < 50:
            kept.append(label)
    list_name = "webvision_mini_train.txt" if mini_list else "info/train_filelist_google.txt"
    if mini_list:
        lines = [line for line in lines if int(line.split()[1]) < 50]
    (root / list_name).write_text("\n".join(lines) + "\n")
    val_lines, val_labels = [], []
    for i in range(val + 2):
        label = i % 5 if i < val else 50
        write_jpeg(root / "val_images_256" / f"val{i:06d}.jpg", rng, label)
        val_lines.append(f"val{i:06d}.jpg {label}")
        if label < 50:
            val_labels.append(label)
    (root / "info" / "val_filelist.txt").write_text("\n".join(val_lines) + "\n")
    imagenet_labels = []
    for index, wnid in enumerate(WNIDS):
        folder = root / "imagenet" / "val" / wnid
        folder.mkdir(parents=True)
        if index < imagenet_classes or index == 50:
            for j in range(2):
                write_jpeg(folder / f"ILSVRC2012_val_{index * 10 + j:08d}.JPEG", rng, index)
                if index < 50:
                    imagenet_labels.append(index)
    return {"train": kept, "webvision": val_labels, "imagenet": imagenet_labels}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(nproc: int, argv: list[str], timeout: float = PROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m apl_kernels.reproduce ARGV`` on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "apl_kernels.reproduce", *map(str, argv), "--device", "cpu",
               "--dist-timeout", str(GROUP_TIMEOUT_S)]
    return run(command, timeout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and everything it started, as a node failure would."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(command: list[str], timeout: float = PROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session; on timeout kill the whole session and fail."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment(), cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} ran over {timeout} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_ranks(function: str, world: int, workdir: Path, timeout: float = PROCESS_TIMEOUT_S, **kwargs) -> list:
    """Run ``module:function(rank, world, **kwargs)`` in ``world`` processes of a gloo group (each
    collective under :data:`GROUP_TIMEOUT_S`); returns each rank's return value (torch.save'd).
    The group meets in a file of ``workdir`` (no TCP port that another job could take meanwhile);
    each rank's output goes to ``workdir/rankN.log`` (no pipe to fill), quoted on failure."""
    import torch

    processes, logs = [], [workdir / f"rank{rank}.log" for rank in range(world)]
    for rank in range(world):
        env = environment() | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        code = ("import webvision_support as s; s._rank_main("
                f"{function!r}, {json.dumps(kwargs)!r}, {str(workdir)!r})")
        with open(logs[rank], "w") as log:
            processes.append(subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                              env=env, cwd=REPO, start_new_session=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    late = [p for p in processes if p.poll() is None]
    for p in late:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    outputs = [log.read_text()[-3000:] for log in logs]
    assert not late, f"{function} on {world} ranks ran over {timeout} s:\n" + "\n".join(outputs)
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} of {function} failed:\n{output}"
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _rank_main(function: str, kwargs: str, workdir: str) -> None:
    from datetime import timedelta
    from importlib import import_module

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result_path = Path(workdir) / f"rank{rank}.pt"
    dist.init_process_group("gloo", init_method=f"file://{Path(workdir) / 'group'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        module, name = function.split(":")
        result = getattr(import_module(module), name)(dist.get_rank(), dist.get_world_size(), **json.loads(kwargs))
        torch.save(result, result_path)
    finally:
        dist.destroy_process_group()
