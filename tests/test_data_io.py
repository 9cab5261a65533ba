"""Readers: folder discovery, DICOM series geometry checks, NIfTI/PNG through MONAI, against real files and
synthetic DICOM series whose voxel values are a known linear function of the patient position."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose, LoadImage, Orientation
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medtl3d.data.io import Case, LoadCased, find_cases, load_image, read_series_headers
from medtl3d.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
CT_DIR = SHARED / "data" / "ct_volumes"
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
HAS_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None  # PyPI "pydicom-data"

SLOPE, INTERCEPT = 0.25, -1024.0


def hu_at(world: np.ndarray) -> np.ndarray:
    """The synthetic phantom: HU a linear function of the LPS position (exact under linear interpolation)."""
    return 3.0 * world[..., 0] - 2.0 * world[..., 1] + 5.0 * world[..., 2]


def write_series(folder: Path, *, n: int = 6, rows: int = 12, cols: int = 10, spacing=(0.8, 0.7), dz: float = 2.0,
                 z0: float = 10.0, tilt_deg: float = 0.0, drop=(), heights=None, uid: str | None = None,
                 prefix: str = "img", suffix: str = ".dcm", row_cosine=(1.0, 0.0, 0.0)) -> str:
    """Write a CT series (explicit VR little endian, one file per slice); returns its SeriesInstanceUID.

    Slice k sits at (x0, y0, z0 + k*dz) (or ``heights[k]``); ``tilt_deg`` tilts the column direction out of the
    axial plane (gantry tilt: positions still step along z). Pixel values encode :func:`hu_at` at each pixel.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    study, frame_uid = generate_uid(), generate_uid()
    t = math.radians(tilt_deg)
    r, c = np.asarray(row_cosine, float), np.array([0.0, math.cos(t), math.sin(t)])
    dr, dc = spacing
    zs = list(heights) if heights is not None else [z0 + k * dz for k in range(n)]
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for k, z in enumerate(zs):
        if k in drop:
            continue
        pos = np.array([-5.0, 3.0, z])
        world = pos + ii[..., None] * dc * r + jj[..., None] * dr * c
        stored = np.round((hu_at(world) - INTERCEPT) / SLOPE).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, uid, frame_uid
        ds.Modality, ds.PatientID, ds.InstanceNumber, ds.SeriesNumber = "CT", "P1", k + 1, 1
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*r, *c)]
        ds.PixelSpacing, ds.SliceThickness = [dr, dc], dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"{prefix}{k:03d}{suffix}", enforce_file_format=True)
    return uid


