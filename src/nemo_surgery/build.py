"""`build`: calibrate, detect, localize, merge, apply, verify, audit (then, with `--harden`,
rounds of re-localization against the audit's attacks) and export in one resumable run.

The composition root of the stages. Work in progress lives in `<out>.work/` (calibration cache,
results appended per prompt, the plan, the audit's records and attacked embeddings, hardening's
per-round records and plans); the bundle is assembled under a temporary name beside `<out>` and
renamed onto it in one step, so `<out>` is either absent, the previous bundle, or the complete new
one. Rerunning the same command resumes: finished prompts, audit targets and a matching plan are
reused, and so is each chunk of verification's full sampling already measured; apply, the rest of
verify and export run again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .corpus import evenly_spaced, read_corpus
from .engine import Runtime, default_cache_dir, make_engine, open_model
from .errors import NemoError
from .files import atomic_dir, check_apart, clean_stale_tmp, output_path, write_json_atomic
from .generation import GenSettings
from .localize.detect import detection_summary, detection_text
from .localize.distributed import RaySettings, ray_pruning, ray_stream
from .localize.merge import MergeSettings, as_neurons, cached_plan, make_plan
from .localize.runner import records_digest, results_libraries, run_corpus, unmet_criterion_note
from .localize.settings import CALIBRATION_SCORE_PROMPTS, ScoreSettings, SearchSettings
from .model import load_model
from .plan import Plan
from .provenance import tool_record
from .surgery.audit import AuditSettings, audited, pct
from .surgery.harden import HardenSettings


@dataclass
class BuildOptions:
    model: Path
    corpus: Path
    reference: Path
    out: Path
    runtime: Runtime = field(default_factory=Runtime)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    merge: MergeSettings = field(default_factory=MergeSettings)
    calibration_prompts: int = CALIBRATION_SCORE_PROMPTS
    theta_mem: float | None = None  # None: calibrated (mean + 1 std of the reference scores)
    cache_dir: Path | None = None
    min_mitigated: float = 0.95
    min_preserved: float = 0.95  # share of reference prompts' images still their own prompt's
    allow_partial: bool = False
    onnx: bool = False
    card_include_prompts: bool = False
    license: str | None = None
    base_model: str | None = None
    verify_reference_prompts: int = 64  # re-scored (first step) for drift
    verify_reference_images: int = 16  # sampled in full before and after for preservation
    force: bool = False
    restart: bool = False
    allow_outside_images: bool = False
    ray: RaySettings | None = None  # shard localization over Ray actors
    audit: AuditSettings | None = field(default_factory=AuditSettings)  # None: skipped
    control_images: Path | None = None
    sampling: GenSettings = field(default_factory=GenSettings)  # full sampling in verification
    harden: HardenSettings | None = None  # None: no hardening rounds after the audit


@dataclass
class BuildSummary:
    out: Path
    releasable: bool
    rows: list[tuple[str, str, str]]  # (stage, what, seconds)

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{s:<{w}}  {sec:>7}  {what}" for s, what, sec in self.rows]
        return "\n".join(lines)


def build(opts: BuildOptions, log: Callable[[str], None] = lambda s: None) -> BuildSummary:
    out = output_path(opts.out)
    work = out.with_name(out.name + ".work")
    inputs = {"model": opts.model, "corpus": opts.corpus, "reference prompts": opts.reference,
              "model config": opts.runtime.model_config, "control images": opts.control_images}
    for o in (out, work):
        check_apart(o, **inputs)
    corpus = read_corpus(opts.corpus, allow_outside_images=opts.allow_outside_images)
    held = out.resolve()
    for prompt in corpus.prompts:
        # --force replaces `out` whole: it must not hold the training images verification reads.
        if prompt.image is not None and held in prompt.image.parents:
            raise NemoError(f"{out}: output must not hold the corpus's training images ({prompt.image})")
    if out.exists() and not opts.force:
        raise NemoError(f"{out}: output folder exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise NemoError(f"{out}: exists and is not a folder")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NemoError(f"{work}: cannot create the work folder ({e.strerror})") from None
    if not os.access(work, os.W_OK) or not os.access(work.parent, os.W_OK):
        raise NemoError(f"{work.parent}: output location is not writable")
    clean_stale_tmp(work)
    clean_stale_tmp(out.parent)
    if opts.restart:
        # Start over: every journal of the earlier run goes. Some key on the model's fingerprint,
        # which a model differing only outside the value layers shares; the cache (calibration,
        # ONNX exports: outside DIR.work) keys on every weight and stays.
        for entry in work.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    rows: list[tuple[str, str, str]] = []
    t = time.perf_counter()

    def stage(name: str, what: str) -> None:
        nonlocal t
        now = time.perf_counter()
        rows.append((name, what, f"{now - t:.1f}s"))
        log(f"== {name}: {what} ({now - t:.1f} s)")
        t = now

    if opts.onnx and Path(opts.model).is_file():
        raise NemoError(f"{opts.model}: --onnx needs a diffusers folder input (export the single file's bundle "
                        f"with 'nemo-surgery export' after converting it)")
    log(f"== corpus: {len(corpus.prompts)} prompts from {opts.corpus}"
        + (f" ({len(corpus.duplicates)} duplicates skipped)" if corpus.duplicates else ""))
    from .surgery.apply import check_checkpoint

    check_checkpoint(opts.model)
    model = open_model(opts.model, opts.runtime)
    log(f"== model: {opts.model} ({len(model.value_layers)} value layers, fingerprint {model.fingerprint[:12]})")
    # The cache every command shares, so that a second build of the same model and reference
    # (another corpus, other merge settings) reuses the calibration and the search graph.
    cache = opts.cache_dir or default_cache_dir()
    engine = make_engine(model, opts.reference, opts.runtime, opts.score, opts.search, cache,
                         opts.calibration_prompts, log, opts.theta_mem)
    stage("calibrate", f"theta_mem {engine.calibration.theta_mem:.4f} from {engine.calibration.n_reference} prompts")

    results_path = work / "results.jsonl"
    worker = (ray_stream(engine, opts.model, opts.ray, log, opts.runtime.model_config, cache)
              if opts.ray else None)
    records = run_corpus(engine, corpus, results_path, restart=opts.restart, log=log, worker=worker)
    mem = [r for r in records if r["memorized"]]
    detection = detection_summary(records, engine.calibration.reference_scores, engine.calibration.theta_mem)
    stage("localize", f"{detection_text(detection)}; {sum(r.get('mitigated', False) for r in mem)} mitigated by "
          f"their own set")
    note = unmet_criterion_note(records, engine.search.criterion)
    if note:
        log(note)

    def pruning():
        # On Ray the pruning's passes run on actors too, started only if a plan is not kept already
        # and stopped when it is made, so that they hold no model while verification samples.
        return ray_pruning(engine, opts.model, opts.ray, log, opts.runtime.model_config, cache)

    with pruning() as shard:
        plan = cached_plan(work / "plan.json", "results_digest", records_digest(records), opts.merge,
                           lambda: make_plan(engine, corpus, records, opts.merge, log, journal=work / "prune.json",
                                             localized_on=results_libraries(results_path), shard=shard))
    ch = plan.check
    stage("merge", f"{ch['union_neurons']} neurons in the union -> {plan.n_neurons} in the plan; "
          f"mitigates {ch['mitigated_share']:.0%} of memorized prompts")

    from .export.bundle import write_sha256sums
    from .surgery.apply import apply_plan
    from .surgery.harden import Evaluation, harden
    from .surgery.verify import check_weights, is_releasable

    mem_ids = {str(r["id"]) for r in mem}
    mem_prompts = [p for p in corpus.prompts if p.id in mem_ids]
    ref_prompts = [p.text for p in read_corpus(opts.reference).prompts]

    with atomic_dir(out) as staged:
        def evaluate(plan: Plan, round_: int) -> Evaluation:
            return _evaluate(opts, engine, corpus, plan, mem_prompts, ref_prompts, staged, work, round_, stage, log)

        ev = evaluate(plan, 0)
        hardening = None
        if opts.harden is not None and ev.audit:
            def evaluate_round(plan: Plan, round_: int) -> Evaluation:
                stage(f"harden (round {round_})", f"adversarial embeddings localized and merged: {plan.n_neurons} "
                      f"neurons in the plan")
                return evaluate(plan, round_)

            ev, hardening = harden(engine, corpus, records, ev, evaluate_round, opts.merge, opts.harden, work,
                                   opts.restart, log, pruning)
            if hardening["kept_round"] != hardening["rounds"][-1]["round"]:
                # A later round was evaluated but not kept: the staged model is its; write the kept plan again.
                out_model = bundle_model(opts.model, staged)
                apply_plan(ev.plan, opts.model, out_model, force=True)
                weights = check_weights(opts.model, out_model, ev.plan)
                ev.verify["weights"] = weights.to_dict()
                ev.verify["conditions"]["weights"] = {"met": weights.ok}
                ev.verify["releasable"] = is_releasable(ev.verify["conditions"])
            write_json_atomic(staged / "harden.json", hardening)
            stage("harden", f"kept round {hardening['kept_round']} ({ev.plan.n_neurons} neurons); "
                  f"{hardening['stopped']}")
        elif opts.harden is not None:
            log("== harden: skipped (needs the audit and memorized prompts)")
        plan, verify, audit = ev.plan, ev.verify, ev.audit
        verify["detection"] = detection
        releasable = verify["releasable"]
        if audit is not None:
            write_json_atomic(staged / "audit.json", audit)

        if opts.onnx:
            from .export.onnx import export_unet

            rep = export_unet(staged / "model", staged / "onnx")
            verify["onnx"] = asdict(rep) | {"path": str(Path(rep.path).relative_to(staged))}
            stage("onnx", f"UNet exported, max abs diff vs torch {rep.max_abs_diff:.2e}")
        write_json_atomic(staged / "verify.json", verify)
        plan.save(staged / "plan.json")
        shutil.copyfile(results_path, staged / "results.jsonl")
        _write_docs(staged, opts, model, plan, records, verify, ev.extra["grid"], audit, ev.extra["examples"],
                    hardening)
        write_sha256sums(staged)
        stage("export", "bundle with model card, report and SHA256SUMS")
    shutil.rmtree(work, ignore_errors=True)
    return BuildSummary(out, releasable, rows)


def _evaluate(opts: BuildOptions, engine, corpus, plan: Plan, mem_prompts: list, ref_prompts: list[str],
              staged: Path, work: Path, round_: int, stage: Callable[[str, str], None],
              log: Callable[[str], None]):
    """Apply `plan` into the staged bundle, verify it and audit it (round 0: the merged plan; later
    rounds: hardening's plans)."""
    from .surgery.apply import apply_plan
    from .surgery.harden import Evaluation
    from .export.records import by_type_text, preservation_text, sampling_text
    from .surgery.verify import (check_equivalence, check_weights, generation_measures, release_conditions,
                                 is_releasable, rescore)

    tag = f" (round {round_})" if round_ else ""
    suffix = f"-r{round_}" if round_ else ""
    model = engine.model
    out_model = bundle_model(opts.model, staged)
    result = apply_plan(plan, opts.model, out_model, force=True)
    stage("apply" + tag, f"{plan.n_neurons} rows zeroed in {len(result.files)} file(s)")

    weights = check_weights(opts.model, out_model, plan)
    cleaned = load_model(out_model, device=str(model.device), dtype=model.unet.dtype, config=opts.runtime.model_config)
    ref_sample = evenly_spaced(ref_prompts, opts.verify_reference_prompts)
    equiv = check_equivalence(engine, cleaned, as_neurons(plan), [p.text for p in mem_prompts[:2]] or ref_sample[:1])
    mem_v, ref_v = rescore(engine, cleaned, [p.text for p in mem_prompts], ref_sample, log)
    # The audit reuses the unperturbed generations of the prompts it attacks, when it samples as
    # verification does; only those are kept.
    reuse = opts.audit is not None and opts.audit.generation == opts.sampling
    keep = {p.id for p in audited(mem_prompts, opts.audit)} if reuse else set()
    gen, grid, samples = generation_measures(model, cleaned, mem_prompts, opts.sampling, as_neurons(plan),
                                             reference=evenly_spaced(ref_prompts, opts.verify_reference_images),
                                             keep=keep, log=log, journal=work / f"verify{suffix}.jsonl",
                                             # hardening's rounds all measure against the same original
                                             originals=work / "originals" if opts.harden is not None else None)
    kept = gen.pop("preservation", None)
    conditions = release_conditions(weights.ok, equiv["exact"], mem_v, gen, kept, opts.min_mitigated,
                                    opts.min_preserved)
    verify = {"releasable": is_releasable(conditions), "conditions": conditions, "min_mitigated": opts.min_mitigated,
              "min_preserved": opts.min_preserved, "weights": weights.to_dict(),
              "equivalence": equiv, "memorized": mem_v, "reference": ref_v, "generation": gen["rows"],
              "generation_summary": {k: v for k, v in gen.items() if k != "rows"},
              **({"preservation": kept} if kept else {}),
              "seeds": list(range(opts.score.seed_base, opts.score.seed_base + opts.score.seeds)),
              "model_fingerprint": model.fingerprint, "cleaned_fingerprint": cleaned.fingerprint,
              "tool": tool_record()}
    stage("verify" + tag, f"weights {'ok' if weights.ok else 'FAILED'}, masked==zeroed "
          f"{'exact' if equiv['exact'] else 'max diff ' + format(equiv['max_abs_diff'], '.2e')}, "
          f"{mem_v['mitigated']}/{mem_v['prompts']} memorized prompts mitigated"
          + (f" (AUROC against the reference prompts {mem_v['auroc_before']:.3f} -> {mem_v['auroc_after']:.3f})"
             if "auroc_after" in mem_v else "")
          + f", {ref_v['changed']}/{ref_v['prompts']} reference prompts changed beyond seed noise; "
          f"{sampling_text(gen, by_type=False)}"
          + (f", {gen['random_control']['reproduced']} with as many random neurons" if "random_control" in gen else "")
          + (f", near-copies {gen['copies']['before']} -> {gen['copies']['after']}" if "copies" in gen else "")
          + (f"; by prompt type: {by_type_text(gen)}" if by_type_text(gen) else "")
          + (f"; {preservation_text(kept)}" if kept else ""))

    audit, examples = None, []
    adversarial = work / f"adversarial{suffix}"
    if opts.audit is not None and mem_prompts:
        from .localize.score import Scorer
        from .surgery.audit import run_audit

        clean_scorer = Scorer(cleaned, engine.scorer.settings, engine.scorer.batch_size,
                              engine.scorer.autocast_dtype)
        try:
            audit, examples = run_audit(
                model, cleaned, mem_prompts, ref_prompts, engine.calibration.reference_scores,
                opts.calibration_prompts, work / f"audit{suffix}.jsonl", opts.audit,
                theta_mem=engine.calibration.theta_mem, scorers={"original": engine.scorer, "cleaned": clean_scorer},
                control_images=opts.control_images, restart=opts.restart,
                known=samples if reuse else None,
                corpus_sha256=corpus.sha256, adversarial=adversarial if opts.harden else None,
                pictures=work / f"audit{suffix}.examples",
                originals=work / "audit-original" if opts.harden is not None else None, log=log)
        finally:
            clean_scorer.close()
        top = str(opts.audit.budgets[-1])
        stage("audit" + tag, f"re-triggered at budget {top}: cleaned {pct(audit['rate'][top])}, original "
              f"{pct(audit['original_rate'][top])}, random {pct(audit['random_rate'][top])}, "
              f"never-trained {pct(audit['never_trained_rate'][top])}")
    elif opts.audit is None and round_ == 0:
        log("== audit: skipped (--no-audit); the model card says so")
    return Evaluation(plan, verify, audit, adversarial, {"grid": grid, "examples": examples})


def bundle_model(model: Path, bundle: Path) -> Path:
    """Where the cleaned model goes in a bundle: `model/` for a diffusers folder, `model.safetensors`
    for a single-file checkpoint (the input's own format, key names and metadata)."""
    return bundle / ("model.safetensors" if Path(model).is_file() else "model")


def _write_docs(staged: Path, opts: BuildOptions, model, plan: Plan, records: list[dict], verify: dict,
                grid: list, audit: dict | None, examples: list, hardening: dict | None = None) -> None:
    from .export.card import write_model_card
    from .export.records import ReleaseInfo
    from .export.report import write_report

    info = ReleaseInfo(model_name=Path(opts.model).name, base_model=opts.base_model, license=opts.license,
                       tool_version=__version__, model_fingerprint=model.fingerprint, plan=plan.to_dict(),
                       plan_sha256=plan.sha256(), results=records, verify=verify,
                       include_prompts=opts.card_include_prompts, audit=audit, images=grid,
                       audit_images=examples, hardening=hardening)
    write_model_card(staged / "README.md", info)
    write_report(staged / "report.html", info)


def summary_json(s: BuildSummary) -> str:
    return json.dumps({"out": str(s.out), "releasable": s.releasable, "stages": s.rows}, indent=2)
