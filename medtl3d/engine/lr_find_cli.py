"""``medtl3d lr-find``: the learning-rate range test of a bundle's model on its training split.

Example: ``medtl3d lr-find --bundle bundles/cxr_classification --set strategy=lwft --set cut=denseblock3 --output
runs/lr``. It runs the bundle's ``train.yaml`` merged with ``lr_find.yaml`` (every train.yaml id can be set) and
prints the suggested learning rate; exit status 2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai.bundle import ConfigParser

from ..config_ids import ConfigIdError, check_overrides
from ..data.presets import parse_preset_options
from ..errors import Medtl3dError, medtl3d_cause


def add_parser(commands) -> None:
    parser = commands.add_parser("lr-find", help="learning-rate range test of a bundle's model (loss vs lr plot)",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle directory (bundles/<name>)")
    parser.add_argument("--output", help="output folder (default <bundle>/outputs); files go to <output>/lr_find")
    parser.add_argument("--set", action="append", metavar="ID=VALUE", default=[],
                        help="bundle id override (repeatable), e.g. --set strategy=lwft --set lr_find_num_iter=50")


def run(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle).resolve()
    files = [str(bundle / "configs" / name) for name in ("train.yaml", "lr_find.yaml")]
    try:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ConfigIdError("bundle", f"{bundle} has no {', '.join(Path(f).name for f in missing)}")
        overrides = parse_preset_options(args.set, "--set")
        check_overrides(files, overrides)
        parser = ConfigParser()
        parser.read_config(files)
        parser.update({**overrides, "bundle_root": str(bundle),
                       "output_dir": str(Path(args.output or bundle / "outputs").resolve())})
        parser.get_parsed_content("initialize")
        parser.get_parsed_content("run")
    except ConfigIdError as err:
        print(f"medtl3d lr-find: error: --set {err.config_id}: {err.problem}", file=sys.stderr)
        return 2
    except (Medtl3dError, RuntimeError) as err:
        ours = medtl3d_cause(err)
        if ours is None:
            raise
        print(f"medtl3d lr-find: error: {' '.join(str(ours).split())}", file=sys.stderr)
        return 2
    return 0
