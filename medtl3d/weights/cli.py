"""``medtl3d weights list`` (the catalogue: name, architecture, source, licence, cached) and ``medtl3d weights info
NAME`` (one entry: file, hash, layout, licence, paper, preprocessing, published head)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import Medtl3dError
from ..reporting import markdown_table
from .catalogue import cache_folder, get_weights, is_cached, list_weights


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("weights", help="the pretrained weights catalogue (list, info NAME)")
    actions = parser.add_subparsers(dest="weights_command", required=True)
    listing = actions.add_parser("list", help="catalogue entries: name, architecture, source, licence, cached")
    listing.add_argument("--timm", action="store_true", help="also every timm pretrained tag (timm/<model>.<tag>)")
    listing.add_argument("--architecture", help="only the entries for this backbone")
    info = actions.add_parser("info", help="one entry: file, SHA-256, layout, licence, paper, preprocessing, head")
    info.add_argument("name", help="catalogue name, e.g. densenet121.imagenet or timm/<model>.<tag>")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def list_table(timm_tags: bool = False, architecture: str | None = None) -> str:
    """The catalogue as a Markdown table, with where files are looked for."""
    rows = []
    for name in list_weights(timm_tags=timm_tags):
        entry = get_weights(name)
        if architecture and entry.architecture != architecture:
            continue
        rows.append({"name": name, "architecture": entry.architecture, "source": entry.source,
                     "licence": entry.licence, "cached": "yes" if is_cached(entry) else "no"})
    return markdown_table(rows, ["name", "architecture", "source", "licence", "cached"]) + (
        f"\n{len(rows)} entries; files are looked for in {cache_folder()} ($MEDTL3D_WEIGHTS, else the torch hub "
        "cache)" + ("" if timm_tags else "; --timm adds every timm pretrained tag"))


def info_text(name: str) -> str:
    """``key: value`` lines describing entry ``name``."""
    entry = get_weights(name)
    return "\n".join(f"{key}: {'-' if value in (None, '', [], {}) else value}"
                     for key, value in {**entry.describe(), "cached": is_cached(entry)}.items())


def run(args: argparse.Namespace) -> int:
    try:
        if args.weights_command == "list":
            print(list_table(args.timm, args.architecture))
        else:
            entry = get_weights(args.name)
            print(json.dumps({**entry.describe(), "cached": is_cached(entry)}, indent=2) if args.json
                  else info_text(args.name))
    except Medtl3dError as exc:
        print(f"medtl3d: error: {exc}", file=sys.stderr)
        return 2
    return 0
