"""Localization decisions on a full-size SD 1.5-architecture UNet (random weights): the sequential
engine (one candidate set per UNet pass of 10 seeds, as the published algorithm runs) against the
batched engine (many candidate sets side by side in one pass, per-sample masks), in fp16.

    python bench/bench_gpu.py --device cuda              # H200-class GPU, a few minutes
    python bench/bench_gpu.py --device cpu --size tiny   # a smoke run of the script itself

A *decision* is what the search does for each candidate: the prompt's 10 seeds denoised with a
neuron set blocked, then MS-SSIM against the unblocked noise differences. Prints seconds per
decision for both engines, their ratio, the largest difference between the two engines' noise
differences (they must compute the same thing), and the machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from nemo_surgery.localize.score import Scorer
from nemo_surgery.localize.settings import ScoreSettings
from nemo_surgery.model import Model, discover_value_layers, select_layers

SD1_SCHEDULE = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}
SIZES = {
    # SD 1.5's UNet: 860 M parameters, 64x64x4 latents, 768-d text.
    "full": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8),
    "tiny": dict(sample_size=16, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                 attention_head_dim=2, norm_num_groups=8),
}


def random_model(size: str, device: str, dtype: torch.dtype) -> Model:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **SIZES[size])
    unet = unet.to(device, dtype).eval()
    return Model(path=Path(f"random-sd15-{size}"), unet=unet, text_encoder=None, tokenizer=None,
                 scheduler_config=SD1_SCHEDULE, vae=None, value_layers=discover_value_layers(unet),
                 fingerprint="random", value_digest="random", stored_dtype=str(dtype))


def candidate_sets(model: Model, n: int, per_set: int, seed: int = 0) -> list[dict[str, frozenset[int]]]:
    """Random sets over the paper's 7 layers, the size of the sets the refinement tries."""
    rng = random.Random(seed)
    layers = select_layers(model.value_layers, "official")
    out = []
    for _ in range(n):
        s: dict[str, set[int]] = {}
        for _ in range(per_set):
            v = rng.choice(layers)
            s.setdefault(v.path, set()).add(rng.randrange(v.out_features))
        out.append({k: frozenset(x) for k, x in s.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                    help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--decisions", type=int, default=48, help="candidate sets to evaluate with each engine")
    ap.add_argument("--batch-size", type=int, default=None, help="UNet samples per pass (default: 160 on "
                                                                 "CUDA, 40 on CPU)")
    ap.add_argument("--neurons", type=int, default=20, help="neurons per candidate set")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    prec = args.precision or ("fp16" if cuda else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[prec]
    batch = args.batch_size or (160 if cuda else 40)
    model = random_model(args.size, args.device, dtype)
    n_params = sum(p.numel() for p in model.unet.parameters())
    settings = ScoreSettings()  # 10 seeds, first step of 50 DDIM steps
    scorer = Scorer(model, settings, batch_size=batch, autocast_dtype=None if prec == "fp32" else dtype)
    seeds = len(scorer.latents)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn((1, 77, model.unet.config.cross_attention_dim), generator=g)
    emb_s = emb.expand(seeds, -1, -1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sets = candidate_sets(model, args.decisions, args.neurons)

    base = scorer.noise_diff(emb_s, scorer.latents)  # unblocked, computed once per prompt in both engines
    # Warm-up: kernels, allocator, autotuning.
    scorer.noise_diff(emb_s, scorer.latents, [sets[0]] * seeds)
    scorer.noise_diff(emb_s.repeat(batch // seeds, 1, 1), scorer.latents.repeat(batch // seeds, 1, 1, 1),
                      [s for s in sets[: batch // seeds] for _ in range(seeds)])
    sync()

    t0 = time.perf_counter()
    seq = []
    for s in sets:  # sequential: one candidate, its 10 seeds, per pass
        d = scorer.noise_diff(emb_s, scorer.latents, [s] * seeds)
        seq.append(scorer.similarity(d, base).cpu())
    sync()
    t_seq = time.perf_counter() - t0

    t0 = time.perf_counter()
    k = len(sets)
    d_all = scorer.noise_diff(emb_s.repeat(k, 1, 1), scorer.latents.repeat(k, 1, 1, 1),
                              [s for s in sets for _ in range(seeds)])
    bat = scorer.similarity(d_all, base.repeat(k, 1, 1, 1)).reshape(k, seeds).cpu()
    sync()
    t_bat = time.perf_counter() - t0

    diff = float((torch.stack(seq) - bat).abs().max())
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(f"machine: {dev}; torch {torch.__version__}; UNet {args.size} ({n_params / 1e6:.0f} M parameters, "
          f"{model.latent_size}x{model.latent_size} latents), {prec}, {len(model.value_layers)} value layers{mem}")
    print(f"{k} decisions of {seeds} seeds, {args.neurons} neurons per candidate set, batch {batch} samples")
    print(f"sequential engine: {t_seq / k * 1000:8.1f} ms per decision")
    print(f"batched engine:    {t_bat / k * 1000:8.1f} ms per decision")
    print(f"speed-up: x{t_seq / t_bat:.2f}; max |MS-SSIM difference| between the engines {diff:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
