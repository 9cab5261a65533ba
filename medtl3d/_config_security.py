"""MONAI's config-security warning, once per process and in one line.

``monai.bundle`` warns on every workflow it creates (each ``monai.bundle run`` call, so every trial of a search)
that parsing a config evaluates its ``$`` expressions and calls its ``_target_``s, in a long message. For medtl3d's
bundles that is by design (the README: bundle YAML is code). Once :func:`explain_config_security` has run (on
importing ``medtl3d.workflows``), the first such warning is shown as :data:`EXPLANATION` and the later ones not at
all. A plain ``python -m monai.bundle run`` warns before the config, and so medtl3d, is loaded: it shows MONAI's
message, once; ``medtl3d`` commands and searches show ours.
"""

from __future__ import annotations

import re
import sys
import warnings

# the start of the message of monai.bundle.scripts.create_workflow (MONAI >= 1.5)
MONAI_MESSAGE = re.compile(r"parsing config_file .*: any `\"_target_\"` value in it is resolved")
EXPLANATION = ("medtl3d: bundle configs are code (MONAI evaluates their `$` expressions and calls their `_target_`s):"
               " run only configs you trust")


def explain_config_security() -> None:
    """Route MONAI's config-security warning through :data:`EXPLANATION`, shown once per process (other warnings
    reach the previous ``warnings.showwarning`` unchanged)."""
    previous = warnings.showwarning
    if getattr(previous, "medtl3d_config_security", False):
        return
    explained = []

    def show(message, category, filename, lineno, file=None, line=None):
        if not MONAI_MESSAGE.match(str(message)):
            previous(message, category, filename, lineno, file, line)
        elif not explained:
            explained.append(True)
            print(EXPLANATION, file=sys.stderr)

    show.medtl3d_config_security = True  # type: ignore[attr-defined]
    warnings.showwarning = show
