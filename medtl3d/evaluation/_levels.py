"""Study-level evaluation: per-series predictions aggregated to the clinical study they belong to.

A CTPA study (one StudyInstanceUID) can hold several series (reconstructions, phases); the radiologist's decision
is per study. :func:`aggregate_studies` turns series rows into study rows: the label is "any series positive"
(per finding for multi-label), the probability the ``aggregation`` (max or mean) of its series' probabilities, as
windows are aggregated to series (:func:`medtl3d.engine.aggregate_series`, which does both). :class:`StudyLevel`
(``evaluate#study`` in the bundles) knows which study each evaluated series belongs to, on the test and the
validation split, so the report handler can write the full case-level report at study level with a threshold
chosen on validation studies.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from ..engine import aggregate_series
from ..errors import EvaluationError
from ..provenance import dataset_items

STUDY_TASKS = ("binary", "multilabel")


def aggregate_studies(rows: Sequence[dict], studies: Mapping[str, str], aggregation: str = "max") -> list[dict]:
    """One row ``{id, label, probabilities, series}`` per study (in order of first appearance) from series rows
    ``{id, label, probabilities}``: label the maximum of its series' labels (any positive), probabilities their
    ``aggregation`` (max or mean), ``series`` how many series it holds. ``studies`` maps each series id to its
    study."""
    if not rows:
        raise EvaluationError("no series predictions to aggregate to studies")
    unmapped = [row.get("id") for row in rows if row.get("id") not in studies]
    if unmapped:
        raise EvaluationError(f"{len(unmapped)} of {len(rows)} series have no study (e.g. {unmapped[:2]})")
    ids = [studies[row["id"]] for row in rows]
    try:
        probabilities = np.array([np.ravel(row["probabilities"]) for row in rows], dtype=float)
        labels = np.array([np.ravel(row["label"]) for row in rows], dtype=float)
    except (KeyError, ValueError) as err:
        raise EvaluationError(f"series rows need 'label' and 'probabilities' of one shape ({err})") from None
    names, study_scores = aggregate_series(probabilities, ids, aggregation)
    _, study_labels = aggregate_series(labels, ids, "max")
    scalar = not isinstance(rows[0]["label"], (list, tuple, np.ndarray))
    counts = Counter(ids)
    return [{"id": name,
             "label": int(study_labels[i, 0]) if scalar else [int(v) for v in study_labels[i].tolist()],
             "probabilities": study_scores[i].tolist(), "series": counts[name]}
            for i, name in enumerate(names)]


def _series_studies(dataset, key: str, what: str) -> dict[str, str]:
    """``{series id: study}`` of an evaluated dataset: a :class:`~medtl3d.data.windows.WindowDataset` (series ids
    as it emits them) or a MONAI dataset of items with an ``id``. Empty when no item names a study; an error
    naming the first item without one when only some do, or a series given two studies."""
    items = dataset_items(dataset)
    if items is None:
        raise EvaluationError(f"{what}: {type(dataset).__name__} exposes no items to read {key!r} from")
    ids = getattr(dataset, "series", None) or [str(item.get("id")) for item in items]
    with_study = [item.get(key) not in (None, "") for item in items]
    if not any(with_study):
        return {}
    if not all(with_study):
        first = items[with_study.index(False)]
        raise EvaluationError(f"{what}: item {first.get('image', first.get('id'))} has no {key!r} while "
                              f"{sum(with_study)} of {len(items)} items do; give every series its study")
    studies: dict[str, str] = {}
    for series, item in zip(ids, items):
        study = str(item[key])
        if studies.setdefault(series, study) != study:
            raise EvaluationError(f"{what}: series {series} is given two studies ({studies[series]}, {study})")
    return studies


class StudyLevel:
    """Which study each series of the test split (``test_data``) and of the validation split (``val_data``)
    belongs to: the items' ``key`` field (the bundles' ``study_key``; a datalist's ``study``, e.g. the
    StudyInstanceUID). :meth:`test` / :meth:`validation` aggregate series rows to study rows by ``aggregation``.
    :attr:`active` is False when no test item names a study (the report then stays at series level)."""

    def __init__(self, key: str, test_data, val_data=None, *, aggregation: str = "max") -> None:
        if not isinstance(key, str) or not key:
            raise EvaluationError(f"study_key={key!r}: expected the name of the items' study field")
        self.key, self.aggregation = key, aggregation
        self.test_studies = _series_studies(test_data, key, "test_data")
        self.val_studies = _series_studies(val_data, key, "val_data") if val_data is not None else {}

    @property
    def active(self) -> bool:
        return bool(self.test_studies)

    def test(self, rows: Sequence[dict]) -> list[dict]:
        return aggregate_studies(rows, self.test_studies, self.aggregation)

    def validation(self, rows: Sequence[dict]) -> list[dict]:
        if not self.val_studies:
            raise EvaluationError(f"val_data: no item has {self.key!r}, so no threshold can be chosen on "
                                  "validation studies")
        return aggregate_studies(rows, self.val_studies, self.aggregation)
