"""Small datasets in the real on-disk formats, and helpers, for the reproduction's tests.

CIFAR-10/100 in torchvision's pickled layout, MNIST in IDX files, and the CIFAR-N human label
files as their authors distribute them (a torch.save'd dict of numpy label arrays, written by
numpy 1, whose module names differ from numpy 2's). Everything is read back through the loaders
users run.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

import apl_kernels
from apl_kernels.reproduce import cli, noise

TRAIN_PER_BATCH, TEST_IMAGES = 16, 20  # CIFAR-10: 5 x 16 training images


# How a CIFAR batch may have been pickled: the official files by Python 2 and numpy 1 (protocol 2,
# numpy.core names, byte strings as Python 2 str), or by Python 3 and numpy 2 at protocol 2 (bytes
# through _codecs.encode) or 5 (arrays through numpy._core.numeric._frombuffer).
PICKLE_STYLES = ("python 3, protocol 5", "python 3, protocol 2", "python 2 and numpy 1 (the official files)")


class _Python2Pickler(pickle._Pickler):
    """Python 2's protocol 2: bytes as byte strings (BINSTRING), which Python 3 reads with latin1."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_byte_string(self, obj: bytes) -> None:
        size = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([size]) if size < 256
                   else pickle.BINSTRING + size.to_bytes(4, "little"))
        self.write(obj)
        self.memoize(obj)

    dispatch[bytes] = save_byte_string


def cifar_pickle(obj, style: str = PICKLE_STYLES[0]) -> bytes:
    """``obj`` pickled in ``style`` (PICKLE_STYLES)."""
    if style == PICKLE_STYLES[0]:
        return pickle.dumps(obj, protocol=5)
    if style == PICKLE_STYLES[1]:
        return pickle.dumps(obj, protocol=2)
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
    return data


def write_cifar10(root: Path, rng: np.random.Generator, style: str = PICKLE_STYLES[0]) -> None:
    """A small CIFAR-10 in torchvision's layout: pickled dicts of (N, 3072) uint8 rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{i}", TRAIN_PER_BATCH) for i in range(1, 6)] + [("test_batch", TEST_IMAGES)]
    for name, count in files:
        labels = rng.permutation(np.arange(count) % 10).tolist()
        batch = {"batch_label": name, "labels": labels,
                 "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}
        (folder / name).write_bytes(cifar_pickle(batch, style))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": TRAIN_PER_BATCH, "num_vis": 3072}, f)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of MNIST's files: 0, 0, type 8 (uint8), ndim, big-endian sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, rng: np.random.Generator, train: int = 64, test: int = 20) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)


def write_cifar100(root: Path, rng: np.random.Generator, train: int = 200, test: int = 100) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", train), ("test", test)):
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "fine_labels": (np.arange(count) % 100).tolist(), "coarse_labels": [0] * count}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def cifar_train_labels(root: Path, dataset: str) -> np.ndarray:
    """The training labels of a CIFAR written above, in torchvision's order."""
    from apl_kernels.reproduce import datasets

    return datasets.load_arrays(dataset, root)[1]


def human_label_sets(clean: np.ndarray, dataset: str, rng: np.random.Generator, rate: float = 0.3) -> dict:
    """CIFAR-N-like noisy label sets of ``clean``: each label replaced by a random one w.p. ``rate``."""
    num_classes = 100 if dataset == "cifar100" else 10
    sets = {}
    for key in noise.HUMAN_LABEL_SETS[dataset].values():
        noisy = clean.copy()
        flip = rng.random(clean.size) < rate
        noisy[flip] = rng.integers(0, num_classes, int(flip.sum()))
        sets[key] = noisy
    return sets


def write_human_labels(root: Path, dataset: str, clean: np.ndarray, label_sets: dict,
                       numpy1_names: bool = True) -> Path:
    """``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` as the CIFAR-N authors distribute them: a
    ``torch.save``'d dict of numpy arrays. ``numpy1_names``: the pickle names numpy 1's modules
    (``numpy.core``), as the real files, written before numpy 2, do."""
    from apl_kernels.reproduce.datasets import HUMAN_FILES

    buffer = io.BytesIO()
    torch.save({"clean_label": clean.copy(), **label_sets}, buffer)
    data = buffer.getvalue()
    if numpy1_names:  # rewrite the archive's pickle with numpy 1's module name
        source, rewritten = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
        with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as target:
            for item in source.infolist():
                content = source.read(item.filename)
                if item.filename.endswith("data.pkl"):
                    content = content.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                    assert b"numpy.core.multiarray" in content
                target.writestr(item, content)
        data = rewritten.getvalue()
    path = root / HUMAN_FILES[dataset]
    path.write_bytes(data)
    return path


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trained_count(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("trained "))
    return int(line.split()[1])


def child_env() -> dict:
    """The environment of a child ``python -m apl_kernels.reproduce``: this checkout importable."""
    root = str(Path(apl_kernels.__file__).parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


# The CLI in a child process whose second run waits after its first epoch's checkpoint, so that a
# signal sent once a run is finished and another has a checkpoint interrupts mid-run, however
# slowly or quickly the machine trains.
_HELD_CLI = """
import signal, sys, time
from apl_kernels.reproduce import cli, grid

# Ctrl-C raises KeyboardInterrupt, as in a terminal: a process started from a background job
# (CI's, or `nohup ... &`) inherits SIGINT ignored, and Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

original, calls = grid.train_run, []

def held_train_run(*args, on_epoch=None, **kwargs):
    calls.append(1)
    def after_epoch(epoch, record):
        if on_epoch is not None:
            on_epoch(epoch, record)
        if len(calls) >= 2:
            time.sleep(600)
    return original(*args, on_epoch=after_epoch, **kwargs)

grid.train_run = held_train_run
sys.argv[0] = "apl_kernels.reproduce"
sys.exit(cli.main())
"""


def spawn_held(argv, **kwargs) -> subprocess.Popen:
    """``python -m apl_kernels.reproduce argv`` in a child that waits in its second run (above)."""
    return subprocess.Popen([sys.executable, "-c", _HELD_CLI, *map(str, argv)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def interrupted_runs(out: Path) -> set[str]:
    """Runs with a checkpoint and no result: started and not finished."""
    return {p.stem for p in (out / "checkpoints").glob("*.pt")} - {p.stem for p in (out / "runs").glob("*.json")}


def json_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}
