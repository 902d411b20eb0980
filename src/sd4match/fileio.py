"""Writing files so that a failure never leaves a half-written or clobbered one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from sd4match.errors import Sd4MatchError


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain_error(where: str | Path, problem: str) -> Exception:
    return Sd4MatchError(f"{where}: {problem}")


def read_user_text(path: str | Path, error: Callable[[str | Path, str], Exception] = _plain_error) -> str:
    """The text of a file people write by hand or with other tools (predictions, pair lists,
    points, settings): UTF-8, with or without a byte-order mark. Other bytes raise
    ``error(path, problem)``."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise error(path, "UTF-16 text (as Windows PowerShell's > writes it), not UTF-8: save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(path, f"not UTF-8 text (at byte offset {e.start}: {data[e.start]:#04x})") from None


def json_lines(path: str | Path, error: Callable[[str | Path, str], Exception]) -> Iterator[tuple[str, object]]:
    """``("<path>:<line>", value)`` for each non-blank line of a JSON Lines file (read as
    ``read_user_text`` reads); a line that is not JSON raises ``error(where, problem)``, and a
    file that is one JSON array is named as such."""
    path = Path(path)
    text = read_user_text(path, error)
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:  # a line opening an array that spans lines is one too
            raise error(where, ARRAY_NOT_LINES if line.lstrip().startswith("[") else f"not valid JSON ({e.msg})") from None
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            raise error(where, ARRAY_NOT_LINES)
        yield where, value


ARRAY_NOT_LINES = "a JSON array, not JSON Lines: write one object a line"


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``: write it inside the block; on success it is
    fsynced and renamed onto ``path``, on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # threads of one process may write the same path
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plainly created file (some writers make 0600 files)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_save_image(path: str | Path, image) -> Path:
    """Save a PIL image to ``path`` through ``atomic_path``, in the format its suffix names
    (``.jpg`` JPEG, ...; PNG without one)."""
    from PIL import Image

    Image.init()
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))
    return Path(path)


MANIFEST = ".sd4match-files"  # the files the last run wrote into an output folder (JSON)
LOCK_NAME = ".sd4match.lock"  # held by a run in its folder (and left there): marks a run folder
#: files that mark a folder as one sd4match wrote into (a run's, or a match's / transfer's output)
OUTPUT_MARKS = (LOCK_NAME, MANIFEST)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a command's results into.

    On success each file is moved into ``out`` (replacing a file of the same name), and the
    files an earlier sd4match run wrote there that this run did not write again are removed
    (they are listed in ``out/.sd4match-files``), so the folder holds this run's files
    only; files sd4match did not write are left alone. On error the staging folder is
    removed and ``out`` is exactly as it was.
    """
    import json
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        out.mkdir(parents=True, exist_ok=True)
        try:
            earlier = json.loads((out / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            earlier = []
        written = []
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                rel = f.relative_to(tmp)
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
                written.append(rel.as_posix())
        for rel in set(earlier) - set(written):
            stale = out / rel
            if ".." not in Path(rel).parts and stale.is_file():
                stale.unlink()
        atomic_write_text(out / MANIFEST, json.dumps({"files": written}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(header, rows) -> list[str]:
    """A markdown table's lines: the header, its rule, a line per row (cells as text)."""
    return ["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def csv_text(header, rows) -> str:
    """The rows as CSV text, the header first."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()

