"""The presets and the published parameters: the curated table (data/published_params.csv) held
against the raw published configs and the spec's per-dataset table, the run plan of
``--dry-run --json``, and the notes of results.md."""

import csv
import io
import json
from importlib import resources

import pytest

from apl_kernels.batch_losses import BATCH_LOSSES
from apl_kernels.catalogue import available_losses, make_spec
from apl_kernels.reproduce import cli, grid, report, settings, store
from apl_kernels.reproduce.settings import published, training_settings
from reproduce_support import run_main


def raw_csv(name: str) -> list[dict]:
    text = resources.files("apl_kernels.reproduce").joinpath(f"data/{name}").read_text()
    return list(csv.DictReader(io.StringIO(text)))


def numbers(row: dict, columns) -> dict:
    return {k: float(row[k]) for k in columns if row.get(k, "") != ""}


# ---------------------------------------------------------------------------------------------
# Presets

PAPER_ROWS = {
    "cifar10": ["ce", "fl", "gce", "sce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce", "nce+rce",
                "nce+mae", "nfl+rce", "nfl+mae", "ngce+rce", "ngce+mae", "gce+rce", "gce+mae",
                "gce+nce", "mae+rce", "nfl+nce", "ngce+nce"],
    # The paper's MNIST tables have no NFL, NGCE, NMAE, NRCE or MAE+RCE row.
    "mnist": ["ce", "fl", "gce", "sce", "mae", "rce", "nce", "nce+rce", "nce+mae", "nfl+rce", "nfl+mae",
              "ngce+rce", "ngce+mae", "gce+rce", "gce+mae", "gce+nce", "nfl+nce", "ngce+nce"],
}


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "cifar100"])
def test_paper_preset_has_every_paper_row_of_the_catalogue(dataset):
    preset = settings.PRESETS["paper"]
    losses = preset.loss_list(dataset)
    published_rows = {r["loss"] for r in settings.paper_results() if r["dataset"] == dataset}
    assert set(losses) == published_rows - {"nlnl", "dmi"}  # NLNL and DMI are not losses of the library
    if dataset in PAPER_ROWS:
        assert sorted(losses) == sorted(PAPER_ROWS[dataset])
    cells = cli.parse_noise(preset.noise, dataset)
    assert cells == [("sym", r) for r in (0.0, 0.2, 0.4, 0.6, 0.8)] + [("asym", r) for r in (0.1, 0.2, 0.3, 0.4)]
    runs = grid.build_grid(dataset, losses, cells, [1, 2, 3])
    assert len({run.run_id for run in runs}) == len(runs) == len(losses) * 9 * 3
    assert {run.epochs for run in runs} == {settings.SETTINGS[dataset].epochs}


def test_the_later_and_human_noise_presets():
    assert settings.PRESETS["anl"].losses == ("nce+nnce", "nfl+nnfl", "nce+agce", "nce+aul", "nce+ael", "anl-ce-er")
    cifar10n = settings.PRESETS["cifar10n"]
    assert cifar10n.dataset == "cifar10" and cifar10n.loss_list("cifar10") == settings.paper_losses("cifar10")
    assert cli.parse_noise(cifar10n.noise, "cifar10") == [
        ("human", s) for s in ("aggre", "random1", "random2", "random3", "worse")]
    for preset in settings.PRESETS.values():
        assert set(preset.loss_list(preset.dataset)) <= set(available_losses()) | set(BATCH_LOSSES)
    with pytest.raises(settings.UsageError, match="CIFAR-100's human label sets are noisy"):
        cli.parse_noise("human:aggre", "cifar100")
    with pytest.raises(settings.UsageError, match="human noise is CIFAR-10N's and CIFAR-100N's"):
        cli.parse_noise("human:aggre", "mnist")


# ---------------------------------------------------------------------------------------------
# The published parameters

