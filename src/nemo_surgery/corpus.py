"""Read a prompt corpus: the NeMo paper's memorized-prompt CSV, any CSV/TSV with a `prompt` or
`caption` column, plain text (one prompt a line) or JSONL (one object a line).

Every problem with the file is a one-line `NemoError` naming the file and, where there is a row,
its line; no other exception escapes on any input bytes. The file is only ever opened for reading.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import NemoError

# `text` and `file_name`: the metadata file of a Hugging Face image folder, what diffusers'
# text-to-image training reads.
CAPTION_COLUMNS = ("caption", "prompt", "text")
TYPE_COLUMN = "type"
# `index` is the paper's LAION index; `id` is the plain name other files use.
ID_COLUMNS = ("index", "id")
# A training image's column goes by many names in the wild; the first of these present is taken.
IMAGE_COLUMNS = ("image", "image_path", "image_file", "image_filename", "training_image", "train_image",
                 "img", "img_path", "file_name", "filename", "file_path", "file", "path")
MEMORIZATION_TYPES = ("VM", "TM")
DELIMITERS = (",", ";", "\t", "|")

_FORMAT_BY_SUFFIX = {
    ".csv": "delimited",
    ".tsv": "delimited",
    ".tab": "delimited",
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
_BOM = b"\xef\xbb\xbf"
# Everything str.splitlines() breaks on: a message must stay one line whatever the input holds.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


@dataclass(frozen=True)
class Prompt:
    id: str  # the `Index`/`id` value, else the 1-based data row number
    text: str  # whitespace-stripped
    type: str | None  # "VM" or "TM" where the file gives a type
    image: Path | None  # the resolved training image where the file names one
    line: int  # 1-based physical line on which the row starts


@dataclass(frozen=True)
class Corpus:
    path: Path  # resolved
    sha256: str  # of the bytes that were parsed
    format: str  # "nemo-csv" (a `caption` and a `type` column, as the paper's file), "csv", "tsv", "txt", "jsonl"
    prompts: tuple[Prompt, ...]  # first occurrence of each caption, in file order
    duplicates: tuple[tuple[int, int, str], ...]  # (line, line of the first occurrence, text)

    @property
    def memorized_types(self) -> dict[str, int]:
        counts = Counter(p.type for p in self.prompts if p.type is not None)
        return {t: counts[t] for t in MEMORIZATION_TYPES if counts[t]}


@dataclass(frozen=True)
class _Record:
    """One row as found in the file, before any value is checked. Values are Any because JSONL
    can hold any JSON type where a string belongs; `None` means the field is absent."""

    line: int
    number: int
    text: Any
    id: Any = None
    type: Any = None
    image: Any = None


@dataclass(frozen=True)
class _Source:
    shown: str  # the path as the caller gave it, so messages name what they typed
    folder: Path
    allow_outside_images: bool

    def error(self, message: str, line: int | None = None) -> NemoError:
        return _error(self.shown, message, line)


def _error(shown: str, message: str, line: int | None = None) -> NemoError:
    where = f"{shown}: line {line}: " if line is not None else f"{shown}: "
    return NemoError((where + message).translate(_LINE_BREAKS))


def bundled_reference() -> Path:
    """Reference prompts shipped with the package: 500 generic captions of everyday scenes
    (written by examples/make_reference_prompts.py), for calibrating when none are given."""
    from importlib.resources import files

    return Path(str(files("nemo_surgery") / "data" / "reference_prompts.txt"))


def evenly_spaced(items: list, n: int) -> list:
    """`n` items (or all, if fewer) spread evenly from first to last, in order: a subset that
    covers every part of a file, whatever order its styles come in."""
    n = min(n, len(items))
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)]


def read_corpus(
    path: Path | str, *, allow_outside_images: bool = False, max_line_bytes: int = 1_000_000
) -> Corpus:
    """Read the prompts of a corpus file; see the module docstring for the formats.

    Duplicate captions (identical after stripping whitespace) keep their first occurrence and are
    listed in `Corpus.duplicates`. Training images must lie inside the corpus file's folder unless
    `allow_outside_images` is set, so a shared corpus cannot make the tool read arbitrary files.
    """
    if max_line_bytes < 1:
        raise ValueError("max_line_bytes must be at least 1")
    path = Path(path)
    shown = str(path)
    real = _check_file(path, shown)
    kind = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        suffix = path.suffix or "(no suffix)"
        raise _error(shown, f"unsupported corpus file type {suffix!r}; expected .csv, .tsv, .txt or .jsonl")
    src = _Source(shown, real.parent, allow_outside_images)
    lines, digest = _read_lines(path, src, max_line_bytes)
    if not any(line.strip() for line in lines):
        raise src.error("empty file (no prompts)")

    if kind == "delimited":
        fmt, records = _parse_delimited(lines, src, path.suffix.lower())
    elif kind == "jsonl":
        fmt, records = "jsonl", _parse_jsonl(lines, src)
    else:
        fmt, records = "txt", _parse_txt(lines)

    prompts: list[Prompt] = []
    duplicates: list[tuple[int, int, str]] = []
    first_line_of_text: dict[str, int] = {}
    line_of_id: dict[str, int] = {}
    for record in records:
        prompt = _make_prompt(record, src)
        if prompt.text in first_line_of_text:
            duplicates.append((prompt.line, first_line_of_text[prompt.text], prompt.text))
            continue
        if prompt.id in line_of_id:
            first = line_of_id[prompt.id]
            raise src.error(f"id {_show(prompt.id)} already used on line {first}", prompt.line)
        first_line_of_text[prompt.text] = prompt.line
        line_of_id[prompt.id] = prompt.line
        prompts.append(prompt)
    if not prompts:
        raise src.error("header only, no prompts")
    return Corpus(real, digest, fmt, tuple(prompts), tuple(duplicates))


def _check_file(path: Path, shown: str) -> Path:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _error(shown, "file not found") from None
    except (OSError, ValueError) as e:
        raise _error(shown, f"cannot open: {_reason(e)}") from None
    if stat.S_ISDIR(mode):
        raise _error(shown, "is a directory, not a corpus file")
    if not stat.S_ISREG(mode):
        # A FIFO or device would block or never end.
        raise _error(shown, "not a regular file")
    return Path(os.path.realpath(path))


def _read_lines(path: Path, src: _Source, max_line_bytes: int) -> tuple[list[str], str]:
    """Decode the file into physical lines (terminators dropped) and hash the same bytes, so the
    recorded digest is of exactly what was parsed. No line longer than the limit is ever held."""
    digest = hashlib.sha256()
    lines: list[str] = []
    offset = 0
    # Room for a BOM and a CRLF: a chunk that fills this limit without a newline is too long.
    limit = max_line_bytes + len(_BOM) + 2
    try:
        with open(path, "rb") as f:
            while chunk := f.readline(limit):
                digest.update(chunk)
                number = len(lines) + 1
                body = chunk[:-1] if chunk.endswith(b"\n") else chunk
                body = body[:-1] if body.endswith(b"\r") else body
                start = offset
                if number == 1 and body.startswith(_BOM):
                    body = body[len(_BOM):]
                    start += len(_BOM)
                if len(body) > max_line_bytes:
                    raise src.error(f"line is longer than {max_line_bytes} bytes (max_line_bytes)", number)
                try:
                    lines.append(body.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise src.error(f"invalid UTF-8 at byte offset {start + e.start}", number) from None
                offset += len(chunk)
    except OSError as e:
        raise src.error(f"cannot read: {_reason(e)}") from None
    return lines, digest.hexdigest()


def _parse_txt(lines: list[str]) -> Iterator[_Record]:
    number = 0
    for i, line in enumerate(lines, start=1):
        if line.strip():
            number += 1
            yield _Record(line=i, number=number, text=line)


def _parse_jsonl(lines: list[str], src: _Source) -> Iterator[_Record]:
    number = 0
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        number += 1
        try:
            obj = json.loads(line)
        except ValueError as e:
            message = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise src.error(f"not valid JSON ({message})", i) from None
        except RecursionError:
            raise src.error("not valid JSON (nested too deeply)", i) from None
        if not isinstance(obj, dict):
            raise src.error(f"expected a JSON object, got {type(obj).__name__}", i)
        fields: dict[str, Any] = {}
        for key, value in obj.items():
            name = key.strip().lower()
            if name in fields:
                raise src.error(f"field {_show(name)} appears twice (names are case-insensitive)", i)
            fields[name] = value
        present = [c for c in CAPTION_COLUMNS if c in fields]
        if not present:
            raise src.error(f"no 'prompt', 'caption' or 'text' field ({_show_names(list(obj), 'fields')})", i)
        if len(present) > 1:
            raise src.error(f"more than one caption field ({', '.join(present)}); keep one", i)
        yield _Record(
            line=i,
            number=number,
            text=fields[present[0]],
            id=_first_present(fields, ("id", "index")),
            type=fields.get(TYPE_COLUMN),
            image=_first_present(fields, IMAGE_COLUMNS),
        )


def _parse_delimited(lines: list[str], src: _Source, suffix: str) -> tuple[str, Iterator[_Record]]:
    header_at = next(i for i, line in enumerate(lines) if line.strip())
    delimiter = _choose_delimiter(lines[header_at], src, suffix, header_at + 1)
    reader = csv.reader((line + "\n" for line in lines[header_at:]), delimiter=delimiter, strict=True)
    header = _next_row(reader, src, header_at + 1) or []
    names = [h.strip().lower() for h in header]
    captions = [c for c in CAPTION_COLUMNS if c in names]
    if not captions:
        # The delimiter was chosen on the first physical line; a quoted newline can change it.
        raise src.error(f"no caption column in the header ({_show_names(header)})", header_at + 1)
    for used in captions + [TYPE_COLUMN, *ID_COLUMNS, *IMAGE_COLUMNS]:
        if names.count(used) > 1:
            raise src.error(f"column {_show(used)} appears twice in the header", header_at + 1)
    if len(captions) > 1:
        raise src.error(f"more than one caption column ({', '.join(captions)}); keep one", header_at + 1)
    caption_col = names.index(captions[0])
    type_col = names.index(TYPE_COLUMN) if TYPE_COLUMN in names else None
    id_col = _first_index(names, ID_COLUMNS)
    image_col = _first_index(names, IMAGE_COLUMNS)
    if captions[0] == "caption" and type_col is not None:
        fmt = "nemo-csv"
    else:
        fmt = "tsv" if delimiter == "\t" else "csv"

    def records() -> Iterator[_Record]:
        number = 0
        while True:
            start = header_at + reader.line_num + 1
            row = _next_row(reader, src, start)
            if row is None:
                return
            if not any(field.strip() for field in row):
                continue
            number += 1
            if len(row) != len(header):
                raise src.error(
                    f"{len(row)} fields but the header has {len(header)}"
                    f" (delimiter {delimiter!r}; an unquoted {delimiter!r} or quote inside a field?)",
                    start,
                )
            yield _Record(
                line=start,
                number=number,
                text=row[caption_col],
                id=None if id_col is None else row[id_col],
                type=None if type_col is None else row[type_col],
                image=None if image_col is None else row[image_col],
            )

    return fmt, records()


def _next_row(reader: Iterator[list[str]], src: _Source, line: int) -> list[str] | None:
    """The next row, which starts on `line`, or None at the end of the file."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise src.error(_csv_problem(e), line) from None


