"""Generation-level measures that need no downloaded weights: full sampling with the model's own
pipeline parts, SSIM to training images (scikit-image), nearest training image, diversity across
seeds. Used by the demo check and by verification (before vs after surgery)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from .errors import NemoError
from .model import Model

REPRODUCED_ABOVE = 0.5  # share of seeds whose nearest image is the target: a majority reproduces it
# SSIM to the training image as the model's own VAE reconstructs it (the closest the model can
# draw it) from which a generation nearest to that image counts as a near-copy of it.
COPY_SSIM = 0.6
# The nearest-image search compares images of at most this size (box-averaged down): it is the
# one measure that grows with the square of the corpus (every generation against every training
# image), and SSIM costs 36 ms at 512 px against 1.7 ms at 128. SSIM to the own image and to its
# reconstruction stay at full size.
NEAREST_PX = 128
GUIDANCE = 7.5  # Stable Diffusion's default classifier-free guidance for sampling
STEPS = 50


@dataclass(frozen=True)
class GenSettings:
    steps: int = STEPS
    guidance: float = GUIDANCE
    seeds: tuple[int, ...] = (0, 1, 2, 3)


def pipeline(model: Model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    class Pipeline(StableDiffusionPipeline):
        def check_inputs(self, prompt, height, width, *args, **kwargs):
            # diffusers wants sizes divisible by 8, Stable Diffusion's VAE factor. A VAE that
            # downsamples less draws images that need not be (10 px latents through a 2x VAE:
            # 20 px), and we always pass latents of the model's own size; the other checks stay.
            return super().check_inputs(prompt, 8, 8, *args, **kwargs)

    pipe = Pipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_size(model: Model) -> int:
    return model.latent_size * 2 ** (len(model.vae.config.block_out_channels) - 1)


@torch.no_grad()
def generate(model: Model, prompts: list[str], settings: GenSettings = GenSettings(),
             batch: int = 64) -> np.ndarray:
    """Images for every (prompt, seed): float array (prompts, seeds, H, W, 3) in [0, 1]."""
    emb, uncond = encode(model, prompts)
    return generate_embeddings(model, emb, uncond, settings, batch)


def encode(model: Model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings (N, T, D), the empty prompt's embedding (1, T, D)) exactly as the
    pipeline computes them, so that sampling from embeddings matches sampling from text."""
    pipe = pipeline(model)
    with torch.no_grad():
        emb, uncond = pipe.encode_prompt(prompts, model.device, 1, True)
    return emb, uncond[:1]


@torch.no_grad()
def generate_embeddings(model: Model, emb: torch.Tensor, uncond: torch.Tensor,
                        settings: GenSettings = GenSettings(), batch: int = 64, pipe=None) -> np.ndarray:
    """Images for every (embedding, seed) with classifier-free guidance against `uncond`. Seeds
    come from CPU generators, so the same seed gives the same image on any device."""
    pipe = pipe or pipeline(model)
    size = image_size(model)
    pairs = [(i, s) for i in range(len(emb)) for s in settings.seeds]
    c, n = model.unet.config.in_channels, model.latent_size
    out = []
    for k in range(0, len(pairs), batch):
        chunk = pairs[k:k + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        lat = torch.stack([torch.randn((c, n, n), generator=g) for g in gens]).to(model.device, model.unet.dtype)
        e = emb[[i for i, _ in chunk]].to(model.device, model.unet.dtype)
        imgs = pipe(prompt_embeds=e, negative_prompt_embeds=uncond.to(e).expand(len(e), -1, -1),
                    height=size, width=size, num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance, latents=lat, output_type="np").images
        out.append(imgs)
    return np.concatenate(out).reshape(len(emb), len(settings.seeds), size, size, 3).astype(np.float32)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


def load_image(path: Path, size: int) -> np.ndarray:
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for unreadable files
        raise NemoError(f"{path}: not a readable image ({type(e).__name__})") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


@torch.no_grad()
def reconstruct(model: Model, image: np.ndarray) -> np.ndarray:
    """The VAE's round trip of an image: the closest the model can possibly draw it."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(model.device, model.vae.dtype) * 2 - 1
    z = model.vae.encode(x).latent_dist.mean
    y = model.vae.decode(z).sample
    return ((y[0].permute(1, 2, 0).float().cpu().numpy() + 1) / 2).clip(0, 1)


def thumbnail(image: np.ndarray, px: int = NEAREST_PX) -> np.ndarray:
    """`image` box-averaged down to at most `px` on its longer side; smaller ones as they are."""
    h, w = image.shape[:2]
    if max(h, w) <= px:
        return image
    f = px / max(h, w)
    img = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    small = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def thumbnails(candidates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidates made ready for the nearest-image search once, not at every query."""
    return {k: thumbnail(v) for k, v in candidates.items()}


def _nearest(image: np.ndarray, candidates: dict[str, np.ndarray]) -> str:
    """The candidate most similar (SSIM) to `image`, compared as thumbnails."""
    q = thumbnail(image)
    sims = {k: ssim(q, thumbnail(v)) for k, v in candidates.items()}
    return max(sims, key=sims.get)


def nearest_share(images: np.ndarray, own: str, candidates: dict[str, np.ndarray]) -> float:
    """Share of `images` whose most similar candidate (SSIM) is `own`: the generation-level test of
    whether a prompt draws its training image rather than merely something like it."""
    return sum(_nearest(x, candidates) == own for x in images) / len(images)


def nearest_and_copy_share(images: np.ndarray, own: str, candidates: dict[str, np.ndarray],
                           reconstruction: np.ndarray, threshold: float = COPY_SSIM) -> tuple[float, float]:
    """`nearest_share`, and the share of `images` that are near-copies of `own`: it is their
    nearest candidate AND they are within `threshold` SSIM of its reconstruction. The second is
    stricter: the first also counts a degraded image that merely resembles its training image more
    than any other."""
    nearest = [x for x in images if _nearest(x, candidates) == own]
    copies = sum(ssim(x, reconstruction) >= threshold for x in nearest)
    return len(nearest) / len(images), copies / len(images)


def diversity(images: np.ndarray) -> float:
    """1 - mean pairwise SSIM across seeds: 0 when every seed gives the same image."""
    n = len(images)
    pairs = [ssim(images[i], images[j]) for i in range(n) for j in range(i + 1, n)]
    return float(1 - np.mean(pairs)) if pairs else 0.0
