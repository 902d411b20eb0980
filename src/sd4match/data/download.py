"""Fetch the benchmarks from their published addresses into the official layouts.

Each dataset is a list of ``Source`` items. A source is downloaded to
``<root>/.sd4match-downloads/<name>.part`` (resumed with an HTTP Range request when a
partial file exists), its size and SHA-256 are verified, and it is renamed to its final
name. Archives are extracted into a fresh ``<root>/.sd4match-extract-*`` folder and
checked for the entries their source expects (an archive that cannot be read or holds
something else is removed, nothing of it placed or recorded), then their entries are moved
into place; the extraction folder is removed last. A crash
therefore leaves that folder behind, and ``sd4match datasets check`` refuses a root that
has one, so a half-extracted tree never passes. A finished source is recorded in
``<root>/.sd4match-downloads/done.json``; a second run skips it (idempotent).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal, Sequence

from sd4match.data.cub import CUB200
from sd4match.data.pfpascal import PFPascal
from sd4match.data.pfwillow import PFWillow
from sd4match.data.spair import SPair71k
from sd4match.errors import Sd4MatchError
from sd4match.fileio import atomic_path, atomic_write_text, file_sha256

DOWNLOAD_DIR = ".sd4match-downloads"
EXTRACT_PREFIX = ".sd4match-extract-"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file to fetch.

    Attributes:
        url: address.
        filename: name it is stored under.
        kind: ``file`` (moved to ``dest``), ``zip`` or ``tar`` (extracted).
        dest: for ``file``, its path under root; for archives, the folder under root
            that receives the archive's entries.
        strip: leading folder of the archive to drop (``SPair-71k`` puts its content
            directly under root).
        pick: for archives, only entries whose name (after ``strip``) matches one of
            these glob patterns are kept; empty keeps all.
        flatten: keep only the file name of each picked entry.
        expect: paths (under ``dest``) the archive must provide; an archive without them
            (another file served under the same name) is removed before anything of it
            is put in place or recorded as done.
        size, sha256: expected values; None where they are not pinned, in which case
            the size is checked against the server's Content-Length and the computed
            SHA-256 is recorded in ``done.json``.
    """

    url: str
    filename: str
    kind: Literal["file", "zip", "tar"]
    dest: str = "."
    strip: str = ""
    pick: tuple[str, ...] = ()
    flatten: bool = False
    expect: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None


#: Published addresses (those the official SD4Match code fetches). Checksums are not
#: pinned yet: nothing here could reach these servers when this table was written.
SOURCES: dict[str, tuple[Source, ...]] = {
    "spair": (
        Source("https://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz", "SPair-71k.tar.gz", "tar", strip="SPair-71k",
               expect=SPair71k.required),
    ),
    "pfpascal": (
        Source("https://www.di.ens.fr/willow/research/proposalflow/dataset/PF-dataset-PASCAL.zip", "PF-dataset-PASCAL.zip", "zip",
               expect=PFPascal.required),
        Source(
            "https://www.robots.ox.ac.uk/~xinghui/sd4match/pf-pascal_image_pairs.zip",
            "pf-pascal_image_pairs.zip",
            "zip",
            pick=("*_pairs.csv",),
            flatten=True,
            expect=("test_pairs.csv",),
        ),
    ),
    "pfwillow": (
        Source("https://www.di.ens.fr/willow/research/proposalflow/dataset/PF-dataset.zip", "PF-dataset.zip", "zip", expect=PFWillow.required),
        Source("https://www.robots.ox.ac.uk/~xinghui/sd4match/test_pairs.csv", "test_pairs.csv", "file", dest="test_pairs.csv"),
    ),
    # the SPair-U annotations alone (Jamais Vu's README); the pictures are SPair-71k's (--images, or link JPEGImages/ in)
    "spair-u": (
        Source("https://groups.inf.ed.ac.uk/hbilen-data/data/JamaisVuData/SPair-U.zip", "SPair-U.zip", "zip", strip="datasets/SPair-U",
               expect=("PairAnnotation/test",)),
    ),
    "cub": (
        Source("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz", "tar", strip="CUB_200_2011",
               expect=CUB200.required),
    ),
}


class DownloadError(Sd4MatchError):
    pass


class WrongArchive(DownloadError):
    """The fetched file is not the archive its source expects (unreadable, or other content)."""