def world_of_voxels(img) -> np.ndarray:
    """LPS position of every voxel of a channel-first 3D MetaTensor (from its RAS affine)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in img.shape[1:]], indexing="ij"), -1).astype(float)
    ras = idx @ img.affine.numpy()[:3, :3].T + img.affine.numpy()[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------- real files (shared/)


@pytest.mark.skipif(not CT_DIR.is_dir(), reason="../shared/data/ct_volumes not present")
def test_real_jpeg2000_ct_series_matches_simpleitk_nifti(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    cases, skipped = find_cases(CT_DIR)
    dicom = [c for c in cases if c.kind == "dicom"]
    assert [c.case_id for c in dicom] == ["example_ct_dicom"] and len(dicom[0].files) == 20
    assert {c.case_id for c in cases if c.kind == "nifti"} >= {"example_ct", "example_seg_dicom"}
    assert [(p.name, why) for p, why in skipped] == [("LICENSE", "not a DICOM, NIfTI or PNG/JPEG image")]

    img = load_image(dicom[0])
    assert img.shape == (1, 512, 512, 20) and img.dtype == torch.float32
    assert img.meta["modality"] == "CT" and img.meta["case_id"] == "example_ct_dicom"
    assert np.allclose(img.pixdim.numpy(), [0.9765625, 0.9765625, 2.0])

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom[0].path)))
    nifti = tmp_path / "itk.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nifti))
    ref = LoadImage(image_only=True, ensure_channel_first=True)(str(nifti))
    assert ref.shape == img.shape
    assert torch.equal(ref, img)  # HU, bit-exact
    assert torch.allclose(ref.affine, img.affine, atol=1e-4)
    assert float(img.min()) == -1024.0 and 1000 < float(img.max()) < 3000

    # The TotalSegmentator mask of this series: same grid up to a flip of the y axis, and aligned with the body.
    seg = Orientation(axcodes="LPS")(LoadImage(image_only=True, ensure_channel_first=True)(
        str(CT_DIR / "example_seg_dicom.nii.gz")))
    assert seg.shape == img.shape and torch.allclose(seg.affine, img.affine, atol=1e-3)
    labelled, hu = seg[0].numpy() > 0, img[0].numpy()
    assert (hu[labelled] < -950).mean() < 0.03  # organ labels are not in the air around the patient
    assert (hu[np.flip(labelled, 1)] < -950).mean() > 0.1  # ... which a wrong y orientation would put there


# ---------------------------------------------------------------------------------- real files (PyPI packages)


def test_pydicom_ct_small_matches_monai_pydicomreader():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    img = load_image(path)
    ref = LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader")(path)
    assert img.shape == ref.shape == (1, 128, 128)
    assert torch.equal(img, ref) and torch.allclose(img.affine, ref.affine)
    raw = pydicom.dcmread(path).pixel_array.T.astype(np.float32)  # (columns, rows)
    assert np.array_equal(img[0].numpy(), raw * 1.0 - 1024.0)  # RescaleSlope 1, RescaleIntercept -1024
    assert img.meta["modality"] == "CT" and img.meta["filename_or_obj"] == path


@pytest.mark.skipif(not HAS_PYDICOM_DATA, reason="PyPI package pydicom-data not installed")
def test_pydicom_data_ct_and_cr():
    from pydicom.data import get_testdata_file

    ct = load_image(get_testdata_file("693_UNCI.dcm"))
    assert ct.shape == (1, 512, 512) and ct.meta["modality"] == "CT"
    q25, q75 = np.percentile(ct.numpy(), [25, 75])
    assert -1100 < q25 < -900 and -100 < q75 < 200  # air around the body, soft tissue inside
    assert float(ct.max()) < 3072
    assert np.allclose(ct.pixdim.numpy(), [0.478516, 0.478516])

    cr = load_image(get_testdata_file("RG1_UNCI.dcm"))  # chest CR, no patient geometry, PixelSpacing 0
    assert cr.shape == (1, 1841, 1955) and cr.meta["modality"] == "CR"
    assert (float(cr.min()), float(cr.max())) == (803.0, 26512.0)
    assert np.allclose(cr.pixdim.numpy(), [1.0, 1.0])
    assert "no ImagePositionPatient" in cr.meta["geometry_problems"]


@pytest.mark.skipif(not HAS_PYDICOM_DATA, reason="PyPI package pydicom-data not installed")
def test_enhanced_multiframe():
    from pydicom.data import get_testdata_file

    ect = load_image(get_testdata_file("eCT_Supplemental.dcm"))  # enhanced CT, 2 frames with plane positions
    assert ect.shape == (1, 512, 512, 2) and np.allclose(ect.pixdim.numpy(), [0.388672, 0.388672, 10.0])
    assert float(ect.min()) == -1024.0  # PixelValueTransformationSequence applied
    with pytest.raises(DataError, match=r"emri_small\.dcm: multi-frame file of 10 frames .* volume_index"):
        load_image(get_testdata_file("emri_small.dcm"))  # enhanced MR stripped of its functional groups
    assert load_image(get_testdata_file("emri_small.dcm"), volume_index=3).shape == (1, 64, 64)


def test_truncated_dicom_is_a_clear_error(tmp_path):
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("MR_truncated.dcm"))
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / src.name).write_bytes(src.read_bytes())
    cases, skipped = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["mr"] and skipped == []
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: cannot decode pixel data .*less than expected"):
        load_image(cases[0])


def test_nifti_4d_refused_unless_a_volume_is_selected():
    path = NIB_DATA / "example4d.nii.gz"
    with pytest.raises(DataError, match=r"example4d\.nii\.gz: 4-D NIfTI .* 2 volumes; pass volume_index"):
        load_image(path)
    ref = nib.load(str(path))
    img = load_image(path, volume_index=1)
    assert img.shape == (1, 128, 96, 24)
    assert np.array_equal(img[0].numpy(), np.asarray(ref.dataobj[..., 1], dtype=np.float32))
    assert np.allclose(img.affine.numpy(), ref.affine, atol=1e-5)
    with pytest.raises(DataError, match="volume_index=2 out of range"):
        load_image(path, volume_index=2)


def test_nan_nifti_and_non_image_files_refused(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 1 NaN/inf voxel"):
        load_image(tmp_path / "nan.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: not a DICOM, NIfTI or PNG/JPEG image"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"broken\.nii\.gz: unreadable NIfTI"):
        load_image(tmp_path / "broken.nii.gz")
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.nii.gz")


def test_png_matches_monai_and_loadcased_in_compose(tmp_path):
    from PIL import Image

    arr = (np.arange(35, dtype=np.uint8).reshape(5, 7) * 7)
    Image.fromarray(arr).save(tmp_path / "xray.png")
    img = load_image(tmp_path / "xray.png")
    ref = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "xray.png"))
    assert img.shape == ref.shape == (1, 7, 5) and torch.equal(img, ref)
    assert np.array_equal(img[0].numpy(), arr.T) and img.meta["case_id"] == "xray"

    out = Compose([LoadCased(keys=["image", "mask"])])({"image": str(tmp_path / "xray.png"),
                                                         "mask": Case("m", "image", tmp_path / "xray.png"),
                                                         "label": 1})
    assert torch.equal(out["image"], img) and out["mask"].meta["case_id"] == "m" and out["label"] == 1


# ------------------------------------------------------------------------------------ synthetic DICOM series


def test_find_cases_groups_series_and_reports_skipped(tmp_path):
    uid_a = write_series(tmp_path / "study", n=3, prefix="a")
    uid_b = write_series(tmp_path / "study", n=4, prefix="b", suffix="")  # no extension: detected by content
    write_series(tmp_path / "single" / "ct", n=2)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "study" / "notes.txt").write_text("report")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))

    cases, skipped = find_cases(tmp_path)
    by_id = {c.case_id: c for c in cases}
    assert set(by_id) == {f"study_{uid_a[-8:]}", f"study_{uid_b[-8:]}", "single_ct", "vol"}
    assert len(by_id[f"study_{uid_a[-8:]}"].files) == 3 and by_id[f"study_{uid_b[-8:]}"].series_uid == uid_b
    assert by_id["single_ct"].kind == "dicom" and by_id["single_ct"].path == tmp_path / "single" / "ct"
    assert by_id["vol"].kind == "nifti"
    reasons = {p.relative_to(tmp_path).as_posix(): why for p, why in skipped}
    assert reasons == {"empty/deeper": "empty folder",
                       "study/notes.txt": "not a DICOM, NIfTI or PNG/JPEG image"}

    a, b = load_image(by_id[f"study_{uid_a[-8:]}"]), load_image(by_id[f"study_{uid_b[-8:]}"])
    assert a.shape == (1, 10, 12, 3) and b.shape == (1, 10, 12, 4) and a.meta["series_uid"] == uid_a
    with pytest.raises(DataError, match="folder holds 2 cases"):
        load_image(tmp_path / "study")


def test_regular_series_matches_monai_pydicomreader_and_world_function(tmp_path):
    write_series(tmp_path / "ct", n=5)
    img = load_image(tmp_path / "ct")
    ref = LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader")(str(tmp_path / "ct"))
    assert img.shape == ref.shape == (1, 10, 12, 5)
    assert torch.equal(img, ref) and torch.allclose(img.affine, ref.affine)
    assert np.allclose(img.pixdim.numpy(), [0.7, 0.8, 2.0])  # (columns, rows, slices)
    assert np.abs(img[0].numpy() - hu_at(world_of_voxels(img))).max() <= SLOPE / 2
    assert img.meta["resampled"] is False and img.meta["geometry_problems"] == ""


def test_missing_slice_refused_or_resampled(tmp_path):
    write_series(tmp_path / "case_07", n=6, drop=(3,))
    geom = read_series_headers(sorted((tmp_path / "case_07").iterdir()))
    assert geom.num_slices == 5 and geom.slice_spacing == 2.0 and not geom.regular
    msg = re.escape(f"{tmp_path / 'case_07'}: 1 missing slice between z=14.0 and z=18.0 (spacing 2.0 mm)")
    with pytest.raises(DataError, match=msg):
        load_image(tmp_path / "case_07")

    img = load_image(tmp_path / "case_07", irregular="resample")
    write_series(tmp_path / "full", n=6)
    full = load_image(tmp_path / "full")
    assert img.shape == full.shape == (1, 10, 12, 6)
    assert torch.allclose(img.affine, full.affine, atol=1e-6)
    assert np.abs(img.numpy() - full.numpy()).max() <= SLOPE  # slice 3 linearly interpolated from 2 and 4
    assert img.meta["resampled"] is True and "missing slice" in img.meta["geometry_problems"]


def test_non_uniform_spacing_and_tilt_detected(tmp_path):
    write_series(tmp_path / "uneven", heights=[0.0, 2.0, 4.0, 7.0, 9.0])
    with pytest.raises(DataError, match=r"uneven: non-uniform slice spacing: steps from 2\.0 to 3\.0 mm"):
        load_image(tmp_path / "uneven")
    uneven = load_image(tmp_path / "uneven", irregular="resample")
    assert uneven.shape[-1] == 5 and np.allclose(uneven.pixdim.numpy(), [0.7, 0.8, 2.0])

    write_series(tmp_path / "tilt", n=8, rows=16, cols=14, tilt_deg=20.0)
    geom = read_series_headers(sorted((tmp_path / "tilt").iterdir()))
    assert geom.tilt_degrees == pytest.approx(20.0, abs=0.01)
    with pytest.raises(DataError, match=r"tilt: gantry tilt of 20\.0 degrees"):
        load_image(tmp_path / "tilt")

    img = load_image(tmp_path / "tilt", irregular="resample")
    affine = img.affine.numpy()
    assert np.allclose(affine[:3, :3], np.diag([-0.7, -0.8, 2.0]), atol=1e-6)  # axial grid, table step 2 mm
    # bounding box of the tilted slab: y 15 * 0.8 * cos(20) = 11.3 mm -> 15 rows; z 7 * 2 + 15 * 0.8 * sin(20) mm
    assert img.shape == (1, 14, 15, 10)
    values = img[0].numpy()
    inside = values != values.min()  # outside the acquired slab: filled with the minimum
    assert inside.mean() > 0.6
    assert np.abs(values - hu_at(world_of_voxels(img)))[inside].max() <= SLOPE


def test_inconsistent_series_refused(tmp_path):
    write_series(tmp_path / "mixed", n=3, prefix="a")
    write_series(tmp_path / "mixed", n=1, z0=30.0, prefix="b", row_cosine=(0.0, 0.0, 1.0),
                 uid=pydicom.dcmread(next((tmp_path / "mixed").iterdir())).SeriesInstanceUID)
    with pytest.raises(DataError, match="mixed: inconsistent ImageOrientationPatient"):
        load_image(tmp_path / "mixed")
    uid = write_series(tmp_path / "dup", n=3, prefix="a")
    write_series(tmp_path / "dup", n=3, prefix="b", uid=uid)  # two volumes at the same positions
    with pytest.raises(DataError, match=r"dup: 3 slice pairs at the same position \(z=10\.0: a000\.dcm and b000\.dcm\)"):
        load_image(tmp_path / "dup")
    with pytest.raises(DataError, match="irregular='sometimes'"):
        load_image(tmp_path / "dup", irregular="sometimes")


def test_dicom_files_listed_in_skipped_when_header_is_broken(tmp_path):
    write_series(tmp_path / "ok", n=2)
    head = (tmp_path / "ok" / "img000.dcm").read_bytes()[:200]
    (tmp_path / "ok" / "broken.dcm").write_bytes(head)  # DICM preamble, header cut in the middle
    cases, skipped = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["ok"] and len(cases[0].files) == 2
    assert len(skipped) == 1 and skipped[0][0].name == "broken.dcm"
    assert skipped[0][1].startswith("DICOM without image data (no Rows/Columns")


def test_no_input_disappears(tmp_path):
    write_series(tmp_path / "a", n=2)
    (tmp_path / "b").mkdir()
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / "d.png").write_bytes(b"not a png")
    cases, skipped = find_cases(tmp_path)
    accounted = {f for c in cases for f in (c.files or (c.path,))} | {p for p, _ in skipped}
    every = {Path(root) / f for root, _, files in os.walk(tmp_path) for f in files} | {tmp_path / "b"}
    assert every == accounted
    with pytest.raises(DataError, match=r"d\.png: cannot read as image"):
        load_image(next(c for c in cases if c.case_id == "d"))


def test_linked_folders_followed_once_and_loops_reported(tmp_path):
    outside, root = tmp_path / "elsewhere", tmp_path / "in"
    write_series(outside / "ct", n=3)
    (outside / "ct" / "loop").symlink_to(outside, target_is_directory=True)  # back to its own ancestor
    write_series(root / "real", n=2)
    (root / "a_link").symlink_to(outside, target_is_directory=True)  # followed: the case is found through it
    (root / "b_link").symlink_to(outside, target_is_directory=True)  # the same folder again
    (root / "c_alias").symlink_to(root / "real", target_is_directory=True)  # a folder scanned at its own path
    (root / "d_dangling").symlink_to(tmp_path / "missing")

    cases, skipped = find_cases(root)
    assert [(c.case_id, c.kind, len(c.files)) for c in cases] == [("a_link_ct", "dicom", 3), ("real", "dicom", 2)]
    assert cases[0].path == root / "a_link" / "ct"
    assert load_image(cases[0]).shape == (1, 10, 12, 3)
    reasons = {p.relative_to(root).as_posix(): why for p, why in skipped}
    assert set(reasons) == {"a_link/ct/loop", "b_link", "c_alias", "d_dangling"}
    assert "encloses it (loop)" in reasons["a_link/ct/loop"]
    assert reasons["b_link"].endswith(f"already scanned as {root / 'a_link'}")
    assert "inside the input folder: scanned there" in reasons["c_alias"]
    assert reasons["d_dangling"].startswith("cannot read file")


def test_nvimagecodec_notice_silenced_unless_asked_for(caplog, monkeypatch):
    """MONAI logs "nvImageCodec is not available" for every LoadImage on a machine without it; only that notice is
    dropped, and it comes back when MONAI_DICOM_READER=nvimgcodec asks for that reader."""
    plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    monkeypatch.delenv("MONAI_DICOM_READER", raising=False)
    with caplog.at_level(logging.WARNING, logger=plugin_logger.name):
        plugin_logger.warning("nvImageCodec is not available; skipping pydicom decoder plugin registration.")
        LoadImage(image_only=True)
        plugin_logger.warning("another problem")
    assert [r.getMessage() for r in caplog.records if r.name == plugin_logger.name] == ["another problem"]
    caplog.clear()
    monkeypatch.setenv("MONAI_DICOM_READER", "nvimgcodec")
    with caplog.at_level(logging.WARNING, logger=plugin_logger.name):
        plugin_logger.warning("nvImageCodec is not available; skipping pydicom decoder plugin registration.")
    assert [r.name for r in caplog.records] == [plugin_logger.name]
