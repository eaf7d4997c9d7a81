"""The trainer: resumption, damaged checkpoints, write errors, divergence, the L1 penalty of ANL,
what a run records, and the paper's effect on real data."""

import dataclasses
import errno
import json

import numpy as np
import pytest
import torch

from apl_kernels import backends
from apl_kernels.reproduce import datasets, grid, models, report, settings, store, train


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One CPU thread: these small networks gain little from two, and lose much when other
    processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


OPTIONS = train.Options(backend="torch", progress=False)


def test_interrupted_run_resumes_from_its_checkpoint_with_the_same_result(tmp_path):
    data = datasets.load("digits")
    config = train.RunConfig("digits", "nce+rce", "sym", 0.4, seed=3, epochs=3)
    options = OPTIONS
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
    # Its checkpoint now holds the last epoch: asked again, the run is returned, not trained or "resumed".
    again = train.train_run(config, data, options, checkpoint)
    assert again["resumed_at_epochs"] == [2] and again["history"] == resumed["history"]
    assert again["wall_time_s"] == resumed["wall_time_s"]
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


ROBUST_ON_DIGITS = ("nce", "nce+rce", "nce+nnce", "nce+agce")


def test_on_digits_at_40_percent_symmetric_noise_the_robust_losses_beat_ce_by_10_points(digits, seed):
    """The paper's headline effect on real data, with the quick preset's settings and parameters."""
    accuracy = {run.loss: train.train_run(run, digits, OPTIONS)["final_test_acc"]
                for run in grid.build_grid("digits", ("ce", *ROBUST_ON_DIGITS), [("sym", 0.4)], [seed])}
    for loss in ROBUST_ON_DIGITS:
        assert accuracy[loss] >= accuracy["ce"] + 10, accuracy


def test_a_fresh_run_records_no_resumption_and_the_backend_that_ran(digits, tmp_path):
    config = train.RunConfig("digits", "ce", "sym", 0.2, seed=1, epochs=1)
    record = train.train_run(config, digits, train.Options(backend="auto", progress=False), tmp_path / "c.pt")
    assert record["resumed_at_epochs"] == []
    assert record["options"]["backend"] == backends.resolve("auto", "cpu").name != "auto"
    assert record["options"]["backend_requested"] == "auto" and record["options"]["threads"] == 1
    assert record["options"]["backends"] == [record["options"]["backend"]]


