"""The main job (``bash scripts/demo.sh`` runs ``scripts/demo.py``) end to end at tiny settings: it writes the study
report with all five claims, and a re-run trains nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _demo(output: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--output", str(output), "--cases",
                           "64", "--size", "32", "--epochs", "1", "--folds", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_demo_writes_the_study_report_and_a_rerun_trains_nothing(tmp_path):
    first = _demo(tmp_path)
    assert "(12 trials trained, 0 reused)" in first  # WT, RI, TTL at 2 cuts + their RI controls, x 2 folds
    report = json.loads((tmp_path / "study_report.json").read_text())
    assert [claim["claim"] for claim in report["claims"]] == [1, 2, 3, 4, 5]
    assert {row["label"] for row in report["rows"]} >= {"full", "random", "truncate@stage2", "RI-truncate@stage5"}
    for name in ("study_report.md", "study_report.csv", "study_score_cost.png", "study_cka.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "(0 trials trained, 12 reused)" in _demo(tmp_path)
