"""Verification of what surgery wrote: reload it and check, from the files, that exactly the
plan's rows are zero and nothing else moved; that the cleaned UNet computes exactly what the
hook-blocked original computes; and that memorization is gone while other prompts stay put.

Weight checks stream one tensor at a time. Behavioural checks use localization's scoring (the
one dependency on an earlier stage that the design allows: verification must measure with the
same instrument that found the neurons).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from ..corpus import Prompt, evenly_spaced
from ..errors import NemoError
from ..files import append_jsonl, atomic_path, canonical_json, sha256_bytes, sha256_file
from ..generation import (COPY_SSIM, NEAREST_PX, REPRODUCED_ABOVE, Gallery, GenSettings, diversity, from_uint8,
                          generate, image_size, load_image, nearest_and_copy_share, nearest_share, reconstruct,
                          ssim, thumbnail, to_uint8)
from ..localize.calibrate import score_bar
from ..localize.detect import auroc
from ..localize.merge import as_layers, most_needed
from ..localize.runner import Engine, open_journal
from ..localize.score import Scorer
from ..model import Model, random_rows, zeroed_rows
from ..plan import Plan
from .keymap import layers_per_block_of, value_layer_of

MIN_MITIGATED = 0.95  # share of memorized prompts that must be mitigated for a releasable bundle
REFERENCE_SHOWN = 4  # reference prompts whose images the report shows before and after
GRID_SHOWN = 16  # memorized prompts whose images the report shows (evenly spaced over the corpus)
CHUNK_PROMPTS = 16  # prompts sampled at once in verification: memory stays flat on large corpora


@dataclass
class WeightCheck:
    ok: bool
    tensors_checked: int
    rows_zeroed: int
    files_identical: int
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tensors_checked": self.tensors_checked, "rows_zeroed": self.rows_zeroed,
                "files_identical": self.files_identical, "problems": self.problems[:20]}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _module_of(key: str, layers_per_block: int) -> str | None:
    """A value layer's module path, else None. A key that names none (a malformed file) is then
    held to bit-identity like any tensor outside the plan."""
    try:
        return value_layer_of(key, layers_per_block)
    except NemoError:
        return None


def _pairs(original: Path, cleaned: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(safetensors pairs, other-file pairs) of an input and its cleaned copy."""
    if original.is_file():
        return [(original, cleaned)], []
    st, other = [], []
    for f in sorted(p for p in original.rglob("*") if p.is_file()):
        g = cleaned / f.relative_to(original)
        (st if f.suffix == ".safetensors" else other).append((f, g))
    return st, other


def check_weights(original: Path, cleaned: Path, plan: Plan) -> WeightCheck:
    """Tensor by tensor: planned rows zero, every other row and tensor bit-identical, every
    non-weight file byte-identical."""
    original, cleaned = Path(original), Path(cleaned)
    st, other = _pairs(original, cleaned)
    problems: list[str] = []
    checked = zeroed = same_files = 0
    seen_layers: set[str] = set()
    for a, b in st:
        if not b.exists():
            problems.append(f"{b.name}: missing from output")
            continue
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                problems.append(f"{b.name}: tensor names differ from the input")
                continue
            lpb = layers_per_block_of(fa.keys())
            for key in fa.keys():
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                checked += 1
                mod = _module_of(key, lpb)
                rows = plan.layers.get(mod, []) if mod else []
                if mod in plan.layers:
                    seen_layers.add(mod)
                if rows:
                    keep = torch.ones(ta.shape[0], dtype=torch.bool)
                    keep[rows] = False
                    if tb[rows].count_nonzero():
                        problems.append(f"{key}: planned rows are not zero")
                    if _digest(ta[keep]) != _digest(tb[keep]):
                        problems.append(f"{key}: rows outside the plan changed")
                    zeroed += len(rows)
                elif _digest(ta) != _digest(tb):
                    problems.append(f"{key}: changed but not in the plan")
    for a, b in other:
        if not b.exists():
            problems.append(f"{b.relative_to(cleaned)}: missing from output")
        elif sha256_file(a) == sha256_file(b):
            same_files += 1
        else:
            problems.append(f"{b.relative_to(cleaned)}: differs from the input")
    missing = set(plan.layers) - seen_layers
    if missing:
        problems.append(f"plan layers not found in the output: {sorted(missing)[:3]}")
    return WeightCheck(not problems, checked, zeroed, same_files, problems)


@torch.no_grad()
def check_equivalence(engine: Engine, cleaned: Model, neurons: dict[str, frozenset[int]],
                      prompts: list[str]) -> dict:
    """Noise predictions of the cleaned UNet against the original with the plan's neurons masked:
    in fp32 they must be identical, not merely close. Both on torch, whatever ran the search:
    another runtime agrees with torch only within float noise."""
    sc = engine.scorer
    emb = sc.embed(prompts)
    n = len(sc.latents)
    emb = emb.repeat_interleave(n, 0)
    lat = sc.latents.repeat(len(prompts), 1, 1, 1)
    original = Scorer(engine.model, sc.settings, sc.batch_size, sc.autocast_dtype)
    clean_scorer = Scorer(cleaned, sc.settings, sc.batch_size, sc.autocast_dtype)
    try:
        masked = original.noise_diff(emb, lat, [neurons] * len(lat))
        plain = clean_scorer.noise_diff(emb, lat)
    finally:
        original.close()
        clean_scorer.close()
    diff = float((masked - plain).abs().max())
    return {"max_abs_diff": diff, "exact": diff == 0.0, "samples": len(lat),
            "dtype": str(next(cleaned.unet.parameters()).dtype).replace("torch.", "")}


