"""The ``medtl3d`` console script: zoo listing, cut-point tables, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medtl3d.backbones import list_backbones
from medtl3d.cli import main


def test_backbones_lists_the_whole_zoo(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in list_backbones():
        assert f"\n{name} " in out
    assert "resnext3d_101" in out and "3D" in out


def test_backbone_cut_point_table(capsys):
    assert main(["backbones", "resnet50", "--level", "layer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet50 (2D, 3 input channels): 16 cut points")
    layer35 = next(line.split() for line in lines if line.startswith("layer3.5 "))
    assert layer35 == ["layer3.5", "layer", "1024", "16", "8.543"]


def test_unknown_backbone_is_one_line_error(capsys):
    assert main(["backbones", "resnet51"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtl3d: error: unknown backbone 'resnet51'") and "resnet50" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "medtl3d"
    assert script.exists(), "run `pip install -e .` (scripts/test.sh does) to get the console script"
    out = subprocess.run([str(script), "backbones", "resnext3d_101", "--level", "block"], check=True,
                         capture_output=True, text=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert list(rows) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert rows["stem"][:3] == ["block", "64", "2x4x4"]
    assert rows["layer4"][:3] == ["block", "2048", "16x32x32"]


def test_cut_point_table_shows_aliases_of_one_unit_on_one_row(capsys):
    assert main(["backbones", "mobilenet_v2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mobilenet_v2 (2D, 3 input channels): 26 cut points")
    rows = [line.split("  ")[0].strip() for line in lines[3:]]
    assert "stage1 = features.1" in rows and "features.1" not in rows and "stage1" not in rows
    assert "features.2" in rows and "stem" in rows  # a unit with one cut keeps its plain name
    assert len(rows) == 19  # 26 cut points on 19 units


def test_cut_point_table_of_a_timm_model(capsys):
    assert main(["backbones", "timm/resnet18d", "--level", "block"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("timm/resnet18d (2D, 3 input channels): 5 cut points")
    assert [line.split()[0] for line in lines[3:]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
