"""Data-parallel training under torchrun on the CPU (gloo): two ranks with batch 4 each end with the weights of one
process with batch 8, each rank validates its share and the gathered metrics equal one process's, resume loads on
every rank, every rank sees the same metrics, only rank 0 writes; and a bundle
runs through ``multi_gpu_train.yaml``."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medtl3d.engine import load_checkpoint, train
from medtl3d.locking import LOCK_NAME

pytestmark = pytest.mark.slow  # torchrun subprocesses

ROOT = Path(__file__).resolve().parents[1]

# Run by torchrun (two ranks) and imported by the test for its data and model.
SCRIPT = '''
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import medtl3d.engine.handlers.checkpoint as checkpoint_handler
from medtl3d.engine import train

# a constant rate: the run below is extended from 2 to 3 epochs on resume, which would change a cosine's horizon
OPTIONS = {"task": "binary", "lr": 0.05, "optimizer": "adamw", "weight_decay": 0.01, "seed": 7, "scheduler": "constant",
           "progress": False, "tensorboard": False}


def rows(n, seed):
    """8x8 noise images; positives carry a centred blob of amplitude 1.0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = torch.randn((1, 8, 8), generator=g)
        image[:, 2:6, 2:6] += float(i % 2)
        out.append({"image": image, "label": i % 2, "id": f"case{i}"})
    return out


class Net(nn.Module):
    """Two linear layers: no BatchNorm, no dropout, so DDP's averaged gradients are those of the global batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


class Counted(torch.utils.data.Dataset):
    """Rows that count how often they are read."""

    def __init__(self, rows):
        self.rows, self.reads = rows, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.reads += 1
        return self.rows[i]


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    saves = []
    write = checkpoint_handler.save_checkpoint
    checkpoint_handler.save_checkpoint = lambda state, path: (saves.append(Path(path).name), write(state, path))[1]
    report = {"world": dist.get_world_size(), "val_reads": []}
    # a different init per rank (DDP starts every rank from rank 0's); the second call resumes from last.pt
    for call, (epochs, init_seed) in enumerate(((2, rank), (3, 100 + rank))):
        torch.manual_seed(init_seed)
        model = Net()
        saves.clear()
        val = Counted(rows(15, 1))  # an odd size: shards of 8 and 7 cases, no padding duplicate
        result = train(model, rows(32, 0), val, output_dir=out / "ddp", epochs=epochs, batch_size=4, **OPTIONS)
        report["val_reads"].append(val.reads)
        report[f"call{call}"] = {
            "saves": list(saves), "best_metric": result.best_metric, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "best_checkpoint": str(result.best_checkpoint),
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]}
    torch.save(model.state_dict(), out / f"weights{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


def torchrun(*args, cwd=ROOT, timeout=240):
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on the CPU; returns the completed process."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_ranks_of_batch_4_train_like_one_process_of_batch_8_and_only_rank_0_writes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    check(torchrun(script, tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # each rank read one row up front and its own share at each validation (2 epochs, then 1 more after resume)
    assert [r["val_reads"] for r in ranks] == [[1 + 2 * 8, 1 + 8], [1 + 2 * 7, 1 + 7]]

    # every rank took the same decisions on the same numbers (history, best metric and epoch, checkpoint path)
    assert ranks[0]["call0"] == {**ranks[1]["call0"], "saves": ranks[0]["call0"]["saves"]}
    assert ranks[0]["call1"] == {**ranks[1]["call1"], "saves": ranks[0]["call1"]["saves"]}
    # only rank 0 wrote: last.pt every epoch, best.pt on each improvement
    first, resumed = ranks[0]["call0"], ranks[0]["call1"]
    assert ranks[1]["call0"]["saves"] == ranks[1]["call1"]["saves"] == []
    assert first["saves"].count("last.pt") == 2 and resumed["saves"].count("last.pt") == 1
    assert len(first["history"]) == 2 and len(resumed["history"]) == 3 and resumed["epochs_run"] == 3
    assert resumed["history"][:2] == first["history"]
    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "best.pt", "history.csv", "last.pt", "result.json"]
    assert len((out / "history.csv").read_text().splitlines()) == 4

    # the ranks end identical, and rank 0's checkpoint holds the unwrapped module (no "module." prefix)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ddp = load_checkpoint(out / "last.pt")
    assert set(ddp["model"]) == set(w0) and all(torch.equal(ddp["model"][k], w0[k]) for k in w0)
    assert ddp["run_config"]["world_size"] == 2 and ddp["engine"]["iteration"] == 3 * 4

    # one process, global batch 8, the same seed: same data per step, same mean-loss gradients -> same weights
    helpers = runpy.run_path(str(script))
    references = {}
    for batch in (8, 4):
        torch.manual_seed(0)
        model = helpers["Net"]()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        single = train(model, helpers["rows"](32, 0), helpers["rows"](15, 1), output_dir=tmp_path / f"single{batch}",
                       epochs=3, batch_size=batch, **helpers["OPTIONS"])
        references[batch] = (load_checkpoint(tmp_path / f"single{batch}" / "last.pt")["model"], single)
    weights, single = references[8]
    moved = max(float((weights[k] - initial[k]).abs().max()) for k in weights)
    assert moved > 0.05  # the runs learnt something: the equality below is not the initial state's
    assert all(torch.allclose(ddp["model"][k], weights[k], rtol=0, atol=1e-5) for k in weights)
    assert ddp["run_config"]["train_size"] == 32
    for h_ddp, h_single in zip(resumed["history"], single.history):
        assert h_ddp["train_loss"] == pytest.approx(h_single["train_loss"], abs=1e-6)
        assert {k: v for k, v in h_ddp.items() if k.startswith("val_")} == pytest.approx(
            {k: v for k, v in h_single.items() if k.startswith("val_")}, abs=1e-6)
    assert resumed["best_epoch"] == single.best_epoch
    # while one process with batch 4 (per-rank batch, twice the steps) ends elsewhere
    per_rank = references[4][0]
    assert max(float((per_rank[k] - weights[k]).abs().max()) for k in weights) > 1e-3


def test_bundle_trains_through_torchrun_with_multi_gpu_train_yaml(tmp_path):
    from medtl3d.workflows import prepare_datalist

    bundle = "bundles/cxr_classification/configs"
    out = tmp_path / "run"
    # the same phantoms the config would generate, made beforehand so the two ranks only read them
    prepare_datalist(None, None, phantom="cxr", phantom_dir=str(out / "phantoms"), n_cases=16, seed=0, size=64)
    proc = torchrun("-m", "monai.bundle", "run", "--config_file",
                    f"['{bundle}/train.yaml','{bundle}/multi_gpu_train.yaml']",
                    "--backbone", "mobilenet_v2", "--weights", "null", "--phantom_cases", "16", "--phantom_size", "64",
                    "--image_size", "64",
                    "--n_folds", "2", "--epochs", "1", "--batch_size", "4", "--amp", "False", "--output_dir", out,
                    "--ckpt_path", out / "models" / "model.pt")
    check(proc)
    model = load_checkpoint(out / "models" / "model.pt")
    assert model["run_config"]["world_size"] == 2 and model["best_epoch"] == 1
    assert not any(k.startswith("module.") for k in model["model"])
    assert len(model["history"]) == 1
    events = list((out / "train").glob("tensorboard/events.*"))
    assert len(events) <= 1  # TensorBoard (when installed) from rank 0 only
    assert (proc.stdout + proc.stderr).count("epoch 1/1:") == 1  # the epoch line from rank 0 only
