"""How well short CPU trainings learn the phantoms, over seeds, as a Markdown table (name, seed, threads, value,
threshold).

A learned quality after a short CPU training depends on the seed, the thread count, BLAS and the CPU, so where the
margin over a meaningful threshold was thin it is measured here, not asserted in the test suite (issue 14); the
tests keep what must hold everywhere (the training runs, the numbers are finite, the engine's own validation agrees
with a fresh evaluation) and call the same functions at the tests' settings.

Studies (the training of ``tests/test_engine_phantoms.py``; the seed drives the phantoms, the hold-out and the
model):

- ``engine_cxr2d``: 320 CXR phantoms of 64 px, a quarter held out, ``cbr_tiny`` (widths / 4) truncated at ``cbr3``,
  14 epochs of the training engine; value: the held-out AUROC of the best epoch.
- ``engine_ctpa3d``: 160 CTPA phantoms of 16 x 32 x 32, a quarter held out, windows of 16 slices, ``cbr_tiny``
  (widths / 8) truncated at ``cbr3``, 12 epochs; value: the held-out series-level AUROC of the best epoch.
- ``lung_seg`` (real data, needs ``../shared/data/cxr_lung_segmentation`` and the torchvision ImageNet MobileNetV2
  weights; the settings of ``tests/test_bundles_real_data.py``): the ``cxr_lung_segmentation`` bundle, 10 epochs at
  128 px on CPU; value: the Dice on the held-out patients. The seed is the bundle's training seed (the patient split
  stays at ``data_seed`` 0). Several minutes per run.

The threshold column is the level the tests used to assert (AUROC > 0.8, lung Dice > 0.85); ``ok`` says whether the
value clears it. Not in the default ``--studies``: ``lung_seg``.
``--quick`` runs seed 0 only, at about half the epochs (3 for ``lung_seg``): a smoke run, not the full numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

from medtl3d.backbones import create_backbone
from medtl3d.data.datalists import load_datalist
from medtl3d.data.splits import holdout_split
from medtl3d.data.phantoms import generate_ctpa, generate_cxr
from medtl3d.data.presets import preset
from medtl3d.data.windows import WindowDataset
from medtl3d.engine import train
from medtl3d.reporting import markdown_table, write_table
from medtl3d.strategies import apply_strategy
from medtl3d.workflows import image_dataset

THRESHOLD = {"engine_cxr2d": 0.8, "engine_ctpa3d": 0.8, "lung_seg": 0.85}
DEFAULT_STUDIES = "engine_cxr2d,engine_ctpa3d"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _small_model(spatial_dims: int, width_factor: float):
    body = create_backbone("cbr_tiny", spatial_dims=spatial_dims, in_channels=1, slim_from=0,
                           width_factor=width_factor)
    return apply_strategy(body, "truncate", 1, cut="cbr3")


def engine_phantoms(name: str, seed: int, root: Path, epochs: int | None = None):
    """Train as ``tests/test_engine_phantoms.py`` does; returns (result, model, val_data, series_key)."""
    if name == "engine_cxr2d":
        items = load_datalist(generate_cxr(root / "cxr", 320, size=64, seed=seed), task="classification",
                              num_classes=1)
        train_items, val_items = holdout_split(items, 0.25, seed=seed)
        transform = preset("cxr", train=False, size=64)
        train_data = image_dataset(train_items, transform, task="binary")
        val_data = image_dataset(val_items, transform, task="binary")
        torch.manual_seed(seed)
        model = _small_model(2, 4)
        options, series_key = {"epochs": epochs or 14, "batch_size": 16}, None
    elif name == "engine_ctpa3d":
        items = load_datalist(generate_ctpa(root / "ctpa", 160, shape=(16, 32, 32), spacing=(4.0, 2.0, 2.0),
                                            seed=seed), task="classification", num_classes=1)
        train_items, val_items = holdout_split(items, 0.25, seed=seed)
        transform = preset("ct", train=False, size=32)
        train_data = WindowDataset(train_items, transform, num_slices=16)
        val_data = WindowDataset(val_items, transform, num_slices=16)
        torch.manual_seed(seed)
        model = _small_model(3, 8)
        options, series_key = {"epochs": epochs or 12, "batch_size": 8, "series_key": "series"}, "series"
    else:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(THRESHOLD)}")
    result = train(model, train_data, val_data, task="binary", output_dir=root / "run", lr=3e-3, progress=False,
                   tensorboard=False, **options)
    return result, model, val_data, series_key


def lung_segmentation(seed: int, threads: int, root: Path, epochs: int = 10) -> dict:
    """The ``cxr_lung_segmentation`` bundle on the real X-rays, as ``tests/test_bundles_real_data.py`` runs it;
    returns the test split's metrics."""
    from monai.bundle import run

    lungs = SHARED / "data" / "cxr_lung_segmentation"
    weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not lungs.is_dir() or not weights.is_file():
        raise FileNotFoundError(f"lung_seg needs {lungs} and {weights}")
    with open(lungs / "source_metadata.csv", newline="") as f:
        patient = {row["filename"].rsplit(".", 1)[0]: row["patientid"] for row in csv.DictReader(f)}
    datalist = root / "lungs.csv"
    with open(lungs / "index.csv", newline="") as src, open(datalist, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "mask", "patient"])
        for row in csv.DictReader(src):
            writer.writerow([lungs / row["image"], lungs / row["mask"], patient[Path(row["image"]).stem]])
    settings = {"output_dir": str(root / "run"), "ckpt_path": str(root / "run" / "model.pt"),
                "datalist": str(datalist), "label_field": "mask", "backbone": "mobilenet_v2", "weights": str(weights),
                "image_size": 128, "epochs": epochs, "batch_size": 8, "lr": 0.002,
                "n_folds": 5, "fold": 0, "test_fraction": 0.2, "seed": seed, "amp": False, "tensorboard": False,
                "device": "cpu", "num_threads": threads}
    configs = [str(REPO / "bundles" / "cxr_lung_segmentation" / "configs" / f) for f in ("train.yaml", "evaluate.yaml")]
    run(config_file=configs[:1], **settings)
    run(config_file=configs, **settings)
    return json.loads((root / "run" / "eval" / "metrics.json").read_text())


