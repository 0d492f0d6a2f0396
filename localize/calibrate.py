"""Calibration on non-memorized reference prompts: per-neuron activation statistics (for the
z-scores of the initial selection) and theta_mem (the memorization-score threshold).

Activation statistics need only the text encoder and the to_v weights, so every reference prompt
is used; theta_mem needs UNet passes, so it is taken over an evenly spaced subset (configurable).
Saved as safetensors (statistics) + JSON (everything else), keyed by model fingerprint,
reference-file hash, settings and a digest of every UNet weight, and reused when all match.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..corpus import evenly_spaced
from ..errors import NemoError
from ..files import atomic_dir, canonical_json, sha256_bytes
from ..model import Model, unet_digest
from ..provenance import tool_record
from .score import Scorer, value_activations
from .settings import CALIBRATION_SCORE_PROMPTS, THETA_MEM_STD

EMBED_BATCH = 64


@dataclass
class Calibration:
    model_fingerprint: str
    reference_sha256: str
    n_reference: int
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    theta_mem: float
    score_mean: float
    score_std: float
    reference_scores: list[float]
    score_settings: dict
    seconds: float = 0.0
    tool: dict = field(default_factory=tool_record)
    theta_mem_given: bool = False  # True: theta_mem set by the user (--theta-mem), not mean + 1 std

    def z(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """|activation - mean| / std per neuron, on the activations' device (the statistics are
        kept on the CPU, where they are saved and loaded)."""
        out = {}
        for k, a in acts.items():
            mean, std = self.mean[k].to(a.device), self.std[k].to(a.device)
            out[k] = (a.float() - mean).abs() / std.clamp_min(1e-8)
        return out

    def key(self) -> str:
        return cache_key(self.model_fingerprint, self.reference_sha256, self.score_settings)

    def summary(self) -> dict:
        return {"model_fingerprint": self.model_fingerprint, "reference_sha256": self.reference_sha256,
                "n_reference": self.n_reference, "theta_mem": self.theta_mem, "theta_mem_given": self.theta_mem_given,
                "score_mean": self.score_mean, "score_std": self.score_std, "scored_prompts": len(self.reference_scores),
                "score_settings": self.score_settings, "seconds": round(self.seconds, 2), "tool": self.tool}

    def save(self, folder: Path) -> None:
        with atomic_dir(Path(folder)) as tmp:
            tensors = {f"mean/{k}": v.contiguous() for k, v in self.mean.items()}
            tensors |= {f"std/{k}": v.contiguous() for k, v in self.std.items()}
            save_file(tensors, str(tmp / "stats.safetensors"), metadata={"format": "nemo-surgery-calibration"})
            (tmp / "calibration.json").write_text(json.dumps(
                self.summary() | {"reference_scores": self.reference_scores}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Calibration":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "calibration.json").read_text())
            stats = load_file(str(folder / "stats.safetensors"))
        except FileNotFoundError:
            raise NemoError(f"{folder}: not a calibration folder (calibration.json or stats.safetensors missing)") from None
        except Exception as e:  # a corrupt cache must not end in a traceback
            raise NemoError(f"{folder}: unreadable calibration ({type(e).__name__})") from None
        mean = {k[5:]: v for k, v in stats.items() if k.startswith("mean/")}
        std = {k[4:]: v for k, v in stats.items() if k.startswith("std/")}
        return cls(meta["model_fingerprint"], meta["reference_sha256"], meta["n_reference"], mean, std,
                   meta["theta_mem"], meta["score_mean"], meta["score_std"], meta["reference_scores"],
                   meta["score_settings"], meta.get("seconds", 0.0), meta["tool"], meta.get("theta_mem_given", False))


def cache_key(fingerprint: str, reference_sha256: str, score_settings: dict) -> str:
    return f"{fingerprint[:16]}-{reference_sha256[:16]}-{sha256_bytes(canonical_json(score_settings).encode())[:8]}"


def activation_stats(model: Model, scorer: Scorer, prompts: list[str]) -> tuple[dict, dict]:
    """Per-neuron mean and std of the activation over all prompts, batched, in float64 sums."""
    s1: dict[str, torch.Tensor] = {}
    s2: dict[str, torch.Tensor] = {}
    for start in range(0, len(prompts), EMBED_BATCH):
        emb = scorer.embed(prompts[start:start + EMBED_BATCH])
        for k, a in value_activations(model, emb, model.value_layers).items():
            a = a.double().cpu()
            s1[k] = s1.get(k, 0) + a.sum(0)
            s2[k] = s2.get(k, 0) + (a * a).sum(0)
    n = len(prompts)
    mean = {k: (v / n) for k, v in s1.items()}
    std = {k: ((s2[k] / n - mean[k] ** 2).clamp_min(0) * n / max(1, n - 1)).sqrt() for k in s1}
    return {k: v.float() for k, v in mean.items()}, {k: v.float() for k, v in std.items()}


def score_bar(scores: list[float]) -> tuple[float, float, float]:
    """theta_mem over non-memorized prompts' scores (mean + 1 std, NEMO.md), with the mean and std."""
    t = torch.tensor(scores, dtype=torch.float64)
    mu, sd = float(t.mean()), float(t.std()) if len(t) > 1 else 0.0
    return mu + THETA_MEM_STD * sd, mu, sd


def calibrate(model: Model, scorer: Scorer, prompts: list[str], reference_sha256: str,
              score_prompts: int = CALIBRATION_SCORE_PROMPTS,
              progress: Callable[[int, int], None] | None = None, settings: dict | None = None,
              known: dict[int, float] | None = None,
              on_score: Callable[[int, str, float], None] | None = None) -> Calibration:
    """`settings`: `calibration_settings` for this model and scorer, where the caller has them
    already (they hash every UNet weight). Scoring the reference subset is the long part (10 UNet
    samples a prompt): `known` gives scores already computed for this calibration, by position in
    the subset, and `on_score(position, prompt, score)` is called for each new one, so that a
    caller can keep them and an interrupted calibration resumes."""
    if len(prompts) < 2:
        raise NemoError(f"calibration needs at least 2 reference prompts, got {len(prompts)}")
    t0 = time.time()
    mean, std = activation_stats(model, scorer, prompts)
    subset = evenly_spaced(prompts, score_prompts)
    known = known or {}
    scores = []
    for i, prompt in enumerate(subset):
        if i in known:
            scores.append(known[i])
        else:
            scores.append(scorer.prompt_score(scorer.prompt_noise_diffs(scorer.embed([prompt]))))
            if on_score:
                on_score(i, prompt, scores[-1])
        if progress:
            progress(i + 1, len(subset))
    theta, mu, sd = score_bar(scores)
    return Calibration(model.fingerprint, reference_sha256, len(prompts), mean, std,
                       theta, mu, sd, [round(s, 6) for s in scores],
                       settings or calibration_settings(model, scorer, score_prompts), time.time() - t0)


def calibration_settings(model: Model, scorer: Scorer, score_prompts: int, digest: str | None = None) -> dict:
    """What a calibration depends on besides the fingerprint and the reference file (its cache key):
    the score settings, how many reference prompts are scored, and every UNet weight (theta_mem
    comes from UNet passes; the fingerprint covers only the value layers among them). `digest`:
    the model's `unet_digest`, where the caller has it already."""
    return scorer.settings.to_dict() | {"score_prompts": score_prompts,
                                        "unet_digest": digest or unet_digest(model.unet)}