def _scores(scorer: Scorer, prompts: list[str]) -> tuple[list[float], list[torch.Tensor]]:
    out, ds = [], []
    for p in prompts:
        d = scorer.prompt_noise_diffs(scorer.embed([p]))
        out.append(scorer.prompt_score(d))
        ds.append(d)
    return out, ds


def rescore(engine: Engine, cleaned: Model, memorized: list[str], reference: list[str],
            log: Callable[[str], None] = lambda s: None) -> tuple[dict, dict]:
    """Memorization score of the memorized prompts before/after (mitigated: at or below theta_mem
    after), and of reference prompts: changed when the cleaned model's noise differences are
    further from the original's than another seed's are (mean MS-SSIM across the two models
    below the prompt's own mean seed-to-seed MS-SSIM).

    theta_mem was calibrated on the original, and surgery moves every prompt's score (zeroing
    text features makes seeds agree more: on the demo the reference prompts' mean rises from 0.189
    to 0.209, past theta_mem 0.207). So the detector is also read as a user of the cleaned model
    would calibrate it: the bar mean + 1 std over the reference prompts' scores after, and the
    AUROC of memorized against reference prompts before and after, which needs no bar at all."""
    theta = engine.calibration.theta_mem
    sc = engine.scorer
    clean = Scorer(cleaned, sc.settings, sc.batch_size, sc.autocast_dtype)
    try:
        before, _ = _scores(sc, memorized)
        after, _ = _scores(clean, memorized)
        log(f"verify: re-scored {len(memorized)} memorized prompts")
        ref_before, ref_d0 = _scores(sc, reference)
        ref_after, ref_d1 = _scores(clean, reference)
        changed = []
        for d0, d1 in zip(ref_d0, ref_d1):
            across = float(sc.similarity(d0, d1).mean())
            n = len(d0)
            i, j = torch.triu_indices(n, n, 1)
            seed_noise = float(sc.similarity(d0[i], d0[j]).mean())
            changed.append(across < seed_noise)
        log(f"verify: re-scored {len(reference)} reference prompts")
    finally:
        clean.close()
    mitigated = [a <= theta for a in after]
    mem = {"prompts": len(memorized), "mitigated": int(sum(mitigated)),
           "share": (sum(mitigated) / len(mitigated)) if mitigated else 1.0, "theta_mem": theta,
           "scores_before": [round(x, 6) for x in before], "scores_after": [round(x, 6) for x in after]}
    ref = {"prompts": len(reference), "changed": int(sum(changed)),
           "share": (sum(changed) / len(changed)) if changed else 0.0,
           "memorized_after": int(sum(a > theta for a in ref_after)),
           "scores_before": [round(x, 6) for x in ref_before], "scores_after": [round(x, 6) for x in ref_after]}
    if len(reference) >= 2:
        bar, mu_after, _ = score_bar(ref_after)
        bar = round(bar, 6)
        ref |= {"score_mean_before": round(score_bar(ref_before)[1], 6), "score_mean_after": round(mu_after, 6),
                "theta_mem_after": bar}
        if memorized:
            # counted on the figures written, so that verify.json checks against itself
            below = sum(a <= bar for a in mem["scores_after"])
            mem |= {"auroc_before": round(auroc(before, ref_before), 6), "auroc_after": round(auroc(after, ref_after), 6),
                    "theta_mem_after": bar, "below_theta_mem_after": int(below)}
    return mem, ref


