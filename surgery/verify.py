"""Verification of what surgery wrote: reload it and check, from the files, that exactly the
plan's rows are zero and nothing else moved; that the cleaned UNet computes exactly what the
hook-blocked original computes; and that memorization is gone while other prompts stay put.

Weight checks stream one tensor at a time. Behavioural checks use localization's scoring (the
one dependency on an earlier stage that the design allows: verification must measure with the
same instrument that found the neurons).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from ..corpus import Prompt
from ..errors import NemoError
from ..files import sha256_file
from ..generation import (COPY_SSIM, REPRODUCED_ABOVE, GenSettings, diversity, generate, image_size, load_image,
                          nearest_and_copy_share, nearest_share, reconstruct, ssim)
from ..localize.runner import Engine
from ..localize.score import Scorer
from ..model import VALUE_SUFFIX, Model, random_rows, zeroed_rows
from ..plan import Plan
from .keymap import ldm_to_diffusers

MIN_MITIGATED = 0.95  # share of memorized prompts that must be mitigated for a releasable bundle
REFERENCE_SHOWN = 4  # reference prompts whose images the report shows before and after


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


def _module_of(key: str) -> str | None:
    """Diffusers module path of a value-layer weight key (diffusers or LDM naming), else None."""
    if not key.endswith(f"{VALUE_SUFFIX}.weight"):
        return None
    name = key[: -len(".weight")]
    if name.startswith("model.diffusion_model."):
        try:
            name = ldm_to_diffusers(name)
        except (NemoError, ValueError):
            return None
    return name


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
            for key in fa.keys():
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                checked += 1
                mod = _module_of(key)
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
    below the prompt's own mean seed-to-seed MS-SSIM)."""
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
    return mem, ref


def generation_measures(original: Model, cleaned: Model, prompts: list[Prompt],
                        settings: GenSettings = GenSettings(), neurons: dict[str, Any] | None = None,
                        control_seed: int = 0, reference: list[str] = ()) -> tuple[dict, list[tuple], dict]:
    """For prompts with a training image, full sampling before and after: SSIM to the training
    image, diversity across seeds, and how often the prompt's own training image is the nearest of
    the corpus's training images. A prompt *reproduces* its image when that happens in more than
    half of the seeds, and *copies* it when in more than half of the seeds the image is also within
    SSIM `COPY_SSIM` of the training image as the model's VAE reconstructs it. With the plan's
    `neurons`, also the control: the original with as many random neurons zeroed in the same
    layers (seeded by `control_seed`). The `reference` prompts (never memorized) are sampled in
    the same runs for `preservation` (summary["preservation"]). Returns the measures,
    (label, before, after) images for the report (the first `REFERENCE_SHOWN` reference prompts last), and {prompt id: {"original": before, "cleaned":
    after}} for the audit to reuse."""
    with_img = [p for p in prompts if p.image is not None]
    if original.vae is None or cleaned.vae is None:
        with_img, reference = [], []
    texts = [p.text for p in with_img] + list(reference)
    before = after = control = None
    if texts:
        before = generate(original, texts, settings)
        after = generate(cleaned, texts, settings)
        if neurons:
            rand = random_rows(original.shapes, neurons, torch.Generator().manual_seed(control_seed))
            with zeroed_rows(original, rand):
                control = generate(original, texts, settings)
    n = len(with_img)
    kept, shown = None, []
    if reference:
        kept = preservation(before[n:], after[n:], None if control is None else control[n:], settings)
        if control is not None:
            kept["random_control"] |= {"neurons": sum(len(v) for v in neurons.values()), "seed": control_seed}
        # A few of them beside the memorized prompts' images, so a reader sees what the SSIM means.
        shown = [(f"reference prompt {j + 1} (not memorized)", before[n + j], after[n + j])
                 for j in range(min(REFERENCE_SHOWN, len(reference)))]
    if not with_img:
        # Nothing to sample against: the release gate rests on the score alone.
        return ({"prompts": 0, "reproduced_before": 0, "reproduced_after": 0, "removed_share": 1.0, "rows": []}
                | ({"preservation": kept} if kept else {}), shown, {})
    size = image_size(original)
    train = {p.id: load_image(p.image, size) for p in with_img}
    recon = {k: reconstruct(original, v) for k, v in train.items()}

    rows, grid = [], []
    for k, p in enumerate(with_img):
        t = train[p.id]
        row = {"id": p.id, "type": p.type,
               "ssim_train_before": float(np.mean([ssim(x, t) for x in before[k]])),
               "ssim_train_after": float(np.mean([ssim(x, t) for x in after[k]])),
               "diversity_before": diversity(before[k]), "diversity_after": diversity(after[k])}
        phases = [("before", before), ("after", after)] + ([("random", control)] if control is not None else [])
        for phase, images in phases:
            near, copy = nearest_and_copy_share(images[k], p.id, train, recon[p.id])
            row |= {f"own_nearest_{phase}": near, f"reproduced_{phase}": near > REPRODUCED_ABOVE,
                    f"copy_{phase}": copy, f"copied_{phase}": copy > REPRODUCED_ABOVE}
        rows.append(row)
        grid.append((f"{p.id} ({p.type or '-'})", before[k], after[k]))
    was = [r for r in rows if r["reproduced_before"]]
    copied = [r for r in rows if r["copied_before"]]
    summary = {"prompts": len(rows), "seeds": list(settings.seeds), "steps": settings.steps,
               "guidance": settings.guidance, "reproduced_before": len(was),
               "reproduced_after": sum(r["reproduced_after"] for r in rows),
               "removed_share": _gone(was, "reproduced_after"),
               "copies": {"ssim_to_reconstruction": COPY_SSIM, "before": len(copied),
                          "after": sum(r["copied_after"] for r in rows),
                          "removed_share": _gone(copied, "copied_after")}, "rows": rows}
    if control is not None:
        summary["random_control"] = {"neurons": sum(len(v) for v in neurons.values()), "seed": control_seed,
                                     "reproduced": sum(r["reproduced_random"] for r in rows),
                                     "removed_share": _gone(was, "reproduced_random"),
                                     "copies": sum(r["copied_random"] for r in rows),
                                     "copies_removed_share": _gone(copied, "copied_random")}
    if kept:
        summary["preservation"] = kept
    grid += shown
    samples = {p.id: {"original": before[k], "cleaned": after[k]} for k, p in enumerate(with_img)}
    return summary, grid, samples


