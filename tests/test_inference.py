"""Folder inference: every good case predicted, every bad one recorded with its reason, masks on the input grid."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image
from torch import nn

from medtl3d.data.io import load_image
from medtl3d.data.phantoms import generate_ctpa
from medtl3d.data.presets import preset
from medtl3d.data.windows import slice_windows, take_window
from medtl3d.engine._checkpoint import save_checkpoint
from medtl3d.errors import DataError, TrainingError
from medtl3d.inference import CaseInferer, infer_folder
from medtl3d.inference.cli import add_parser, parse_preset_options, run
from medtl3d.locking import LOCK_NAME
from medtl3d.strategies import create_model

EXAMPLE_4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
CONFIG_3D = {"backbone": "cbr_tiny", "strategy": "random", "num_classes": 1, "spatial_dims": 3, "in_channels": 1}


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {row["case_id"] or Path(row["path"]).name: row for row in rows}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medtl3d")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["infer", *argv]))


@pytest.fixture(scope="module")
def ctpa(tmp_path_factory):
    """Two CTPA phantoms (20 slices of 32x32) written as NIfTI and, identical, as DICOM series."""
    root = tmp_path_factory.mktemp("ctpa")
    generate_ctpa(root / "nifti", 2, shape=(20, 32, 32), seed=3)
    generate_ctpa(root / "dicom", 2, shape=(20, 32, 32), fmt="dicom", seed=3)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(**CONFIG_3D)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint({"model": model.state_dict(), "initial_state": model.initial_state, "model_config": CONFIG_3D},
                    path)
    return path


def test_folder_inference_acceptance(ctpa, checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for case in sorted((ctpa / "nifti" / "images").iterdir()):
        shutil.copy(case, folder / case.name)
    shutil.copytree(ctpa / "dicom" / "dicom" / "ctpa_0000", folder / "series_a")
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken").mkdir()
    shutil.copy(pydicom.data.get_testdata_file("MR_truncated.dcm"), folder / "broken" / "MR_truncated.dcm")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), folder / "nans.nii.gz")
    shutil.copy(EXAMPLE_4D, folder / "fmri.nii.gz")
    out = tmp_path / "out"

    status = _cli(["--model", str(checkpoint), "--preset", "ct", "--preset-option", "size=32", "--task", "binary",
                   "--input", str(folder), "--output", str(out), "--num-slices", "8", "--overlap", "2",
                   "--no-progress"])
    assert status == 1
    printed = capsys.readouterr().out
    assert "8 case(s): 3 ok, 5 failed or skipped" in printed and str(out / "predictions.csv") in printed

    rows = _rows(out / "predictions.csv")
    assert set(rows) == {"ctpa_0000", "ctpa_0001", "series_a", "broken", "nans", "fmri", "empty", "notes.txt"}
    for name in ("ctpa_0000", "ctpa_0001", "series_a"):
        assert rows[name]["status"] == "ok" and rows[name]["reason"] == ""
        assert 0.0 <= float(rows[name]["probability"]) <= 1.0
        assert rows[name]["prediction"] == str(int(float(rows[name]["probability"]) > 0.5))
        assert rows[name]["windows"] == "3"  # 20 slices, 8 per window, step 6: (0, 8), (6, 14), (12, 20)
    assert rows["series_a"]["kind"] == "dicom" and rows["ctpa_0000"]["kind"] == "nifti"
    # the DICOM series holds the same phantom as ctpa_0000.nii.gz: same prediction through the other reader
    assert float(rows["series_a"]["probability"]) == pytest.approx(float(rows["ctpa_0000"]["probability"]),
                                                                   abs=1e-5)
    expected = {"broken": ("failed", "pixel data"), "nans": ("failed", "NaN"), "fmri": ("failed", "4-D NIfTI"),
                "empty": ("skipped", "empty folder"), "notes.txt": ("skipped", "not a DICOM, NIfTI or PNG")}
    for name, (state, why) in expected.items():
        assert rows[name]["status"] == state and why in rows[name]["reason"], rows[name]
        assert rows[name]["probability"] == ""

    # the probability is the max over the windows' sigmoids, computed here by hand
    model = create_model(**CONFIG_3D)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    volume = preset("ct", train=False, size=32)({"image": load_image(folder / "ctpa_0001.nii.gz")})["image"]
    windows = torch.stack([take_window(volume, a, b) for a, b in slice_windows(volume.shape[1], 8, 2)])
    with torch.no_grad():
        by_hand = torch.sigmoid(model.eval()(windows)).max().item()
    assert float(rows["ctpa_0001"]["probability"]) == pytest.approx(by_hand, abs=1e-6)

    summary = json.loads((out / "predictions.json").read_text())
    assert (summary["n_cases"], summary["n_ok"], summary["n_failed"], summary["n_skipped"]) == (8, 3, 5, 2)
    assert {f["status"] for f in summary["failures"]} == {"failed", "skipped"}
    # no temp files or journal left; the (released) lock file stays, as filelock keeps it
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "predictions.csv", "predictions.json"]


def test_cli_exit_status_0_when_all_ok_and_2_on_bad_arguments(ctpa, checkpoint, tmp_path, capsys):
    args = ["--model", str(checkpoint), "--preset", "ct", "--task", "binary", "--input", str(ctpa / "nifti" / "images"),
            "--output", str(tmp_path / "out"), "--no-progress"]
    assert _cli([*args, "--preset-option", "size=32", "--aggregation", "mean", "--num-slices", "24"]) == 0
    assert all(row["status"] == "ok" and row["windows"] == "1" for row in _rows(tmp_path / "out" / "predictions.csv")
               .values())
    capsys.readouterr()
    assert _cli([*args, "--preset-option", "sise=32"]) == 2
    assert "no option 'sise'" in capsys.readouterr().err
    assert _cli([*args, "--num-slices", "8", "--overlap", "8"]) == 2
    assert "overlap=8" in capsys.readouterr().err
    assert _cli([*args[:1], str(tmp_path / "missing.pt"), *args[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert parse_preset_options(["window=-100,900", "spacing=None", "orientation=LPS", "size=(64, 48)"]) == {
        "window": (-100, 900), "spacing": None, "orientation": "LPS", "size": (64, 48)}
    with pytest.raises(DataError, match="KEY=VALUE"):
        parse_preset_options(["size"])


class _Threshold(nn.Module):
    """Two-class 'segmenter': foreground where the windowed intensity is above 0.5 (HU > 400)."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def test_segmentation_masks_land_on_the_original_grid(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1500, (30, 26, 12)).astype(np.float32)
    affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(hu, affine), folder / "vol.nii.gz")
    blob = np.zeros((20, 28), dtype=np.uint8)
    blob[5:12, 3:20] = 255
    Image.fromarray(blob).save(folder / "film.png")

    # identity geometry in-plane (size = the volume's rows x columns): the mask is exactly HU > 400
    summary = infer_folder(_Threshold(), "ct", folder / "vol.nii.gz", tmp_path / "same", task="segmentation",
                           preset_options={"size": (26, 30)}, progress=False)
    assert (summary.n_ok, summary.n_failed) == (1, 0)
    rows = _rows(tmp_path / "same" / "predictions.csv")
    mask = nib.load(rows["vol"]["mask"])
    assert mask.shape == hu.shape and np.allclose(mask.affine, affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), hu > 400)
    assert int(rows["vol"]["foreground_voxels"]) == int((hu > 400).sum()) and rows["vol"]["labels"] == "1"

    # resampled (spacing, resize, slice windows) and inverted back: same grid, mostly the same voxels
    summary = infer_folder(_Threshold(), "ct", folder / "vol.nii.gz", tmp_path / "resampled", task="segmentation",
                           preset_options={"size": 16, "spacing": (1.0, 1.0, 2.0)}, num_slices=8, overlap=4,
                           progress=False)
    mask = nib.load(tmp_path / "resampled" / "masks" / "vol.nii.gz")
    assert summary.n_ok == 1 and mask.shape == hu.shape and np.allclose(mask.affine, affine)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}

    # 2D: a PNG through the cxr preset, resized to 16x16 and back
    capsys.readouterr()
    summary = infer_folder(_Threshold(), "cxr", folder / "film.png", tmp_path / "film", task="segmentation",
                           preset_options={"size": 16}, progress=True)
    assert "inference:" not in capsys.readouterr().err  # progress bars on a terminal only, never in a log file
    mask = np.asarray(nib.load(tmp_path / "film" / "masks" / "film.nii.gz").dataobj)
    assert summary.n_ok == 1 and mask.shape == (28, 20)  # MONAI's (x, y) grid of the PNG
    assert (mask.T == (blob > 127)).mean() > 0.95


