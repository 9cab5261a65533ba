"""medtl3d.reporting: every file the package writes goes through atomic_write; the shared table writers."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from medtl3d.reporting import atomic_write, markdown_table, write_bytes, write_csv, write_json, write_table, write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "report.md", "old\n")

    def half_then_crash(temp):
        temp.write_text("half a report")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_durable_write_creates_folders_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "state.bin"
    write_bytes(target, b"1")
    atomic_write(target, lambda temp: temp.write_bytes(b"22"), durable=True)
    assert target.read_bytes() == b"22"
    assert [p.name for p in target.parent.iterdir()] == ["state.bin"]


def test_suffix_lets_writers_pick_the_format_by_extension(tmp_path):
    """nibabel chooses gzip from the name: the temporary must end in .nii.gz too."""
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    target = atomic_write(tmp_path / "mask.nii.gz", lambda temp: nib.save(nib.Nifti1Image(data, np.eye(4)), temp),
                          suffix=".nii.gz")
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert np.array_equal(np.asarray(nib.load(target).dataobj), data)


def test_tables_write_nan_as_missing_in_every_format(tmp_path):
    rows = [{"layer": "stem", "cka": 0.5, "n": np.int64(3)}, {"layer": "layer1", "cka": math.nan, "extra": "x"}]
    paths = write_table(tmp_path, "cka", rows, metadata={"model": "resnet18"}, title="CKA")
    with open(paths["csv"], newline="") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["layer", "cka", "n", "extra"]  # columns in first-seen order
    assert read[0]["cka"] == "0.5" and read[1]["cka"] == "" and read[1]["n"] == ""
    document = json.loads(paths["json"].read_text())  # strict JSON: NaN would not parse in other readers
    assert document["metadata"] == {"model": "resnet18"} and document["rows"][1]["cka"] is None
    assert document["rows"][0]["n"] == 3
    assert paths["md"].read_text() == markdown_table(rows, title="CKA")
    assert "| layer1 | - | - | x |" in paths["md"].read_text()
    assert write_json(tmp_path / "x.json", {"v": float("inf")}).read_text() == '{\n  "v": null\n}\n'
    assert write_csv(tmp_path / "empty.csv", [], ["a", "b"]).read_text().strip() == "a,b"
