"""The ``medtl3d`` console script.

``medtl3d backbones`` lists the zoo; ``medtl3d backbones NAME`` prints a backbone's cut points as a table, with the
parameters a truncation at each cut keeps (a block cut that ends at the same unit as a layer cut shares its row:
``stage1 = features.1``); NAME may be ``timm/<any timm model>``. ``info MODEL.pt`` prints what a model is and
where it came from (its architecture and provenance), read without building it. ``efficiency`` measures
params/MACs/latency per cut point, ``infer``
predicts a folder of cases, ``phantoms`` writes the synthetic datasets, ``analyze`` runs the representation analyses, ``search`` runs the
hierarchical cutoff search of a bundle, ``study`` judges the seed papers' claims (transfer vs random init,
truncation, TransFusion / LWFT, CKA by depth, convergence) on a bundle's data, ``lr-find`` the learning-rate range
test of a bundle's model, ``compare``
two evaluated runs on the same test cases (paired tests, non-inferiority verdict), ``weights list`` / ``weights
info NAME`` show the pretrained weights catalogue. Errors
from bad input are printed as one line (exit status 2), not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from .analysis import cli as analyze_cli
from .backbones import build_backbone, get_entry, list_backbones
from .data import phantoms
from .engine import load_checkpoint, lr_find_cli
from .errors import Medtl3dError, user_interface
from .evaluation import cli as compare_cli
from .inference import cli as infer_cli
from .search import cli as search_cli
from .study import cli as study_cli
from .weights import cli as weights_cli, get_weights, list_weights


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def list_backbones_table() -> str:
    rows = []
    for name in list_backbones():
        entry = get_entry(name)
        dims = entry.spatial_dims[0]
        with torch.device("meta"):  # structure only: no memory, no initialisation cost
            backbone = build_backbone(name, dims)
        rows.append([
            name,
            "/".join(f"{d}D" for d in entry.spatial_dims),
            entry.in_channels,
            _size(entry.default_input[dims]),
            len(backbone.cut_points_at("block")),
            len(backbone.cut_points_at("layer")),
            "yes" if entry.slimmable else "no",
            ", ".join(n for n in list_weights() if get_weights(n).architecture == name) or "-",
            entry.description,
        ])
    headers = ["backbone", "dims", "in_ch", "default input", "block cuts", "layer cuts", "transfusion",
               "weights (catalogue)", "description"]
    return _table(headers, rows)


def cut_points_table(name: str, spatial_dims: int | None = None, level: str | None = None) -> str:
    with torch.device("meta"):
        backbone = build_backbone(name, spatial_dims)
    params_by_unit = [sum(p.numel() for p in backbone.unit_parameters(i)) for i in range(len(backbone.units))]
    cuts = backbone.cut_points_at(level)
    by_unit: dict[int, list] = {}
    for cut in cuts:  # one row per unit: a block cut and a layer cut ending at the same unit are aliases
        by_unit.setdefault(cut.unit, []).append(cut)
    rows = []
    for unit, aliases in by_unit.items():
        aliases.sort(key=lambda c: c.level != "block")  # the block (Stage-1) name first
        cut, kept = aliases[0], sum(params_by_unit[: unit + 1])
        rows.append([" = ".join(c.name for c in aliases), ", ".join(c.level for c in aliases), cut.channels,
                     cut.reduction_str, f"{kept / 1e6:.3f}"])
    title = f"{name} ({backbone.spatial_dims}D, {backbone.in_channels} input channels): {len(cuts)} cut points"
    return title + "\n" + _table(["cut point", "level", "channels", "reduction", "params kept (M)"], rows)


def _batch_sizes(text: str) -> list[int]:
    """``--batch 1,8`` -> [1, 8]; anything else is an argparse error (usage and one line)."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def checkpoint_info(path: str) -> dict:
    """Architecture, training result and provenance of a medtl3d model file, read with ``weights_only=True`` and
    without building the model (no builder is called)."""
    state = load_checkpoint(path)
    config = dict(state.get("model_config") or {})
    weights = state.get("model") or {}
    return {
        "file": str(path),
        "architecture": {"builder": config.get("builder"), "backbone": config.get("backbone"),
                         "strategy": config.get("strategy"), "cut": config.get("cut"),
                         "params": int(sum(t.numel() for t in weights.values() if torch.is_tensor(t)))},
        "model_config": config,
        "training": {k: state.get(k) for k in ("key_metric", "best_metric", "best_epoch", "epochs_run")},
        "inference": state.get("inference"),
        "provenance": state.get("provenance"),
    }