def download(
    name: str,
    root: str | Path,
    *,
    sources: Sequence[Source] | None = None,
    mirror: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch, verify and extract dataset ``name`` into ``root``; return ``root``.

    Args:
        name: ``spair``, ``pfpascal`` or ``pfwillow``.
        root: the dataset root (DESIGN.md), created if missing.
        sources: override the published sources (tests serve their own).
        mirror: fetch every file as ``<mirror>/<filename>`` instead of its published
            address (a local copy or an institute mirror); checksums still apply.
        progress: show a progress bar on stderr.
        timeout: seconds without data before a request fails.
    """
    if sources is None:
        if name not in SOURCES:
            raise DownloadError(f"no download known for dataset {name!r}; known: {', '.join(SOURCES)}")
        sources = SOURCES[name]
    if mirror:
        sources = [replace(s, url=f"{mirror.rstrip('/')}/{s.filename}") for s in sources]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dl = root / DOWNLOAD_DIR
    dl.mkdir(exist_ok=True)
    done_path = dl / "done.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for stale in root.glob(EXTRACT_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)  # an interrupted extraction: start it again
    for src in sources:
        if src.filename in done and done[src.filename].get("url") == src.url:
            continue
        archive = fetch(src, dl, progress=progress, timeout=timeout)
        digest = file_sha256(archive)
        if src.sha256 and digest != src.sha256:
            archive.unlink()
            raise DownloadError(f"{archive}: SHA-256 {digest} does not match the expected {src.sha256}; the file was removed, run again")
        try:
            install(src, archive, root)
        except WrongArchive as e:
            archive.unlink()
            raise DownloadError(f"{archive} (from {src.url}): {e}; the file was removed, run again") from None
        done[src.filename] = {"url": src.url, "size": archive.stat().st_size, "sha256": digest, "pinned": bool(src.sha256)}
        atomic_write_text(done_path, json.dumps(done, indent=1))
        if src.kind != "file":
            archive.unlink()
    return root


def fetch(src: Source, folder: Path, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``src.url`` to ``folder/src.filename``, resuming a ``.part`` file; verify size."""
    final = folder / src.filename
    if final.is_file() and (src.size is None or final.stat().st_size == src.size):
        return final
    part = folder / (src.filename + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(src.url, headers={"User-Agent": "sd4match", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            resp = None
        else:
            raise DownloadError(f"{src.url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        kept = (f"the {have:,} bytes downloaded so far are kept in {part} and resumed next time" if have else
                "nothing was downloaded; run the command again where the address is reachable, or download the file yourself and "
                f"put it at {final}")
        raise DownloadError(f"{src.url}: cannot connect ({getattr(e, 'reason', e)}); {kept}") from None
    total = src.size
    if resp is not None:
        with resp:
            status = resp.status
            length = resp.headers.get("Content-Length")
            if status == 206:
                rng = resp.headers.get("Content-Range", "")
                if not rng.startswith(f"bytes {have}-"):
                    raise DownloadError(f"{src.url}: server answered the resume request with {rng!r}")
                if rng.rpartition("/")[2].isdigit():
                    total = total or int(rng.rpartition("/")[2])
                mode = "ab"
            else:
                have = 0
                mode = "wb"
                if length is not None:
                    total = total or int(length)
            bar = _bar(total, have, src.filename) if progress else None
            try:
                with open(part, mode) as fh:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (OSError, ValueError, http.client.HTTPException) as e:
                            raise DownloadError(f"{src.url}: connection lost after {fh.tell()} bytes ({e}); run again to resume") from None
                        if not chunk:
                            break
                        fh.write(chunk)
                        if bar:
                            bar.update(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                if bar:
                    bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        if got > total:
            part.unlink()
            raise DownloadError(f"{src.url}: received {got} bytes, more than the expected {total}; the partial file was removed, run again")
        raise DownloadError(f"{src.url}: received {got} of {total} bytes; run again to resume")
    part.replace(final)
    return final


def install(src: Source, archive: Path, root: Path) -> None:
    """Put a fetched source in place: move a file, or extract an archive atomically per entry."""
    dest = (root / src.dest).resolve()
    if src.kind == "file":
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(archive, tmp)
        return
    work = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=root))
    try:
        try:
            extract(archive, src.kind, work)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
            raise WrongArchive(f"cannot extract ({e})") from None
        base = work / src.strip if src.strip else work
        if not base.is_dir():
            raise WrongArchive(f"archive has no top folder {src.strip!r}")
        entries = _picked(base, src) if src.pick else [(p, p.name) for p in base.iterdir() if p.name != "__MACOSX"]
        if not entries:
            raise WrongArchive(f"archive holds nothing matching {', '.join(src.pick) or 'anything'}")
        placed = dict((rel, path) for path, rel in entries)
        missing = [e for e in src.expect if not _provides(placed, e)]
        if missing:
            top = ", ".join(sorted(placed)[:5]) + (", …" if len(placed) > 5 else "")
            raise WrongArchive(f"not the expected archive: it has no {', '.join(missing)} (it holds {top})")
    except Exception:
        shutil.rmtree(work, ignore_errors=True)  # a crash (KeyboardInterrupt, a kill) leaves it for `datasets check` to refuse
        raise
    dest.mkdir(parents=True, exist_ok=True)
    for path, rel in entries:
        target = dest / rel
        if target.exists():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        path.replace(target)
    shutil.rmtree(work)


def _provides(placed: dict[str, Path], expected: str) -> bool:
    """Whether the entries to be placed (destination name -> extracted path) hold ``expected``."""
    first, _, rest = expected.partition("/")
    return first in placed and (placed[first] / rest).exists()


def _picked(base: Path, src: Source) -> list[tuple[Path, str]]:
    out = []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base).as_posix()
        if p.is_file() and any(PurePosixPath(rel).match(pat) for pat in src.pick) and "__MACOSX" not in rel:
            out.append((p, p.name if src.flatten else rel))
    return out


def extract(archive: Path, kind: str, into: Path) -> None:
    """Extract with path checks: no absolute paths, no ``..``, no links leaving ``into``."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _safe_name(archive, info.filename)
            z.extractall(into)
    elif kind == "tar":
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _safe_name(archive, m.name)
                if m.issym() or m.islnk():
                    raise DownloadError(f"{archive}: archive holds a link ({m.name}); refusing to extract")
            if hasattr(tarfile, "data_filter"):
                t.extractall(into, members=members, filter="data")
            else:  # Python < 3.10.12: names were checked above
                t.extractall(into, members=members)
    else:
        raise ValueError(f"unknown archive kind {kind!r}")


def _safe_name(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        raise DownloadError(f"{archive}: unsafe path in archive ({name}); refusing to extract")


def interrupted_extractions(root: Path) -> list[Path]:
    """Extraction folders left by a crash (their presence means the tree is incomplete)."""
    return sorted(Path(root).glob(EXTRACT_PREFIX + "*"))


def _bar(total: int | None, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)
