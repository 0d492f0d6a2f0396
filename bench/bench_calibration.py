"""Calibration speed: activation statistics from the text encoder and the to_v weights alone
(what `calibrate` does) against collecting them from UNet passes with hooks on to_v (what one does
without noticing that to_v only ever sees the text embedding). Same prompts, same statistics.

    python bench/bench_calibration.py [--model examples/demo/model] [--reference ...] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nemo_surgery.corpus import read_corpus
from nemo_surgery.engine import Runtime, open_model
from nemo_surgery.localize.calibrate import EMBED_BATCH, activation_stats
from nemo_surgery.localize.score import Scorer
from nemo_surgery.localize.settings import ScoreSettings

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def unet_path_stats(scorer: Scorer, prompts: list[str]) -> tuple[dict, dict]:
    """Mean |to_v output| per neuron captured by forward hooks during one UNet pass per prompt."""
    model = scorer.model
    acts: dict[str, list[torch.Tensor]] = {v.path: [] for v in model.value_layers}
    hooks = [model.to_v(v.path).register_forward_hook(
        lambda m, i, o, p=v.path: acts[p].append(o.abs().mean(1).float().cpu())) for v in model.value_layers]
    try:
        for start in range(0, len(prompts), EMBED_BATCH):
            emb = scorer.embed(prompts[start:start + EMBED_BATCH])
            lat = scorer.latents[:1].expand(len(emb), -1, -1, -1).to(model.device, model.unet.dtype)
            model.unet(lat, scorer.timestep, encoder_hidden_states=emb).sample
    finally:
        for h in hooks:
            h.remove()
    cat = {k: torch.cat(v) for k, v in acts.items()}
    return {k: v.mean(0) for k, v in cat.items()}, {k: v.std(0) for k, v in cat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "examples/demo/model")
    ap.add_argument("--reference", type=Path, default=ROOT / "examples/demo/reference.csv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5, help="times the reference set is processed")
    args = ap.parse_args()
    model = open_model(args.model, Runtime(args.device))
    scorer = Scorer(model, ScoreSettings())
    prompts = [p.text for p in read_corpus(args.reference).prompts] * args.repeat
    activation_stats(model, scorer, prompts[:8])  # warm-up
    t0 = time.perf_counter()
    mean_a, std_a = activation_stats(model, scorer, prompts)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean_b, std_b = unet_path_stats(scorer, prompts)
    slow = time.perf_counter() - t0
    diff = max(float((mean_a[k] - mean_b[k]).abs().max()) for k in mean_a)
    print(f"{len(prompts)} prompts, {len(model.value_layers)} value layers, device {model.device}")
    print(f"text encoder + to_v only: {len(prompts) / fast:8.1f} prompts/s")
    print(f"UNet pass with hooks:     {len(prompts) / slow:8.1f} prompts/s")
    print(f"speed-up x{slow / fast:.1f}; max difference of the per-neuron means {diff:.2e}")


if __name__ == "__main__":
    main()