def _spread(xs: list[float]) -> dict:
    return {"mean": round(float(np.mean(xs)), 4), "median": round(float(np.median(xs)), 4),
            "min": round(float(np.min(xs)), 4)}


def preservation(before: np.ndarray, after: np.ndarray, control: np.ndarray | None,
                 settings: GenSettings) -> dict:
    """How far surgery moved the images of prompts it was not aimed at. Each (prompt, seed) image of
    the cleaned model against the original's for the same prompt and seed (same initial latents,
    so an untouched model gives SSIM 1). The yardstick is the original's own spread: SSIM between
    its images of one prompt under different seeds, what an unrelated draw of that prompt looks
    like. A prompt *changed* when its mean same-seed SSIM falls below that (the full-sampling
    twin of the first-step reference check). With `control`, the same for as many random neurons:
    surgery that moves these images no more than random damage of its size is not targeting
    them, but it still moves them."""
    n, k = before.shape[:2]
    same = [[ssim(before[i, s], after[i, s]) for s in range(k)] for i in range(n)]
    seed = [float(np.mean([ssim(before[i, s], before[i, t]) for s in range(k) for t in range(s + 1, k)]))
            if k > 1 else 0.0 for i in range(n)]
    rows = [{"ssim_to_original": round(float(np.mean(x)), 4), "seed_to_seed": round(y, 4)}
            for x, y in zip(same, seed)]
    out = {"prompts": n, "seeds": list(settings.seeds), "steps": settings.steps, "guidance": settings.guidance,
           "ssim_to_original": _spread([v for x in same for v in x]), "seed_to_seed": round(float(np.mean(seed)), 4),
           "changed": sum(r["ssim_to_original"] < r["seed_to_seed"] for r in rows)}
    if control is not None:
        rnd = [[ssim(before[i, s], control[i, s]) for s in range(k)] for i in range(n)]
        for r, x in zip(rows, rnd):
            r["random"] = round(float(np.mean(x)), 4)
        out["random_control"] = {"ssim_to_original": _spread([v for x in rnd for v in x]),
                                 "changed": sum(r["random"] < r["seed_to_seed"] for r in rows)}
    return out | {"rows": rows}


def _gone(was: list[dict], still: str) -> float:
    return sum(not r[still] for r in was) / len(was) if was else 1.0


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
    train = {p.id: load_image(p.image, size) for p in prompts if p.image is not None}
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
