"""Datalists (MONAI/decathlon JSON or CSV) with validation before training, and patient-grouped splits.

Formats read by :func:`load_datalist`:

- JSON: ``{"training": [{"image": ..., "label": ..., "patient": ...}, ...]}`` (another top-level key with ``key=``)
  or a plain list of such items. Multi-label labels are lists of 0/1 flags.
- CSV: columns ``image``, ``label`` and optionally ``patient`` (or ``group``) and ``study``; other columns are kept
  as strings.
  Multi-label labels are either one ``label`` column of ``;``-joined 0/1 flags (``0;1;1``) or several ``label_*``
  columns (one 0/1 flag each, classes in column order); :func:`write_datalist` writes the ``;`` form.

Relative paths (``image``; ``label`` for segmentation; fields named in ``path_keys``) are resolved against
``base_dir`` (default: the datalist's folder) into absolute strings. Every item gets a ``patient``, the group no
split may cut (:func:`case_group`: its ``patient`` or ``group``, else its ``study``, else the image's file stem).
Every row is checked before anything trains; all problems are reported at once in one DataError naming the file,
the 1-based row (CSV header not counted) and the field.

Patient-grouped splits of these items live in :mod:`medtl3d.data.splits`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medtl3d.data.io import load_image
from medtl3d.errors import DataError, setting
from medtl3d.reporting import write_text

__all__ = ["TASKS", "case_group", "load_datalist", "write_datalist"]

TASKS = ("classification", "multilabel", "segmentation")
_MAX_REPORTED = 20


def _stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_stem(image) -> str:
    """An image's (or the first of a list's) file or folder name without the image extension
    (``ct_01.nii.gz`` -> ``ct_01``)."""
    return _stem(str(image[0] if isinstance(image, list) else image))


def case_group(row: dict, study_key: str | None = "study") -> str:
    """The group a split keeps whole: the row's ``patient`` (or ``group``); without one its study, the field
    ``study_key`` (the clinical study, e.g. a CTPA StudyInstanceUID, whose series must stay together); else
    :func:`image_stem` of its image. A study belongs to one patient, so grouping by patient keeps every study whole
    as well."""
    for key in ("patient", "group", *([study_key] if study_key else [])):
        value = row.get(key)
        if isinstance(value, float) and math.isnan(value):
            continue
        if value not in (None, ""):
            return str(value)
    return image_stem(row.get("image"))


def item_id(item: dict) -> str:
    """A datalist item's case id in reports: its ``id`` field, else :func:`image_stem` of its image."""
    return str(item["id"]) if item.get("id") else image_stem(item.get("image"))