def generation_measures(original: Model, cleaned: Model, prompts: list[Prompt],
                        settings: GenSettings = GenSettings(), neurons: dict[str, Any] | None = None,
                        control_seed: int = 0, reference: list[str] = (), keep: set[str] | None = None,
                        log: Callable[[str], None] = lambda s: None, stage: str = "verify",
                        journal: Path | None = None, originals: Path | None = None
                        ) -> tuple[dict, list[tuple], dict]:
    """For prompts with a training image, full sampling before and after: SSIM to the training
    image, diversity across seeds, and how often the prompt's own training image is the nearest of
    the corpus's training images. A prompt *reproduces* its image when that happens in more than
    half of the seeds, and *copies* it when in more than half of the seeds the image is also within
    SSIM `COPY_SSIM` of the training image as the model's VAE reconstructs it. With the plan's
    `neurons`, also the control: the original with as many random neurons zeroed in the same
    layers (seeded by `control_seed`). The `reference` prompts (never memorized) are sampled in
    the same runs for `preservation` (summary["preservation"]).

    Prompts are sampled `CHUNK_PROMPTS` at a time and measured as they come, so memory does not
    grow with the corpus. Returns the measures, (label, before, after) images for the report (up
    to `GRID_SHOWN` memorized prompts, evenly spaced, then the first `REFERENCE_SHOWN` reference
    prompts), and {prompt id: {"original": before, "cleaned": after}} for the audit to reuse, as
    uint8 pixels, for the ids in `keep` (None: every prompt).

    With a `journal` (a JSONL file, its chunks' images in safetensors files beside it), each
    chunk's measures are appended as it finishes, and a rerun with the same inputs samples only
    the chunks not yet on record: on a corpus of hundreds of prompts this is hours of sampling.
    A journal made with other inputs is started afresh.

    With an `originals` folder, the original's images of each chunk are kept there and reused by
    any later call with the same original, prompts and sampling settings (`curve` measures many
    plans against one original). `cleaned` may be `original` itself: its images are then not
    sampled twice."""
    with_img = [p for p in prompts if p.image is not None]
    if original.vae is None or cleaned.vae is None:
        with_img, reference = [], []
    rand = random_rows(original.shapes, neurons, torch.Generator().manual_seed(control_seed)) if neurons else None
    items: list[tuple[Prompt | None, str]] = [(p, p.text) for p in with_img] + [(None, t) for t in reference]
    size = image_size(original) if items else 0
    shown = {p.id for p in evenly_spaced(with_img, GRID_SHOWN)}
    done = {}
    if journal is not None:
        config = {"stage": stage, "original": original.fingerprint, "cleaned": cleaned.fingerprint,
                  "neurons": {k: sorted(map(int, v)) for k, v in sorted((neurons or {}).items())},
                  "control_seed": control_seed, "sampling": asdict(settings),
                  "prompts": [[p.id, p.text, sha256_file(p.image)] for p in with_img], "reference": list(reference),
                  "chunk_prompts": CHUNK_PROMPTS, "shown": sorted(shown), "reference_shown": REFERENCE_SHOWN,
                  "keep": None if keep is None else sorted(keep), "pixels": "uint8", "thumbnails": NEAREST_PX}
        done = _open_journal(journal, config)
        if done:
            log(f"{stage}: resuming: {len(done)} of {-(-len(items) // CHUNK_PROMPTS)} chunks of prompts already "
                f"sampled in {journal}")
    # Only the thumbnails of the whole corpus's training images stay in memory (the nearest-image
    # search needs them all); full-size images and reconstructions are made chunk by chunk. They
    # are loaded when a chunk is first sampled: a run resumed at its end needs none of them.
    near: Gallery | None = None
    rows, kept_rows, grid, ref_grid, samples = [], [], [], [], {}
    thumbs: dict[str, list[np.ndarray]] = {"before": [], "after": [], "random": []}
    t0 = time.perf_counter()
    for start in range(0, len(items), CHUNK_PROMPTS):
        chunk = items[start:start + CHUNK_PROMPTS]
        key = f"chunk:{start}"
        reused = False
        if key in done:
            rec, images = done[key], _load_chunk_images(journal, start)
        else:
            if near is None:
                near = Gallery((p.id, load_image(p.image, size)) for p in with_img)
            before, reused = _original_images(original, [t for _, t in chunk], settings, originals)
            rec, images = _sample_chunk(original, cleaned, chunk, key, settings, rand, near, size, shown, keep,
                                        len(ref_grid), before)
            if journal is not None:
                # the images first: a chunk on record always has its pictures
                _save_chunk_images(journal, start, images)
                append_jsonl(journal, rec)
        rows += rec["rows"]
        kept_rows += rec["kept_rows"]
        for t in range(len(rec["kept_rows"])):
            for m, into in thumbs.items():
                if f"thumb:{t}/{m}" in images:
                    # as 8-bit pixels: 500 reference prompts' at 4 seeds are 300 MB so, 1.2 GB as float32
                    into.append(to_uint8(images[f"thumb:{t}/{m}"]))
        for pictures, into in ((rec["pictures"], grid), (rec["reference_pictures"], ref_grid)):
            into += [(label, images[f"{label}/before"], images[f"{label}/after"]) for label in pictures]
        for pid in rec["samples"]:
            # kept to the end of verification for the audit: as the 8-bit pixels they are, a quarter
            # of float32's bytes (32 prompts' at 512 px with 4 seeds: 200 MB, not 800)
            samples[pid] = {m: to_uint8(images[f"sample:{pid}/{m}"]) for m in ("original", "cleaned")}
        log(f"{stage}: sampled {start + len(chunk)}/{len(items)} prompts ({len(with_img)} memorized, "
            f"{len(reference)} reference) x {len(settings.seeds)} seeds on the original, the cleaned model"
            f"{' and with as many random neurons' if rand is not None else ''} ({time.perf_counter() - t0:.1f} s)"
            + (" (from the journal)" if key in done else "")
            + (" (the original's images kept from an earlier run)" if reused else ""))
    control_of = {"neurons": sum(len(v) for v in neurons.values()), "seed": control_seed} if neurons else None
    if kept_rows:
        _add_own_prompt_nearest(kept_rows, *(np.stack(v) if v else None for v in thumbs.values()))
    return _generation_summary(rows, kept_rows, settings, control_of, pictured=len(grid)), grid + ref_grid, samples


