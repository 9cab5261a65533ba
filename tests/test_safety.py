"""No file the user opens runs code, every model says where it came from, one writer per output folder.

A checkpoint naming ``os.system`` as its builder is refused on every path that loads models (engine, ``medtl3d
infer``, ``medtl3d analyze``, the inference bundle) without running anything; plugins declared as entry points are
honoured. A bundle training records its provenance (versions, weights SHA-256, data content hashes, config) that
``medtl3d info`` prints; data hashes follow content, not paths. A folder another run holds is refused at once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest
import torch

from medtl3d import engine
from medtl3d.cli import main as medtl3d_main
from medtl3d.engine import _builders, load_model
from medtl3d.engine._checkpoint import FORMAT, save_checkpoint
from medtl3d.errors import OutputLockedError, SearchError, StudyError, TrainingError
from medtl3d.locking import LOCK_NAME, output_lock
from medtl3d.provenance import data_hash
from medtl3d.workflows import ConfigIdError, build_classifier
from medtl3d.workflows import train as bundle_train

REPO = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "tensorboard": False, "device": "cpu", "batch_size": 4}


def _hostile_checkpoint(tmp_path: Path, builder: str = "os.system") -> tuple[Path, Path]:
    """A checkpoint whose model_config would run ``touch PWNED`` if its builder string were imported and called."""
    pwned = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    save_checkpoint({"model": {}, "initial_state": {}, "inference": {"task": "binary", "preset": "cxr"},
                     "model_config": {"builder": builder, "command": f"touch {pwned}"}}, path)
    return path, pwned


def test_unregistered_builder_is_refused_on_every_loading_path(tmp_path, capsys):
    path, pwned = _hostile_checkpoint(tmp_path)
    refusal = rf"{path}: model_config builder 'os.system' is not a registered model builder"
    with pytest.raises(TrainingError, match=refusal):
        load_model(path)
    (tmp_path / "cases").mkdir()
    assert medtl3d_main(["infer", "--model", str(path), "--input", str(tmp_path / "cases"), "--output",
                         str(tmp_path / "out"), "--preset", "cxr", "--task", "binary", "--no-progress"]) == 2
    assert "'os.system' is not a registered model builder" in capsys.readouterr().err
    for method in ("weights", "similarity"):  # knn, reinit, gradcam, predictions load through the same function
        assert medtl3d_main(["analyze", method, "--checkpoint", str(path), "--output", str(tmp_path / "analysis"),
                             "--no-progress"]) == 2
        assert "'os.system' is not a registered model builder" in capsys.readouterr().err
    from monai.bundle import run

    bundle = REPO / "bundles" / "cxr_classification" / "configs"
    with pytest.raises(ConfigIdError, match="config id 'ckpt_path': .*'os.system' is not a registered model builder"):
        run(config_file=str(bundle / "inference.yaml"), ckpt_path=str(path), input_dir=str(tmp_path / "cases"),
            output_dir=str(tmp_path / "bundle_out"), bundle_root=str(bundle.parent))
    assert not pwned.exists()
    # the refusal imports nothing: a module named only by the file is never loaded
    path, _ = _hostile_checkpoint(tmp_path, "medtl3d_never_imported.evil.build")
    with pytest.raises(TrainingError, match="'medtl3d_never_imported.evil.build' is not a registered"):
        load_model(path)
    assert "medtl3d_never_imported" not in sys.modules
    # medtl3d info reads the same file without building (or running) anything
    assert medtl3d_main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["builder"] == "medtl3d_never_imported.evil.build"


def test_plugin_entry_point_and_plain_data_kwargs(tmp_path, monkeypatch):
    plugin = metadata.EntryPoint(name="identity_plugin", value="torch.nn:Identity", group=_builders.ENTRY_POINT_GROUP)
    monkeypatch.setattr(_builders.metadata, "entry_points",
                        lambda group: [plugin] if group == _builders.ENTRY_POINT_GROUP else [])
    path = tmp_path / "plugin.pt"
    save_checkpoint({"model": {}, "initial_state": {}, "model_config": {"builder": "identity_plugin"}}, path)
    assert isinstance(load_model(path), torch.nn.Identity)
    assert "identity_plugin" in engine.available_builders()
    save_checkpoint({"model": {}, "initial_state": {},
                     "model_config": {"builder": "identity_plugin", "scale": torch.ones(1)}}, path)
    with pytest.raises(TrainingError, match=r"model_config.scale is a Tensor; model_config may hold only plain"):
        load_model(path)
    with pytest.raises(TrainingError, match="belongs to medtl3d"):
        engine.register_builder("medtl3d.workflows.build_classifier", torch.nn.Identity)


def test_checkpoints_naming_the_old_dotted_builder_still_load(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("cbr_tiny", "truncate", num_classes=1, cut="cbr2", spatial_dims=2, in_channels=1)
    assert model.model_config["builder"] == "classifier"
    legacy = {**model.model_config, "builder": "medtl3d.workflows.build_classifier"}
    save_checkpoint({"model": model.state_dict(), "initial_state": model.initial_state, "model_config": legacy},
                    tmp_path / "old.pt")
    rebuilt = load_model(tmp_path / "old.pt")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


# ------------------------------------------------------------------------------------------------ provenance
def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(1, 32, 32, generator=g) + (i % 2), "label": i % 2, "id": f"case{i}"}
            for i in range(n)]


def _trained_bundle_model(tmp_path: Path) -> tuple[Path, Path, dict]:
    body = build_classifier("cbr_tiny", "full", spatial_dims=2, in_channels=1).backbone
    weights = tmp_path / "pretrained.pt"
    torch.save(body.state_dict(), weights)
    torch.manual_seed(0)
    model = build_classifier("cbr_tiny", "truncate", num_classes=1, cut="cbr2", weights=str(weights),
                             spatial_dims=2, in_channels=1)
    ckpt = tmp_path / "models" / "model.pt"
    summary = bundle_train(model, _rows(8, 0), _rows(4, 1), task="binary", output_dir=str(tmp_path / "train"),
                           ckpt_path=str(ckpt), inference={"preset": "cxr"}, epochs=1, **QUIET)
    return ckpt, weights, summary


def test_bundle_model_records_its_provenance_and_medtl3d_info_prints_it(tmp_path, capsys):
    ckpt, weights, summary = _trained_bundle_model(tmp_path)
    state = engine.load_checkpoint(ckpt)
    record = state["provenance"]
    assert {k: record["weights"][k] for k in ("source", "path", "sha256", "entry")} == {
        "source": "pretrained.pt", "path": str(weights.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "entry": None}
    assert record["weights"]["tensors_loaded"] == len(torch.load(weights, weights_only=True))
    import monai

    import medtl3d

    assert record["versions"]["medtl3d"] == medtl3d.__version__ and record["versions"]["torch"] == torch.__version__
    assert record["versions"]["monai"] == monai.__version__
    assert record["config"]["model_config"] == state["model_config"] and record["config"]["lr"] == 1e-3
    assert record["data"]["train"]["items"] == 8 and record["data"]["train"]["sha256"] == data_hash(_rows(8, 0))["sha256"]
    assert record["data"]["train"]["sha256"] != record["data"]["val"]["sha256"]
    assert record["created"].endswith("+00:00")
    checkout = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if (REPO / ".git").exists() and Path(medtl3d.__file__).resolve().parents[1] == REPO:
        assert record["git_commit"] == checkout.stdout.strip()
    # one run: model.pt (the commit point), model.json and train_summary.json carry the same run id
    run_id = record["run_id"]
    assert json.loads(ckpt.with_suffix(".json").read_text())["run_id"] == run_id == summary["run_id"]
    assert json.loads((tmp_path / "train" / "train_summary.json").read_text())["run_id"] == run_id
    assert json.loads((tmp_path / "train" / "result.json").read_text())["run_id"] == run_id
    assert state["inference"] == {"task": "binary", "preset": "cxr", "preset_options": {"normalize": None}}
    for checkpoint in ("best.pt", "last.pt"):
        assert engine.load_checkpoint(tmp_path / "train" / checkpoint)["provenance"]["run_id"] == run_id

    assert medtl3d_main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "builder: classifier" in text and "backbone: cbr_tiny" in text and run_id in text
    assert medtl3d_main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"]["params"] == sum(p.numel() for p in state["model"].values())
    assert info["architecture"]["cut"] == "cbr2" and info["provenance"]["weights"]["sha256"] == record["weights"]["sha256"]


def test_data_hash_follows_content_not_paths(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        (data / "images" / f"{i}.png").write_bytes(bytes([i]) * 100)
    (data / "series").mkdir()
    (data / "series" / "slice0.dcm").write_bytes(b"dicom slice")

    def items(root: Path) -> list[dict]:
        return [*({"image": str(root / "images" / f"{i}.png"), "label": i % 2} for i in range(3)),
                {"image": str(root / "series"), "label": 1}]

    before = data_hash(items(data))
    assert before["files"] == 4 and before["hashed"] == "the items, each listed file by its bytes"
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    assert data_hash(items(moved))["sha256"] == before["sha256"]
    image = data / "images" / "1.png"
    image.write_bytes(image.read_bytes()[:-1] + b"\xff")  # one byte, same path
    assert data_hash(items(data))["sha256"] != before["sha256"]
    (moved / "series" / "slice0.dcm").write_bytes(b"dicom slicE")  # a file inside a DICOM folder
    assert data_hash(items(moved))["sha256"] != before["sha256"]
    by_size = data_hash(items(data), byte_limit=10)
    assert by_size["hashed"].startswith("the items, each listed file by name and size only")
    assert data_hash([{"label": 1}, {"label": 0}])["sha256"] != data_hash([{"label": 0}, {"label": 1}])["sha256"]


# ------------------------------------------------------------------------------------------------ one writer
@contextmanager
def _held(folder: Path):
    """``folder``'s lock held by another thread for the block, as a run in progress would hold it."""
    acquired, done = threading.Event(), threading.Event()

    def hold() -> None:
        with output_lock(folder):
            acquired.set()
            done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    assert acquired.wait(30)
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_second_training_into_a_held_folder_refuses_and_leaves_the_first_intact(tmp_path):
    ckpt, _, _ = _trained_bundle_model(tmp_path)
    written = {p: p.read_bytes() for p in [*ckpt.parent.iterdir(), *(tmp_path / "train").iterdir()] if p.is_file()}
    holder = rf"\(pid {os.getpid()} on {socket.gethostname()}, started "
    model = build_classifier("cbr_tiny", "full", spatial_dims=2, in_channels=1)
    with _held(ckpt.parent):
        with pytest.raises(ConfigIdError, match=rf"config id 'ckpt_path': output folder {ckpt.parent} is being "
                                                rf"written by another run {holder}"):
            bundle_train(model, _rows(8, 2), _rows(4, 3), task="binary", output_dir=str(tmp_path / "train"),
                         ckpt_path=str(ckpt), epochs=1, **QUIET)
        started = time.perf_counter()
        with pytest.raises(OutputLockedError, match=rf"output folder {ckpt.parent} is being written by another run"):
            engine.train(model, _rows(8, 2), _rows(4, 3), task="binary", output_dir=ckpt.parent, epochs=1, **QUIET)
        assert time.perf_counter() - started < 5  # refused at once, not after waiting
    assert {p: p.read_bytes() for p in written} == written
    # a run killed while holding the lock releases it with its process (here a bare filelock holder: no holder file)
    code = ("import sys, time, filelock\nlock = filelock.FileLock(sys.argv[1])\nlock.acquire()\n"
            "print('held', flush=True)\ntime.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code, str(ckpt.parent / LOCK_NAME)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match="another run \\(holder unknown\\)"):
            with output_lock(ckpt.parent):
                pass
    finally:
        process.kill()
        process.wait()
    with output_lock(ckpt.parent):
        pass


@pytest.mark.parametrize("command", ["search", "study"])
def test_second_search_or_study_on_one_output_refuses(tmp_path, capsys, command):
    from medtl3d.search import run_search
    from medtl3d.study import run_study

    run, error = {"search": (run_search, SearchError), "study": (run_study, StudyError)}[command]
    out = tmp_path / command
    with _held(out):
        with pytest.raises(error, match=rf"output folder {out} is being written by another run \(pid {os.getpid()}"):
            run(REPO / "bundles" / "cxr_classification", out)
        assert medtl3d_main([command, "--bundle", str(REPO / "bundles" / "cxr_classification"), "--output",
                             str(out)]) == 2
        assert "is being written by another run" in capsys.readouterr().err
    assert not (out / "trials.jsonl").exists()


def test_search_store_follows_data_content_not_paths(tmp_path, one_thread):
    from medtl3d.data.phantoms import generate_cxr
    from medtl3d.search import run_search

    datalist = generate_cxr(tmp_path / "data", 12, size=32)
    tiny = {"backbone": "cbr_tiny", "weights": "null", "epochs": 1, "image_size": 32, "batch_size": 4,
            "amp": False,
            "tensorboard": False, "device": "cpu"}
    fast = dict(cuts=["cbr1"], stage2=False, n_folds=1, evaluate_test=False, efficiency_runs=1,
                efficiency_warmup=0, cpus_per_trial=1)
    bundle, out = REPO / "bundles" / "cxr_classification", tmp_path / "search"
    first = run_search(bundle, out, overrides={**tiny, "datalist": str(datalist)}, **fast)
    assert first.trained == 2
    moved = shutil.copytree(tmp_path / "data", tmp_path / "moved")  # relative paths: the same data elsewhere
    again = run_search(bundle, out, overrides={**tiny, "datalist": str(moved / datalist.name)}, **fast)
    assert again.trained == 0 and again.reused == 2
    image = sorted((tmp_path / "data" / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))  # one byte, same path
    with pytest.raises(SearchError, match=r"different search configuration \(data: '[0-9a-f]{64}' in the store"):
        run_search(bundle, out, overrides={**tiny, "datalist": str(datalist)}, **fast)
