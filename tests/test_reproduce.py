"""The reproduction: data pipeline, trainer and ``python -m apl_kernels.reproduce`` end to end.

The end-to-end tests write a small CIFAR-10 in torchvision's on-disk layout
(``cifar-10-batches-py/``) and read it through the loader users run.
"""

import csv
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import apl_kernels
from apl_kernels.reproduce import cli, cost, datasets, grid, report, settings, train
from apl_kernels.catalogue import make_spec

TRAIN_PER_BATCH, TEST_IMAGES = 16, 20  # 5 x 16 training images


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    """A small CIFAR-10 in torchvision's layout: pickled dicts of (N, 3072) uint8 rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{i}", TRAIN_PER_BATCH) for i in range(1, 6)] + [("test_batch", TEST_IMAGES)]
    for name, count in files:
        labels = rng.permutation(np.arange(count) % 10).tolist()
        batch = {"batch_label": name, "labels": labels,
                 "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
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


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trained_count(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("trained "))
    return int(line.split()[1])


# ---------------------------------------------------------------------------------------------
# Data pipeline

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
# Presets and parameters

def test_paper_preset_has_every_paper_row_of_the_catalogue():
    issue_rows = ["ce", "fl", "gce", "sce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce", "nce+rce",
                  "nce+mae", "nfl+rce", "nfl+mae", "ngce+rce", "ngce+mae", "gce+rce", "gce+mae",
                  "gce+nce", "mae+rce", "nfl+nce", "ngce+nce"]
    preset = settings.PRESETS["paper"]
    assert list(preset.losses) == issue_rows
    assert cli.parse_noise(preset.noise) == [("sym", r) for r in (0.0, 0.2, 0.4, 0.6, 0.8)] + [
        ("asym", r) for r in (0.1, 0.2, 0.3, 0.4)]
    assert len(cli.parse_seeds(preset.seeds)) == 3
    runs = grid.build_grid("cifar10", preset.losses, cli.parse_noise(preset.noise), [1, 2, 3], 120)
    assert len({run.run_id for run in runs}) == len(runs) == 23 * 9 * 3


def test_paper_loss_parameters_are_the_spec_ones():
    params = settings.loss_params
    assert params("nce+rce", "sym", 10) == {"alpha": 1.0, "beta": 1.0}
    assert params("nfl+mae", "asym", 10) == {"gamma": 0.5, "official_grad": True, "alpha": 1.0, "beta": 1.0}
    assert params("fl", "sym", 10) == {"gamma": 0.5, "official_grad": True}
    assert params("gce", "sym", 10) == {"q": 0.7} and params("gce+nce", "sym", 10)["q"] == 0.7
    assert params("ngce", "sym", 10) == {"q": 0.1} and params("ngce+rce", "asym", 10)["q"] == 0.1
    assert params("sce", "sym", 10) == {"alpha": 0.1, "beta": 1.0}
    assert params("nfl", "sym", 10)["scale"] == 10.0 and params("nfl", "asym", 10)["scale"] == 1.0
    assert params("nce", "sym", 10) == {} and params("ce", "asym", 10) == {}
    # NRCE alone at the published code's effective scale A (K-1)^2 / 4, A = -ln(1e-4)
    assert params("nrce", "sym", 10)["scale"] == pytest.approx(9.2103404 * 81 / 4)
    # NMAE alone at the published code's 1 / (2 (K-1)): half the exact normalization
    assert params("nmae", "sym", 10) == {"scale": 0.5}
    for loss in settings.PRESETS["paper"].losses:  # every one is accepted by the catalogue
        make_spec(loss, **params(loss, "sym", 10))


def test_shards_cover_the_grid_exactly_once():
    runs = grid.build_grid("cifar10", ["ce", "nce", "nce+rce"], cli.parse_noise("sym:0.0,0.4 asym:0.2"),
                                [1, 2], 2)
    for count in (1, 2, 3, 5, 7):
        shards = [grid.shard(runs, i, count) for i in range(count)]
        ids = [run.run_id for part in shards for run in part]
        assert sorted(ids) == sorted(run.run_id for run in runs)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---------------------------------------------------------------------------------------------
# Trainer

def test_interrupted_run_resumes_from_its_checkpoint_with_the_same_result(tmp_path):
    data = datasets.load("digits")
    config = train.RunConfig("digits", "nce+rce", "sym", 0.4, seed=3, epochs=3)
    options = train.Options(backend="torch", progress=False)
    uninterrupted = train.train_run(config, data, options)

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train.train_run(config, data, options, checkpoint, on_epoch=stop_after_two)
    assert checkpoint.exists()
    resumed = train.train_run(config, data, options, checkpoint)
    assert resumed["resumed_at_epochs"] == [2] and resumed["epochs_done"] == 3
    for metric in train.METRICS:
        assert resumed["history"][metric] == pytest.approx(uninterrupted["history"][metric], rel=1e-6)
    other = dataclasses.replace(config, seed=4)
    with pytest.raises(train.ConfigMismatch, match="another configuration"):
        train.train_run(other, data, options, checkpoint)


def test_a_run_whose_loss_becomes_nan_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(settings.SETTINGS, "digits", dataclasses.replace(settings.SETTINGS["digits"], lr=1e35))
    runs = [train.RunConfig("digits", loss, "sym", 0.0, 1, 2) for loss in ("ce", "mae")]
    options = train.Options(backend="torch", progress=False)
    trained = grid.run_grid(runs, tmp_path, options)
    assert trained == runs
    for run in runs:
        text = grid.result_path(tmp_path, run).read_text()
        record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert record["status"] == "diverged" and record["final_test_acc"] is None
        assert record["history"]["train_loss"][record["diverged_at_epoch"] - 1] is None
    report.write_report(tmp_path)
    assert "diverged" in (tmp_path / "results.md").read_text()


def test_training_leaves_the_clean_labels_alone(seed):
    data = datasets.load("digits")
    train_labels, test_labels = data.train_labels.clone(), data.test_labels.clone()
    record = train.train_run(train.RunConfig("digits", "ce", "sym", 0.8, seed, 1), data,
                             train.Options(backend="torch", progress=False))
    assert torch.equal(data.train_labels, train_labels) and torch.equal(data.test_labels, test_labels)
    assert record["noise"]["realized_rate"] == pytest.approx(10 * int(0.8 * 1437 / 10) / 1437)


def test_on_digits_at_40_percent_symmetric_noise_nce_and_nce_rce_beat_ce_by_10_points(seed):
    """The paper's headline effect on real data, with the quick preset's settings."""
    data = datasets.load("digits")
    options = train.Options(backend="torch", progress=False)
    accuracy = {}
    for loss in ("ce", "nce", "nce+rce"):
        config = train.RunConfig("digits", loss, "sym", 0.4, seed, settings.SETTINGS["digits"].epochs,
                                 settings.loss_params(loss, "sym", 10))
        accuracy[loss] = train.train_run(config, data, options)["final_test_acc"]
    assert accuracy["nce"] >= accuracy["ce"] + 10, accuracy
    assert accuracy["nce+rce"] >= accuracy["ce"] + 10, accuracy


# ---------------------------------------------------------------------------------------------
# The command line, end to end

GRID = ["--dataset", "cifar10", "--losses", "ce,nce+rce", "--noise", "sym:0.4", "asym:0.2",
        "--seeds", "1", "--epochs", "2", "--backend", "torch", "--no-progress", "--threads", "1"]


def json_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}


def test_cli_interrupted_sharded_grid_finishes_only_missing_runs_and_writes_every_output(
        cifar10_root, tmp_path, capsys):
    out = tmp_path / "grid"
    common = [*GRID, "--data-dir", cifar10_root, "--out", out]
    runs = grid.build_grid("cifar10", ["ce", "nce+rce"], cli.parse_noise("sym:0.4 asym:0.2"), [1], 2)
    shard_ids = [{f"{run.run_id}.json" for run in grid.shard(runs, i, 2)} for i in range(2)]

    # 1. Shard 0/2 in a separate process, interrupted (Ctrl-C) once its first run is written.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(apl_kernels.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-m", "apl_kernels.reproduce", *map(str, common), "--shard", "0/2"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not json_files(out) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "run the same command again" in stderr.strip().splitlines()[-1]
    first = json_files(out)
    assert first and set(first) < shard_ids[0]
    started = [p.stem for p in (out / "checkpoints").glob("*.pt")]

    # 2. The same command again trains only the missing runs of shard 0.
    code, stdout, _ = run_main([*common, "--shard", "0/2"], capsys)
    assert code == 0 and trained_count(stdout) == len(shard_ids[0]) - len(first)
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

    # 4. The whole grid again: nothing left to train.
    code, stdout, _ = run_main(common, capsys)
    assert code == 0 and trained_count(stdout) == 0

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


def test_dry_run_lists_the_runs_and_estimates_their_cost(tmp_path, capsys):
    code, stdout, _ = run_main(["--preset", "quick", "--dry-run", "--backend", "torch", "--out", tmp_path], capsys)
    assert code == 0
    listed = [line for line in stdout.splitlines() if line.strip().startswith("digits_")]
    assert len(listed) == 7 * 4 and all("to run" in line for line in listed)
    assert "PFLOP" in stdout and "hours on this device" in stdout
    assert not (tmp_path / "runs").exists()  # nothing trained


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
])
def test_bad_input_gives_a_one_line_error_saying_what_to_do(argv, message, tmp_path, capsys):
    code, stdout, stderr = run_main(["--preset", "quick", *argv, "--out", tmp_path, "--dry-run"], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("python -m apl_kernels.reproduce: error: ")
    assert message in stderr


def test_missing_dataset_directory_says_how_to_get_it(tmp_path, capsys):
    code, _, stderr = run_main(["--dataset", "cifar10", "--losses", "ce", "--noise", "sym:0.2", "--seeds", "1",
                                "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out", "--device", "cpu",
                                "--no-progress"], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert "CIFAR-10 not found" in stderr and "--data-dir" in stderr and "--download" in stderr
