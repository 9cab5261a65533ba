"""Synthetic phantoms: real files the readers accept (NIfTI, DICOM series, PNG), datalists, determinism, lesion and
lung masks, the CLI, and labels a small CNN learns while global intensity statistics do not reveal them."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import mannwhitneyu
from torch import nn

from medtl3d.data.phantoms import _labels_and_patients, add_parser, generate_ctpa, generate_cxr, generate_histology, run
from medtl3d.errors import DataError

monai = pytest.importorskip("monai")
pydicom = pytest.importorskip("pydicom")
from monai.transforms import LoadImage  # noqa: E402


def _items(datalist: Path) -> list[dict]:
    return json.loads(datalist.read_text())["training"]


def _csv_rows(datalist: Path) -> list[dict]:
    with open(datalist.with_name("datalist.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


# ------------------------------------------------------------------------------------------------ files and formats
def test_ctpa_nifti_files_datalist_and_emboli(tmp_path):
    datalist = generate_ctpa(tmp_path, 6, shape=(12, 40, 40), spacing=(2.0, 1.0, 1.0), seed=3)
    assert datalist == tmp_path / "datalist.json"
    items = _items(datalist)
    assert [it["label"] for it in items].count(1) == 3
    rows = _csv_rows(datalist)
    assert list(rows[0]) == ["image", "label", "patient", "lesion"]
    assert [(r["image"], int(r["label"]), r["patient"], r["lesion"]) for r in rows] == [
        (it["image"], it["label"], it["patient"], it["lesion"]) for it in items]
    load = LoadImage(image_only=True)
    for it in items:
        image, mask = load(tmp_path / it["image"]), load(tmp_path / it["lesion"])
        assert image.shape == mask.shape == (40, 40, 12)  # (cols, rows, slices), like MONAI reads DICOM
        assert np.allclose(np.abs(np.diag(image.affine.numpy())[:3]), (1.0, 1.0, 2.0))
        hu, m = image.numpy(), mask.numpy()
        assert hu.min() >= -1024 and (hu < -700).mean() > 0.2 and (hu > 200).sum() > 50  # air/lung, contrast
        assert set(np.unique(m)) <= {0, 1}
        assert it["label"] == int(m.any())
        assert it["slice_labels"] == m.any(axis=(0, 1)).astype(int).tolist()
        if it["label"]:
            # emboli: soft-tissue-like filling defects with contrast-filled lumen around them
            ring = ndimage.binary_dilation(m > 0, iterations=1) & (m == 0)
            assert hu[m > 0].mean() < 180 and hu[ring].max() > 200


def test_ctpa_embolus_burden_options(tmp_path):
    """``embolus_length`` (half-length in artery radii) and ``emboli`` (count range) set the burden: negatives do not
    draw emboli, so they stay byte-identical; a longer range draws the same numbers, so each positive's emboli
    contain those of the shorter one (same centres and widths, longer axes); three emboli cover more lumen than one
    (the 32-voxel volumes' fallback offers the three widest arteries)."""
    kw = {"shape": (16, 32, 32), "seed": 0}
    runs = {name: _items(generate_ctpa(tmp_path / name, 8, **kw, **options)) for name, options in {
        "default": {}, "short": {"embolus_length": (2.0, 2.0)}, "long": {"embolus_length": (6.0, 6.0)},
        "one": {"emboli": (1, 1)}, "three": {"emboli": (3, 3)}}.items()}
    load = LoadImage(image_only=True)

    def volumes(name, key):
        return [load(tmp_path / name / it[key]).numpy() for it in runs[name]]

    labels = [it["label"] for it in runs["default"]]
    assert 0 < sum(labels) < len(labels)
    for name in runs:
        assert [it["label"] for it in runs[name]] == labels
        for label, image, reference in zip(labels, volumes(name, "image"), volumes("default", "image")):
            assert label or np.array_equal(image, reference)
    for label, short, long in zip(labels, volumes("short", "lesion"), volumes("long", "lesion")):
        if label:
            assert short.any() and (long >= short).all() and long.sum() > short.sum()
    positives = [i for i, label in enumerate(labels) if label]
    one, three = volumes("one", "lesion"), volumes("three", "lesion")
    assert sum(three[i].sum() for i in positives) > 1.5 * sum(one[i].sum() for i in positives)


def test_ctpa_dicom_series_matches_nifti(tmp_path):
    kw = {"shape": (8, 32, 36), "spacing": (2.5, 0.8, 0.9), "seed": 5}
    dl_dicom = generate_ctpa(tmp_path / "d", 2, fmt="dicom", **kw)
    dl_nifti = generate_ctpa(tmp_path / "n", 2, fmt="nifti", **kw)
    uids = set()
    for it, ref in zip(_items(dl_dicom), _items(dl_nifti)):
        folder = tmp_path / "d" / it["image"]
        assert folder.is_dir() and it["lesion"] == ref["lesion"] and it["label"] == ref["label"]
        slices = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        assert len(slices) == 8
        slices.sort(key=lambda ds: int(ds.InstanceNumber))
        assert len({ds.StudyInstanceUID for ds in slices}) == len({ds.SeriesInstanceUID for ds in slices}) == 1
        assert len({ds.SOPInstanceUID for ds in slices}) == 8
        uids |= {slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID}
        for k, ds in enumerate(slices):
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
            assert ds.PatientID == it["patient"] and ds.InstanceNumber == k + 1
            assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.9] and float(ds.SliceThickness) == 2.5
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1 and ds.PixelRepresentation == 1
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
        assert np.allclose(np.diff(z), 2.5)
        hu = np.stack([ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
                       for ds in slices])  # (slices, rows, cols)
        nifti = LoadImage(image_only=True)(tmp_path / "n" / ref["image"])
        np.testing.assert_array_equal(hu.transpose(2, 1, 0), nifti.numpy())
        monai_dicom = LoadImage(image_only=True, reader="PydicomReader")(folder)
        np.testing.assert_array_equal(monai_dicom.numpy(), nifti.numpy())
        np.testing.assert_allclose(monai_dicom.affine.numpy(), nifti.affine.numpy(), atol=1e-4)
    assert len(uids) == 4  # each case its own study and series


