"""Bundle config ids: the one-line error a wrong id ends with, and the checks of ``monai.bundle run`` overrides.

The bottom of the bundle interface: :mod:`medtl3d.workflows` (what the bundle configs call), the ``lr-find`` and
``search`` commands and the bundles' analyses use it. :class:`ConfigIdError` is a ``SystemExit`` because MONAI wraps
ordinary exceptions raised inside config expressions; :func:`report_bundle_errors` makes any other error medtl3d
raises, however MONAI wrapped it, end the process with its one line.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from monai.bundle import ConfigParser, scripts

from .errors import Medtl3dError, medtl3d_cause


class ConfigIdError(SystemExit):
    """A bundle config id with an unusable value: the run exits (status 1) printing one line that names the id."""

    def __init__(self, config_id: str, problem: str) -> None:
        self.config_id, self.problem = config_id, problem
        super().__init__(f"medtl3d bundle: config id '{config_id}': {problem}")


# ids check_ids knows, by the type their value must have
_ID_TYPES = {"spatial_dims": int, "in_channels": int, "num_classes": int, "n_folds": int, "fold": int, "epochs": int,
             "batch_size": int, "num_slices": int, "overlap": int, "lr": float}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _check_type(config_id: str, value: Any, expected: type) -> None:
    """Refuse a ``value`` of ``config_id`` that is not of type ``expected`` (bool, int or float; an int is a
    number; null and config expressions/references pass): ``--epochs abc`` arrives from MONAI's CLI as a string."""
    if value is None or (isinstance(value, str) and value[:1] in ("$", "@", "%")):
        return
    accepted = {bool: (bool,), int: (int,), float: (int, float)}[expected]
    if not isinstance(value, accepted) or (expected is not bool and isinstance(value, bool)):
        raise ConfigIdError(config_id, f"expected {_TYPE_NAMES[expected]}, got {value!r}")


def check_overrides(config_files: str | Sequence[str], overrides: Mapping[str, Any]) -> None:
    """Refuse overrides that the config files do not define, naming the closest ids (MONAI adds an unknown id as a
    new entry, so ``--epoch 3`` would train with the default), and values that do not fit a numeric or true/false
    default (``--epochs abc``). Nested ids (``preprocessing#preset_options#size``) are followed level by level; a
    component (a mapping with ``_target_``) may get new arguments."""
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    where = ", ".join(Path(f).name for f in files)
    defined = ConfigParser.load_config_files(files)
    for config_id, value in overrides.items():
        node: Any = defined
        for part in re.split("#|::", config_id):
            if not isinstance(node, dict):
                node = None  # inside a list or a value: MONAI resolves (or refuses) such paths itself
                break
            if part not in node and "_target_" in node:
                node = None  # a new argument of a component (--optimizer#momentum 0.9): its class checks it
                break
            if part not in node:
                close = difflib.get_close_matches(part, [str(k) for k in node if not str(k).startswith("_")], n=3)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                    f"; the ids are listed in {where}"
                raise ConfigIdError(config_id, f"unknown id: {where} define{'s' if len(files) == 1 else ''} no "
                                               f"{part!r}{hint}")
            node = node[part]
        if type(node) in _TYPE_NAMES:
            _check_type(config_id, value, type(node))


def _bundle_run_overrides() -> tuple[str | Sequence[str], dict] | None:
    """The config files and overrides of the ``monai.bundle run`` call that is running this bundle (its CLI or
    the Python function; the innermost when runs nest), or None outside one or when they came in an args file."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is scripts.run.__code__:
            config_file = frame.f_locals.get("config_file")
            return None if config_file is None else (config_file, dict(frame.f_locals.get("override") or {}))
        frame = frame.f_back
    return None


def report_bundle_errors() -> None:
    """From now on, an uncaught error whose cause is a medtl3d error ends the process (status 1) with one line,
    ``medtl3d bundle: <its message>``, instead of MONAI's wrapper traceback; ``MEDTL3D_TRACEBACK=1`` shows the
    traceback. Other errors reach the previous ``sys.excepthook`` unchanged."""
    if getattr(sys.excepthook, "medtl3d_bundle", False):
        return
    previous = sys.excepthook

    def hook(kind, error, traceback) -> None:
        ours = medtl3d_cause(error)
        if ours is None or os.environ.get("MEDTL3D_TRACEBACK"):
            previous(kind, error, traceback)
        else:
            print(f"medtl3d bundle: {' '.join(str(ours).split())}", file=sys.stderr)

    hook.medtl3d_bundle = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def check_component_options(component: str, function: Callable, check: Callable[[dict], Any],
                            error: type[Medtl3dError], *args: Any, **options: Any) -> None:
    """Check, when a bundle builds a procedure component (``search``, ``study``, ``efficiency``, ``lr_find``), the
    options it will later call ``function`` with: they must bind to its signature (a misspelt or missing option is
    otherwise a ``TypeError`` found only when it runs) and pass ``check(arguments)``, defaults applied. A problem
    raises ``error`` starting with the component's id, so its one line says where to look."""
    try:
        bound = inspect.signature(function).bind(*args, **options)
        bound.apply_defaults()
        check(bound.arguments)
    except (TypeError, Medtl3dError) as err:
        raise error(f"{component}: {err}") from None
