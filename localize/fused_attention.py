"""Exporting the search graph's attention as one onnxruntime `MultiHeadAttention` node.

Why: the TorchScript exporter spells diffusers' scaled-dot-product attention as MatMul, Mul,
Softmax and MatMul, so onnxruntime materializes every (queries x keys) score matrix of the whole
batch, three times over. At the high-resolution blocks that is most of a pass, and its memory
grows with the batch and with the square of the positions: one pass of 128 samples on 32 px
latents (1,024 positions) peaked at 2.9 GB and cost 48.5 ms a sample; with the fused CPU kernel
of the contrib op `com.microsoft.MultiHeadAttention`, 0.76 GB and 30.2 ms. At 64 px latents
(4,096 positions), 32 samples: 13.3 GB and 1,510 ms a sample unfused, against 0.76 GB and 287 ms
fused (torch runs the whole UNet there in 535 ms a sample, at a batch of 10).

Only the exported graph changes: the traced forward computes exactly what diffusers does, and the
graph is still checked against torch when it is opened. An attention module this rewrite does
not cover keeps its own processor, and a graph that will not export, load or check with fused
nodes is exported unfused (`ort_unet`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

DOMAIN = "com.microsoft"


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim)) v over (batch, positions, heads * head_dim) inputs; exported
    as the contrib op, whose default scale is the same."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        b = q.shape[0]

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, v.shape[-1]).to(q.dtype)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op(f"{DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # `fusable` admits equal query and value widths only
        return out


def fusable(attn: nn.Module) -> bool:
    """Whether `attn` is a diffusers Attention running the plain SDPA processor with none of the
    extras that processor applies around the attention itself."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    return (isinstance(attn, Attention) and type(attn.processor) is AttnProcessor2_0
            and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0 and attn.to_q.out_features == attn.to_v.out_features)


class FusedAttnProcessor:
    """diffusers' `AttnProcessor2_0` for the case `fusable` admits, with the attention proper as
    one `_MultiHeadAttention`. The value projection runs as a module call, so the search's value
    masks (hooks on `to_v`) apply as before."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or hidden_states.ndim != 3:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = _MultiHeadAttention.apply(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def fused_attention(module: nn.Module) -> Iterator[int]:
    """Every fusable attention in `module` exports as a fused node while inside; yields how many."""
    swapped = [(m, m.processor) for m in module.modules() if fusable(m)]
    try:
        for m, old in swapped:
            m.processor = FusedAttnProcessor(old)
        yield len(swapped)
    finally:
        for m, old in swapped:
            m.processor = old


def fused_nodes(path: Path) -> int:
    """How many fused attention nodes the graph at `path` holds."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type == "MultiHeadAttention" and n.domain == DOMAIN for n in graph.node)
