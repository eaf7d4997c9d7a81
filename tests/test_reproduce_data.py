"""The reproduction's data: torchvision's on-disk layouts, CIFAR-N's human label files, batch
augmentation, and what a missing or unreachable dataset says.

Every dataset here is small and written in the real on-disk format (tests/reproduce_support.py),
then read through the loader users run.
"""

import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from apl_kernels.reproduce import cli, datasets, noise, train
from reproduce_support import (PICKLE_STYLES, TRAIN_PER_BATCH, TEST_IMAGES, cifar_pickle, cifar_train_labels,
                               human_label_sets, run_main, write_cifar10, write_cifar100, write_human_labels,
                               write_mnist)


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, np.random.default_rng(12345))
    return root


def test_cifar10_reader_agrees_with_torchvision(cifar10_root, monkeypatch):
    from torchvision import datasets as tv_datasets

    monkeypatch.setattr(tv_datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # not the real md5s
    for train_split, ours_images, ours_labels in [(True, 0, 1), (False, 2, 3)]:
        theirs = tv_datasets.CIFAR10(str(cifar10_root), train=train_split)
        arrays = datasets.load_arrays("cifar10", cifar10_root)
        assert np.array_equal(arrays[ours_images].transpose(0, 2, 3, 1), theirs.data)
        assert np.array_equal(arrays[ours_labels], np.asarray(theirs.targets))


def test_load_puts_uint8_images_on_the_device(cifar10_root):
    data = datasets.load("cifar10", "cpu", cifar10_root)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (5 * TRAIN_PER_BATCH, 3, 32, 32)
    assert data.test_images.shape == (TEST_IMAGES, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64 and data.num_classes == 10
    assert (data.mean, data.std) == (datasets.DATASETS["cifar10"].mean, datasets.DATASETS["cifar10"].std)


def test_mnist_is_read_through_torchvision_and_trains(tmp_path, seed):
    write_mnist(tmp_path, np.random.default_rng(seed))
    data = datasets.load("mnist", "cpu", tmp_path)
    assert data.train_images.shape == (64, 1, 28, 28) and data.test_images.shape == (20, 1, 28, 28)
    assert torch.equal(data.train_labels, torch.arange(64) % 10) and data.mean == (0.1307,)
    record = train.train_run(train.RunConfig("mnist", "nce+rce", "asym", 0.4, seed, 1), data,
                             train.Options(backend="torch", progress=False))
    assert record["status"] == "finished" and record["settings"]["weight_decay"] == 1e-3
    moved = np.array(record["noise"]["transition"])[[7, 2, 5, 6, 3], [1, 7, 6, 5, 8]]
    assert moved.sum() > 0  # MNIST's flips, with probability 0.4 each


def test_cifar100_layout_is_read(tmp_path):
    write_cifar100(tmp_path, np.random.default_rng(0))
    data = datasets.load("cifar100", "cpu", tmp_path)
    assert data.train_images.shape == (200, 3, 32, 32) and data.num_classes == 100
    assert torch.equal(data.test_labels, torch.arange(100) % 100)


def test_digits_split_is_fixed_and_stratified():
    first, second = datasets.load_arrays("digits"), datasets.load_arrays("digits")
    train_x, train_y, test_x, test_y = first
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == np.uint8 and train_x.max() == 255
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert np.abs(np.bincount(test_y) / 360 - np.bincount(train_y) / 1437).max() < 0.01


def test_normalize_equals_torchvision_to_tensor_and_normalize(seed):
    from PIL import Image
    from torchvision import transforms

    info = datasets.DATASETS["cifar10"]
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    theirs = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])(
        Image.fromarray(image))
    augment = datasets.BatchAugment(info, info.mean, info.std, "cpu")
    ours = augment.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_crop_and_flip_gives_crops_of_the_zero_padded_images(seed):
    info = datasets.DATASETS["cifar10"]
    augment = datasets.BatchAugment(info, info.mean, info.std, "cpu")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    out = augment.crop_and_flip(images, generator)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets, flips = set(), 0
    for b in range(images.shape[0]):
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if torch.equal(out[b], (lambda c: c.flip(2) if flip else c)(
                       padded[b, :, top:top + 32, left:left + 32]))]
        assert matches, f"image {b} is not a (flipped) crop of its padded original"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 20 and 10 < flips < 54  # offsets and flips do vary (81 offsets, p = 1/2)


