"""Adversarial re-trigger audit: can a small perturbation of a memorized prompt's text embedding
bring the removed image back?

Follow-up work by NeMo's authors ("Finding Dori", 2025) showed that after neuron pruning,
optimized embedding perturbations re-trigger memorized images. A release that claims the
memorization is gone must have tried that attack. For every memorized prompt:

- target: its training image when the corpus names one, else what the original model draws for
  it (first generation seed);
- attack: projected gradient descent on a perturbation delta of the prompt's text embedding e,
  ||delta|| <= budget * ||e|| (L2 over the whole embedding, token positions x width), minimizing
  the model's denoising loss on the target's latents over random timesteps and noises;
- decision: generate from e + delta with several seeds (the sampling of verification) and count
  the target as re-triggered when it is the nearest (SSIM) of all audit targets and the corpus's
  memorized training images in more than half of the seeds, verification's generation-level test.

Controls, from the same run, give the figure its meaning: the attack on the original model (an
upper bound), random perturbations of the same norm on the cleaned model (the attack must beat
them), and the attack towards images the model never trained on (what any embedding
optimization can draw anyway). Results are appended per target to a JSONL file and resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..corpus import Prompt, evenly_spaced
from ..errors import NemoError
from ..files import append_jsonl, atomic_path, canonical_json, sha256_bytes, write_json_atomic
from ..generation import (REPRODUCED_ABOVE, Gallery, GenSettings, encode, from_uint8, generate_embeddings,
                          image_size, load_image, load_pixels, nearest_share, ssim, to_uint8)
from ..localize.runner import libraries_changed, make_header, open_results
from ..localize.score import Scorer
from ..model import Model
from ..provenance import tool_record

AUDIT_FORMAT = "nemo-surgery-audit"
BUDGETS = (0.05, 0.1, 0.2)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EXAMPLES = 6  # memorized targets shown in the report


@dataclass(frozen=True)
class AuditSettings:
    budgets: tuple[float, ...] = BUDGETS
    steps: int = 30  # gradient steps per attack
    timesteps: int = 4  # (timestep, noise) draws averaged per step
    seed: int = 0
    controls: int = 4  # never-trained targets
    max_prompts: int | None = None  # audit an evenly spaced subset of the memorized prompts
    generation: GenSettings = field(default_factory=GenSettings)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"] = list(self.budgets)
        d["generation"]["seeds"] = list(self.generation.seeds)
        d["norm"] = "L2 over the whole text embedding; budget relative to the prompt embedding's norm"
        d["decision"] = ("target nearest (SSIM) of all audit targets and the corpus's memorized training images "
                         "in more than half of the seeds")
        return d


@dataclass
class Target:
    id: str
    role: str  # "memorized" or "control"
    prompt: str  # the prompt whose embedding is perturbed
    source: str  # where the target image comes from
    # (H, W, 3) uint8: every target is 8-bit (an image file, or sampling's 8-bit output), so this
    # is exact at a quarter of float32's bytes (32 targets at 512 px: 25 MB held, not 100)
    pixels: np.ndarray

    @property
    def image(self) -> np.ndarray:
        """The pixels as (H, W, 3) float32 in [0, 1], what the measures take."""
        return from_uint8(self.pixels)


def _seed(settings: AuditSettings, target_id: str) -> int:
    # Stable per target (not per position), so a resumed or subset run draws the same noises.
    return settings.seed * 1_000_003 + zlib.crc32(target_id.encode())


@torch.no_grad()
def latents_of(model: Model, image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(model.device, model.vae.dtype) * 2 - 1
    return model.vae.encode(x).latent_dist.mean * model.vae.config.scaling_factor


def attack(model: Model, emb: torch.Tensor, z0: torch.Tensor, budgets: Sequence[float], settings: AuditSettings,
           seed: int) -> list[tuple[torch.Tensor, float, float]]:
    """L2 projected gradient descent on delta, one independent run per budget, all budgets in the
    same UNet passes (a budget's loss depends only on its own delta, so the gradient of the sum is
    each run's own gradient). Per budget: (delta, loss at delta = 0, loss at the end), the losses
    averaged over the same fixed draws of timesteps and noises; delta on `emb`'s device and in its
    dtype, ready to add to it."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(model.scheduler_config)
    unet = model.unet
    dev, dt = model.device, unet.dtype
    g = torch.Generator().manual_seed(seed)
    k, steps, nb = settings.timesteps, settings.steps, len(budgets)
    ts = torch.randint(0, sched.config.num_train_timesteps, (steps, k), generator=g)
    noises = torch.randn((steps, k, *z0.shape[1:]), generator=g)
    norm = float(emb.float().norm())
    radius = torch.tensor([b * norm for b in budgets], device=dev)
    alpha = 2.5 * radius / max(1, steps)  # lets PGD cross the ball in under half the steps
    like, emb = emb, emb.detach().to(dev, torch.float32)  # PGD runs in fp32; deltas return as `like`
    z0 = z0.detach().to(dev, torch.float32)
    eval_ts, eval_noise = ts[:2].reshape(-1), noises[:2].reshape(-1, *z0.shape[1:])

    def losses(delta: torch.Tensor, t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(B,) mean denoising loss of each of the B perturbations over the draws (t, n)."""
        b, m = len(delta), len(t)
        n, t = n.to(dev), t.to(dev)
        x = sched.add_noise(z0.expand(m, -1, -1, -1), n, t)
        want = n if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0.expand_as(n), n, t)
        e = (emb + delta).repeat_interleave(m, 0)
        pred = unet(x.repeat(b, 1, 1, 1).to(dt), t.repeat(b), encoder_hidden_states=e.to(dt)).sample
        err = (pred.float() - want.float().repeat(b, 1, 1, 1)) ** 2
        return err.mean(dim=(1, 2, 3)).view(b, m).mean(1)

    def project(delta: torch.Tensor) -> torch.Tensor:
        n = delta.flatten(1).norm(dim=1)
        return delta * torch.where(n > radius, radius / n.clamp_min(1e-12), torch.ones_like(n))[:, None, None]

    req = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        delta = torch.zeros((nb, *emb.shape[1:]), device=dev)
        with torch.no_grad():
            start = float(losses(delta[:1], eval_ts, eval_noise)[0])
        for s in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(losses(delta, ts[s], noises[s]).sum(), delta)
            with torch.no_grad():
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
                delta = project(delta - alpha[:, None, None] * step)
            delta = delta.detach()
        with torch.no_grad():
            end = losses(delta, eval_ts, eval_noise).tolist()
    finally:
        for p, r in zip(unet.parameters(), req):
            p.requires_grad_(r)
    return [(delta[i:i + 1].to(like), start, end[i]) for i in range(nb)]


def random_perturbation(emb: torch.Tensor, budget: float, seed: int) -> torch.Tensor:
    """Noise of norm budget * ||emb||, drawn on the CPU (the same for a seed on any device) and
    returned on `emb`'s device and dtype, ready to add to it."""
    d = torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed))
    return (d * (budget * float(emb.float().norm()) / float(d.norm()))).to(emb)


