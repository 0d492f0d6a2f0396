"""Hardening (`build --harden`): the audit's successful attacks become extra inputs of the
localization, then merge, re-apply and re-audit, for a bounded number of rounds.

An attacked embedding that re-triggers a memorized image on the cleaned model is a prompt in
embedding form. Each round localizes those embeddings on the original model with the NeMo search
(exactly as a corpus prompt), merges their neuron sets with the corpus's (the merge then keeps
every corpus prompt and every adversarial input mitigated), applies the new plan and audits it
again. The loop stops when the re-trigger rate stops falling, when reference prompts drift more
than a bound (every zeroed neuron costs quality for all other prompts), when no attack succeeds
any more, or after the last round. The plan kept is the last one that lowered the rate within the
drift bound; every round's figures are reported either way.

An adversarial embedding that re-triggers in full sampling but that the first-step score does not
flag on the original model cannot be localized by NeMo: it is counted, not hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ..errors import NemoError
from ..files import append_jsonl, canonical_json, sha256_bytes
from ..localize.merge import MergeSettings, as_neurons, cached_plan, make_plan
from ..localize.runner import Engine, describe, make_header, open_results, process_embedding, records_digest
from ..plan import Plan
from ..provenance import tool_record
from .audit import load_adversarial

HARDEN_FORMAT = "nemo-surgery-harden"


@dataclass(frozen=True)
class HardenSettings:
    rounds: int = 2  # at most this many re-localizations after the first audit
    max_drift: float = 0.1  # share of reference prompts changed beyond seed noise

    def to_dict(self) -> dict:
        return asdict(self) | {"rate": "mean over budgets of the cleaned model's re-trigger rate",
                               "drift": "share of verification's reference prompts changed beyond seed noise"}


@dataclass
class Evaluation:
    """A plan applied, verified and audited: what the bundle says if this plan is kept."""

    plan: Plan
    verify: dict
    audit: dict
    adversarial: Path  # the audit's attacked embeddings, per memorized target
    extra: dict[str, Any] = field(default_factory=dict)  # images etc. for the bundle's documents


def mean_rate(audit: dict) -> float:
    rates = [r for r in audit["rate"].values() if r is not None]
    return sum(rates) / len(rates) if rates else 0.0


def retriggered(audit: dict, folder: Path, round_: int) -> list[tuple[str, str, torch.Tensor]]:
    """(id, prompt, embedding (1, T, D)) of every attacked embedding that re-triggered its
    memorized target on the cleaned model, at any budget."""
    out = []
    for t in audit["targets"]:
        if t["role"] != "memorized":
            continue
        hits = [b for b, row in t["budgets"].items() if row["cleaned"]["retriggered"]]
        if hits:
            embs = load_adversarial(folder, t["id"])
            out += [(f"adversarial:r{round_}:{t['id']}:{b}", t["prompt"], embs[b][None]) for b in hits]
    return out


def localize_inputs(engine: Engine, inputs: list[tuple[str, str, torch.Tensor]], results: Path,
                    restart: bool = False, log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Detection and NeMo search on the original model for each adversarial embedding; one record
    per input appended to `results` and resumed like the corpus's."""
    digest = sha256_bytes(b"".join(e.float().contiguous().numpy().tobytes() for _, _, e in inputs))
    config = {"mode": "harden", "model": engine.model.fingerprint, "calibration": engine.calibration.key(),
              "score": engine.scorer.settings.to_dict(), "search": engine.search.to_dict(),
              "layers": [v.path for v in engine.layers], "inputs": [i for i, _, _ in inputs],
              "embeddings_sha256": digest}
    done = open_results(results, make_header(config, HARDEN_FORMAT), restart, fmt=HARDEN_FORMAT)
    for pid, text, emb in inputs:
        if pid in done:
            continue
        rec = process_embedding(engine, pid, text, "adversarial", emb.to(engine.model.device))
        append_jsonl(results, rec)
        done[pid] = rec
        log(describe(rec, len(done), len(inputs)).replace("] ", "] harden ", 1))
    return [done[i] for i, _, _ in inputs]


def _delta(old: Plan, new: Plan) -> tuple[int, int]:
    a, b = as_neurons(old), as_neurons(new)
    added = sum(len(v - a.get(k, frozenset())) for k, v in b.items())
    removed = sum(len(v - b.get(k, frozenset())) for k, v in a.items())
    return added, removed


def _row(r: int, ev: Evaluation, prev: Evaluation | None, inputs: int, localized: int) -> dict:
    added, removed = _delta(prev.plan, ev.plan) if prev else (0, 0)
    ref = ev.verify["reference"]
    return {"round": r, "neurons": ev.plan.n_neurons, "added": added, "removed": removed,
            "adversarial_inputs": inputs, "localized": localized,
            "rate": ev.audit["rate"], "mean_rate": round(mean_rate(ev.audit), 4),
            "unperturbed_rate": ev.audit["unperturbed"]["cleaned"],
            "never_trained_rate": ev.audit["never_trained_rate"],
            "reference_drift": round(ref["share"], 4), "reference_changed": ref["changed"],
            "reference_prompts": ref["prompts"],
            # Full sampling's view of the same drift (None where verify sampled no reference prompt).
            "reference_ssim": ev.verify.get("preservation", {}).get("ssim_to_original", {}).get("mean"),
            "reference_own_prompt_nearest": ev.verify.get("preservation", {}).get("own_prompt_nearest"),
            "mitigated_share": round(ev.verify["memorized"]["share"], 4),
            "releasable": ev.verify["releasable"]}


