"""Detection: is a prompt memorized, and for which seeds (NEMO.md, "Signals" 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .score import Scorer


@dataclass(frozen=True)
class Detection:
    score: float  # mean over seeds of each seed's best MS-SSIM against another seed
    seed_scores: tuple[float, ...]
    memorized_seeds: tuple[int, ...]  # seeds whose score exceeds theta_mem
    theta_mem: float

    @property
    def memorized(self) -> bool:
        return self.score > self.theta_mem

    def to_dict(self) -> dict:
        return {"score": round(self.score, 6), "theta_mem": round(self.theta_mem, 6), "memorized": self.memorized,
                "memorized_seeds": list(self.memorized_seeds),
                "seed_scores": [round(s, 6) for s in self.seed_scores]}


def detect(scorer: Scorer, d: torch.Tensor, theta_mem: float) -> Detection:
    """`d`: the prompt's unblocked noise differences for every seed."""
    per_seed = scorer.seed_scores(d)
    mem = tuple(int(i) for i in torch.nonzero(per_seed > theta_mem).flatten())
    return Detection(float(per_seed.mean()), tuple(float(s) for s in per_seed), mem, theta_mem)