def run_study(name: str, seed: int, threads: int, quick: bool = False) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench_learning_{name}_") as tmp:
        if name == "lung_seg":
            value = float(lung_segmentation(seed, threads, Path(tmp), epochs=3 if quick else 10)["dice"])
        else:
            epochs = (7 if name == "engine_cxr2d" else 6) if quick else None
            value = float(engine_phantoms(name, seed, Path(tmp), epochs=epochs)[0].best_metric)
    return {"name": name, "seed": seed, "threads": threads, "value": round(value, 3),
            "threshold": THRESHOLD[name], "ok": value > THRESHOLD[name],
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default=DEFAULT_STUDIES, help=f"comma-separated: {', '.join(THRESHOLD)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (phantoms, split and model)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--quick", action="store_true", help="seed 0, half the epochs (smoke run)")
    parser.add_argument("--output", type=Path, help="write bench_learning.{csv,json,md} here")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.studies.split(","):
            for seed in seeds:
                rows.append(run_study(name, seed, threads, quick=args.quick))
                print(f"{name} seed {seed} threads {threads}: {rows[-1]['value']} in {rows[-1]['seconds']} s",
                      flush=True)
    columns = ["name", "seed", "threads", "value", "threshold", "ok", "seconds"]
    title = "Held-out AUROC (engine_*) or Dice (lung_seg) after short CPU training"
    title += " (--quick)" if args.quick else ""
    print(markdown_table(rows, columns, title))
    if args.output:
        write_table(args.output, "bench_learning", rows, metadata={k: str(v) for k, v in vars(args).items()},
                    title=title, columns=columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
