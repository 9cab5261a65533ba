"""What the MONAI bundle configs call: every step of train / evaluate / inference / efficiency as one function.

The bundles under ``bundles/`` hold configuration only (``python -m monai.bundle run --config_file ...``); every
transfer-learning choice there is a config id (backbone, weights, strategy, cut, width factor, learning rates,
frozen part, input size, fold) passed to these functions. :func:`check_ids` runs first (the configs'
``initialize``) so that a wrong override stops with one line naming the config id, not a traceback from the config
parser; :class:`ConfigIdError` is a ``SystemExit`` for that reason (MONAI wraps ordinary exceptions raised inside
config expressions). Under ``python -m monai.bundle run`` it also checks the ``--id value`` overrides against the
config files (:func:`check_overrides`) and makes any other error medtl3d raises, however MONAI wrapped it, end the
process with its one line (:func:`report_bundle_errors`).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import sys
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._config_security import explain_config_security
from .errors import Medtl3dError, interface
from .reporting import atomic_write, write_text

TASKS = ("binary", "multiclass", "multilabel", "segmentation")
BUNDLE_CHECKPOINT_KEYS = ("format", "model", "initial_state", "model_config", "key_metric", "best_metric", "best_epoch",
                          "history", "run_config", "provenance")
PHANTOMS = ("ctpa", "cxr", "histology")
explain_config_security()  # MONAI's warning that bundle configs are code: our one line, once per process


class ConfigIdError(SystemExit):
    """A bundle config id with an unusable value: the run exits (status 1) printing one line that names the id."""

    def __init__(self, config_id: str, problem: str) -> None:
        self.config_id, self.problem = config_id, problem
        super().__init__(f"medtl3d bundle: config id '{config_id}': {problem}")


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
    task, num_classes, n_folds, fold, lr, epochs, batch_size, num_slices, overlap, aggregation, cuts, ckpt_path.
    Inside a ``monai.bundle run`` call the overrides it was given are checked first (:func:`check_overrides`).
    """
    from .backbones import build_backbone, get_entry, list_backbones
    from .errors import UnknownCutPointError
    from .strategies import CUT_STRATEGIES, STRATEGIES

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
        if backbone not in list_backbones():
            raise ConfigIdError("backbone", f"unknown backbone {backbone!r}; available: {', '.join(list_backbones())}")
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
    for key in ("weights", "ckpt_path", "datalist"):
        value = ids.get(key)
        if value not in (None, "", "imagenet", "kinetics") and not Path(str(value)).exists():
            raise ConfigIdError(key, f"file {value} does not exist")
    dataset_dir = ids.get("dataset_dir")
    if dataset_dir is not None and not Path(str(dataset_dir)).is_dir():
        raise ConfigIdError("dataset_dir", f"directory {dataset_dir} does not exist (null generates phantoms)")
    task = ids.get("task")
    if task is not None and task not in TASKS:
        raise ConfigIdError("task", f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
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


# ids check_ids knows, by the type their value must have
_ID_TYPES = {"spatial_dims": int, "in_channels": int, "num_classes": int, "n_folds": int, "fold": int, "epochs": int,
             "batch_size": int, "num_slices": int, "overlap": int, "lr": float}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _check_type(config_id: str, value: Any, expected: type) -> None:
    """Refuse a ``value`` of ``config_id`` that is not of type ``expected`` (bool, int or float; an int is a
    number; null and config expressions/references pass): ``--epochs abc`` arrives from MONAI's CLI as a string."""
    if value is None or (isinstance(value, str) and value[:1] in ("$", "@", "%")):
        return
    accepted = {bool: (bool,), int: (int,), float: (int, float)}[expected]
    if not isinstance(value, accepted) or (expected is not bool and isinstance(value, bool)):
        raise ConfigIdError(config_id, f"expected {_TYPE_NAMES[expected]}, got {value!r}")


def check_overrides(config_files: str | Sequence[str], overrides: Mapping[str, Any]) -> None:
    """Refuse overrides that the config files do not define, naming the closest ids (MONAI adds an unknown id as a
    new entry, so ``--epoch 3`` would train with the default), and values that do not fit a numeric or true/false
    default (``--epochs abc``). Nested ids (``preprocessing#preset_options#size``) are followed level by level."""
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    where = ", ".join(Path(f).name for f in files)
    defined = ConfigParser.load_config_files(files)
    for config_id, value in overrides.items():
        node: Any = defined
        for part in re.split("#|::", config_id):
            if not isinstance(node, dict):
                node = None  # inside a list or a value: MONAI resolves (or refuses) such paths itself
                break
            if part not in node:
                close = difflib.get_close_matches(part, [str(k) for k in node if not str(k).startswith("_")], n=3)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                    f"; the ids are listed in {where}"
                raise ConfigIdError(config_id, f"unknown id: {where} define{'s' if len(files) == 1 else ''} no "
                                               f"{part!r}{hint}")
            node = node[part]
        if type(node) in _TYPE_NAMES:
            _check_type(config_id, value, type(node))


def _bundle_run_overrides() -> tuple[str | Sequence[str], dict] | None:
    """The config files and overrides of the ``monai.bundle run`` call that is running this bundle (its CLI or
    the Python function; the innermost when runs nest), or None outside one or when they came in an args file."""
    from monai.bundle import scripts

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is scripts.run.__code__:
            config_file = frame.f_locals.get("config_file")
            return None if config_file is None else (config_file, dict(frame.f_locals.get("override") or {}))
        frame = frame.f_back
    return None


def _medtl3d_error(error: BaseException | None) -> Medtl3dError | None:
    """The first error medtl3d raised on purpose in ``error``'s chain of causes (MONAI wraps the errors of config
    expressions and components in ``RuntimeError``s)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Medtl3dError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_bundle_errors() -> None:
    """From now on, an uncaught error whose cause is a medtl3d error ends the process (status 1) with one line,
    ``medtl3d bundle: <its message>``, instead of MONAI's wrapper traceback; ``MEDTL3D_TRACEBACK=1`` shows the
    traceback. Other errors reach the previous ``sys.excepthook`` unchanged."""
    if getattr(sys.excepthook, "medtl3d_bundle", False):
        return
    previous = sys.excepthook

    def hook(kind, error, traceback) -> None:
        ours = _medtl3d_error(error)
        if ours is None or os.environ.get("MEDTL3D_TRACEBACK"):
            previous(kind, error, traceback)
        else:
            print(f"medtl3d bundle: {' '.join(str(ours).split())}", file=sys.stderr)

    hook.medtl3d_bundle = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# --------------------------------------------------------------------------------------------- data
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
    from .data import phantoms

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


def split_items(items: Sequence[dict], *, n_folds: int = 5, fold: int = 0, seed: int = 0,
                test_fraction: float = 0.2, test_items: Sequence[dict] | None = None) -> dict[str, list[dict]]:
    """Train / val / test by patient: ``test_items`` (the datalist's own test list) or a stratified patient
    hold-out of ``test_fraction``; then fold ``fold`` of a patient-grouped, label-stratified ``n_folds`` split
    (``n_folds=1``: a patient hold-out of the same fraction validates). The test split never selects a model."""
    from .data.datalists import holdout_split, kfold_split
    from .errors import DataError

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
    return {"train": train, "val": val, "test": test or val}


def load_items(datalist: str, *, task: str, num_classes: int, key: str = "training",
               path_keys: Sequence[str] = (), label_key: str = "label") -> list[dict]:
    """Datalist entries for ``task`` (see :func:`medtl3d.data.datalists.load_datalist`; ``label_key`` is the
    field holding the label, e.g. ``mask``); a missing ``key`` section gives an empty list (a datalist without a
    separate test split). Invalid rows (labels and mask values included) stop the run with every problem listed,
    under config id ``datalist``; so does training data in which a class never occurs (it would train a model whose
    validation metric is undefined)."""
    from .data.datalists import load_datalist
    from .errors import DataError

    if key != "training" and Path(datalist).suffix.lower() == ".json":
        document = json.loads(Path(datalist).read_text())
        if not isinstance(document, dict) or key not in document:
            return []
    elif key != "training":
        return []
    kind = "segmentation" if task == "segmentation" else ("multilabel" if task == "multilabel" else "classification")
    try:
        return load_datalist(datalist, key=key, task=kind, num_classes=num_classes, path_keys=tuple(path_keys),
                             label_key=label_key, every_class=key == "training")
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
    keeps an ``id`` (default: its image path) so evaluation writes one identified row per case."""
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose

    from .data.io import LoadCased

    keys = ["image"] + (["label"] if task == "segmentation" else [])
    chain = Compose([LoadCased(keys), _Labels(task), *transform.transforms])
    items = [{"id": str(item["image"][0] if isinstance(item["image"], list) else item["image"]), **item}
             for item in items]
    if cache:
        return CacheDataset(items, chain, cache_rate=1.0, num_workers=1, progress=False, copy_cache=True)
    return Dataset(items, chain)


# --------------------------------------------------------------------------------------------- models
@contextmanager
def _weights_id(weights: str | None) -> Iterator[None]:
    """Weights that cannot be fetched or loaded stop the bundle under config id ``weights`` (MONAI would otherwise
    report a failed ``network_def`` component)."""
    from .errors import HubUnavailableError, WeightsError

    try:
        yield
    except (WeightsError, HubUnavailableError) as err:
        raise ConfigIdError("weights", f"{weights}: {err}") from err


def build_classifier(backbone: str, strategy: str = "full", num_classes: int = 1, cut: str | None = None,
                     weights: str | None = None, spatial_dims: int | None = None, in_channels: int | None = None,
                     width_factor: float = 2.0, lr_ratio: float = 10.0, dropout: float = 0.0,
                     freeze_up_to: str | None = None) -> nn.Module:
    """``create_model`` with the bundle's ids; ``freeze_up_to`` freezes units up to that cut for any strategy.
    The model's ``model_config`` rebuilds it (without weights) from a checkpoint."""
    from .strategies import CUT_STRATEGIES, create_model

    kwargs: dict[str, Any] = {"dropout": dropout}
    if strategy == "transfusion":
        kwargs["width_factor"] = width_factor
    if strategy == "lwft":
        kwargs["lr_ratio"] = lr_ratio
    with _weights_id(weights):
        model = create_model(backbone, strategy, num_classes, cut=cut if strategy in CUT_STRATEGIES else None,
                             weights=weights, spatial_dims=spatial_dims, in_channels=in_channels,
                             **({"up_to": cut} if strategy == "stats" and cut else {}), **kwargs)
    if freeze_up_to:
        model.freeze_units(range(model.backbone.cut_point(freeze_up_to).unit + 1))
        model.snapshot_initial_state()
    model.model_config = {
        "builder": "classifier", "backbone": backbone, "strategy": strategy,
        "num_classes": num_classes, "cut": cut, "spatial_dims": model.backbone.spatial_dims,
        "in_channels": model.backbone.in_channels, "width_factor": width_factor, "lr_ratio": lr_ratio,
        "dropout": dropout, "freeze_up_to": freeze_up_to,
    }
    return model


def build_segmenter(backbone: str, out_channels: int, cut: str | None = None, weights: str | None = None,
                    spatial_dims: int | None = None, in_channels: int | None = None,
                    freeze_up_to: str | None = None, **unet_options: Any) -> nn.Module:
    """A :class:`~medtl3d.models.TruncatedUNet` whose encoder is ``backbone`` cut at ``cut``."""
    from .models import create_unet

    with _weights_id(weights):
        return create_unet(backbone, out_channels, cut=cut, weights=weights, spatial_dims=spatial_dims,
                           in_channels=in_channels, freeze_encoder_units=freeze_up_to, **unet_options)


def load_network(path: str) -> nn.Module:
    """A trained network from a medtl3d checkpoint (``.pt``) or a TorchScript export (``.ts``, from
    ``python -m monai.bundle ckpt_export``)."""
    from .inference import resolve_model

    if not Path(path).is_file():
        raise ConfigIdError("ckpt_path", f"checkpoint {path} does not exist; train the bundle first")
    try:
        return resolve_model(path, torch.device("cpu"))
    except Medtl3dError as err:  # e.g. a builder that is not registered: one line, not MONAI's wrapped traceback
        raise ConfigIdError("ckpt_path", str(err)) from None


# --------------------------------------------------------------------------------------------- runs
def settings_path(ckpt_path: str) -> Path:
    """The JSON next to a checkpoint (``model.pt`` / its ``model.ts`` export) that records its preprocessing."""
    return Path(ckpt_path).with_suffix(".json")


def inference_settings(ckpt_path: str) -> dict:
    """The preprocessing a checkpoint was trained with (written by :func:`train`), so inference matches it: from
    inside ``model.pt`` itself (so weights and settings always come from the same run), else from the JSON beside
    it (a TorchScript export, or a checkpoint written before settings were embedded)."""
    if Path(ckpt_path).suffix == ".pt" and Path(ckpt_path).is_file():
        from .engine import load_checkpoint

        embedded = load_checkpoint(ckpt_path).get("inference")
        if embedded is not None:
            return dict(embedded)
    path = settings_path(ckpt_path)
    if not path.is_file():
        raise ConfigIdError("ckpt_path", f"{path} is missing: it records how {ckpt_path} was trained; "
                                         "train the bundle first (or restore the file)")
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "run_id"}


@contextmanager
def _one_writer(ckpt_path: str, output_dir: str):
    """The locks of the model's folder and the training folder, held by the rank that writes for the whole run;
    a run that finds either held by another run stops at once, naming the config id, folder and holder."""
    from .errors import OutputLockedError
    from .locking import output_lock

    with ExitStack() as stack:
        if not (torch.distributed.is_initialized() and torch.distributed.get_rank() > 0):
            for config_id, folder in (("ckpt_path", Path(ckpt_path).parent), ("output_dir", Path(output_dir))):
                try:
                    stack.enter_context(output_lock(folder))
                except OutputLockedError as err:
                    raise ConfigIdError(config_id, str(err)) from None
        yield


def train(model: nn.Module, train_data, val_data, *, task: str, output_dir: str, ckpt_path: str,
          inference: Mapping | None = None, **engine_options: Any) -> dict:
    """Fine-tune with :func:`medtl3d.engine.train`; the best checkpoint becomes the bundle's ``models/model.pt``,
    ``inference`` (preset, its options, task, windows) is saved beside it for the inference config, and
    ``<output_dir>/train_summary.json`` records the run.

    One run at a time writes a bundle's model and training folders (a second is refused at once). ``model.pt`` is
    the run's commit point and self-contained: weights, settings, history, result and provenance in one atomic
    file, written after ``model.json`` and ``train_summary.json`` (both stamped with the same ``run_id``), so a
    reader of ``model.pt`` never combines parts of two runs."""
    from . import engine

    with _one_writer(ckpt_path, output_dir):
        result = engine.train(model, train_data, val_data, task=task, output_dir=output_dir,
                              model_config=getattr(model, "model_config", None), **engine_options)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:  # rank 0 writes the files
            return {"key_metric": result.key_metric, "best_metric": result.best_metric,
                    "best_epoch": result.best_epoch}
        source = engine.load_checkpoint(result.best_checkpoint or result.last_checkpoint)
        target = Path(ckpt_path)
        run_id = (source.get("provenance") or {}).get("run_id")  # None: a checkpoint older than provenance
        settings = {"task": task, **dict(inference or {})}
        describe = model.describe() if hasattr(model, "describe") else {}
        summary = {"run_id": run_id, "key_metric": result.key_metric, "best_metric": result.best_metric,
                   "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "checkpoint": str(target),
                   "model": describe, "history": result.history}
        write_text(settings_path(target), json.dumps({"run_id": run_id, **settings}, indent=2))
        write_text(Path(output_dir) / "train_summary.json", json.dumps(summary, indent=2, default=str))
        # the bundle's model: weights, the initial state (for the analyses), how to rebuild it, its settings and
        # provenance; no optimizer state. Written last: it is what readers trust.
        model_file = {**{k: source[k] for k in BUNDLE_CHECKPOINT_KEYS if k in source}, "inference": settings,
                      "epochs_run": result.epochs_run}
        atomic_write(target, partial(torch.save, model_file), durable=True)
    print(f"medtl3d: best {result.key_metric} = {result.best_metric:.4f} at epoch {result.best_epoch}; "
          f"model saved to {target}")
    return summary


def evaluate(ckpt_path: str, data, *, task: str, output_dir: str, **engine_options: Any) -> dict:
    """Score the checkpoint on ``data``; writes ``metrics.json``, ``metrics.md`` and ``predictions.csv``."""
    from . import engine

    model = load_network(ckpt_path)
    result = engine.evaluate(model, data, task=task, **engine_options)
    out = Path(output_dir)
    write_text(out / "metrics.json", json.dumps(result.metrics, indent=2))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in result.metrics.items()]
    write_text(out / "metrics.md", "\n".join(lines) + "\n")
    if result.predictions:
        buffer = io.StringIO()
        columns = list(dict.fromkeys(k for row in result.predictions for k in row))
        writer = csv.DictWriter(buffer, columns)
        writer.writeheader()
        writer.writerows(result.predictions)
        write_text(out / "predictions.csv", buffer.getvalue())
    print("medtl3d: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) + f" -> {out}/metrics.json")
    return result.metrics


def infer(ckpt_path: str, input_dir: str, output_dir: str, **options: Any) -> dict:
    """Folder inference (:func:`medtl3d.inference.infer_folder`) with the preprocessing the checkpoint was trained
    with (:func:`inference_settings`; ``options`` such as device, batch size or threshold add to it). A run where
    some cases failed writes every row, then exits with status 1."""
    from .inference import infer_folder

    if input_dir is None or not Path(str(input_dir)).is_dir():
        raise ConfigIdError("input_dir", f"directory {input_dir} does not exist")
    settings = {**inference_settings(ckpt_path), **{k: v for k, v in options.items() if v is not None}}
    preset = settings.pop("preset")
    summary = infer_folder(load_network(ckpt_path), preset, input_dir, output_dir, **settings)
    print(f"medtl3d: {summary.n_ok}/{summary.n_cases} cases predicted -> {summary.csv_path}")
    if summary.n_failed:
        raise SystemExit(f"medtl3d: {summary.n_failed} case(s) failed or were skipped; reasons in {summary.csv_path}")
    return {"n_cases": summary.n_cases, "n_ok": summary.n_ok, "csv": str(summary.csv_path)}


def efficiency(backbone: str, *, strategy: str, cuts, input_shape: Sequence[int], output_dir: str,
               segmentation_classes: int | None = None, **options: Any):
    """Params / MACs / latency per cut point (:func:`medtl3d.efficiency.efficiency_report`); with
    ``segmentation_classes`` the measured models are the bundle's U-Nets at each cut."""
    from .efficiency import efficiency_report

    builder = None
    if segmentation_classes is not None:
        from .models import TruncatedUNet

        builder = lambda body, name, num_classes, cut=None, **_: TruncatedUNet(body, segmentation_classes, cut=cut)  # noqa: E731
    shape = "x".join(str(int(s)) for s in input_shape)
    try:
        report = efficiency_report(backbone, strategy, cuts, shape, output_dir=output_dir, model_builder=builder,
                                   **options)
    except Medtl3dError as err:
        raise ConfigIdError("efficiency", str(err)) from None
    print(report.to_markdown())
    print(f"medtl3d: efficiency report written to {output_dir}")
    return report


def search(bundle_dir: str, *, output_dir: str, overrides: Mapping[str, Any], **options: Any):
    """The hierarchical cutoff search (:func:`medtl3d.search.run_search`) of this bundle; ``overrides`` are the
    train.yaml ids every trial shares (search.yaml forwards them all)."""
    from .errors import SearchError
    from .search import run_search

    try:
        return run_search(bundle_dir, output_dir, overrides=dict(overrides), **options)
    except SearchError as err:
        raise ConfigIdError("search", str(err)) from None


def lr_find(model: nn.Module, train_data, *, task: str, output_dir: str, **options: Any):
    """The learning-rate range test (:func:`medtl3d.engine.lr_finder.find_lr`) of the bundle's model on its
    training split; writes ``lr_find.csv/json/md/png`` to ``output_dir`` and prints the suggested rate."""
    from .engine.lr_finder import find_lr

    result = find_lr(model, train_data, task=task, output_dir=output_dir, **options)
    print(f"medtl3d: suggested lr {result.suggestion:.3g} (scanned {result.lrs[0]:.3g} .. {result.lrs[-1]:.3g}); "
          f"plot in {result.files['png']}")
    return result