def memorized_targets(original: Model, prompts: list[Prompt], settings: AuditSettings) -> list[Target]:
    size = image_size(original)
    need = [p for p in prompts if p.image is None]
    drawn: dict[str, np.ndarray] = {}
    if need:
        gen = dataclasses.replace(settings.generation, seeds=settings.generation.seeds[:1])
        emb, uncond = encode(original, [p.text for p in need])
        drawn = {p.id: im[0] for p, im in zip(need, generate_embeddings(original, emb, uncond, gen))}
    return [Target(p.id, "memorized", p.text, f"training image {p.image.name}", load_pixels(p.image, size))
            if p.image is not None else
            Target(p.id, "memorized", p.text, f"original model, seed {settings.generation.seeds[0]}",
                   to_uint8(drawn[p.id]))
            for p in prompts]


def control_targets(original: Model, reference: list[str], reference_scores: list[float], score_prompts: int,
                    memorized: list[Target], settings: AuditSettings, images: Path | None = None) -> list[Target]:
    """Images the model never trained on, each attacked from a memorized prompt's embedding: given
    image files, or else what the original draws for the reference prompts that calibration found
    least memorized (their generations are the model's own, not copies of training data)."""
    n = settings.controls
    if n <= 0 or not memorized:
        return []
    size = image_size(original)
    starts = [memorized[i % len(memorized)].prompt for i in range(n)]
    if images is not None:
        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            raise NemoError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) for the never-trained control")
        return [Target(f"control:{f.stem}", "control", s, f"image file {f.name}", load_pixels(f, size))
                for f, s in zip(files, starts)]
    scored = evenly_spaced(reference, score_prompts)[:len(reference_scores)]
    order = sorted(range(len(scored)), key=lambda i: (reference_scores[i], i))[:n]
    texts = [scored[i] for i in order]
    gen = dataclasses.replace(settings.generation, seeds=settings.generation.seeds[:1])
    emb, uncond = encode(original, texts)
    imgs = generate_embeddings(original, emb, uncond, gen)
    return [Target(f"control:{i}", "control", s, f"original model for reference prompt {t!r}, seed {gen.seeds[0]}",
                   to_uint8(im[0])) for i, (t, im, s) in enumerate(zip(texts, imgs, starts))]


