"""Reading safetensors headers without trusting them, and the byte layout that lets surgery
stream: a file is `u64 header length | JSON header | data`, each tensor a contiguous row-major
byte range of the data section. Loading tensors goes through the `safetensors` library; only
what it does not offer (validation with a one-line error, streaming rewrite) lives here."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import NemoError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own cap
PAGE = 4096


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data section
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # absolute offset of the data section
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; any inconsistency is a one-line NemoError."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NemoError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise NemoError(f"{path}: corrupt or truncated safetensors file (header length {n} "
                                f"does not fit in {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise NemoError(f"{path}: file not found") from None
    except OSError as e:
        raise NemoError(f"{path}: cannot read ({e.strerror})") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NemoError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(obj, dict):
        raise NemoError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise NemoError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    tensors: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise NemoError(f"{path}: corrupt safetensors header (bad entry for {name!r})") from None
        if dtype not in DTYPE_SIZES:
            raise NemoError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        count = 1
        for s in shape:
            count *= s
        if e - b != count * DTYPE_SIZES[dtype] or b < 0:
            raise NemoError(f"{path}: corrupt safetensors header ({name!r}: byte range does not match shape)")
        tensors[name] = TensorEntry(name, dtype, shape, b, e)
    data_start = 8 + n
    end = max((t.end for t in tensors.values()), default=0)
    if data_start + end != size:
        what = "truncated" if data_start + end > size else "has trailing bytes"
        raise NemoError(f"{path}: corrupt safetensors file ({what}: header says {data_start + end} "
                        f"bytes, file has {size})")
    return Header(path, data_start, tensors, {str(k): str(v) for k, v in meta.items()})


def encode_header(tensors: list[TensorEntry], metadata: dict[str, str], congruent_to: int | None = None) -> bytes:
    """Length-prefixed JSON header, space-padded so the data section starts 8-byte aligned, or,
    with `congruent_to`, at an offset congruent to that one modulo the page size: then the data
    section can be copied page for page, which the kernel does far faster than a shifted copy."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)  # the data section stays 8-byte aligned
    if congruent_to is not None and congruent_to % 8 == 0:
        raw += b" " * ((congruent_to - 8 - len(raw)) % PAGE)
    return struct.pack("<Q", len(raw)) + raw
