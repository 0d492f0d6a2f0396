"""File edges: atomic writes, hashing, append-only JSONL. Nothing else in the package opens a
final output path for writing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import NemoError

TMP_PREFIX = ".nemo-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only temporaries; a release is meant to be read by others, so
# outputs get the modes an ordinary open()/mkdir() would have given them.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it is fsynced and renamed onto `final`,
    on failure removed. A reader never sees a half-written file under the final name."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=final.suffix, dir=final.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(final: Path, obj: Any) -> None:
    write_text_atomic(final, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Like `atomic_path` for a whole folder: built under a temporary name, renamed when done."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=final.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(final.name + f"{TMP_PREFIX}old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_path(out: Path) -> Path:
    """`out` as given, or resolved where it has no name of its own (`.`, `..`): siblings such as
    a work folder or a journal are named after it."""
    out = Path(out)
    return out.resolve() if out.name in ("", "..") else out


def check_apart(out: Path, **inputs: Path | None) -> None:
    """Refuse an output that is an input, holds one, or lies inside one: writing it, or replacing
    it with --force, would modify or delete that input. `inputs`: what each is called, its path."""
    dst = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise NemoError(f"{out}: output must lie outside the {what.replace('_', ' ')} {path} "
                            f"(inputs are never modified)")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record and fsync: a crash loses at most the record being written."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Read complete records; a torn last line (a crash mid-write) is dropped and truncated away
    so the next append starts on a clean line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    pos = 0
    for line in raw.splitlines(keepends=True):
        end = pos + len(line)
        if line.endswith(b"\n"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise NemoError(f"{path}: line {len(records) + 1} is not valid JSON ({e.msg})") from None
            good_end = end
        pos = end
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def clean_stale_tmp(folder: Path) -> None:
    """Remove temporaries left by a killed run (they never carry a final name)."""
    if not folder.is_dir():
        return
    for p in folder.glob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
