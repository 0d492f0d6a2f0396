"""Deactivating neurons during a forward pass: per-sample masks on the value outputs.

The one place that hooks the UNet. A mask multiplies each to_v output feature for every token;
because to_v has no bias, a 0 here is exactly what zeroing that row of the weight does, so the
search (masks) and the surgery (zeroed rows) agree bit for bit. Masks are per sample, so one
batched UNet pass can evaluate many candidate neuron sets side by side.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from ..model import Model

# layer path -> neuron indices
NeuronSet = Mapping[str, "frozenset[int] | set[int] | list[int]"]


class ValueMasks:
    def __init__(self, model: Model):
        self._masks: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer in model.value_layers:
            mod = model.to_v(layer.path)
            self._handles.append(mod.register_forward_hook(self._hook(layer.path)))
        self.widths = {v.path: v.out_features for v in model.value_layers}

    def _hook(self, path: str):
        def hook(_mod, _inp, out):
            m = self._masks.get(path)
            if m is None:
                return out
            # out is (batch, tokens, features); m is (batch, features)
            return out * m.to(out.dtype)[:, None, :]
        return hook

    @contextlib.contextmanager
    def active(self, sets: list[NeuronSet] | None, device: torch.device) -> Iterator[None]:
        """Within the block, sample i of the next forward pass has neurons `sets[i]` off."""
        self._masks = {} if sets is None else self.build(sets, device)
        try:
            yield
        finally:
            self._masks = {}

    def build(self, sets: list[NeuronSet], device: torch.device) -> dict[str, torch.Tensor]:
        # Filled on the CPU and moved once per layer: on a GPU, one indexed write per sample and
        # layer would be a kernel launch each (over a thousand per batch of candidates).
        masks: dict[str, torch.Tensor] = {}
        for i, s in enumerate(sets):
            for path, rows in s.items():
                if not rows:
                    continue
                if path not in masks:
                    masks[path] = torch.ones(len(sets), self.widths[path])
                masks[path][i, list(rows)] = 0.0
        return {path: m.to(device) for path, m in masks.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
