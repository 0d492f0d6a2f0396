"""Execute a plan: write a copy of the checkpoint whose planned `attn2.to_v` rows are zero.

Streaming and exact. Only safetensors headers are parsed; the data section is copied by the kernel
(`copy_file_range`) and the planned rows are then overwritten with zero bytes in place. A row of
a row-major [out, in] weight is one contiguous byte range, and all-zero bytes are +0 in every
float and integer dtype, so fp32/fp16/bf16 are exact and every other byte stays identical. Memory
use is independent of checkpoint size except for the optional value-digest check, which loads the
value layers alone (tens of MB for SD 1.x).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import NemoError
from ..files import TMP_PREFIX, atomic_dir, atomic_path, canonical_json, check_apart, output_path
from ..model import PICKLE_SUFFIXES, value_digest
from ..plan import Plan
from ..safetensors_io import Header, TensorEntry, encode_header, read_header
from .keymap import VALUE_KEY, layers_per_block_of, value_layer_of

FORMATS = ("diffusers", "single")  # a diffusers folder; one .safetensors file
UNET_DIR = "unet"
META_PLAN = "nemo_surgery.plan_sha256"
META_VERSION = "nemo_surgery.version"
META_ZEROED = "nemo_surgery.zeroed"

_COPY_CHUNK = 1 << 30    # per copy_file_range call; the kernel may do less
_BUF_CHUNK = 16 << 20    # fallback read/write and zero-fill buffer
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                   errno.EPERM, errno.EBADF}


@dataclass(frozen=True)
class ApplyResult:
    out: Path                     # output folder or file
    files: tuple[Path, ...]       # weight files rewritten
    zeroed: dict[str, list[int]]  # module path -> rows zeroed
    plan_sha256: str
    seconds: float


@dataclass(frozen=True)
class _Value:
    """Where one value layer's weight lives in the input."""
    file: Path
    entry: TensorEntry


@dataclass(frozen=True)
class _Checkpoint:
    kind: str                     # one of FORMATS
    headers: dict[Path, Header]   # the weight files that hold value layers
    values: dict[str, _Value]     # module path -> location


def apply_plan(plan: Plan, model: Path, out: Path, *, fmt: str | None = None,
               force: bool = False) -> ApplyResult:
    """Write `out`, a copy of `model` (diffusers folder or single .safetensors file) with the
    plan's rows zeroed. Everything is checked before anything is written; the input is only read;
    `out` appears complete or not at all."""
    start = time.perf_counter()
    model, out = Path(model), output_path(out)
    ckpt = _open_checkpoint(model)
    fmt = ckpt.kind if fmt is None else fmt
    if fmt not in FORMATS:
        raise NemoError(f"output format {fmt!r} is unknown (choose from {', '.join(FORMATS)})")
    if fmt != ckpt.kind and fmt != "single":
        raise NemoError(f"{model}: converting a {ckpt.kind} checkpoint to {fmt} is not supported "
                        f"(apply without a format to keep the input's)")
    _check_out(model, out, fmt, force)
    zeroed = {name: list(rows) for name, rows in sorted(plan.layers.items()) if rows}
    _check_plan(plan, ckpt, model)
    if fmt != ckpt.kind:
        # Folder -> single file: rename into an LDM-keyed file beside `out`, then operate on that.
        from .convert import to_single_file

        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".safetensors", dir=out.parent)
        os.close(fd)
        converted = Path(tmp_name)
        try:
            to_single_file(model, converted)
            res = apply_plan(plan, converted, out, force=force)
        finally:
            converted.unlink(missing_ok=True)
        return ApplyResult(out, res.files, res.zeroed, res.plan_sha256, time.perf_counter() - start)

    plan_sha = plan.sha256()
    # The record names module paths whatever the key layout, and the whole plan in every rewritten
    # file, so any one file (or shard) says what was done to the model.
    extra_meta = {META_PLAN: plan_sha, META_VERSION: __version__, META_ZEROED: canonical_json(zeroed)}
    per_file: dict[Path, dict[str, list[int]]] = {f: {} for f in ckpt.headers}
    for name, rows in zeroed.items():
        v = ckpt.values[name]
        per_file[v.file][v.entry.name] = rows

    try:
        if ckpt.kind == "single":
            with atomic_path(out) as tmp:
                _rewrite(ckpt.headers[model], tmp, per_file[model], extra_meta)
            files: tuple[Path, ...] = (out,)
        else:
            files = _copy_folder(model, out, ckpt, per_file, extra_meta)
    except OSError as e:
        raise NemoError(f"{out}: cannot write output ({e.strerror or e})") from None
    return ApplyResult(out, files, zeroed, plan_sha, time.perf_counter() - start)


# --- reading the input ---------------------------------------------------------------------------

def check_checkpoint(model: Path) -> None:
    """Raise what `apply_plan` would refuse about `model` (pickle files, a second UNet weight set,
    no value weights), from the safetensors headers alone: said before a build spends its hours
    localizing on a checkpoint it could not edit."""
    _open_checkpoint(Path(model))