def _info_text(info: dict) -> str:
    """``checkpoint_info`` as indented ``key: value`` lines."""
    lines: list[str] = []

    def add(value, indent: int) -> None:
        for key, item in value.items():
            if isinstance(item, dict) and item:
                lines.append(" " * indent + f"{key}:")
                add(item, indent + 2)
            else:
                lines.append(" " * indent + f"{key}: {'-' if item is None else item}")

    add(info, 0)
    if info["provenance"] is None:
        lines.append("(no provenance: written before medtl3d recorded it)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtl3d", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    zoo = commands.add_parser("backbones", help="list backbones, or one backbone's cut points")
    zoo.add_argument("name", nargs="?", help="backbone whose cut points to print")
    zoo.add_argument("--spatial-dims", type=int, choices=(2, 3), help="build the 2D or 3D variant")
    zoo.add_argument("--level", choices=("block", "layer", "all"), default="all", help="cut-point level to show")
    cost = commands.add_parser("efficiency", help="params, MACs and latency of a backbone at its cut points")
    cost.add_argument("name", help="backbone to measure")
    cost.add_argument("--strategy", default="truncate", help="transfer strategy measured at each cut (default truncate)")
    cost.add_argument("--cuts", default="block", help="all, block, layer or comma-separated cut point names")
    cost.add_argument("--input", help="input shape CxHxW or CxDxHxW (default: the backbone's default input)")
    cost.add_argument("--batch", default=[1], type=_batch_sizes, help="batch size(s), comma-separated")
    cost.add_argument("--device", default="cpu")
    cost.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    cost.add_argument("--amp", action="store_true", help="time under autocast")
    cost.add_argument("--channels-last", action="store_true")
    cost.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs")
    cost.add_argument("--runs", type=int, default=20, help="timed runs (0: count only)")
    cost.add_argument("--output", help="directory for the CSV, JSON, Markdown and PNG reports")
    info = commands.add_parser("info", help="a model file's architecture and provenance (medtl3d info MODEL.pt)")
    info.add_argument("model", help="a medtl3d checkpoint or bundle model (.pt)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    delegated = {"infer": infer_cli.run, "phantoms": phantoms.run, "analyze": analyze_cli.run,
                 "search": search_cli.run, "lr-find": lr_find_cli.run, "compare": compare_cli.run,
                 "weights": weights_cli.run, "study": study_cli.run}
    search_cli.add_parser(commands)
    study_cli.add_parser(commands)
    lr_find_cli.add_parser(commands)
    infer_cli.add_parser(commands)
    phantoms.add_parser(commands)
    analyze_cli.add_parser(commands)
    compare_cli.add_parser(commands)
    weights_cli.add_parser(commands)
    args = parser.parse_args(argv)
    with user_interface("cli"):  # advice in error messages names flags, not Python arguments
        return _run(args, delegated)


def _run(args: argparse.Namespace, delegated: dict) -> int:
    """Run the parsed command; bad input ends as one line on stderr and exit status 2."""
    if args.command in delegated:
        return delegated[args.command](args)
    try:
        if args.command == "backbones":
            print(cut_points_table(args.name, args.spatial_dims, args.level) if args.name else list_backbones_table())
        elif args.command == "efficiency":
            from .efficiency import efficiency_report  # only here: fvcore's import warns on stderr (torch.jit)

            report = efficiency_report(
                args.name, args.strategy, args.cuts, args.input, args.batch,
                args.device, args.dtype, args.amp, args.channels_last, args.warmup, args.runs, output_dir=args.output,
            )
            print(report.to_markdown())
        elif args.command == "info":
            details = checkpoint_info(args.model)
            print(json.dumps(details, indent=2, default=str) if args.json else _info_text(details))
    except Medtl3dError as exc:
        print(f"medtl3d: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
