"""The nearest-training-image search of verification and the audit at Stable Diffusion's image size:
every generation against every training image the corpus names, so its cost grows with the square
of the corpus.

    python bench/bench_nearest.py [--prompts 16] [--size 512] [--seeds 4]

Synthetic images (smoothed noise, no model): each prompt's training image, and per seed either a
noisy copy of it (a reproduction) or of another prompt's image. Times the search at full size
(what verification did before) against nemo-surgery's, which compares thumbnails of at most
`NEAREST_PX`, and checks that both find the same nearest image for every generation. Prints
seconds, SSIM pairs per second and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from skimage.filters import gaussian

from nemo_surgery.generation import NEAREST_PX, nearest_share, ssim, thumbnails


def photo(rng: np.random.Generator, size: int) -> np.ndarray:
    img = gaussian(rng.random((size, size, 3)), sigma=size / 32, channel_axis=-1)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def full_size_nearest(image: np.ndarray, candidates: dict[str, np.ndarray]) -> str:
    sims = {k: ssim(image, v) for k, v in candidates.items()}
    return max(sims, key=sims.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    train = {f"p{i}": photo(rng, args.size) for i in range(args.prompts)}
    keys = list(train)
    gens = {}
    for i, k in enumerate(keys):
        # Every other seed reproduces the prompt's own image; the rest draw another prompt's.
        src = [k if s % 2 == 0 else keys[(i + s) % len(keys)] for s in range(args.seeds)]
        gens[k] = np.stack([np.clip(train[x] + rng.normal(0, 0.08, train[x].shape), 0, 1).astype(np.float32)
                            for x in src])
    pairs = args.prompts * args.seeds * args.prompts

    t = time.perf_counter()
    full = {k: [full_size_nearest(x, train) for x in g] for k, g in gens.items()}
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    small = thumbnails(train)
    share = {k: nearest_share(g, k, small) for k, g in gens.items()}
    t_thumb = time.perf_counter() - t

    same = all(share[k] == sum(n == k for n in full[k]) / args.seeds for k in gens)
    print(f"{args.prompts} prompts x {args.seeds} seeds against {args.prompts} training images of {args.size} px: "
          f"{pairs} SSIM pairs")
    print(f"full size:                 {t_full:8.2f} s  ({pairs / t_full:8.0f} pairs/s)")
    print(f"thumbnails of <= {NEAREST_PX} px:   {t_thumb:8.2f} s  ({pairs / t_thumb:8.0f} pairs/s)  "
          f"x{t_full / t_thumb:.1f}")
    print(f"same nearest-image shares for every prompt: {same}")
    print(f"at this rate a corpus of 500 prompts with images (3 models: before, after, control): "
          f"{3 * 500 * args.seeds * 500 / (pairs / t_thumb) / 60:.0f} min against "
          f"{3 * 500 * args.seeds * 500 / (pairs / t_full) / 3600:.1f} h at full size")


if __name__ == "__main__":
    main()