def _csv_problem(e: csv.Error) -> str:
    text = str(e)
    # The csv module's own wording speaks of code (`newline=''`), not of the user's file.
    if "field larger than field limit" in text:
        return f"a field longer than {csv.field_size_limit()} characters (a quote never closed?)"
    if "unexpected end of data" in text:
        return "a quoted field is never closed"
    if "new-line character seen in unquoted field" in text:
        return "a bare carriage return (\\r) inside an unquoted field"
    return f"malformed CSV ({text})"


def _choose_delimiter(header: str, src: _Source, suffix: str, line: int) -> str:
    """The delimiter that splits the header into a known caption column. When several do (a
    one-column header splits the same on all), the sniffer's choice wins, then the widest split,
    then the suffix's usual delimiter."""
    default = "\t" if suffix in (".tsv", ".tab") else ","
    splits = {d: _split(header, d) for d in DELIMITERS}
    candidates = [d for d, cols in splits.items() if any(_is_caption(c) for c in cols)]
    sniffed = _sniff(header)
    if not candidates:
        tried = sniffed or default
        others = ", ".join(repr(d) for d in DELIMITERS if d != tried)
        raise src.error(
            f"no caption column: the header split on {tried!r} gives {_show_names(splits[tried])};"
            f" expected a column named 'caption', 'prompt' or 'text' (also tried {others})",
            line,
        )
    if len(candidates) == 1:
        return candidates[0]
    if sniffed in candidates:
        return sniffed
    widest = max(len(splits[d]) for d in candidates)
    widest_candidates = [d for d in candidates if len(splits[d]) == widest]
    return default if default in widest_candidates else widest_candidates[0]