def test_multiclass_2d_batches_across_cases(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + 4 * k, 36), dtype=np.uint8)).save(folder / f"img{k}.png")
    torch.manual_seed(0)
    model = create_model("cbr_tiny", "random", num_classes=3, spatial_dims=2, in_channels=1).eval()
    names = ["normal", "pneumonia", "covid"]
    results = []
    for batch_size in (1, 2, 4):
        out = tmp_path / f"out{batch_size}"
        summary = infer_folder(model, "cxr", folder, out, task="multiclass", class_names=names,
                               batch_size=batch_size, preset_options={"size": 32}, progress=False)
        assert summary.n_ok == 5 and summary.n_failed == 0
        rows = _rows(out / "predictions.csv")
        assert list(rows) == [f"img{k}" for k in range(5)]  # case order kept
        probs = np.array([[float(row[f"prob_{n}"]) for n in names] for row in rows.values()])
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert [row["prediction"] for row in rows.values()] == [names[i] for i in probs.argmax(1)]
        results.append(probs)
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)
    np.testing.assert_allclose(results[0], results[2], atol=1e-5)
    with pytest.raises(TrainingError, match="class_names .* has 2 names"):
        infer_folder(model, "cxr", folder, tmp_path / "bad", task="multiclass", class_names=["a", "b"])


