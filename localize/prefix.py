"""Computing once what the candidates of a pass share: the UNet up to the first layer where their
masks differ.

Why: a pass holds several candidate neuron sets for the same few (seed, prompt) rows, and the
candidates differ only from some layer on (refinement walks one layer at a time, the initial
selection's steps differ everywhere). `PrefixUNet` is the UNet written out block by block with a
row gather before each down/mid transformer block and before the up path: the caller feeds one
row per distinct (seed, prompt) and, at the cut, gathers them out to one row per candidate.

Used by both backends: onnxruntime runs it as an exported graph (`ort_unet`), torch runs it
eagerly (`TorchPrefixUNet`). Layouts other than SD 1.x/2.x get the plain UNet (`gather_points`
returns None).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..model import Model
from .masks import NeuronSet, ValueMasks


class PrefixUNet(nn.Module):
    """UNet(sample, timestep, text, mask_0..mask_{L-1}, gather_0..gather_G) -> noise prediction.
    `mask_i` holds layer i's masks for the rows it sees (distinct rows before the cut, candidates
    after); `gather_g` the rows to take before gather point g. Run eagerly, a gather may be None:
    the identity, without copying."""

    def __init__(self, model: Model, points: list[str]):
        super().__init__()
        self.unet = model.unet
        self.masks = ValueMasks(model)
        self.paths = [v.path for v in model.value_layers]
        self.points = points  # `gather_points(model)`: the forward gathers before each, then before the up path

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor | None) -> torch.Tensor:
        u = self.unet
        masks, gathers = rest[:len(self.paths)], list(rest[len(self.paths):])
        self.masks._masks = dict(zip(self.paths, masks))
        try:
            emb = u.time_embedding(u.time_proj(timestep).to(sample.dtype))
            if u.time_embed_act is not None:
                emb = u.time_embed_act(emb)
            ehs = encoder_hidden_states
            h = u.conv_in(sample)
            res = [h]

            def gather(h, emb, ehs, res):
                idx = gathers.pop(0)
                if idx is None:
                    return h, emb, ehs, res
                return h[idx], emb[idx], ehs[idx], [r[idx] for r in res]

            for block in u.down_blocks:
                for i, resnet in enumerate(block.resnets):
                    h = resnet(h, emb)
                    if getattr(block, "has_cross_attention", False):
                        h, emb, ehs, res = gather(h, emb, ehs, res)
                        h = block.attentions[i](h, encoder_hidden_states=ehs, return_dict=False)[0]
                    res.append(h)
                for down in block.downsamplers or ():
                    h = down(h)
                if block.downsamplers:
                    res.append(h)
            mid = u.mid_block
            h = mid.resnets[0](h, emb)
            for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
                h, emb, ehs, res = gather(h, emb, ehs, res)
                h = attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
                h = resnet(h, emb)
            h, emb, ehs, res = gather(h, emb, ehs, res)
            for block in u.up_blocks:
                n = len(block.resnets)
                skip, res = tuple(res[-n:]), res[:-n]
                if getattr(block, "has_cross_attention", False):
                    h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skip, encoder_hidden_states=ehs)
                else:
                    h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skip)
            if u.conv_norm_out is not None:
                h = u.conv_act(u.conv_norm_out(h))
            return u.conv_out(h)
        finally:
            self.masks._masks = {}


def gather_points(model: Model) -> list[str] | None:
    """Module paths of the transformer blocks a `PrefixUNet` gathers before (then one more before
    the up path), or None where the UNet is not laid out as that forward assumes. (Its forward
    leaves out class and added embeddings: `load_model` refuses UNets that take them.)"""
    from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, DownBlock2D,
                                                       UNetMidBlock2DCrossAttn)

    u = model.unet
    cfg = u.config
    if (cfg.center_input_sample or not isinstance(u.mid_block, UNetMidBlock2DCrossAttn)
            or model.latent_size % 2 ** getattr(u, "num_upsamplers", 0)):
        return None
    points = []
    for i, block in enumerate(u.down_blocks):
        if type(block) not in (CrossAttnDownBlock2D, DownBlock2D):
            return None
        if isinstance(block, CrossAttnDownBlock2D):
            points += [f"down_blocks.{i}.attentions.{j}." for j in range(len(block.attentions))]
    points += [f"mid_block.attentions.{j}." for j in range(len(u.mid_block.attentions))]
    return points


def point_of(path: str, points: list[str]) -> int:
    """The gather point a value layer's rows come from: its own transformer block's, or for an
    up-path layer the one before the up path (len(points))."""
    return next((g for g, q in enumerate(points) if path.startswith(q)), len(points))


def row_ids(sample: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Each sample's (latent, prompt) row, numbered in order of first appearance."""
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(sample[i].tobytes() + text[i].tobytes(), len(seen))
                     for i in range(len(sample))], dtype=np.int64)


