"""What the MONAI bundle configs call besides their components: the id checks, locations and data helpers, the
training step and folder inference's outcome. The other procedures are components of their own (``search``:
:class:`medtl3d.search.CutoffSearch`, ``study``: :class:`medtl3d.study.Study`, ``efficiency``:
:class:`medtl3d.efficiency.EfficiencyBenchmark`, ``analysis``: :class:`medtl3d.analysis.bundle.BundleAnalyses`,
``lr_find``: :class:`medtl3d.engine.lr_finder.LRFinder`).

The bundles under ``bundles/`` hold configuration only (``python -m monai.bundle run --config_file ...``); every
transfer-learning choice there is a config id (backbone, weights, strategy, cut, width factor, learning rates,
frozen part, input size, fold) feeding MONAI components (``SupervisedTrainer``, ``SupervisedEvaluator``, medtl3d's
handlers) or these functions. :func:`check_ids` runs first (the configs'
``initialize``) so that a wrong override stops with one line naming the config id, not a traceback from the config
parser; :class:`ConfigIdError` is a ``SystemExit`` for that reason (MONAI wraps ordinary exceptions raised inside
config expressions). Under ``python -m monai.bundle run`` it also checks the ``--id value`` overrides against the
config files (:func:`check_overrides`) and makes any other error medtl3d raises, however MONAI wrapped it, end the
process with its one line (:func:`report_bundle_errors`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose
from torch import nn

from . import engine
from ._config_security import explain_config_security
from .backbones import TIMM_PREFIX, build_backbone, get_entry, list_backbones
from .config_ids import (_ID_TYPES, _TYPE_NAMES, ConfigIdError, _bundle_run_overrides, _check_type,  # noqa: F401
                         check_overrides, report_bundle_errors)
from .data.datalists import load_datalist
from .data.io import LoadCased
from .data.prepare import PHANTOMS, prepare_datalist  # noqa: F401
from .data.splits import format_split, holdout_split, kfold_split, split_summary
from .engine import load_checkpoint
from .engine.results import settings_path
from .engine.runtime import on_terminal
from .errors import CasesFailedError, DataError, UnknownBackboneError, UnknownCutPointError, interface
from .inference import PredictionWriter, load_network  # noqa: F401  (load_network: the configs call it here)
from .models.builders import _weights_id, build_classifier, build_segmenter  # noqa: F401
from .strategies import CUT_STRATEGIES, STRATEGIES
from .weights import is_weights_name, weights_for, weights_or_none

TASKS = ("binary", "multiclass", "multilabel", "segmentation")
explain_config_security()  # MONAI's warning that bundle configs are code: our one line, once per process


# --------------------------------------------------------------------------------------------- locations
def bundle_root(name: str) -> str:
    """The directory of bundle ``name``: ``./bundles/<name>`` from the repository root, ``.`` inside the bundle,
    else next to the installed package (an editable install or the Docker image)."""
    for candidate in (Path.cwd() / "bundles" / name, Path.cwd(), Path.cwd().parent,
                      Path(__file__).resolve().parents[1] / "bundles" / name):
        if candidate.name == name and (candidate / "configs" / "metadata.json").is_file():
            return str(candidate)
    raise ConfigIdError("bundle_root", f"cannot find bundle {name!r} from {Path.cwd()}; pass --bundle_root DIR")


# --------------------------------------------------------------------------------------------- validation
def check_ids(**ids: Any) -> bool:
    """Validate the bundle's ids before anything is built; each problem names its id.

    Known ids: backbone, spatial_dims, in_channels, strategy, cut, freeze_up_to, weights, dataset_dir, datalist,
    task, key_metric, num_classes, n_folds, fold, lr, epochs, batch_size, num_slices, overlap, aggregation, cuts,
    ckpt_path.
    Inside a ``monai.bundle run`` call the overrides it was given are checked first (:func:`check_overrides`).
    """
    if interface() == "bundle":
        report_bundle_errors()
    given = _bundle_run_overrides()
    if given is not None:
        check_overrides(*given)
    for key, value in ids.items():
        if key in _ID_TYPES:
            _check_type(key, value, _ID_TYPES[key])
    backbone = ids.get("backbone")
    if backbone is not None:
        try:
            get_entry(backbone)  # registered names and any timm model as timm/<name>
        except UnknownBackboneError as err:
            detail = str(err) if backbone.startswith(TIMM_PREFIX) else \
                f"unknown backbone {backbone!r}; available: {', '.join(list_backbones())}, or timm/<timm model name>"
            raise ConfigIdError("backbone", detail) from None
        dims = ids.get("spatial_dims") or get_entry(backbone).spatial_dims[0]
        if dims not in get_entry(backbone).spatial_dims:
            raise ConfigIdError("spatial_dims", f"{backbone} supports {get_entry(backbone).spatial_dims}D, not {dims}D")
    strategy = ids.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigIdError("strategy", f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    cut = ids.get("cut")
    if strategy in CUT_STRATEGIES and cut is None:
        raise ConfigIdError("cut", f"strategy {strategy!r} needs a cut point (see `medtl3d backbones {backbone}`)")
    if strategy is not None and strategy not in CUT_STRATEGIES and strategy != "stats" and cut is not None:
        raise ConfigIdError("cut", f"strategy {strategy!r} takes no cut point (got {cut!r}); set cut to null")
    named = [(key, ids[key]) for key in ("cut", "freeze_up_to") if ids.get(key) is not None]
    cuts = ids.get("cuts")
    if isinstance(cuts, (list, tuple)):
        named += [("cuts", c) for c in cuts]
    elif isinstance(cuts, str) and cuts not in ("all", "block", "layer"):
        named += [("cuts", c.strip()) for c in cuts.split(",")]
    if backbone is not None and named:
        with torch.device("meta"):
            body = build_backbone(backbone, ids.get("spatial_dims"))
        for key, name in named:
            try:
                body.cut_point(name)
            except UnknownCutPointError as err:
                raise ConfigIdError(key, str(err)) from None
    weights = weights_or_none(ids.get("weights"))
    if weights is not None and not Path(str(weights)).exists():
        entry = weights_for(backbone, str(weights)) if backbone else None
        if entry is None and not (backbone is None and is_weights_name(weights)):
            raise ConfigIdError("weights", f"{weights!r} is neither a file nor a catalogue name"
                                + (f" for {backbone}" if backbone else "") + " (`medtl3d weights list` shows them; "
                                "null: random initialisation)")
        if entry is not None and entry.architecture != backbone:
            raise ConfigIdError("weights", f"{entry.name} are weights for {entry.architecture}, not {backbone}: "
                                f"name {backbone}'s (`medtl3d weights list --architecture {backbone}`), a file, "
                                "or null for random initialisation")
    for key in ("ckpt_path", "datalist"):
        value = ids.get(key)
        if value not in (None, "") and not Path(str(value)).exists():
            raise ConfigIdError(key, f"file {value} does not exist")
    dataset_dir = ids.get("dataset_dir")
    if dataset_dir is not None and not Path(str(dataset_dir)).is_dir():
        raise ConfigIdError("dataset_dir", f"directory {dataset_dir} does not exist (null generates phantoms)")
    task = ids.get("task")
    if task is not None and task not in TASKS:
        raise ConfigIdError("task", f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    key_metric = ids.get("key_metric")
    if key_metric is not None and task is not None and key_metric not in engine.task_metrics(task):
        raise ConfigIdError("key_metric", f"{key_metric!r} is not a metric of task {task!r}; choose one of "
                                          f"{', '.join(engine.task_metrics(task))}")
    n_folds, fold = ids.get("n_folds"), ids.get("fold")
    if n_folds is not None and n_folds < 2 and n_folds != 1:
        raise ConfigIdError("n_folds", f"needs n_folds >= 2 (or 1: no cross-validation), got {n_folds}")
    if fold is not None and n_folds is not None and not 0 <= fold < max(n_folds, 1):
        raise ConfigIdError("fold", f"fold {fold} is outside 0..{n_folds - 1}")
    for key in ("lr", "epochs", "batch_size", "num_slices"):
        value = ids.get(key)
        if value is not None and not value > 0:
            raise ConfigIdError(key, f"must be positive, got {value!r}")
    overlap, num_slices = ids.get("overlap"), ids.get("num_slices")
    if overlap is not None and num_slices is not None and not 0 <= overlap < num_slices:
        raise ConfigIdError("overlap", f"must be in [0, num_slices={num_slices}), got {overlap}")
    aggregation = ids.get("aggregation")
    if aggregation is not None and aggregation not in ("max", "mean"):
        raise ConfigIdError("aggregation", f"must be 'max' or 'mean', got {aggregation!r}")
    return True


# --------------------------------------------------------------------------------------------- data
def split_items(items: Sequence[dict], *, n_folds: int = 5, fold: int = 0, seed: int = 0,
                test_fraction: float = 0.2, test_items: Sequence[dict] | None = None) -> dict[str, list[dict]]:
    """Train / val / test by patient: ``test_items`` (the datalist's own test list) or a stratified patient
    hold-out of ``test_fraction``; then fold ``fold`` of a patient-grouped, label-stratified ``n_folds`` split
    (``n_folds=1``: a patient hold-out of the same fraction validates). The test split never selects a model.
    Prints each part (cases, classes, groups, the largest group) and warns where one group dominates a part
    (:func:`medtl3d.data.splits.split_summary`); ``train`` and ``evaluate`` record the parts they use."""
    rest, test = list(items), list(test_items or [])
    if not test and test_fraction > 0:
        try:
            rest, test = holdout_split(rest, test_fraction, seed=seed)
        except DataError as err:
            raise ConfigIdError("test_fraction", str(err)) from None
    try:
        if int(n_folds) == 1:
            train, val = holdout_split(rest, test_fraction if test_fraction > 0 else 0.2, seed=seed)
        else:
            train, val = kfold_split(rest, int(n_folds), int(fold), seed=seed)
    except DataError as err:
        raise ConfigIdError("n_folds", str(err)) from None
    split = {"train": train, "val": val, "test": test or val}
    rows, problems = split_summary(split)
    for line in format_split(rows):
        print(f"medtl3d: {line}")
    for problem in problems:
        warnings.warn(f"{problem}: its metrics are mostly that group's (see split_summary)", UserWarning,
                      stacklevel=2)
    return split


def load_items(datalist: str, *, task: str, num_classes: int, key: str = "training",
               path_keys: Sequence[str] = (), label_key: str = "label", study_key: str | None = "study") -> list[dict]:
    """Datalist entries for ``task`` (see :func:`medtl3d.data.datalists.load_datalist`; ``label_key`` is the
    field holding the label, e.g. ``mask``; ``study_key`` the one naming a series' study, the group a split keeps
    whole where no patient is given); a missing ``key`` section gives an empty list (a datalist without a
    separate test split). Invalid rows (labels and mask values included) stop the run with every problem listed,
    under config id ``datalist``; so does training data in which a class never occurs (it would train a model whose
    validation metric is undefined)."""
    if key != "training" and Path(datalist).suffix.lower() == ".json":
        document = json.loads(Path(datalist).read_text())
        if not isinstance(document, dict) or key not in document:
            return []
    elif key != "training":
        return []
    kind = "segmentation" if task == "segmentation" else ("multilabel" if task == "multilabel" else "classification")
    try:
        return load_datalist(datalist, key=key, task=kind, num_classes=num_classes, path_keys=tuple(path_keys),
                             label_key=label_key, every_class=key == "training", study_key=study_key)
    except DataError as err:
        raise ConfigIdError("datalist", str(err)) from None


class _Labels:
    """Turn a datalist label into what the engine's loss wants: float vector (multilabel), int otherwise."""
    def __init__(self, task: str) -> None:
        self.task = task

    def __call__(self, data: dict) -> dict:
        if self.task == "multilabel":
            data["label"] = torch.as_tensor(data["label"], dtype=torch.float32)
        return data


def image_dataset(items: Sequence[dict], transform, *, task: str, cache: bool = True):
    """A MONAI (Cache)Dataset that loads ``image`` (and, for segmentation, the ``label`` mask) with medtl3d's
    readers, then applies ``transform`` (a preset built with ``label_key="label"`` for segmentation). Each item
    keeps an ``id`` (default: its image path) so evaluation writes one identified row per case. MONAI's "Loading
    dataset" bar shows only on a terminal (a log file would fill with it)."""
    keys = ["image"] + (["label"] if task == "segmentation" else [])
    chain = Compose([LoadCased(keys), _Labels(task), *transform.transforms])
    items = [{"id": str(item["image"][0] if isinstance(item["image"], list) else item["image"]), **item}
             for item in items]
    if cache:
        return CacheDataset(items, chain, cache_rate=1.0, num_workers=1, progress=on_terminal(), copy_cache=True)
    return Dataset(items, chain)


# --------------------------------------------------------------------------------------------- models
# --------------------------------------------------------------------------------------------- runs
def inference_settings(ckpt_path: str) -> dict:
    """The preprocessing a checkpoint was trained with (written by :func:`train`), so inference matches it: from
    inside ``model.pt`` itself (so weights and settings always come from the same run), else from the JSON beside
    it (a TorchScript export, or a checkpoint written before settings were embedded)."""
    if Path(ckpt_path).suffix == ".pt" and Path(ckpt_path).is_file():
        embedded = load_checkpoint(ckpt_path).get("inference")
        if embedded is not None:
            return dict(embedded)
    path = settings_path(ckpt_path)
    if not path.is_file():
        raise ConfigIdError("ckpt_path", f"{path} is missing: it records how {ckpt_path} was trained; "
                                         "train the bundle first (or restore the file)")
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "run_id"}