def rejected(prev: dict, row: dict, settings: HardenSettings) -> str | None:
    """Why a round's plan is not kept over the previous round's, or None when it is."""
    r = row["round"]
    if row["reference_drift"] > settings.max_drift:
        return (f"round {r}: reference drift {row['reference_drift']:.0%} above the bound "
                f"{settings.max_drift:.0%}; round {r - 1} kept")
    if row["mean_rate"] >= prev["mean_rate"]:
        return f"round {r}: the re-trigger rate stopped falling ({prev['mean_rate']:.0%} -> " \
               f"{row['mean_rate']:.0%}); round {r - 1} kept"
    return None


def unlocalized(r: int, recs: list[dict]) -> str:
    """Why a round has nothing to merge: the first-step score flags none of the re-triggering
    embeddings on the original model, or it flags some but the search ends with empty sets."""
    flagged = sum(bool(x.get("memorized")) for x in recs)
    if not flagged:
        return (f"round {r}: none of the {len(recs)} re-triggering embeddings is memorized by the first-step "
                f"score on the original model, so NeMo cannot localize them")
    return (f"round {r}: {flagged} of the {len(recs)} re-triggering embeddings are memorized by the first-step "
            f"score on the original model, but NeMo's search found no neurons for any of them")


def harden(engine: Engine, corpus, records: list[dict], first: Evaluation,
           evaluate: Callable[[Plan, int], Evaluation], merge: MergeSettings, settings: HardenSettings,
           work: Path, restart: bool = False, log: Callable[[str], None] = lambda s: None,
           pruning: Callable[[], ContextManager] = lambda: contextlib.nullcontext(None)
           ) -> tuple[Evaluation, dict]:
    """Run hardening rounds after `first` (round 0). `evaluate(plan, round)` applies, verifies and
    audits a plan. `pruning()`: a context giving each round's merge its `shard` (`RayPruning`), open
    only while that merge runs. Returns the evaluation kept and the hardening record for the bundle."""
    if settings.rounds < 1:
        raise NemoError("--harden-rounds must be at least 1")
    rows = [_row(0, first, None, 0, 0)]
    kept, last = first, first
    extra_records: list[dict] = []
    embeddings: dict[str, torch.Tensor] = {}
    reason = f"round limit ({settings.rounds})"
    for r in range(1, settings.rounds + 1):
        inputs = retriggered(last.audit, last.adversarial, r)
        if not inputs:
            reason = f"round {r}: no attack re-triggers a memorized image any more"
            break
        log(f"harden: round {r}: localizing {len(inputs)} adversarial embeddings on the original model")
        recs = localize_inputs(engine, inputs, work / f"harden-r{r}.jsonl", restart, log)
        localized = [x for x in recs if x.get("refined")]
        if not localized:
            reason = unlocalized(r, recs)
            break
        extra_records += recs
        embeddings |= {pid: emb for pid, _, emb in inputs}
        with pruning() as shard:
            plan = _merged_plan(engine, corpus, records + extra_records, merge, embeddings, work / f"plan-r{r}.json",
                                log, shard)
        plan.settings["harden"] = {"round": r, "settings": settings.to_dict(),
                                   "adversarial_inputs": sorted(embeddings)}
        ev = evaluate(plan, r)
        row = _row(r, ev, last, len(inputs), len(localized))
        rows.append(row)
        last = ev
        log(f"harden: round {r}: {row['neurons']} neurons (+{row['added']} -{row['removed']}), re-trigger rate "
            f"{row['mean_rate']:.0%} (was {rows[-2]['mean_rate']:.0%}), reference drift {row['reference_drift']:.0%}")
        why = rejected(rows[-2], row, settings)
        if why:
            reason = why
            break
        kept = ev
    record = {"format": HARDEN_FORMAT, "version": 1, "tool": tool_record(), "settings": settings.to_dict(),
              "rounds": rows,
              "kept_round": 0 if kept is first else kept.plan.settings["harden"]["round"],
              "stopped": reason,
              "adversarial_records": [{k: v for k, v in x.items() if k != "seconds"} for x in extra_records]}
    return kept, record


def _merged_plan(engine: Engine, corpus, records: list[dict], merge: MergeSettings,
                 embeddings: dict[str, torch.Tensor], path: Path, log: Callable[[str], None],
                 shard: Callable | None = None) -> Plan:
    """The merge over corpus and adversarial records, reused from `path` when the records and
    embeddings are the same (a resumed build)."""
    key = sha256_bytes(canonical_json([records_digest(records), sorted(embeddings)]).encode())
    return cached_plan(path, "harden_digest", key, merge,
                       lambda: make_plan(engine, corpus, records, merge, log, embeddings,
                                         journal=path.with_name(path.stem + ".prune.json"), shard=shard))