def flip_bytes(content: bytes, rng) -> bytes:
    """200 bytes XORed with random non-zero bytes somewhere in the middle: what torch.load alone
    reads without complaint when they fall in a tensor's data."""
    start = int(rng.integers(len(content) // 4, 3 * len(content) // 4 - 200))
    damaged = bytearray(content)
    for i, mask in enumerate(rng.integers(1, 256, 200)):
        damaged[start + i] ^= int(mask)
    return bytes(damaged)


DAMAGE = {"truncated": lambda b, rng: b[: rng.integers(1, len(b))], "empty": lambda b, rng: b"",
          "random bytes": lambda b, rng: rng.bytes(len(b)), "flipped bytes": flip_bytes}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_moved_aside_and_its_run_restarts(damage, digits, tmp_path, capsys, seed):
    config = train.RunConfig("digits", "nce+rce", "sym", 0.4, seed=2, epochs=2)
    fresh = train.train_run(config, digits, OPTIONS)
    checkpoint = grid.checkpoint_path(tmp_path, config)

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train_run(config, digits, OPTIONS, checkpoint, on_epoch=stop)
    assert grid.status(tmp_path, config) == "started"
    checkpoint.write_bytes(DAMAGE[damage](checkpoint.read_bytes(), np.random.default_rng(seed)))
    assert grid.status(tmp_path, config) == "damaged"  # what --dry-run lists
    capsys.readouterr()
    record = train.train_run(config, digits, OPTIONS, checkpoint)
    stderr = capsys.readouterr().err
    assert f"warning: {checkpoint} is damaged (not a readable checkpoint: " in stderr, stderr
    assert "restarts from epoch 0" in stderr and "weights_only" not in stderr and stderr.count("\n") == 1
    assert checkpoint.with_name(checkpoint.name + ".corrupt").exists() and record["resumed_at_epochs"] == []
    assert record["history"]["test_acc"] == pytest.approx(fresh["history"]["test_acc"], rel=1e-6)


def test_a_run_resumed_under_another_backend_records_both(digits, tmp_path):
    first = backends.resolve("auto", "cpu").name
    if first == "torch":
        pytest.skip("no compiled backend here: auto is torch")
    config = train.RunConfig("digits", "ce", "sym", 0.2, seed=1, epochs=2)
    checkpoint = tmp_path / "run.pt"

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train_run(config, digits, train.Options(backend="auto", progress=False), checkpoint, on_epoch=stop)
    record = train.train_run(config, digits, OPTIONS, checkpoint)
    assert record["resumed_at_epochs"] == [1]
    assert record["options"]["backend"] == "torch" and record["options"]["backend_requested"] == "torch"
    assert record["options"]["backends"] == [first, "torch"]


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(digits, tmp_path, monkeypatch):
    config = train.RunConfig("digits", "ce", "sym", 0.4, seed=1, epochs=3)
    checkpoint = tmp_path / "run.pt"
    saves = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        saves.append(obj["record"]["epochs_done"])
        if len(saves) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(store.WriteError) as raised:
        train.train_run(config, digits, OPTIONS, checkpoint)
    message = str(raised.value)
    assert message.count("\n") == 0 and f"could not write {checkpoint} (No space left on device)" in message
    assert "the last complete checkpoint of digits_ce_sym0.4_seed1 (epoch 1) is intact" in message
    assert train.read_checkpoint(checkpoint, config)["record"]["epochs_done"] == 1
    assert store.temporaries(tmp_path) == []  # the partial write is gone


def test_the_l1_penalty_is_over_every_parameter(seed):
    torch.manual_seed(seed)
    model = models.DigitsCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # batch norm and biases too: none at zero
    expected = sum(float(p.detach().abs().sum()) for p in model.parameters())
    assert float(train.l1_norm(model).detach()) == pytest.approx(expected, rel=1e-5)
    logits = model(torch.randn(4, 1, 8, 8))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    plain = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    delta = 0.25
    penalized = torch.autograd.grad(train.objective(loss, model, delta), list(model.parameters()))
    for (name, p), g0, g1 in zip(model.named_parameters(), plain, penalized):
        torch.testing.assert_close(g1, g0 + delta * p.detach().sign(), msg=name)
    assert train.objective(loss, model, 0.0) is loss


def test_training_with_l1_shrinks_the_weights_and_identifies_the_run(digits, monkeypatch):
    base = train.RunConfig("digits", "nce+nnce", "sym", 0.4, seed=1, epochs=2,
                           loss_params={"alpha": 5.0, "beta": 5.0}, overrides={"weight_decay": 0.0})
    with_l1 = dataclasses.replace(base, overrides={"weight_decay": 0.0, "l1": 1e-2})
    assert with_l1.run_id == base.run_id and with_l1.to_dict() != base.to_dict()
    built = []
    monkeypatch.setattr(train, "build_model", lambda *args: built.append(models.build_model(*args)) or built[-1])
    for config in (base, with_l1):
        record = train.train_run(config, digits, OPTIONS)
        assert record["settings"]["l1"] == config.settings.l1 and record["settings"]["weight_decay"] == 0.0
    trained_without, trained_with = (float(train.l1_norm(model).detach()) for model in built)
    assert trained_with < 0.8 * trained_without


def test_released_mnist_trains_with_nesterov(tmp_path, seed):
    from reproduce_support import write_mnist

    write_mnist(tmp_path, np.random.default_rng(seed))
    data = datasets.load("mnist", "cpu", tmp_path)
    run = grid.build_grid("mnist", ["ce"], [("sym", 0.2)], [seed], 1, "released")[0]
    record = train.train_run(run, data, OPTIONS)
    assert record["config"]["variant"] == "released"
    assert (record["settings"]["nesterov"], record["settings"]["weight_decay"]) == (True, 1e-2)
