"""The real MVTec AD dataset: verified download, safe streaming extraction, local folders.

Two sources end in the same place, an MVTec-layout directory ``dest/<category>/...`` holding
only the requested categories:

- :func:`prepare_mvtec` (``data.source: mvtec``) downloads the official archive with HTTP
  Range resume, verifies its pinned SHA-256 and extracts the requested categories straight from
  the xz stream, refusing any member that could write outside the target.
- :func:`link_folder` (``data.source: folder``) validates an existing MVTec-layout directory
  and hard-links its images and masks into ``dest`` (no copy of the image data).

Either way the result is built in a temporary directory next to ``dest`` and renamed into place,
so a failure never leaves a partial dataset directory behind.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import lzma
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, Sequence

from tqdm import tqdm

from vitad import __version__
from vitad.core.cli import StageError
from vitad.core.data import DatasetError, index_category, load_mask
from vitad.core.io import remove_stale_temporaries

MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
# Resumed requests allowed in one call; each must bring new bytes, so a dead link fails at once.
MAX_ATTEMPTS = 20
# Hard links are impossible across filesystems (EXDEV) and on some filesystems (EPERM, EMLINK,
# ENOTSUP): copy then.
LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


class DownloadError(StageError):
    """The archive could not be downloaded or does not match its pinned SHA-256 (a StageError:
    stages report it as one line)."""


def prepare_mvtec(dest: Path, categories: Sequence[str], url: str, sha256: str, archive: Path) -> None:
    """Materialise ``dest/<category>`` for each requested category from the official archive.

    ``archive`` is used as is when it exists and matches ``sha256`` (a copy downloaded by hand
    goes there); otherwise ``url`` is downloaded to ``archive.part`` (resumed with HTTP Range
    after an interruption, also across runs), verified, and renamed to ``archive``. A download
    with the wrong hash is deleted. An existing ``archive`` with the wrong hash is an error and
    is left alone (it may be the user's own file). ``dest`` is replaced as a whole on success
    and untouched on failure.
    """
    dest, archive = Path(dest), Path(archive)
    categories = _checked_categories(categories)
    expected_sha256 = _checked_sha256(sha256)
    if expected_sha256 == MVTEC_SHA256:
        # Fail before a 4.9 GB download when a name cannot be in the official archive.
        unknown = [name for name in categories if name not in MVTEC_CATEGORIES]
        if unknown:
            raise DatasetError(
                f"data.categories: {', '.join(unknown)} not in MVTec AD "
                f"(categories: {', '.join(MVTEC_CATEGORIES)})"
            )
    if dest.resolve() in archive.resolve().parents:
        raise DatasetError(
            f"data.mvtec.archive: {archive} lies inside the dataset directory {dest}, which is "
            "replaced on every run; keep the archive elsewhere"
        )
    if archive.is_dir():
        raise DatasetError(f"data.mvtec.archive: {archive} is a directory; it must name the .tar.xz file")

    if archive.exists():
        actual_sha256 = file_sha256(archive)
        if actual_sha256 != expected_sha256:
            raise DownloadError(
                f"{archive}: SHA-256 {actual_sha256} does not match data.mvtec.sha256 "
                f"{expected_sha256}: it is not the official archive or it is corrupted. Replace it "
                "with a good copy, or delete it to download it again from data.mvtec.url."
            )
    else:
        download_verified(url, archive, expected_sha256)
    extract_categories(archive, dest, categories)


def download_verified(url: str, archive: Path, expected_sha256: str) -> None:
    """Download ``url`` to ``archive`` via ``archive.part`` (resumable); rename only when the
    SHA-256 matches, delete the download when it does not."""
    archive = Path(archive)
    part = archive.with_name(archive.name + ".part")
    archive.parent.mkdir(parents=True, exist_ok=True)
    _download_resumable(url, part, archive)
    actual_sha256 = file_sha256(part)
    if actual_sha256 != expected_sha256:
        part.unlink()
        raise DownloadError(
            f"{url}: the downloaded file has SHA-256 {actual_sha256}, expected {expected_sha256} "
            f"(data.mvtec.sha256); it was deleted. The link may now serve something else. "
            f"{_manual_hint(archive)}"
        )
    os.replace(part, archive)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks with a progress bar."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle, _byte_bar(path.stat().st_size, 0, f"sha256 {path.name}") as bar:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def extract_categories(archive: Path, dest: Path, categories: Sequence[str]) -> None:
    """Stream ``archive`` (tar.xz) once and extract only ``<category>/...`` members into ``dest``.

    Every member of the archive is checked, extracted or not: absolute names, ``..`` parts,
    device files and fifos, and links whose target leaves the link's own category are refused
    with an error naming the member. Extraction also goes through tarfile's ``data`` filter.
    """
    archive, dest = Path(archive), Path(dest)
    wanted = set(_checked_categories(categories))
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        top_level_dirs: set[str] = set()
        extracted: set[str] = set()
        with open(archive, "rb") as raw, _byte_bar(archive.stat().st_size, 0, f"extract {archive.name}") as bar:
            try:
                with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|xz") as stream:
                    for member in stream:
                        parts = _safe_member_parts(member, archive)
                        if not parts:
                            continue
                        if member.isdir() or len(parts) > 1:
                            top_level_dirs.add(parts[0])
                        if parts[0] in wanted:
                            member.name = "/".join(parts)
                            stream.extract(member, build_dir, filter="data")
                            extracted.add(parts[0])
            except (tarfile.TarError, lzma.LZMAError, EOFError) as error:
                raise DatasetError(f"{archive}: cannot be read as a tar.xz archive ({error})") from error
        missing = sorted(wanted - extracted)
        if missing:
            raise DatasetError(
                f"{archive}: no {', '.join(missing)} in the archive (it holds: "
                f"{', '.join(sorted(top_level_dirs)) or 'nothing'}); check data.categories"
            )
        _move_into_place(build_dir, dest)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir)


def link_folder(source: Path | None, dest: Path, categories: Sequence[str]) -> None:
    """Validate an MVTec-layout directory and hard-link its images and masks into ``dest``.

    Validation: the layout of :func:`vitad.core.data.index_category` (training images, test images,
    a mask for every defective test image) and every mask decodes to its image's size. Only the
    files the index references are linked, so ``dest`` indexes exactly like ``source``. Across
    filesystems, or where hard links are unsupported, files are copied with a warning. ``dest``
    is replaced as a whole on success and untouched on failure.
    """
    if source is None or not Path(source).is_dir():
        raise DatasetError(f"data.folder.path: {source} is not a directory (an MVTec-layout dataset)")
    source, dest = Path(source), Path(dest)
    categories = _checked_categories(categories)
    if source.resolve() == dest.resolve() or dest.resolve() in source.resolve().parents:
        raise DatasetError(
            f"data.folder.path: {source} is or lies inside the pipeline's dataset directory {dest}, "
            "which is replaced on every run; point it at a directory outside it"
        )
    relative_paths: list[str] = []
    for category in categories:
        samples = index_category(source, category)
        for sample in samples:
            relative_paths.append(sample.image_path)
            if sample.mask_path is not None:
                load_mask(source / sample.mask_path, sample.original_size)
                relative_paths.append(sample.mask_path)

    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        warned_about_copy = False
        for relative_path in relative_paths:
            target = build_dir / relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative_path, target)
            except OSError as error:
                if error.errno not in LINK_FALLBACK_ERRNOS:
                    raise
                if not warned_about_copy:
                    print(
                        f"warning: cannot hard-link {source} into {dest} ({error.strerror}); "
                        "copying the images instead, which uses disk space",
                        file=sys.stderr,
                    )
                    warned_about_copy = True
                shutil.copy2(source / relative_path, target)
        _move_into_place(build_dir, dest)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir)


def _download_resumable(url: str, part: Path, archive: Path) -> None:
    """GET ``url`` into ``part``, resuming from its current size with a Range request.

    Retries at once while each attempt brings new bytes (a dropped connection); an attempt that
    brings nothing is a failure that keeps ``part`` for a later resume.
    """
    for _ in range(MAX_ATTEMPTS):
        offset = part.stat().st_size if part.exists() else 0
        try:
            if _fetch_from(url, part, offset):
                return
            failure = "the connection closed before the end of the file"
        except urllib.error.HTTPError as error:
            if error.code == 416 and offset:
                return  # nothing left to fetch past `offset`: the hash check judges the file
            raise DownloadError(
                f"could not download {url} (HTTP {error.code} {error.reason}). {_manual_hint(archive)}"
            ) from error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            failure = str(getattr(error, "reason", error))
        size = part.stat().st_size if part.exists() else 0
        if size <= offset:
            kept = f" The {size} bytes received so far are kept in {part}; run again to resume." if size else ""
            raise DownloadError(f"could not download {url} ({failure}).{kept} {_manual_hint(archive)}")
    raise DownloadError(
        f"could not download {url}: still incomplete after {MAX_ATTEMPTS} resumed requests; "
        f"{part} is kept, run again to resume. {_manual_hint(archive)}"
    )


def _fetch_from(url: str, part: Path, offset: int) -> bool:
    """One GET of ``url`` from byte ``offset`` into ``part``; True when the whole body arrived.

    Appends when the server answers 206 from ``offset``; restarts the file when it ignores the
    Range header (200). ``http.client`` returns b"" on a connection closed early, so completeness
    is checked against Content-Length here.
    """
    headers = {"User-Agent": f"vitad/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        content_range = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        resumed = response.status == 206 and content_range is not None and int(content_range[1]) == offset
        start = offset if resumed else 0
        body_length = response.headers.get("Content-Length")
        total = start + int(body_length) if body_length is not None else None
        with open(part, "ab" if resumed else "wb") as out, _byte_bar(total, start, f"download {part.name}") as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    return total is None or part.stat().st_size >= total


def _manual_hint(archive: Path) -> str:
    return (
        f"To install it by hand, download mvtec_anomaly_detection.tar.xz from {MVTEC_PAGE} and put "
        f"it at {archive} (params.yaml data.mvtec.archive, which may also name a copy you already "
        "have); or set data.mvtec.url to the archive's current link."
    )


def _safe_member_parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    """Path components of a member's name ("./" and empty parts dropped); raises DatasetError
    naming the member when extracting it could escape the target directory."""
    name = member.name
    if name.startswith("/") or PureWindowsPath(name).drive:
        raise DatasetError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise DatasetError(f"{archive}: member {name!r} contains '..'; refusing to extract")
    if member.ischr() or member.isblk() or member.isfifo():
        raise DatasetError(f"{archive}: member {name!r} is a device file or fifo; refusing to extract")
    if member.issym() or member.islnk():
        if member.linkname.startswith("/"):
            raise DatasetError(
                f"{archive}: link {name!r} -> {member.linkname!r} is absolute; refusing to extract"
            )
        # Symlink targets are relative to the link's directory, hard-link targets to the root.
        base = posixpath.dirname("/".join(parts)) if member.issym() else ""
        target_parts = posixpath.normpath(posixpath.join(base, member.linkname)).split("/")
        if not parts or target_parts[0] != parts[0] or ".." in target_parts:
            raise DatasetError(
                f"{archive}: link {name!r} -> {member.linkname!r} points outside its category; "
                "refusing to extract"
            )
    elif not (member.isreg() or member.isdir()):
        raise DatasetError(f"{archive}: member {name!r} has unsupported tar type {member.type!r}")
    return parts


def _checked_categories(categories: Sequence[str]) -> list[str]:
    if isinstance(categories, str) or not categories:
        raise DatasetError(f"data.categories: expected a non-empty list of names, got {categories!r}")
    for name in categories:
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DatasetError(f"data.categories: {name!r} is not a plain directory name")
    return sorted(set(categories))


def _checked_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise DatasetError(f"data.mvtec.sha256: expected 64 hex digits, got {sha256!r}")
    return sha256.lower()


def _move_into_place(build_dir: Path, dest: Path) -> None:
    """Rename ``build_dir`` onto ``dest``; a previous ``dest`` is moved aside first, then deleted."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(build_dir, dest)
        return
    stale_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, stale_dir / dest.name)
    os.rename(build_dir, dest)
    shutil.rmtree(stale_dir)


def _byte_bar(total: int | None, initial: int, description: str) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=description, unit="B", unit_scale=True,
        unit_divisor=1024, mininterval=1.0, file=sys.stderr,
    )


class _ProgressReader:
    """Read-only file wrapper that advances a progress bar by the (compressed) bytes read."""

    def __init__(self, raw: BinaryIO, bar: tqdm):
        self._raw = raw
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._bar.update(len(chunk))
        return chunk