def test_cifar10_parameters_are_the_spec_ones():
    def params(loss, noise, variant="paper"):
        return published("cifar10", loss, noise, variant).params

    assert params("nce+rce", "sym") == {"alpha": 1.0, "beta": 1.0}
    assert params("nfl+mae", "asym") == {"gamma": 0.5, "official_grad": True, "alpha": 1.0, "beta": 1.0}
    assert params("fl", "sym") == {"gamma": 0.5, "official_grad": True}
    assert params("gce", "sym") == {"q": 0.7} and params("gce+nce", "sym")["q"] == 0.7
    assert params("nfl", "sym")["scale"] == 10.0 and params("nfl", "asym") == {"gamma": 0.5, "official_grad": True}
    assert params("nce", "sym") == {} and params("ce", "asym") == {}
    # NRCE alone at the published code's effective scale A (K-1)^2 / 4, A = -ln(1e-4)
    assert params("nrce", "sym")["scale"] == pytest.approx(9.2103404 * 81 / 4)
    assert published("cifar100", "nrce", "sym").params["scale"] == pytest.approx(9.2103404 * 99**2 / 4)
    # NMAE alone at the published code's 1 / (2 (K-1)): half the exact normalization
    assert params("nmae", "sym") == {"scale": 0.5}
    # The two disputed cells: the notes (which produced the numbers) in the preset, the configs' one option away.
    assert params("sce", "sym") == {"alpha": 0.1, "beta": 1.0}
    assert params("sce", "asym") == {"alpha": 0.1, "beta": 5.0}
    assert params("sce", "asym", "released") == {"alpha": 0.1, "beta": 1.0}
    for loss in ("ngce", "ngce+mae", "ngce+rce", "ngce+nce"):
        assert params(loss, "sym")["q"] == 0.7 and params(loss, "asym", "released")["q"] == 0.1


# The spec's "Per-dataset loss parameters" table (paper variant), cell by cell.
SPEC_TABLE = {
    ("mnist", "*", "sce"): {"alpha": 0.01, "beta": 1.0},
    ("mnist", "*", "nce"): {"scale": 10.0},
    ("mnist", "*", "nfl"): {"gamma": 0.5, "official_grad": True},
    ("mnist", "sym", "ngce"): {"q": 0.1, "scale": 10.0},
    ("mnist", "asym", "ngce"): {"q": 0.1},
    ("mnist", "*", "nce+rce"): {"alpha": 1.0, "beta": 10.0},
    ("mnist", "*", "nfl+rce"): {"alpha": 1.0, "beta": 10.0, "gamma": 0.5, "official_grad": True},
    ("mnist", "*", "nce+mae"): {"alpha": 1.0, "beta": 10.0},
    ("mnist", "*", "nfl+mae"): {"alpha": 1.0, "beta": 10.0, "gamma": 0.5, "official_grad": True},
    ("mnist", "*", "ngce+rce"): {"alpha": 1.0, "beta": 10.0, "q": 0.1},
    ("mnist", "*", "ngce+mae"): {"alpha": 1.0, "beta": 10.0, "q": 0.1},
    ("mnist", "*", "gce+rce"): {"alpha": 1.0, "beta": 1.0, "q": 0.7},
    ("mnist", "*", "fl"): {"gamma": 0.5, "official_grad": True},
    ("mnist", "*", "gce"): {"q": 0.7},
    ("cifar100", "sym", "sce"): {"alpha": 6.0, "beta": 0.1},
    ("cifar100", "asym", "sce"): {"alpha": 2.0, "beta": 0.1},
    ("cifar100", "*", "nce"): {},
    ("cifar100", "*", "nfl"): {"gamma": 0.5, "official_grad": True},
    ("cifar100", "*", "ngce"): {"q": 0.3},
    ("cifar100", "sym", "nce+rce"): {"alpha": 10.0, "beta": 0.1},
    ("cifar100", "asym", "nce+rce"): {"alpha": 5.0, "beta": 0.1},
    ("cifar100", "*", "nfl+rce"): {"alpha": 10.0, "beta": 0.1, "gamma": 0.5, "official_grad": True},
    ("cifar100", "sym", "nce+mae"): {"alpha": 10.0, "beta": 1.0},
    ("cifar100", "asym", "nce+mae"): {"alpha": 5.0, "beta": 1.0},
    ("cifar100", "*", "nfl+mae"): {"alpha": 10.0, "beta": 1.0, "gamma": 0.5, "official_grad": True},
    ("cifar100", "*", "ngce+rce"): {"alpha": 10.0, "beta": 0.1, "q": 0.2},
    ("cifar100", "*", "ngce+mae"): {"alpha": 10.0, "beta": 1.0, "q": 0.2},
    ("cifar100", "*", "gce+rce"): {"alpha": 1.0, "beta": 0.1, "q": 0.7},
    ("cifar100", "*", "fl"): {"gamma": 0.5, "official_grad": True},
    ("cifar100", "*", "gce"): {"q": 0.7},
}


