"""Tiny Stable-Diffusion-shaped models built in code, saved as real diffusers folders."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo"
DEMO_MODEL = DEMO / "model"
SD1_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_unet(kind: str = "sd1", seed: int = 0, text_dim: int = 16, sample_size: int = 16,
              widths: tuple[int, ...] = (8, 16, 16, 16), head_dim: int = 2, layers: int = 2,
              config: dict | None = None) -> UNet2DConditionModel:
    """`config`: further UNet2DConditionModel arguments of an "sd1" UNet, overriding the above."""
    torch.manual_seed(seed)
    if kind == "sd1":
        return UNet2DConditionModel(**{
            **dict(sample_size=sample_size, in_channels=4, out_channels=4,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   block_out_channels=widths, layers_per_block=layers, cross_attention_dim=text_dim,
                   attention_head_dim=head_dim, norm_num_groups=4),
            **(config or {})})
    if kind == "sd2":  # 1024-d text, linear projections, per-block head dims
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(8, 16, 16, 16), layers_per_block=2, cross_attention_dim=1024,
            attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, norm_num_groups=4)
    if kind == "sdxl":  # no attention in the first block, 2 transformer blocks deep, 2048-d text
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 16), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32)
    raise ValueError(kind)


def save_tiny_pipeline(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                       safe_serialization: bool = True, text_dim: int = 16, context: int = 77, **unet: object) -> Path:
    """A complete SD 1.x-layout diffusers folder (random weights) that loads with
    StableDiffusionPipeline.from_pretrained; tokenizer borrowed from the bundled demo, padding to
    `context` tokens (CLIP's 77 by default). `unet`: `tiny_unet`'s shape arguments (sample_size,
    widths, head_dim, layers per block, config)."""
    tok = CLIPTokenizer.from_pretrained(DEMO_MODEL / "tokenizer", model_max_length=context)
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=text_dim, intermediate_size=2 * text_dim,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=context,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=2 * unet.get("sample_size", 16))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=tiny_unet("sd1", seed, text_dim, **unet),
                                   scheduler=DDIMScheduler(**SD1_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=safe_serialization)
    return Path(path)


def cut_down_demo(data: Path, rows: tuple[int, ...] = (7,)) -> Path:
    """A small corpus of the demo (by default the stallion, VM, plus one prompt that is not
    memorized) with its training images, and every 8th reference prompt: a real build on it takes
    seconds, not minutes."""
    import shutil

    (data / "images").mkdir(parents=True, exist_ok=True)
    lines = (DEMO / "mem.csv").read_text().splitlines()
    keep = [lines[0]] + [lines[i] for i in rows]
    for r in keep[1:]:
        shutil.copy(DEMO / r.split(";")[-1], data / "images")
    keep.append("99;a small red circle at the top left on blue background;;VM;99;")  # not memorized
    (data / "mem.csv").write_text("\n".join(keep) + "\n")
    ref = (DEMO / "reference.csv").read_text().splitlines()
    (data / "reference.csv").write_text("\n".join(ref[:1] + ref[1::8]) + "\n")
    return data


# Flags of a cut-down build: 4 scoring seeds, a small calibration, the published layers unpruned
# (a real plan of a few dozen neurons in seconds), 10 DDIM steps when sampling, a one-budget audit
# of one prompt. Not the mid block alone: blocking it barely moves the stallion's noise prediction
# (MS-SSIM 0.9999 against unblocked), so every refinement decision would be a float-noise tie.
CUT_DOWN_BUILD = ["--seeds", "4", "--calibration-prompts", "6", "--allow-partial", "--force",
                  "--audit-prompts", "1", "--audit-steps", "3", "--audit-budgets", "0.2", "--audit-controls", "1",
                  "--audit-seeds", "2", "--sample-steps", "10", "--layers", "official", "--no-prune",
                  "--verify-reference-images", "4"]
