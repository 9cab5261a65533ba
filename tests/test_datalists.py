"""Datalists: JSON/CSV round trips, validation errors naming file/row/field, patient-grouped stratified splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medtl3d.data.datalists import load_datalist, write_datalist
from medtl3d.data.splits import holdout_split, kfold_split, split_summary
from medtl3d.errors import DataError


def make_files(root: Path, names) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def cohort(n_patients: int = 40, positive_every: int = 4) -> list[dict]:
    """Patients with 1-3 images each; every 4th patient positive (all its images label 1)."""
    items = []
    for p in range(n_patients):
        for k in range(1 + p % 3):
            items.append({"image": f"/data/p{p:02d}_{k}.png", "label": int(p % positive_every == 0),
                          "patient": f"P{p:02d}"})
    return items


def test_json_and_csv_round_trip(tmp_path):
    make_files(tmp_path, ["img/a.nii.gz", "img/b.nii.gz", "img/c.png", "masks/a.nii.gz"])
    items = [{"image": str(tmp_path / "img/a.nii.gz"), "label": 1, "patient": "P1", "lesion": "x"},
             {"image": str(tmp_path / "img/b.nii.gz"), "label": 0, "patient": "P1"},
             {"image": str(tmp_path / "img/c.png"), "label": 2, "patient": "P2"}]
    for name in ("list.json", "list.csv"):
        path = write_datalist(items, tmp_path / name)
        assert not list(tmp_path.glob(f".{name}.*"))  # no temp file left behind
        back = load_datalist(path, num_classes=3)
        assert [(b["image"], b["label"], b["patient"]) for b in back] == \
            [(i["image"], i["label"], i["patient"]) for i in items]
        assert back[0]["lesion"] == "x"
    on_disk = json.loads((tmp_path / "list.json").read_text())
    assert on_disk["training"][0]["image"] == "img/a.nii.gz"  # relative to the datalist's folder
    assert (tmp_path / "list.csv").read_text().splitlines()[0] == "image,label,patient,lesion"

    # segmentation: the label is a mask path, resolved and checked like the image
    seg = [{"image": str(tmp_path / "img/a.nii.gz"), "label": str(tmp_path / "masks/a.nii.gz")}]
    back = load_datalist(write_datalist(seg, tmp_path / "sub" / "seg.json", base_dir=tmp_path), base_dir=tmp_path,
                         task="segmentation")
    assert back == [{"image": str(tmp_path / "img/a.nii.gz"), "label": str(tmp_path / "masks/a.nii.gz"),
                     "patient": "a"}]  # patient defaults to the image's stem

    # multilabel: JSON lists, CSV ";"-joined flags
    ml = [{"image": str(tmp_path / "img/a.nii.gz"), "label": [0, 1, 1], "patient": "P1"},
          {"image": str(tmp_path / "img/c.png"), "label": [1, 0, 0], "patient": "P2"}]
    for name in ("ml.json", "ml.csv"):
        back = load_datalist(write_datalist(ml, tmp_path / name), task="multilabel", num_classes=3)
        assert [b["label"] for b in back] == [[0, 1, 1], [1, 0, 0]]
    assert "0;1;1" in (tmp_path / "ml.csv").read_text()


def test_plain_list_decathlon_keys_and_label_columns(tmp_path):
    make_files(tmp_path, ["a.png", "b.png"])
    (tmp_path / "plain.json").write_text(json.dumps([{"image": "a.png", "label": 1}]))
    assert load_datalist(tmp_path / "plain.json")[0]["label"] == 1
    (tmp_path / "dec.json").write_text(json.dumps({"training": [], "test": ["a.png", {"image": "b.png"}]}))
    test = load_datalist(tmp_path / "dec.json", key="test", labels=False)
    assert [t["patient"] for t in test] == ["a", "b"] and "label" not in test[0]
    with pytest.raises(DataError, match=r"dec\.json: no key 'validation' \(keys: 'training', 'test'\)"):
        load_datalist(tmp_path / "dec.json", key="validation")
    with pytest.raises(DataError, match=r"dec\.json: datalist is empty under 'training'"):
        load_datalist(tmp_path / "dec.json")
    (tmp_path / "masks.json").write_text(json.dumps([{"image": "a.png", "label": 0, "mask": "b.png"}, 7,
                                                     {"image": "b.png", "label": 1, "mask": "gone.png"}]))
    with pytest.raises(DataError) as e:
        load_datalist(tmp_path / "masks.json", path_keys=("mask",))
    assert "row 2, field 'image': item is int" in str(e.value)
    assert f"row 3, field 'mask': file not found: {tmp_path / 'gone.png'}" in str(e.value)
    (tmp_path / "masks.json").write_text(json.dumps([{"image": "a.png", "label": 0, "mask": "b.png"}]))
    assert load_datalist(tmp_path / "masks.json", path_keys=("mask",))[0]["mask"] == str(tmp_path / "b.png")
    (tmp_path / "cols.csv").write_text("image,group,label_effusion,label_nodule\na.png,G1,1,0\nb.png,G2,0,0\n")
    items = load_datalist(tmp_path / "cols.csv", task="multilabel", num_classes=2)
    assert [(i["patient"], i["label"]) for i in items] == [("G1", [1, 0]), ("G2", [0, 0])]


def test_validation_errors_name_file_row_and_field(tmp_path):
    make_files(tmp_path, ["a.png", "b.png"])
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,label,patient\na.png,1,P1\nmissing.png,0,P2\nb.png,3,P3\nb.png,cat,P4\n")
    with pytest.raises(DataError) as e:
        load_datalist(csv_path, num_classes=2)
    msg = str(e.value)
    assert msg.startswith(f"{csv_path}: 3 invalid entries")
    assert f"row 2, field 'image': file not found: {tmp_path / 'missing.png'}" in msg
    assert "row 3, field 'label': 3 is out of range for num_classes=2 (expected 0..1)" in msg
    assert "row 4, field 'label': 'cat' is not a non-negative integer class index" in msg
    # binary: num_classes 1 means {0, 1} as well
    csv_path.write_text("image,label\na.png,1\nb.png,0\n")
    assert [i["label"] for i in load_datalist(csv_path, num_classes=1)] == [1, 0]
    with pytest.raises(DataError, match="num_classes=0: expected a positive integer"):
        load_datalist(csv_path, num_classes=0)

    (tmp_path / "nolabel.csv").write_text("image,patient\na.png,P1\n")
    with pytest.raises(DataError, match=r"nolabel\.csv: missing column 'label' \(columns: image, patient\)"):
        load_datalist(tmp_path / "nolabel.csv")
    (tmp_path / "noimage.json").write_text(json.dumps({"training": [{"image": "a.png", "label": 0}, {"label": 1}]}))
    with pytest.raises(DataError, match=r"row 2, field 'image': missing"):
        load_datalist(tmp_path / "noimage.json")
    (tmp_path / "ml.json").write_text(json.dumps([{"image": "a.png", "label": [0, 1]},
                                                   {"image": "b.png", "label": [1, 0, 1]}]))
    with pytest.raises(DataError, match=r"row 2, field 'label': 3 flags, expected 2 \(from row 1\)"):
        load_datalist(tmp_path / "ml.json", task="multilabel")
    (tmp_path / "seg.json").write_text(json.dumps([{"image": "a.png", "label": "no_mask.png"}]))
    with pytest.raises(DataError, match=r"row 1, field 'label': mask file not found: .*no_mask\.png"):
        load_datalist(tmp_path / "seg.json", task="segmentation")
    assert load_datalist(tmp_path / "seg.json", task="segmentation", check_files=False)[0]["label"].endswith(
        "no_mask.png")


def test_kfold_grouped_stratified_and_complete():
    items = cohort()
    val_images: list[str] = []
    overall = sum(i["label"] for i in items) / len(items)
    for fold in range(5):
        train, val = kfold_split(items, 5, fold, seed=3)
        assert {i["patient"] for i in train}.isdisjoint({i["patient"] for i in val})
        assert len(train) + len(val) == len(items)
        assert abs(sum(i["label"] for i in val) / len(val) - overall) < 0.1  # stratified
        val_images += [i["image"] for i in val]
    assert sorted(val_images) == sorted(i["image"] for i in items)  # every item in exactly one val fold
    assert kfold_split(items, 5, 2, seed=3) == kfold_split(items, 5, 2, seed=3)
    assert kfold_split(items, 5, 2, seed=3)[1] != kfold_split(items, 5, 2, seed=4)[1]

    # 10 positive patients: 11 folds cannot each get one
    with pytest.raises(DataError, match="smallest class: class 1 has 10 patients"):
        kfold_split(items, 11, 0)
    with pytest.raises(DataError, match=r"fold=5 out of range for n_folds=5 \(expected 0..4\)"):
        kfold_split(items, 5, 5)
    assert len(kfold_split(items, 11, 0, stratify=False)[1]) > 0  # group-only

    # segmentation: no class to stratify on, still grouped
    seg = [{"image": f"/d/{p}_{k}.nii.gz", "label": f"/d/{p}_{k}_mask.nii.gz", "patient": p}
           for p in "ABCDEF" for k in range(2)]
    train, val = kfold_split(seg, 3, 1)
    assert len(val) == 4 and {i["patient"] for i in train}.isdisjoint({i["patient"] for i in val})


def test_holdout_by_patient_stratified():
    """One fold of StratifiedGroupKFold(4): patients disjoint, about a quarter of the cases, the classes' case
    shares kept (within 0.1 over seeds 0-4), deterministic in the seed."""
    items = cohort()
    overall = sum(i["label"] for i in items) / len(items)
    for seed in range(5):
        train, test = holdout_split(items, 0.25, seed=seed)
        assert {i["patient"] for i in train}.isdisjoint({i["patient"] for i in test})
        assert len(train) + len(test) == len(items)
        assert abs(len(test) / len(items) - 0.25) < 0.05
        assert abs(sum(i["label"] for i in test) / len(test) - overall) < 0.1
    assert holdout_split(items, 0.25, seed=1) == holdout_split(items, 0.25, seed=1)
    assert holdout_split(items, 0.25, seed=1) != holdout_split(items, 0.25, seed=2)
    train, test = holdout_split(items, 0.75, seed=1)  # above one half: the test part is the other folds
    assert abs(len(test) / len(items) - 0.75) < 0.05
    with pytest.raises(DataError, match=r"test_fraction=1\.5"):
        holdout_split(items, 1.5)
    with pytest.raises(DataError, match=r"test_fraction=0\.2 .*class 1 has 1 patient"):
        holdout_split([{**i, "label": int(i["patient"] == "P00")} for i in items], 0.2)


def slides(big: int = 28, big_positives: int = 25) -> list[dict]:
    """Patches of 9 slides of 4 patches (one positive each) and one slide of ``big`` patches, ``big_positives``
    of them positive: the pathology split where one slide dominated."""
    items = [{"image": f"/d/s{s}_{k}.png", "label": int(k == 0), "patient": f"S{s}"}
             for s in range(9) for k in range(4)]
    items += [{"image": f"/d/big_{k}.png", "label": int(k < big_positives), "patient": "BIG"} for k in range(big)]
    return items


def test_split_summary_counts_and_flags_a_dominant_group():
    rows, problems = split_summary({"val": slides(), "train": slides()[:36]})
    val, train = rows
    # 64 cases: 36 small-slide patches (9 positive) + 28 of the big slide (25 positive)
    assert (val["cases"], val["groups"], val["classes"]) == (64, 10, "0:30 1:34")
    assert (val["largest_group"], val["largest_group_cases"]) == ("BIG", 28)
    assert val["largest_group_share"] == pytest.approx(28 / 64)
    assert val["largest_share_class_1"] == pytest.approx(25 / 34)
    assert len(problems) == 1 and problems[0].startswith("split val: one group dominates: group BIG holds 28 of 64")
    assert "group BIG holds 25 of 34 cases of class 1 (74%)" in problems[0]
    assert train["largest_group_share"] == pytest.approx(4 / 36)  # no group above 25%: no warning
    # a share of a small part moves in big steps: under min_cases it is reported, not flagged
    rows, problems = split_summary({"test": slides()[:8]})
    assert rows[0]["largest_group_share"] == 0.5 and problems == []
    # segmentation items have no class: groups only
    seg = [{"image": f"/d/{p}_{k}.nii.gz", "label": f"/d/{p}_{k}_mask.nii.gz", "patient": p}
           for p in "AB" for k in range(2)]
    assert split_summary({"val": seg})[0][0]["classes"] == "-"


def test_kfold_balances_classes_with_unequal_groups():
    """Groups of 1-6 cases: every fold's positive share within 0.12 of the overall one, no group in two folds."""
    rng = np.random.default_rng(0)
    items = []
    for p in range(60):
        label = int(p % 3 == 0)
        items += [{"image": f"/d/p{p}_{k}.png", "label": label, "patient": f"P{p}"} for k in range(rng.integers(1, 7))]
    overall = np.mean([i["label"] for i in items])
    for fold in range(5):
        train, val = kfold_split(items, 5, fold, seed=0)
        assert {i["patient"] for i in train}.isdisjoint({i["patient"] for i in val})
        assert abs(np.mean([i["label"] for i in val]) - overall) < 0.12
