"""HD95 in millimetres: constructed masks at anisotropic spacing against hand-computed distances, the spacing of a
NIfTI mask read off its affine after the segmentation preset's resizing (through a real ``SupervisedEvaluator``
with the bundles' batch preparer and case collector) and of a real CT label map after the ct preset, pixels for a
PNG mask, and no interval mixing the two."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from PIL import Image
from torch import nn

from medtl3d.data.io import LoadCased
from medtl3d.data.presets import preset
from medtl3d.engine import BatchPreparer
from medtl3d.engine.components import case_metrics
from medtl3d.engine.metrics import mask_spacing, segmentation_case_scores
from medtl3d.evaluation import case_report, compare_runs
from medtl3d.provenance import sha256_file
from medtl3d.reporting import write_csv, write_json
from medtl3d.workflows import image_dataset


def hd95(pred, label, spacing=None) -> list[float]:
    return segmentation_case_scores(pred, label, 2, spacing)[2][:, 0].tolist()


def test_hd95_of_single_points_is_their_distance_in_mm():
    """Single-pixel masks: the surface is the point, HD95 the distance between the two points."""
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    label[:, 0, 5, 5] = 1
    pred = torch.zeros_like(label)
    pred[:, 0, 8, 9] = 1  # 3 rows, 4 columns away
    assert hd95(pred, label) == pytest.approx([5.0, 5.0])
    assert hd95(pred, label, [[2.0, 0.5], [0.5, 2.0]]) == pytest.approx(
        [math.hypot(3 * 2.0, 4 * 0.5), math.hypot(3 * 0.5, 4 * 2.0)])  # sqrt(40), sqrt(66.25): the axes in order
    volume = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    volume[0, 0, 2, 2, 2] = 1
    moved = torch.zeros_like(volume)
    moved[0, 0, 4, 3, 2] = 1  # 2 slices (3 mm each) and 1 row (0.7 mm)
    assert hd95(moved, volume, [[3.0, 0.7, 0.7]]) == pytest.approx([math.hypot(6.0, 0.7)])


def test_hd95_of_a_square_moved_along_the_fine_axis():
    """A 10x10 square moved 2 columns: every boundary pixel is 0 or 2 columns from the other surface (HD95 2 px);
    at 3 mm x 0.5 mm those 2 columns are 1 mm, nearer than any step along the 3 mm rows."""
    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    label[0, 0, 10:20, 10:20] = 1
    pred = torch.roll(label, 2, dims=-1)
    assert hd95(pred, label) == pytest.approx([2.0])
    assert hd95(pred, label, [[3.0, 0.5]]) == pytest.approx([1.0])


def write_masks(folder):
    """The same rectangle as a NIfTI (x 40 voxels of 0.5 mm, y 20 voxels of 2 mm) and as a PNG (no spacing)."""
    folder.mkdir()
    mask = np.zeros((40, 20), np.uint8)  # (x, y)
    mask[12:28, 6:14] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([0.5, 2.0, 1.0, 1.0])), folder / "mask.nii.gz")
    Image.fromarray(mask.T * 255).save(folder / "mask.png")  # rows = y, as PIL stores an image
    Image.fromarray(mask.T).save(folder / "label.png")
    return [{"image": str(folder / "mask.nii.gz"), "label": str(folder / "mask.nii.gz"), "id": "nifti"}], \
        [{"image": str(folder / "mask.png"), "label": str(folder / "label.png"), "id": "png"}]


class ShiftedMask(nn.Module):
    """Logits of the input mask moved one column: the prediction HD95 is measured on."""

    def forward(self, x):
        moved = (torch.roll(x, 1, dims=-1) > 0.5).float()
        return torch.cat([1 - moved, moved], dim=1) * 10


def evaluate(items):
    dataset = image_dataset(items, preset("cxr", train=False, label_key="label", size=10), task="segmentation",
                            cache=False)
    collector = case_metrics("segmentation")
    evaluator = SupervisedEvaluator(torch.device("cpu"), DataLoader(dataset, batch_size=1), ShiftedMask(),
                                    prepare_batch=BatchPreparer("segmentation", 2), key_val_metric={"dice": collector},
                                    decollate=False)
    evaluator.run()
    return collector.rows, dataset


def test_nifti_mask_in_mm_after_the_preset_png_in_pixels(tmp_path):
    nifti, png = write_masks(tmp_path / "masks")
    rows, dataset = evaluate(nifti)
    # resized to 10 x 10: rows (y) 40 mm / 10 = 4 mm, columns (x) 20 mm / 10 = 2 mm
    assert mask_spacing(dataset[0]["label"][None]).tolist()[0] == pytest.approx([4.0, 2.0])
    assert rows[0]["hd95_unit"] == "mm" and rows[0]["hd95"] == pytest.approx(2.0)  # one 2 mm column
    rows, dataset = evaluate(png)
    assert mask_spacing(dataset[0]["label"][None]) is None
    assert rows[0]["hd95_unit"] == "px" and rows[0]["hd95"] == pytest.approx(1.0)
    report = case_report(rows, "segmentation", n_resamples=50)
    assert next(row for row in report.metrics if row["metric"] == "hd95")["unit"] == "px"


def test_mixed_units_never_share_an_interval(tmp_path):
    nifti, png = write_masks(tmp_path / "masks")
    with pytest.warns(RuntimeWarning, match="HD95 left out: 1 of 2 test masks record their spacing"):
        rows, _ = evaluate(nifti + png)
    assert all(math.isnan(row["hd95"]) for row in rows) and all(row["dice"] > 0.5 for row in rows)

    def run(name, unit):
        cases = [{"id": f"c{i}", "dice": 0.8, "jaccard": 0.8 / 1.2, "hd95": 2.0 + i % 3, "hd95_unit": unit}
                 for i in range(10)]
        predictions = write_csv(tmp_path / name / "predictions.csv", cases)
        write_json(tmp_path / name / "evaluation.json", {"task": "segmentation", "metadata": {
            "predictions": predictions.name, "predictions_sha256": sha256_file(predictions)}})
        return tmp_path / name

    same = compare_runs([run("a", "mm")], [run("b", "mm")], n_resamples=50)
    assert same.units == {"hd95": "mm"} and next(r for r in same.rows if r["metric"] == "hd95")["difference"] == 0
    mixed = compare_runs([run("a", "mm")], [run("c", "px")], n_resamples=50)
    hd95_rows = [row for row in mixed.rows if row["metric"] == "hd95"]
    assert hd95_rows == [{"metric": "hd95", "method": "none: HD95 in mm and px across the runs, not comparable"}]
    assert mixed.units == {} and mixed.verdict == "non-inferior"  # Dice is still compared


CT_SEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_volumes" / "example_seg.nii.gz"


@pytest.mark.skipif(not CT_SEG.is_file(), reason=f"real data not available ({CT_SEG} is absent)")
def test_real_ct_label_map_spacing_after_the_ct_preset():
    """TotalSegmentator's label map (122 x 101 x 30 voxels of 3 mm): in model order (D, H, W) after the ct preset's
    in-plane resize to 32 x 32, 3 mm between slices, 101 * 3 / 32 mm between rows, 122 * 3 / 32 mm between columns."""
    transform = preset("ct", train=False, keys=("image",), label_key="label", size=32)
    batch = list_data_collate([Compose([LoadCased(["image", "label"]), *transform.transforms])(
        {"image": str(CT_SEG), "label": str(CT_SEG)})])
    label = batch["label"]
    expected = [3.0, 101 * 3 / 32, 122 * 3 / 32]
    assert label.shape[2:] == (30, 32, 32) and mask_spacing(label).tolist()[0] == pytest.approx(expected)
    moved = torch.roll(label.as_tensor(), 1, dims=2)  # one slice along D
    classes = int(label.max()) + 1
    in_mm = segmentation_case_scores(moved, label.as_tensor(), classes, mask_spacing(label))[2]
    by_hand = segmentation_case_scores(moved, label.as_tensor(), classes, [expected])[2]
    assert torch.equal(torch.isnan(in_mm), torch.isnan(by_hand)) and (in_mm.nan_to_num() == by_hand.nan_to_num()).all()
    assert torch.nanmean(in_mm) > torch.nanmean(segmentation_case_scores(moved, label.as_tensor(), classes)[2])
