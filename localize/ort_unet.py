"""The search's UNet pass on ONNX Runtime, for CPUs.

Why: a localization is thousands of first-step UNet samples in small batches. On a CPU, torch's
eager dispatch of a diffusers UNet costs more per sample than ONNX Runtime running the same graph,
and one single-threaded run per core over a slice of the batch uses the cores better than
intra-op threads do on such small tensors (demo model, 2 cores: 7.4 ms per sample in torch at a
batch of 10; 4.7 ms in onnxruntime on 2 threads; 3.3 ms on 2 single-threaded runs side by side).

The graph is the model's UNet with the value masks as inputs: every `attn2.to_v` output is
multiplied by its mask, exactly as `ValueMasks` does in torch, so one graph evaluates any
candidate neuron sets side by side. On an SD 1.x/2.x layout it also gathers rows before each
down/mid transformer block (`prefix.PrefixUNet`), so each block runs once per distinct state its
samples need there, the layers candidates share once per seed
(demo: x1.25 on top of the runtime; other layouts get the plain graph). That graph is exported in
two parts, cut after the first level's transformer blocks, and the head's states are kept from
pass to pass: refinement walks the layers last first, so until it reaches the first level every
pass shares the head (32 px shape model: a search x2.81-2.95 faster than the plain algorithm
before, x3.19-3.22 with the head kept). The exported graph is
simplified by onnxslim (`export.onnx._simplify`), which folds away most of the shape arithmetic
of a dynamic batch. Its attention runs as onnxruntime's fused CPU kernel (`fused_attention`):
unfused, a pass materializes every score matrix of the batch (32 px latents: x1.6 slower a
sample and 4x the memory; 64 px: x5.3 and 13 GB for 32 samples). It is exported once per model
(keyed by a hash of every UNet weight, not only the value layers), cached, and checked against
torch whenever it is opened. Its results agree with torch within float noise, not bit for bit:
decisions that close to a threshold are reported as such by the search, and verification's
bit-exact comparison of masks against zeroed rows stays on torch.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import NemoError
from ..model import Model, unet_digest
from .fused_attention import fused_attention, fused_nodes
from .masks import ValueMasks
from .prefix import (CACHE_BYTES, Cut, HeadStates, PrefixLayout, PrefixUNet, distinct, gather_points, head_keys,
                     point_of, row_ids, same_as_diffusers)


FORMAT = 5  # bump when the graph's inputs, outputs or rewriting change
OPSET = 17


class _MaskedUNet(nn.Module):
    """UNet(sample, timestep, text, value_mask) -> noise prediction, the masks applied by the same
    hooks the torch path uses."""

    def __init__(self, model: Model):
        super().__init__()
        self.unet = model.unet
        self.masks = ValueMasks(model)
        self.layers = [(v.path, v.out_features) for v in model.value_layers]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                value_mask: torch.Tensor) -> torch.Tensor:
        parts = torch.split(value_mask, [w for _, w in self.layers], dim=1)
        self.masks._masks = {p: m for (p, _), m in zip(self.layers, parts)}
        try:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        finally:
            self.masks._masks = {}


class _Head(nn.Module):
    """PrefixUNet's forward up to gather point `split`, as a graph: (sample, timestep, text,
    masks of the layers before the split, gathers before it) -> its state, flat."""

    def __init__(self, prefix: PrefixUNet, split: int, n_layers: int):
        super().__init__()
        self.prefix, self.split, self.n_layers = prefix, split, n_layers

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        h, emb, ehs, res = self.prefix.head(self.split, sample, timestep, encoder_hidden_states,
                                            rest[:self.n_layers], list(rest[self.n_layers:]))
        return (h, emb, ehs, *res)


class _Tail(nn.Module):
    """The rest: (state, masks of the layers from the split on, gathers from it) -> noise prediction."""

    def __init__(self, prefix: PrefixUNet, split: int, n_res: int, n_layers: int):
        super().__init__()
        self.prefix, self.split, self.n_res, self.n_layers = prefix, split, n_res, n_layers

    def forward(self, h, emb, text, *rest):
        res, rest = list(rest[:self.n_res]), rest[self.n_res:]
        return self.prefix.tail(self.split, (h, emb, text, res), rest[:self.n_layers], list(rest[self.n_layers:]))


STATE = ["h", "emb", "text"]  # then res_0, res_1, ...: the head's outputs, the tail's first inputs


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def supported(model: Model) -> str | None:
    """Why this model cannot take the ONNX path, or None. (A UNet with conditions besides the
    text never gets here: `load_model` refuses it.)"""
    if model.device.type != "cpu":
        return f"the model is on {model.device.type} (the onnxruntime path is for CPUs)"
    if next(model.unet.parameters()).dtype != torch.float32:
        return "the search runs in reduced precision (the onnxruntime path is fp32)"
    return None


class OrtUNet:
    """Runs the search graph; a batch is cut into one slice per worker thread, each slice run by a
    single-threaded call of one shared session (onnxruntime releases the GIL). With gather points
    (`prefix.PrefixUNet`), each slice computes each layer once per distinct state its samples need
    there (`prefix.Tree`), and the graph is in two parts cut at `split`: the head's states (one
    per distinct (seed, prompt, masks before the cut)) are kept from pass to pass, so a pass whose
    samples differ only after the cut, as all of refinement's do until it reaches the first
    level's layers, runs the tail alone. `folder` holds `model.onnx`, or `head/` and `tail/`."""

    def __init__(self, folder: Path, layers: list[tuple[str, int]], points: list[str] | None, threads: int,
                 cache_bytes: int = CACHE_BYTES):
        from ..export.onnx import ort_session

        self.folder = Path(folder)
        self.layout = PrefixLayout(layers, points)
        self.points = points
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.cut = None if points is None else Cut.of(layers, points)
        if self.cut is None:
            self.session = ort_session(self.folder / "model.onnx", threads=1)
            return
        self.head = ort_session(self.folder / "head" / "model.onnx", threads=1)
        self.tail = ort_session(self.folder / "tail" / "model.onnx", threads=1)
        self.state_names = [o.name for o in self.head.get_outputs()]
        self.cache = HeadStates(cache_bytes)

    @property
    def split(self) -> int | None:
        """The gather point the graph is cut at; None: one graph, uncut."""
        return None if self.cut is None else self.cut.split

    @property
    def graphs(self) -> list[Path]:
        if self.split is None:
            return [self.folder / "model.onnx"]
        return [self.folder / "head" / "model.onnx", self.folder / "tail" / "model.onnx"]

    def feeds(self, sample: np.ndarray, timestep: float, text: np.ndarray, sets: list | None,
              rows: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
        """The inputs of the whole UNet as one graph (`PrefixUNet`) for these samples, and which
        output row is each sample's (None: one each, in order). `rows`: `row_ids` of the samples,
        where the caller has them already. (A split graph runs these through head and tail.)"""
        return self._feeds(sample, timestep, text, self.layout.mask(sets, len(sample)), rows)

    def _feeds(self, sample: np.ndarray, timestep: float, text: np.ndarray, m: np.ndarray,
               rows: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
        """`feeds` from the samples' mask matrix (`PrefixLayout.mask`)."""
        b = len(sample)
        if self.points is None:
            return {"sample": sample, "timestep": np.full((b,), timestep, dtype=np.float32),
                    "encoder_hidden_states": text, "value_mask": m}, None
        tree = self.layout.tree(m, row_ids(sample, text) if rows is None else rows)
        u = len(tree.rep)
        f = {"sample": sample[tree.rep], "timestep": np.full((u,), timestep, dtype=np.float32),
             "encoder_hidden_states": text[tree.rep]}
        for li, mask in enumerate(tree.masks):
            f[f"mask_{li}"] = mask
        for g, ix in enumerate(tree.gathers):
            f[f"gather_{g}"] = ix
        return f, tree.out

    def run(self, feeds: dict, out: np.ndarray | None) -> np.ndarray:
        y = self.session.run(None, feeds)[0]
        return y if out is None else y[out]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 sets: list | None) -> torch.Tensor:
        b = len(sample)
        x, e, t = sample.float().numpy(), text.float().contiguous().numpy(), float(timestep)
        n = min(self.threads, b)
        if self.split is None and (n == 1 or self.pool is None):
            return torch.from_numpy(self.run(*self.feeds(x, t, e, sets)))
        # Samples that share layers next to each other (in the order of their tree) before the
        # batch is cut over the runs: a subtree cut in two has its shared layers computed in both.
        rows = row_ids(x, e)
        m = self.layout.mask(sets, b)
        order = np.argsort(rows, kind="stable") if self.points is None else self.layout.tree(m, rows).order()
        if self.split is None:
            parts = [self._feeds(x[c], t, e[c], m[c], rows[c]) for c in np.array_split(order, n)]
            work = [lambda part=part: self.run(*part) for part in parts]
        else:
            keys = head_keys(rows, lambda i: x[i].tobytes() + e[i].tobytes(), t, m[:, :self.cut.head_width])
            work = [lambda c=c: self._run_split(x[c], t, e[c], m[c], [keys[i] for i in c])
                    for c in np.array_split(order, n)]
        out = np.empty((b, *x.shape[1:]), dtype=np.float32)
        done = [w() for w in work] if n == 1 or self.pool is None else list(self.pool.map(lambda w: w(), work))
        out[order] = np.concatenate(done)
        return torch.from_numpy(out)

    def _run_split(self, x: np.ndarray, t: float, e: np.ndarray, m: np.ndarray, keys: list[bytes]) -> np.ndarray:
        cut = self.cut
        names, kid, first = distinct(keys)

        def head(missing: list[int]) -> list[tuple[np.ndarray, ...]]:
            i = first[missing]
            return self._run_head(x[i], t, e[i], m[i, :cut.head_width])

        states = self.cache.fetch(names, head)
        tree = cut.tail.tree(m[:, cut.head_width:], kid)  # level -1: the head states, in `names` order
        f = {name: np.stack([st[c] for st in states]) for c, name in enumerate(self.state_names)}
        for li, mask in enumerate(tree.masks):
            f[f"mask_{cut.n_head + li}"] = mask
        for g, ix in enumerate(tree.gathers):
            f[f"gather_{cut.split + g}"] = ix
        return self.tail.run(None, f)[0][tree.out]

    def _run_head(self, x: np.ndarray, t: float, e: np.ndarray, m: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        """The head state of each sample (one sample per distinct key)."""
        tree = self.cut.head.tree(m, row_ids(x, e))
        f = {"sample": x[tree.rep], "timestep": np.full((len(tree.rep),), t, dtype=np.float32),
             "encoder_hidden_states": e[tree.rep]}
        for li, mask in enumerate(tree.masks):
            f[f"mask_{li}"] = mask
        for g, ix in enumerate(tree.gathers[:self.cut.split]):  # the last level has no layers: the identity
            f[f"gather_{g}"] = ix
        outs = self.head.run(None, f)
        return [tuple(o[r].copy() for o in outs) for r in tree.out]

    def clear(self) -> None:
        """Forget the kept head states."""
        if self.cut is not None:
            self.cache.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        self.clear()


def open_ort_unet(model: Model, cache_dir: Path, threads: int | None = None,
                  log: Callable[[str], None] = lambda s: None, digest: str | None = None) -> OrtUNet:
    """The cached graph for this model (exported and checked against torch when missing).
    `digest`: the model's `unet_digest`, where the caller has it already."""
    from ..export.onnx import CHECK_BATCH, DEFAULT_TOLERANCE, check_onnx, export_module

    why = supported(model)
    if why:
        raise NemoError(f"--backend onnxruntime: {why}")
    import onnxruntime

    threads = threads or torch.get_num_threads()
    layers = [(v.path, v.out_features) for v in model.value_layers]
    points = gather_points(model)
    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "unet": digest or unet_digest(model.unet), "layers": layers, "points": points,
        "context": model.context, "opset": OPSET,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnxslim": _version("onnxslim")},
        sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir) / "onnx-search"
    folder = root / key
    plain = _MaskedUNet(model).eval()
    wrapper = plain if points is None else PrefixUNet(model, points).eval()
    cfg = model.unet.config
    size = model.latent_size
    width = sum(w for _, w in layers)

    def make_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
        """`batch` distinct rows; with gather points, one more candidate row at a cut in the middle."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g).float()
        e = torch.randn(batch, model.context, model.text_width, generator=g)
        if points is None:
            return {"sample": x, "timestep": t, "encoder_hidden_states": e,
                    "value_mask": (torch.rand(batch, width, generator=g) > 0.3).float()}
        cut = len(points) // 2
        unit = torch.cat([torch.arange(batch), torch.zeros(1, dtype=torch.int64)])
        d = {"sample": x, "timestep": t, "encoder_hidden_states": e}
        for li, (p, w) in enumerate(layers):
            before = point_of(p, points) < cut
            d[f"mask_{li}"] = (torch.rand(batch if before else batch + 1, w, generator=g) > 0.3).float()
        for gi in range(len(points) + 1):
            d[f"gather_{gi}"] = torch.arange(batch) if gi < cut else (unit if gi == cut else torch.arange(batch + 1))
        return d

    # The graphs to export: the whole UNet, or with gather points its head and tail (`OrtUNet`).
    if points is None:
        graphs = [("search UNet", key, wrapper, make_inputs, ["noise_pred"])]
    else:
        cut = Cut.of(layers, points)
        split, n_head = cut.split, cut.n_head
        n_res = sum(1 for st in wrapper.steps[:wrapper.cut(split)] if st[0] == "push") + 1
        head = _Head(wrapper, split, n_head).eval()
        tail = _Tail(wrapper, split, n_res, len(layers) - n_head).eval()
        state_names = STATE + [f"res_{i}" for i in range(n_res)]

        def in_head(name: str) -> bool:
            """Whether a whole-UNet input (`make_inputs`) feeds the head; the others feed the tail."""
            if name.startswith("mask_"):
                return int(name[5:]) < n_head
            if name.startswith("gather_"):
                return int(name[7:]) < split
            return True  # sample, timestep, encoder_hidden_states

        def head_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
            return {k: v for k, v in make_inputs(batch, seed).items() if in_head(k)}

        @torch.no_grad()
        def tail_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
            d = make_inputs(batch, seed)
            state = head(*(v for k, v in d.items() if in_head(k)))
            return {**dict(zip(state_names, state)), **{k: v for k, v in d.items() if not in_head(k)}}

        graphs = [("search UNet head", f"{key}/head", head, head_inputs, state_names),
                  ("search UNet tail", f"{key}/tail", tail, tail_inputs, ["noise_pred"])]

    try:
        if points is not None:
            diff = same_as_diffusers(wrapper, plain, make_inputs(2, 7))
            if diff is not None:
                raise NemoError(f"the search graph's UNet forward differs from diffusers' by {diff:.3g}")

        def check() -> None:  # at another batch size than the traced one: nothing shape-bound baked in
            for part, sub, module, inputs, outputs in graphs:
                check_onnx(root / sub / "model.onnx", module, inputs(CHECK_BATCH + 1, 1), outputs,
                           DEFAULT_TOLERANCE, part)

        try:
            json.loads((folder / "search.json").read_text(encoding="utf-8"))  # written last: export finished
            check()
            reused = True
            log(f"onnxruntime: reusing the search graph {folder}")
        except (NemoError, OSError, ValueError):
            reused = False  # missing, stale or damaged: export again
        if not reused:
            log("onnxruntime: exporting the UNet with value masks for the search (once per model)")

            def export():
                return [export_module(part, sub, module, inputs, outputs, root, opset=OPSET, check=True, seed=0,
                                      tolerance=DEFAULT_TOLERANCE, external_data=None,
                                      own_batch=points is not None, simplify=True)
                        for part, sub, module, inputs, outputs in graphs]

            unfused = None
            try:
                with fused_attention(model.unet) as n:
                    reps = export() if n else None
                if reps is not None:
                    check()  # against diffusers' own attention, as every reuse checks it
            except NemoError as e:
                unfused = str(e)
                reps = None
            if reps is None:
                if unfused:
                    log(f"onnxruntime: fused attention left out ({unfused})")
                reps = export()
                check()
            fused = sum(fused_nodes(root / sub / "model.onnx") for _, sub, *_ in graphs)
            report = {"tool": __version__, "seconds": round(sum(r.seconds for r in reps), 3),
                      "max_abs_diff": max(r.max_abs_diff for r in reps), "exporter": reps[0].exporter,
                      "onnxruntime": reps[0].onnxruntime, "bytes": sum(r.bytes for r in reps),
                      "gather_points": points, "split": None if points is None else split,
                      "graphs": [str(Path(sub).relative_to(key)) if sub != key else "." for _, sub, *_ in graphs],
                      "simplified": [r.simplified for r in reps], "fused_attention": fused,
                      "unfused_because": unfused}
            (folder / "search.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            log(f"onnxruntime: exported in {report['seconds']:.1f} s ({'; '.join(map(str, report['simplified']))}; "
                f"{fused} attention nodes fused), max |onnxruntime - torch| {report['max_abs_diff']:.2g}")
    finally:
        plain.masks.remove()
        if wrapper is not plain:
            wrapper.masks.remove()
    return OrtUNet(folder, layers, points, threads)
