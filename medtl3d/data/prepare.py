"""The datalist a bundle or ``medtl3d analyze`` runs on: the given one, the one in ``dataset_dir``, or phantoms
generated once (and reused while their settings are unchanged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config_ids import ConfigIdError
from ..reporting import write_text
from . import phantoms

PHANTOMS = ("ctpa", "cxr", "histology")


def prepare_datalist(dataset_dir: str | None, datalist: str | None, *, phantom: str, phantom_dir: str,
                     n_cases: int = 32, seed: int = 0, **phantom_options: Any) -> str:
    """The datalist to use: ``datalist`` if given, else ``<dataset_dir>/datalist.json`` (or ``.csv``); with neither,
    phantoms of kind ``phantom`` generated once into ``phantom_dir`` (reused when already there)."""
    if datalist:
        return str(datalist)
    if dataset_dir is not None:
        for name in ("datalist.json", "datalist.csv"):
            if (Path(dataset_dir) / name).is_file():
                return str(Path(dataset_dir) / name)
        raise ConfigIdError("datalist", f"dataset_dir {dataset_dir} has no datalist.json or datalist.csv; "
                                        "set --datalist to your datalist file")
    if phantom not in PHANTOMS:
        raise ConfigIdError("phantom", f"unknown phantom {phantom!r}; choose one of {', '.join(PHANTOMS)}")
    target = Path(phantom_dir)
    existing = target / "datalist.json"
    stamp = target / "phantom_settings.json"
    settings = {"phantom": phantom, "n_cases": int(n_cases), "seed": int(seed),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in phantom_options.items()}}
    distributed = torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # under torchrun rank 0 writes, the others wait
        if not (existing.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings):
            generate = {"ctpa": phantoms.generate_ctpa, "cxr": phantoms.generate_cxr,
                        "histology": phantoms.generate_histology}[phantom]
            generate(target, int(n_cases), seed=int(seed), **phantom_options)
            write_text(stamp, json.dumps(settings, sort_keys=True))
    if distributed:
        torch.distributed.barrier()
    return str(existing)