def _read_rows(path: Path, key: str) -> tuple[list[tuple[int, Any]], str]:
    """Raw (1-based row number, row) pairs of a JSON or CSV datalist, and its kind ("json" / "csv")."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read datalist: {e}") from e
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e}") from e
        if isinstance(data, dict):
            if key not in data:
                raise DataError(f"{path}: no key {key!r} (keys: {', '.join(map(repr, data)) or 'none'})")
            data = data[key]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of items under {key!r}, got {type(data).__name__}")
        rows = [(i, {"image": row} if isinstance(row, str) else row) for i, row in enumerate(data, start=1)]
        return rows, "json"
    if suffix == ".csv":
        table = [r for r in csv.reader(io.StringIO(text))]
        if not table:
            raise DataError(f"{path}: empty CSV (no header)")
        fields = [f.strip() for f in table[0]]
        if "image" not in fields:
            raise DataError(f"{path}: missing column 'image' (columns: {', '.join(fields)})")
        rows = []
        for i, values in enumerate(table[1:], start=1):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(fields):
                raise DataError(f"{path}: row {i} has {len(values)} values, the header has {len(fields)} columns")
            rows.append((i, {f: v.strip() for f, v in zip(fields, values)}))
        return rows, "csv"
    raise DataError(f"{path}: unknown datalist format {suffix!r} (expected .json or .csv)")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None
    return None


def load_datalist(path: str | Path, *, base_dir: str | Path | None = None, key: str = "training",
                  task: str = "classification", num_classes: int | None = None, check_files: bool = True,
                  labels: bool = True, path_keys: Sequence[str] = (), label_key: str = "label",
                  every_class: bool = False, study_key: str | None = "study") -> list[dict]:
    """Read and validate a datalist; returns items with absolute path strings, ``label`` and ``patient``.

    ``label_key`` is the field holding the label (e.g. ``mask`` in a datalist that also has a class label); the
    items carry it as ``label``.

    ``task``: ``classification`` (label an int in [0, num_classes); num_classes 1 or 2 both mean {0, 1}),
    ``multilabel`` (label a list of num_classes 0/1 flags) or ``segmentation`` (label a mask file).
    ``labels=False`` reads unlabelled lists (inference): labels are validated only where present.
    ``path_keys`` names further path fields (e.g. ``("mask",)``) to resolve like ``image``.
    ``check_files`` checks that images, segmentation masks and ``path_keys`` files exist, and reads every mask:
    its values must be class indices 0..num_classes-1 (a 0/1 mask needs num_classes 2; a 0/255 one must be
    converted to 0/1 first), so a mask in another label convention stops here, not inside the first batch.
    ``study_key`` names the field holding a series' study (the group where no ``patient`` is given, see
    :func:`case_group`; None: none). ``every_class`` (training data) refuses a datalist in which some class never
    occurs (for multi-label: a finding that is never, or always, positive; for segmentation: a class in no mask):
    its metrics would be undefined.
    """
    path = Path(path)
    if task not in TASKS:
        raise DataError(f"task={task!r}: expected one of {TASKS}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise DataError(f"num_classes={num_classes!r}: expected a positive integer")
    base = Path(base_dir) if base_dir is not None else path.parent
    rows, kind = _read_rows(path, key)
    if label_key != "label":
        rows = [(i, {**{k: v for k, v in row.items() if k not in ("label", label_key)}, "label": row.get(label_key)})
                if isinstance(row, dict) else (i, row) for i, row in rows]
    if not rows:
        raise DataError(f"{path}: datalist is empty" + (f" under {key!r}" if kind == "json" else ""))
    n_binary = 2 if num_classes in (1, 2) else num_classes
    columns = list(rows[0][1]) if kind == "csv" else []
    flag_columns = [c for c in columns if c.startswith("label_")] \
        if task == "multilabel" and "label" not in columns else []
    if kind == "csv" and labels and "label" not in columns and not flag_columns:
        raise DataError(f"{path}: missing column 'label'" + (" (or label_* columns)" if task == "multilabel" else "")
                        + f" (columns: {', '.join(columns)})")
    errors: list[str] = []
    items: list[dict] = []
    expected_len = num_classes if task == "multilabel" else None
    length_from = "num_classes"

    def resolve(value: str) -> str:
        p = Path(os.path.expanduser(value))
        return str((p if p.is_absolute() else base / p).resolve())

    for i, row in rows:
        def bad(field: str, why: str) -> None:
            errors.append(f"row {i}, field {field!r}: {why}")

        if not isinstance(row, dict):
            bad("image", f"item is {type(row).__name__}, expected an object with 'image'")
            continue
        item = {k: v for k, v in row.items() if not k.startswith("label_")} if flag_columns else dict(row)
        image = row.get("image")
        if image in (None, "") or not (isinstance(image, str) or
                                       (isinstance(image, list) and all(isinstance(x, str) for x in image))):
            bad("image", "missing" if image in (None, "") else f"expected a path, got {image!r}")
            continue
        item["image"] = [resolve(x) for x in image] if isinstance(image, list) else resolve(image)
        if check_files:
            for p in (item["image"] if isinstance(item["image"], list) else [item["image"]]):
                if not Path(p).exists():
                    bad("image", f"file not found: {p}")

        for k in path_keys:
            if row.get(k) in (None, ""):
                bad(k, "missing")
            elif not isinstance(row[k], str):
                bad(k, f"expected a path, got {row[k]!r}")
            else:
                item[k] = resolve(row[k])
                if check_files and not Path(item[k]).exists():
                    bad(k, f"file not found: {item[k]}")

        label = [row[c] for c in flag_columns] if flag_columns else row.get("label")
        if label in (None, "") or (isinstance(label, list) and any(v in (None, "") for v in label)):
            if labels:
                bad("label", "missing" if not flag_columns else f"empty value in {', '.join(flag_columns)}")
            item.pop("label", None)
        elif task == "classification":
            value = _as_int(label)
            if value is None or value < 0:
                bad("label", f"{label!r} is not a non-negative integer class index")
            elif n_binary is not None and value >= n_binary:
                bad("label", f"{value} is out of range for num_classes={num_classes} (expected 0..{n_binary - 1})")
            else:
                item["label"] = value
        elif task == "multilabel":
            flags = label.split(";") if isinstance(label, str) else label
            values = [_as_int(v) for v in flags] if isinstance(flags, list) else None
            if values is None or any(v not in (0, 1) for v in values):
                bad("label", f"{label!r} is not a list of 0/1 flags")
            elif expected_len is not None and len(values) != expected_len:
                bad("label", f"{len(values)} flags, expected {expected_len} (from {length_from})")
            else:
                if expected_len is None:
                    expected_len, length_from = len(values), f"row {i}"
                item["label"] = values
        else:  # segmentation: a mask file
            if not isinstance(label, str):
                bad("label", f"{label!r} is not a mask path")
            else:
                item["label"] = resolve(label)
                if check_files and not Path(item["label"]).is_file():
                    bad("label", f"mask file not found: {item['label']}")

        item["patient"] = case_group(item, study_key)
        items.append(item)

    if errors:
        more = f"\n  ... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
        raise DataError(f"{path}: {len(errors)} invalid entr{'y' if len(errors) == 1 else 'ies'}"
                        f"{f' under {key!r}' if kind == 'json' else ''}:{' ' if len(errors) == 1 else chr(10) + '  '}"
                        + "\n  ".join(errors[:_MAX_REPORTED]) + more)
    if task == "segmentation" and check_files and num_classes is not None and labels:
        _check_masks(path, items, [i for i, _ in rows], num_classes, label_key, every_class)
    elif every_class and labels and task != "segmentation":
        _check_every_class(path, items, task, n_binary)
    return items


def _check_masks(path: Path, items: list[dict], row_numbers: list[int], num_classes: int, label_key: str,
                 every_class: bool) -> None:
    """Read every mask once; refuse values that are not class indices 0..num_classes-1 (naming the first mask,
    the values and the fix) and, with ``every_class``, classes that occur in no mask."""
    found: set[float] = set()
    outside: list[tuple[int, str, list]] = []
    for row, item in zip(row_numbers, items):
        if "label" not in item:
            continue
        try:
            values = np.unique(np.asarray(load_image(item["label"])))
        except DataError as err:
            raise DataError(f"{path}: row {row}, field {label_key!r}: {err}") from None
        found.update(values.tolist())
        bad = [v for v in values.tolist() if not (float(v).is_integer() and 0 <= v < num_classes)]
        if bad:
            outside.append((row, item["label"], bad))
    labels = sorted(found)
    shown = ", ".join(f"{v:g}" for v in labels[:8]) + (", ..." if len(labels) > 8 else "")
    if outside:
        row, mask, bad = outside[0]
        if all(float(v).is_integer() and v >= 0 for v in labels) and labels == list(range(int(labels[-1]) + 1)):
            fix = f"if these are the classes, set {setting('num_classes', len(labels))}"
        elif set(labels) == {0, 255}:
            fix = f"an 8-bit binary mask: convert 255 to 1 and set {setting('num_classes', 2)}"
        else:
            fix = "map the mask values to class indices 0..K-1 and set num_classes to K"
        raise DataError(f"{path}: {len(outside)} of {len(items)} masks ({label_key!r}) hold values outside "
                        f"0..{num_classes - 1} (num_classes={num_classes}), first row {row} ({mask}: "
                        f"{', '.join(f'{v:g}' for v in bad[:5])}); values in all masks: {shown}; {fix}")
    missing = [c for c in range(num_classes) if c not in found] if every_class else []
    if missing:
        fix = (f"; if these are all the classes, set {setting('num_classes', len(labels))}"
               if labels == list(range(len(labels))) and len(labels) > 1 else "")
        raise DataError(f"{path}: class{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                        f"num_classes={num_classes} occur{'' if len(missing) > 1 else 's'} in no mask "
                        f"({label_key!r}; values in all masks: {shown}){fix}")


def _check_every_class(path: Path, items: list[dict], task: str, n_classes: int | None) -> None:
    """Refuse labels in which one of ``n_classes`` classes (default: 0 up to the largest label, at least 0 and 1)
    never occurs; multi-label: a finding that is never, or always, positive."""
    if task == "multilabel":
        for index, flags in enumerate(zip(*(item["label"] for item in items))):
            if len(set(flags)) == 1:
                raise DataError(f"{path}: finding {index} (flag {index + 1} of each label) is {flags[0]} in all "
                                f"{len(items)} cases; a classifier needs cases with and without each finding")
        return
    counts = Counter(item["label"] for item in items)
    missing = [c for c in range(n_classes or max(2, max(counts) + 1)) if c not in counts]
    if missing:
        present = ", ".join(f"class {c}: {n} case{'s' if n != 1 else ''}" for c, n in sorted(counts.items()))
        raise DataError(f"{path}: no case of class{'es' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing))} ({present}); a classifier needs training cases of every "
                        "class")


def write_datalist(items: Sequence[dict], path: str | Path, *, base_dir: str | Path | None = None,
                   key: str = "training") -> Path:
    """Write items as decathlon JSON (``{key: [...]}``) or CSV (by extension), atomically.

    Absolute path strings (``image``, a segmentation ``label``, any other path field) are written relative to
    ``base_dir`` (default: the datalist's folder). In CSV, list values are ``;``-joined (multi-label flags) and columns are the union of keys.
    """
    path = Path(path)
    base = Path(base_dir) if base_dir is not None else path.parent
    base = base.resolve()

    def rel(value: Any) -> Any:
        if isinstance(value, list):
            return [rel(v) for v in value]
        if isinstance(value, (str, os.PathLike)) and os.path.isabs(value):
            return Path(os.path.relpath(os.fspath(value), base)).as_posix()
        return value

    out = []
    for item in items:
        d = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in item.items()}
        out.append({k: rel(v) if isinstance(v, (str, os.PathLike)) or k == "image" else v for k, v in d.items()})
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps({key: out}, indent=2) + "\n"
    elif suffix == ".csv":
        columns = list(dict.fromkeys(k for d in out for k in d))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for d in out:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in d.items()})
        text = buf.getvalue()
    else:
        raise DataError(f"{path}: unknown datalist format {suffix!r} (expected .json or .csv)")
    write_text(path, text)
    return path