@pytest.mark.parametrize("cell", list(SPEC_TABLE), ids="/".join)
def test_per_dataset_parameters_are_the_spec_table(cell):
    dataset, noise, loss = cell
    for kind in (["sym", "asym"] if noise == "*" else [noise]):
        assert published(dataset, loss, kind).params == SPEC_TABLE[cell]


def canonical_config_loss(name: str) -> str:
    return {"focal": "fl"}.get(name, name)


CONFIG_MODELS = {("cifar10", "ToyModel"): "cnn8", ("mnist", "ToyModel"): "cnn4", ("cifar100", "ResNet50"): "resnet50"}


def test_the_released_variant_is_the_released_configs():
    """Every released config file of the APL code (but NLNL's and WebVision's) trains here with its
    own settings and parameters under --settings released."""
    checked = quirks = 0
    for row in raw_csv("apl_icml2020_configs.csv"):
        if row["dataset"] not in settings.SETTINGS or row["criterion"] == "NLNL":
            continue
        dataset, loss = row["dataset"], canonical_config_loss(row["config"])
        cell = published(dataset, loss, row["noise"], "released")
        expected = numbers(row, ("alpha", "beta", "gamma", "q", "scale"))
        if expected.get("scale") == 1.0:
            del expected["scale"]
        if "official_grad" in cell.params:
            expected["official_grad"] = True
        assert cell.params == expected, (dataset, row["noise"], loss)
        if row["criterion"] == "NGCEandMAE" and loss == "ngce+rce":  # the quirk: named, not copied
            assert any("instantiate" in note and "NGCE+MAE" in note for note in cell.notes)
            quirks += 1
        trained = training_settings(dataset, "released", cell.overrides)
        assert trained.model == CONFIG_MODELS[dataset, row["model"]]
        assert (trained.epochs, trained.batch_size, trained.lr, trained.weight_decay, trained.momentum,
                trained.nesterov, trained.lr_min, trained.grad_clip) == (
            int(row["epochs"]), int(row["batch"]), float(row["lr"]), float(row["weight_decay"]),
            float(row["momentum"]), row["nesterov"] == "True", float(row["eta_min"]), float(row["grad_bound"]))
        checked += 1
    assert checked == 3 * 30 and quirks == 3  # 3 datasets x 2 noise kinds x 15 losses


ANL_NAMES = {"anl_ce": "nce+nnce", "anl_fl": "nfl+nnfl", "nce_agce": "nce+agce", "nce_aul": "nce+aul",
             "nce_ael": "nce+ael"}
ANL_MODELS = {"toymodel8l": "cnn8", "toymodel4l": "cnn4", "resnet34": "resnet34"}


@pytest.mark.parametrize("variant", settings.VARIANTS)
def test_the_later_families_train_their_published_configs(variant):
    checked = 0
    for row in raw_csv("anl_neurips2023_configs.csv"):
        if row["loss"] not in ANL_NAMES or row["dataset"] == "webvision":
            continue
        dataset, loss = row["dataset"], ANL_NAMES[row["loss"]]
        for noise in ("sym", "asym"):
            cell = published(dataset, loss, noise, variant)
            expected = numbers(row, ("alpha", "beta", "gamma", "q", "a", "min_prob"))
            if loss == "nfl+nnfl":
                expected["official_grad"] = True
            assert cell.params == expected and cell.variant == "paper" and cell.source == "anl"
            trained = training_settings(dataset, cell.variant, cell.overrides)
            assert trained.model == ANL_MODELS[row["model"]]
            assert (trained.epochs, trained.batch_size, trained.lr, trained.weight_decay, trained.momentum,
                    trained.nesterov, trained.lr_min, trained.grad_clip, trained.l1) == (
                int(row["epochs"]), int(row["batch"]), float(row["lr"]), float(row["weight_decay"]),
                float(row["momentum"]), False, float(row["eta_min"]), float(row["grad_bound"]),
                float(row["delta"] or 0.0))
            checked += 1
    assert checked == 3 * 5 * 2


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_anl_ce_er_trains_its_published_configs(dataset):
    row = next(r for r in raw_csv("anl_neurips2023_configs.csv") if r["config"] == f"{dataset}_anl_ce_er")
    for noise in ("sym", "asym"):
        cell = published(dataset, "anl-ce-er", noise)
        assert cell.params == numbers(row, ("alpha", "beta", "min_prob", "lamb")) and cell.source == "anl"
        trained = training_settings(dataset, cell.variant, cell.overrides)
        assert trained.model == ANL_MODELS[row["model"]]
        assert (trained.epochs, trained.batch_size, trained.lr, trained.weight_decay, trained.momentum,
                trained.lr_min, trained.grad_clip, trained.l1) == (
            int(row["epochs"]), int(row["batch"]), float(row["lr"]), float(row["weight_decay"]),
            float(row["momentum"]), float(row["eta_min"]), float(row["grad_bound"]), float(row["delta"]))


