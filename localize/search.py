"""The per-prompt NeMo search: initial selection, then refinement (NEMO.md, "Localization of one
memorized prompt"), computed by a batched engine that takes the same decisions as the plain
sequential algorithm.

Why it is faster without changing any decision:
- the prompt's text embedding and its unblocked noise differences are computed once;
- every check "is memorization still mitigated with set S blocked?" is "is the max over the
  memorized seeds of MS-SSIM(unblocked d, blocked d) below the threshold?", so it is decided
  "no" by the first seed that reaches the threshold. Each check first runs one sentinel seed
  (the one that last reached the threshold), and only checks that pass it run the other seeds,
  in refinement in growing stages, the seeds that failed most recently first;
- candidates are evaluated side by side in one UNet pass (per-sample masks). Where a later
  candidate depends on earlier outcomes (refinement), it is built on the predicted outcomes
  (the last outcome repeats), and the results past the first wrong prediction are discarded:
  the decisions taken are exactly those of the sequential walk;
- a candidate's next stage runs in the next pass, beside the sentinel samples of the candidates
  that follow it (built as if it is dropped), so a decision costs about one pass, not one per
  stage; and no candidate whose result cannot be read gets more seeds.
The corpus-level pruning (merge.py) walks the same way, its groups prompts (or, under the
published criterion, (prompt, memorized seed) pairs).
Paper names in comments: theta_act (activation z threshold), k (top-k), theta_mem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..model import ValueLayer
from .calibrate import Calibration
from .detect import Detection
from .score import Scorer, value_activations
from .settings import NEAR_THRESHOLD, SearchSettings

Neurons = dict[str, frozenset[int]]
# A walk candidate's groups are scored in stages of 1, 1, 2, 4, ... groups. Most failing checks
# fail on one of the first few groups tried (those that failed last): on the demo's corpus
# pruning, 13 prompts as groups, this cut the merge from 13,760 to 5,768 UNet samples (a factor
# of 4 between stages: 6,266; one stage after the first: 13,760), while the search's samples
# moved by -2 to +1 %.
STAGE_GROWTH = 2


def _freeze(d: dict[str, Iterable[int]]) -> Neurons:
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
    # Every decision in the order taken: (stage, candidate, score, mitigated, threshold). Not
    # written to results.jsonl (hundreds per prompt); it lets a comparison with another run say
    # which decision two runs first took differently, and how close to its bar that was.
    decisions: list[tuple[str, str, float, bool, float]] = field(default_factory=list, repr=False)

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

    emb: torch.Tensor  # (T, D) text embedding, T the tokenizer's context
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
        self.order = list(range(len(self.groups)))  # most recently failed group first
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
        """Each candidate's score; for a candidate that fails on the sentinel group (the one that
        failed last), the sentinel's value (a lower bound that already decides "not mitigated").

        `until_ok`: the caller reads the candidates in order only up to the first mitigated one
        (the initial selection), so the others' remaining groups are run one candidate at a time,
        and candidates past the first mitigated one come back unscored (None)."""
        self.checks += len(sets)
        if not self.early_exit or len(self.groups) == 1 or crit.threshold == float("inf"):
            # Nothing to exit early on (an exact score: no group can fail): one pass.
            return [max(v) for v in self.group_scores(sets, [list(range(len(self.groups)))] * len(sets))]
        first, rest = self.order[:1], self.order[1:]
        result: list[float | None] = [v[0] for v in self.group_scores(sets, [first] * len(sets))]
        passed = [c for c, sc in enumerate(result) if crit.ok(sc)]
        if not until_ok:
            for c, v in zip(passed, self.group_scores([sets[c] for c in passed], [rest] * len(passed))):
                result[c] = self._worse(result[c], v, rest, crit)
            return result
        for n, c in enumerate(passed):
            result[c] = self._worse(result[c], self.group_scores([sets[c]], [rest])[0], rest, crit)
            if crit.ok(result[c]):
                for later in passed[n + 1:]:
                    result[later] = None
                break
        return result

    def _worse(self, score: float, values: list[float], groups: list[int], crit: Criterion) -> float:
        """`score` raised to the worst of `values` (scores of `groups`); a group that fails moves to
        the front of the order: failures tend to repeat, and the front is checked first."""
        worst = max(range(len(values)), key=values.__getitem__)
        if values[worst] > score:
            score = values[worst]
            if not crit.ok(score):
                self.order.remove(groups[worst])
                self.order.insert(0, groups[worst])
        return score

    def max_candidates(self) -> int:
        return max(1, self.scorer.batch_size // max(1, len(self.units)))

    def min_candidates(self) -> int:
        """The fewest candidates worth a pass: onnxruntime cuts a pass over its threads, so a
        single candidate's sentinel sample would leave all but one core idle; a second one, built on
        the predicted outcome, costs no wall time."""
        return min(self.max_candidates(), max(1, getattr(self.scorer.unet, "threads", 1)))

    def walk(self, crit: Criterion, current: Neurons, items: list[tuple[str, str, int | None]],
             batched: bool = True, note: Callable[[str, str, float, Criterion], None] | None = None,
             progress: Callable[[int, Neurons], None] | None = None) -> Neurons:
        """For each item in order: re-activate it; if memorization stays mitigated, drop it.
        `progress(decided, current)` after each pass that decided items: how many of `items` are
        decided, and the set they leave (a walk restarted there with `items[decided:]` takes the
        same decisions).

        Pipelined, staged speculation, so that a decision costs about one UNet pass and a failing
        check few samples. A candidate's groups are scored in stages (`STAGE_GROWTH`), the most
        recently failed groups first: a stage that fails decides "keep", the last stage passed
        decides "drop". Every pass scores the next stage of each candidate in flight beside the
        first stage of the next candidates, built on the provisional outcomes (the last outcome
        predicting those not yet seen). Where a candidate's outcome turns out other than the one
        later candidates were built on, those are discarded: only decisions of the sequential walk
        are kept.
        """
        n_groups = len(self.groups)
        first = 1 if self.early_exit else n_groups
        floor = self.min_candidates()
        chunk, predict, i = floor, True, 0
        flight: list[_InFlight] = []  # candidates for items i, i+1, ... in order, not yet decided
        while i < len(items):
            base = current
            for e in flight:
                if not e.failed:
                    base = e.cand
            guess = (not flight[-1].failed) if flight else predict
            order = tuple(self.order)
            new: list[_InFlight] = []
            width = chunk if batched else (0 if flight else 1)
            for it in items[i + len(flight):i + len(flight) + width]:
                if new or flight:
                    (new or flight)[-1].assumed = guess
                cand = without(base, it)
                new.append(_InFlight(it, cand, order, stop=first))
                if guess:
                    base = cand
            self.checks += len(new)
            work = [e for e in flight if not e.failed and e.done < n_groups] + new
            stages = [list(e.order[e.done:e.stop]) for e in work]
            for e, v, groups in zip(work, self.group_scores([e.cand for e in work], stages), stages):
                e.score = self._worse(e.score, v, groups, crit)
                e.failed = not crit.ok(e.score)
                e.done, e.stop = e.stop, min(n_groups, STAGE_GROWTH * e.stop)
            # Candidates built on an outcome that did not happen are dropped.
            line, all_right = flight + new, True
            for n, e in enumerate(line[:-1]):
                if e.failed == e.assumed:
                    line, all_right = line[:n + 1], False
                    break
            # Decide from the front, as far as outcomes are final.
            flight, decided = [], i
            for e in line:
                if flight or not (e.failed or e.done == n_groups):
                    flight.append(e)
                    continue
                if note:
                    kind, path, row = e.item
                    note(f"refine-{kind}", path + ("" if row is None else f"[{row}]"), e.score, crit)
                if not e.failed:
                    current = e.cand
                i += 1
                predict = not e.failed
            if progress and i > decided:
                progress(i, current)
            chunk = min(chunk * 2, self.max_candidates()) if all_right else max(floor, chunk // 2)
        return current


@dataclass(eq=False)
class _InFlight:
    """A walk candidate whose groups `order[:done]` are scored (worst: `score`); the next stage is
    `order[done:stop]`. `assumed`: the outcome the next candidate was built on (True: dropped)."""

    item: tuple[str, str, int | None]
    cand: Neurons
    order: tuple[int, ...]
    stop: int
    done: int = 0
    score: float = float("-inf")
    failed: bool = False
    assumed: bool | None = None


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
        with self.scorer.searching():
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
            res.decisions.append((stage, what, score, c.ok(score), c.threshold))
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
