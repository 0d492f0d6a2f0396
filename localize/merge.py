"""From per-prompt neuron sets to one surgery plan for the whole corpus (NEMO.md, "Corpus level").

1. union of the refined sets, with per-neuron counts of the prompts that need each neuron;
   `min_prompts` / `max_neurons` filter it;
2. check: with the merged set blocked, every memorized prompt is re-scored;
3. corpus-level pruning: the union is redundant (prompts share neurons and each set was refined
   alone), so starting from it, whole layers and then single neurons (least needed first) are
   re-activated where every prompt stays as mitigated as the union left it. Every zeroed neuron
   costs some quality for every user of the model, so fewer is better.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..corpus import Corpus
from ..errors import NemoError
from ..files import canonical_json, sha256_bytes, write_json_atomic
from ..plan import Plan
from ..provenance import libraries, versions_changed
from .runner import Engine, records_digest
from .search import Checker, Criterion, Neurons, Unit, _freeze, _sorted, count

JOURNAL_FORMAT = "nemo-surgery-prune"
JOURNAL_EVERY = 10.0  # seconds between journal writes: a pass can take less than an fsync on a small model
PROGRESS_EVERY = 30.0  # seconds between progress lines of the neuron walk


@dataclass(frozen=True)
class MergeSettings:
    min_prompts: int = 1
    max_neurons: int | None = None
    prune: bool = True


def union(records: list[dict], min_prompts: int = 1, max_neurons: int | None = None
          ) -> tuple[Neurons, dict[str, dict[int, int]]]:
    counts: dict[str, dict[int, int]] = {}
    for r in records:
        for path, rows in (r.get("refined") or {}).items():
            for n in rows:
                counts.setdefault(path, {})
                counts[path][n] = counts[path].get(n, 0) + 1
    kept = [(path, n) for path, n in most_needed(counts) if counts[path][n] >= min_prompts]
    return as_layers(kept[:max_neurons] if max_neurons is not None else kept), counts


def most_needed(counts: dict[str, dict[int, int]]) -> list[tuple[str, int]]:
    """(layer, neuron) pairs, the most needed first; ties by module path, then index, so that
    `max_neurons` keeps the same neurons on every run."""
    ranked = sorted(((c, path, n) for path, per in counts.items() for n, c in per.items()),
                    key=lambda t: (-t[0], t[1], t[2]))
    return [(path, n) for _, path, n in ranked]


def as_layers(pairs: list[tuple[str, int]]) -> Neurons:
    merged: dict[str, set[int]] = {}
    for path, n in pairs:
        merged.setdefault(path, set()).add(n)
    return {k: frozenset(v) for k, v in merged.items()}


@dataclass
class PromptUnits:
    id: str
    seeds: list[int]
    units: list[Unit]


def memorized_units(engine: Engine, records: list[dict], embeddings: dict[str, torch.Tensor] | None = None
                    ) -> list[PromptUnits]:
    """Text embedding and unblocked noise differences of each memorized prompt (its memorized
    seeds, or all seeds for the consistency criterion), recomputed: a resumed run has them only
    on disk as scores. `embeddings`: inputs given in embedding form (1, T, D), by record id."""
    consistency = engine.search.criterion == "consistency"
    embeddings = embeddings or {}
    out = []
    for r in records:
        if not r.get("memorized") or not r.get("memorized_seeds"):
            continue
        emb = embeddings.get(str(r["id"]))
        if emb is None:
            emb = engine.scorer.embed([r["prompt"]])
        d = engine.scorer.prompt_noise_diffs(emb)
        seeds = list(range(len(d))) if consistency else list(r["memorized_seeds"])
        out.append(PromptUnits(str(r["id"]), seeds, [Unit(emb[0], engine.scorer.latents[s], d[s]) for s in seeds]))
    return out


def _corpus_checker(engine: Engine, prompts: list[PromptUnits], bars: dict[str, float] | None = None,
                    early_exit: bool = False, by_seed: bool = False) -> Checker:
    """Groups are prompts; with `by_seed` under the published criterion, (prompt, memorized seed)
    pairs: a prompt's score is then the max of its seeds' and a check is still "every group under
    its bar", but one that fails costs the one seed that failed last instead of the prompt's seeds."""
    consistency = engine.search.criterion == "consistency"
    units, groups = [], []
    for p in prompts:
        off = bars[p.id] if bars else 0.0
        ids = list(range(len(units), len(units) + len(p.units)))
        groups += [[i] for i in ids] if by_seed and not consistency else [ids]
        units += [Unit(u.emb, u.latent, u.d_ref, off) for u in p.units]
    return Checker(engine.scorer, units, groups, consistency, early_exit)


