"""Case discovery: the cases of a folder (DICOM series grouped by SeriesInstanceUID, NIfTI files, 2D images), each
with a unique id; unreadable entries are skipped with their reason, never fatal."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import pydicom

from medtl3d.errors import DataError, one_line

logger = logging.getLogger("medtl3d.data.io")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Case:
    """One image to load: a DICOM series (``path`` = its folder, ``files`` = its files), a NIfTI file or a 2D image.
    A DICOM case carries its SeriesInstanceUID and StudyInstanceUID (the clinical study its series belongs to: the
    level a CTPA decision is made at, and the group a split keeps whole)."""

    case_id: str
    kind: str  # "dicom" | "nifti" | "image"
    path: Path  # file, or the DICOM folder
    files: tuple[Path, ...] = ()  # the series' DICOM files
    series_uid: str | None = None
    study_uid: str | None = None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def _head(path: Path) -> bytes:
    """The first 132 bytes of ``path`` (enough to recognise DICOM); DataError naming the file when it cannot be
    read (permissions, I/O error)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """The header of ``path`` if its content is DICOM (preamble "DICM", or a raw dataset with an image's Rows and
    Columns), else None. Raises DataError when the file cannot be read or starts like DICOM but the header cannot
    be parsed."""
    head = _head(path)
    if head[128:132] == b"DICM":
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - any parser failure is reported with the file name
            raise DataError(f"{path}: unreadable DICOM header: {type(e).__name__}: {one_line(e)}") from e
    try:  # DICOM without preamble (raw dataset): accept only what parses into an image header
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if isinstance(ds.get("Rows"), int) and isinstance(ds.get("Columns"), int) and "SOPClassUID" in ds:
            return ds
    except Exception:  # noqa: BLE001 - not DICOM
        pass
    return None


def _walk(root: Path, skipped: list[tuple[Path, str]]) -> list[tuple[Path, list[str]]]:
    """(folder, sorted file names) for every folder under ``root``, following folder links without loops or
    duplicates (the rules in :func:`find_cases`); empty folders, folders that cannot be listed and links not
    followed go to ``skipped``."""
    own = {os.path.realpath(folder) for folder, _, _ in os.walk(root)}  # reached without following any link
    scanned: dict[str, Path] = {}  # real path -> the path it was scanned at
    entries = []

    def unlisted(err: OSError) -> None:
        skipped.append((Path(err.filename), f"cannot list folder: {err.strerror or err}"))

    for name, dirs, files in os.walk(root, followlinks=True, onerror=unlisted):
        folder, here = Path(name), os.path.realpath(name)
        if here in scanned:  # a second link to a folder already scanned (or to one of its subfolders)
            dirs.clear()
            skipped.append((folder, f"link to {here}, already scanned as {scanned[here]}"))
            continue
        scanned[here] = folder
        dirs.sort()
        if not dirs and not files:
            skipped.append((folder, "empty folder"))
        for sub in list(dirs):
            link = folder / sub
            if not link.is_symlink():
                continue
            target = os.path.realpath(link)
            if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                reason = f"link to {target}, a folder that encloses it (loop): not followed"
            elif target in own:
                reason = f"link to {target}, inside the input folder: scanned there"
            else:
                continue
            dirs.remove(sub)
            skipped.append((link, reason))
        entries.append((folder, sorted(files)))
    return entries