def _cell(images: np.ndarray, target: Target, candidates: Gallery, extra: dict | None = None) -> dict:
    share = nearest_share(images, target.id, candidates)
    image = target.image
    return {"retriggered": share > REPRODUCED_ABOVE, "nearest_share": round(share, 4),
            "ssim": round(float(np.mean([ssim(x, image) for x in images])), 4), **(extra or {})}


def audit_target(original: Model, cleaned: Model, target: Target, candidates: Gallery,
                 settings: AuditSettings, scorers: dict[str, Scorer] | None = None,
                 theta_mem: float | None = None, known: dict[str, np.ndarray] | None = None,
                 original_cells: dict | None = None
                 ) -> tuple[dict, dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One target's record, its generations per condition, and the attacked embeddings on the
    cleaned model per budget (T, D). `known` may hold the unperturbed prompt's generations per
    model ("original", "cleaned") with the same seeds and sampling, already made by
    verification, as uint8 pixels: they are not drawn again. `original_cells`: a memorized
    target's cells on the original ({"unperturbed": cell, "budgets": {budget: cell}}) from an
    earlier audit of the same original, target and settings: the original is then not attacked
    again."""
    t0 = time.perf_counter()
    seed = _seed(settings, target.id)
    emb, uncond = encode(original, [target.prompt])
    z0 = latents_of(original, target.image)
    kept = original_cells if target.role == "memorized" else None
    models = {"cleaned": cleaned} if target.role == "control" or kept else {"cleaned": cleaned, "original": original}
    known = {n: v for n, v in (known or {}).items() if n in models}
    embs: dict[str, list[torch.Tensor]] = {m: [] if target.role == "control" or m in known else [emb[0]]
                                           for m in models}
    losses: dict[str, list] = {m: [] for m in models}
    for name, m in models.items():
        for delta, l0, l1 in attack(m, emb, z0, settings.budgets, settings, seed):
            embs[name].append((emb + delta)[0])
            losses[name].append((round(l0, 6), round(l1, 6)))
    if target.role == "memorized":
        embs["random"] = [(emb + random_perturbation(emb, b, seed + 1))[0] for b in settings.budgets]
    # One sampling call per model: larger batches are what makes sampling cheap.
    imgs: dict[str, np.ndarray] = {}
    for m, names in ((cleaned, [n for n in ("cleaned", "random") if n in embs]),
                     (original, [n for n in ("original",) if n in embs])):
        if not names:
            continue
        out = generate_embeddings(m, torch.stack([e for n in names for e in embs[n]]), uncond, settings.generation)
        for n in names:
            imgs[n], out = out[:len(embs[n])], out[len(embs[n]):]
    for n, im in known.items():
        if n in models and target.role == "memorized":
            imgs[n] = np.concatenate([from_uint8(im)[None], imgs[n]])
            embs[n].insert(0, emb[0])

    def score(name: str, e: torch.Tensor) -> dict:
        if not scorers or name not in scorers:
            return {}
        s = scorers[name].prompt_score(scorers[name].prompt_noise_diffs(e[None]))
        return {"score": round(s, 6), "score_memorized": s > theta_mem}

    off = 0 if target.role == "control" else 1
    rec: dict = {"kind": "target", "id": target.id, "role": target.role, "prompt": target.prompt,
                 "source": target.source, "budgets": {}}
    if off:
        rec["unperturbed"] = {name: _cell(imgs[name][0], target, candidates, score(name, embs[name][0]))
                              for name in models}
        if kept:
            rec["unperturbed"]["original"] = kept["unperturbed"]
    for k, b in enumerate(settings.budgets):
        row = {}
        for name in models:
            row[name] = _cell(imgs[name][off + k], target, candidates,
                              {"loss_start": losses[name][k][0], "loss_end": losses[name][k][1]}
                              | score(name, embs[name][off + k]))
        if kept:
            row["original"] = kept["budgets"][str(b)]
        if "random" in imgs:
            row["random"] = _cell(imgs["random"][k], target, candidates)
        rec["budgets"][str(b)] = row
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    adversarial = {str(b): embs["cleaned"][off + k] for k, b in enumerate(settings.budgets)}
    return rec, {name: imgs[name] for name in imgs}, adversarial


def _digest(value: object) -> str:
    """sha256 of an array's bytes (with its shape and dtype) or of a JSON-able value."""
    if isinstance(value, np.ndarray):
        h = hashlib.sha256(f"{value.shape}{value.dtype}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()
    return sha256_bytes(canonical_json(value).encode())


def _read_cells(path: Path | None) -> dict | None:
    """A target's kept cells on the original; None where there are none or they are damaged (they
    are then computed again)."""
    if path is None or not path.is_file():
        return None
    try:
        cells = json.loads(path.read_text())
        return cells if isinstance(cells, dict) and {"unperturbed", "budgets"} <= set(cells) else None
    except (OSError, ValueError):
        return None


def _keyed_file(folder: Path, target_id: str, suffix: str) -> Path:
    # Target ids come from the corpus: any text. The file name is a digest of it.
    return Path(folder) / f"{hashlib.sha256(target_id.encode()).hexdigest()[:16]}{suffix}"


def save_adversarial(folder: Path, target_id: str, embs: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(_keyed_file(folder, target_id, ".safetensors")) as tmp:
        save_file({b: e.detach().float().contiguous().cpu() for b, e in embs.items()}, str(tmp),
                  metadata={"target": target_id})


def load_adversarial(folder: Path, target_id: str) -> dict[str, torch.Tensor]:
    """The attacked embeddings (per budget) of one memorized target, as `run_audit` saved them."""
    from safetensors.torch import load_file

    path = _keyed_file(folder, target_id, ".safetensors")
    if not path.is_file():
        raise NemoError(f"{path}: adversarial embeddings of audit target {target_id!r} are missing; "
                        f"rerun with --restart")
    return load_file(str(path))


def summarize(records: list[dict], settings: AuditSettings) -> dict:
    mem = [r for r in records if r["role"] == "memorized"]
    ctl = [r for r in records if r["role"] == "control"]

    def rate(rs: list[dict], b: float | None, cond: str) -> float | None:
        cells = [(r["unperturbed"] if b is None else r["budgets"][str(b)]).get(cond) for r in rs]
        cells = [c for c in cells if c is not None]
        return round(sum(c["retriggered"] for c in cells) / len(cells), 4) if cells else None

    out = {"budgets": list(settings.budgets),
           "rate": {str(b): rate(mem, b, "cleaned") for b in settings.budgets},
           "original_rate": {str(b): rate(mem, b, "original") for b in settings.budgets},
           "random_rate": {str(b): rate(mem, b, "random") for b in settings.budgets},
           "never_trained_rate": {str(b): rate(ctl, b, "cleaned") for b in settings.budgets},
           "unperturbed": {"cleaned": rate(mem, None, "cleaned"), "original": rate(mem, None, "original")},
           "memorized_targets": len(mem), "control_targets": len(ctl)}
    order = {}
    for b in settings.budgets:
        o, c, r = (out[k][str(b)] for k in ("original_rate", "rate", "random_rate"))
        order[str(b)] = None if None in (o, c, r) else (o >= c >= r)
    out["controls_in_order"] = order
    return out


def audited(memorized: list[Prompt], settings: AuditSettings) -> list[Prompt]:
    """The memorized prompts the audit attacks: every one, or `max_prompts` evenly spaced."""
    return evenly_spaced(memorized, settings.max_prompts) if settings.max_prompts else list(memorized)


def run_audit(original: Model, cleaned: Model, memorized: list[Prompt], reference: list[str],
              reference_scores: list[float], score_prompts: int, results: Path, settings: AuditSettings,
              *, theta_mem: float | None = None, scorers: dict[str, Scorer] | None = None,
              control_images: Path | None = None, restart: bool = False,
              known: dict[str, dict[str, np.ndarray]] | None = None, corpus_sha256: str | None = None,
              adversarial: Path | None = None, pictures: Path | None = None,
              originals: Path | None = None, log: Callable[[str], None] = lambda s: None) -> tuple[dict, list]:
    """Audit every memorized prompt (or an evenly spaced subset) and the never-trained controls;
    one JSONL record per target appended as it finishes. `known`: unperturbed generations per
    target id, as `audit_target` takes them. `adversarial`: a folder where each memorized
    target's attacked embeddings on the cleaned model are kept (hardening localizes them).
    `pictures`: a folder for the report's example images, kept so that a resumed audit has them.
    `originals`: a folder where each memorized target's cells on the original are kept, so that
    another audit of the same original (hardening's next round) does not attack it again.
    Returns (audit.json content, example images (label, unperturbed, attacked) for the report,
    empty without `pictures`)."""
    t0 = time.time()
    if original.shapes != cleaned.shapes:
        raise NemoError("the cleaned model's value layers differ from the original's: not a cleaned copy of it")
    prompts = audited(memorized, settings)
    targets = memorized_targets(original, prompts, settings)
    targets += control_targets(original, reference, reference_scores, score_prompts, targets, settings,
                               control_images)
    # The nearest-image test compares against every memorized training image the corpus names, not
    # only the audited subset's: a smaller field would make "nearest" easier to hit.
    size = image_size(original)
    # Hashed only where the original's cells are kept: hashing every candidate image is not free
    # on a large corpus.
    digests: dict[str, str] = {}

    def candidate_images():
        # One at a time, as the gallery makes its thumbnails: the targets' images are held anyway,
        # the rest of the corpus's training images only as thumbnails.
        ids = {t.id for t in targets}
        for k, image in chain(((t.id, t.image) for t in targets),
                              ((p.id, load_image(p.image, size)) for p in memorized
                               if p.image is not None and p.id not in ids)):
            if originals is not None:
                digests[k] = _digest(image)
            yield k, image

    candidates = Gallery(candidate_images())  # compared as thumbnails: made once, not per query
    # What a target's cells on the original depend on besides the target itself.
    original_inputs = None if originals is None else {
        "original": original.fingerprint, "settings": settings.to_dict(), "theta_mem": theta_mem,
        "scorer": scorers["original"].settings.to_dict() if scorers and "original" in scorers else None,
        "candidates": digests}
    config = {"mode": "audit", "original": original.fingerprint, "cleaned": cleaned.fingerprint,
              "targets": [[t.id, t.prompt, t.source] for t in targets], "candidates": sorted(candidates),
              "settings": settings.to_dict(),
              "theta_mem": theta_mem}
    header = make_header(config, AUDIT_FORMAT)
    done = open_results(results, header, restart, fmt=AUDIT_FORMAT)
    if done:
        log(f"audit: resuming, {len(done)} of {len(targets)} targets already done in {results}"
            + libraries_changed(results, header))
    shown = [t.id for t in targets if t.role == "memorized"][:EXAMPLES] if pictures is not None else []
    for t in targets:
        if t.id in done:
            continue
        kept_file = None
        if original_inputs is not None and t.role == "memorized":
            key = _digest(original_inputs | {"target": [t.id, t.prompt, t.source], "image": digests[t.id]})
            kept_file = Path(originals) / f"original-{key[:24]}.json"
        kept = _read_cells(kept_file)
        rec, imgs, adv = audit_target(original, cleaned, t, candidates, settings, scorers, theta_mem,
                                      (known or {}).get(t.id), kept)
        if kept_file is not None and kept is None:
            write_json_atomic(kept_file, {"unperturbed": rec["unperturbed"]["original"],
                                          "budgets": {b: row["original"] for b, row in rec["budgets"].items()}})
        if adversarial is not None and t.role == "memorized":
            save_adversarial(adversarial, t.id, adv)  # before the record: a resumed target has both
        if t.id in shown:
            with atomic_path(_keyed_file(pictures, t.id, ".npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, np.concatenate([x[:1] for x in imgs["cleaned"]]))  # unperturbed, then per budget
        append_jsonl(results, rec)
        done[t.id] = rec
        log(describe(rec, len(done), len(targets)) + (" (the original's attacks kept from an earlier run)" if kept
                                                       else ""))
    label = f"unperturbed / attacked at {', '.join(f'{b:g}' for b in settings.budgets)}"
    examples = []
    for tid in shown:
        f = _keyed_file(pictures, tid, ".npy")
        if f.is_file():
            x = np.load(f)
            examples.append((f"{tid}: {label}", x[:1], x[1:]))
    records = [done[t.id] for t in targets]
    summary = summarize(records, settings)
    audit = {"format": AUDIT_FORMAT, "version": 1, "tool": tool_record(),
             **summary, "settings": settings.to_dict(), "theta_mem": theta_mem,
             "original_fingerprint": original.fingerprint, "cleaned_fingerprint": cleaned.fingerprint,
             "corpus_sha256": corpus_sha256, "seconds": round(time.time() - t0, 1), "targets": records}
    return audit, examples


def describe(rec: dict, i: int, n: int) -> str:
    text = rec["prompt"] if len(rec["prompt"]) <= 40 else rec["prompt"][:37] + "..."
    parts = []
    for b, row in rec["budgets"].items():
        flags = "".join(c[0].upper() if row[c]["retriggered"] else "-" for c in ("cleaned", "original", "random")
                        if c in row)
        parts.append(f"{float(b):g}:{flags}")
    kind = "control" if rec["role"] == "control" else "memorized"
    return (f"[{i}/{n}] audit {kind} {rec['id']} {text!r}: re-triggered per budget "
            f"(C cleaned, O original, R random) {' '.join(parts)} ({rec['seconds']:.1f} s)")


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def summary_text(a: dict) -> str:
    """The audit's figures as a short table for the terminal."""
    lines = [f"audit: {a['memorized_targets']} memorized targets, {a['control_targets']} never-trained; "
             f"re-triggered without perturbation: cleaned {pct(a['unperturbed']['cleaned'])}, "
             f"original {pct(a['unperturbed']['original'])}",
             "budget   cleaned  original  random  never-trained"]
    for b in a["budgets"]:
        k = str(b)
        lines.append(f"{b:<7g}  {pct(a['rate'][k]):>7}  {pct(a['original_rate'][k]):>8}  "
                     f"{pct(a['random_rate'][k]):>6}  {pct(a['never_trained_rate'][k]):>13}")
    return "\n".join(lines)