def test_interrupted_run_leaves_no_half_written_csv(ctpa, tmp_path):
    class Interrupting(nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        infer_folder(Interrupting(), "ct", ctpa / "nifti" / "images", out, preset_options={"size": 32},
                     batch_size=1, progress=False)
    assert not (out / "predictions.csv").exists() and not (out / "predictions.json").exists()


def test_a_model_that_fails_fails_its_cases_not_the_run(ctpa, tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory (simulated)")

    summary = infer_folder(Broken(), "ct", ctpa / "nifti" / "images", tmp_path, preset_options={"size": 32},
                           progress=False)
    assert summary.n_ok == 0 and summary.n_failed == 2
    assert all("RuntimeError: CUDA out of memory (simulated)" == f["reason"] for f in summary.failures)


def test_case_inferer_batches_windows_across_cases_and_fails_only_the_batch_the_model_fails_on():
    """Windows of one shape share a batch across cases (at most batch_size); a shape change runs the batch; a batch
    the model fails on fails its cases, the others get their windows' logits (here each window's sum)."""
    calls = []

    class Sum(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            if (x < 0).any():
                raise RuntimeError("negative input")
            return x.flatten(1).sum(1, keepdim=True)

    film = torch.ones(1, 4, 4)  # 2D: no slices to window
    a = torch.ones(1, 4, 2, 2)  # 2 windows of 2 slices
    b = torch.full((1, 2, 3, 3), 2.0)  # 1 window of another shape
    c = -torch.ones(1, 2, 3, 3)  # the model fails on it, and on b, in the same batch
    d = torch.ones(1, 6, 2, 2)  # 3 windows
    film_out, a_out, b_out, c_out, d_out = CaseInferer("binary", num_slices=2, batch_size=3)([film, a, b, c, d],
                                                                                           Sum())
    assert calls == [(2, 1, 2, 2, 2), (2, 1, 2, 3, 3), (3, 1, 2, 2, 2)]
    assert isinstance(film_out, DataError) and "num_slices needs 3D (C, D, H, W) inputs" in str(film_out)
    assert b_out is c_out and str(c_out) == "negative input"
    assert a_out.tolist() == [[8.0], [8.0]] and d_out.tolist() == [[8.0], [8.0], [8.0]]
