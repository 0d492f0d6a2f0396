"""Detection: is a prompt memorized, and for which seeds (NEMO.md, "Signals" 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
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


def auroc(positive: list[float], negative: list[float]) -> float | None:
    """The chance that a positive scores above a negative (ties count half): the area under the
    ROC curve, as the paper reports detection. None without both kinds."""
    if not positive or not negative:
        return None
    neg = np.sort(np.asarray(negative, dtype=np.float64))
    pos = np.asarray(positive, dtype=np.float64)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def detection_summary(records: list[dict[str, Any]], reference_scores: list[float], theta_mem: float) -> dict:
    """How the score separates a corpus from the reference prompts calibration scored (never
    memorized): every corpus prompt is taken as a memorization candidate, as in the paper's
    corpus, so the AUROC is the paper's detection figure where the corpus holds memorized prompts
    only. The reference prompts above theta_mem are the false positives at the calibrated bar."""
    by_type: dict[str, dict[str, int]] = {}
    for r in records:
        t = by_type.setdefault(str(r.get("type") or "-"), {"prompts": 0, "memorized": 0})
        t["prompts"] += 1
        t["memorized"] += bool(r["memorized"])
    above = sum(s > theta_mem for s in reference_scores)
    a = auroc([float(r["score"]) for r in records], reference_scores)
    return {"prompts": len(records), "memorized": sum(bool(r["memorized"]) for r in records),
            "by_type": dict(sorted(by_type.items())), "reference_prompts": len(reference_scores),
            "reference_above_theta_mem": above,
            "false_positive_share": above / len(reference_scores) if reference_scores else None,
            "auroc_against_reference": None if a is None else round(a, 6), "theta_mem": theta_mem}


def detection_text(summary: dict) -> str:
    """One line of `detection_summary`."""
    types = ", ".join(f"{t} {v['memorized']}/{v['prompts']}" for t, v in summary["by_type"].items() if t != "-")
    a = summary["auroc_against_reference"]
    fp = summary["false_positive_share"]
    return (f"{summary['memorized']} of {summary['prompts']} prompts memorized" + (f" ({types})" if types else "")
            + (f"; AUROC {a:.3f} against {summary['reference_prompts']} reference prompts" if a is not None else "")
            + (f", {summary['reference_above_theta_mem']} of them ({fp:.0%}) above theta_mem {summary['theta_mem']:.4f}"
               if fp is not None else ""))
