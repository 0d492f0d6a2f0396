"""The published per-prompt NeMo algorithm, written plainly: one candidate per UNet pass, every
decision in order, no speculation and no early exit. The batched engine must take the same
decisions; the benchmark times both."""

from __future__ import annotations

import torch

from nemo_surgery.localize.calibrate import Calibration
from nemo_surgery.localize.score import Scorer, value_activations
from nemo_surgery.localize.settings import NEAR_THRESHOLD, SearchSettings
from nemo_surgery.model import ValueLayer


def plain_nemo(scorer: Scorer, cal: Calibration, layers: list[ValueLayer], prompt: str,
               s: SearchSettings = SearchSettings()) -> dict:
    emb = scorer.embed([prompt])
    d = scorer.prompt_noise_diffs(emb)
    per_seed = scorer.seed_scores(d)
    seeds = [i for i, v in enumerate(per_seed.tolist()) if v > cal.theta_mem]
    if float(per_seed.mean()) <= cal.theta_mem or not seeds:
        return {"memorized": False}

    def score(neurons: dict[str, set[int]]) -> float:
        if s.criterion == "consistency":  # the prompt's memorization score with the set blocked
            n = len(scorer.latents)
            sets = [{k: frozenset(v) for k, v in neurons.items() if v}] * n
            return float(scorer.seed_scores(scorer.noise_diff(emb.expand(n, -1, -1), scorer.latents, sets)).mean())
        sets = [{k: frozenset(v) for k, v in neurons.items() if v}] * len(seeds)
        blocked = scorer.noise_diff(emb.expand(len(seeds), -1, -1), scorer.latents[seeds], sets)
        return float(scorer.similarity(d[seeds], blocked).max())

    # Initial selection: theta_act from 5 down by 0.25 (not below 1), k up by 1.
    acts = value_activations(scorer.model, emb, layers)
    z = cal.z(acts)
    width = min(v.out_features for v in layers)
    theta_act, k = s.theta_act_start, s.top_k_start
    threshold, fallback = cal.theta_mem, False
    decisions: list[tuple[str, str, float, bool, float]] = []  # (stage, candidate, score, mitigated, bar)
    while True:
        sel = {}
        for v in layers:
            chosen = set(torch.nonzero(z[v.path][0] > theta_act).flatten().tolist())
            if k > 0:
                chosen |= set(torch.topk(acts[v.path][0], min(k, width)).indices.tolist())
            sel[v.path] = chosen
        sc = score(sel)
        decisions.append(("initial", f"theta_act={theta_act},k={k}", sc, sc < threshold, threshold))
        if sc < threshold:
            break
        if theta_act <= s.theta_act_min or k >= width:
            threshold, fallback = sc, True
            break
        theta_act = max(s.theta_act_min, theta_act - s.theta_act_step)
        k += s.top_k_step
    initial = {p: sorted(v) for p, v in sel.items() if v}

    def mitigated(stage: str, what: str, x: float) -> bool:
        ok = x <= threshold if fallback else x < threshold
        decisions.append((stage, what, x, ok, threshold))
        return ok

    current = {p: set(v) for p, v in sel.items() if v}
    # Refinement (a): whole layers, last layer first.
    for v in reversed(layers):
        if v.path in current:
            trial = {p: n for p, n in current.items() if p != v.path}
            if mitigated("refine-layer", v.path, score(trial)):
                current = trial
    # Refinement (b): single neurons, last layer first.
    for v in reversed(layers):
        for n in sorted(current.get(v.path, ())):
            trial = {p: (rows - {n} if p == v.path else rows) for p, rows in current.items()}
            if mitigated("refine-neuron", f"{v.path}[{n}]", score(trial)):
                current = {p: r for p, r in trial.items() if r}
    return {"memorized": True, "seeds": seeds, "initial": initial,
            "refined": {p: sorted(v) for p, v in current.items() if v}, "threshold": threshold,
            "decisions": decisions}


def _parting(plain: list[tuple], engine: list[tuple]) -> tuple[tuple, tuple] | None:
    """The first pair of decisions two traces (stage, candidate, score, mitigated, threshold) took
    on different candidates or with different outcomes; None if there is none."""
    return next(((a, b) for a, b in zip(plain, engine) if a[:2] != b[:2] or a[3] != b[3]), None)


def first_divergence(plain: list[tuple], engine: list[tuple]) -> str | None:
    """Where two runs' decision traces first part, as one line; None if they never do. Up to there
    both walked the same candidates from the same sets, so that decision is the one the differing
    sets come from."""
    pair = _parting(plain, engine)
    if pair is None:
        return None if len(plain) == len(engine) else "one trace is a prefix of the other"
    a, b = pair
    return (f"{a[0]} {a[1]}: plain {a[2]:.7f} ({'drop' if a[3] else 'keep'}) against bar "
            f"{a[4]:.7f}, engine {b[2]:.7f} ({'drop' if b[3] else 'keep'}) against {b[4]:.7f}")


def assert_differs_by_float_noise(plain: dict, got) -> None:
    """Runs on different backends or batch layouts agree within float noise, not bit for bit, so
    their sets may differ, but only through a decision that sat within float noise of its bar in
    both: the first decision the two took differently must be one (its score within
    NEAR_THRESHOLD of the bar on each side, the two bars equal within it too)."""
    pair = _parting(plain["decisions"], got.decisions)
    assert pair is not None, "the sets differ, yet every decision was taken alike"
    a, b = pair
    why = first_divergence(plain["decisions"], got.decisions)
    assert a[:2] == b[:2], f"the traces part on different candidates: {why}"
    assert abs(a[2] - a[4]) < NEAR_THRESHOLD and abs(b[2] - b[4]) < NEAR_THRESHOLD, \
        f"a decision away from its bar differs: {why}"
    assert abs(a[4] - b[4]) < NEAR_THRESHOLD, f"the bars differ: {why}"