def _refuse_pickle(path: Path) -> None:
    raise NemoError(f"{path}: pickle weights are refused (they can run code when loaded, and a "
                    f"copy would ship unedited); convert to safetensors or remove the file")


def _open_checkpoint(model: Path) -> _Checkpoint:
    if not model.exists():
        raise NemoError(f"{model}: model not found")
    if model.is_file():
        if model.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(model)
        if model.suffix != ".safetensors":
            raise NemoError(f"{model}: expected a .safetensors file or a diffusers model folder")
        header = read_header(model)
        return _Checkpoint("single", {model: header}, _values_single(header))
    return _open_folder(model)


def _values_single(header: Header) -> dict[str, _Value]:
    values: dict[str, _Value] = {}
    lpb = layers_per_block_of(header.tensors)
    for key, entry in header.tensors.items():
        name = value_layer_of(key, lpb)
        if name is None:
            continue
        if name in values:
            raise NemoError(f"{header.path}: value layer {name} is stored twice "
                            f"({values[name].entry.name!r} and {key!r})")
        values[name] = _Value(header.path, entry)
    if not values:
        raise NemoError(f"{header.path}: no cross-attention value weights (*.{VALUE_KEY}) in this file")
    return values


def _open_folder(model: Path) -> _Checkpoint:
    unet = model / UNET_DIR
    if not unet.is_dir():
        raise NemoError(f"{model}: not a diffusers model folder ({UNET_DIR}/ missing)")
    for root, dirs, names in os.walk(model, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]
        for n in names:
            if Path(n).suffix in PICKLE_SUFFIXES:
                _refuse_pickle(Path(root) / n)

    entries = sorted(p for p in unet.iterdir() if not p.name.startswith(TMP_PREFIX))
    weights = [p for p in entries if p.name.endswith(".safetensors") and p.is_file()]
    indexes = [p for p in entries if p.name.endswith(".safetensors.index.json") and p.is_file()]
    headers = {p: read_header(p) for p in weights}
    holding = [p for p in weights if any(k.endswith(VALUE_KEY) for k in headers[p].tensors)]
    if len(indexes) > 1:
        raise NemoError(f"{unet}: more than one weight index ({', '.join(p.name for p in indexes)}); "
                        f"keep one weight set so no unedited copy of the UNet ships")
    if indexes:
        shards = _read_index(indexes[0], headers)
        stray = [p for p in holding if p.name not in shards]
        if stray:
            raise NemoError(f"{stray[0]}: holds UNet value weights but is not listed in {indexes[0].name}; "
                            f"keep one weight set so no unedited copy of the UNet ships")
    elif len(holding) > 1:
        raise NemoError(f"{unet}: more than one UNet weight file ({', '.join(p.name for p in holding)}); "
                        f"keep one weight set (e.g. remove variant files) so no unedited copy ships")
    if not holding:
        raise NemoError(f"{unet}: no cross-attention value weights (*.{VALUE_KEY}) in its safetensors files")

    values: dict[str, _Value] = {}
    for p in holding:
        for key, entry in headers[p].tensors.items():
            if key.endswith(VALUE_KEY):
                name = key[: -len(".weight")]
                if name in values:
                    raise NemoError(f"{unet}: {key} is stored in both {values[name].file.name} and {p.name}")
                values[name] = _Value(p, entry)
    return _Checkpoint("diffusers", {p: headers[p] for p in holding}, values)


