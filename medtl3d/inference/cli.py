"""``medtl3d infer``: predict every case of a folder with a trained checkpoint and a preprocessing preset.

``--bundle DIR`` takes the bundle's trained model (``DIR/models/model.pt``, or ``--model``) and the preprocessing it
was trained with (the ``model.json`` written beside it); without it, ``--model``, ``--preset`` and ``--task`` say
everything. Options given on the command line win over the recorded ones.

Exit status: 0 when every case was predicted, 1 when some failed or were skipped (their count and the CSV path are
printed), 2 on bad arguments, an unusable model file or an output folder in use (one-line error, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..data.presets import PRESETS, parse_preset_options
from ..engine import TASKS
from ..engine.metrics import AGGREGATIONS
from ..errors import DataError, Medtl3dError, one_line
from ._folder import infer_folder

logger = logging.getLogger(__name__)

_LISTED = 20  # failures printed; the CSV has them all


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("infer", help="predict every case (DICOM series, NIfTI, PNG) of a folder",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle folder (bundles/<name>): its trained model and preprocessing")
    parser.add_argument("--model", help="checkpoint (.pt) or TorchScript export (.ts); default with --bundle: "
                                        "<bundle>/models/model.pt")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="preprocessing preset (default: recorded)")
    parser.add_argument("--preset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="preset option, repeatable (e.g. size=192, window=-100,900, spacing=1,1,2)")
    parser.add_argument("--task", choices=TASKS, help="default: recorded with the model")
    parser.add_argument("--input", required=True, help="folder of cases")
    parser.add_argument("--output", required=True, help="folder for predictions.csv/.json (and masks/)")
    parser.add_argument("--class-names", help="comma-separated class (or label) names")
    parser.add_argument("--num-slices", type=int, help="3D: windows of this many slices (series aggregation)")
    parser.add_argument("--overlap", type=int, help="slices shared by neighbouring windows (default 0)")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, help="window -> case (default max)")
    parser.add_argument("--threshold", type=float, help="decision threshold on probabilities (default 0.5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--irregular", choices=("refuse", "resample"), default="refuse",
                        help="DICOM series with missing slices / uneven spacing / tilt: refuse (default) or resample")
    parser.add_argument("--max-decoded-mb", type=float, metavar="MB",
                        help="refuse images whose headers claim a larger decoded size (default: "
                             "$MEDTL3D_MAX_DECODED_MB or 2048)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _settings(args: argparse.Namespace) -> tuple[str, dict]:
    """The model path and infer_folder's options: recorded settings (beside the model), then command-line flags."""
    model = args.model or (str(Path(args.bundle) / "models" / "model.pt") if args.bundle else None)
    if model is None:
        raise DataError("give --model CHECKPOINT (or --bundle DIR)")
    recorded_file = Path(model).with_suffix(".json")
    try:
        recorded = json.loads(recorded_file.read_text(encoding="utf-8")) if recorded_file.is_file() else {}
    except (OSError, ValueError) as err:
        raise DataError(f"{recorded_file}: the recorded settings of {model} cannot be read ({one_line(err)}); "
                        "restore the file, or delete it and give --preset and --task") from err
    if not isinstance(recorded, dict):
        raise DataError(f"{recorded_file}: the recorded settings of {model} are not a JSON object; restore the "
                        "file, or delete it and give --preset and --task")
    if args.bundle and not recorded:
        raise DataError(f"{recorded_file} is missing: it records the preprocessing of {model}; train the bundle "
                        "first (or give --preset and --task)")
    options = {"preset": recorded.get("preset"), "task": recorded.get("task"),
               "preset_options": dict(recorded.get("preset_options") or {}), "num_slices": recorded.get("num_slices"),
               "overlap": recorded.get("overlap", 0), "aggregation": recorded.get("aggregation", "max"),
               "class_names": recorded.get("class_names"), "threshold": recorded.get("threshold", 0.5)}
    given = {"preset": args.preset, "task": args.task, "num_slices": args.num_slices, "overlap": args.overlap,
             "aggregation": args.aggregation, "threshold": args.threshold,
             "class_names": args.class_names.split(",") if args.class_names else None}
    options.update({k: v for k, v in given.items() if v is not None})
    options["preset_options"].update(parse_preset_options(args.preset_option))
    for key in ("preset", "task"):
        if options[key] is None:
            raise DataError(f"--{key} is needed: {model} has no recorded settings ({recorded_file.name})")
    return model, options


def run(args: argparse.Namespace) -> int:
    try:
        model, options = _settings(args)
        preset = options.pop("preset")
        summary = infer_folder(model, preset, args.input, args.output, device=args.device,
                               batch_size=args.batch_size, irregular=args.irregular, progress=not args.no_progress,
                               max_decoded_mb=args.max_decoded_mb, **options)
    except Medtl3dError as exc:
        print(f"medtl3d: error: {one_line(exc, 500)}", file=sys.stderr)  # the rest of a long message: the log
        logger.debug("medtl3d infer refused", exc_info=exc)
        return 2
    resumed = f" ({summary.n_resumed} resumed from an interrupted run)" if summary.n_resumed else ""
    print(f"{summary.n_cases} case(s): {summary.n_ok} ok, {summary.n_failed} failed or skipped{resumed} -> "
          f"{summary.csv_path}")
    for failure in summary.failures[:_LISTED]:
        print(f"  {failure['status']}: {failure['case_id'] or failure['path']}: {failure['reason']}")
    if len(summary.failures) > _LISTED:
        print(f"  ... and {len(summary.failures) - _LISTED} more (see the CSV)")
    return 1 if summary.n_failed else 0
