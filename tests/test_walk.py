"""The refinement walk's speculation (sentinel group first, provisional drops confirmed in the next
pass beside the next candidates' first stage, outcome prediction) must take exactly the decisions
of the plain sequential walk, whatever the scores. Scores here come from a fixed pseudo-random
landscape over (candidate set, group), so that every pattern of passes, failures and late
failures on a non-sentinel group occurs; the UNet-backed checks are in test_localize and test_demo."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_surgery.localize.search import Checker, Criterion, Neurons, without


class LandscapeChecker(Checker):
    """A checker whose group scores are a fixed function of (set, group): uniform in [0, 1),
    shifted down for groups below `easy` so that passes are common enough to build long runs."""

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
       layers=st.integers(1, 3), groups=st.integers(1, 6), salt=st.integers(0, 10**6),
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
    if not batched:  # one new candidate per pass: a decision costs at most two passes
        assert checker.passes <= 2 * len(items)
