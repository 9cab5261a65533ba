"""Modality presets (CT / CXR / pathology) on real files, the model axis order and its inverse, and slice windows."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from PIL import Image

from medtl3d.data.io import load_image
from medtl3d.data.phantoms import generate_ctpa
from medtl3d.data.presets import IMAGENET_MEAN, IMAGENET_STD, preset, preset_options
from medtl3d.data.windows import WindowDataset, slice_windows, take_window
from medtl3d.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
CT = SHARED / "data" / "ct_volumes" / "example_ct.nii.gz"
CXR_SEG = SHARED / "data" / "cxr_lung_segmentation"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real CT/CXR data) is not present")


def _world(affine, index) -> np.ndarray:
    return (np.asarray(affine, dtype=np.float64) @ np.array([*index, 1.0]))[:3]


# --------------------------------------------------------------------------------------------------------- CT
@needs_shared
def test_ct_preset_windows_hu_and_puts_slices_first():
    image = load_image(CT)  # (1, 122, 101, 112), 3 mm, RAS, HU
    hu = nib.load(CT).get_fdata()
    out = preset("ct", train=False, size=(101, 122))({"image": image})["image"]  # in-plane size kept: no resampling
    assert out.shape == (1, 112, 101, 122) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    for i, j, k in [(60, 50, 56), (10, 10, 10), (61, 40, 80)]:
        expected = min(max((hu[i, j, k] + 100.0) / 1000.0, 0.0), 1.0)  # PENet window [-100, 900] -> [0, 1]
        assert float(out[0, k, j, i]) == pytest.approx(expected, abs=1e-6)
        # the affine follows the axis reversal: voxel (k, j, i) of the output is voxel (i, j, k) of the input
        np.testing.assert_allclose(_world(out.affine, (k, j, i)), _world(image.affine, (i, j, k)))
    assert hu[60, 50, 56] == 281.0 and float(out[0, 56, 50, 60]) == pytest.approx(0.381)
    assert (hu < -100).any() and (hu > 900).any()  # both clips exercised
    default = preset("ct", train=False)({"image": image})["image"]
    assert default.shape == (1, 112, 192, 192)


def test_ct_and_cxr_presets_on_a_pydicom_ct_slice():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # rows x columns, as displayed
    image = load_image(path)
    window = np.clip((hu + 100.0) / 1000.0, 0.0, 1.0)
    # LPS keeps the DICOM display orientation (row 0 anterior, column 0 the patient's right); RAS mirrors both
    lps = preset("ct", train=False, size=128, orientation="LPS")({"image": image})["image"]
    assert lps.shape == (1, 1, 128, 128)  # a single slice becomes a one-slice volume
    np.testing.assert_allclose(lps[0, 0].numpy(), window, atol=1e-6)
    ras = preset("ct", train=False, size=128)({"image": image})["image"]
    np.testing.assert_allclose(ras[0, 0].numpy(), window[::-1, ::-1], atol=1e-6)
    cxr = preset("cxr", train=False, size=128)({"image": image})["image"]
    assert cxr.shape == (1, 128, 128)
    np.testing.assert_allclose(cxr[0].numpy(), (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_ct_segmentation_mask_follows_and_inverts_back_to_the_original_grid():
    rng = np.random.default_rng(0)
    affine = np.array([[-0.7, 0, 0, 12.0], [0, 0.8, 0, -30.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
    labels = rng.integers(0, 3, (40, 36, 10)).astype(np.float32)
    image = MetaTensor(torch.from_numpy(rng.normal(0, 300, (1, 40, 36, 10)).astype(np.float32)), affine=affine)
    label = MetaTensor(torch.from_numpy(labels[None]), affine=affine)
    pipeline = preset("ct", train=False, label_key="label", size=24, resize=32, spacing=(1.0, 1.0, 2.0))
    out = pipeline({"image": image, "label": label})
    assert out["image"].shape[2:] == (24, 24) and out["label"].shape == out["image"].shape
    assert out["label"].dtype == torch.int64 and set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
    back = Invertd("pred", pipeline, orig_keys="image")({**out, "pred": MetaTensor(out["label"].float())})["pred"]
    assert back.shape == (1, 40, 36, 10)
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-6)
    # no resampling -> the round trip is exact
    same = preset("ct", train=False, label_key="label", size=(36, 40), orientation=None)
    out = same({"image": image, "label": label})
    back = Invertd("pred", same, orig_keys="image")({**out, "pred": MetaTensor(out["label"].float())})["pred"]
    np.testing.assert_array_equal(back[0].numpy(), labels)


def test_ct_train_preset_is_random_but_keeps_shape_and_depth():
    image = MetaTensor(torch.linspace(-1000, 1500, 20 * 30 * 6).reshape(1, 20, 30, 6))
    pipeline = preset("ct", train=True, size=16, resize=20)
    pipeline.set_random_state(0)
    a, b = (pipeline({"image": image})["image"] for _ in range(2))
    assert a.shape == b.shape == (1, 6, 16, 16)
    assert not torch.equal(a, b)
    # rotation/zoom are in-plane: a single bright slice stays a single bright slice
    slab = torch.full((1, 20, 30, 6), -1000.0)
    slab[..., 2] = 900.0
    geometric = preset("ct", train=True, size=16, resize=20, intensity=0.0, prob=1.0)
    geometric.set_random_state(1)
    out = geometric({"image": MetaTensor(slab)})["image"]
    assert out[0, 2].sum() > 0 and out[0, [0, 1, 3, 4, 5]].abs().sum() == 0


# -------------------------------------------------------------------------------------------------------- CXR
@needs_shared
def test_cxr_preset_image_and_lung_mask_rows_first():
    name = sorted((CXR_SEG / "images").glob("*.png"))[0].name
    gray = np.array(Image.open(CXR_SEG / "images" / name))
    mask = np.array(Image.open(CXR_SEG / "masks" / name))
    data = {"image": load_image(CXR_SEG / "images" / name), "label": load_image(CXR_SEG / "masks" / name)}
    same = preset("cxr", train=False, label_key="label", size=gray.shape)({**data})
    assert same["image"].shape == (1, *gray.shape)  # (C, H, W): rows first, as PIL shows the image
    np.testing.assert_allclose(same["image"][0].numpy(), (gray - gray.min()) / float(gray.max() - gray.min()),
                               atol=1e-6)
    np.testing.assert_array_equal(same["label"][0].numpy(), mask)
    for train in (False, True):
        out = preset("cxr", train=train, label_key="label")({**data})
        assert out["image"].shape == out["label"].shape == (1, 224, 224)
        assert out["label"].dtype == torch.int64
        assert set(torch.unique(out["label"]).tolist()) == {0, 1, 2}  # nearest: both lungs kept, no new values
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0 + 1e-6


def test_cxr_preset_turns_rgb_into_gray_like_pil(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = preset("cxr", train=False, size=(40, 50), intensity=(0, 255))({"image": load_image(tmp_path / "rgb.png")})
    pil_gray = np.array(Image.fromarray(rgb).convert("L")) / 255.0  # PIL rounds to integers
    assert out["image"].shape == (1, 40, 50)
    np.testing.assert_allclose(out["image"][0].numpy(), pil_gray, atol=0.6 / 255)
    norm = preset("cxr", train=False, size=(40, 50), intensity=(0, 255), normalize="imagenet")
    np.testing.assert_allclose(norm({"image": load_image(tmp_path / "rgb.png")})["image"].numpy(),
                               (out["image"].numpy() - 0.449) / 0.226, atol=1e-5)


def test_2d_presets_refuse_a_volume():
    volume = MetaTensor(torch.zeros(1, 8, 8, 5))
    with pytest.raises(DataError, match=r"shape \(1, 8, 8, 5\).*needs a 2D image"):
        preset("cxr", train=False)({"image": volume})


# -------------------------------------------------------------------------------------------------- pathology
def test_pathology_preset_rgb_patch(tmp_path):
    rgb = np.zeros((120, 160, 3), dtype=np.uint8)
    rgb[:60, :, 0] = 200  # red top half
    rgb[:, 80:, 2] = 100  # blue right half
    Image.fromarray(rgb).save(tmp_path / "patch.png")
    image = load_image(tmp_path / "patch.png")
    out = preset("pathology", train=False, size=(120, 160), weights="resnet50.imagenet")({"image": image})["image"]
    assert out.shape == (3, 120, 160)  # normalize="auto" with ImageNet weights: ImageNet mean/std
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for row, col in [(10, 10), (10, 150), (100, 10), (100, 150)]:
        np.testing.assert_allclose(out[:, row, col].numpy(), (rgb[row, col] / 255.0 - mean) / std, atol=1e-5)
    resized = preset("pathology", train=False)({"image": image})["image"]
    assert resized.shape == (3, 128, 128)
    jitter = preset("pathology", train=True, prob=1.0)
    a, b = (jitter({"image": image})["image"] for _ in range(2))
    assert a.shape == b.shape == (3, 128, 128) and torch.isfinite(a).all() and not torch.equal(a, b)
    gray = MetaTensor(torch.full((1, 64, 64), 128.0))
    assert preset("pathology", train=False)({"image": gray})["image"].shape == (3, 128, 128)


# ----------------------------------------------------------------------------------------------------- errors
def test_unknown_preset_and_bad_options_are_named():
    with pytest.raises(DataError, match="unknown preset 'mri'.*ct, cxr, pathology"):
        preset("mri", train=False)
    with pytest.raises(DataError, match="no option 'windw'.*window="):
        preset("ct", train=False, windw=(0, 1))
    with pytest.raises(DataError, match=r"window=\(900, -100\) needs low < high"):
        preset("ct", train=False, window=(900, -100))
    with pytest.raises(DataError, match="spacing="):
        preset("ct", train=False, spacing=(1, 1))
    with pytest.raises(DataError, match="size=0"):
        preset("cxr", train=False, size=0)
    with pytest.raises(DataError, match="resize=.* must be at least size"):
        preset("pathology", train=False, size=128, resize=100)
    with pytest.raises(DataError, match="normalize="):
        preset("cxr", train=False, normalize="zscores")
    assert preset_options("ct")["window"] == (-100.0, 900.0)


# ---------------------------------------------------------------------------------------------------- windows
def test_slice_windows_by_hand():
    assert slice_windows(100, 24) == [(0, 24), (24, 48), (48, 72), (72, 96), (76, 100)]
    assert slice_windows(96, 24) == [(0, 24), (24, 48), (48, 72), (72, 96)]  # exact fit: no extra window
    assert slice_windows(40, 8, overlap=3) == [(0, 8), (5, 13), (10, 18), (15, 23), (20, 28), (25, 33), (30, 38),
                                               (32, 40)]
    assert slice_windows(30, 24, overlap=8) == [(0, 24), (6, 30)]
    assert slice_windows(24, 24) == [(0, 24)]
    assert slice_windows(10, 24) == [(0, 24)]  # short volume: one window, padded by take_window
    for depth in range(1, 60):
        for n, k in [(8, 0), (8, 7), (24, 4), (5, 2)]:
            windows = slice_windows(depth, n, k)
            covered = set().union(*(range(a, b) for a, b in windows))
            assert covered >= set(range(depth)) and all(b - a == n for a, b in windows)
            assert all(b <= max(depth, n) for _, b in windows)
            assert all(a2 - a1 <= n - k for (a1, _), (a2, _) in zip(windows, windows[1:]))
    for bad in [(10, 8, 8), (10, 8, -1), (10, 0, 0), (0, 8, 0)]:
        with pytest.raises(DataError):
            slice_windows(*bad)


def test_take_window_pads_after_the_last_slice_with_the_minimum():
    volume = torch.arange(5 * 4, dtype=torch.float32).reshape(1, 5, 2, 2) - 3
    window = take_window(volume, 0, 8)
    assert window.shape == (1, 8, 2, 2)
    assert torch.equal(window[:, :5], volume) and (window[:, 5:] == -3).all()
    assert torch.equal(take_window(volume, 1, 3), volume[:, 1:3])
    assert (take_window(volume, 3, 6, pad_value=0)[:, 2:] == 0).all()


def test_window_dataset_on_ctpa_phantoms(tmp_path):
    datalist = generate_ctpa(tmp_path, 3, shape=(20, 32, 32), positive_fraction=0.67, seed=1)
    items = json.loads(datalist.read_text())["training"]
    for item in items:
        item["image"], item["lesion"] = str(tmp_path / item["image"]), str(tmp_path / item["lesion"])
    by_mask = WindowDataset(items, preset("ct", train=False, size=32, label_key="lesion"), num_slices=8,
                            overlap=2, label_from="mask")
    assert len(by_mask) == 3 * 3  # depth 20: (0, 8), (6, 14), (12, 20)
    assert [(w, s) for _, w, s, _ in by_mask.windows[:3]] == [(0, 0), (1, 6), (2, 12)]
    for index, (i, w, start, stop) in enumerate(by_mask.windows):
        sample = by_mask[index]
        assert sample["image"].shape == (1, 8, 32, 32) and sample["lesion"].shape == (1, 8, 32, 32)
        assert sample["series"] == items[i]["image"] and sample["window"] == w and sample["start"] == start
        # slice_labels run bottom to top, as the preset's slice axis does (RAS: inferior -> superior)
        assert int(sample["label"]) == int(any(items[i]["slice_labels"][start:stop]))
    assert any(int(by_mask[k]["label"]) for k in range(len(by_mask)))
    assert any(not int(by_mask[k]["label"]) for k in range(len(by_mask)))
    by_series = WindowDataset(items, preset("ct", train=False, size=32), num_slices=24, cache=False)
    assert len(by_series) == 3  # 20 < 24 slices: one padded window each
    for index in range(3):
        sample = by_series[index]
        assert sample["image"].shape == (1, 24, 32, 32) and int(sample["label"]) == items[index]["label"]
        assert (sample["image"][:, 20:] == sample["image"].min()).all()
    train = WindowDataset(items, preset("ct", train=True, size=24, resize=32), num_slices=8)
    assert train[0]["image"].shape == (1, 8, 24, 24)  # random crop / affine run on the window
    with pytest.raises(DataError, match="label_key='lesion'"):
        WindowDataset(items, preset("ct", train=False, size=32), num_slices=8, label_from="mask")


def test_window_dataset_serves_copies_so_in_place_transforms_leave_the_cache_intact(tmp_path):
    """Random transforms that do not fire return their input; MONAI's NormalizeIntensity after them then works in
    place. On a view of the cached volume that normalised the cache again at every access (a resumed run, starting
    from a fresh cache, saw other data than the uninterrupted one)."""
    datalist = generate_ctpa(tmp_path, 1, shape=(32, 32, 32), seed=1)
    items = [{**item, "image": str(tmp_path / item["image"])} for item in json.loads(datalist.read_text())["training"]]
    dataset = WindowDataset(items, preset("ct", train=True, size=32, prob=0.0, normalize=(0.5, 0.25)), num_slices=32)
    assert type(dataset.random.transforms[-1]).__name__ == "NormalizeIntensityd"  # runs after the random ones
    cached = dataset._volumes[0]["image"].clone()
    first, second = dataset[0]["image"], dataset[0]["image"]
    assert torch.equal(dataset._volumes[0]["image"], cached)
    assert torch.allclose(first, (cached - 0.5) / 0.25) and torch.equal(first, second)