def test_cxr_pngs_lung_masks_and_opacities(tmp_path):
    items = _items(generate_cxr(tmp_path, 8, size=96, seed=2))
    assert list(_csv_rows(tmp_path / "datalist.json")[0]) == ["image", "label", "mask", "lesion", "patient"]
    assert sum(it["label"] for it in items) == 4
    for it in items:
        image = LoadImage(image_only=True)(tmp_path / it["image"])
        assert image.shape == (96, 96)
        img, lungs, lesion = (_png(tmp_path / it[k]) for k in ("image", "mask", "lesion"))
        assert img.dtype == np.uint8 and lungs.dtype == np.uint8 and img.shape == lungs.shape == (96, 96)
        assert set(np.unique(lungs)) == {0, 1, 2}
        cols = np.arange(96)[None, :]
        assert (cols * (lungs == 1)).sum() / (lungs == 1).sum() < 48 < (cols * (lungs == 2)).sum() / (lungs == 2).sum()
        rows = np.flatnonzero(lungs.any(1))
        assert img[lungs > 0].mean() < img[rows][:, 46:50].mean() - 20  # air-filled lungs darker than mediastinum
        assert set(np.unique(lesion)) <= {0, 1} and it["label"] == int(lesion.any())
        if it["label"]:
            assert np.all(lungs[lesion > 0] > 0)  # opacity inside a lung
            side = np.bincount(lungs[lesion > 0]).argmax()
            clear = (lungs == side) & ~ndimage.binary_dilation(lesion > 0, iterations=2)
            assert img[lesion > 0].mean() > img[clear].mean() + 15


def test_histology_rgb_patches_and_mitoses(tmp_path):
    items = _items(generate_histology(tmp_path, 8, size=96, seed=4))
    assert list(_csv_rows(tmp_path / "datalist.json")[0]) == ["image", "label", "lesion", "patient"]
    for it in items:
        image = LoadImage(image_only=True)(tmp_path / it["image"])
        assert image.shape == (96, 96, 3)
        rgb, lesion = _png(tmp_path / it["image"]), _png(tmp_path / it["lesion"])
        assert rgb.dtype == np.uint8 and rgb.shape == (96, 96, 3)
        assert rgb[..., 0].mean() > rgb[..., 1].mean()  # eosin pink: red above green
        assert it["label"] == int(lesion.any()) and set(np.unique(lesion)) <= {0, 1}
        if it["label"]:
            grey = rgb.astype(float).mean(-1)
            assert grey[lesion > 0].mean() < np.percentile(grey, 5)  # dense, dark chromatin


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    runs = {
        "ctpa": lambda out, s: generate_ctpa(out, 3, shape=(8, 24, 24), fmt="dicom", seed=s),
        "ctpa_nifti": lambda out, s: generate_ctpa(out, 3, shape=(8, 24, 24), seed=s),
        "cxr": lambda out, s: generate_cxr(out, 3, size=48, seed=s),
        "histology": lambda out, s: generate_histology(out, 3, size=48, seed=s),
    }
    for name, make in runs.items():
        make(tmp_path / name / "a", 7)
        make(tmp_path / name / "b", 7)
        make(tmp_path / name / "c", 8)
        a, b, c = (_files(tmp_path / name / k) for k in "abc")
        assert a == b, name
        assert not any(Path(f).name.startswith(".") for f in a), name  # no temporary files left behind
        images = [f for f in a if f.startswith(("images", "dicom"))]
        assert images and all(a[f] != c[f] for f in images), name


