"""Diffusers folder -> original single-file checkpoint (LDM key names), streaming.

The renaming follows diffusers' own conversion conventions (its
`convert_diffusers_to_original_stable_diffusion` script), generalised to the folder's UNet and
VAE configs (levels, layers per block, which blocks have attention). A rename changes no bytes:
a tensor's data is copied as is, and the VAE's attention projections only change their recorded
shape from [C, C] to the [C, C, 1, 1] of the 1x1 convolutions the LDM code uses. So the output
holds one tensor's bytes at a time in memory, like the surgery itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import NemoError
from ..files import atomic_path
from ..safetensors_io import Header, TensorEntry, encode_header, read_header

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


def _unet_map(cfg: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    whole = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    if not isinstance(lpb, int):
        # The LDM layout numbers its slots with one count for every level; diffusers allows one
        # per level, which no single file can name.
        if len(set(lpb)) != 1:
            raise NemoError(f"the UNet has a different number of layers per level (layers_per_block="
                            f"{tuple(lpb)}), which the single-file (LDM) layout cannot express; keep it as a "
                            f"diffusers folder")
        lpb = lpb[0]
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    layer: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(lpb):
            layer.append((f"input_blocks.{(lpb + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                layer.append((f"input_blocks.{(lpb + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            layer.append((f"output_blocks.{(lpb + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                layer.append((f"output_blocks.{(lpb + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            layer.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up_attn[i] else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return whole, resnet, layer


def unet_key(name: str, cfg: dict) -> str:
    whole, resnet, layer = _unet_map(cfg)
    for sd, hf in whole:
        if name.startswith(hf):
            return UNET_PREFIX + sd + name[len(hf):]
    if "resnets" in name:
        for sd, hf in resnet:
            name = name.replace(hf, sd)
    for sd, hf in layer:
        if name.startswith(hf):
            name = sd + name[len(hf):]
            break
    return UNET_PREFIX + name


def vae_key(name: str, cfg: dict) -> tuple[str, bool]:
    """LDM name of a VAE tensor, and whether it is an attention projection stored as a 1x1 conv."""
    n = len(cfg["block_out_channels"])
    rules = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(cfg["layers_per_block"]):
            rules.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            rules.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            rules.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(cfg["layers_per_block"] + 1):
            rules.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        rules.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    out = name
    for sd, hf in rules:
        out = out.replace(hf, sd)
    conv = False
    if "mid.attn_1." in out:
        for sd, hf in (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                       ("proj_out.", "to_out.0.")):
            if hf in out:
                out = out.replace(hf, sd)
                conv = not sd.startswith("norm")
                break
    return VAE_PREFIX + out, conv


def _part(folder: Path, part: str) -> tuple[dict, list[Header]]:
    d = folder / part
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise NemoError(f"{d}: config.json missing")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise NemoError(f"{d}: no safetensors weights")
    return json.loads(cfg_file.read_text()), [read_header(f) for f in files]


def to_single_file(model: Path, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the UNet, VAE and text encoder of a diffusers folder as one LDM-named .safetensors."""
    model, out = Path(model), Path(out)
    entries: list[tuple[Header, TensorEntry, str, tuple[int, ...]]] = []
    ucfg, uheads = _part(model, "unet")
    vcfg, vheads = _part(model, "vae")
    _, theads = _part(model, "text_encoder")
    try:
        for h in uheads:
            entries += [(h, t, unet_key(t.name, ucfg), t.shape) for t in h.tensors.values()]
    except NemoError as e:
        raise NemoError(f"{model / 'unet'}: {e}") from None
    for h in vheads:
        for t in h.tensors.values():
            name, conv = vae_key(t.name, vcfg)
            entries.append((h, t, name, t.shape + (1, 1) if conv and len(t.shape) == 2 else t.shape))
    for h in theads:
        # transformers >= 5 saves CLIPTextModel without its `text_model.` level; LDM keys keep it.
        entries += [(h, t, TEXT_PREFIX + (t.name if t.name.startswith("text_model.") else "text_model." + t.name),
                     t.shape) for t in h.tensors.values()]
    names = [e[2] for e in entries]
    if len(set(names)) != len(names):
        raise NemoError(f"{model}: two tensors map to the same single-file key (unsupported layout)")
    new, offset = [], 0
    for _, t, name, shape in entries:
        size = t.end - t.begin
        new.append(TensorEntry(name, t.dtype, shape, offset, offset + size))
        offset += size
    meta = {"format": "pt"} | (metadata or {})
    with atomic_path(out) as tmp, open(tmp, "wb") as fo:
        fo.write(encode_header(new, meta))
        for h, t, _, _ in entries:
            with open(h.path, "rb") as fi:
                fi.seek(h.data_start + t.begin)
                remaining = t.end - t.begin
                while remaining:
                    chunk = fi.read(min(remaining, 1 << 24))
                    fo.write(chunk)
                    remaining -= len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return out
