"""Localization decisions on a full-size SD 1.5-architecture UNet (random weights): the sequential
engine (one candidate set per UNet pass of 10 seeds, as the published algorithm runs) against the
batched engine (many candidate sets side by side in one pass, per-sample masks), in fp16, and
the batched engine with the shared prefix (`localize/prefix.py`: the layers before the first one
where a pass's candidates differ run once per seed).

    python bench/bench_gpu.py --device cuda              # H200-class GPU, a few minutes
    python bench/bench_gpu.py --device cpu --size tiny   # a smoke run of the script itself

A *decision* is what the search does for each candidate: the prompt's 10 seeds denoised with a
neuron set blocked, then MS-SSIM against the unblocked noise differences. The candidates are
shaped as refinement's are: a base set of neurons over the paper's 7 layers, each candidate the
base with one of its neurons re-activated, so candidates differ from that neuron's layer on.
Prints milliseconds per decision for each engine, the ratios to the sequential engine, the
largest difference between the engines' similarities (they must compute the same thing), and
the machine.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from nemo_surgery.engine import torch_prefix
from nemo_surgery.localize.score import PRECISIONS, Scorer
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
    """Refinement's candidates: a base set of `per_set` neurons over the paper's 7 layers, each
    candidate the base with one neuron re-activated, in the walk's order."""
    rng = random.Random(seed)
    layers = select_layers(model.value_layers, "official")
    base: dict[str, set[int]] = {}
    while sum(map(len, base.values())) < max(n, per_set):
        v = rng.choice(layers)
        base.setdefault(v.path, set()).add(rng.randrange(v.out_features))
    # In the walk's order (layer by layer), so that a pass holds neighbouring items, as it does.
    order = {v.path: i for i, v in enumerate(layers)}
    items = sorted(((p, k) for p, ks in base.items() for k in ks), key=lambda it: (order[it[0]], it[1]))
    pick = sorted(rng.sample(range(len(items)), n))
    out = []
    for p, k in (items[i] for i in pick):
        out.append({q: frozenset(ks - {k} if q == p else ks) for q, ks in base.items() if ks - {k} or q != p})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                    help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--decisions", type=int, default=48, help="candidate sets to evaluate with each engine")
    ap.add_argument("--batch-size", type=int, default=None, help="UNet samples per pass (default: 160 on "
                                                                 "CUDA, 40 on CPU)")
    ap.add_argument("--neurons", type=int, default=100, help="neurons in the base set (refinement starts "
                                                              "from the initial selection's)")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    prec = args.precision or ("fp16" if cuda else "fp32")
    dtype = PRECISIONS[prec]
    batch = args.batch_size or (160 if cuda else 40)
    model = random_model(args.size, args.device, dtype)
    n_params = sum(p.numel() for p in model.unet.parameters())
    settings = ScoreSettings()  # 10 seeds, first step of 50 DDIM steps
    autocast = None if prec == "fp32" else dtype
    scorer = Scorer(model, settings, batch_size=batch, autocast_dtype=autocast)
    prefix = torch_prefix(model, autocast)
    shared = Scorer(model, settings, batch_size=batch, autocast_dtype=autocast, prefix=prefix)
    seeds = len(scorer.latents)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn((1, 77, model.unet.config.cross_attention_dim), generator=g)
    emb_s = emb.expand(seeds, -1, -1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sets = candidate_sets(model, args.decisions, args.neurons)
    k = len(sets)

    base = scorer.noise_diff(emb_s, scorer.latents)  # unblocked, computed once per prompt in both engines

    def batched(sc: Scorer) -> torch.Tensor:
        # Seed-major within each candidate, as the search lays a pass out.
        d = sc.noise_diff(emb_s.repeat(k, 1, 1), sc.latents.repeat(k, 1, 1, 1), [s for s in sets for _ in range(seeds)])
        return sc.similarity(d, base.repeat(k, 1, 1, 1)).reshape(k, seeds).cpu()

    # Warm-up: kernels, allocator, autotuning.
    scorer.noise_diff(emb_s, scorer.latents, [sets[0]] * seeds)
    for sc in (scorer, shared):
        m = max(1, batch // seeds)
        sc.noise_diff(emb_s.repeat(m, 1, 1), sc.latents.repeat(m, 1, 1, 1), [s for s in sets[:m] for _ in range(seeds)])
    sync()

    t0 = time.perf_counter()
    seq = []
    for s in sets:  # sequential: one candidate, its 10 seeds, per pass
        d = scorer.noise_diff(emb_s, scorer.latents, [s] * seeds)
        seq.append(scorer.similarity(d, base).cpu())
    sync()
    t_seq = time.perf_counter() - t0
    times, diffs = {}, {}
    for name, sc in (("batched engine", scorer), ("batched, shared prefix", shared)):
        t0 = time.perf_counter()
        got = batched(sc)
        sync()
        times[name] = time.perf_counter() - t0
        diffs[name] = float((torch.stack(seq) - got).abs().max())

    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(f"machine: {dev}; torch {torch.__version__}; UNet {args.size} ({n_params / 1e6:.0f} M parameters, "
          f"{model.latent_size}x{model.latent_size} latents), {prec}, {len(model.value_layers)} value layers{mem}")
    print(f"{k} decisions of {seeds} seeds, refinement's candidates of a {args.neurons}-neuron base set, "
          f"batch {batch} samples{'' if prefix else '; no shared prefix for this layout'}")
    print(f"sequential engine:      {t_seq / k * 1000:8.1f} ms per decision")
    for name, t in times.items():
        print(f"{name + ':':23s} {t / k * 1000:8.1f} ms per decision, x{t_seq / t:.2f}; "
              f"max |MS-SSIM difference| from sequential {diffs[name]:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