@pytest.mark.parametrize("degrees", [90.0, -90.0, 13.0, -20.0])
def test_rotation_equals_torchvision_rotate(degrees, seed):
    import torchvision.transforms.functional as tvf
    from torchvision.transforms import InterpolationMode

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 255
    ours = datasets.BatchAugment.rotate(images, torch.full((3,), degrees))
    torch.testing.assert_close(ours, tvf.rotate(images, degrees, InterpolationMode.NEAREST), rtol=0, atol=0)


def test_cifar100_batches_are_rotated(seed):
    info = datasets.DATASETS["cifar100"]
    augment = datasets.BatchAugment(info, info.mean, info.std, "cpu")
    images = torch.full((32, 3, 32, 32), 200, dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(seed))
    black = -torch.tensor(info.mean) / torch.tensor(info.std)
    # zero fill shows in a corner the crop's padding never reaches, for most angles
    corner_black = (out[:, :, 4, 4] - black).abs().max(1).values < 1e-4
    assert 0 < corner_black.sum() < 32


# ---------------------------------------------------------------------------------------------
# CIFAR-N human labels

@pytest.mark.parametrize("numpy1_names", [True, False], ids=["numpy1-pickle", "numpy2-pickle"])
def test_cifar10n_label_sets_are_read_from_the_authors_file_format(tmp_path, seed, numpy1_names):
    rng = np.random.default_rng(seed)
    write_cifar10(tmp_path, rng)
    clean = cifar_train_labels(tmp_path, "cifar10")
    sets = human_label_sets(clean, "cifar10", rng)
    write_human_labels(tmp_path, "cifar10", clean, sets, numpy1_names)
    data = datasets.load("cifar10", "cpu", tmp_path, human=True)
    assert set(data.human_labels) == {"aggre", "worse", "random1", "random2", "random3"}
    for name, key in noise.HUMAN_LABEL_SETS["cifar10"].items():
        assert np.array_equal(data.human_labels[name], sets[key])
    # The realized noise and transition matrix are those of the file's labels.
    realized = noise.make_noisy_labels("cifar10", "human", "worse", clean, 10, seed, data.human_labels)
    assert np.array_equal(realized.labels, sets["worse_label"])
    assert realized.rate == pytest.approx(np.mean(sets["worse_label"] != clean))
    counts = np.zeros((10, 10))
    np.add.at(counts, (clean, sets["worse_label"]), 1)
    assert np.allclose(realized.transition, counts / counts.sum(1, keepdims=True))