class PrefixLayout:
    """The value masks of a pass as one (batch, width) matrix, and where a pass's candidates part."""

    def __init__(self, layers: list[tuple[str, int]], points: list[str] | None):
        self.layers = layers
        self.points = points
        self.width = sum(w for _, w in layers)
        self.offsets: dict[str, int] = {}
        at = 0
        for p, w in layers:
            self.offsets[p] = at
            at += w
        self.point_of = [point_of(p, points) for p, _ in layers] if points is not None else []

    def mask(self, sets: list[NeuronSet] | None, batch: int) -> np.ndarray:
        """(batch, width) ones, with a 0 for each neuron `sets[i]` deactivates in sample i."""
        m = np.ones((batch, self.width), dtype=np.float32)
        for i, s in enumerate(sets or ()):
            for path, rows in s.items():
                if rows:
                    m[i, [self.offsets[path] + r for r in rows]] = 0.0
        return m

    def cut(self, m: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(rep, unit, cut): the first sample of each distinct row, each sample's row, and the
        gather point before the first layer whose masks differ within a row (len(points): none
        before the up path)."""
        _, rep, unit = np.unique(rows, return_index=True, return_inverse=True)
        rep_of = rep[unit]
        for li, (path, w) in enumerate(self.layers):
            o = self.offsets[path]
            if not np.array_equal(m[:, o:o + w], m[rep_of, o:o + w]):
                return rep, unit, self.point_of[li]
        return rep, unit, len(self.points)

    def layer_masks(self, m: np.ndarray, rep: np.ndarray, cut: int) -> list[np.ndarray]:
        """Each layer's masks for the rows it sees: distinct rows before the cut, samples after."""
        out = []
        for li, (path, w) in enumerate(self.layers):
            o = self.offsets[path]
            out.append(m[rep, o:o + w] if self.point_of[li] < cut else m[:, o:o + w])
        return out


class TorchPrefixUNet:
    """The search's UNet pass on torch with the shared prefix computed once per distinct (seed,
    prompt) row; called as the Scorer calls a UNet (inputs on the model's device, in its dtype)."""

    def __init__(self, model: Model, points: list[str]):
        self.module = PrefixUNet(model, points).eval()
        self.layout = PrefixLayout([(v.path, v.out_features) for v in model.value_layers], points)
        self.device = model.device

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 sets: list[NeuronSet] | None) -> torch.Tensor:
        b = len(sample)
        # Exact equality of whole rows: the search stacks copies of the same latents and embedding.
        _, xi = torch.unique(sample.reshape(b, -1), dim=0, return_inverse=True)
        _, ei = torch.unique(text.reshape(b, -1), dim=0, return_inverse=True)
        rows = (xi * b + ei).cpu().numpy()
        m = self.layout.mask(sets, b)
        rep, unit, cut = self.layout.cut(m, rows)
        dev = self.device
        masks = [torch.from_numpy(x).to(dev) for x in self.layout.layer_masks(m, rep, cut)]
        gathers = [torch.from_numpy(unit).to(dev) if g == cut else None for g in range(len(self.layout.points) + 1)]
        r = torch.from_numpy(rep).to(dev)
        return self.module(sample[r], timestep.to(dev).expand(len(rep)), text[r], *masks, *gathers)

    def close(self) -> None:
        self.module.masks.remove()


@torch.no_grad()
def same_as_diffusers(prefix: PrefixUNet, forward, inputs: dict[str, torch.Tensor], rtol: float = 1e-4,
                      atol: float = 1e-5) -> float | None:
    """The block-by-block forward against diffusers' (`forward(sample, timestep, text,
    masks)`), with every gather the identity: the largest difference where they disagree beyond
    the tolerance, else None. `inputs`: sample, timestep, encoder_hidden_states and mask_0, ...
    (other keys are ignored)."""
    n = len(inputs["sample"])
    masks = [inputs[k][:n] for k in inputs if k.startswith("mask_")]
    gathers = [torch.arange(n, device=inputs["sample"].device)] * (len(prefix.points) + 1)
    got = prefix(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], *masks, *gathers)
    want = forward(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], torch.cat(masks, dim=1))
    if torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        return None
    return float((got.float() - want.float()).abs().max())