def _split(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return [line]


def _is_caption(column: str) -> bool:
    return column.strip().lower() in CAPTION_COLUMNS


def _sniff(header: str) -> str | None:
    try:
        # A long header costs the sniffer's regexes a lot and says no more about the delimiter.
        return csv.Sniffer().sniff(header[:4096], delimiters="".join(DELIMITERS)).delimiter
    except Exception:  # the sniffer is a heuristic: any failure only means it has no opinion
        return None


def _make_prompt(record: _Record, src: _Source) -> Prompt:
    line = record.line
    if not isinstance(record.text, str):
        raise src.error(f"the caption must be a string, got {_json_type(record.text)}", line)
    text = record.text.strip()
    if not text:
        raise src.error("empty caption", line)
    return Prompt(
        id=_check_id(record, src),
        text=text,
        type=_check_type(record.type, src, line),
        image=_check_image(record.image, src, line),
        line=line,
    )


def _check_id(record: _Record, src: _Source) -> str:
    value = record.id
    if value is None:
        return str(record.number)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise src.error(f"id must be a string or an integer, got {_json_type(value)}", record.line)
    if not value.strip():
        raise src.error("empty id", record.line)
    return value.strip()


def _check_type(value: Any, src: _Source, line: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().upper() in MEMORIZATION_TYPES:
        return value.strip().upper()
    shown = _show(value) if isinstance(value, str) else _json_type(value)
    raise src.error(f"type {shown} is not 'VM' or 'TM'", line)


def _check_image(value: Any, src: _Source, line: int) -> Path | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise src.error(f"image must be a path string, got {_json_type(value)}", line)
    name = value.strip()
    try:
        rel = name
        if "\\" in rel and not os.path.lexists(src.folder / rel):
            # A corpus written on Windows names `images\a.png`; a backslash is a legal character
            # of a POSIX file name, so it is read as a separator only where no such file exists.
            rel = rel.replace("\\", "/")
        resolved = Path(os.path.realpath(src.folder / rel))
        inside = resolved.is_relative_to(src.folder)
        is_file = resolved.is_file()
    except (OSError, ValueError, RuntimeError) as e:
        raise src.error(f"training image {_show(name)}: {_reason(e)}", line) from None
    if not inside and not src.allow_outside_images:
        raise src.error(
            f"training image {_show(name)} resolves outside the corpus folder {src.folder}"
            " (refused; pass --allow-outside-images to permit)",
            line,
        )
    if not is_file:
        raise src.error(f"training image {_show(name)} not found ({resolved})", line)
    return resolved


def _first_present(fields: dict[str, Any], names: Iterable[str]) -> Any:
    return next((fields[n] for n in names if n in fields), None)


def _first_index(names: list[str], wanted: Iterable[str]) -> int | None:
    return next((names.index(w) for w in wanted if w in names), None)


def _show(value: str, limit: int = 80) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _show_names(names: list[str], what: str = "columns", limit: int = 20) -> str:
    shown = ", ".join(_show(n, 40) for n in names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"{what} [{shown}{more}]" if names else f"no {what}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {str: "a string", dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "a value")


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