def train(model: nn.Module, train_data, val_data, *, task: str, output_dir: str, ckpt_path: str,
          inference: Mapping | None = None, **engine_options: Any) -> dict:
    """Fine-tune with :func:`medtl3d.engine.train` (the run a bundle's ``train.yaml`` builds); the best
    checkpoint becomes the bundle's ``models/model.pt``, ``inference`` (preset, its options, task, windows) is
    saved beside it for the inference config, and ``<output_dir>/train_summary.json`` records the run
    (:class:`medtl3d.engine.handlers.ExportModel`). One run at a time writes a bundle's model and training
    folders (a second is refused at once, naming the config id)."""
    engine.train(model, train_data, val_data, task=task, output_dir=output_dir, ckpt_path=ckpt_path,
                 inference=inference, model_config=getattr(model, "model_config", None),
                 lock={"ckpt_path": str(Path(ckpt_path).parent), "output_dir": output_dir}, **engine_options)
    summary = Path(output_dir) / "train_summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def check_input_dir(input_dir) -> bool:
    """``input_dir`` of ``inference.yaml`` must be a folder (refused in one line naming the config id)."""
    if input_dir is None or not Path(str(input_dir)).is_dir():
        raise ConfigIdError("input_dir", f"directory {input_dir} does not exist")
    return True


def inference_outcome(handlers: Sequence[Any]) -> dict | None:
    """After ``inference.yaml``'s evaluator ran: print what its :class:`~medtl3d.inference.PredictionWriter` (if
    still among ``handlers``) published; a run where some cases failed wrote every row, then raises
    :class:`~medtl3d.errors.CasesFailedError` (a bundle run ends with status 1 and that one line)."""
    summary = next((h.summary for h in handlers if isinstance(h, PredictionWriter)), None)
    if summary is None:
        return None
    print(f"medtl3d: {summary.n_ok}/{summary.n_cases} cases predicted -> {summary.csv_path}")
    if summary.n_failed:
        raise CasesFailedError(f"{summary.n_failed} case(s) failed or were skipped; reasons in {summary.csv_path}")
    return {"n_cases": summary.n_cases, "n_ok": summary.n_ok, "csv": str(summary.csv_path)}
