"""Diffusers UNet module paths <-> original LDM single-file key names, for the attention blocks.

Follows diffusers' own single-file conversion: LDM numbers the down path as one flat list
`input_blocks` (slot 0 is conv_in, then per block `layers_per_block` resnet+attention slots and
one downsampler slot) and the up path as `output_blocks` (per block `layers_per_block + 1` slots,
no conv_in). Inside a slot, `.0` is the resnet and `.1` the spatial transformer, whose own names
(`transformer_blocks.0.attn2.to_v`, `proj_in`, ...) are the same in both layouts. This holds for
SD 1.x/2.x (layers_per_block=2); other layouts pass their own `layers_per_block`, which a
single-file checkpoint, carrying no config, tells by where its first downsampler sits
(`layers_per_block_of`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import NemoError
from ..model import VALUE_SUFFIX

LDM_PREFIX = "model.diffusion_model."
VALUE_KEY = f"{VALUE_SUFFIX}.weight"

_DIFFUSERS = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)((?:\..+)?)$")
_DIFFUSERS_MID = re.compile(r"^mid_block\.attentions\.(\d+)((?:\..+)?)$")
_LDM = re.compile(r"^" + re.escape(LDM_PREFIX) + r"(input_blocks|output_blocks)\.(\d+)\.1((?:\..+)?)$")
_LDM_MID = re.compile(r"^" + re.escape(LDM_PREFIX) + r"middle_block\.1((?:\..+)?)$")
_LDM_DOWNSAMPLER = re.compile(r"^" + re.escape(LDM_PREFIX) + r"input_blocks\.(\d+)\.0\.op\.")


def layers_per_block_of(keys: Iterable[str]) -> int:
    """An LDM checkpoint's layers_per_block, from its key names: its first downsampler
    (`input_blocks.N.0.op`) follows conv_in and one block's layers, so N = 1 + layers_per_block.
    SD's 2 where the keys show no downsampler."""
    slots = [int(m.group(1)) for k in keys if (m := _LDM_DOWNSAMPLER.match(k))]
    return min(slots) - 1 if slots and min(slots) > 1 else 2


def _check_lpb(layers_per_block: int) -> None:
    if not isinstance(layers_per_block, int) or isinstance(layers_per_block, bool) or layers_per_block < 1:
        raise NemoError(f"layers_per_block must be a positive integer, got {layers_per_block!r}")


def diffusers_to_ldm(path: str, layers_per_block: int = 2) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v[.weight]` ->
    `model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v[.weight]`."""
    _check_lpb(layers_per_block)
    slots = layers_per_block + 1
    if m := _DIFFUSERS.match(path):
        kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "down_blocks":
            # The last slot of each down block is its downsampler, which has no attention.
            if j >= layers_per_block:
                raise NemoError(f"{path}: a down block has {layers_per_block} attentions "
                                f"(layers_per_block={layers_per_block}), index {j} has no LDM key")
            return f"{LDM_PREFIX}input_blocks.{slots * i + j + 1}.1{rest}"
        if j >= slots:
            raise NemoError(f"{path}: an up block has {slots} attentions "
                            f"(layers_per_block={layers_per_block}), index {j} has no LDM key")
        return f"{LDM_PREFIX}output_blocks.{slots * i + j}.1{rest}"
    if m := _DIFFUSERS_MID.match(path):
        if int(m.group(1)) != 0:
            raise NemoError(f"{path}: the SD mid block has one attention (mid_block.attentions.0)")
        return f"{LDM_PREFIX}middle_block.1{m.group(2)}"
    raise NemoError(f"{path}: not a UNet attention path (expected down_blocks.I.attentions.J..., "
                    f"mid_block.attentions.0... or up_blocks.I.attentions.J...)")


def ldm_to_diffusers(key: str, layers_per_block: int = 2) -> str:
    """Inverse of `diffusers_to_ldm`, for keys inside an attention slot (`<slot>.1...`)."""
    _check_lpb(layers_per_block)
    slots = layers_per_block + 1
    if m := _LDM.match(key):
        kind, n, rest = m.group(1), int(m.group(2)), m.group(3)
        # Without attention an up block's upsampler sits at `.1` instead of `.2`: `<slot>.1.conv`
        # is that upsampler, never a transformer.
        if rest == ".conv" or rest.startswith(".conv."):
            raise NemoError(f"{key}: an upsampler, not an attention block")
        if kind == "input_blocks":
            if n == 0 or (n - 1) % slots == layers_per_block:
                raise NemoError(f"{key}: input block {n} is {'conv_in' if n == 0 else 'a downsampler'} "
                                f"(layers_per_block={layers_per_block}), it has no attention")
            i, j = divmod(n - 1, slots)
            return f"down_blocks.{i}.attentions.{j}{rest}"
        i, j = divmod(n, slots)
        return f"up_blocks.{i}.attentions.{j}{rest}"
    if m := _LDM_MID.match(key):
        return f"mid_block.attentions.0{m.group(1)}"
    raise NemoError(f"{key}: not an LDM UNet attention key (expected {LDM_PREFIX}input_blocks.N.1..., "
                    f"middle_block.1... or output_blocks.N.1...)")


def value_layer_of(key: str, layers_per_block: int = 2) -> str | None:
    """The module path of a value layer's weight key, in LDM or diffusers naming (a bare
    diffusers UNet file has no prefix), so that plans and digests name a single file's layers as
    the diffusers folder does; None for any other key. An LDM value key outside any attention
    slot raises (NemoError)."""
    if not key.endswith(VALUE_KEY):
        return None
    name = key[: -len(".weight")]
    return ldm_to_diffusers(name, layers_per_block) if name.startswith(LDM_PREFIX) else name
