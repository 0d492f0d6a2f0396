"""SHA256SUMS for a release folder, in the format `sha256sum -c` reads, so a recipient can check
the bundle with standard tools and no Python."""

from __future__ import annotations

from pathlib import Path

from ..errors import NemoError
from ..files import TMP_PREFIX, sha256_file, write_text_atomic

SUMS_NAME = "SHA256SUMS"


def _listed_files(folder: Path, name: str) -> list[str]:
    """Relative POSIX paths of every file to be summed. Leftover temporaries (they never carry a
    final name) and the sums file itself are not part of the release."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if rel == name or any(part.startswith(TMP_PREFIX) for part in p.relative_to(folder).parts):
            continue
        if p.is_file():
            out.append(rel)
    return sorted(out)


def _escape(rel: str) -> tuple[str, str]:
    # GNU coreutils marks a line whose name holds a backslash or line break with a leading
    # backslash and escapes those characters, so every entry stays one line.
    if any(c in rel for c in "\\\n\r"):
        return "\\", rel.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return "", rel


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def write_sha256sums(folder: Path, name: str = SUMS_NAME) -> Path:
    """Hash every file under `folder` (except the sums file) into `folder/name`, sorted by path,
    `<hex>  <path>` per line. Returns the sums file's path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NemoError(f"{folder}: not a folder, cannot write {name}")
    lines = []
    for rel in _listed_files(folder, name):
        mark, shown = _escape(rel)
        lines.append(f"{mark}{sha256_file(folder / rel)}  {shown}\n")
    target = folder / name
    write_text_atomic(target, "".join(lines))
    return target


def read_sha256sums(path: Path) -> dict[str, str]:
    """Relative path -> hex digest. Accepts text (`  `) and binary (` *`) mode lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NemoError(f"{path}: checksum file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NemoError(f"{path}: cannot read checksum file ({e})") from None
    entries: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, sep, rel = body[:64], body[64:66], body[66:]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest) \
                or sep not in ("  ", " *") or not rel:
            raise NemoError(f"{path}: line {n} is not a sha256sum line")
        entries[_unescape(rel) if escaped else rel] = digest.lower()
    return entries


def check_sha256sums(folder: Path, name: str = SUMS_NAME) -> list[str]:
    """Compare `folder` against its sums file. Returns one `<path>: <why>` per problem (modified,
    missing, not listed, outside the folder); empty when the bundle is intact."""
    folder = Path(folder)
    entries = read_sha256sums(folder / name)
    problems: list[str] = []
    root = folder.resolve()
    for rel, digest in sorted(entries.items()):
        target = (folder / rel).resolve()
        if Path(rel).is_absolute() or not target.is_relative_to(root):
            problems.append(f"{rel}: outside the folder")
        elif not target.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(target) != digest:
            problems.append(f"{rel}: modified")
    # sha256sum -c ignores extra files; a release should not carry unlisted ones.
    problems += [f"{rel}: not listed" for rel in _listed_files(folder, name) if rel not in entries]
    return problems
