"""The refinement walk's speculation (groups scored in growing stages, the most recently failed
first; each pass running the next stage of the candidates in flight beside the first stage of new
ones; outcome prediction) must take exactly the decisions of the plain sequential walk, whatever
the scores. Scores here come from a fixed pseudo-random
landscape over (candidate set, group), so that every pattern of passes, failures and late
failures on a non-sentinel group occurs; the UNet-backed checks are in test_localize and test_demo."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_surgery.localize.search import STAGE_GROWTH, Checker, Criterion, Neurons, without


class LandscapeChecker(Checker):
    """A checker whose group scores are a fixed function of (set, group): uniform in [0, 1 - easy),
    so that with a high `easy` passes are common enough to build long runs of drops."""

    def __init__(self, groups: int, salt: int, batch: int, threads: int, early_exit: bool, easy: float):
        scorer = SimpleNamespace(batch_size=batch, unet=SimpleNamespace(threads=threads))
        super().__init__(scorer, list(range(groups)), None, False, early_exit)
        self.salt, self.easy, self.passes = salt, easy, 0

    def score(self, s: Neurons, g: int) -> float:
        key = repr(sorted((k, sorted(v)) for k, v in s.items())) + f"|{g}|{self.salt}"
        u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        return u * (1 - self.easy)

    def group_scores(self, sets, gids):
        self.passes += 1
        return [[self.score(s, g) for g in gs] for s, gs in zip(sets, gids)]


def sequential(checker: LandscapeChecker, crit: Criterion, current: Neurons, items) -> tuple[Neurons, list]:
    decisions = []
    for it in items:
        cand = without(current, it)
        sc = max(checker.score(cand, g) for g in range(len(checker.groups)))
        decisions.append((it, crit.ok(sc)))
        if crit.ok(sc):
            current = cand
    return current, decisions


@settings(max_examples=300, deadline=None)
@given(neurons=st.lists(st.integers(0, 30), min_size=1, max_size=40, unique=True),
       layers=st.integers(1, 3), groups=st.integers(1, 14), salt=st.integers(0, 10**6),
       batch=st.integers(1, 64), threads=st.integers(1, 3), early_exit=st.booleans(),
       easy=st.floats(0.0, 0.9), threshold=st.floats(0.05, 0.95), fallback=st.booleans(),
       batched=st.booleans(), with_layers=st.booleans())
def test_walk_takes_the_sequential_decisions(neurons, layers, groups, salt, batch, threads, early_exit, easy,
                                             threshold, fallback, batched, with_layers):
    current: Neurons = {}
    for i, n in enumerate(neurons):
        path = f"layer{i % layers}"
        current[path] = current.get(path, frozenset()) | {n}
    items = [("layer", p, None) for p in sorted(current, reverse=True)] if with_layers else []
    items += [("neuron", p, n) for p in sorted(current, reverse=True) for n in sorted(current[p])]
    crit = Criterion(threshold, fallback)
    checker = LandscapeChecker(groups, salt, batch, threads, early_exit, easy)
    want, decisions = sequential(checker, crit, current, items)
    seen = []
    got = checker.walk(crit, current, items, batched,
                       note=lambda stage, what, sc, c: seen.append((what, c.ok(sc))))
    assert got == want
    names = [f"{it[1]}" + ("" if it[2] is None else f"[{it[2]}]") for it, _ in decisions]
    assert seen == [(name, ok) for name, (_, ok) in zip(names, decisions)]
    if not batched:  # one candidate at a time: a decision costs at most one pass per stage
        stages, stop = 1, 1
        while early_exit and stop < groups:
            stop, stages = min(groups, STAGE_GROWTH * stop), stages + 1
        assert checker.passes <= stages * len(items)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 20), groups=st.integers(1, 14), salt=st.integers(0, 10**6), early_exit=st.booleans(),
       easy=st.floats(0.0, 0.9), threshold=st.floats(0.05, 0.95), until_ok=st.booleans())
def test_scores_decide_as_the_full_check(n, groups, salt, early_exit, easy, threshold, until_ok):
    """The initial selection's scoring: every candidate the caller reads (all of them, or those up
    to the first mitigated one) gets the full check's outcome, and a mitigated one its exact score."""
    checker = LandscapeChecker(groups, salt, 64, 1, early_exit, easy)
    crit = Criterion(threshold)
    sets = [{"layer0": frozenset(range(k + 1))} for k in range(n)]
    full = [max(checker.score(s, g) for g in range(groups)) for s in sets]
    got = checker.scores(sets, crit, until_ok=until_ok)
    read = next((c + 1 for c, v in enumerate(full) if crit.ok(v)), n) if until_ok else n
    for c in range(read):
        assert crit.ok(got[c]) == crit.ok(full[c])
        if crit.ok(full[c]):
            assert got[c] == full[c]
        else:
            assert got[c] <= full[c]


def test_differing_sets_are_explained_only_by_a_decision_at_its_bar():
    """The check the comparisons with the plain algorithm lean on: sets may differ only through the
    first decision two runs took differently, and only if it sat within float noise of its bar."""
    from reference_nemo import assert_differs_by_float_noise, first_divergence

    bar = 0.2
    common = [("initial", "theta_act=5.0,k=0", 0.5, False, bar), ("refine-layer", "mid", 0.1, True, bar)]

    def runs(plain_step, engine_step):
        return {"decisions": common + [plain_step]}, SimpleNamespace(decisions=common + [engine_step])

    near = runs(("refine-neuron", "a[3]", bar - 3e-6, True, bar), ("refine-neuron", "a[3]", bar + 2e-6, False, bar))
    assert_differs_by_float_noise(*near)
    assert "a[3]: plain 0.1999970 (drop)" in first_divergence(near[0]["decisions"], near[1].decisions)
    far = runs(("refine-neuron", "a[3]", 0.15, True, bar), ("refine-neuron", "a[3]", 0.25, False, bar))
    with pytest.raises(AssertionError, match="away from its bar"):
        assert_differs_by_float_noise(*far)
    alike = runs(("refine-neuron", "a[3]", 0.15, True, bar), ("refine-neuron", "a[3]", 0.15, True, bar))
    assert first_divergence(alike[0]["decisions"], alike[1].decisions) is None
    with pytest.raises(AssertionError, match="every decision was taken alike"):
        assert_differs_by_float_noise(*alike)
    other = runs(("refine-neuron", "a[3]", bar, True, bar), ("refine-neuron", "a[4]", bar, True, bar))
    with pytest.raises(AssertionError, match="different candidates"):
        assert_differs_by_float_noise(*other)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=20), actors=st.integers(1, 5))
def test_a_sharded_pass_deals_each_group_once_and_spreads_the_first_stages(sizes, actors):
    """The Ray pruning's dealing (`distributed.share`): every group of every candidate goes to
    exactly one actor and comes back in its place; a pass of one-group stages (an early-exit
    walk's first) spreads over the actors instead of all landing on the first."""
    from nemo_surgery.localize.distributed import share

    gids = [[100 * j + m for m in range(size)] for j, size in enumerate(sizes)]
    parts = [[g[s] for g, s in zip(gids, share(k, actors, len(gids)))] for k in range(actors)]
    back = [[None] * len(g) for g in gids]
    for k, part in enumerate(parts):
        for row, vals, s in zip(back, part, share(k, actors, len(gids))):
            row[s] = vals
    assert back == gids
    singles = [[0]] * len(sizes)
    load = [sum(len(g[s]) for g, s in zip(singles, share(k, actors, len(singles)))) for k in range(actors)]
    assert max(load) - min(load) <= 1
