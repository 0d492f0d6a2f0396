"""Generation-level measures that need no downloaded weights: full sampling with the model's own
pipeline parts, SSIM to training images (scikit-image), nearest training image, diversity across
seeds. Used by the demo check and by verification (before vs after surgery)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """Images for every (prompt, seed): float array (prompts, seeds, H, W, 3) in [0, 1], holding
    the 8-bit images the pipeline saves (`as_8bit`)."""
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
    return as_8bit(np.concatenate(out)).reshape(len(emb), len(settings.seeds), size, size, 3)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as the 8-bit pixels a pipeline's PIL images hold (diffusers rounds)."""
    # C order: safetensors writes an array's memory as it lies
    return np.ascontiguousarray(np.round(np.clip(images, 0, 1) * 255), dtype=np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255)


def as_8bit(images: np.ndarray) -> np.ndarray:
    """`images` rounded to the 8-bit pixels a user of the pipeline gets, as float32. Every
    measure is taken on these, so a kept copy stored as uint8 (a quarter of float32's 3 MB an
    image at 512 px) reads back as exactly what sampling gave, and a resumed run
    decides as a fresh one does."""
    return from_uint8(to_uint8(images))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


def load_image(path: Path, size: int) -> np.ndarray:
    return from_uint8(load_pixels(path, size))


