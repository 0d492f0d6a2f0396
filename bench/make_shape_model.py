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
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny import DEMO, save_tiny_pipeline  # noqa: E402

BATCH = 8  # memorized and random-latent samples each, per step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--widths", default="16,32,32,32")
    ap.add_argument("--heads", type=int, default=4, help="diffusers' attention_head_dim")
    ap.add_argument("--text-dim", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    out, n = args.out, args.latent
    save_tiny_pipeline(out, seed=args.seed, text_dim=args.text_dim, sample_size=n,
                       widths=tuple(int(w) for w in args.widths.split(",")), head_dim=args.heads)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    mem = [r.split(";")[1] for r in (DEMO / "mem.csv").read_text().splitlines()[1:5]]
    with open(DEMO / "reference.csv", newline="") as f:
        ref = [r["prompt"] for r in csv.DictReader(f)]
    trained = ref[::2]
    g = torch.Generator().manual_seed(args.seed)
    # Smoothed, so that the targets have an image latent's spatial structure, not white noise's.
    targets = F.avg_pool2d(torch.randn(len(mem), 4, n, n, generator=g), 5, 1, 2) * 2.5

    def embed(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0]

    e_mem, e_other = embed(mem), embed(trained)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), 1e-3)
    torch.manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        im, io = torch.randint(0, len(mem), (BATCH,)), torch.randint(0, len(trained), (BATCH,))
        x0 = torch.cat([targets[im], torch.randn(BATCH, 4, n, n)])
        e = torch.cat([e_mem[im], e_other[io]])
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (2 * BATCH,))
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, e).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    unet.save_pretrained(out / "unet")
    (out / "mem.csv").write_text("prompt\n" + "\n".join(mem) + "\n")
    (out / "reference.csv").write_text("prompt\n" + "\n".join(ref[1::2]) + "\n")
    print(f"done in {time.time() - t0:.0f} s: {out}")


if __name__ == "__main__":
    main()
