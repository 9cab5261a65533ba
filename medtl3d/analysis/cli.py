"""``medtl3d analyze <method>``: the representation analyses on checkpoints and datalists, written as reports.

=============  ======================================================================================================
``similarity`` layer x layer CKA / CCA family between two checkpoints, or a checkpoint's initial vs final weights
``weights``    per-layer L2 distance and cosine similarity of a checkpoint's initial vs final weights
``gradcam``    Grad-CAM / Grad-CAM++ overlays (PNG; NIfTI for 3D) and, with lesion masks, CAM mass inside them
``knn``        layer-wise kNN probe of a (pretrained) backbone's frozen features at its cut points
``probe``      layer-wise linear probe, same inputs as ``knn``
``predictions`` prediction similarity of two checkpoints on the same cases, with its chance baseline
``reuse``      feature-reuse share (WT - ST) / (WT - RI) from three checkpoints (or three metric values)
``reinit``     re-initialisation robustness: reset (or re-randomise) each layer of a checkpoint and re-evaluate
``domain``     Fréchet distance between two data sets' pooled features of a (pretrained) backbone, per cut point
=============  ======================================================================================================

Data come from a datalist (``--datalist``, JSON or CSV) or from phantoms generated once into ``--phantom-dir``
(``--phantom cxr|histology|ctpa``); images go through a preprocessing preset (``--preset``, with
``--preset-option KEY=VALUE``). Every method writes CSV, JSON, Markdown and a PNG plot under ``--output``.
Exit status 0 on success, 2 on bad input (one-line error, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose

from ..backbones import create_backbone
from ..data.datalists import item_id, load_datalist
from ..data.splits import holdout_split
from ..data.io import LoadCased
from ..data.prepare import prepare_datalist
from ..data.presets import PRESETS, parse_preset_options, preset
from ..engine import load_model
from ..engine.runtime import on_terminal
from ..errors import AnalysisError, Medtl3dError
from ..reporting import plot_bars, write_curves, write_table
from .activations import POLICIES
from .domain import domain_distances
from .predictions import feature_reuse, metric_value, model_outputs, predicted_labels, prediction_similarity
from .probes import probe_cut_points
from .reinit import classification_metric
from .reports import (_stem, checkpoint_states, gradcam_report, initial_model, reinit_report, similarity_report,  # noqa: F401
                      weights_report)

PHANTOM_PRESETS = {"cxr": "cxr", "histology": "pathology", "ctpa": "ct"}


# ---------------------------------------------------------------------------------------------------- arguments
def _cuts(text: str):
    """``block`` / ``layer`` / ``all`` or comma-separated cut point names."""
    return text if text in ("block", "layer", "all") else [c.strip() for c in text.split(",") if c.strip()]


def _data_arguments(parser: argparse.ArgumentParser, name: str = "") -> None:
    """Where the cases come from and how they are preprocessed (``name`` prefixes the datalist flag)."""
    flag = f"--{name}datalist" if name else "--datalist"
    parser.add_argument(flag, help="datalist (MONAI/decathlon JSON or CSV)")
    parser.add_argument("--key", default="training", help="JSON datalist section (default training)")
    parser.add_argument("--phantom", choices=sorted(PHANTOM_PRESETS),
                        help="without a datalist: generate phantoms of this kind (once) into --phantom-dir")
    parser.add_argument("--phantom-dir", default="phantoms", help="where phantoms are generated (default ./phantoms)")
    parser.add_argument("--phantom-cases", type=int, default=32, help="number of phantom cases (default 32)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="preprocessing preset (default: the phantom kind's)")
    parser.add_argument("--preset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="preset option, repeatable (e.g. size=128, window=-100,900)")
    parser.add_argument("--task", choices=("binary", "multiclass"), default="binary",
                        help="label kind of the datalist (default binary)")
    parser.add_argument("--max-cases", type=int, help="use only the first N cases")
    parser.add_argument("--batch-size", type=int, default=8)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """A checkpoint, or a backbone built from the zoo with weights (for analyses of pretrained features)."""
    parser.add_argument("--checkpoint", help="training checkpoint (its model is used)")
    parser.add_argument("--backbone", help="backbone name (instead of --checkpoint)")
    parser.add_argument("--weights", help="backbone weights: a registered name or a local file")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3))
    parser.add_argument("--in-channels", type=int)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for the CSV / JSON / Markdown / PNG reports")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``medtl3d analyze <method>``."""
    parser = subparsers.add_parser("analyze", help="representation analyses (CKA, weights, Grad-CAM, probes, ...)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = parser.add_subparsers(dest="method", required=True, metavar="method")

    p = methods.add_parser("similarity", help="layer x layer CKA / CCA family (two checkpoints, or init vs final)")
    p.add_argument("--checkpoint", required=True, help="model A (alone: its initial vs its final weights)")
    p.add_argument("--checkpoint-b", help="model B")
    p.add_argument("--cuts", type=_cuts, default="block", help="block, layer, all or names (default block)")
    p.add_argument("--cuts-b", type=_cuts, help="model B's cut points (default: --cuts)")
    p.add_argument("--measure", default="debiased_cka",
                   help="linear_cka, debiased_cka, rbf_cka, cca, svcca, pwcca (default debiased_cka)")
    p.add_argument("--policy", choices=POLICIES, help="flattening of conv maps (default: the measure's)")
    p.add_argument("--spatial-size", type=int, help="average-pool maps to this grid first")
    p.add_argument("--channels", type=int, help="keep a fixed random subset of this many channels")
    p.add_argument("--estimator", choices=("exact", "minibatch"), default="exact",
                   help="CKA: exact streamed HSIC (default) or the average of per-minibatch HSICs (less memory)")
    _data_arguments(p)
    _common(p)

    p = methods.add_parser("weights", help="per-layer L2 distance / cosine of initial vs final weights")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--per", choices=("unit", "module"), default="unit", help="layer granularity (default unit)")
    p.add_argument("--include-norm", action="store_true", help="count norm-layer affine parameters too")
    _common(p)

    p = methods.add_parser("gradcam", help="Grad-CAM / Grad-CAM++ overlays and CAM mass inside lesion masks")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--method", choices=("gradcam", "gradcampp"), default="gradcam")
    p.add_argument("--cut", help="cut point to explain (default: the backbone's last)")
    p.add_argument("--class-idx", type=int, help="class to explain (default: the predicted one)")
    p.add_argument("--lesion-key", help="datalist field with a lesion mask (e.g. lesion): report CAM mass inside")
    p.add_argument("--images", nargs="+", help="image files / series folders (instead of a datalist)")
    p.add_argument("--slices", type=int, default=6, help="3D: slices in the PNG montage (default 6)")
    _data_arguments(p)
    _common(p)

    for name, text in (("knn", "layer-wise kNN probe at cut points"), ("probe", "layer-wise linear probe")):
        p = methods.add_parser(name, help=text)
        _model_arguments(p)
        p.add_argument("--cuts", type=_cuts, default="block", help="block, layer, all or names (default block)")
        p.add_argument("--test-datalist", help="test cases (default: a patient hold-out of the datalist)")
        p.add_argument("--test-fraction", type=float, default=0.3, help="hold-out share of patients (default 0.3)")
        p.add_argument("--seed", type=int, default=0)
        if name == "knn":
            p.add_argument("--k", type=int, default=200)
            p.add_argument("--temperature", type=float, default=0.1)
        else:
            p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty of the logistic regression")
        _data_arguments(p)
        _common(p)

    p = methods.add_parser("predictions", help="prediction similarity of two checkpoints (with chance baseline)")
    p.add_argument("--checkpoint", required=True, help="model A")
    p.add_argument("--checkpoint-b", required=True, help="model B")
    p.add_argument("--threshold", type=float, default=0.5, help="binary decision threshold on probabilities")
    _data_arguments(p)
    _common(p)

    p = methods.add_parser("reuse", help="feature-reuse share (WT - ST) / (WT - RI)")
    for init in ("wt", "st", "ri"):
        p.add_argument(f"--{init}", required=True, help=f"{init.upper()} checkpoint, or its metric value")
    p.add_argument("--metric", choices=("auroc", "accuracy"), default="auroc")
    _data_arguments(p)
    _common(p)

    p = methods.add_parser("reinit", help="re-initialisation robustness per layer")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--modes", default="reinit,rerand", help="reinit (initial weights), rerand (fresh random)")
    p.add_argument("--groups", choices=("unit", "block"), default="unit", help="reset each unit or each block")
    p.add_argument("--include-head", action="store_true", help="also reset the head")
    p.add_argument("--metric", choices=("auroc", "accuracy"), default="accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-randomised weights")
    _data_arguments(p)
    _common(p)

    p = methods.add_parser("domain", help="Fréchet distance of pooled features between two data sets")
    _model_arguments(p)
    p.add_argument("--cuts", type=_cuts, help="cut points (default: the backbone's last)")
    p.add_argument("--target-datalist", required=True, help="the target data set (the source is the datalist)")
    _data_arguments(p, "source-")
    _common(p)

    parser.set_defaults(func=run)
    return parser


# ---------------------------------------------------------------------------------------------------- inputs
def _device(args) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {args.device}: CUDA is not available on this machine")
    return device


def _load(path: str, args) -> torch.nn.Module:
    return load_model(path, map_location=_device(args))


def _backbone_model(args) -> torch.nn.Module:
    if bool(args.checkpoint) == bool(args.backbone):
        raise AnalysisError("give either --checkpoint or --backbone (with --weights)")
    if args.checkpoint:
        return _load(args.checkpoint, args)

    backbone = create_backbone(args.backbone, args.spatial_dims, args.in_channels, args.weights)
    return backbone.to(_device(args)).eval()


def _datalist(args, path: str | None) -> str:
    if path is None and args.phantom is None:
        raise AnalysisError("no cases: give a datalist or --phantom cxr|histology|ctpa")
    return prepare_datalist(None, path, phantom=args.phantom or "cxr", phantom_dir=args.phantom_dir,
                            n_cases=args.phantom_cases)


def _transform(args, mask_key: str | None = None):
    name = args.preset or PHANTOM_PRESETS.get(args.phantom or "")
    if name is None:
        raise AnalysisError("--preset is required for a datalist (ct, cxr or pathology)")
    return preset(name, train=False, label_key="label" if mask_key else None,
                  **parse_preset_options(args.preset_option))


def _items(args, path: str, *, labels: bool, mask_key: str | None = None) -> list[dict]:
    items = load_datalist(path, key=args.key, task="classification", labels=labels,
                          path_keys=(mask_key,) if mask_key else ())
    if mask_key and any(mask_key not in item for item in items):
        raise AnalysisError(f"{path}: --lesion-key {mask_key!r} is missing from some datalist items")
    return items[: args.max_cases] if args.max_cases else items


def _dataset(args, items: list[dict], mask_key: str | None = None, cache: bool = False):
    """A MONAI Dataset: medtl3d's readers load ``image`` (and the mask ``mask_key`` as ``label``), then the preset;
    ``cache`` keeps the preprocessed cases in memory for analyses that pass over them many times."""


    if mask_key:
        items = [{**item, "label": item[mask_key]} for item in items]
    keys = ["image", "label"] if mask_key else ["image"]
    chain = Compose([LoadCased(keys), *_transform(args, mask_key).transforms])
    items = [dict(item) for item in items]
    if cache:
        return CacheDataset(items, chain, cache_rate=1.0, num_workers=1,
                            progress=not args.no_progress and on_terminal())
    return Dataset(items, chain)


def _loader(args, items: list[dict], cache: bool = False):
    return DataLoader(_dataset(args, items, cache=cache), batch_size=args.batch_size, shuffle=False, num_workers=0)


# ---------------------------------------------------------------------------------------------------- methods
def _similarity(args) -> Path:
    model_a = _load(args.checkpoint, args)
    if args.checkpoint_b:
        model_b, names = _load(args.checkpoint_b, args), (_stem(args.checkpoint), _stem(args.checkpoint_b))
    else:
        model_a, model_b = initial_model(model_a, args.checkpoint), model_a
        names = (f"{_stem(args.checkpoint)} (initial)", f"{_stem(args.checkpoint)} (final)")
    datalist = _datalist(args, args.datalist)
    loader = _loader(args, _items(args, datalist, labels=False))
    return similarity_report(model_a, model_b, loader, args.output, names, cuts=args.cuts, cuts_b=args.cuts_b,
                             measure=args.measure, policy=args.policy, spatial_size=args.spatial_size,
                             channels=args.channels, batch_size=args.batch_size, estimator=args.estimator,
                             progress=not args.no_progress, metadata={"datalist": datalist})


def _weights(args) -> Path:
    return weights_report(_load(args.checkpoint, args), args.checkpoint, args.output, args.per, args.include_norm)


def _gradcam(args) -> Path:
    model = _load(args.checkpoint, args)
    if args.images:
        items = [{"image": str(Path(p).resolve())} for p in args.images]
        items = items[: args.max_cases] if args.max_cases else items
        if args.lesion_key:
            raise AnalysisError("--lesion-key needs a datalist (the masks are datalist fields)")
        source = "images"
    else:
        source = _datalist(args, args.datalist)
        items = _items(args, source, labels=False, mask_key=args.lesion_key)
    dataset = _dataset(args, items, args.lesion_key)

    def cases():
        for index, item in enumerate(items):
            sample = dataset[index]
            yield item_id(item), sample["image"], item.get("label"), sample["label"] if args.lesion_key else None

    return gradcam_report(model, cases(), args.output, method=args.method, cut=args.cut, class_idx=args.class_idx,
                          slices=args.slices, metadata={"checkpoint": args.checkpoint, "source": source},
                          title=f"{args.method} of {_stem(args.checkpoint)}")


def _probe(args) -> Path:
    model = _backbone_model(args)
    datalist = _datalist(args, args.datalist)
    items = _items(args, datalist, labels=True)
    if args.test_datalist:
        train_items, test_items = items, _items(args, args.test_datalist, labels=True)
    else:
        train_items, test_items = holdout_split(items, args.test_fraction, seed=args.seed)
    name = "knn" if args.method == "knn" else "linear"
    options = {"knn": {"k": args.k, "temperature": args.temperature}} if name == "knn" else {"linear": {"l2": args.l2}}
    probe_cut_points(model, _loader(args, train_items), _loader(args, test_items), args.cuts, probes=(name,),
                     batch_size=args.batch_size, options=options, output_dir=args.output,
                     progress=not args.no_progress)
    return Path(args.output) / "probes.png"


def _predictions(args) -> Path:
    datalist = _datalist(args, args.datalist)
    items = _items(args, datalist, labels=True)
    loader = _loader(args, items, cache=True)
    outputs, targets = {}, None
    for key, path in (("a", args.checkpoint), ("b", args.checkpoint_b)):
        outputs[key], targets = model_outputs(_load(path, args), loader)
    labels = {k: predicted_labels(v, threshold=args.threshold) for k, v in outputs.items()}
    result = prediction_similarity(labels["a"], labels["b"], targets)
    result.update({f"auroc_{k}": metric_value(v, targets, "auroc") for k, v in outputs.items()})
    metadata = {"model_a": args.checkpoint, "model_b": args.checkpoint_b, "datalist": datalist,
                "threshold": args.threshold}
    output = Path(args.output)
    write_table(output, "prediction_similarity", [result], metadata, title="prediction similarity")
    cases = [{"case": item_id(item), "label": int(y), "predicted_a": int(a), "predicted_b": int(b)}
             for item, y, a, b in zip(items, targets, labels["a"], labels["b"])]
    write_table(output, "predictions", cases, metadata, title="predictions per case")
    return plot_bars(output / "prediction_similarity.png",
                     {k: result[k] for k in ("accuracy_a", "accuracy_b", "both_right", "both_wrong", "agreement")},
                     title=f"{_stem(args.checkpoint)} vs {_stem(args.checkpoint_b)}", ylabel="share of cases",
                     reference={"chance": result["chance"]})


def _metric_or_checkpoint(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _reuse(args) -> Path:
    values = {init: _metric_or_checkpoint(getattr(args, init)) for init in ("wt", "st", "ri")}
    metadata = {init: getattr(args, init) for init in values}
    if any(v is None for v in values.values()):
        datalist = _datalist(args, args.datalist)
        loader = _loader(args, _items(args, datalist, labels=True), cache=True)
        metadata.update(datalist=datalist, metric=args.metric)
        for init, value in values.items():
            if value is None:
                values[init] = metric_value(*model_outputs(_load(getattr(args, init), args), loader), args.metric)
    result = feature_reuse(**values)
    output = Path(args.output)
    write_table(output, "feature_reuse", [result], metadata, title="feature reuse (WT - ST) / (WT - RI)")
    return plot_bars(output / "feature_reuse.png", {"WT": result["wt"], "ST": result["st"], "RI": result["ri"]},
                     title=f"feature reuse = {result['feature_reuse']:.3f}", ylabel=args.metric)


def _reinit(args) -> Path:
    datalist = _datalist(args, args.datalist)
    evaluate = classification_metric(_loader(args, _items(args, datalist, labels=True), cache=True), args.metric)
    return reinit_report(_load(args.checkpoint, args), args.checkpoint, evaluate, args.output, args.metric,
                         modes=[m.strip() for m in args.modes.split(",") if m.strip()], groups=args.groups,
                         include_head=args.include_head, seed=args.seed, metadata={"datalist": datalist})


def _domain(args) -> Path:
    model = _backbone_model(args)
    source = _datalist(args, args.source_datalist)
    rows = domain_distances(model, _loader(args, _items(args, source, labels=False)),
                            _loader(args, _items(args, args.target_datalist, labels=False)), args.cuts,
                            batch_size=args.batch_size, progress=not args.no_progress)
    metadata = {"model": args.checkpoint or f"{args.backbone} ({args.weights or 'random'})", "source": source,
                "target": args.target_datalist}
    return write_curves(args.output, "domain", rows, "cut", ["frechet_distance"], metadata,
                        title="domain distance (Fréchet, pooled features)")["png"]


METHODS = {"similarity": _similarity, "weights": _weights, "gradcam": _gradcam, "knn": _probe, "probe": _probe,
           "predictions": _predictions, "reuse": _reuse, "reinit": _reinit, "domain": _domain}


def run(args: argparse.Namespace) -> int:
    """Run ``medtl3d analyze <method>``; returns the exit status (2 on bad input, with a one-line error)."""
    try:
        where = METHODS[args.method](args)
    except Medtl3dError as exc:
        print(f"medtl3d: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.method}: reports written to {Path(args.output)} ({Path(where).name})")
    return 0
