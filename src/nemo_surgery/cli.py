"""The `nemo-surgery` command: a thin layer over the library. Every command maps to functions a
notebook can call with the same records; this file only parses flags, prints progress and turns
a `NemoError` into one line and a non-zero exit."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import NemoError
from .files import check_apart, output_path
from .provenance import tool_record


def log(msg: str) -> None:
    click.echo(msg, err=True)


def _quiet_libraries() -> None:
    # diffusers/transformers chatter (progress bars, optional-dependency notes) is not ours to show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        log(f"warning: {message}")

    warnings.showwarning = show
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def runtime_options(f: Callable) -> Callable:
    """Where and how the model runs; the command receives them as one `runtime` (engine.Runtime)."""
    opts = [
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
                     show_default=True, help="Compute precision of the search (the paper ran fp16 on GPU). "
                                             "Surgery is always exact in the checkpoint's dtype."),
        click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True,
                     help="UNet samples per pass."),
        click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto",
                     show_default=True,
                     help="What runs the search's UNet passes. auto: onnxruntime on a CPU in fp32 (the UNet is "
                          "exported once per model into the cache), torch otherwise."),
        click.option("--allow-pickle", is_flag=True, help="Allow .bin/.ckpt pickle weights (they can run code)."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, device: str, precision: str, batch_size: int, backend: str, allow_pickle: bool,
                **kwargs: Any) -> Any:
        from .engine import Runtime

        return f(*args, runtime=Runtime(device, precision, batch_size, allow_pickle, backend=backend), **kwargs)

    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


def _reference(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path:
    if value is not None:
        return value
    from .corpus import bundled_reference

    log("reference: none given; calibrating on the 500 generic captions bundled with nemo-surgery "
        "(--reference with never-memorized prompts of the model's own training data calibrates more tightly)")
    return bundled_reference()


def score_options(f: Callable) -> Callable:
    opts = [
        click.option("--reference", type=click.Path(path_type=Path), default=None, callback=_reference,
                     help="Non-memorized reference prompts (CSV/TSV/TXT/JSONL) for calibration. Default: 500 "
                          "generic captions bundled with the tool; never-memorized prompts of the model's own "
                          "training data calibrate more tightly."),
        click.option("--seeds", type=click.IntRange(2), default=10, show_default=True,
                     help="Initial latents per prompt (paper: 10)."),
        click.option("--timestep-index", type=click.IntRange(0), default=0, show_default=True,
                     help="Which step of the 50-step DDIM schedule the noise difference is taken at "
                          "(paper: first; the official code: 1)."),
        click.option("--calibration-prompts", type=click.IntRange(2), default=256, show_default=True,
                     help="Reference prompts scored with the UNet to set theta_mem."),
        click.option("--theta-mem", type=float, default=None,
                     help="Memorization threshold to use instead of the calibrated one (mean + 1 std of the "
                          "reference prompts' scores; the paper's was 0.428 for SD v1.4). Recorded as given."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Calibration cache (default: $NEMO_SURGERY_CACHE or ~/.cache/nemo-surgery)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def search_options(f: Callable) -> Callable:
    opts = [
        click.option("--layers", default="official", show_default=True,
                     help="'official' (the paper's 7 down/mid layers on SD 1.x), 'all', or comma-separated globs."),
        click.option("--theta-act", type=float, default=5.0, show_default=True, help="Initial z-score threshold."),
        click.option("--theta-act-step", type=float, default=0.25, show_default=True),
        click.option("--theta-act-min", type=float, default=1.0, show_default=True),
        click.option("--top-k-start", type=click.IntRange(0), default=0, show_default=True,
                     help="Top-k neurons per layer added at the first step of the initial selection."),
        click.option("--top-k-step", type=click.IntRange(0), default=1, show_default=True),
        click.option("--criterion", type=click.Choice(["published", "consistency"]), default="published",
                     show_default=True,
                     help="When a neuron set counts as mitigating: 'published' compares each memorized seed's "
                          "noise difference with and without the set (NEMO.md); 'consistency' requires the "
                          "prompt's memorization score with the set blocked to fall below theta_mem."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, layers: str, theta_act: float, theta_act_step: float, theta_act_min: float,
                top_k_start: int, top_k_step: int, criterion: str, **kwargs: Any) -> Any:
        from .localize.settings import SearchSettings

        return f(*args, search=SearchSettings(theta_act, theta_act_step, theta_act_min, top_k_start, top_k_step,
                                              layers, criterion), **kwargs)

    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


def ray_options(f: Callable) -> Callable:
    opts = [
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                     help="Shard the corpus (localization's prompts, the pruning's checks) over Ray actors: "
                          "--ray alone starts a local cluster, --ray ADDRESS joins one (needs nemo-surgery[ray])."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Ray actors (default: one per GPU, else 2 CPU actors)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def release_gate_options(f: Callable) -> Callable:
    """The shares a releasable bundle needs: `build` decides by them, `curve` picks sizes by them."""
    opts = [
        click.option("--min-mitigated", type=click.FloatRange(0, 1), default=0.95, show_default=True,
                     help="Share of memorized prompts that must be mitigated (by the score and, where training "
                          "images are known, by full sampling) for a releasable bundle."),
        click.option("--min-preserved", type=click.FloatRange(0, 1), default=0.95, show_default=True,
                     help="Share of the sampled reference prompts' images (prompt, seed) that must still be nearest "
                          "to their own prompt's original image, among the reference prompts' for the same seed, "
                          "for a releasable bundle."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _ray_settings(ray_address, workers):
    """--ray alone means a local cluster; --ray ADDRESS joins one; no --ray, no Ray."""
    if not ray_address:
        return None
    from .localize.distributed import RaySettings

    return RaySettings(None if ray_address == "local" else ray_address, workers)


def _ray_worker(eng, model, ray_address, workers, cache_dir):
    settings = _ray_settings(ray_address, workers)
    if settings is None:
        return None
    from .localize.distributed import ray_stream

    return ray_stream(eng, model, settings, log, cache_dir=cache_dir)


allow_outside = click.option("--allow-outside-images", is_flag=True,
                             help="Accept corpus training-image paths outside the corpus file's folder.")


def _comma_separated(value: str, parse: Callable[[str], Any], expected: str) -> tuple:
    try:
        return tuple(parse(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected {expected}") from None


def _budgets(ctx, param, value: str) -> tuple[float, ...]:  # noqa: ARG001
    out = _comma_separated(value, float, "comma-separated numbers such as 0.05,0.1,0.2")
    if not out or any(not 0 < b <= 10 for b in out):
        raise click.BadParameter(f"{value!r}: budgets must be positive fractions of the embedding norm")
    return out


def audit_options(f: Callable) -> Callable:
    opts = [
        click.option("--audit-budgets", default="0.05,0.1,0.2", show_default=True, callback=_budgets,
                     help="Perturbation budgets, as fractions of the prompt embedding's L2 norm."),
        click.option("--audit-steps", type=click.IntRange(1), default=30, show_default=True,
                     help="Gradient steps per attack."),
        click.option("--audit-prompts", type=click.IntRange(1), default=32, show_default=True,
                     help="Audit at most this many memorized prompts (evenly spaced)."),
        click.option("--audit-controls", type=click.IntRange(0), default=4, show_default=True,
                     help="Never-trained targets attacked as a control."),
        click.option("--audit-seeds", type=click.IntRange(1), default=4, show_default=True,
                     help="Generation seeds per decision."),
        click.option("--audit-seed", type=int, default=0, show_default=True, help="Seed of the attacks."),
        click.option("--sample-steps", type=click.IntRange(1), default=50, show_default=True,
                     help="DDIM steps when sampling images (guidance 7.5), in verification and the audit."),
        click.option("--control-images", type=click.Path(path_type=Path, exists=True, file_okay=False),
                     default=None, help="Folder of never-trained images for the control (default: what the "
                                        "original draws for the least memorized reference prompts)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _audit_settings(audit_budgets, audit_steps, audit_prompts, audit_controls, audit_seeds, audit_seed,
                    sample_steps):
    from .generation import GenSettings
    from .surgery.audit import AuditSettings

    return AuditSettings(budgets=audit_budgets, steps=audit_steps, seed=audit_seed, controls=audit_controls,
                         max_prompts=audit_prompts,
                         generation=GenSettings(steps=sample_steps, seeds=tuple(range(audit_seeds))))


def corpus_run_options(f: Callable) -> Callable:
    """What `localize` and `build` share: corpus images, Ray, scoring, search and runtime flags."""
    return allow_outside(ray_options(score_options(search_options(runtime_options(f)))))


def handle_errors(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except NemoError as e:
            raise click.exceptions.Exit(_fail(str(e), e.exit_code)) from None
        except KeyboardInterrupt:
            log("interrupted: nothing half-written was kept; run the same command again to resume")
            raise click.exceptions.Exit(130) from None
        except OSError as e:  # the file system said no (read-only, full disk, permissions): not a bug
            where = e.filename or "file system"
            raise click.exceptions.Exit(_fail(f"{where}: cannot write or read ({e.strerror or e})", 2)) from None
    return wrapper


def _fail(msg: str, code: int) -> int:
    log(f"error: {msg.splitlines()[0] if msg else 'failed'}")
    return code


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nemo-surgery")
def cli() -> None:
    """Find the neurons that make a Stable Diffusion model reproduce memorized training images
    (NeMo), zero them in the checkpoint, and export a verified release.

    Typical use: nemo-surgery build --model M --corpus mem.csv --out DIR [--reference ref.csv]
    """
    _quiet_libraries()


def _engine(model, reference, runtime, seeds, timestep_index, calibration_prompts, cache_dir, theta_mem=None,
            search=None):
    from .engine import make_engine, open_model
    from .localize.settings import ScoreSettings, SearchSettings

    m = open_model(model, runtime)
    log(f"model: {model} ({len(m.value_layers)} value layers, fingerprint {m.fingerprint[:12]})")
    score = ScoreSettings(seeds=seeds, timestep_index=timestep_index)
    search = search or SearchSettings()
    return make_engine(m, reference, runtime, score, search, cache_dir, calibration_prompts, log, theta_mem)


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Diffusers model folder.")
@score_options
@runtime_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write calibration.json here.")
@handle_errors
def calibrate(model, reference, seeds, timestep_index, calibration_prompts, cache_dir, theta_mem, runtime, out):
    """Per-neuron activation statistics and theta_mem from non-memorized reference prompts."""
    if out:
        check_apart(out, model=model, reference_prompts=reference)
    eng = _engine(model, reference, runtime, seeds, timestep_index,
                  calibration_prompts, cache_dir, theta_mem)
    if out:
        eng.calibration.save(out)
    click.echo(json.dumps(eng.calibration.summary(), indent=2))


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Diffusers model folder.")
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="Prompts to test.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("detections.jsonl"), show_default=True,
              help="Detections to write (resumed when rerun).")
@click.option("--restart", is_flag=True, help="Discard earlier results in --out.")
@allow_outside
@score_options
@runtime_options
@handle_errors
def detect(model, corpus, out, restart, allow_outside_images, reference, seeds, timestep_index, calibration_prompts, cache_dir,
           theta_mem, runtime):
    """Memorization score of every prompt (seed consistency of the first denoising step)."""
    from .corpus import read_corpus
    from .localize.detect import detection_summary, detection_text
    from .localize.runner import run_corpus

    check_apart(out, model=model, corpus=corpus, reference_prompts=reference)
    c = read_corpus(corpus, allow_outside_images=allow_outside_images)
    eng = _engine(model, reference, runtime, seeds, timestep_index,
                  calibration_prompts, cache_dir, theta_mem)
    recs = run_corpus(eng, c, out, localize=False, restart=restart, log=log)
    log(f"done: {detection_text(detection_summary(recs, eng.calibration.reference_scores, eng.calibration.theta_mem))}"
        f"; {out}")


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Diffusers model folder.")
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="Memorized prompts.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results.jsonl"), show_default=True,
              help="Per-prompt results to write (resumed when rerun).")
@click.option("--restart", is_flag=True, help="Discard earlier results in --out.")
@corpus_run_options
@handle_errors
def localize(model, corpus, out, restart, allow_outside_images, ray_address, workers, reference, seeds,
             timestep_index, calibration_prompts, cache_dir, theta_mem, search, runtime):
    """Per-prompt NeMo search: initial selection and refinement; one JSONL record per prompt."""
    from .corpus import read_corpus
    from .localize.runner import run_corpus

    check_apart(out, model=model, corpus=corpus, reference_prompts=reference)
    c = read_corpus(corpus, allow_outside_images=allow_outside_images)
    eng = _engine(model, reference, runtime, seeds, timestep_index, calibration_prompts, cache_dir, theta_mem,
                  search)
    recs = run_corpus(eng, c, out, localize=True, restart=restart, log=log,
                      worker=_ray_worker(eng, model, ray_address, workers, cache_dir))
    summarize_localization(recs, eng)


def summarize_localization(recs: list[dict], eng) -> None:
    from .localize.detect import detection_summary, detection_text
    from .localize.runner import unmet_criterion_note

    mem = [r for r in recs if r["memorized"]]
    mit = sum(r.get("mitigated", False) for r in mem)
    sizes = sorted(r.get("refined_neurons", 0) for r in mem)
    med = sizes[len(sizes) // 2] if sizes else 0
    secs = sum(r["seconds"] for r in recs)
    detection = detection_summary(recs, eng.calibration.reference_scores, eng.calibration.theta_mem)
    log(f"done: {detection_text(detection)}; {mit} mitigated by their own set; "
        f"neurons per prompt median {med} (min {sizes[0] if sizes else 0}, max {sizes[-1] if sizes else 0}); "
        f"{secs:.1f} s")
    note = unmet_criterion_note(recs, eng.search.criterion)
    if note:
        log(note)


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Diffusers model folder.")
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="The corpus localized.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results.jsonl"), show_default=True,
              help="What localize wrote.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("plan.json"), show_default=True,
              help="The plan to write.")
@click.option("--min-prompts", type=click.IntRange(1), default=1, show_default=True,
              help="Keep neurons needed by at least N prompts.")
@click.option("--max-neurons", type=click.IntRange(1), default=None, help="Keep the K most needed neurons.")
@click.option("--prune/--no-prune", default=True, show_default=True,
              help="Corpus-level pruning of the union.")
@allow_outside
@ray_options
@score_options
@search_options
@runtime_options
@handle_errors
def merge(model, corpus, results, out, min_prompts, max_neurons, prune, allow_outside_images, ray_address, workers,
          reference, seeds, timestep_index, calibration_prompts, cache_dir, theta_mem, search, runtime):
    """Merge per-prompt sets into one plan.json, check it and prune it over the corpus."""
    from .corpus import read_corpus
    from .localize.distributed import ray_pruning
    from .localize.merge import MergeSettings, make_plan
    from .localize.runner import make_header, open_results, results_libraries

    out = output_path(out)
    journal = out.with_name(out.name + ".prune.json")
    for o in (out, journal):
        check_apart(o, model=model, corpus=corpus, results=results, reference_prompts=reference)
    c = read_corpus(corpus, allow_outside_images=allow_outside_images)
    if not Path(results).is_file():  # before calibrating, which can take minutes
        raise NemoError(f"{results}: results file not found (run 'nemo-surgery localize' first)")
    eng = _engine(model, reference, runtime, seeds, timestep_index, calibration_prompts, cache_dir, theta_mem,
                  search)
    done = open_results(results, make_header(eng.config(c, "localize")), restart=False)
    recs = [done[p.id] for p in c.prompts if p.id in done]
    if len(recs) < len(c.prompts):
        raise NemoError(f"{results}: only {len(recs)} of {len(c.prompts)} prompts localized; "
                        f"run 'nemo-surgery localize' again to finish")
    # An interrupted pruning resumes from its journal beside the plan.
    with ray_pruning(eng, model, _ray_settings(ray_address, workers), log, cache_dir=cache_dir) as shard:
        plan = make_plan(eng, c, recs, MergeSettings(min_prompts, max_neurons, prune), log,
                         journal=journal, localized_on=results_libraries(results), shard=shard)
    plan.save(out)
    ch = plan.check
    log(f"plan: {ch['union_neurons']} neurons in the union (mitigates {ch['union_mitigated_share']:.0%}), "
        f"{ch['neurons']} after pruning (mitigates {ch['mitigated_share']:.0%} of "
        f"{ch['memorized_prompts']} memorized prompts); {out}")


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Diffusers folder or single-file .safetensors checkpoint.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="plan.json.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Cleaned folder or file to write.")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "single-file"]), default=None,
              help="Output layout (default: same as the input).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@handle_errors
def apply(model, plan_path, out, fmt, force):
    """Zero the plan's rows of each to_v weight, streaming; every other byte unchanged."""
    from .plan import Plan
    from .surgery.apply import apply_plan

    plan = Plan.load(plan_path)
    res = apply_plan(plan, model, out, fmt={"single-file": "single"}.get(fmt, fmt), force=force)
    log(f"done: {sum(len(v) for v in res.zeroed.values())} rows zeroed in {len(res.zeroed)} layers, "
        f"{len(res.files)} weight file(s) rewritten, {res.seconds:.2f} s; {res.out}")


