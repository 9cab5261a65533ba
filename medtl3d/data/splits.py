"""Patient-grouped splits of datalist items, and what a split looks like.

:func:`kfold_split` and :func:`holdout_split` are scikit-learn's ``StratifiedGroupKFold`` (``GroupKFold`` where
there is no class to stratify on): no patient in two parts, classes balanced over folds, the assignment a function
of ``seed`` alone. Stratification key: the class index (classification), the first positive class or -1 for none
(multi-label), none for segmentation (group-only). A patient is :func:`~medtl3d.data.datalists.case_group`: the
item's ``patient`` (or ``group``) field, else its ``study`` (so the series of one study stay together), else its
image's file stem. :func:`split_summary` describes the parts (cases, classes, groups, the largest group's
share) and flags a part that one group dominates.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from typing import Mapping, Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ..errors import DataError
from .datalists import _as_int, case_group

__all__ = ["format_split", "holdout_split", "kfold_split", "split_summary"]



def _stratum(item: dict) -> int | None:
    """Stratification key: class index; first positive flag (or -1) for multi-label; None otherwise."""
    label = item.get("label")
    if isinstance(label, (list, tuple, np.ndarray)):
        flags = [int(v) for v in label]
        return flags.index(1) if 1 in flags else -1
    if isinstance(label, str) and _as_int(label) is None:
        return None  # a mask path
    return _as_int(label)


def _strata(items: Sequence[dict], stratify: bool) -> list[int] | None:
    keys = [_stratum(it) for it in items]
    return keys if stratify and all(k is not None for k in keys) and len(set(keys)) > 1 else None


def _fold_indices(items: list[dict], n_folds: int, seed: int, stratify: bool, option: str,
                  min_per_class: int) -> list[tuple]:
    """``(train, val)`` index pairs of a patient-grouped ``n_folds``-fold split: ``StratifiedGroupKFold`` when there
    are classes to stratify on (balancing classes over folds while keeping each patient in one fold), else
    ``GroupKFold``; both shuffled with ``seed``, so the assignment is a function of ``seed`` alone. ``option`` names
    the setting a refusal is about; every class needs ``min_per_class`` patients."""
    groups = [case_group(it) for it in items]
    n_patients = len(set(groups))
    if n_patients < n_folds:
        raise DataError(f"{option}: needs {n_folds} patient-grouped folds but there are {n_patients} patients")
    y = _strata(items, stratify)
    if y is None:
        return list(GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(items, groups=groups))
    per_class: dict[int, set] = defaultdict(set)
    for k, g in zip(y, groups):
        per_class[k].add(g)
    smallest, members = min(per_class.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(members) < min_per_class:
        name = "no positive label" if smallest == -1 else f"class {smallest}"
        raise DataError(f"{option}: needs more patients in the smallest class: {name} has {len(members)} "
                        f"patient{'s' if len(members) != 1 else ''}; use fewer folds or stratify=False")
    with warnings.catch_warnings():  # a hold-out uses one fold only: a class in fewer folds than n_folds is fine
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(items, y, groups))


def kfold_split(items: Sequence[dict], n_folds: int, fold: int, *, seed: int = 0,
                stratify: bool = True) -> tuple[list[dict], list[dict]]:
    """(train, val) of fold ``fold`` in ``n_folds``-fold cross-validation: patient-grouped (no patient in both),
    label-stratified (``StratifiedGroupKFold``, shuffled with ``seed``). Items keep their order in each part."""
    items = list(items)
    if not isinstance(n_folds, int) or n_folds < 2:
        raise DataError(f"n_folds={n_folds!r}: expected an integer >= 2")
    if not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise DataError(f"fold={fold!r} out of range for n_folds={n_folds} (expected 0..{n_folds - 1})")
    train_idx, val_idx = _fold_indices(items, n_folds, seed, stratify, f"n_folds={n_folds}", n_folds)[fold]
    return [items[i] for i in sorted(train_idx)], [items[i] for i in sorted(val_idx)]


def holdout_split(items: Sequence[dict], test_fraction: float, *, seed: int = 0,
                  stratify: bool = True) -> tuple[list[dict], list[dict]]:
    """(train, test), no patient in both, classes balanced between them: one fold of a patient-grouped,
    label-stratified ``k``-fold split (``StratifiedGroupKFold``, shuffled with ``seed``), ``k = round(1 /
    test_fraction)``; above one half the test part is the other ``k - 1`` folds, ``k = round(1 / (1 -
    test_fraction))``. The fraction is thus rounded to ``1/k`` (0.2 -> 1 of 5 folds, 0.3 -> 1 of 3); folds balance
    cases per class, not patients, which a patient-level draw does not (one patient with many cases in the test
    part skews it)."""
    items = list(items)
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction={test_fraction!r}: expected a number in (0, 1)")
    smaller = min(float(test_fraction), 1.0 - float(test_fraction))
    n_folds = max(2, round(1.0 / smaller))
    option = f"test_fraction={test_fraction:g} (1 of {n_folds} patient-grouped folds)"
    patients = len({case_group(it) for it in items})
    if patients < 2:
        raise DataError(f"{option}: needs at least 2 patients, got {patients}")
    rest, held = _fold_indices(items, min(n_folds, patients), seed, stratify, option, 2)[0]
    if test_fraction > 0.5:
        rest, held = held, rest
    return [items[i] for i in sorted(rest)], [items[i] for i in sorted(held)]


# ------------------------------------------------------------------------------------------------------- split report


def split_summary(parts: Mapping[str, Sequence[dict]], *, max_group_share: float = 0.25,
                  min_cases: int = 10) -> tuple[list[dict], list[str]]:
    """One row per part (``train``/``val``/``test``): cases, cases per class, patients (groups), the largest
    group and its share of the part's cases and of each class; and a warning per part where one group holds more
    than ``max_group_share`` of the cases, or of one class's cases (counted only where there are at least
    ``min_cases``: below that a share moves in big steps and would flag every small split).

    A dominant group makes a split's metric mostly the metric of one patient (or slide): measured on a pathology
    split where one slide held 28 of 60 validation patches and 25 of its 31 positives."""
    rows, warnings_ = [], []
    for name, items in parts.items():
        items = list(items or [])
        groups = Counter(case_group(it) for it in items)
        classes: dict[int, Counter] = defaultdict(Counter)
        for item in items:
            key = _stratum(item)
            if key is not None:
                classes[key][case_group(item)] += 1
        largest, held = groups.most_common(1)[0] if groups else (None, 0)
        row = {"part": name, "cases": len(items), "groups": len(groups),
               "classes": " ".join(f"{k}:{sum(c.values())}" for k, c in sorted(classes.items())) or "-",
               "largest_group": largest, "largest_group_cases": held,
               "largest_group_share": held / len(items) if items else None}
        dominated = []
        if len(items) >= min_cases and row["largest_group_share"] > max_group_share:
            dominated.append(f"group {largest} holds {held} of {len(items)} cases ({row['largest_group_share']:.0%})")
        for key, counts in sorted(classes.items()):
            total = sum(counts.values())
            group, in_class = counts.most_common(1)[0]
            row[f"largest_share_class_{key}"] = in_class / total
            if total >= min_cases and in_class / total > max_group_share:
                dominated.append(f"group {group} holds {in_class} of {total} cases of class {key} "
                                 f"({in_class / total:.0%})")
        if dominated:
            warnings_.append(f"split {name}: one group dominates: " + "; ".join(dominated))
        rows.append(row)
    return rows, warnings_


def format_split(rows: Sequence[Mapping]) -> list[str]:
    """The split summary as one console line per part."""
    return [f"split {r['part']}: {r['cases']} cases (classes {r['classes']}), {r['groups']} groups, largest "
            f"{r['largest_group']} with {r['largest_group_cases']} cases"
            + (f" ({r['largest_group_share']:.0%})" if r["largest_group_share"] is not None else "")
            for r in rows]