def _read_index(index: Path, headers: dict[Path, Header]) -> set[str]:
    """The shard names of a sharded weight set, after checking that the index agrees with them."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NemoError(f"{index}: cannot read weight index ({type(e).__name__})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise NemoError(f"{index}: 'weight_map' must map tensor names to shard file names")
    by_name = {p.name: h for p, h in headers.items()}
    for key, shard in weight_map.items():
        if Path(shard).name != shard or shard in (".", ".."):
            raise NemoError(f"{index}: shard {shard!r} is not a file name beside the index")
        if shard not in by_name:
            raise NemoError(f"{index}: shard {shard} is missing")
        if key not in by_name[shard].tensors:
            raise NemoError(f"{index}: maps {key} to {shard}, which does not hold it")
    return set(weight_map.values())


# --- checks before writing -----------------------------------------------------------------------

def _check_out(model: Path, out: Path, kind: str, force: bool) -> None:
    check_apart(out, input=model)
    if kind == "single" and out.suffix != ".safetensors":
        raise NemoError(f"{out}: a single-file output must end in .safetensors")
    if out.exists() or out.is_symlink():
        if not force:
            raise NemoError(f"{out}: output exists (use force to replace it)")
        want_dir = kind == "diffusers"
        if out.is_dir() != want_dir or out.is_symlink():
            raise NemoError(f"{out}: exists and is not a {'folder' if want_dir else 'regular file'}; "
                            f"not replacing it")


def _check_plan(plan: Plan, ckpt: _Checkpoint, model: Path) -> None:
    where = f"plan vs {model}"
    for name in plan.layers:
        v = ckpt.values.get(name)
        if v is None:
            continue  # check_against names it as unknown
        if len(v.entry.shape) != 2:
            raise NemoError(f"{where}: {v.entry.name} has shape {list(v.entry.shape)}, "
                            f"expected a 2-D [out, in] weight")
        bias = v.entry.name[: -len("weight")] + "bias"
        if bias in ckpt.headers[v.file].tensors:
            # Zeroing a row equals masking the neuron only without a bias (NEMO.md).
            raise NemoError(f"{where}: value layer {name} has a bias; NeMo's row surgery needs bias-free to_v")
    shapes = {n: (v.entry.shape[0], v.entry.shape[1]) for n, v in ckpt.values.items() if len(v.entry.shape) == 2}
    plan.check_against(shapes, where=where)

    want = plan.model.get("value_digest")
    if want:
        got = _value_digest(ckpt)
        if got != want:
            raise NemoError(f"{model}: plan was made for another model (value-layer digest "
                            f"{str(want)[:12]} in the plan, {got[:12]} here); use the plan made for "
                            f"this checkpoint")


def _value_digest(ckpt: _Checkpoint) -> str:
    """The digest `load_model` records, computed from the value tensors alone."""
    from safetensors import SafetensorError, safe_open

    weights = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, v in ckpt.values.items():
        by_file.setdefault(v.file, []).append((name, v.entry.name))
    for path, pairs in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name, key in pairs:
                    weights[name] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise NemoError(f"{path}: cannot read value weights ({str(e).strip() or type(e).__name__})") from None
    return value_digest(weights)


# --- writing -------------------------------------------------------------------------------------

def _copy_folder(model: Path, out: Path, ckpt: _Checkpoint, per_file: dict[Path, dict[str, list[int]]],
                 extra_meta: dict[str, str]) -> tuple[Path, ...]:
    rewritten: list[Path] = []
    with atomic_dir(out) as tmp:
        for root, dirs, names in os.walk(model, followlinks=True):
            # Our own temporaries from an interrupted run are not part of the model.
            dirs[:] = sorted(d for d in dirs if not d.startswith(TMP_PREFIX))
            rel = Path(root).relative_to(model)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for n in sorted(names):
                if n.startswith(TMP_PREFIX):
                    continue
                src = Path(root) / n
                dst = tmp / rel / n
                if src in ckpt.headers:
                    _rewrite(ckpt.headers[src], dst, per_file[src], extra_meta)
                    rewritten.append(out / rel / n)
                else:
                    shutil.copyfile(src, dst)  # follows links: the copy is self-contained
                    _fsync(dst)
    return tuple(rewritten)


def _rewrite(header: Header, dst: Path, rows: dict[str, list[int]], extra_meta: dict[str, str]) -> None:
    """Copy one safetensors file with a new header (same tensors, order and offsets; metadata
    extended) and the listed rows of the listed tensors zeroed."""
    src = header.path
    new_head = encode_header(list(header.tensors.values()), {**header.metadata, **extra_meta},
                             congruent_to=header.data_start)
    size = os.path.getsize(src)
    data_len = size - header.data_start
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(new_head)
        fo.flush()
        _copy_range(fi.fileno(), fo.fileno(), header.data_start, len(new_head), data_len, src)
        base = len(new_head)
        for key, idx in rows.items():
            e = header.tensors[key]
            row = e.shape[1] * e.itemsize
            for first, count in _runs(idx):
                _zero(fo.fileno(), base + e.begin + first * row, count * row)
        os.fsync(fo.fileno())
    if os.path.getsize(dst) != len(new_head) + data_len:
        raise NemoError(f"{src}: changed while being copied (size differs); output discarded")


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as (first, count) runs, so adjacent rows are zeroed in one write."""
    runs: list[tuple[int, int]] = []
    for r in sorted(rows):
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


def _copy_range(fi: int, fo: int, src_off: int, dst_off: int, count: int, src: Path) -> None:
    kernel = getattr(os, "copy_file_range", None)
    while count and kernel is not None:
        try:
            n = kernel(fi, fo, min(count, _COPY_CHUNK), src_off, dst_off)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            break  # filesystem cannot do it: finish with plain reads and writes
        if n == 0:
            raise NemoError(f"{src}: ended early while being copied (changed on disk?)")
        src_off, dst_off, count = src_off + n, dst_off + n, count - n
    while count:
        block = os.pread(fi, min(count, _BUF_CHUNK), src_off)
        if not block:
            raise NemoError(f"{src}: ended early while being copied (changed on disk?)")
        _pwrite_all(fo, block, dst_off)
        src_off, dst_off, count = src_off + len(block), dst_off + len(block), count - len(block)


def _zero(fo: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, _BUF_CHUNK))
    while length:
        n = min(length, len(zeros))
        _pwrite_all(fo, memoryview(zeros)[:n], offset)
        offset, length = offset + n, length - n


def _pwrite_all(fo: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fo, view, offset)
        view, offset = view[n:], offset + n


def _fsync(path: Path) -> None:
    # Read-only descriptor: copied files may keep a read-only mode, and fsync does not need write.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
