"""MONAI's config-security warning: once per process, as medtl3d's one-line explanation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from medtl3d._config_security import EXPLANATION

ROOT = Path(__file__).resolve().parents[1]


def test_monai_config_warning_is_explained_once_per_process(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""
        imports: ["$import medtl3d", "$import medtl3d.workflows"]
        initialize: ["$medtl3d.workflows.check_ids()"]
        run: ["$print('ran')"]
    """))
    # three runs in one process, as a search runs its trials (two with the same config, one with a list of files)
    script = textwrap.dedent(f"""
        import medtl3d.workflows
        from monai.bundle import run
        for files in ({str(config)!r}, {str(config)!r}, [{str(config)!r}]):
            run(config_file=files)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ran") == 3
    assert proc.stderr.count(EXPLANATION) == 1
    assert "_target_\"` value in it is resolved" not in proc.stderr  # MONAI's own message, filtered
