"""WebVision-mini: the real loaders on a tiny WebVision and ILSVRC2012 val in their on-disk layouts,
the published configs, the plan, and a run of the command on one process. The torchrun runs
(2 processes, gloo) are tests/test_reproduce_ddp.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apl_kernels.reproduce import cli, ddp, webvision, webvision_grid
from apl_kernels.reproduce.datasets import DatasetNotFound
from apl_kernels.reproduce.settings import read_csv

from webvision_support import write_jpeg, write_webvision

TINY = ["--model", "tiny_cnn", "--image-size", "16", "--batch-size", "8", "--workers", "0", "--backend", "torch",
        "--no-progress"]


@pytest.fixture
def root(tmp_path, seed):
    labels = write_webvision(tmp_path / "wv", np.random.default_rng(seed))
    return tmp_path / "wv", labels


@pytest.mark.parametrize("mini_list", [False, True])
def test_the_loaders_read_the_real_layouts(tmp_path, seed, mini_list):
    folder = tmp_path / "wv"
    labels = write_webvision(folder, np.random.default_rng(seed), mini_list=mini_list)
    data = webvision.load(folder, image_size=16)
    assert data.train.labels.tolist() == labels["train"]  # labels >= 50 dropped, list order kept
    assert data.val_sets["webvision"].labels.tolist() == labels["webvision"]
    assert data.val_sets["imagenet"].labels.tolist() == labels["imagenet"]  # the 51st folder is not a class
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == labels["train"][0]
    x, _ = data.val_sets["imagenet"][0]
    assert x.shape == (3, 16, 16)


def test_the_published_transforms():
    train, test = webvision.transforms(True), webvision.transforms(False)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize"]
    assert train.transforms[0].size == (224, 224)
    jitter = train.transforms[2]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                                  (-0.2, 0.2))
    assert [type(t).__name__ for t in test.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert test.transforms[0].size == 256 and test.transforms[1].size == (224, 224)
    assert tuple(test.transforms[3].mean) == webvision.IMAGENET_MEAN


def test_one_line_errors(root, tmp_path):
    folder, _ = root
    with pytest.raises(DatasetNotFound, match="WebVision root .* not found"):
        webvision.load(tmp_path / "nowhere")
    (folder / "info" / "val_filelist.txt").rename(folder / "info" / "moved.txt")
    with pytest.raises(DatasetNotFound, match="val_filelist.txt not found"):
        webvision.load(folder)
    (folder / "info" / "moved.txt").rename(folder / "info" / "val_filelist.txt")
    listing = folder / "info" / "train_filelist_google.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[:3] + ["google/q0001/absent.jpg 1"] + lines[3:]) + "\n")
    with pytest.raises(DatasetNotFound, match=r"line 4: .*absent.jpg does not exist \(1 of"):
        webvision.load(folder)
    listing.write_text("\n".join(lines[:2] + ["google/q0001/x.jpg one"]) + "\n")
    with pytest.raises(DatasetNotFound, match="line 3: .* is not 'relative/path.jpg LABEL'"):
        webvision.load(folder)
    listing.unlink()
    with pytest.raises(DatasetNotFound, match="no WebVision training list"):
        webvision.load(folder)
    assert "no WebVision training list" in webvision.missing(folder)


def test_an_undecodable_image_stops_with_its_name(root):
    folder, _ = root
    first = folder / (folder / "info" / "train_filelist_google.txt").read_text().split()[0]
    first.write_bytes(b"not a jpeg")
    data = webvision.load(folder, image_size=16)
    with pytest.raises(webvision.ImageUnreadable, match=f"{first.name}: not a decodable image"):
        data.train[0]


def test_an_undecodable_image_in_a_worker_stops_the_command_with_one_line(root, tmp_path, capsys):
    folder, _ = root
    first = folder / (folder / "info" / "train_filelist_google.txt").read_text().split()[0]
    first.write_bytes(b"\xff\xd8 truncated")
    code = cli.main(["--preset", "webvision", "--losses", "ce", "--epochs", "1", "--data-dir", str(folder),
                     "--out", str(tmp_path / "out"), *TINY, "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and first.name in err[0] and "not a decodable image" in err[0]


def test_the_configs_are_both_papers_rows():
    configs = webvision_grid.published_configs()
    assert set(configs) == set(webvision_grid.LOSSES)
    assert configs["nce+rce"] == {"params": {"alpha": 50.0, "beta": 0.1}, "sources": ["APL", "ANL"],
                                  "settings": {"epochs": 250, "batch_size": 512, "lr": 0.4, "momentum": 0.9,
                                               "nesterov": True, "weight_decay": 3e-5, "grad_clip": 5.0, "l1": 0.0}}
    anl_ce = configs["nce+nnce"]
    assert anl_ce["params"] == {"alpha": 20.0, "beta": 1.0, "min_prob": 1e-7}
    assert (anl_ce["settings"]["weight_decay"], anl_ce["settings"]["l1"]) == (0.0, 5e-6)
    assert configs["nce+agce"]["params"] == {"alpha": 50.0, "beta": 0.1, "q": 3.0, "a": 2.5}
    assert configs["nfl+rce"]["params"] == {"alpha": 50.0, "beta": 0.1, "gamma": 0.5, "official_grad": True}
    assert configs["gce"]["params"] == {"q": 0.7} and configs["sce"]["params"] == {"alpha": 10.0, "beta": 1.0}
    rows = [r for r in read_csv("anl_neurips2023_configs.csv") if r["dataset"] == "webvision"]
    rows += [r for r in read_csv("apl_icml2020_configs.csv") if r["dataset"] == "webvision_mini"]
    assert len(rows) == 13 and all(r["epochs"] == "250" and r["batch"] == "512" for r in rows)
    assert {k: v[1] for k, v in webvision_grid.PUBLISHED_TOP1.items()} == {
        "nce+rce": 62.64, "nce+mae": 62.36, "nce+nnce": 67.44, "nce+agce": 65.00}


def test_dry_run_json_shows_every_setting_of_each_row(tmp_path, capsys):
    code = cli.main(["--preset", "webvision", "--dry-run", "--json", "--data-dir", str(tmp_path),
                     "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    plans = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 2 and "data: no WebVision training list" in captured.err
    assert [p["loss"] for p in plans] == list(webvision_grid.LOSSES)
    by_loss = {p["loss"]: p for p in plans}
    settings = by_loss["nce+rce"]["settings"]
    assert settings == {"model": "resnet50", "epochs": 250, "batch_size": 512, "lr": 0.4, "momentum": 0.9,
                        "nesterov": True, "weight_decay": 3e-5, "grad_clip": 5.0, "lr_step_gamma": 0.97, "l1": 0.0,
                        "sync_bn": False, "image_size": 224, "augment": True,
                        "scheduler": "StepLR(step_size=1, gamma=0.97)"}
    assert by_loss["nce+rce"]["loss_params"]["alpha"] == 50.0 and by_loss["nce+rce"]["loss_params"]["beta"] == 0.1
    assert by_loss["nce+nnce"]["settings"]["weight_decay"] == 0.0 and by_loss["nce+nnce"]["settings"]["l1"] == 5e-6
    assert by_loss["nce+nnce"]["published_webvision_top1"] == {"paper": "ANL", "value": 67.44}
    assert by_loss["ce"]["published_webvision_top1"] is None
    code = cli.main(["--preset", "webvision", "--dry-run", "--json", "--sync-bn", "--shard", "1/3",
                     "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    plans = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2
    assert [p["loss"] for p in plans] == list(webvision_grid.LOSSES[1::3]) and all(p["settings"]["sync_bn"] for p in plans)


def test_one_process_trains_and_reports(root, tmp_path, capsys):
    folder, labels = root
    out = tmp_path / "out"
    argv = ["--preset", "webvision", "--losses", "nce+rce,nce+nnce", "--epochs", "2", "--data-dir", str(folder),
            "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    record = json.loads((out / "runs" / "webvision_nce+rce_seed1.json").read_text())
    assert record["status"] == "finished" and record["epochs_done"] == 2
    history = record["history"]
    for name in ddp.METRICS:
        assert len(history[name]) == 2, name
    assert all(0 <= a <= b <= 100 for a, b in zip(history["webvision_top1"], history["webvision_top5"]))
    assert history["lr"] == pytest.approx([0.4, 0.4 * 0.97])
    assert record["options"]["world_size"] == 1 and record["options"]["bf16"] is False
    assert record["options"]["channels_last"] is False
    assert record["published_webvision_top1"] == {"paper": "APL", "value": 62.64}
    assert record["config"]["settings"]["l1"] == 0.0
    anl = json.loads((out / "runs" / "webvision_nce+nnce_seed1.json").read_text())
    assert anl["settings"]["weight_decay"] == 0.0 and anl["settings"]["l1"] == 5e-6
    report = (out / "results.md").read_text()
    assert "| nce+rce | 1 |" in report and "62.64" in report and "67.44" in report
    assert not list((out / "checkpoints").glob("*.pt"))
    # --report rebuilds the same report from the results alone, naming a damaged file it skips
    (out / "results.md").unlink()
    (out / "runs" / "webvision_ce_seed9.json").write_text("{not json")
    capsys.readouterr()
    assert cli.main(["--report", str(out)]) == 0
    assert (out / "results.md").read_text() == report
    assert "webvision_ce_seed9.json: damaged" in capsys.readouterr().err
    (out / "runs" / "webvision_ce_seed9.json").unlink()
    # three epochs now: the finished result is of other settings
    assert cli.main(argv[:5] + ["3"] + argv[6:]) == 2
    assert "other settings" in capsys.readouterr().err


def test_speed_options_are_recorded(root, tmp_path):
    folder, _ = root
    out = tmp_path / "out"
    assert cli.main(["--preset", "webvision", "--losses", "ce", "--epochs", "1", "--bf16", "--channels-last",
                     "--data-dir", str(folder), "--out", str(out), *TINY]) == 0
    record = json.loads((out / "runs" / "webvision_ce_seed1.json").read_text())
    options = record["options"]
    assert (options["bf16"], options["channels_last"], options["compile"], options["backend"]) == (True, True, False, "torch")
    assert all(v is not None and 0 <= v <= 100 for v in record["history"]["imagenet_top5"])