def test_every_table_row_is_a_valid_loss_and_unique():
    seen = set()
    for row in settings.published_table():
        key = tuple(row[k] for k in ("dataset", "noise", "loss", "variant"))
        assert key not in seen
        seen.add(key)
        if row["loss"] == "*":
            assert row["note"] and not set(row) & set(settings.PARAM_COLUMNS)
            continue
        assert row["source"] in ("configs", "notes", "spec", "anl")
        for noise in (["sym", "asym"] if row["noise"] == "*" else [row["noise"]]):
            for variant in (settings.VARIANTS if row["variant"] == "*" else [row["variant"]]):
                params = published(row["dataset"], row["loss"], noise, variant).params
                if row["loss"] in BATCH_LOSSES:
                    BATCH_LOSSES[row["loss"]](**params)
                else:
                    make_spec(row["loss"], **params)


def test_a_loss_without_published_parameters_falls_back_and_says_so():
    cell = published("mnist", "ngce+nce", "sym")
    assert cell.source == "fallback" and cell.params == published("cifar10", "ngce+nce", "sym").params
    assert any("no published parameters" in note and "MNIST" in note for note in cell.notes)
    assert published("digits", "nce+rce", "sym") == published("cifar10", "nce+rce", "sym")
    composed = published("cifar10", "fl+nrce", "asym")
    assert composed.source == "default" and composed.params == {"alpha": 1.0, "beta": 1.0, "gamma": 0.5,
                                                                "official_grad": True}


def test_training_settings_variants():
    assert training_settings("mnist") == settings.SETTINGS["mnist"]
    released = training_settings("mnist", "released")
    assert (released.weight_decay, released.nesterov, released.lr_min) == (1e-2, True, 1e-3)
    assert training_settings("cifar100", "released").model == "resnet50"
    assert training_settings("cifar10", "released") == settings.SETTINGS["cifar10"]
    assert training_settings("cifar10", overrides={"l1": 1e-5}, epochs=3).l1 == 1e-5
    with pytest.raises(ValueError, match="unknown training setting"):
        training_settings("cifar10", overrides={"dropout": 0.5})
    with pytest.raises(ValueError, match="delta must be >= 0"):
        training_settings("cifar10", overrides={"l1": -1.0})


# ---------------------------------------------------------------------------------------------
# The run plan: --dry-run --json

def plan_of(argv, capsys) -> list[dict]:
    # --download: the data is not in --data-dir, and a dry run without it would exit 2 (after the plan)
    code, stdout, stderr = run_main([*argv, "--dry-run", "--json", "--download"], capsys)
    assert code == 0, stderr
    return [json.loads(line) for line in stdout.splitlines()]  # stdout holds the plan and nothing else


def by_cell(plan: list[dict]) -> dict:
    return {(p["loss"], p["noise"], p["rate"], p["seed"]): p for p in plan}


