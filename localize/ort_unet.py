"""The search's UNet pass on ONNX Runtime, for CPUs.

Why: a localization is thousands of first-step UNet samples in small batches. On a CPU, torch's
eager dispatch of a diffusers UNet costs more per sample than ONNX Runtime running the same graph,
and one single-threaded run per core over a slice of the batch uses the cores better than
intra-op threads do on such small tensors (demo model, 2 cores: 7.4 ms per sample in torch at a
batch of 10; 4.7 ms in onnxruntime on 2 threads; 3.3 ms on 2 single-threaded runs side by side).

The graph is the model's UNet with one extra input, `value_mask` (batch, sum of the value layers'
widths): every `attn2.to_v` output is multiplied by its slice, exactly as `ValueMasks` does in
torch, so one graph evaluates any candidate neuron sets side by side. It is exported once per
model (keyed by a hash of every UNet weight, not only the value layers), cached, and checked
against torch whenever it is opened. Its results agree with torch within float noise, not bit for
bit: decisions that close to a threshold are reported as such by the search, and verification's
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
from ..model import Model
from .masks import ValueMasks
from .score import MAX_TOKENS

FORMAT = 1  # bump when the graph's inputs or outputs change
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


def unet_digest(model: Model) -> str:
    """sha256 over every UNet tensor (the model fingerprint covers only the value layers and the
    text encoder, but the graph bakes in all weights)."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(model.unet.config), sort_keys=True, default=str).encode())
    for name, t in model.unet.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def supported(model: Model) -> str | None:
    """Why this model cannot take the ONNX path, or None."""
    cfg = model.unet.config
    if model.device.type != "cpu":
        return f"the model is on {model.device.type} (the onnxruntime path is for CPUs)"
    if next(model.unet.parameters()).dtype != torch.float32:
        return "the search runs in reduced precision (the onnxruntime path is fp32)"
    if cfg.class_embed_type is not None or cfg.addition_embed_type is not None:
        return "the UNet needs conditioning other than text (SDXL-style added conditions)"
    return None


class OrtUNet:
    """Runs the masked UNet graph; a batch is cut into one slice per worker thread, each slice
    run by a single-threaded call of one shared session (onnxruntime releases the GIL)."""

    def __init__(self, path: Path, layers: list[tuple[str, int]], threads: int, report: dict):
        from ..export.onnx import ort_session

        self.path = Path(path)
        self.layers = layers
        self.width = sum(w for _, w in layers)
        self.offsets: dict[str, int] = {}
        at = 0
        for p, w in layers:
            self.offsets[p] = at
            at += w
        self.threads = max(1, threads)
        self.session = ort_session(self.path, threads=1)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.report = report

    def mask(self, sets: list | None, batch: int) -> np.ndarray:
        """(batch, width) ones, with a 0 for each neuron `sets[i]` deactivates in sample i."""
        m = np.ones((batch, self.width), dtype=np.float32)
        for i, s in enumerate(sets or ()):
            for path, rows in s.items():
                if rows:
                    m[i, [self.offsets[path] + r for r in rows]] = 0.0
        return m

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 sets: list | None) -> torch.Tensor:
        b = len(sample)
        feeds = {"sample": sample.float().numpy(), "timestep": np.full((b,), float(timestep), dtype=np.float32),
                 "encoder_hidden_states": text.float().contiguous().numpy(), "value_mask": self.mask(sets, b)}
        n = min(self.threads, b)
        if n == 1 or self.pool is None:
            return torch.from_numpy(self.session.run(None, feeds)[0])
        cuts = np.array_split(np.arange(b), n)
        parts = [{k: v[c[0]:c[-1] + 1] for k, v in feeds.items()} for c in cuts]
        outs = list(self.pool.map(lambda f: self.session.run(None, f)[0], parts))
        return torch.from_numpy(np.concatenate(outs))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None


def open_ort_unet(model: Model, cache_dir: Path, threads: int | None = None,
                  log: Callable[[str], None] = lambda s: None) -> OrtUNet:
    """The cached graph for this model (exported and checked against torch when missing)."""
    from ..export.onnx import CHECK_BATCH, DEFAULT_TOLERANCE, check_onnx, export_module

    why = supported(model)
    if why:
        raise NemoError(f"--backend onnxruntime: {why}")
    import onnxruntime

    threads = threads or torch.get_num_threads()
    layers = [(v.path, v.out_features) for v in model.value_layers]
    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "unet": unet_digest(model), "layers": layers, "opset": OPSET,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir) / "onnx-search"
    folder = root / key
    wrapper = _MaskedUNet(model).eval()
    cfg = model.unet.config
    size = model.latent_size
    width = sum(w for _, w in layers)

    def make_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
                "timestep": torch.randint(0, 1000, (batch,), generator=g).float(),
                "encoder_hidden_states": torch.randn(batch, MAX_TOKENS, cfg.cross_attention_dim, generator=g),
                "value_mask": (torch.rand(batch, width, generator=g) > 0.3).float()}

    try:
        report = None
        if (folder / "model.onnx").is_file():
            try:
                check_onnx(folder / "model.onnx", wrapper, make_inputs(CHECK_BATCH, 1), ["noise_pred"],
                           DEFAULT_TOLERANCE, "search UNet")
                report = json.loads((folder / "search.json").read_text(encoding="utf-8"))
                log(f"onnxruntime: reusing the search graph {folder}")
            except (NemoError, OSError, ValueError):
                report = None  # stale or damaged: export again
        if report is None:
            log("onnxruntime: exporting the UNet with value masks for the search (once per model)")
            r = export_module("search UNet", key, wrapper, make_inputs, ["noise_pred"], root, opset=OPSET,
                              check=True, seed=0, tolerance=DEFAULT_TOLERANCE, external_data=None)
            report = {"tool": __version__, "seconds": r.seconds, "max_abs_diff": r.max_abs_diff,
                      "exporter": r.exporter, "onnxruntime": r.onnxruntime, "bytes": r.bytes}
            (folder / "search.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            log(f"onnxruntime: exported in {r.seconds:.1f} s, max |onnxruntime - torch| {r.max_abs_diff:.2g}")
    finally:
        wrapper.masks.remove()
    return OrtUNet(folder / "model.onnx", layers, threads, report)
