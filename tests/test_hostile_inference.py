"""Folder inference against hostile input, each built here on the fly: a one-line outcome naming the file or option,
nothing allocated from a lying header, no output of another run touched; one writer per output folder, unique case
ids, and an interrupted run that resumes with only its missing cases."""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import multiprocessing
import os
import resource
import struct
import time
import zlib
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import medtl3d.data._discovery as data_discovery  # where case discovery reads file heads
import medtl3d.inference._dataset as dataset_module  # where cases are loaded
from medtl3d.data.io import _unique_ids, find_cases
from medtl3d.engine._checkpoint import save_checkpoint
from medtl3d.errors import DataError, OutputError, OutputLockedError, WeightsError
from medtl3d.inference import JOURNAL_DIR, infer_folder
from medtl3d.inference.cli import add_parser, run
from medtl3d.locking import output_lock
from medtl3d.strategies import create_model
from medtl3d.weights import read_checkpoint

CONFIG_2D = {"backbone": "cbr_tiny", "strategy": "random", "num_classes": 1, "spatial_dims": 2, "in_channels": 1}
CONFIG_3D = {**CONFIG_2D, "spatial_dims": 3}
REASON_LIMIT = 300  # errors.one_line's default


# ------------------------------------------------------------------------------------------------- builders


def _png(path: Path, size=(12, 10), mode="L", seed=0) -> Path:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _png_bomb(path: Path, width: int, height: int) -> Path:
    """An all-zero 1-bit grayscale PNG: a few KB on disk that decodes to width x height pixels (a zlib bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _dicom(path: Path, *, rows=6, columns=5, series_uid: str, z=0.0) -> Path:
    """A CT slice whose header claims ``rows`` x ``columns`` but whose pixel data holds at most 6 x 5 values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = series_uid, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, z], [1, 0, 0, 0, 1, 0], [1, 1]
    ds.PixelData = np.arange(min(rows, 6) * min(columns, 5), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _huge_nifti_header(path: Path, shape=(1200, 1200, 1200)) -> Path:
    """A NIfTI of a few hundred bytes whose header claims ``shape`` int16 voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 8)
    return path


def _checkpoint(path: Path, config: dict) -> Path:
    torch.manual_seed(0)
    model = create_model(**config)
    save_checkpoint({"model": model.state_dict(), "initial_state": model.initial_state, "model_config": config},
                    path)
    return path


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["case_id"] or Path(row["path"]).name: row for row in csv.DictReader(f)}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medtl3d")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["infer", *argv]))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("medtl3d: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _model_2d() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(**CONFIG_2D).eval()


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"2d": _checkpoint(folder / "model2d.pt", CONFIG_2D), "3d": _checkpoint(folder / "model3d.pt", CONFIG_3D)}


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, checkpoints):
    """A finished run in its own output folder: no hostile run may touch it."""
    root = tmp_path_factory.mktemp("previous")
    (root / "in").mkdir()
    for k in range(2):
        _png(root / "in" / f"film{k}.png", seed=k)
    assert _cli(["--model", str(checkpoints["2d"]), "--preset", "cxr", "--preset-option", "size=16", "--task",
                 "binary", "--input", str(root / "in"), "--output", str(root / "out"), "--no-progress"]) == 0
    return root / "out", _files(root / "out")


@pytest.fixture
def untouched(previous_run):
    yield
    out, before = previous_run
    assert _files(out) == before, "a hostile run changed another run's outputs"


@pytest.fixture
def cxr_args(checkpoints):
    return ["--model", str(checkpoints["2d"]), "--preset", "cxr", "--preset-option", "size=16", "--task", "binary",
            "--no-progress"]


# ------------------------------------------------------------------------------------------------- the lock


def _hold(folder: Path, held, stop) -> None:
    with output_lock(folder):
        held.set()
        stop.wait(60)


def test_a_second_run_on_the_same_output_is_refused_at_once(tmp_path, cxr_args, capsys, untouched):
    (tmp_path / "in").mkdir()
    _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    fork = multiprocessing.get_context("fork")  # a second process without importing torch again
    held, stop = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold, args=(out, held, stop))
    holder.start()
    try:
        assert held.wait(60)
        started = time.monotonic()
        assert _cli([*cxr_args, "--input", str(tmp_path / "in"), "--output", str(out)]) == 2
        assert time.monotonic() - started < 10  # at once, not after a wait
        _one_line_error(capsys, f"output folder {out} is being written by another run (pid {holder.pid} on ")
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid} on "):  # the Python API, the same
            infer_folder(_model_2d(), "cxr", tmp_path / "in", out, preset_options={"size": 16}, progress=False)
        assert not (out / "predictions.csv").exists()
    finally:
        holder.kill()  # killed, not released: the OS drops its lock
        holder.join()
    assert _cli([*cxr_args, "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    assert _rows(out / "predictions.csv")["a"]["status"] == "ok"
    with output_lock(out):  # the folder is free again after a run
        pass


def test_output_that_is_a_file_or_inside_the_input_is_refused_in_one_line(tmp_path, cxr_args, capsys, untouched):
    (tmp_path / "in").mkdir()
    _png(tmp_path / "in" / "a.png")
    taken = tmp_path / "results.csv"
    taken.write_text("someone's table\n")
    assert _cli([*cxr_args, "--input", str(tmp_path / "in"), "--output", str(taken)]) == 2
    _one_line_error(capsys, str(taken), "is an existing file, not a folder")
    assert taken.read_text() == "someone's table\n"
    with pytest.raises(OutputError, match="existing file"):
        infer_folder(_model_2d(), "cxr", tmp_path / "in", taken, progress=False)

    assert _cli([*cxr_args, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "pred")]) == 2
    _one_line_error(capsys, "is inside the input folder")
    assert not (tmp_path / "in" / "pred").exists()


# ------------------------------------------------------------------------------------------------- case ids


def _series_sharing_a_folder(folder: Path) -> None:
    """Two 2-slice series in one folder whose SeriesInstanceUIDs end in the same 8 characters."""
    folder.mkdir(parents=True)
    for k, uid in enumerate(("1.2.826.0.1.3680043.1.12345678", "1.2.826.0.1.3680043.2.12345678")):
        for z in range(2):
            _dicom(folder / f"s{k}_{z}.dcm", series_uid=uid, z=float(z))


def test_case_ids_are_unique_ignoring_case_and_masks_never_overwrite(tmp_path, untouched):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("x.png", "x.jpg", "x_2.png", "X.png", "sub/x.png", "sub_x.png", "y.png"):
        _png(folder / name, seed=len(name))
    _series_sharing_a_folder(folder / "ct")

    cases, skipped = find_cases(folder)
    ids = {c.case_id: (c.path.relative_to(folder).as_posix(), c.series_uid) for c in cases}
    assert skipped == [] and len(cases) == 9
    assert len({i.casefold() for i in ids}) == len(ids)  # unique where the file system ignores case
    def sha(relative: str) -> str:
        return hashlib.sha1(relative.encode()).hexdigest()[:8]

    assert {i: p for i, (p, _) in ids.items() if not p.startswith("ct")} == {
        "x.jpg": "x.jpg", "x_2": "x_2.png", "y": "y.png",  # x.png and X.png collide ignoring case: hashed
        f"x_{sha('x.png')}": "x.png", f"X_{sha('X.png')}": "X.png",
        f"sub_x_{sha('sub/x.png')}": "sub/x.png", f"sub_x_{sha('sub_x.png')}": "sub_x.png"}
    series_ids = sorted(i for i, (p, _) in ids.items() if p == "ct")
    assert len(series_ids) == 2 and all(i.startswith("ct_12345678_") for i in series_ids)

    # the ids do not depend on the order the cases are listed in
    candidates = [("x", "x.png", "x.png"), ("x", "x.jpg", "x.jpg"), ("x_2", "x_2.png", "x_2.png"),
                  ("X", "X.png", "X.png"), ("a_b", "a_b.png", "a/b.png"), ("a_b", "a_b.png", "a_b.png")]
    expected = dict(zip(map(tuple, candidates), _unique_ids(candidates)))
    for order in permutations(candidates):
        assert dict(zip(order, _unique_ids(list(order)))) == expected

    # segmentation writes one mask per case, none overwritten: as many distinct masks as cases, each its own
    class Threshold(torch.nn.Module):
        def forward(self, x):
            return torch.cat([0.5 - x, x - 0.5], dim=1)

    images = tmp_path / "images"
    images.mkdir()
    names = ("x.png", "x.jpg", "x_2.png", "X.png")
    for k, name in enumerate(names):  # source k: a white band 2 (k + 1) columns wide
        film = np.zeros((10, 12), np.uint8)
        film[:, : 2 * (k + 1)] = 255
        Image.fromarray(film).save(images / name)
    summary = infer_folder(Threshold(), "cxr", images, tmp_path / "seg", task="segmentation",
                           preset_options={"size": (10, 12)}, progress=False)
    rows = _rows(tmp_path / "seg" / "predictions.csv")
    assert summary.n_ok == 4 and len({row["mask"].casefold() for row in rows.values()}) == 4
    for row in rows.values():  # each mask is the one of its own source
        band = 10 * 2 * (names.index(Path(row["path"]).name) + 1)
        assert int(np.asarray(nib.load(row["mask"]).dataobj).sum()) == int(row["foreground_voxels"]) == band


# ------------------------------------------------------------------------------------------------- resume


def test_interrupted_run_leaves_no_partial_file_and_the_rerun_completes_only_missing_cases(tmp_path, monkeypatch,
                                                                                           caplog, untouched):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(5):
        _png(folder / f"film{k}.png", seed=k)
    (folder / "notes.txt").write_text("not an image\n")
    model = _model_2d()
    loads: list[str] = []
    real_load = dataset_module.load_image

    def load(case, **kwargs):
        if len(loads) == interrupt_after:
            raise KeyboardInterrupt
        loads.append(case.case_id)
        return real_load(case, **kwargs)

    monkeypatch.setattr(dataset_module, "load_image", load)
    run_args = dict(task="binary", preset_options={"size": 16}, batch_size=1, progress=False)

    interrupt_after = None  # the reference: an uninterrupted run
    infer_folder(model, "cxr", folder, tmp_path / "reference", **run_args)
    reference = (tmp_path / "reference" / "predictions.csv").read_bytes()

    out, loads[:] = tmp_path / "out", []
    interrupt_after = 3
    with pytest.raises(KeyboardInterrupt):
        infer_folder(model, "cxr", folder, out, **run_args)
    left = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert not any(name.endswith((".partial", ".tmp")) for name in left), left
    assert not (out / "predictions.csv").exists() and not (out / "predictions.json").exists()

    loads[:], interrupt_after = [], None
    summary = infer_folder(model, "cxr", folder, out, **run_args)
    assert loads == ["film3", "film4"] and summary.n_resumed == 3  # only the missing cases were read
    assert (out / "predictions.csv").read_bytes() == reference
    assert not (out / JOURNAL_DIR).exists()

    # interrupted again, a finished case's file changes: the re-run predicts it again
    loads[:], interrupt_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        infer_folder(model, "cxr", folder, out, **run_args)
    _png(folder / "film0.png", seed=10)
    loads[:], interrupt_after = [], None
    summary = infer_folder(model, "cxr", folder, out, **run_args)
    assert loads == ["film0", "film2", "film3", "film4"] and summary.n_resumed == 1

    # interrupted again, then re-run with another threshold: the journal is discarded, said in one line
    loads[:], interrupt_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        infer_folder(model, "cxr", folder, out, **run_args)
    loads[:], interrupt_after = [], None
    with caplog.at_level(logging.WARNING, logger="medtl3d.inference"):
        summary = infer_folder(model, "cxr", folder, out, **{**run_args, "threshold": 0.7})
    assert len(loads) == 5 and summary.n_resumed == 0
    assert any("interrupted run with a different threshold: starting over" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------- model files


def test_unusable_model_files_are_refused_in_one_line(tmp_path, cxr_args, capsys, untouched):
    (tmp_path / "in").mkdir()
    _png(tmp_path / "in" / "a.png")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(64, 64)}, good)
    files = {"export.ts": (os.urandom(600), "is not a TorchScript export"),
             "random.pt": (os.urandom(600), "cannot be read safely"),
             "state_dict.pt": (good.read_bytes(), "is not a medtl3d training checkpoint"),
             "truncated.pt": (good.read_bytes()[:4000], "cannot be read safely")}
    for name, (content, why) in files.items():
        (tmp_path / name).write_bytes(content)
        args = [*cxr_args[2:], "--model", str(tmp_path / name)]
        assert _cli([*args, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2, name
        _one_line_error(capsys, str(tmp_path / name), why)
    assert not (tmp_path / "out" / "predictions.csv").exists()

    # the settings recorded beside a checkpoint (model.json), corrupt
    model = tmp_path / "model.pt"
    model.write_bytes((tmp_path / "state_dict.pt").read_bytes())
    (tmp_path / "model.json").write_text('{"preset": "cxr", ')
    assert _cli(["--model", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"{tmp_path / 'model.json'}: the recorded settings of {model} cannot be read")


def test_truncated_safetensors_weights_name_the_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    for cut in (5, len(whole) // 2):
        (tmp_path / "cut.safetensors").write_bytes(whole[:cut])
        with pytest.raises(WeightsError) as caught:
            read_checkpoint(tmp_path / "cut.safetensors")
        message = str(caught.value)
        assert "\n" not in message and f"{tmp_path / 'cut.safetensors'}: not a readable .safetensors file" in message
        assert "truncated or corrupt" in message


# ------------------------------------------------------------------------------------------------- images


def test_hostile_images_fail_their_case_in_one_line_without_decoding(tmp_path, cxr_args, capsys, untouched):
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "good.png")
    (folder / "fake.png").write_bytes(os.urandom(2000))
    whole = _png(tmp_path / "whole.png", size=(64, 64)).read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    _png_bomb(folder / "bomb.png", 12000, 12000)
    _huge_nifti_header(folder / "huge.nii")
    (folder / "huge_series").mkdir()
    for z in range(2):
        _dicom(folder / "huge_series" / f"slice{z}.dcm", rows=20000, columns=20000, series_uid="1.2.3.4", z=z)
    assert (folder / "bomb.png").stat().st_size < 50_000 and (folder / "huge.nii").stat().st_size < 1000

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert _cli([*cxr_args, "--input", str(folder), "--output", str(tmp_path / "out")]) == 1
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB: something was decoded"
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert rows["good"]["status"] == "ok"
    expected = {"fake": (folder / "fake.png", "cannot read as image"),
                "truncated": (folder / "truncated.png", "truncated"),
                "bomb": (folder / "bomb.png", "possible decompression bomb, refused before decoding"),
                "huge": (folder / "huge.nii", "1200x1200x1200 (voxels) decodes to 6,592 MB, over the decoded-size "
                                              "limit of 2048 MB"),
                "huge_series": (folder / "huge_series", "20000x20000x2x1 (columns x rows x frames x samples) "
                                                        "decodes to 3,052 MB")}
    for case_id, (path, why) in expected.items():
        reason = rows[case_id]["reason"]
        assert rows[case_id]["status"] == "failed" and reason.startswith(f"{path}: ") and why in reason, reason
        assert "\n" not in reason and len(reason) <= REASON_LIMIT
    assert "144000000 pixels" in rows["bomb"]["reason"]  # the size PIL's guard saw
    assert "--max-decoded-mb" in rows["huge"]["reason"]
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("  failed: ") for line in printed) == 5


def test_decoded_size_limit_is_configurable_and_named(tmp_path, cxr_args, monkeypatch, capsys, untouched):
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "film.png", size=(64, 64))  # 64 x 64 x 1 float32 = 16 KB
    assert _cli([*cxr_args, "--input", str(folder), "--output", str(tmp_path / "a"), "--max-decoded-mb", "0.01"]) == 1
    reason = _rows(tmp_path / "a" / "predictions.csv")["film"]["reason"]
    assert reason.startswith(f"{folder / 'film.png'}: 64x64x1 (width x height x bands) decodes to 0 MB, over the "
                             "decoded-size limit of 0.01 MB")
    monkeypatch.setenv("MEDTL3D_MAX_DECODED_MB", "0.01")
    summary = infer_folder(_model_2d(), "cxr", folder, tmp_path / "b", preset_options={"size": 16}, progress=False)
    assert summary.n_failed == 1 and "limit of 0.01 MB" in summary.failures[0]["reason"]
    summary = infer_folder(_model_2d(), "cxr", folder, tmp_path / "c", preset_options={"size": 16},
                           max_decoded_mb=1, progress=False)  # the argument wins over the environment
    assert summary.n_ok == 1
    monkeypatch.setenv("MEDTL3D_MAX_DECODED_MB", "lots")
    assert _cli([*cxr_args, "--input", str(folder), "--output", str(tmp_path / "d")]) == 2
    _one_line_error(capsys, "MEDTL3D_MAX_DECODED_MB='lots': the decoded-size limit must be a positive number of MB")
    with pytest.raises(DataError, match="max_decoded_mb=-1"):
        infer_folder(_model_2d(), "cxr", folder, tmp_path / "e", max_decoded_mb=-1, progress=False)


def test_unreadable_folders_and_files_are_skipped_with_a_reason(tmp_path, monkeypatch, untouched):
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    _png(folder / "locked" / "hidden.png")
    _png(folder / "good.png")
    _png(folder / "secret.png")
    (folder / "secret.dcm").write_bytes(b"\0" * 200)
    real_scandir, real_open = os.scandir, open

    def scandir(path="."):  # tests may run as root, whom chmod 000 does not stop: refuse like the kernel would
        if isinstance(path, (str, os.PathLike)) and Path(path) == folder / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def guarded_open(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and Path(path).name.startswith("secret"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(data_discovery, "open", guarded_open, raising=False)
    summary = infer_folder(_model_2d(), "cxr", folder, tmp_path / "out", preset_options={"size": 16},
                           progress=False)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert (summary.n_ok, summary.n_skipped) == (1, 3) and rows["good"]["status"] == "ok"
    assert rows["locked"]["status"] == "skipped"
    assert rows["locked"]["reason"] == "cannot list folder: Permission denied"
    for name in ("secret.png", "secret.dcm"):
        assert rows[name]["status"] == "skipped" and rows[name]["reason"] == "cannot read file: Permission denied"


# ------------------------------------------------------------------------------------------------- the model's input


def test_a_model_refuses_cases_of_the_wrong_dimensionality_or_channels(tmp_path, checkpoints, capsys, untouched):
    films, volumes, rgb = tmp_path / "films", tmp_path / "volumes", tmp_path / "rgb"
    for folder in (films, volumes, rgb):
        folder.mkdir()
    _png(films / "film.png")
    nib.save(nib.Nifti1Image(np.zeros((10, 9, 8), np.float32), np.eye(4)), volumes / "vol.nii.gz")
    _png(rgb / "patch.png", mode="RGB")

    # a 3D CT model on a folder of 2D PNGs (the ct preset would make each a one-slice volume)
    assert _cli(["--model", str(checkpoints["3d"]), "--preset", "ct", "--preset-option", "size=16", "--task",
                 "binary", "--input", str(films), "--output", str(tmp_path / "a"), "--no-progress"]) == 1
    reason = _rows(tmp_path / "a" / "predictions.csv")["film"]["reason"]
    assert reason.startswith(f"{films / 'film.png'}: the model takes 3D input, this case is 2D (shape (1, 12, 10))")

    model = _model_2d()
    scripted = torch.jit.trace(model, torch.zeros(1, 1, 16, 16))
    for name, candidate in (("module", model), ("torchscript", scripted)):  # a 2D model on a 3D volume
        summary = infer_folder(candidate, "ct", volumes, tmp_path / f"b_{name}", preset_options={"size": 16},
                               progress=False)
        assert summary.failures[0]["reason"] == (f"{volumes / 'vol.nii.gz'}: the model takes 2D input, this case "
                                                 "is 3D (shape (1, 10, 9, 8)): give 2D cases to this model, or use "
                                                 "a 3D model")

    # a 1-channel model on RGB patches through a preset that keeps RGB
    summary = infer_folder(model, "pathology", rgb, tmp_path / "c", preset_options={"size": 16}, progress=False)
    assert summary.failures[0]["reason"].startswith(f"{rgb / 'patch.png'}: the model takes 1-channel input, this "
                                                    "case has 3 channel(s) after preprocessing")
    summary = infer_folder(model, "cxr", rgb, tmp_path / "d", preset_options={"size": 16}, progress=False)
    assert summary.n_ok == 1  # the cxr preset converts RGB to one channel


def test_per_case_reasons_are_one_line_and_the_traceback_goes_to_the_log(tmp_path, caplog, untouched):
    class Verbose(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3)

        def forward(self, x):
            raise RuntimeError("shape mismatch in layer 7\n" + "\n".join(f"  frame {k}" for k in range(400)))

    (tmp_path / "in").mkdir()
    _png(tmp_path / "in" / "a.png")
    with caplog.at_level(logging.DEBUG, logger="medtl3d.inference"):
        summary = infer_folder(Verbose(), "cxr", tmp_path / "in", tmp_path / "out", preset_options={"size": 16},
                               progress=False)
    assert summary.failures[0]["reason"] == "RuntimeError: shape mismatch in layer 7"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "frame 399" in str(logged[0].exc_info[1])