def test_cifar100_plan_lists_the_published_parameters_of_every_cell(tmp_path, capsys):
    plan = plan_of(["--preset", "paper", "--dataset", "cifar100", "--out", tmp_path, "--data-dir", tmp_path], capsys)
    assert len(plan) == 23 * 9 * 3 and len({p["run_id"] for p in plan}) == len(plan)
    cells = by_cell(plan)
    for rate in (0.0, 0.2, 0.4, 0.6, 0.8):
        nce_rce = cells["nce+rce", "sym", rate, 1]
        assert (nce_rce["loss_params"]["alpha"], nce_rce["loss_params"]["beta"]) == (10.0, 0.1)
    for rate in (0.1, 0.2, 0.3, 0.4):
        assert cells["nce+rce", "asym", rate, 2]["loss_params"]["alpha"] == 5.0
        assert cells["sce", "asym", rate, 3]["loss_params"] == {"alpha": 2.0, "beta": 0.1}
    first = plan[0]
    assert set(first) >= {"run_id", "dataset", "loss", "loss_params", "noise", "rate", "seed", "epochs",
                          "settings", "variant", "status", "params_source"}
    assert first["settings"] == {"model": "resnet34", "epochs": 200, "lr": 0.1, "momentum": 0.9,
                                 "weight_decay": 1e-5, "lr_min": 0.0, "batch_size": 128, "grad_clip": 5.0,
                                 "nesterov": False, "l1": 0.0}
    # every parameter with its value, defaults included: NFL's gamma, the scale of the singles
    assert cells["nfl", "sym", 0.2, 1]["loss_params"] == {"scale": 1.0, "gamma": 0.5, "official_grad": True}
    assert cells["ngce+rce", "sym", 0.2, 1]["loss_params"]["q"] == 0.2
    assert any("instantiate NGCE+MAE" in note for note in cells["ngce+rce", "sym", 0.2, 1]["notes"])

    released = by_cell(plan_of(["--preset", "paper", "--dataset", "cifar100", "--settings", "released",
                                "--out", tmp_path / "r", "--data-dir", tmp_path], capsys))
    assert released["nce+rce", "asym", 0.4, 1]["loss_params"]["alpha"] == 10.0
    assert released["ngce", "sym", 0.4, 1]["loss_params"]["q"] == 0.7
    assert released["ce", "sym", 0.0, 1]["settings"]["model"] == "resnet50"


def test_mnist_plan_and_its_settings(tmp_path, capsys):
    plan = by_cell(plan_of(["--preset", "paper", "--dataset", "mnist", "--seeds", "1", "--out", tmp_path,
                            "--data-dir", tmp_path], capsys))
    assert len(plan) == 18 * 9
    nce = plan["nce", "sym", 0.4, 1]
    assert nce["loss_params"]["scale"] == 10.0 and nce["epochs"] == 50
    assert (nce["settings"]["model"], nce["settings"]["weight_decay"], nce["settings"]["nesterov"],
            nce["settings"]["lr_min"]) == ("cnn4", 1e-3, False, 1e-3)
    assert plan["nce+rce", "asym", 0.2, 1]["loss_params"] == {"alpha": 1.0, "beta": 10.0}
    released = by_cell(plan_of(["--dataset", "mnist", "--seeds", "1", "--settings", "released",
                                "--out", tmp_path / "r", "--data-dir", tmp_path], capsys))
    assert (released["ce", "sym", 0.0, 1]["settings"]["weight_decay"],
            released["ce", "sym", 0.0, 1]["settings"]["nesterov"]) == (1e-2, True)


def test_anl_plan_has_weight_decay_0_and_the_l1_penalty(tmp_path, capsys):
    plan = by_cell(plan_of(["--preset", "anl", "--seeds", "1", "--out", tmp_path, "--data-dir", tmp_path], capsys))
    assert {loss for loss, *_ in plan} == set(settings.LATER_LOSSES)
    anl_ce = plan["nce+nnce", "sym", 0.8, 1]
    assert anl_ce["loss_params"]["alpha"] == anl_ce["loss_params"]["beta"] == 5.0
    assert (anl_ce["settings"]["weight_decay"], anl_ce["settings"]["l1"]) == (0.0, 5e-5)
    assert plan["nce+agce", "asym", 0.2, 1]["settings"]["weight_decay"] == 1e-4
    assert plan["nce+agce", "asym", 0.2, 1]["settings"]["l1"] == 0.0
    # --l1 puts the penalty on every run, and into its identity
    with_l1 = by_cell(plan_of(["--preset", "anl", "--seeds", "1", "--l1", "2e-5", "--out", tmp_path / "l1",
                               "--data-dir", tmp_path], capsys))
    assert {p["settings"]["l1"] for p in with_l1.values()} == {2e-5}


def test_the_plan_says_when_the_data_is_missing(tmp_path, capsys):
    code, stdout, stderr = run_main(["--preset", "cifar10n", "--out", tmp_path, "--data-dir", tmp_path,
                                     "--dry-run", "--json"], capsys)
    assert code == 2 and len(stdout.splitlines()) == 23 * 5 * 3  # the plan, then the exit status says it cannot run
    lines = stderr.splitlines()
    assert lines[-2].startswith("data: CIFAR-10 not found") and len([x for x in lines if x.startswith("data: ")]) == 1
    assert lines[-1].startswith("python -m apl_kernels.reproduce: error: the data of this plan is missing")


