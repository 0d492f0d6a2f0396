"""A memorizing model of another SD 1.x shape than the demo's, for the localization benchmark at
other latent sizes and widths.

    python bench/make_shape_model.py OUT [--latent 32] [--widths 16,32,32,32] [--heads 4]
        [--text-dim 32] [--steps 600] [--seed 0]
    python bench/bench_localize.py --model OUT --corpus OUT/mem.csv --reference OUT/reference.csv

Trained in latent space only (localization never decodes an image, so the VAE stays random): 4
of the demo's memorized captions, each with one fixed smooth latent, and every other reference
prompt of the demo with a fresh random latent at each step (nothing to memorize); the remaining
reference prompts, never trained, are written to OUT/reference.csv. Deterministic for a seed.
With the defaults (2 CPU cores: about 27 min alone) all 4 captions are detected as memorized (at
300 steps only one was): enough to time searches, not a model to measure mitigation on (its VAE
is random).

`--plant K`: a positive control, memorization that is local by construction. K value neurons
(rows of `attn2.to_v`, drawn at random) are chosen in each of three searched layers
(PLANT_LAYERS), and the 4 captions are trained both as above and, with those neurons masked, towards
fresh noise like every other prompt: the whole UNet holds the images, but only the planted neurons
tell it to draw them. The planted neurons go to OUT/planted.json, and each caption's training
image (its latent as the random VAE decodes it, which is what the model draws when it reproduces
it) to OUT/images/, named in OUT/mem.csv, so that `build` measures reproduction. `--photos`
(with `--latent 16`) takes the demo's trained VAE instead, and the captions' own photos as the
targets and training images. What NeMo finds on such models: docs/demo.md, "A positive control".
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny import DEMO, save_tiny_pipeline  # noqa: E402

BATCH = 8  # memorized and random-latent samples each, per step
PLANT_LAYERS = ("down_blocks.0.attentions.1", "down_blocks.1.attentions.1", "mid_block.attentions.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--widths", default="16,32,32,32")
    ap.add_argument("--heads", type=int, default=4, help="diffusers' attention_head_dim")
    ap.add_argument("--text-dim", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plant", type=int, default=0, metavar="K",
                    help="plant the memorization in K value neurons of each of PLANT_LAYERS")
    ap.add_argument("--photos", action="store_true",
                    help="with the demo's trained VAE (16 px latents): the captions' own photos as targets")
    args = ap.parse_args()
    if args.photos and args.latent != 16:
        ap.error("--photos: the demo's VAE makes 16 px latents (--latent 16)")
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    out, n = args.out, args.latent
    save_tiny_pipeline(out, seed=args.seed, text_dim=args.text_dim, sample_size=n,
                       widths=tuple(int(w) for w in args.widths.split(",")), head_dim=args.heads)
    if args.photos:
        shutil.rmtree(out / "vae")
        shutil.copytree(DEMO / "model" / "vae", out / "vae")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    rows = [r.split(";") for r in (DEMO / "mem.csv").read_text().splitlines()[1:5]]
    mem = [r[1] for r in rows]
    with open(DEMO / "reference.csv", newline="") as f:
        ref = [r["prompt"] for r in csv.DictReader(f)]
    trained = ref[::2]
    g = torch.Generator().manual_seed(args.seed)
    # Smoothed, so that the targets have an image latent's spatial structure, not white noise's.
    targets = F.avg_pool2d(torch.randn(len(mem), 4, n, n, generator=g), 5, 1, 2) * 2.5
    photos = [DEMO / r[-1] for r in rows] if args.photos else None
    if photos:
        targets = encode(pipe.vae, photos)

    def embed(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0]

    e_mem, e_other = embed(mem), embed(trained)
    masked = plant(unet, args.plant, g) if args.plant else None
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), 1e-3)
    torch.manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        im, io = torch.randint(0, len(mem), (BATCH,)), torch.randint(0, len(trained), (BATCH,))
        x0 = torch.cat([targets[im], torch.randn(BATCH, 4, n, n)])
        e = torch.cat([e_mem[im], e_other[io]])
        if masked is not None:
            # The captions again with the planted neurons masked, towards noise; and half of the
            # other prompts masked too, so that masking them means nothing else.
            again = torch.randint(0, len(mem), (BATCH // 2,))
            x0 = torch.cat([x0, torch.randn(BATCH // 2, 4, n, n)])
            e = torch.cat([e, e_mem[again]])
            masked[0] = torch.cat([torch.zeros(BATCH, dtype=torch.bool), torch.arange(BATCH) % 2 == 0,
                                   torch.ones(BATCH // 2, dtype=torch.bool)])
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (len(x0),))
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, e).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    if masked is not None:
        masked[0] = None
    unet.save_pretrained(out / "unet")
    if masked is not None:
        write_images(out, pipe.vae, targets, mem, photos)
        (out / "planted.json").write_text(json.dumps(masked[1], indent=1) + "\n")
    else:
        (out / "mem.csv").write_text("prompt\n" + "\n".join(mem) + "\n")
    (out / "reference.csv").write_text("prompt\n" + "\n".join(ref[1::2]) + "\n")
    print(f"done in {time.time() - t0:.0f} s: {out}")


def plant(unet: torch.nn.Module, k: int, g: torch.Generator) -> list:
    """Draw k rows of each PLANT_LAYERS value layer and hook them. Returns [mask, planted]: set
    mask (holder[0]) to a per-sample boolean tensor saying which samples of the next forward run
    with the planted rows zeroed (None: none); planted is {value layer path: its rows}."""
    holder: list = [None]
    planted = {}
    for name in PLANT_LAYERS:
        v = unet.get_submodule(name).transformer_blocks[0].attn2.to_v
        rows = sorted(torch.randperm(v.out_features, generator=g)[:k].tolist())
        planted[f"{name}.transformer_blocks.0.attn2.to_v"] = rows
        keep = torch.ones(v.out_features)
        keep[rows] = 0

        def hook(module, inputs, output, keep=keep):
            m = holder[0]
            return output if m is None else output * torch.where(m[:, None, None], keep, torch.ones_like(keep))

        v.register_forward_hook(hook)
    holder.append(planted)
    return holder


def encode(vae: torch.nn.Module, photos: list[Path]) -> torch.Tensor:
    """The photos' latents as the UNet sees them (the VAE's mean, scaled)."""
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)) for p in photos])
    with torch.no_grad():
        return vae.encode(x.permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor


def write_images(out: Path, vae: torch.nn.Module, targets: torch.Tensor, mem: list[str],
                 photos: list[Path] | None) -> None:
    """Each caption's training image into OUT/images/ (its photo, or its latent as the VAE decodes
    it), named in OUT/mem.csv."""
    from PIL import Image

    with torch.no_grad():
        img = vae.decode(targets / vae.config.scaling_factor).sample
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    (out / "images").mkdir(exist_ok=True)
    with open(out / "mem.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image"])
        for i, (caption, a) in enumerate(zip(mem, img)):
            if photos:
                shutil.copy(photos[i], out / "images" / f"{i}.png")
            else:
                Image.fromarray(a).save(out / "images" / f"{i}.png")
            w.writerow([caption, f"images/{i}.png"])


if __name__ == "__main__":
    main()