def _sample_chunk(original: Model, cleaned: Model, chunk: list[tuple[Prompt | None, str]], key: str,
                  settings: GenSettings, rand: dict | None, near: Gallery, size: int, shown: set[str],
                  keep: set[str] | None, ref_pictured: int, before: np.ndarray
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """Sample one chunk of prompts (memorized ones with their training image, then reference
    prompts: None) on the cleaned model and the random control, and measure them against the
    original's images `before`. Returns the chunk's journal record and its images by name: the
    pictures for the report (`ref_pictured` reference prompts already pictured) and the samples
    the audit reuses."""
    texts = [t for _, t in chunk]
    after = before if cleaned is original else generate(cleaned, texts, settings)
    control = None
    if rand is not None:
        with zeroed_rows(original, rand):
            control = generate(original, texts, settings)
    rec = {"id": key, "rows": [], "kept_rows": [], "pictures": [], "reference_pictures": [], "samples": []}
    images = {}
    for j, (p, _) in enumerate(chunk):
        c = None if control is None else control[j]
        if p is None:
            rec["kept_rows"].append(_preservation_row(before[j], after[j], c))
            # thumbnails, for `own_prompt_nearest` over all reference prompts once every chunk is in
            t = len(rec["kept_rows"]) - 1
            for m, x in (("before", before[j]), ("after", after[j]), ("random", c)):
                if x is not None:
                    images[f"thumb:{t}/{m}"] = np.stack([thumbnail(v) for v in x])
            n_ref = ref_pictured + len(rec["reference_pictures"])
            if n_ref < REFERENCE_SHOWN:  # so a reader sees what the SSIM means
                label = f"reference prompt {n_ref + 1} (not memorized)"
                rec["reference_pictures"].append(label)
                images[f"{label}/before"], images[f"{label}/after"] = before[j], after[j]
            continue
        train = load_image(p.image, size)
        rec["rows"].append(_reproduction_row(p, before[j], after[j], c, train, reconstruct(original, train), near))
        if p.id in shown:
            label = f"{p.id} ({p.type or '-'})"
            rec["pictures"].append(label)
            images[f"{label}/before"], images[f"{label}/after"] = before[j], after[j]
        if keep is None or p.id in keep:
            rec["samples"].append(p.id)
            images[f"sample:{p.id}/original"], images[f"sample:{p.id}/cleaned"] = before[j], after[j]
    return rec, images


def _original_images(original: Model, texts: list[str], settings: GenSettings, folder: Path | None
                     ) -> tuple[np.ndarray, bool]:
    """The original's images of `texts`, sampled, or read from `folder` where an earlier call
    sampled the same prompts with the same model and settings (sampling is deterministic, so a
    kept copy is what sampling again would give, bit for bit); and whether they were read."""
    if folder is None:
        return generate(original, texts, settings), False
    from safetensors.numpy import load_file, save_file

    key = sha256_bytes(canonical_json({"model": original.fingerprint, "sampling": asdict(settings),
                                       "texts": texts, "pixels": "uint8"}).encode())
    path = Path(folder) / f"original-{key[:24]}.safetensors"
    if path.is_file():
        try:
            return from_uint8(load_file(str(path))["images"]), True
        except Exception:  # noqa: BLE001 - a damaged copy is sampled again, as if it were not there
            pass
    images = generate(original, texts, settings)
    with atomic_path(path) as tmp:
        save_file({"images": to_uint8(images)}, str(tmp))
    return images, False


def _generation_summary(rows: list[dict], kept_rows: list[dict], settings: GenSettings, control_of: dict | None,
                        pictured: int) -> dict:
    """The measures of all chunks: reproductions and near-copies before, after and under the
    random control (`control_of`: its size and seed, None without one), and preservation."""
    kept = None
    if kept_rows:
        kept = preservation_summary(kept_rows, settings)
        if control_of is not None:
            kept["random_control"] |= control_of
    if not rows:
        # Nothing to sample against: the release gate rests on the score alone.
        return ({"prompts": 0, "reproduced_before": 0, "reproduced_after": 0, "removed_share": None, "rows": []}
                | ({"preservation": kept} if kept else {}))
    was = [r for r in rows if r["reproduced_before"]]
    copied = [r for r in rows if r["copied_before"]]
    summary = {"prompts": len(rows), "seeds": list(settings.seeds), "steps": settings.steps,
               "guidance": settings.guidance, "reproduced_before": len(was),
               "reproduced_after": sum(r["reproduced_after"] for r in rows),
               "removed_share": _gone(was, "reproduced_after"),
               "appeared_after": _appeared(rows, "reproduced"),
               "copies": {"ssim_to_reconstruction": COPY_SSIM, "before": len(copied),
                          "after": sum(r["copied_after"] for r in rows),
                          "removed_share": _gone(copied, "copied_after"),
                          "appeared_after": _appeared(rows, "copied")},
               "pictured": pictured, "rows": rows}
    if control_of is not None:
        summary["random_control"] = control_of | {
            "reproduced": sum(r["reproduced_random"] for r in rows), "removed_share": _gone(was, "reproduced_random"),
            "copies": sum(r["copied_random"] for r in rows), "copies_removed_share": _gone(copied, "copied_random")}
    by_type = _by_type(rows, control_of is not None)
    if by_type:
        summary["by_type"] = by_type
    if kept:
        summary["preservation"] = kept
    return summary


def _by_type(rows: list[dict], control: bool) -> dict[str, dict]:
    """The reproduction figures per prompt type, where the corpus gives types. The paper evaluates
    verbatim (VM) and template (TM) memorization apart: a template is a layout shared by many
    training images, and the one the corpus names stands in for all of them."""
    types = sorted({r["type"] or "untyped" for r in rows})
    if types == ["untyped"]:
        return {}
    out = {}
    for t in types:
        sub = [r for r in rows if (r["type"] or "untyped") == t]
        was = [r for r in sub if r["reproduced_before"]]
        copied = [r for r in sub if r["copied_before"]]
        out[t] = {"prompts": len(sub), "reproduced_before": len(was),
                  "reproduced_after": sum(r["reproduced_after"] for r in sub),
                  "removed_share": _gone(was, "reproduced_after"), "copies_before": len(copied),
                  "copies_after": sum(r["copied_after"] for r in sub),
                  "copies_removed_share": _gone(copied, "copied_after")}
        if control:
            out[t] |= {"random_reproduced": sum(r["reproduced_random"] for r in sub),
                       "random_removed_share": _gone(was, "reproduced_random"),
                       "random_copies": sum(r["copied_random"] for r in sub)}
    return out


def _reproduction_row(p: Prompt, before: np.ndarray, after: np.ndarray, control: np.ndarray | None,
                      train: np.ndarray, recon: np.ndarray, candidates: Gallery) -> dict:
    """One memorized prompt's images (seeds, H, W, 3) before, after and under the control, measured
    against its training image `train`, its VAE reconstruction and the corpus's `candidates`."""
    row = {"id": p.id, "type": p.type,
           "ssim_train_before": float(np.mean([ssim(x, train) for x in before])),
           "ssim_train_after": float(np.mean([ssim(x, train) for x in after])),
           "diversity_before": diversity(before), "diversity_after": diversity(after)}
    phases = [("before", before), ("after", after)] + ([("random", control)] if control is not None else [])
    for phase, images in phases:
        near, copy = nearest_and_copy_share(images, p.id, candidates, recon)
        row |= {f"own_nearest_{phase}": near, f"reproduced_{phase}": near > REPRODUCED_ABOVE,
                f"copy_{phase}": copy, f"copied_{phase}": copy > REPRODUCED_ABOVE}
    return row


def _spread(xs: list[float]) -> dict:
    return {"mean": round(float(np.mean(xs)), 4), "median": round(float(np.median(xs)), 4),
            "min": round(float(np.min(xs)), 4)}


def _preservation_row(before: np.ndarray, after: np.ndarray, control: np.ndarray | None) -> dict:
    """One prompt's images (seeds, H, W, 3): each cleaned (and control) image against the
    original's for the same seed, and the original's seeds against each other."""
    k = len(before)
    row = {"same": [ssim(before[s], after[s]) for s in range(k)],
           "seed_to_seed": float(np.mean([ssim(before[s], before[t]) for s in range(k) for t in range(s + 1, k)]))
           if k > 1 else 0.0}
    if control is not None:
        row["rand"] = [ssim(before[s], control[s]) for s in range(k)]
    return row


def _floats(x: np.ndarray) -> np.ndarray:
    return from_uint8(x) if x.dtype == np.uint8 else x


def seed_galleries(before: np.ndarray) -> list[Gallery]:
    """Per seed, the prompts' original images (prompts, seeds, H, W, 3; 8-bit pixels or floats)
    made ready for the nearest-image search once, for every comparison against them."""
    n, k = before.shape[:2]
    return [Gallery((str(i), _floats(before[i, s])) for i in range(n)) for s in range(k)]


def _same_seed_similarities(galleries: list[Gallery], images: np.ndarray) -> np.ndarray:
    """SSIM (as thumbnails) of each of `images` (prompts, seeds, H, W, 3) to each prompt's
    original image for the same seed (`seed_galleries`): (seeds, prompts, prompts)."""
    return np.stack([g.similarities(_floats(images[:, s])) for s, g in enumerate(galleries)])


def own_prompt_nearest(before: np.ndarray, after: np.ndarray, galleries: list[Gallery] | None = None) -> np.ndarray:
    """For each prompt and seed of (prompts, seeds, H, W, 3) images: is the cleaned image's most
    similar original image, among all these prompts' for the same seed (SSIM, as thumbnails), its
    own prompt's? That is whether the model still draws what the prompt asks for rather than what
    the seed's starting latents give any prompt. SSIM to the original's alone cannot tell: on a
    small model the seed shapes every prompt's image (on the demo two prompts' images for one seed
    are at SSIM 0.44 to each other, two seeds of one prompt at 0.31, and with no text reaching the
    UNet at all the images stay at 0.42 to the original's). Chance is 1 / prompts. Images may be
    given as 8-bit pixels (uint8) or as floats in [0, 1]; `galleries`: `seed_galleries(before)`,
    where the caller has them."""
    sims = _same_seed_similarities(galleries or seed_galleries(before), after)
    return (sims.argmax(axis=2) == np.arange(before.shape[0])).T


def prompt_to_prompt(before: np.ndarray, galleries: list[Gallery] | None = None) -> np.ndarray:
    """Per prompt, the mean SSIM of its original images to the other prompts' for the same seed:
    how far apart the original keeps the prompts, the scale `own_prompt_nearest` works at (where
    the original draws nearly the same image for every prompt, a small change flips the nearest)."""
    n = before.shape[0]
    sims = _same_seed_similarities(galleries or seed_galleries(before), before)
    off = ~np.eye(n, dtype=bool)
    return np.array([sims[:, i, off[i]].mean() if n > 1 else 1.0 for i in range(n)])


def _add_own_prompt_nearest(rows: list[dict], before: np.ndarray, after: np.ndarray,
                            control: np.ndarray | None) -> None:
    """`own_prompt_nearest` of the cleaned model's (and the control's) images, into each
    preservation row as one flag per seed, with the row's `prompt_to_prompt`; the originals'
    galleries are made once for all three."""
    galleries = seed_galleries(before)
    for row, own, p2p in zip(rows, own_prompt_nearest(before, after, galleries),
                             prompt_to_prompt(before, galleries)):
        row["own"], row["prompt_to_prompt"] = own.tolist(), float(p2p)
    if control is not None:
        for row, own in zip(rows, own_prompt_nearest(before, control, galleries)):
            row["own_rand"] = own.tolist()


def preservation_summary(rows: list[dict], settings: GenSettings) -> dict:
    """How far surgery moved the images of prompts it was not aimed at (`_preservation_row` per
    prompt). Same seed means the same initial latents, so an untouched model gives SSIM 1. The
    yardstick is the original's own spread: SSIM between its images of one prompt under
    different seeds, what an unrelated draw of that prompt looks like. A prompt *changed* when
    its mean same-seed SSIM falls below that (the full-sampling twin of the first-step reference
    check). Where the rows carry `own_prompt_nearest`'s flags, the share of (prompt, seed) images
    still nearest to their own prompt's original, with chance (1 / prompts) beside it: the
    release gate's measure, since the seed alone keeps images near the original's. With the
    control, the same for as many random neurons: surgery that moves these images no more than
    random damage of its size is not targeting them, but it still moves them."""
    out_rows = []
    for r in rows:
        o = {"ssim_to_original": round(float(np.mean(r["same"])), 4), "seed_to_seed": round(r["seed_to_seed"], 4)}
        if "rand" in r:
            o["random"] = round(float(np.mean(r["rand"])), 4)
        if "own" in r:
            o["own_prompt_nearest"] = round(float(np.mean(r["own"])), 4)
        out_rows.append(o)
    out = {"prompts": len(rows), "seeds": list(settings.seeds), "steps": settings.steps,
           "guidance": settings.guidance, "ssim_to_original": _spread([v for r in rows for v in r["same"]]),
           "seed_to_seed": round(float(np.mean([r["seed_to_seed"] for r in rows])), 4),
           "changed": sum(o["ssim_to_original"] < o["seed_to_seed"] for o in out_rows)}
    if rows and all("own" in r for r in rows):
        out |= {"own_prompt_nearest": round(float(np.mean([v for r in rows for v in r["own"]])), 4),
                "chance": round(1 / len(rows), 4),
                "prompt_to_prompt": round(float(np.mean([r["prompt_to_prompt"] for r in rows])), 4)}
    if rows and all("rand" in r for r in rows):
        out["random_control"] = {"ssim_to_original": _spread([v for r in rows for v in r["rand"]]),
                                 "changed": sum(o["random"] < o["seed_to_seed"] for o in out_rows)}
        if all("own_rand" in r for r in rows):
            out["random_control"]["own_prompt_nearest"] = round(
                float(np.mean([v for r in rows for v in r["own_rand"]])), 4)
    return out | {"rows": out_rows}


def preservation(before: np.ndarray, after: np.ndarray, control: np.ndarray | None,
                 settings: GenSettings) -> dict:
    """`preservation_summary` of arrays (prompts, seeds, H, W, 3)."""
    rows = [_preservation_row(before[i], after[i], None if control is None else control[i])
            for i in range(len(before))]
    if rows:
        _add_own_prompt_nearest(rows, before, after, control)
    return preservation_summary(rows, settings)


def removal_curve(original: Model, copy: Model, plan: Plan, sizes: list[int], prompts: list[Prompt],
                  reference: list[str] = (), settings: GenSettings = GenSettings(), control_seed: int = 0,
                  log: Callable[[str], None] = lambda s: None, work: Path | None = None) -> dict:
    """What a smaller plan would remove and cost: for each K in `sizes`, the plan's K most needed
    neurons (the order `merge --max-neurons K` keeps; neurons without a count last) zeroed in
    `copy` (a second load of the original; restored after), measured as verification measures a
    release (`generation_measures`: reproductions and near-copies of the prompts with a training
    image, the reference prompts' images against the original's, and as many random neurons).
    Every neuron zeroed costs some quality for every user of the model: the curve is what a
    publisher picks K from. With a `work` folder each size keeps a journal there
    (`curve-K.jsonl`), so an interrupted curve resumes at the chunk of prompts it stopped in, and
    the original's images are sampled once for all sizes (kept there too, `original-*`)."""
    counts = {path: {n: plan.counts.get(path, {}).get(n, 0) for n in rows} for path, rows in plan.layers.items()}
    ranked = most_needed(counts)
    rows = []
    for k in sorted({min(max(0, k), len(ranked)) for k in sizes}):
        top = as_layers(ranked[:k])
        with zeroed_rows(copy, top):
            # K = 0 is the original itself: nothing to sample but the original.
            gen, _, _ = generation_measures(original, copy if top else original, prompts, settings, top,
                                            control_seed, reference, keep=set(), log=log,
                                            stage=f"curve, {k} neurons",
                                            journal=None if work is None else Path(work) / f"curve-{k}.jsonl",
                                            originals=work)
        rc, pr = gen.get("random_control") or {}, gen.get("preservation") or {}
        row = {"neurons": k, "prompts": gen["prompts"], "reproduced_before": gen["reproduced_before"],
               "reproduced_after": gen["reproduced_after"], "removed_share": gen["removed_share"],
               "random_removed_share": rc.get("removed_share"),
               "copies_removed_share": (gen.get("copies") or {}).get("removed_share"),
               "random_copies_removed_share": rc.get("copies_removed_share"),
               "reference_ssim": (pr.get("ssim_to_original") or {}).get("mean"),
               "random_reference_ssim": ((pr.get("random_control") or {}).get("ssim_to_original") or {}).get("mean"),
               "reference_seed_to_seed": pr.get("seed_to_seed"),
               "reference_own_prompt_nearest": pr.get("own_prompt_nearest"),
               "random_reference_own_prompt_nearest": (pr.get("random_control") or {}).get("own_prompt_nearest")}
        if "by_type" in gen:
            row["by_type"] = gen["by_type"]
        rows.append(row)
        log(f"curve: {curve_text(row)}")
    return {"plan_neurons": plan.n_neurons, "control_seed": control_seed, "seeds": list(settings.seeds),
            "steps": settings.steps, "guidance": settings.guidance, "reference_prompts": len(reference),
            "sizes": rows}


def curve_choice(rows: list[dict], min_mitigated: float, min_preserved: float) -> dict:
    """What a publisher picks K from, in the release gate's terms (sizes above 0): the smallest K
    whose removal of reproductions reaches `min_mitigated`; among the sizes whose reference images
    stay their prompts' own in at least `min_preserved` of cases, the one that removes most (the
    smaller on a tie); and the smallest K that does both. Each is None where no size qualifies."""
    sized = [r for r in rows if r["neurons"] > 0 and r.get("removed_share") is not None]
    removing = [r for r in sized if r["removed_share"] >= min_mitigated]
    keeping = [r for r in sized if (r.get("reference_own_prompt_nearest") or 0) >= min_preserved]
    both = [r for r in removing if r in keeping]
    return {"min_mitigated": min_mitigated, "min_preserved": min_preserved,
            "smallest_removing": min(r["neurons"] for r in removing) if removing else None,
            "most_removing_preserved": min(keeping, key=lambda r: (-r["removed_share"], r["neurons"]))["neurons"]
            if keeping else None,
            "meets_both": min(r["neurons"] for r in both) if both else None}


def curve_choice_text(choice: dict, rows: list[dict]) -> str:
    by_k = {r["neurons"]: r for r in rows}
    need = f"{choice['min_mitigated']:.0%} of reproductions removed"
    keep = f"{choice['min_preserved']:.0%} of reference images still their prompt's own"
    if choice["meets_both"] is not None:
        return f"curve: K = {choice['meets_both']} is the smallest size with both {need} and {keep}"
    s, b = choice["smallest_removing"], choice["most_removing_preserved"]
    return (f"curve: no size has both {need} and {keep}; "
            + (f"K = {s} is the smallest to remove that many" if s is not None else "none removes that many")
            + "; " + (f"K = {b} removes most ({by_k[b]['removed_share']:.0%}) while keeping that many" if b is not None
                      else "none keeps that many"))


def curve_text(row: dict) -> str:
    """One size of `removal_curve` in a line."""
    def share(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0%}"

    ref = ""
    if row.get("reference_ssim") is not None:
        rnd = row.get("random_reference_ssim")
        ref = (f"; reference images' SSIM to the original's {row['reference_ssim']:.3f}"
               + (f" (random {rnd:.3f})" if rnd is not None else ""))
    if row.get("reference_own_prompt_nearest") is not None:
        ref += (f", own prompt's original nearest {share(row['reference_own_prompt_nearest'])}"
                f" (random {share(row.get('random_reference_own_prompt_nearest'))})")
    return (f"{row['neurons']} neurons: reproductions {row['reproduced_before']} -> {row['reproduced_after']} "
            f"({share(row['removed_share'])} removed; as many random neurons {share(row['random_removed_share'])})"
            + ref)


def _gone(was: list[dict], still: str) -> float | None:
    """The share of `was` no longer `still`; None where nothing was there to remove, rather than
    a "100 % removed" that nothing earned."""
    return sum(not r[still] for r in was) / len(was) if was else None


def release_conditions(weights_ok: bool, exact: bool, memorized: dict, generation: dict, preservation: dict | None,
                       min_mitigated: float, min_preserved: float) -> dict[str, dict]:
    """Each condition a releasable bundle must meet, with its figure and bar, so that a reader of
    `verify.json` sees which failed: the weights as planned; the masked and the zeroed model
    identical; where there are memorized prompts, the score mitigating `min_mitigated` of them
    and, where training images are known, full sampling removing as large a share of the
    reproductions (the first-step score alone can be fooled); where reference prompts were
    sampled, `min_preserved` of their images still their own prompt's. A condition that could
    not be measured is not held against the bundle, and says so."""
    out = {"weights": {"met": bool(weights_ok)}, "masked_equals_zeroed": {"met": bool(exact)}}

    def bar(share: float | None, required: float) -> dict:
        if share is None:
            return {"measured": False, "met": True}
        return {"share": round(float(share), 4), "required": required, "met": bool(share >= required)}

    has_memorized = bool(memorized.get("prompts"))
    out["mitigated_by_score"] = bar(memorized["share"] if has_memorized else None, min_mitigated)
    sampled = has_memorized and bool(generation.get("prompts"))
    out["removed_by_sampling"] = bar(sampling_removal(generation) if sampled else None, min_mitigated)
    out["preserved"] = bar((preservation or {}).get("own_prompt_nearest"), min_preserved)
    return out


def is_releasable(conditions: dict[str, dict]) -> bool:
    """A bundle is releasable when every one of its `release_conditions` is met."""
    return all(c["met"] for c in conditions.values())


def sampling_removal(summary: dict) -> float:
    """What the release gate holds full sampling to: the share of reproductions removed. Where
    the original reproduced none there is nothing to remove, but the cleaned model must not have
    started to: 1 if it draws none either, else 0."""
    if summary["removed_share"] is not None:
        return summary["removed_share"]
    return float(not summary["reproduced_after"])


JOURNAL_FORMAT = "nemo-surgery-verify-sampling"


def _open_journal(path: Path, config: dict) -> dict[str, dict]:
    """The chunks already on record for the same inputs; a journal of other inputs starts afresh,
    its chunks' images with it."""
    done, fresh = open_journal(path, config, JOURNAL_FORMAT)
    if fresh:
        shutil.rmtree(_images_dir(path), ignore_errors=True)
    return done


def _images_dir(journal: Path) -> Path:
    return journal.with_name(journal.stem + "-images")


def _save_chunk_images(journal: Path, start: int, images: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    with atomic_path(_images_dir(journal) / f"{start}.safetensors") as tmp:
        save_file({k: to_uint8(v) for k, v in images.items()}, str(tmp))


def _load_chunk_images(journal: Path, start: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = _images_dir(journal) / f"{start}.safetensors"
    if not path.is_file():
        raise NemoError(f"{path}: images of a sampled chunk are missing; delete {journal} to sample again")
    return {k: from_uint8(v) for k, v in load_file(str(path)).items()}


def _appeared(rows: list[dict], what: str) -> int:
    """Prompts whose training image the cleaned model draws (`what`: "reproduced" or "copied")
    where the original did not: zeroing neurons can push a degraded image nearer its own photo."""
    return sum(r[f"{what}_after"] and not r[f"{what}_before"] for r in rows)


def own_set_specificity(model: Model, prompts: list[Prompt], records: list[dict],
                        settings: GenSettings = GenSettings(), seed: int = 0,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """NeMo's own test of what localization found, at the level of images: each prompt with a
    training image is sampled with its own refined set zeroed, and with as many random neurons
    drawn in the same layers (seeded). A set specific to its prompt removes reproductions that
    random neurons leave, however spread the memorization is; a plan can only be as good as its
    sets. Per prompt, the share of seeds whose nearest training image is its own."""
    refined = {str(r["id"]): {k: v for k, v in (r.get("refined") or {}).items() if v} for r in records}
    with_img = [p for p in prompts if p.image is not None and refined.get(p.id)]
    size = image_size(model)
    train = Gallery((p.id, load_image(p.image, size)) for p in prompts if p.image is not None)
    g = torch.Generator().manual_seed(seed)
    original = generate(model, [p.text for p in with_img], settings) if with_img else []
    rows = []
    for k, p in enumerate(with_img):
        own = refined[p.id]
        rand = random_rows(model.shapes, own, g)
        row = {"id": p.id, "neurons": sum(map(len, own.values())),
               "original": nearest_share(original[k], p.id, train)}
        for name, neurons in (("own", own), ("random", rand)):
            with zeroed_rows(model, neurons):
                row[name] = nearest_share(generate(model, [p.text], settings)[0], p.id, train)
        rows.append(row)
        log(f"  {p.id}: {row['neurons']} neurons, own image nearest {row['original']:.0%} -> {row['own']:.0%} "
            f"with its set, {row['random']:.0%} with as many random neurons")
    was = [r for r in rows if r["original"] > REPRODUCED_ABOVE]
    mean = {k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in ("original", "own", "random")}
    return {"prompts": len(rows), "reproduced": len(was), "seed": seed, "steps": settings.steps,
            "seeds": list(settings.seeds),
            "removed_by_own_set": sum(r["own"] <= REPRODUCED_ABOVE for r in was),
            "removed_by_random": sum(r["random"] <= REPRODUCED_ABOVE for r in was),
            "own_nearest": mean, "rows": rows}