# ---------------------------------------------------------------------------------------------
# results.md: the paper's numbers and the notes of every dataset

def fake_record(dataset, loss, noise, rate, accuracy, variant="paper"):
    run = grid.build_grid(dataset, [loss], [(noise, rate)], [1], variant=variant)[0]
    return {"config": run.to_dict(), "status": "finished", "final_test_acc": accuracy, "best_test_acc": accuracy,
            "noise": {"realized_rate": rate if isinstance(rate, float) else 0.1},
            "history": {"test_acc": [accuracy]}}


@pytest.mark.parametrize("dataset", ["mnist", "cifar100"])
def test_results_md_puts_mnist_and_cifar100_beside_the_paper(dataset):
    paper = {(r["noise"], r["rate"], r["loss"]): r["mean"] for r in settings.paper_results() if r["dataset"] == dataset}
    records = [fake_record(dataset, "nce+rce", "sym", 0.4, 50.0), fake_record(dataset, "ngce+rce", "asym", 0.1, 40.0),
               fake_record(dataset, "nce+nnce", "sym", 0.4, 45.0)]
    rows = report.summarize(records)
    markdown = report.results_markdown(rows, records)
    expected = paper["sym", 0.4, "nce+rce"]
    assert f"50.00 (paper {expected:.2f}, {50.0 - expected:+.2f})" in markdown
    assert "| nce+nnce | 45.00 |" in markdown  # no published number: none shown
    assert "nce+nnce: no published numbers are available here" in markdown
    if dataset == "cifar100":
        assert "instantiate NGCE+MAE" in markdown and "ResNet-34" in markdown
    else:
        assert "weight decay 1e-3 without Nesterov" in markdown
    released = [fake_record(dataset, "nce+rce", "sym", 0.4, 50.0, "released")]
    assert "the released configs (--settings released)" in report.results_markdown(report.summarize(released), released)


def test_results_md_names_the_cifar10_quirks():
    records = [fake_record("cifar10", loss, "asym", 0.2, 80.0) for loss in ("sce", "ngce+rce", "gce+mae")]
    markdown = report.results_markdown(report.summarize(records), records)
    for quirk in ("omits --asym", "beta = 5 as in the notes", "instantiates NGCE+MAE", "ignores alpha"):
        assert quirk in markdown


# ---------------------------------------------------------------------------------------------
# Names built from file content stay inside the output folder

@pytest.mark.parametrize("field,value", [
    ("rate", "x/../../../escape"), ("rate", "../../../escape"), ("rate", "noisy"), ("loss", "../../../escape"),
    ("rate", 1.5),
])
def test_report_refuses_names_from_a_run_file_that_the_grid_never_makes(field, value, tmp_path, capsys):
    out = tmp_path / "a" / "b"
    (out / "runs").mkdir(parents=True)
    good = fake_record("cifar10", "ce", "human", "aggre", 80.0)
    bad = fake_record("cifar10", "nce", "human" if isinstance(value, str) else "sym", "worse" if isinstance(
        value, str) else 0.4, 70.0)
    bad["config"][field] = value  # "noisy" is CIFAR-100N's label set, not CIFAR-10N's
    (out / "runs" / "good.json").write_text(json.dumps(good))
    (out / "runs" / "bad.json").write_text(json.dumps(bad))
    before = {p for p in tmp_path.rglob("*") if out not in p.parents}
    code, stdout, stderr = run_main(["--report", out], capsys)
    assert code == 0, stderr
    assert f"skipped {out / 'runs' / 'bad.json'}: damaged (not a run result: config.{field} missing or invalid)" in stderr
    assert {p for p in tmp_path.rglob("*") if out not in p.parents} == before  # nothing written outside out
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["grid_cifar10.png", "test_acc_cifar10_human-aggre.png"]


@pytest.mark.parametrize("name", ["x/../../escape.png", "../escape.png", "..", "/tmp/escape.png", "a\x00b", ""])
def test_a_file_name_from_file_content_is_a_file_directly_in_its_folder(name, tmp_path):
    path = store.child(tmp_path / "plots", name)
    assert path.parent == tmp_path / "plots" and path.name not in ("", ".", "..") and "/" not in path.name