def test_patients_group_at_most_two_cases():
    items = []
    for seed in range(3):
        labels, patients = _labels_and_patients(40, 0.5, seed)
        items.append(np.bincount(patients))
        assert labels.sum() == 20
    counts = np.concatenate(items)
    assert counts.max() == 2 and (counts == 2).sum() >= 3 and counts.min() == 1


@pytest.mark.parametrize("call, match", [
    (lambda d: generate_ctpa(d, 0), "n_cases"),
    (lambda d: generate_ctpa(d, 2, fmt="jpeg"), "fmt"),
    (lambda d: generate_ctpa(d, 2, shape=(4, 32, 32)), "shape"),
    (lambda d: generate_ctpa(d, 2, spacing=(1.0, 0.0, 1.0)), "spacing"),
    (lambda d: generate_ctpa(d, 2, emboli=(0, 2)), "emboli"),
    (lambda d: generate_ctpa(d, 2, emboli=(3, 2)), "emboli"),
    (lambda d: generate_ctpa(d, 2, embolus_length=(2.0, 1.0)), "embolus_length"),
    (lambda d: generate_cxr(d, 2, positive_fraction=1.5), "positive_fraction"),
    (lambda d: generate_histology(d, 2, size=16), "size"),
])
def test_bad_options_are_named(tmp_path, call, match):
    with pytest.raises(DataError, match=match):
        call(tmp_path)


def test_cli_entry(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="medtl3d")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["phantoms", "ctpa", "--output", str(tmp_path / "ct"), "--n", "2", "--seed", "1",
                              "--fmt", "dicom", "--shape", "8x24x24"])
    assert run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ct" / "datalist.json")
    assert len(list((tmp_path / "ct" / "dicom").glob("*/*.dcm"))) == 16
    args = parser.parse_args(["phantoms", "histology", "--output", str(tmp_path / "h"), "--n", "3", "--size", "40"])
    assert run(args) == 0 and _png(tmp_path / "h" / "images" / "histo_0002.png").shape == (40, 40, 3)


# ------------------------------------------------------------------------------------------------------ learnability
def _global_statistics(images: np.ndarray) -> np.ndarray:
    """Per channel: mean, std, min, max and the 1/5/25/50/75/95/99th percentiles. images: (N, C, ...)."""
    flat = images.reshape(images.shape[0], images.shape[1], -1).astype(np.float64)
    q = np.percentile(flat, [1, 5, 25, 50, 75, 95, 99], axis=2).transpose(1, 2, 0)
    stats = np.concatenate([flat.mean(2)[..., None], flat.std(2)[..., None], flat.min(2)[..., None],
                            flat.max(2)[..., None], q], axis=2)
    return stats.reshape(images.shape[0], -1)


def _patient_folds(patients: list[str], k: int, seed: int = 0) -> np.ndarray:
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: i % k for i, j in enumerate(order)}
    return np.array([fold_of[p] for p in patients])