@cli.command()
@click.option("--original", type=click.Path(path_type=Path), required=True, help="The input checkpoint.")
@click.option("--cleaned", type=click.Path(path_type=Path), required=True, help="What apply wrote.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="plan.json.")
@handle_errors
def verify(original, cleaned, plan_path):
    """Reload what was written: planned rows zero, every other tensor and file unchanged."""
    from .plan import Plan
    from .surgery.verify import check_weights

    chk = check_weights(original, cleaned, Plan.load(plan_path))
    click.echo(json.dumps(chk.to_dict(), indent=2))
    if not chk.ok:
        raise NemoError(f"{cleaned}: verification failed ({chk.problems[0]})")
    log(f"verified: {chk.tensors_checked} tensors, {chk.rows_zeroed} rows zero, {chk.files_identical} files identical")


def _sizes(ctx, param, value: str) -> tuple[int, ...]:  # noqa: ARG001
    out = _comma_separated(value, int, "whole numbers separated by commas, e.g. 50,100,200")
    if not out or any(k < 0 for k in out):
        raise click.BadParameter(f"{value!r}: expected at least one size, none negative")
    return out


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="The input model folder.")
@click.option("--corpus", type=click.Path(path_type=Path), required=True,
              help="Memorized prompts; those with a training image are sampled.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="plan.json of merge/build.")
@click.option("--sizes", callback=_sizes, default="25,50,100,200", show_default=True,
              help="Numbers of the plan's most needed neurons to zero, comma-separated (the plan's own size is "
                   "always added).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Non-memorized prompts whose images are compared with the original's (default: the generic "
                   "captions bundled with the tool).")
@click.option("--reference-images", type=click.IntRange(0), default=16, show_default=True,
              help="How many of them to sample (evenly spaced).")
@click.option("--sample-steps", type=click.IntRange(1), default=50, show_default=True,
              help="DDIM steps when sampling (guidance 7.5).")
@click.option("--sample-seeds", type=click.IntRange(1), default=4, show_default=True)
@release_gate_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("curve.json"), show_default=True)
@allow_outside
@runtime_options
@handle_errors
def curve(model, corpus, plan_path, sizes, reference, reference_images, sample_steps, sample_seeds, min_mitigated,
          min_preserved, out, allow_outside_images, runtime):
    """What smaller plans would remove and cost: the plan's K most needed neurons zeroed for each K, against as
    many random neurons (reproductions of training images, and reference prompts' images against the
    original's). Pick `merge/build --max-neurons K` from it."""
    from .corpus import bundled_reference, evenly_spaced, read_corpus
    from .engine import open_model
    from .files import write_json_atomic
    from .generation import GenSettings
    from .plan import Plan
    from .surgery.verify import curve_choice, curve_choice_text, removal_curve

    check_apart(out, model=model, corpus=corpus, plan=plan_path, reference_prompts=reference)
    plan = Plan.load(plan_path)
    c = read_corpus(corpus, allow_outside_images=allow_outside_images)
    if not any(p.image is not None for p in c.prompts):
        raise NemoError(f"{corpus}: no prompt names a training image, so there are no reproductions to count")
    ref_corpus = read_corpus(reference or bundled_reference())
    original, copy = open_model(model, runtime), open_model(model, runtime)
    plan.check_against(original.shapes, str(plan_path), original.fingerprint)
    settings = GenSettings(steps=sample_steps, seeds=tuple(range(sample_seeds)))
    # Each size's sampling is kept here as it goes, so that rerunning the command resumes it.
    work = out.with_name(out.name + ".work")
    result = removal_curve(original, copy, plan, [*sizes, plan.n_neurons], c.prompts,
                           [p.text for p in evenly_spaced(list(ref_corpus.prompts), reference_images)], settings,
                           log=log, work=work)
    result["choice"] = curve_choice(result["sizes"], min_mitigated, min_preserved)
    log(curve_choice_text(result["choice"], result["sizes"]))
    result |= {"plan_sha256": plan.sha256(), "corpus_sha256": c.sha256, "reference_sha256": ref_corpus.sha256,
               "model_fingerprint": original.fingerprint,
               "tool": tool_record()}
    write_json_atomic(out, result)
    shutil.rmtree(work, ignore_errors=True)
    log(f"written: {out}")