def test_cifar100n_noisy_labels(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_cifar100(tmp_path, rng)
    clean = cifar_train_labels(tmp_path, "cifar100")
    sets = human_label_sets(clean, "cifar100", rng)
    write_human_labels(tmp_path, "cifar100", clean, sets)
    data = datasets.load("cifar100", "cpu", tmp_path, human=True)
    assert list(data.human_labels) == ["noisy"] and np.array_equal(data.human_labels["noisy"], sets["noisy_label"])


def test_a_label_file_in_another_order_is_refused(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_cifar10(tmp_path, rng)
    clean = cifar_train_labels(tmp_path, "cifar10")
    shuffled = clean.copy()
    while np.array_equal(shuffled, clean):
        shuffled = rng.permutation(clean)
    write_human_labels(tmp_path, "cifar10", shuffled, human_label_sets(shuffled, "cifar10", rng))
    with pytest.raises(datasets.DatasetNotFound, match="clean_label does not match the CIFAR-10 training labels"):
        datasets.load("cifar10", "cpu", tmp_path, human=True)
    write_human_labels(tmp_path, "cifar10", clean[:-1], human_label_sets(clean[:-1], "cifar10", rng))
    with pytest.raises(datasets.DatasetNotFound, match="79 labels for 80 training images"):
        datasets.load("cifar10", "cpu", tmp_path, human=True)


def test_a_missing_or_damaged_label_file_says_where_to_get_it(tmp_path, seed):
    write_cifar10(tmp_path, np.random.default_rng(seed))
    with pytest.raises(datasets.DatasetNotFound, match=r"CIFAR-10_human.pt not found in .*UCSC-REAL/cifar-10-100n"):
        datasets.load("cifar10", "cpu", tmp_path, human=True)
    (tmp_path / "CIFAR-10_human.pt").write_bytes(b"not a torch file")
    with pytest.raises(datasets.DatasetNotFound, match="cannot be read .*download it again"):
        datasets.load("cifar10", "cpu", tmp_path, human=True)
    assert "human label noise exists for CIFAR-10 and CIFAR-100" in datasets.missing("digits", tmp_path, human=True)


# ---------------------------------------------------------------------------------------------
# Missing data and downloads

def test_missing_reports_each_dataset_in_one_line(tmp_path):
    for name, needle in [("cifar10", "cifar-10-batches-py lacks data_batch_1"), ("cifar100", "cifar-100-python lacks train"),
                         ("mnist", "MNIST/raw lacks train-images-idx3-ubyte")]:
        message = datasets.missing(name, tmp_path)
        assert needle in message and "--download" in message and "\n" not in message
    write_mnist(tmp_path, np.random.default_rng(0))
    assert datasets.missing("mnist", tmp_path) is None and datasets.missing("digits") is None


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_download_without_network_is_one_line(dataset, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    # No --threads: the download is tried before the training steps that choose a thread count are timed.
    monkeypatch.setattr(cli, "choose_threads", lambda *args: pytest.fail("timed training before the download"))
    code, stdout, stderr = run_main(["--dataset", dataset, "--losses", "ce", "--noise", "sym:0.2", "--seeds", "1",
                                     "--data-dir", tmp_path / "data", "--download", "--out", tmp_path / "out",
                                     "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "could not download" in stderr and "Temporary failure in name resolution" in stderr
    assert "--data-dir" in stderr and "Traceback" not in stdout + stderr
    assert not list((tmp_path / "out").glob("runs/*"))


# ---------------------------------------------------------------------------------------------
# Files from --data-dir: nothing in them runs, damage is one line naming the file

CIFAR10_ONE_RUN = ["--dataset", "cifar10", "--losses", "ce", "--noise", "sym:0.2", "--seeds", "1", "--epochs", "1",
                   "--backend", "torch", "--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("style", PICKLE_STYLES[1:])
def test_cifar_batches_pickled_by_python_2_or_3_and_numpy_1_or_2_read_alike(style, tmp_path, seed):
    write_cifar10(tmp_path / "a", np.random.default_rng(seed))
    write_cifar10(tmp_path / "b", np.random.default_rng(seed), style)
    assert (tmp_path / "a/cifar-10-batches-py/test_batch").read_bytes() != (
        tmp_path / "b/cifar-10-batches-py/test_batch").read_bytes()
    expected, arrays = datasets.load_arrays("cifar10", tmp_path / "a"), datasets.load_arrays("cifar10", tmp_path / "b")
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(expected, arrays))


class _Runs:
    """Unpickled, calls ``function(*args)``: what a malicious pickle does."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("function", ["os.system", "builtins.exec", "subprocess.call"])
def test_a_cifar_batch_that_would_run_code_is_refused_and_nothing_runs(function, tmp_path, capsys):
    import builtins
    import os
    import subprocess

    write_cifar10(tmp_path, np.random.default_rng(0))
    marker = tmp_path / "PWNED"
    command = f"touch {marker}"
    payload = {"os.system": _Runs(os.system, command),
               "builtins.exec": _Runs(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
               "subprocess.call": _Runs(subprocess.call, ["touch", str(marker)])}[function]
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(cifar_pickle(payload))
    name = f"{payload.function.__module__}.{payload.function.__name__}"  # os.system pickles as posix.system
    with pytest.raises(datasets.DatasetNotFound, match=f"it refers to {name}, which a CIFAR batch never holds"):
        datasets.load_arrays("cifar10", tmp_path)
    code, stdout, stderr = run_main([*CIFAR10_ONE_RUN, "--data-dir", tmp_path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"python -m apl_kernels.reproduce: error: {batch} is not a readable CIFAR-10 batch")
    assert "is refused unread, as unpickling it could run code" in stderr and "download CIFAR-10 again" in stderr
    assert not marker.exists()


DAMAGE = {
    "truncated": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "random bytes": lambda data: np.random.default_rng(0).bytes(len(data)),
    "a list": lambda data: cifar_pickle([1, 2, 3]),
    "no labels": lambda data: cifar_pickle({"data": np.zeros((16, 3072), np.uint8)}),
    "data a string": lambda data: cifar_pickle({"data": "pixels", "labels": [0] * 16}),
    "float pixels": lambda data: cifar_pickle({"data": np.zeros((16, 3072)), "labels": [0] * 16}),
    "too few labels": lambda data: cifar_pickle({"data": np.zeros((16, 3072), np.uint8), "labels": [0] * 15}),
    "string labels": lambda data: cifar_pickle({"data": np.zeros((16, 3072), np.uint8), "labels": ["cat"] * 16}),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cifar_batch_is_one_line_naming_the_file(damage, tmp_path, capsys):
    write_cifar10(tmp_path, np.random.default_rng(0))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(DAMAGE[damage](batch.read_bytes()))
    code, stdout, stderr = run_main([*CIFAR10_ONE_RUN, "--data-dir", tmp_path, "--out", tmp_path / "out"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"python -m apl_kernels.reproduce: error: {batch} is not a readable CIFAR-10 batch (")
    assert "Traceback" not in stdout + stderr and not list((tmp_path / "out").glob("runs/*"))


def test_cifar_files_that_are_not_the_published_ones_are_used_with_a_warning(tmp_path, monkeypatch, capsys):
    import hashlib

    write_cifar10(tmp_path, np.random.default_rng(0))
    folder = tmp_path / "cifar-10-batches-py"
    assert set(datasets.published_md5("cifar10")) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}
    ours = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.glob("*_batch*")}
    monkeypatch.setattr(datasets, "published_md5", lambda name: ours)  # as if these were the official files
    expected = datasets.load_arrays("cifar10", tmp_path)
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(datasets, "published_md5", lambda name: ours | {"data_batch_3": "0" * 32})
    arrays = datasets.load_arrays("cifar10", tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(expected, arrays))  # used
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"warning: {folder}: data_batch_3 differs from the published CIFAR-10 files" in err


@pytest.mark.parametrize("file", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_a_damaged_mnist_file_is_one_line_naming_it(file, tmp_path, capsys):
    write_mnist(tmp_path, np.random.default_rng(0))
    path = tmp_path / "MNIST" / "raw" / file
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    code, stdout, stderr = run_main([*CIFAR10_ONE_RUN, "--dataset", "mnist", "--data-dir", tmp_path,
                                     "--out", tmp_path / "out"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"error: {path} is not a readable MNIST file (" in stderr and "download MNIST again" in stderr


def test_mnist_is_read_from_its_idx_files_not_from_a_legacy_processed_file(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    for name in ("training.pt", "test.pt"):  # torchvision's datasets.MNIST would read these instead
        torch.save((torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)), processed / name)
    train_x, train_y, test_x, _ = datasets.load_arrays("mnist", tmp_path)
    assert train_x.shape == (64, 1, 28, 28) and test_x.shape == (20, 1, 28, 28)
    assert np.array_equal(train_y, np.arange(64) % 10)
