"""The nearest-training-image search of verification and the audit at Stable Diffusion's image size:
every generation against every training image the corpus names, so its cost grows with the square
of the corpus.

    python bench/bench_nearest.py [--prompts 16] [--size 512] [--seeds 4]

Synthetic images (smoothed noise, no model): each prompt's training image, and per seed either a
noisy copy of it (a reproduction) or of another prompt's image. Times three searches that must
find the same nearest image for every generation: scikit-image's SSIM pair by pair at full size
(what verification did first), the same on thumbnails of at most `NEAREST_PX` (what it did next),
and nemo-surgery's `Gallery`, which scores thumbnails of all pairs at once in batched torch. Prints
seconds, SSIM pairs per second and the ratios.

    python bench/bench_nearest.py --memory 500 [--size 512]

Memory of making the gallery from a corpus's training images (PNG files): all loaded first, then
thumbnailed (what verification and the audit did first), against loaded and thumbnailed one at a
time (what they do). Each way runs in a fresh process, with one that only imports, so that the
peak RSS printed is each way's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage.filters import gaussian

from nemo_surgery.generation import NEAREST_PX, Gallery, load_image, nearest_share, ssim, thumbnail


def photo(rng: np.random.Generator, size: int) -> np.ndarray:
    img = gaussian(rng.random((size, size, 3)), sigma=size / 32, channel_axis=-1)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def full_size_nearest(image: np.ndarray, candidates: dict[str, np.ndarray]) -> str:
    sims = {k: ssim(image, v) for k, v in candidates.items()}
    return max(sims, key=sims.get)


def build_gallery(folder: str, size: int, how: str) -> None:
    """Run in a fresh process by `memory`: prints its seconds and peak RSS as JSON."""
    files = sorted(Path(folder).glob("*.png"))
    t = time.perf_counter()
    if how == "all loaded first":
        Gallery({f.stem: load_image(f, size) for f in files})
    elif how == "one at a time":
        Gallery((f.stem, load_image(f, size)) for f in files)
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(n):  # noise: what is measured is the bytes held, not the pictures
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(Path(folder) / f"{i:05d}.png")
        print(f"gallery of {n} training images of {size} px (PNG), each way in its own process:")
        runs = {}
        for how in ("imports only", "all loaded first", "one at a time"):
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
                   f"import bench_nearest; bench_nearest.build_gallery({folder!r}, {size}, {how!r})"
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
            runs[how] = json.loads(out.splitlines()[-1])
            print(f"  {how:17s} {runs[how]['seconds']:6.1f} s  peak RSS {runs[how]['peak_mb']:6.0f} MB")
        base = runs["imports only"]["peak_mb"]
        first, each = runs["all loaded first"]["peak_mb"] - base, runs["one at a time"]["peak_mb"] - base
        print(f"  above the imports: {first:.0f} MB against {each:.0f} MB, x{first / max(each, 1):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--memory", type=int, default=0, metavar="N",
                    help="measure the gallery's memory for N training images instead")
    args = ap.parse_args()
    if args.memory:
        return memory(args.memory, args.size)
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

    def pairwise(images: np.ndarray, candidates: dict[str, np.ndarray]) -> list[str]:
        return [full_size_nearest(x, candidates) for x in images]

    t = time.perf_counter()
    full = {k: pairwise(g, train) for k, g in gens.items()}
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    small = {k: thumbnail(v) for k, v in train.items()}
    pair_thumb = {k: pairwise([thumbnail(x) for x in g], small) for k, g in gens.items()}
    t_pair = time.perf_counter() - t
    t = time.perf_counter()
    gallery = Gallery(train)
    share = {k: nearest_share(g, k, gallery) for k, g in gens.items()}
    t_batch = time.perf_counter() - t

    def shares(nearest: dict[str, list[str]]) -> dict[str, float]:
        return {k: sum(n == k for n in v) / args.seeds for k, v in nearest.items()}

    same = shares(full) == shares(pair_thumb) == share
    print(f"{args.prompts} prompts x {args.seeds} seeds against {args.prompts} training images of {args.size} px: "
          f"{pairs} SSIM pairs; torch {torch.get_num_threads()} threads")
    print(f"full size, pair by pair:               {t_full:8.2f} s  ({pairs / t_full:8.0f} pairs/s)")
    print(f"thumbnails of <= {NEAREST_PX} px, pair by pair: {t_pair:8.2f} s  ({pairs / t_pair:8.0f} pairs/s)  "
          f"x{t_full / t_pair:.1f}")
    print(f"thumbnails, batched (Gallery):         {t_batch:8.2f} s  ({pairs / t_batch:8.0f} pairs/s)  "
          f"x{t_full / t_batch:.1f} (x{t_pair / t_batch:.1f} over pair by pair)")
    print(f"same nearest-image shares for every prompt: {same}")
    print(f"at these rates a corpus of 500 prompts with images (3 models: before, after, control): batched "
          f"{3 * 500 * args.seeds * 500 / (pairs / t_batch) / 60:.0f} min, thumbnails pair by pair "
          f"{3 * 500 * args.seeds * 500 / (pairs / t_pair) / 60:.0f} min, full size "
          f"{3 * 500 * args.seeds * 500 / (pairs / t_full) / 3600:.1f} h")

if __name__ == "__main__":
    main()