@cli.command("export")
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Cleaned diffusers folder.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the ONNX files.")
@click.option("--text-encoder/--no-text-encoder", default=False, help="Also export the text encoder.")
@click.option("--vae-decoder/--no-vae-decoder", default=False, help="Also export the VAE decoder.")
@handle_errors
def export_cmd(model, fmt, out, text_encoder, vae_decoder):
    """Export the cleaned UNet to ONNX and check it against torch with onnxruntime."""
    from dataclasses import asdict

    from .export.onnx import export_text_encoder, export_unet, export_vae_decoder

    reps = [export_unet(model, out)]
    if text_encoder:
        reps.append(export_text_encoder(model, out))
    if vae_decoder:
        reps.append(export_vae_decoder(model, out))
    for r in reps:
        log(f"exported {r.path} ({r.bytes / 1e6:.1f} MB), onnxruntime vs torch max abs diff {r.max_abs_diff:.2e}")
    click.echo(json.dumps([asdict(r) for r in reps], indent=2, default=str))


@cli.command()
@click.option("--original", type=click.Path(path_type=Path), required=True, help="The input model folder.")
@click.option("--cleaned", type=click.Path(path_type=Path), required=True, help="The cleaned model folder.")
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="Memorized prompts.")
@click.option("--results", type=click.Path(path_type=Path), default=None,
              help="results.jsonl of localize/build: which prompts are memorized (default: detect them).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("audit.json"), show_default=True,
              help="audit.json to write; per-target progress goes to OUT.partial.jsonl and is resumed.")
