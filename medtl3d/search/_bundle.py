"""The bundle a search trains: its configs parsed once, so that the search builds exactly what a trial will.

A search holds the user's overrides fixed and varies only ``strategy``, ``cut``, ``fold`` and ``seed``. The data
are resolved once (phantoms generated once into the search folder, or the user's datalist) and every trial gets
that datalist, so all trials see the same cases and the same patient-grouped folds (``data_seed``).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.bundle import ConfigParser

from ..backbones import build_backbone, get_entry
from ..config_ids import ConfigIdError, check_overrides
from ..errors import Medtl3dError, SearchError, interface
from ..provenance import data_hash
from ._plan import Candidate

TRIAL_IDS = ("strategy", "cut", "fold", "seed", "output_dir", "ckpt_path", "bundle_root")


class BundleTask:
    """A MONAI bundle (``configs/train.yaml`` + ``evaluate.yaml`` + ``efficiency.yaml``) under fixed overrides."""

    def __init__(self, bundle_dir: str | Path, overrides: dict[str, Any] | None, work_dir: str | Path) -> None:
        self.dir = Path(bundle_dir).resolve()
        self.configs = self.dir / "configs"
        for name in ("train.yaml", "evaluate.yaml", "metadata.json"):
            if not (self.configs / name).is_file():
                raise SearchError(f"bundle {self.dir} has no configs/{name}: not a medtl3d bundle")
        self.overrides = dict(overrides or {})
        fixed = sorted(set(self.overrides) & set(TRIAL_IDS) - {"bundle_root"})
        if fixed:
            raise SearchError(f"override(s) {', '.join(fixed)} are set by the search for each trial; remove them")
        self.work_dir = Path(work_dir)
        try:  # unknown ids, wrong types and check_ids' checks stop here, before any training
            check_overrides(str(self.configs / "train.yaml"), self.overrides)
            self.parser = self._parser(["train.yaml"], output_dir=str(self.work_dir))
            self.parser.get_parsed_content("initialize")
        except ConfigIdError as err:
            where = f"--set {err.config_id}" if interface() == "cli" else f"bundle id {err.config_id!r}"
            raise SearchError(f"{where}: {err.problem}") from None
        self.task = self.parser["task"]
        self.backbone_name = self.parser["backbone"]
        self.spatial_dims = self.parser.get("spatial_dims")
        self.n_folds = int(self.parser["n_folds"])
        self.has_strategy = "strategy" in self.parser.config

    @cached_property
    def datalist(self) -> str:
        """The datalist every trial uses; phantoms are generated here, on first use (after the cheap checks)."""
        return self.parser.get_parsed_content("datalist_file")

    @property
    def name(self) -> str:
        return self.dir.name

    def _parser(self, files: Sequence[str], **ids: Any):
        parser = ConfigParser()
        parser.read_config([str(self.configs / f) for f in files])
        parser.update({**self.overrides, "bundle_root": str(self.dir), **ids})
        return parser

    def fixed_ids(self) -> dict[str, Any]:
        """The ids every trial shares: the user's overrides and the resolved datalist."""
        return {**self.overrides, "bundle_root": str(self.dir), "datalist": str(self.datalist)}

    def trial_ids(self, candidate: Candidate, fold: int, seed: int, output_dir: str | Path) -> dict[str, Any]:
        ids = {**self.fixed_ids(), "cut": candidate.cut, "fold": int(fold), "seed": int(seed),
               "output_dir": str(output_dir), "ckpt_path": str(Path(output_dir) / "model.pt")}
        if self.has_strategy:
            ids["strategy"] = candidate.strategy
        return ids

    # ---------------------------------------------------------------------------------------- structure
    def backbone(self):
        """The backbone's structure (meta tensors: no memory, no weights) for planning cut points."""
        with torch.device("meta"):
            return build_backbone(self.backbone_name, self.spatial_dims)

    def check_strategy(self, strategy: str, cut: str | None) -> None:
        """Build the candidate's model (random weights: structure is what matters); a strategy that does not fit
        the backbone or the bundle is refused before anything trains."""
        if not self.has_strategy and strategy not in ("truncate", "full"):
            raise SearchError(f"strategy {strategy!r} does not apply to bundle {self.name}: its model has no "
                              "strategy id (its encoder is truncated at a cut point: use truncate)")
        ids = {"cut": cut, "weights": None, **({"strategy": strategy} if self.has_strategy else {})}
        parser = self._parser(["train.yaml"], output_dir=str(self.work_dir), **ids)
        try:
            parser.get_parsed_content("network_def", instantiate=True)
        except (Medtl3dError, ConfigIdError) as err:
            raise SearchError(f"strategy {strategy!r} at {cut!r} does not apply to {self.backbone_name}: "
                              f"{getattr(err, 'problem', err)}") from None
        except RuntimeError as err:  # MONAI wraps errors raised while instantiating a component
            cause = err.__cause__ or err
            raise SearchError(f"strategy {strategy!r} at {cut!r} does not apply to {self.backbone_name}: "
                              f"{cause}") from None

    # ---------------------------------------------------------------------------------------- data
    def split(self, fold: int) -> dict[str, list[dict]]:
        """The bundle's own train / val / test split for ``fold`` (k larger than the data allow stops here)."""
        parser = self._parser(["train.yaml"], output_dir=str(self.work_dir), datalist=str(self.datalist),
                              fold=int(fold))
        try:
            return parser.get_parsed_content("split")
        except ConfigIdError as err:
            raise SearchError(f"{err.config_id}={parser[err.config_id] if err.config_id in parser.config else ''}: "
                              f"{err.problem}") from None

    def data_hash(self) -> str:
        """Content hash (:func:`medtl3d.provenance.data_hash`) of every case the trials may use: the datalist's
        training and test items, files by their bytes, so a changed datalist at the same path differs and the same
        data moved elsewhere does not."""
        parser = self._parser(["train.yaml"], output_dir=str(self.work_dir), datalist=str(self.datalist))
        return data_hash([*parser.get_parsed_content("items"), *parser.get_parsed_content("test_items")])["sha256"]

    def probe_inputs(self, items: list[dict]):
        """(pretrained model, dataset of ``items`` with the bundle's validation preprocessing)."""
        if self.task == "segmentation":
            raise SearchError(f"probe ranking needs class labels; bundle {self.name} is a segmentation task")
        ids = {"datalist": str(self.datalist), "cut": None, **({"strategy": "full"} if self.has_strategy else {})}
        parser = self._parser(["train.yaml"], output_dir=str(self.work_dir), **ids)
        parser["split"] = {"train": [], "val": items, "test": []}
        return parser.get_parsed_content("network_def"), parser.get_parsed_content("val_dataset")

    # ---------------------------------------------------------------------------------------- costs
    def check_cost_input(self) -> None:
        """Refuse, before any trial, what the cost step after training would: a bundle without efficiency.yaml, or
        a model input (its ``input_shape``) below the backbone's registered minimum, the efficiency report's own
        check (:meth:`medtl3d.backbones.BackboneEntry.too_small`); the full model, measured beside every cut,
        needs the most. The error names the bundle ids the input is built from."""
        if not (self.configs / "efficiency.yaml").is_file():
            raise SearchError(f"bundle {self.name} has no configs/efficiency.yaml to measure costs with")
        parser = self._parser(["train.yaml", "efficiency.yaml"], output_dir=str(self.work_dir))
        shape = [int(v) for v in parser.get_parsed_content("input_shape")]
        minimum = get_entry(self.backbone_name).too_small(shape[1:])
        if minimum is None:
            return
        refs = re.findall(r"@(\w+)", str(parser.config["input_shape"]))  # e.g. [@in_channels, @num_slices, ...]
        names = list(dict.fromkeys(refs[1:])) if len(refs) == len(shape) else ["input_shape"]
        values = [f"{name}={parser[name]}" for name in names]
        given = " ".join(f"--set {v}" for v in values) if interface() == "cli" else "bundle ids " + ", ".join(values)
        raise SearchError(f"{given}: input {'x'.join(map(str, shape))} is too small for {self.backbone_name}, "
                          f"which needs at least {'x'.join(map(str, minimum))} (spatial) for its cost report; "
                          "nothing was trained")

    def costs(self, strategy: str, cuts: Sequence[str], runs: int, warmup: int):
        """The bundle's efficiency report (efficiency.yaml) of ``strategy`` at ``cuts``: params, MACs, latency."""
        self.check_cost_input()
        ids = {"efficiency_strategy": strategy if strategy != "full" else "truncate",
               "efficiency_cuts": list(cuts) or "block", "efficiency_runs": int(runs),
               "efficiency_warmup": int(warmup), "datalist": str(self.datalist),
               "output_dir": str(self.work_dir / "costs" / strategy)}
        parser = self._parser(["train.yaml", "efficiency.yaml"], **ids)
        (report,) = parser.get_parsed_content("run")
        return report