def _unique_ids(candidates: Sequence[tuple[str, str, str]]) -> list[str]:
    """Case ids from (id, id with extension, relative path) candidates, unique even where the file system ignores
    case (ids name mask files) and independent of the order a folder is listed in: ids that collide ignoring case
    keep their extension (``x.png``, ``x.jpg``); ids that still collide get the first 8 hex digits of their relative
    path's SHA-1 (``x_3f2a9c01``)."""
    ids = [short for short, _, _ in candidates]
    widenings = (lambda short, full, key: full,
                 lambda short, full, key: f"{short}_{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    for widen in widenings:
        counts = Counter(i.casefold() for i in ids)
        ids = [widen(*candidate) if counts[i.casefold()] > 1 else i for i, candidate in zip(ids, candidates)]
    return ids


def find_cases(root: str | Path) -> tuple[list[Case], list[tuple[Path, str]]]:
    """Walk ``root`` recursively and return (cases, skipped).

    DICOM files are recognised by content (not extension) and grouped per folder by SeriesInstanceUID: one case
    per series, with its SeriesInstanceUID and StudyInstanceUID (case_id = folder path relative to ``root`` joined
    by "_", plus ``_<last 8 UID characters>`` when the folder holds several series, or ``_<file stem>`` for one-file
    series); an enhanced multi-frame file is a case on its own. ``.nii``/``.nii.gz`` files and 2D images (``.png .jpg .jpeg .bmp .tif .tiff``) are one case each
    (case_id = relative path without extension). Case ids are unique ignoring case and do not depend on listing
    order: ids that collide keep the file's extension, and if they still collide get a hash of the relative path
    (:func:`_unique_ids`). Everything else is returned in ``skipped`` with the reason:
    empty folders, folders that cannot be listed, files that cannot be read, non-image files, DICOM without image
    data (DICOMDIR, SR, RTSTRUCT, truncated headers), unparseable DICOM headers, and linked folders not followed
    (see below).
    A DICOM whose header parses but whose pixel data is broken is a case that fails in :func:`load_image`.

    Symbolic links to folders are followed (case ids use the link's path), except a link to a folder inside
    ``root`` (scanned at its own path, so no case appears twice), a link to a folder that encloses it (a loop)
    and a second link to a folder already followed; these are listed in ``skipped`` with the reason.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: input folder does not exist")
    skipped: list[tuple[Path, str]] = []
    singles: list[tuple[tuple[str, str, str], Case]] = []  # ((id, id with extension, relative path), case)
    dicom: dict[Path, dict[str, list[tuple[Path, pydicom.Dataset]]]] = defaultdict(lambda: defaultdict(list))

    if root.is_file():
        entries = [(root.parent, [root.name])]
        base = root.parent
    else:
        entries = _walk(root, skipped)
        base = root

    def rel_id(path: Path) -> str:
        rel = path.relative_to(base).as_posix()
        return root.name if rel in ("", ".") else rel.replace("/", "_")

    for folder, files in entries:
        for name in files:
            path = folder / name
            suffix = _suffix(path)
            if suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
                try:
                    _head(path)
                except DataError as e:
                    skipped.append((path, str(e)[len(f"{path}: "):]))
                    continue
                stem = _stem(path) if suffix in NIFTI_SUFFIXES else path.stem
                names = (rel_id(path.parent / stem), rel_id(path), path.relative_to(base).as_posix())
                singles.append((names, Case("", "nifti" if suffix in NIFTI_SUFFIXES else "image", path)))
                continue
            try:
                ds = _dicom_header(path)
            except DataError as e:
                skipped.append((path, str(e)[len(f"{path}: "):]))
                continue
            if ds is None:
                skipped.append((path, "not a DICOM, NIfTI or PNG/JPEG image"))
            elif not ("Rows" in ds and "Columns" in ds):
                sop = getattr(ds.get("SOPClassUID"), "name", "unknown")
                skipped.append((path, f"DICOM without image data (no Rows/Columns; SOP class {sop}): "
                                      "a DICOMDIR, report or truncated header"))
            else:
                dicom[folder][str(ds.get("SeriesInstanceUID", ""))].append((path, ds))

    cases = list(singles)
    for folder, series in dicom.items():
        folder_id = rel_id(folder) if folder != base else (root.stem if root.is_file() else root.name)
        groups: list[tuple[str, list[Path]]] = []
        studies: dict[str, str | None] = {}
        for uid, members in series.items():
            multi = [p for p, ds in members if int(ds.get("NumberOfFrames", 1) or 1) > 1]
            single = [p for p, ds in members if p not in multi]
            groups += [(uid, [p]) for p in multi]
            if single:
                groups.append((uid, single))
            studies[uid] = str(members[0][1].get("StudyInstanceUID", "")) or None
        for uid, files in groups:
            if len(groups) == 1:
                cid = folder_id
            elif len(files) == 1:
                cid = f"{folder_id}_{files[0].stem}"
            else:
                cid = f"{folder_id}_{uid[-8:].strip('.') or 'nouid'}"
            path = files[0] if len(files) == 1 and len(groups) > 1 else folder
            key = f"{path.relative_to(base).as_posix()}#{uid}"
            cases.append(((cid, cid, key), Case("", "dicom", path, tuple(files), uid or None, studies[uid])))

    ids = _unique_ids([names for names, _ in cases])
    out = sorted((replace(c, case_id=i) for i, (_, c) in zip(ids, cases)), key=lambda c: c.case_id)
    logger.info("%s: %d case(s), %d skipped", root, len(out), len(skipped))
    return out, skipped