@click.option("--restart", is_flag=True, help="Discard earlier per-target results.")
@audit_options
@allow_outside
@score_options
@runtime_options
@handle_errors
def audit(original, cleaned, corpus, results, out, restart, audit_budgets, audit_steps, audit_prompts,
          audit_controls, audit_seeds, audit_seed, sample_steps, control_images, allow_outside_images, reference, seeds,
          timestep_index, calibration_prompts, cache_dir, theta_mem, runtime):
    """Attack the cleaned model: can perturbed prompt embeddings re-trigger memorized images?"""
    from .corpus import read_corpus
    from .engine import open_model
    from .files import read_jsonl, write_json_atomic
    from .localize.runner import describe, process_prompt
    from .localize.score import Scorer
    from .surgery.audit import run_audit, summary_text

    settings = _audit_settings(audit_budgets, audit_steps, audit_prompts, audit_controls, audit_seeds, audit_seed,
                               sample_steps)
    partial = Path(str(out) + ".partial.jsonl")
    for o in (out, partial):
        check_apart(o, original=original, cleaned=cleaned, corpus=corpus, results=results,
                    reference_prompts=reference, control_images=control_images)
    c = read_corpus(corpus, allow_outside_images=allow_outside_images)
    if results is not None and not Path(results).is_file():  # before calibrating, as merge does
        raise NemoError(f"{results}: no such results file")
    eng = _engine(original, reference, runtime, seeds, timestep_index,
                  calibration_prompts, cache_dir, theta_mem)
    if results is not None:
        ids = {str(r["id"]) for r in read_jsonl(Path(results)) if r.get("kind") == "prompt" and r.get("memorized")}
    else:
        ids = set()
        for i, p in enumerate(c.prompts, 1):
            rec = process_prompt(eng, p, localize=False)
            log(describe(rec, i, len(c.prompts)))
            if rec["memorized"]:
                ids.add(p.id)
    mem = [p for p in c.prompts if p.id in ids]
    if not mem:
        raise NemoError(f"{corpus}: no memorized prompts to audit")
    clean = open_model(cleaned, runtime)
    ref = read_corpus(reference).prompts
    scorers = {"original": eng.scorer, "cleaned": Scorer(clean, eng.scorer.settings, runtime.batch_size,
                                                        eng.scorer.autocast_dtype)}
    result, _ = run_audit(eng.model, clean, mem, [p.text for p in ref], eng.calibration.reference_scores,
                          calibration_prompts, partial, settings, theta_mem=eng.calibration.theta_mem,
                          scorers=scorers, control_images=control_images, restart=restart,
                          corpus_sha256=c.sha256, log=log)
    write_json_atomic(out, result)
    partial.unlink(missing_ok=True)
    log(summary_text(result))
    log(f"written: {out}")


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Diffusers model folder.")
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="Memorized prompts.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Release bundle folder.")
@click.option("--min-prompts", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-neurons", type=click.IntRange(1), default=None)
@click.option("--prune/--no-prune", default=True, show_default=True)
@release_gate_options
@click.option("--allow-partial", is_flag=True, help="Exit 0 even when the bundle is not releasable.")
@click.option("--onnx/--no-onnx", default=False, show_default=True, help="Also export the UNet to ONNX.")
@click.option("--card-include-prompts", is_flag=True, help="List the captions in the model card.")
@click.option("--license", "license_", default=None, help="License for the card's front matter.")
@click.option("--base-model", default=None, help="Hub id of the base model, for the card.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--restart", is_flag=True, help="Discard the earlier run's work (results, pruning, verification and audit "
                                             "journals) and start over; the cache stays.")
@click.option("--audit/--no-audit", default=True, show_default=True,
              help="Try to re-trigger the removed memorization with optimized embedding perturbations.")
@click.option("--model-config", type=click.Path(path_type=Path), default=None,
              help="For a single-file --model (.safetensors, original key names): a diffusers folder of the same "
                   "architecture that gives its configs and tokenizer. The bundle then holds model.safetensors.")
@click.option("--harden", is_flag=True,
              help="After the audit, localize the attacks that re-triggered as extra inputs, merge, re-apply and "
                   "re-audit, for up to --harden-rounds rounds.")
@click.option("--harden-rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--harden-max-drift", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Stop hardening when this share of reference prompts changes beyond seed noise.")
@click.option("--verify-reference-images", type=click.IntRange(0), default=16, show_default=True,
              help="Reference prompts sampled in full from the original and the cleaned model (same seeds) to "
                   "measure how far surgery moves images it was not aimed at; 0 skips.")
@audit_options
@corpus_run_options
@handle_errors
def build(model, corpus, out, min_prompts, max_neurons, prune, min_mitigated, min_preserved, allow_partial, onnx,
          card_include_prompts, license_, base_model, force, restart, audit, model_config, harden, harden_rounds,
          harden_max_drift, verify_reference_images, audit_budgets, audit_steps,
          audit_prompts, audit_controls, audit_seeds, audit_seed, sample_steps, control_images,
          allow_outside_images, ray_address, workers,
          reference, seeds, timestep_index,
          calibration_prompts, cache_dir, theta_mem, search, runtime):
    """Calibrate, detect, localize, merge, apply, verify and export: one resumable command."""
    from .build import BuildOptions, build as run_build
    from .generation import GenSettings
    from .localize.merge import MergeSettings
    from .localize.settings import ScoreSettings
    from .surgery.harden import HardenSettings

    if harden and not audit:
        raise NemoError("--harden needs the audit: drop --no-audit")
    opts = BuildOptions(
        model=model, corpus=corpus, reference=reference, out=out,
        runtime=dataclasses.replace(runtime, model_config=model_config),
        score=ScoreSettings(seeds=seeds, timestep_index=timestep_index),
        search=search,
        merge=MergeSettings(min_prompts, max_neurons, prune), calibration_prompts=calibration_prompts,
        theta_mem=theta_mem,
        cache_dir=cache_dir, min_mitigated=min_mitigated, min_preserved=min_preserved, allow_partial=allow_partial,
        onnx=onnx,
        card_include_prompts=card_include_prompts, license=license_, base_model=base_model, force=force,
        restart=restart, allow_outside_images=allow_outside_images,
        audit=_audit_settings(audit_budgets, audit_steps, audit_prompts, audit_controls, audit_seeds, audit_seed,
                              sample_steps) if audit else None,
        control_images=control_images, sampling=GenSettings(steps=sample_steps),
        verify_reference_images=verify_reference_images, ray=_ray_settings(ray_address, workers),
        harden=HardenSettings(harden_rounds, harden_max_drift) if harden else None)
    s = run_build(opts, log)
    log("\n" + s.table())
    if s.releasable:
        log(f"releasable bundle: {s.out}")
        return
    log(f"bundle written to {s.out} but NOT releasable (see verify.json)")
    if not allow_partial:
        raise click.exceptions.Exit(1)


def main() -> None:
    try:
        rc = cli.main(prog_name="nemo-surgery", standalone_mode=False)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # bare `nemo-surgery`: show the help
        click.echo(e.format_message())
        sys.exit(0)
    except click.UsageError as e:  # a bad flag: one line naming the command and the problem
        where = e.ctx.command_path if e.ctx else "nemo-surgery"
        sys.exit(_fail(f"{where}: {e.format_message()} (see --help)", 2))
    except click.Abort:
        sys.exit(_fail("interrupted", 130))
    except click.ClickException as e:
        sys.exit(_fail(e.format_message(), e.exit_code))
    except NemoError as e:  # raised outside a command body (e.g. while parsing)
        sys.exit(_fail(str(e), e.exit_code))
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