def blocked_scores(engine: Engine, prompts: list[PromptUnits], neurons: Neurons) -> dict[str, float]:
    """Per prompt, its score under the search's criterion with `neurons` off."""
    if not prompts:
        return {}
    checker = _corpus_checker(engine, prompts)
    vals = checker.group_scores([neurons], [list(range(len(prompts)))])[0]
    return {p.id: v for p, v in zip(prompts, vals)}


class PruneJournal:
    """Where a corpus pruning stands, so that an interrupted merge resumes there instead of
    starting over: on a corpus of hundreds of prompts the pruning walk is the longest part of a
    merge. Keyed by everything its decisions depend on; written atomically after passes that
    decided something (at most every JOURNAL_EVERY seconds, and at the end of each stage)."""

    def __init__(self, path: Path | None, key: str, log: Callable[[str], None] = lambda s: None):
        self.path = Path(path) if path is not None else None
        self.key = key
        self.log = log
        self.written = 0.0

    def load(self) -> dict | None:
        """The saved state for this key: {"stage": "layers" | "neurons", "start": set the stage
        began with, "decided": items of the stage decided, "current": the set they left}."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            j = json.loads(self.path.read_text(encoding="utf-8"))
            if j.get("format") != JOURNAL_FORMAT or j.get("key") != self.key:
                self.log(f"pruning: {self.path} is from other inputs or settings; starting over")
                return None
            return {"stage": j["stage"], "decided": int(j["decided"]),
                    "start": _freeze(j["start"]), "current": _freeze(j["current"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.log(f"pruning: {self.path} is unreadable; starting over")
            return None

    def save(self, stage: str, start: Neurons, decided: int, current: Neurons, force: bool = False) -> None:
        if self.path is None or not (force or time.monotonic() - self.written >= JOURNAL_EVERY):
            return
        write_json_atomic(self.path, {"format": JOURNAL_FORMAT, "key": self.key, "stage": stage,
                                      "decided": decided, "start": _sorted(start), "current": _sorted(current)})
        self.written = time.monotonic()

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def prune(engine: Engine, prompts: list[PromptUnits], neurons: Neurons, counts: dict[str, dict[int, int]],
          before: dict[str, float], log: Callable[[str], None] = lambda s: None,
          journal: PruneJournal | None = None, shard: Callable[[Checker], Checker] | None = None) -> Neurons:
    """Re-activate layers, then neurons (least needed first), wherever every prompt stays at
    least as mitigated as with `neurons` blocked: below theta_mem if it was, else no worse.
    `journal`: where the walk is saved as it goes, and resumed from. `shard`: turns the walk's
    checker into one that runs its passes elsewhere (`distributed.RayPruning`)."""
    if not prompts:
        return neurons
    journal = journal or PruneJournal(None, "")
    theta = engine.calibration.theta_mem
    bars = {p.id: theta if before[p.id] < theta else before[p.id] + 1e-9 for p in prompts}
    checker = _corpus_checker(engine, prompts, bars, early_exit=True, by_seed=True)
    if shard is not None:
        checker = shard(checker)
    crit = Criterion(0.0)
    order = [v.path for v in reversed(engine.layers)]
    rank = {p: i for i, p in enumerate(order)}
    state = journal.load()
    if state is None or state["stage"] == "layers":
        done, current = (state["decided"], state["current"]) if state else (0, neurons)
        if state:
            log(f"pruning: resuming the layers at {done} decided ({journal.path})")
        layers = [("layer", p, None) for p in order if neurons.get(p)]
        current = checker.walk(crit, current, layers[done:],
                               progress=lambda i, cur: journal.save("layers", neurons, done + i, cur))
        log(f"pruning: layers {count(neurons)} -> {count(current)} neurons")
        start, done = current, 0
        journal.save("neurons", start, 0, current, force=True)
    else:
        start, done, current = state["start"], state["decided"], state["current"]
        log(f"pruning: resuming the neurons at {done} of {count(start)} decided ({journal.path})")
    items = sorted((("neuron", p, n) for p, rows in start.items() for n in rows),
                   key=lambda it: (counts.get(it[1], {}).get(it[2], 0), rank.get(it[1], 0), it[2]))
    t0 = last = time.monotonic()

    def progress(i: int, cur: Neurons) -> None:
        nonlocal last
        journal.save("neurons", start, done + i, cur)
        if time.monotonic() - last >= PROGRESS_EVERY:
            last = time.monotonic()
            log(f"pruning: {done + i} of {len(items)} neurons decided, {count(start) - count(cur)} re-activated "
                f"({last - t0:.0f} s)")

    current = checker.walk(crit, current, items[done:], progress=progress)
    log(f"pruning: neurons -> {count(current)} neurons ({checker.checks} checks)")
    return current


def make_plan(engine: Engine, corpus: Corpus, records: list[dict], settings: MergeSettings = MergeSettings(),
              log: Callable[[str], None] = lambda s: None,
              embeddings: dict[str, torch.Tensor] | None = None, journal: Path | None = None,
              localized_on: dict | None = None, shard: Callable[[Checker], Checker] | None = None) -> Plan:
    """`embeddings`: records whose input is an embedding rather than their prompt's text (hardening).
    `journal`: a file the pruning is saved to as it goes and resumed from (removed once the plan
    is made); None: not saved. `localized_on`: the library versions the records were found on
    (their results file's header); where they are not this run's, the plan keeps them beside its
    own tool record, since the sets, not only the pruning, sit in their float noise. `shard`: as
    `prune` takes it."""
    with engine.scorer.searching():
        plan = _make_plan(engine, corpus, records, settings, log, embeddings, journal, shard)
    if localized_on and versions_changed(localized_on, libraries()):
        plan.tool["localization_libraries"] = dict(localized_on)
    return plan


def journal_key(engine: Engine, records: list[dict], settings: MergeSettings,
                embeddings: dict[str, torch.Tensor] | None) -> str:
    """Everything a pruning's decisions depend on."""
    return sha256_bytes(canonical_json({
        "records": records_digest(records), "embeddings": sorted(embeddings or {}), "merge": asdict(settings),
        "search": engine.search.to_dict(), "score": engine.scorer.settings.to_dict(),
        "theta_mem": engine.calibration.theta_mem, "model": engine.model.fingerprint,
        "layers": [v.path for v in engine.layers]}).encode())


def _make_plan(engine: Engine, corpus: Corpus, records: list[dict], settings: MergeSettings,
               log: Callable[[str], None], embeddings: dict[str, torch.Tensor] | None,
               journal_path: Path | None, shard: Callable[[Checker], Checker] | None) -> Plan:
    t0 = time.perf_counter()
    key = journal_key(engine, records, settings, embeddings) if journal_path else ""
    journal = PruneJournal(journal_path, key, log)
    merged, counts = union(records, settings.min_prompts, settings.max_neurons)
    prompts = memorized_units(engine, records, embeddings)
    theta = engine.calibration.theta_mem
    before = blocked_scores(engine, prompts, merged)
    share_union = sum(s < theta for s in before.values()) / max(1, len(before))
    log(f"merged: {count(merged)} neurons in {len(merged)} layers; mitigates "
        f"{sum(s < theta for s in before.values())}/{len(before)} memorized prompts")
    final, after = merged, before
    if settings.prune and merged:
        final = prune(engine, prompts, merged, counts, before, log, journal, shard)
        after = blocked_scores(engine, prompts, final)
    journal.clear()
    still = sorted(pid for pid, s in after.items() if s >= theta)
    share = sum(s < theta for s in after.values()) / max(1, len(after))
    check = {
        "memorized_prompts": len(prompts),
        "union_neurons": count(merged),
        "union_mitigated_share": round(share_union, 4),
        "neurons": count(final),
        "mitigated_share": round(share, 4),
        "still_memorized": still,
        "theta_mem": theta,
        "blocked_scores": {k: round(v, 6) for k, v in after.items()},
    }
    # No timings in the plan: the same results must give the same plan, byte for byte.
    log(f"merge: {count(final)} neurons in the plan ({time.perf_counter() - t0:.1f} s)")
    calibration = {k: v for k, v in engine.calibration.summary().items() if k != "seconds"}
    final_counts = {p: {n: counts[p][n] for n in rows} for p, rows in final.items()}
    return Plan(
        layers=_sorted(final), counts=final_counts,
        model=engine.model.describe() | {"searched_layers": [v.path for v in engine.layers]},
        corpus={"path": str(corpus.path.name), "sha256": corpus.sha256, "prompts": len(corpus.prompts),
                "memorized": sum(p.id not in (embeddings or {}) for p in prompts)}
        | ({"adversarial_inputs": sum(p.id in embeddings for p in prompts)} if embeddings else {}),
        settings={"merge": asdict(settings), "search": engine.search.to_dict(),
                  "score": engine.scorer.settings.to_dict(), "calibration": calibration},
        check=check,
    )


def cached_plan(path: Path, digest_key: str, digest: str, settings: MergeSettings, make: Callable[[], Plan]) -> Plan:
    """The plan saved at `path` when it was merged from the same inputs (`settings[digest_key]`
    equal to `digest`) with the same merge settings: a resumed run skips the merge. Otherwise
    `make()`'s plan, saved there with the digest."""
    if path.is_file():
        try:
            plan = Plan.load(path)
        except NemoError:
            plan = None
        same = plan is not None and plan.settings.get(digest_key) == digest
        if same and plan.settings.get("merge") == asdict(settings):
            return plan
    plan = make()
    plan.settings[digest_key] = digest
    plan.save(path)
    return plan


def as_neurons(plan: Plan) -> Neurons:
    return _freeze(plan.layers)


