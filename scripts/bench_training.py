"""Training throughput of ``medtl3d.engine.train`` vs a minimal hand-written PyTorch loop, as a Markdown table.

Same model (ResNet-18, 2D at 1x64x64 and 3D at 1x16x64x64), same in-memory data, batch, AdamW (lr 1e-4, no
weight decay) and shuffling DataLoader; AMP (autocast + GradScaler) in both when on CUDA. Each side runs
``--epochs`` epochs of ``--steps`` iterations and is timed on its last epoch's training iterations only (the
engine's ``history[-1]["seconds"]``, which spans EPOCH_STARTED..EPOCH_COMPLETED), so first-epoch warm-up is
excluded from both. The engine's whole ``train()`` wall time (validation on one batch and two checkpoint writes
per epoch included) is shown too. Overhead = loop throughput / engine throughput - 1; the target is <= 10 %.
Note: ``train`` calls ``monai.utils.set_determinism``, which on CUDA also turns cuDNN autotuning off for the rest of
the process, so the loop (run in the same process) is timed under the same cuDNN settings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from medtl3d.engine import train
from medtl3d.strategies import create_model

CASES = [  # name, create_model arguments, image shape (C, *spatial), batch size
    ("resnet18 2D", {"backbone": "resnet18", "spatial_dims": 2}, (1, 64, 64), 16),
    ("resnet18 3D", {"backbone": "resnet18", "spatial_dims": 3}, (1, 16, 64, 64), 4),
    # almost no compute: what is left is the per-iteration cost of the engine itself
    ("cbr_tiny@cbr1 2D", {"backbone": "cbr_tiny", "spatial_dims": 2, "strategy": "truncate", "cut": "cbr1"},
     (1, 16, 16), 16),
]


def _data(n: int, shape: tuple[int, ...]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(shape, generator=g), "label": i % 2} for i in range(n)]


def _model(kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return create_model(**{"strategy": "random", **kwargs}, num_classes=1, in_channels=1)


def _loop_epoch_seconds(model, rows, batch, epochs, device) -> float:
    """The hand-written baseline; returns the last epoch's seconds."""
    model.to(device).train()
    loader = torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True, pin_memory=device.type == "cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    loss_fn = nn.BCEWithLogitsLoss()
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    seconds = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        total = 0.0
        for batch_rows in loader:
            x = batch_rows["image"].to(device, non_blocking=True)
            y = batch_rows["label"].to(device, non_blocking=True).float()[:, None]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total = total + loss.detach()
        float(total)  # one host sync per epoch, as the engine's epoch loss
        seconds = time.perf_counter() - start
    return seconds


def _engine_epoch_seconds(model, rows, val_rows, batch, epochs, device) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train(model, rows, val_rows, task="binary", output_dir=out, epochs=epochs, lr=1e-4,
                       batch_size=batch, amp=device.type == "cuda", device=device, resume=False,
                       tensorboard=False, progress=False)
        wall = time.perf_counter() - start
    return result.history[-1]["seconds"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="training iterations per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    parser.add_argument("--repeats", type=int, default=4, help="engine/loop pairs, order alternating; medians")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 6 steps, 2 repeats")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, repeats = (6, 2) if args.quick else (args.steps, args.repeats)
    device = torch.device(args.device)

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} steps/epoch={steps} "
          f"epochs={args.epochs} (last timed) repeats={repeats} amp={device.type == 'cuda'}\n")
    print("| case | batch | loop | engine | overhead | engine - loop per iteration | engine train() wall |")
    print("|---|---|---|---|---|---|---|")
    for name, kwargs, shape, batch in CASES:
        rows, val_rows = _data(steps * batch, shape), _data(batch, shape)
        loop_s, engine_s, walls = [], [], []
        for repeat in range(repeats):
            if repeat % 2:  # alternate which side runs first, so drift and order effects cancel in the medians
                loop_s.append(_loop_epoch_seconds(_model(kwargs), rows, batch, args.epochs, device))
            engine_seconds, wall = _engine_epoch_seconds(_model(kwargs), rows, val_rows, batch, args.epochs, device)
            engine_s.append(engine_seconds)
            walls.append(wall)
            if not repeat % 2:
                loop_s.append(_loop_epoch_seconds(_model(kwargs), rows, batch, args.epochs, device))
        items = steps * batch
        loop_t, engine_t = statistics.median(loop_s), statistics.median(engine_s)
        unit = "img" if kwargs["spatial_dims"] == 2 else "vol"
        print(f"| {name} {'x'.join(map(str, shape))} | {batch} | {items / loop_t:.1f} {unit}/s | "
              f"{items / engine_t:.1f} {unit}/s | {100 * (engine_t / loop_t - 1):+.1f} % | "
              f"{1000 * (engine_t - loop_t) / steps:+.1f} ms | {statistics.median(walls):.1f} s |")


if __name__ == "__main__":
    main()