def _logistic_cv_auroc(features: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float:
    """Patient-grouped k-fold L2 logistic regression (LBFGS on standardised features); pooled held-out AUROC."""
    scores = np.zeros(len(labels))
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        mu, sd = features[train].mean(0), features[train].std(0) + 1e-8
        x = torch.tensor((features[train] - mu) / sd)
        y = torch.tensor(labels[train], dtype=torch.float64)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        scores[test] = (torch.tensor((features[test] - mu) / sd) @ w).detach().numpy()
    return _auroc(labels, scores)


class _MilCnn(nn.Module):
    """Three conv-BN-ReLU stages, a 1x1 conv scoring every location, log-sum-exp pooling (multiple-instance:
    the case is positive if some location is)."""

    def __init__(self, spatial_dims: int, in_channels: int, widths=(8, 16, 32), sharpness: float = 4.0):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        layers, channels = [], in_channels
        for i, width in enumerate(widths):
            layers += ([pool(2)] if i else []) + [conv(channels, width, 3, padding=1), norm(width), nn.ReLU()]
            channels = width
        self.features, self.score, self.sharpness = nn.Sequential(*layers), conv(channels, 1, 1), sharpness

    def forward(self, x, with_map: bool = False):
        scores = self.score(self.features(x))
        z = scores.flatten(1) * self.sharpness
        logit = (torch.logsumexp(z, 1) - np.log(z.shape[1])) / self.sharpness
        return (logit, scores) if with_map else logit


def _cnn_auroc(images: np.ndarray, labels: np.ndarray, folds: np.ndarray, spatial_dims: int, epochs: int,
               batch: int, lesions: np.ndarray | None = None) -> float:
    """Train on folds != 0, return the AUROC on fold 0 (patient-disjoint). With ``lesions`` the location scores
    are also fitted to the lesion masks max-pooled to their grid (weak localisation)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    pool = nn.MaxPool3d(4) if spatial_dims == 3 else nn.MaxPool2d(4)
    where = None if lesions is None else pool(torch.tensor(lesions, dtype=torch.float32))
    train, test = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    model = _MilCnn(spatial_dims, x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for chunk in torch.tensor(train)[torch.randperm(len(train), generator=gen)].split(batch):
            xb, wb = x[chunk], None if where is None else where[chunk]
            if torch.rand((), generator=gen) < 0.5:
                xb, wb = xb.flip(-1), None if wb is None else wb.flip(-1)
            logit, scores = model(xb, with_map=True)
            loss = nn.functional.binary_cross_entropy_with_logits(logit, y[chunk])
            if wb is not None:
                loss = loss + nn.functional.binary_cross_entropy_with_logits(
                    scores, wb, pos_weight=torch.tensor(60.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(x[c]) for c in torch.tensor(test).split(64)]).numpy()
    return _auroc(labels[test], scores)


def _standardise(images: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, images.ndim))
    return (images - images.mean(axes, keepdims=True)) / (images.std(axes, keepdims=True) + 1e-6)


def _check_learnability(raw, cnn_input, lesions, items, spatial_dims, epochs, batch):
    labels = np.array([it["label"] for it in items])
    patients = [it["patient"] for it in items]
    stats_auroc = _logistic_cv_auroc(_global_statistics(raw), labels, _patient_folds(patients, 5))
    cnn_auroc = _cnn_auroc(cnn_input, labels, _patient_folds(patients, 4, seed=1), spatial_dims, epochs, batch,
                           lesions)
    print(f"global-statistics logistic AUROC {stats_auroc:.3f}, CNN AUROC {cnn_auroc:.3f}")
    assert stats_auroc < 0.72  # margins: see the comment below
    assert cnn_auroc > 0.8


# Margins (issue 14). Earlier, over phantom seeds CTPA 0/5/6/7, CXR 0/1, histology 0/1/2 (training seed 0, one
# thread): logistic 0.51-0.61, CNN 0.92-1.00. Re-measured with the training seed varied along with the phantoms':
# CXR seeds 0-2 (phantoms and training) with 1 thread and seed 0 with 2: logistic 0.515-0.541 (the same for both
# thread counts), CNN 0.959-0.974 (0.9595 vs 0.9598 at 1 vs 2 threads); CTPA and histology at seed 0, 1 thread
# only (1.5-3 min a run on a busy 2-CPU machine): logistic 0.540 / 0.604, CNN 0.987 / 0.942.
# The logistic bound was 0.65, only 0.04 above the worst value seen, so it is 0.72 now: 0.1 above it and still
# far below the CNN's worst (0.92, itself 0.12 above the CNN bound of 0.8): global intensity statistics stay a
# weak cue next to the lesion itself.
# The logistic fit is float64 LBFGS from zeros: it does not depend on the training seed.
# Weak (image-label-only) training of the same CNN was not reliable in so few CPU epochs, hence the location loss.
@pytest.mark.slow
def test_ctpa_emboli_learnable_not_from_global_statistics(tmp_path):
    items = _items(generate_ctpa(tmp_path, 200, shape=(16, 48, 48), spacing=(1.0, 1.0, 1.0), seed=0))
    load = LoadImage(image_only=True)
    raw = np.stack([load(tmp_path / it["image"]).numpy() for it in items])[:, None].astype(np.float32)
    lesions = np.stack([load(tmp_path / it["lesion"]).numpy() for it in items])[:, None].astype(np.float32)
    window = (np.clip(raw, -100, 600) + 100) / 700
    _check_learnability(raw, window, lesions, items, 3, 6, 8)


@pytest.mark.slow
def test_cxr_opacity_learnable_not_from_global_statistics(tmp_path):
    items = _items(generate_cxr(tmp_path, 480, size=64, seed=0))
    raw = np.stack([_png(tmp_path / it["image"]) for it in items])[:, None].astype(np.float32)
    lesions = np.stack([_png(tmp_path / it["lesion"]) for it in items])[:, None].astype(np.float32)
    _check_learnability(raw, _standardise(raw), lesions, items, 2, 4, 16)


@pytest.mark.slow
def test_histology_mitosis_learnable_not_from_global_statistics(tmp_path):
    items = _items(generate_histology(tmp_path, 480, size=64, seed=1))
    raw = np.stack([_png(tmp_path / it["image"]) for it in items]).transpose(0, 3, 1, 2).astype(np.float32)
    lesions = np.stack([_png(tmp_path / it["lesion"]) for it in items])[:, None].astype(np.float32)
    _check_learnability(raw, _standardise(raw), lesions, items, 2, 6, 16)
