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
(demo: x1.25 on top of the runtime; other layouts get the plain graph). The exported graph is
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
from .prefix import PrefixLayout, PrefixUNet, gather_points, point_of, row_ids, same_as_diffusers


FORMAT = 4  # bump when the graph's inputs, outputs or rewriting change
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
    there (`prefix.Tree`)."""

    def __init__(self, path: Path, layers: list[tuple[str, int]], points: list[str] | None, threads: int):
        from ..export.onnx import ort_session

        self.path = Path(path)
        self.layout = PrefixLayout(layers, points)
        self.points = points
        self.threads = max(1, threads)
        self.session = ort_session(self.path, threads=1)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def feeds(self, sample: np.ndarray, timestep: float, text: np.ndarray, sets: list | None,
              rows: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
        """The graph's inputs for these samples, and which output row is each sample's (None:
        one each, in order). `rows`: `row_ids` of the samples, where the caller has them already."""
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
        if n == 1 or self.pool is None:
            return torch.from_numpy(self.run(*self.feeds(x, t, e, sets)))
        # Samples that share layers next to each other (in the order of their tree) before the
        # batch is cut over the runs: a subtree cut in two has its shared layers computed in both.
        rows = row_ids(x, e)
        m = self.layout.mask(sets, b)
        order = np.argsort(rows, kind="stable") if self.points is None else self.layout.tree(m, rows).order()
        parts = [self._feeds(x[c], t, e[c], m[c], rows[c]) for c in np.array_split(order, n)]
        out = np.empty((b, *x.shape[1:]), dtype=np.float32)
        out[order] = np.concatenate(list(self.pool.map(lambda part: self.run(*part), parts)))
        return torch.from_numpy(out)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None


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
        e = torch.randn(batch, model.context, cfg.cross_attention_dim, generator=g)
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

    try:
        if points is not None:
            diff = same_as_diffusers(wrapper, plain, make_inputs(2, 7))
            if diff is not None:
                raise NemoError(f"the search graph's UNet forward differs from diffusers' by {diff:.3g}")

        def check() -> None:  # at another batch size than the traced one: nothing shape-bound baked in
            check_onnx(folder / "model.onnx", wrapper, make_inputs(CHECK_BATCH + 1, 1), ["noise_pred"],
                       DEFAULT_TOLERANCE, "search UNet")

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
                return export_module("search UNet", key, wrapper, make_inputs, ["noise_pred"], root, opset=OPSET,
                                     check=True, seed=0, tolerance=DEFAULT_TOLERANCE, external_data=None,
                                     own_batch=points is not None, simplify=True)

            unfused = None
            try:
                with fused_attention(model.unet) as n:
                    r = export() if n else None
                if r is not None:
                    check()  # against diffusers' own attention, as every reuse checks it
            except NemoError as e:
                unfused = str(e)
                r = None
            if r is None:
                if unfused:
                    log(f"onnxruntime: fused attention left out ({unfused})")
                r = export()
                check()
            fused = fused_nodes(folder / "model.onnx")
            report = {"tool": __version__, "seconds": r.seconds, "max_abs_diff": r.max_abs_diff,
                      "exporter": r.exporter, "onnxruntime": r.onnxruntime, "bytes": r.bytes,
                      "gather_points": points, "simplified": r.simplified, "fused_attention": fused,
                      "unfused_because": unfused}
            (folder / "search.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            log(f"onnxruntime: exported in {r.seconds:.1f} s ({r.simplified}; {fused} attention nodes fused), "
                f"max |onnxruntime - torch| {r.max_abs_diff:.2g}")
    finally:
        plain.masks.remove()
        if wrapper is not plain:
            wrapper.masks.remove()
    return OrtUNet(folder / "model.onnx", layers, points, threads)