def load_pixels(path: Path, size: int) -> np.ndarray:
    """The image at `path` as (size, size, 3) uint8, resized where it is not that size."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for unreadable files
        raise NemoError(f"{path}: not a readable image ({type(e).__name__})") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


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
    small = Image.fromarray(to_uint8(image)).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                    Image.Resampling.BOX)
    return from_uint8(np.asarray(small))


# scikit-image's SSIM defaults, which `ssim` uses: a 7 px uniform window, sample covariance.
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Bytes of one tensor of image pairs in the batched search: a few such tensors live at once, so a
# block stays near a hundred megabytes whatever the corpus.
PAIR_CHUNK_BYTES = 32 * 2**20


class Gallery:
    """Training images made ready for the nearest-image search once: thumbnails, stacked, with
    their half of SSIM (local means and variances) computed up front. `nearest` then scores every
    query against every image in batched torch: the same SSIM as `ssim` (scikit-image's, in
    float32 as it computes for float32 images; the two agree to about 1e-6, the order of the sums
    differing), for blocks of pairs at once on every core instead of one pair at a time."""

    def __init__(self, images: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]):
        # Given (key, image) pairs as they are loaded, only one full-size image is held at a time:
        # a corpus of 500 training images at 512 px is 1.6 GB in float32, its thumbnails 98 MB.
        self.keys, thumbs = [], []
        for k, v in images.items() if isinstance(images, Mapping) else images:
            self.keys.append(k)
            thumbs.append(thumbnail(v))
        if not self.keys:  # nothing to compare against: fine until something is queried
            return
        self._y = _channels_first(np.stack(thumbs))
        if min(self._y.shape[-2:]) < SSIM_WINDOW:
            raise NemoError(f"images of {tuple(self._y.shape[-2:])} px are smaller than SSIM's "
                            f"{SSIM_WINDOW} px window")
        self._uy, self._vy = _local_stats(self._y)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) at which images are compared."""
        return tuple(self._y.shape[-2:]) if self.keys else (0, 0)

    @torch.no_grad()
    def similarities(self, images: np.ndarray) -> np.ndarray:
        """SSIM of each image (N, H, W, 3) to each gallery image, compared as thumbnails: (N, len)."""
        if not self.keys:
            raise ValueError("no images to compare against")
        x = _channels_first(np.stack([thumbnail(v) for v in images]))
        if x.shape[1:] != self._y.shape[1:]:
            raise ValueError(f"images of {tuple(x.shape[-2:])} px against a gallery of {self.size}")
        ux, vx = _local_stats(x)
        cov, c1, c2 = _cov_norm(), SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
        n, m = len(x), len(self.keys)
        # Blocks of queries x gallery images, about PAIR_CHUNK_BYTES of pairs each.
        cols = min(m, max(1, PAIR_CHUNK_BYTES // (x[0].numel() * x.element_size())))
        rows = max(1, PAIR_CHUNK_BYTES // (x[0].numel() * x.element_size() * cols))
        out = torch.empty(n, m, dtype=torch.float64)
        for i in range(0, n, rows):
            xi, uxi, vxi = x[i:i + rows, None], ux[i:i + rows, None], vx[i:i + rows, None]
            for j in range(0, m, cols):
                y, uy, vy = self._y[None, j:j + cols], self._uy[None, j:j + cols], self._vy[None, j:j + cols]
                uxuy = uxi * uy
                vxy = _box(xi * y).sub_(uxuy).mul_(cov)
                num = uxuy.mul_(2).add_(c1).mul_(vxy.mul_(2).add_(c2))
                den = (uxi * uxi + uy * uy).add_(c1).mul_((vxi + vy).add_(c2))
                # window means (in float64, as scikit-image), then the channels' mean
                out[i:i + rows, j:j + cols] = num.div_(den).double().mean(dim=(-2, -1)).mean(dim=-1)
        return out.numpy()

    def nearest(self, images: np.ndarray) -> list[str]:
        """For each image (N, H, W, 3), the most similar gallery image's key (the first of a tie)."""
        return [self.keys[k] for k in self.similarities(images).argmax(axis=1)]


def _channels_first(images: np.ndarray) -> torch.Tensor:
    # float32, as scikit-image computes SSIM for float32 images
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32))


def _cov_norm() -> float:
    n = SSIM_WINDOW ** 2
    return n / (n - 1)


def _box(x: torch.Tensor) -> torch.Tensor:
    """Means over every window that fits inside the image: exactly scikit-image's uniform filter
    on the pixels its SSIM averages (it crops the window's radius at each edge)."""
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    x = torch.nn.functional.avg_pool2d(x, (SSIM_WINDOW, 1), stride=1)
    x = torch.nn.functional.avg_pool2d(x, (1, SSIM_WINDOW), stride=1)
    return x.reshape(*lead, *x.shape[-2:])


def _local_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = _box(x)
    return u, _cov_norm() * (_box(x * x) - u * u)


def _gallery(candidates: Gallery | dict[str, np.ndarray]) -> Gallery:
    return candidates if isinstance(candidates, Gallery) else Gallery(candidates)


def nearest_share(images: np.ndarray, own: str, candidates: Gallery | dict[str, np.ndarray]) -> float:
    """Share of `images` whose most similar candidate (SSIM) is `own`: the generation-level test of
    whether a prompt draws its training image rather than merely something like it."""
    return sum(k == own for k in _gallery(candidates).nearest(images)) / len(images)


def nearest_and_copy_share(images: np.ndarray, own: str, candidates: Gallery | dict[str, np.ndarray],
                           reconstruction: np.ndarray, threshold: float = COPY_SSIM) -> tuple[float, float]:
    """`nearest_share`, and the share of `images` that are near-copies of `own`: it is their
    nearest candidate AND they are within `threshold` SSIM of its reconstruction. The second is
    stricter: the first also counts a degraded image that merely resembles its training image more
    than any other."""
    nearest = [x for x, k in zip(images, _gallery(candidates).nearest(images)) if k == own]
    copies = sum(ssim(x, reconstruction) >= threshold for x in nearest)
    return len(nearest) / len(images), copies / len(images)


def diversity(images: np.ndarray) -> float:
    """1 - mean pairwise SSIM across seeds: 0 when every seed gives the same image."""
    n = len(images)
    pairs = [ssim(images[i], images[j]) for i in range(n) for j in range(i + 1, n)]
    return float(1 - np.mean(pairs)) if pairs else 0.0
