"""The per-prompt NeMo search: initial selection, then refinement (NEMO.md, "Localization of one
memorized prompt"), computed by a batched engine that takes the same decisions as the plain
sequential algorithm.

Why it is faster without changing any decision:
- the prompt's text embedding and its unblocked noise differences are computed once;
- every check "is memorization still mitigated with set S blocked?" is "is the max over the
  memorized seeds of MS-SSIM(unblocked d, blocked d) below the threshold?", so it is decided
  "no" by the first seed that reaches the threshold. Each check first runs one sentinel seed
  (the one that last reached the threshold), and only checks that pass it run the other seeds;
- candidates are evaluated side by side in one UNet pass (per-sample masks). Where a later
  candidate depends on earlier outcomes (refinement), it is built on the predicted outcomes
  (the last outcome repeats), and the results past the first wrong prediction are discarded:
  the decisions taken are exactly those of the sequential walk;
- a candidate that passes the sentinel has its other seeds run in the next pass, beside the
  sentinel samples of the candidates that follow it (built as if it is dropped), so a decision
  costs about one pass, not two; and no candidate whose result cannot be read gets them.
Paper names in comments: theta_act (activation z threshold), k (top-k), theta_mem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model import ValueLayer
from .calibrate import Calibration
from .detect import Detection
from .score import Scorer, value_activations
from .settings import NEAR_THRESHOLD, SearchSettings

Neurons = dict[str, frozenset[int]]


def _freeze(d: dict[str, set[int] | frozenset[int]]) -> Neurons:
    return {k: frozenset(v) for k, v in d.items() if v}


def _sorted(d: Neurons) -> dict[str, list[int]]:
    return {k: sorted(v) for k, v in d.items() if v}


def count(d: Neurons) -> int:
    return sum(len(v) for v in d.values())


@dataclass(frozen=True)
class Criterion:
    """"Mitigated" = score below theta_mem; when the initial selection never got there, the
    paper keeps its last score as the bar (not worse than that)."""

    threshold: float
    fallback: bool = False

    def ok(self, score: float) -> bool:
        return score <= self.threshold if self.fallback else score < self.threshold


@dataclass
class PromptResult:
    id: str
    prompt: str
    type: str | None
    detection: Detection
    initial: dict[str, list[int]] = field(default_factory=dict)
    initial_theta_act: float = 0.0
    initial_k: int = 0
    initial_mitigated: bool = False
    initial_score: float = 0.0
    refined: dict[str, list[int]] = field(default_factory=dict)
    threshold: float = 0.0
    blocked_score: float = 0.0
    mitigated: bool = False
    checks: int = 0
    seconds: float = 0.0
    sample_passes: int = 0
    near_threshold: list[dict] = field(default_factory=list)

    def to_record(self) -> dict:
        return {
            "id": self.id, "prompt": self.prompt, "type": self.type,
            **self.detection.to_dict(),
            "initial": self.initial, "initial_neurons": sum(len(v) for v in self.initial.values()),
            "initial_theta_act": self.initial_theta_act, "initial_k": self.initial_k,
            "initial_mitigated": self.initial_mitigated, "initial_score": round(self.initial_score, 6),
            "refined": self.refined, "refined_neurons": sum(len(v) for v in self.refined.values()),
            "threshold": round(self.threshold, 6), "blocked_score": round(self.blocked_score, 6),
            "mitigated": self.mitigated, "checks": self.checks,
            "seconds": round(self.seconds, 3), "sample_passes": self.sample_passes,
            "near_threshold": self.near_threshold,
        }


@dataclass(frozen=True)
class Unit:
    """One (prompt, memorized seed) whose memorization a candidate set must mitigate."""

    emb: torch.Tensor  # (77, D) text embedding
    latent: torch.Tensor  # x_T of the seed
    d_ref: torch.Tensor  # unblocked noise difference for that seed
    offset: float = 0.0  # subtracted from the MS-SSIM: lets prompts with their own bar share a check


class Checker:
    """Scores candidate neuron sets. Units are (prompt, seed) pairs, grouped per check:
    - criterion "published" (NEMO.md): each memorized seed is a group; its score is
      MS-SSIM(unblocked d, blocked d) - offset;
    - criterion "consistency": each prompt is a group of all its seeds; its score is the prompt's
      memorization score with the set blocked (mean over seeds of the best MS-SSIM against another
      seed), i.e. the detection statistic theta_mem was calibrated on, minus offset.
    A candidate's score is its worst group's. One prompt's seeds (the search) or every memorized
    prompt of a corpus (the merge)."""

    def __init__(self, scorer: Scorer, units: list[Unit], groups: list[list[int]] | None = None,
                 consistency: bool = False, early_exit: bool = True):
        self.scorer = scorer
        self.units = units
        self.groups = groups if groups is not None else [[i] for i in range(len(units))]
        self.consistency = consistency
        self.early_exit = early_exit
        self.sentinel = 0
        self.checks = 0

    @classmethod
    def for_prompt(cls, scorer: Scorer, emb: torch.Tensor, d: torch.Tensor, seeds: list[int],
                   offset: float = 0.0, early_exit: bool = True, consistency: bool = False) -> "Checker":
        if consistency:  # every seed takes part in the seed-consistency score
            seeds = list(range(len(d)))
            units = [Unit(emb[0], scorer.latents[s], d[s], offset) for s in seeds]
            return cls(scorer, units, [list(range(len(units)))], True, early_exit)
        return cls(scorer, [Unit(emb[0], scorer.latents[s], d[s], offset) for s in seeds], None, False, early_exit)

    def group_scores(self, sets: list[Neurons], gids: list[list[int]]) -> list[list[float]]:
        """Scores of groups gids[c] for candidate c, all in shared UNet passes."""
        flat_sets, us, where = [], [], []
        for c, (s, gs) in enumerate(zip(sets, gids)):
            for g in gs:
                for u in self.groups[g]:
                    flat_sets.append(s)
                    us.append(self.units[u])
                    where.append((c, g))
        if not flat_sets:
            return [[] for _ in sets]
        emb = torch.stack([u.emb for u in us])
        d = self.scorer.noise_diff(emb, torch.stack([u.latent for u in us]), flat_sets)
        # One MS-SSIM call for every sample of the pass: per-call overhead would otherwise cost
        # as much as the UNet on a small model.
        sim = None if self.consistency else self.scorer.similarity(torch.stack([u.d_ref for u in us]), d).tolist()
        out: list[list[float]] = [[] for _ in sets]
        i = 0
        while i < len(us):
            c, g = where[i]
            n = len(self.groups[g])
            val = self.scorer.prompt_score(d[i:i + n]) if self.consistency else max(sim[i:i + n])
            out[c].append(val - us[i].offset)
            i += n
        return out

    def scores(self, sets: list[Neurons], crit: Criterion, until_ok: bool = False) -> list[float | None]:
        """Each candidate's score; for a candidate that fails on the sentinel group, the sentinel's
        value (a lower bound that already decides "not mitigated").

        `until_ok`: the caller reads the candidates in order only up to the first mitigated one
        (the initial selection), so the others' remaining groups are run one candidate at a time,
        and candidates past the first mitigated one come back unscored (None)."""
        self.checks += len(sets)
        every = list(range(len(self.groups)))
        if not self.early_exit or len(every) == 1:
            return [max(v) for v in self.group_scores(sets, [every] * len(sets))]
        sentinel = self.sentinel
        result: list[float | None] = [v[0] for v in self.group_scores(sets, [[sentinel]] * len(sets))]
        passed = [c for c, sc in enumerate(result) if crit.ok(sc)]
        if not until_ok:
            self._rest(sets, passed, sentinel, result, crit)
            return result
        for i, c in enumerate(passed):
            self._rest(sets, [c], sentinel, result, crit)
            if crit.ok(result[c]):
                for later in passed[i + 1:]:
                    result[later] = None
                break
        return result

    def _rest(self, sets: list[Neurons], todo: list[int], sentinel: int, result: list[float | None],
              crit: Criterion) -> None:
        """Scores candidates `todo`, which passed group `sentinel`, on every other group."""
        if not todo:
            return
        rest = [g for g in range(len(self.groups)) if g != sentinel]
        more = self.group_scores([sets[c] for c in todo], [rest] * len(todo))
        for c, v in zip(todo, more):
            worst = max(range(len(v)), key=v.__getitem__)
            if v[worst] > result[c]:
                result[c] = v[worst]
                if not crit.ok(result[c]):
                    # The group that failed becomes the next sentinel: failures tend to repeat.
                    self.sentinel = rest[worst]

    def max_candidates(self) -> int:
        return max(1, self.scorer.batch_size // max(1, len(self.units)))

    def min_candidates(self) -> int:
        """The fewest candidates worth a pass: onnxruntime cuts a pass over its threads, so a
        single candidate's sentinel sample would leave all but one core idle; a second one, built on
        the predicted outcome, costs no wall time."""
        return min(self.max_candidates(), max(1, getattr(self.scorer.unet, "threads", 1)))

    def walk(self, crit: Criterion, current: Neurons, items: list[tuple[str, str, int | None]],
             batched: bool = True, note: Callable[[str, str, float, Criterion], None] | None = None) -> Neurons:
        """For each item in order: re-activate it; if memorization stays mitigated, drop it.

        Pipelined speculation, so that a decision costs about one UNet pass instead of two. A
        candidate is first scored on the sentinel group alone: failing there decides "keep";
        passing is a provisional "drop", confirmed on the other groups in the next pass, which
        also scores the sentinel of the next candidates, built on the provisional outcomes (the
        last outcome predicts those not yet seen). Where a confirmation fails or a prediction was
        wrong, what was built after it is discarded: only decisions of the sequential walk are kept.
        """
        every = list(range(len(self.groups)))
        staged = self.early_exit and len(every) > 1  # else a candidate is scored on every group at once
        floor = self.min_candidates()
        chunk, predict, i = floor, True, 0
        pending: list[_Provisional] = []  # items i, i+1, ... scored on their first stage only
        while i < len(items):
            base = current
            for e in pending:
                if e.needs_rest:
                    base = e.cand
            new: list[tuple[tuple[str, str, int | None], Neurons]] = []
            guess = pending[-1].needs_rest if pending else predict
            width = chunk if batched else (0 if pending else 1)
            for it in items[i + len(pending):i + len(pending) + width]:
                cand = without(base, it)
                new.append((it, cand))
                if guess:
                    base = cand
            sentinel = self.sentinel
            first = [sentinel] if staged else every
            confirm = [e for e in pending if e.needs_rest]
            self.checks += len(new)
            got = self.group_scores([e.cand for e in confirm] + [c for _, c in new],
                                    [[g for g in every if g != e.sentinel] for e in confirm] + [first] * len(new))
            rest_scores = dict(zip(map(id, confirm), got[:len(confirm)]))
            all_right = True
            # Confirm the provisional outcomes in order; the first "drop" that fails ends the path.
            for n, e in enumerate(pending):
                sc = e.score
                if e.needs_rest:
                    v = rest_scores[id(e)]
                    worst = max(range(len(v)), key=v.__getitem__)
                    if v[worst] > sc:
                        sc = v[worst]
                        if not crit.ok(sc):
                            self.sentinel = [g for g in every if g != e.sentinel][worst]
                drop = crit.ok(sc)
                self._decided(e.item, sc, crit, note)
                if drop:
                    current = e.cand
                i += 1
                predict = drop
                if drop != e.needs_rest:  # a provisional drop not confirmed: later work was built on it
                    pending, new, all_right = [], [], False
                    break
            else:
                pending = []
            # First-stage scores of the new candidates, in order, up to the first wrong guess.
            for (it, cand), v in zip(new, got[len(confirm):]):
                sc = max(v)
                passed = crit.ok(sc)
                if staged and passed:
                    pending.append(_Provisional(it, cand, sc, sentinel, True))
                elif staged and pending:
                    pending.append(_Provisional(it, cand, sc, sentinel, False))  # a keep behind provisional drops
                else:
                    self._decided(it, sc, crit, note)
                    if passed:
                        current = cand
                    i += 1
                    predict = passed
                if passed != guess:
                    all_right = False
                    break
                guess = passed
            chunk = min(chunk * 2, self.max_candidates()) if all_right else max(floor, chunk // 2)
        return current

    @staticmethod
    def _decided(item: tuple[str, str, int | None], score: float, crit: Criterion,
                 note: Callable[[str, str, float, Criterion], None] | None) -> None:
        if note:
            note(f"refine-{item[0]}", f"{item[1]}" + ("" if item[2] is None else f"[{item[2]}]"), score, crit)


@dataclass
class _Provisional:
    """A walk candidate scored on its first stage only: passed the sentinel (a drop, once the other
    groups confirm it), or failed it behind such drops (a keep, once they are confirmed)."""

    item: tuple[str, str, int | None]
    cand: Neurons
    score: float
    sentinel: int
    needs_rest: bool


def without(s: Neurons, item: tuple[str, str, int | None]) -> Neurons:
    """`s` with a whole layer ("layer", path, None) or one neuron ("neuron", path, n) re-activated."""
    kind, path, n = item
    out = dict(s)
    if kind == "layer":
        out.pop(path, None)
    else:
        rest = s.get(path, frozenset()) - {n}
        if rest:
            out[path] = frozenset(rest)
        else:
            out.pop(path, None)
    return out


class Localizer:
    def __init__(self, scorer: Scorer, calibration: Calibration, layers: list[ValueLayer],
                 settings: SearchSettings = SearchSettings(), batched: bool = True):
        self.scorer = scorer
        self.cal = calibration
        self.layers = layers
        self.settings = settings
        self.batched = batched

    # --- the steps of the initial selection -----------------------------------------------------
    def initial_candidates(self, emb: torch.Tensor) -> list[tuple[float, int, Neurons]]:
        """(theta_act, k, neurons) for every step the initial selection may take, in order:
        theta_act from 5 down by 0.25 to 1, k from 0 up by 1, stopping at theta_act's floor or
        when k reaches a layer's width."""
        s = self.settings
        acts = value_activations(self.scorer.model, emb, self.layers)
        z = self.cal.z(acts)
        width = min(v.out_features for v in self.layers)
        steps = []
        i = 0
        while True:
            theta = max(s.theta_act_min, s.theta_act_start - i * s.theta_act_step)
            k = s.top_k_start + i * s.top_k_step
            sel: dict[str, set[int]] = {}
            for v in self.layers:
                a, zz = acts[v.path][0], z[v.path][0]
                chosen = set(torch.nonzero(zz > theta).flatten().tolist())
                if k > 0:
                    chosen |= set(torch.topk(a, min(k, len(a))).indices.tolist())
                sel[v.path] = chosen
            steps.append((theta, k, _freeze(sel)))
            if theta <= s.theta_act_min or k >= width:
                return steps
            i += 1

    def localize(self, pid: str, prompt: str, ptype: str | None, emb: torch.Tensor, d: torch.Tensor,
                 det: Detection) -> PromptResult:
        with self.scorer.beside_ort():
            return self._localize(pid, prompt, ptype, emb, d, det)

    def _localize(self, pid: str, prompt: str, ptype: str | None, emb: torch.Tensor, d: torch.Tensor,
                  det: Detection) -> PromptResult:
        t0 = time.perf_counter()
        passes0 = self.scorer.sample_passes
        res = PromptResult(pid, prompt, ptype, det)
        if not det.memorized or not det.memorized_seeds:
            res.seconds = time.perf_counter() - t0
            return res
        checker = Checker.for_prompt(self.scorer, emb, d, list(det.memorized_seeds), early_exit=self.batched,
                                     consistency=self.settings.criterion == "consistency")
        crit = Criterion(det.theta_mem)
        near: list[dict] = []

        def note(stage: str, what: str, score: float, c: Criterion) -> None:
            if abs(score - c.threshold) < NEAR_THRESHOLD:
                near.append({"stage": stage, "candidate": what, "score": round(score, 7),
                             "threshold": round(c.threshold, 7)})

        # Initial selection
        cands = self.initial_candidates(emb)
        chosen = None
        i, chunk = 0, checker.min_candidates()
        while i < len(cands) and chosen is None:
            batch = cands[i:i + (chunk if self.batched else 1)]
            scores = checker.scores([c[2] for c in batch], crit, until_ok=True)
            for (theta, k, sel), sc in zip(batch, scores):
                note("initial", f"theta_act={theta},k={k}", sc, crit)
                if crit.ok(sc):
                    chosen = (theta, k, sel, sc, True)
                    break
            i += len(batch)
            chunk = min(chunk * 2, checker.max_candidates() if self.batched else 1)
        if chosen is None:
            theta, k, sel = cands[-1]
            # The last step's score must be exact: it becomes the refinement threshold.
            sc = checker.scores([sel], Criterion(float("inf")))[0]
            chosen = (theta, k, sel, sc, False)
            crit = Criterion(sc, fallback=True)
        res.initial_theta_act, res.initial_k, current, res.initial_score, res.initial_mitigated = chosen
        res.initial = _sorted(current)
        res.threshold = crit.threshold

        # Refinement (a): whole layers, last layer first
        order = [v.path for v in reversed(self.layers) if current.get(v.path)]
        current = checker.walk(crit, current, [("layer", p, None) for p in order], self.batched, note)
        # Refinement (b): single neurons, last layer first
        items = [("neuron", v.path, n) for v in reversed(self.layers) for n in sorted(current.get(v.path, ()))]
        current = checker.walk(crit, current, items, self.batched, note)

        res.refined = _sorted(current)
        res.blocked_score = checker.scores([current], Criterion(float("inf")))[0]
        # Mitigated means below theta_mem; a fallback bar only guides the refinement.
        res.mitigated = res.blocked_score < det.theta_mem
        res.checks = checker.checks
        res.near_threshold = near
        res.sample_passes = self.scorer.sample_passes - passes0
        res.seconds = time.perf_counter() - t0
        return res
