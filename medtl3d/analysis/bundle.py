"""What the bundles' ``analysis.yaml`` calls: the representation analyses of a trained bundle model as extra run ids.

``analysis.yaml`` is merged with ``train.yaml``; :func:`check_analyses` runs first (its
``initialize``), so a wrong analysis name stops with one line naming the ``analyses`` id before any data is loaded;
its ``analysis`` component (:class:`BundleAnalyses`) checks the other options when the config is parsed, then runs
the chosen analyses on the checkpoint ``ckpt_path`` and writes them under ``output_dir`` through the same report
functions as ``medtl3d analyze`` (:mod:`medtl3d.analysis.cli`):

=============  ========================================================================  ======================
analysis       what is written                                                           tasks
=============  ========================================================================  ======================
``weights``    ``weights.*``: per-unit L2 distance / cosine of initial vs final weights  all
``reinit``     ``reinit.*``: each unit reset to its initial (``reinit``) or fresh random  all
               (``rerand``) weights, the task's key metric re-evaluated (AUROC, per
               series for CTPA; Dice for segmentation)
``cka``        ``debiased_cka.*``: layer x layer debiased CKA, initial vs final model,    all
               at the backbone's (the U-Net encoder's) cut points
``probes``     ``probes.*``: kNN and linear probes per cut point of the final and the    binary, multiclass
               initial model, fitted on the training split
``gradcam``    ``gradcam/``: Grad-CAM overlays of the first cases (PNG; NIfTI in 3D),     binary, multiclass,
               for CTPA the highest-scoring window of each series                         multilabel
=============  ========================================================================  ======================

Segmentation has no image-level label to probe and no class logit to explain, so ``probes`` and ``gradcam`` do not
apply there. Every report is CSV + JSON + Markdown + PNG (:mod:`medtl3d.reporting`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from monai.data import DataLoader

from .. import engine
from ..config_ids import ConfigIdError
from ..data.datalists import image_stem
from ..errors import AnalysisError, Medtl3dError
from ..inference import load_network
from ..reporting import write_curves
from ._registry import get_analysis
from .activations import POLICIES
from .probes import probe_cut_points
from .reinit import MODES
from .reports import gradcam_report, initial_model, reinit_report, similarity_report, weights_report

ANALYSES = ("weights", "reinit", "cka", "probes", "gradcam")
_CLASSIFIER_ONLY = {"probes": ("binary", "multiclass"), "gradcam": ("binary", "multiclass", "multilabel")}


def check_analyses(analyses: Sequence[str], task: str) -> bool:
    """Each name in ``analyses`` must be known and apply to ``task``; else one line naming the ``analyses`` id."""
    if isinstance(analyses, str) or not isinstance(analyses, Sequence):
        raise ConfigIdError("analyses", f"must be a list of analysis names from {', '.join(ANALYSES)}; "
                                        f"got {analyses!r}")
    for name in analyses:
        if name not in ANALYSES:
            raise ConfigIdError("analyses", f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
        if task not in _CLASSIFIER_ONLY.get(name, (task,)):
            raise ConfigIdError("analyses", f"{name!r} does not apply to task {task!r} (only to "
                                            f"{', '.join(_CLASSIFIER_ONLY[name])})")
    return True


def _loader(data, batch_size: int):
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)


def _case(sample: dict) -> str:
    """A file-name-safe case id: the image's file name (``id`` is its path), or ``<series>_w<window>``."""
    if "series" in sample:
        return f"{image_stem(sample['series'])}_w{int(sample['window'])}"
    return image_stem(sample.get("id", "case"))


def _cam_cases(model: torch.nn.Module, data, cases: int, series_key: str | None):
    """The cases to explain: the first ``cases`` samples, or with ``series_key`` the highest-scoring window of each
    of the first ``cases`` series (the window a series' max aggregation takes)."""
    indices = list(range(min(cases, len(data))))
    if series_key is not None:
        best: dict[str, tuple[float, int]] = {}
        device = next(model.parameters()).device
        with torch.no_grad():
            for index in range(len(data)):
                sample = data[index]
                series = str(sample[series_key])
                if series not in best and len(best) == cases:
                    continue
                score = float(model(torch.as_tensor(sample["image"])[None].float().to(device)).max())
                if series not in best or score > best[series][0]:
                    best[series] = (score, index)
        indices = [index for _, index in best.values()]
    for index in indices:
        sample = data[index]
        label = torch.as_tensor(sample["label"]).tolist() if "label" in sample else None
        yield _case(sample), sample["image"], label, None


def _probes(model, initial, train_data, data, output, cuts, batch_size: int) -> Path:
    rows = []
    for weights, network in (("final", model), ("initial", initial)):
        for row in probe_cut_points(network, _loader(train_data, batch_size), _loader(data, batch_size), cuts,
                                    batch_size=batch_size):
            rows.append({"weights": weights, "curve": f"{row['probe']} ({weights})", **row})
    return write_curves(output, "probes", rows, "cut", ["accuracy", "auroc"], {"cuts": cuts},
                        title="layer-wise probes: final vs initial weights", group="curve")["png"]


class BundleAnalyses:
    """The analyses ``analyses`` of the checkpoint ``ckpt_path`` (its trained weights, the ``initial_state``
    fine-tuning started from, its ``model_config``) on ``data`` (the val or test split), as the bundles' ``analysis``
    component (``run: ["$@analysis.run()"]``). Every option is checked here, so a wrong one stops while the config
    is parsed, with one line naming its id (the component's arguments carry the ids' names). ``train_data`` (the
    training split, eval transform) fits the probes; ``series_key``/``aggregation`` make the metric of ``reinit``
    per series (CTPA windows). CKA flattens each map by ``cka_policy``: ``pooled`` (global average, one feature
    per channel) by default, since flattened maps of a full-size backbone would need more memory than the exact
    estimator may hold (``flatten`` with a small ``cka_spatial_size`` keeps some spatial layout)."""

    def __init__(self, ckpt_path: str, data, *, analyses: Sequence[str], task: str, output_dir: str,
                 train_data=None, cuts="block", cam_cases: int = 4, cam_method: str = "gradcam",
                 cam_cut: str | None = None, reinit_modes: Sequence[str] = MODES, cka_policy: str = "pooled",
                 cka_spatial_size: int | None = None, batch_size: int = 8, device: str = "cpu",
                 series_key: str | None = None, aggregation: str = "max") -> None:
        check_analyses(analyses, task)
        if "probes" in analyses and train_data is None:
            raise ConfigIdError("analyses", "'probes' needs the training split (train_data) to fit the probes on")
        if "gradcam" in analyses:
            try:
                get_analysis("attribution", cam_method)
            except AnalysisError as err:
                raise ConfigIdError("cam_method", str(err)) from None
        if "reinit" in analyses and (not reinit_modes or set(reinit_modes) - set(MODES)):
            raise ConfigIdError("reinit_modes", f"give one or more of {', '.join(MODES)}; got {reinit_modes!r}")
        if "cka" in analyses and cka_policy not in POLICIES:
            raise ConfigIdError("cka_policy", f"unknown policy {cka_policy!r}; choose one of {', '.join(POLICIES)}")
        for name, value in (("cam_cases", cam_cases if "gradcam" in analyses else 1), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigIdError(name, f"must be an integer >= 1, got {value!r}")
        self.ckpt_path, self.data, self.analyses, self.task = ckpt_path, data, list(analyses), task
        self.output, self.train_data, self.cuts, self.batch_size, self.device = (
            Path(output_dir), train_data, cuts, batch_size, device)
        self.cam = {"cases": cam_cases, "method": cam_method, "cut": cam_cut}
        self.reinit_modes, self.cka_policy, self.cka_spatial_size = reinit_modes, cka_policy, cka_spatial_size
        self.series_key, self.aggregation = series_key, aggregation

    def evaluate(self, network: torch.nn.Module) -> float:
        """The task's key metric of ``network`` on the data (per series with ``series_key``)."""
        return engine.evaluate(network, self.data, task=self.task, batch_size=self.batch_size, device=self.device,
                               series_key=self.series_key, aggregation=self.aggregation
                               ).metrics[engine.default_key_metric(self.task)]

    def run(self) -> dict[str, str]:
        """Run the analyses in order; returns the report written for each (under ``output_dir``)."""
        ckpt_path, data, output, batch_size = self.ckpt_path, self.data, self.output, self.batch_size
        model = load_network(ckpt_path).to(self.device)
        written = {}
        for name in dict.fromkeys(self.analyses):
            try:
                if name == "weights":
                    where = weights_report(model, ckpt_path, output)
                elif name == "reinit":
                    where = reinit_report(model, ckpt_path, self.evaluate, output,
                                          engine.default_key_metric(self.task), modes=self.reinit_modes,
                                          metadata={"task": self.task, "series_key": self.series_key})
                elif name == "cka":
                    where = similarity_report(initial_model(model, ckpt_path), model, _loader(data, batch_size),
                                              output, ("initial", "final"), cuts=self.cuts, policy=self.cka_policy,
                                              spatial_size=self.cka_spatial_size, batch_size=batch_size,
                                              metadata={"checkpoint": str(ckpt_path)})
                elif name == "probes":
                    where = _probes(model, initial_model(model, ckpt_path), self.train_data, data, output,
                                    self.cuts, batch_size)
                else:
                    where = gradcam_report(model, _cam_cases(model, data, self.cam["cases"], self.series_key),
                                           output / "gradcam", method=self.cam["method"], cut=self.cam["cut"],
                                           metadata={"checkpoint": str(ckpt_path)},
                                           title=f"{self.cam['method']} of {Path(ckpt_path).name}")
            except Medtl3dError as err:
                raise ConfigIdError("analyses", f"{name}: {err}") from None
            written[name] = str(where)
            print(f"medtl3d: {name} -> {where}")
        return written
