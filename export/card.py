"""The model card (`README.md` with hub front matter) of a release bundle.

Captions of memorized prompts describe training images the release is meant to stop
reproducing, so they appear only when the caller opts in (`include_prompts`); the corpus is
otherwise identified by its hash alone.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from .records import (BY_TYPE_HEADER, PAPER_ARXIV, PAPER_AUTHORS, PAPER_TITLE, PAPER_VENUE, ReleaseInfo, as_float,
                      by_type_rows, detection_rows, fmt, neurons_of, pct, releasable_text, removal_text,
                      section, verification_rows)

TAGS = ("stable-diffusion", "text-to-image", "nemo-surgery", "memorization-removal")
MAX_INDICES_SHOWN = 32  # per layer in the card; plan.json has them all
BY_TYPE_LEAD = ("By the corpus's prompt types, which the paper evaluates apart: verbatim (VM) memorization draws "
                "its one training image, template (TM) memorization a layout shared by many training images, of "
                "which the corpus names one:")

BIBTEX = """@inproceedings{hintersdorf2024nemo,
  title     = {Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models},
  author    = {Hintersdorf, Dominik and Struppek, Lukas and Kersting, Kristian and Dziedzic, Adam and Boenisch, Franziska},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  eprint    = {2406.02366},
  archivePrefix = {arXiv}
}"""


def _yaml_str(s: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: no value can break the front matter.
    return json.dumps(s, ensure_ascii=False)


def _cell(v: Any) -> str:
    """Text safe inside a Markdown table cell: hub cards render HTML, and a pipe or line break
    would split the table."""
    s = v if isinstance(v, str) else fmt(v)
    s = html.escape(s, quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return s.replace("`", "\\`")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _front_matter(info: ReleaseInfo) -> list[str]:
    lines = ["---"]
    if info.base_model:
        lines.append(f"base_model: {_yaml_str(info.base_model)}")
    if info.license:
        lines.append(f"license: {_yaml_str(info.license)}")
    lines += ["library_name: diffusers", "pipeline_tag: text-to-image", "tags:"]
    lines += [f"- {t}" for t in TAGS]
    return lines + ["---", ""]


def _what_was_done(info: ReleaseInfo) -> list[str]:
    n, layers = info.total_neurons(), info.layers()
    source = f"**{_cell(info.base_model or info.model_name)}**"
    return [
        "## What was done", "",
        f"This is {source} with **{n} neuron{'s' if n != 1 else ''}** in {len(layers)} cross-attention "
        "value projection(s) of the UNet (`attn2.to_v.weight`) set to zero. Each neuron is one output row "
        "of a value layer; zeroing it removes that feature from what the text prompt contributes to the "
        "image. Nothing else in the checkpoint was changed.", "",
        "The neurons were found with **NeMo** "
        f"({PAPER_AUTHORS}: *{PAPER_TITLE}*, {PAPER_VENUE}, [arXiv:{PAPER_ARXIV}](https://arxiv.org/abs/{PAPER_ARXIV})): "
        "for each prompt whose generations reproduce a training image, candidate neurons are selected by "
        "out-of-distribution activation on that prompt and refined to a minimal set that stops the "
        "memorization; the sets of all memorized prompts are merged into one plan.", "",
        *_own_sets(info),
        "```bibtex", BIBTEX, "```", "",
    ]


def _own_sets(info: ReleaseInfo) -> list[str]:
    """What the per-prompt searches actually found: the sentence above describes the method,
    and where no set stopped a prompt's memorization, the plan is made of the method's fallback."""
    searched = [r for r in info.memorized_results() if "refined" in r]
    if not searched:
        return []
    stopped = sum(bool(r.get("mitigated")) for r in searched)
    criterion = ((info.plan.get("settings") or {}).get("search") or {}).get("criterion", "published")
    test = ("the published test (each seed's first-step noise difference with the set blocked, against its "
            "own unblocked one)" if criterion == "published" else "the prompt's own memorization score")
    line = (f"Here {stopped} of {len(searched)} memorized prompts' searches found a set that stops the memorization "
            f"by {test}.")
    if stopped < len(searched):
        line += (" For the others the method keeps its fallback: the largest selection tried, refined to be no "
                 "worse than it. What the plan does is measured below (Verification).")
    return [line, ""]


def _what_was_removed(info: ReleaseInfo) -> list[str]:
    layers = info.layers()
    lines = ["## What was removed", ""]
    if not layers:
        return lines + ["No neurons: the plan is empty, the weights are those of the input model.", ""]
    rows = []
    for path, idx in sorted(layers.items()):
        shown = ", ".join(str(i) for i in idx[:MAX_INDICES_SHOWN])
        if len(idx) > MAX_INDICES_SHOWN:
            shown += f", ... ({len(idx) - MAX_INDICES_SHOWN} more in plan.json)"
        width = info.layer_width(path)
        rows.append([f"{path}", len(idx), width if width is not None else "n/a", shown])
    rows.append(["**total**", info.total_neurons(), "", ""])
    lines += _table(["Layer", "Neurons zeroed", "Layer width", "Indices"], rows)
    return lines


def _corpus(info: ReleaseInfo) -> list[str]:
    c = info.corpus()
    lines = ["## Corpus", ""]
    rows = [["sha256", str(c.get("sha256") or "n/a")], ["prompts", c.get("prompts")],
            ["memorized (detected)", c.get("memorized")]]
    lines += _table(["", ""], rows + detection_rows(info.verify))
    mem = info.memorized_results()
    if info.include_prompts and mem:
        lines += ["Memorized prompts (captions included at the publisher's request):", ""]
        lines += _table(["id", "caption", "score", "neurons", "mitigated by own set"],
                        [[str(r.get("id", "")), str(r.get("prompt", "")), r.get("score"), neurons_of(r),
                          r.get("mitigated")] for r in mem])
    elif mem:
        lines += ["The captions are not published here: they describe the training images this release is "
                  "meant to stop reproducing. The corpus is identified by its sha256.", ""]
    return lines


def _settings(info: ReleaseInfo) -> list[str]:
    lines = ["## Settings", ""]
    rows: list[list[Any]] = []
    seeds = info.seeds()
    if seeds is not None:
        rows.append(["scoring seeds", ", ".join(str(s) for s in seeds)])
    theta = info.theta_mem()
    if theta is not None:
        rows.append(["theta_mem (memorization threshold)", theta])
    if "min_mitigated" in info.verify:
        rows.append(["min share mitigated for release", info.verify["min_mitigated"]])
    if "min_preserved" in info.verify:
        rows.append(["min share of reference images preserved for release", info.verify["min_preserved"]])
    rows += [[k, v] for k, v in info.settings_rows()]
    if not rows:
        return lines + ["No settings recorded.", ""]
    return lines + _table(["Setting", "Value"], rows)


def _verification(info: ReleaseInfo) -> list[str]:
    v = info.verify
    rows = verification_rows(info)
    lines = ["## Verification", ""]
    lines += _table(["Check", "Result"], rows) if rows else ["No verification figures recorded.", ""]
    gen = [g for g in (v.get("generation") or []) if isinstance(g, dict)]
    if gen:
        lines += ["Generations from the same seeds before and after surgery: SSIM to the training image "
                  "(lower after is better) and diversity across seeds (1 - mean pairwise SSIM; higher after "
                  "means the model no longer draws one fixed image):", ""]
        lines += _table(["id", "SSIM to training image before", "after", "own image nearest before", "after",
                         "diversity before", "after"],
                        [[str(g.get("id", "")), g.get("ssim_train_before"), g.get("ssim_train_after"),
                          g.get("own_nearest_before"), g.get("own_nearest_after"),
                          g.get("diversity_before"), g.get("diversity_after")] for g in gen])
        gs = section(v, "generation_summary")
        if gs:
            lines += [f"Training images reproduced (own image nearest among the corpus's training images in "
                      f"more than half of {len(gs.get('seeds') or [])} seeds, {gs.get('steps')} steps, guidance "
                      f"{gs.get('guidance')}): {gs.get('reproduced_before')} before, {gs.get('reproduced_after')} "
                      f"after ({removal_text(gs)}).", ""]
            cp = gs.get("copies")
            if isinstance(cp, dict):
                lines += [f"Near-copies (in more than half of the seeds, the own image is nearest and the "
                          f"generation within SSIM {cp.get('ssim_to_reconstruction')} of it as the model's VAE "
                          f"reconstructs it): {cp.get('before')} before, {cp.get('after')} after. A reproduction "
                          f"that is not a near-copy is a degraded image still closer to its training image "
                          f"than to any other.", ""]
            rc = gs.get("random_control")
            if isinstance(rc, dict):
                copies = (f" (near-copies: the plan removes {pct(cp.get('removed_share'))}, random neurons "
                          f"{pct(rc.get('copies_removed_share'))})"
                          if isinstance(cp, dict) and "copies_removed_share" in rc else "")
                lines += [f"Control: the original with as many random neurons zeroed in the same layers "
                          f"({rc.get('neurons')}, seed {rc.get('seed')}) reproduces {rc.get('reproduced')}; the "
                          f"plan removes {pct(gs.get('removed_share'))} of the reproductions, random neurons "
                          f"{pct(rc.get('removed_share'))}{copies}. Removal above the control is what the plan's "
                          f"neurons do beyond any damage of the same size.", ""]
            if by_type_rows(gs):
                lines += [BY_TYPE_LEAD, ""] + _table(BY_TYPE_HEADER, by_type_rows(gs))
    pr = section(v, "preservation")
    if pr.get("prompts"):
        sto, rc = section(pr, "ssim_to_original"), section(pr, "random_control")
        lines += [f"Non-memorized prompts: {pr.get('prompts')} reference prompts sampled from the original and the "
                  f"cleaned model with the same {len(pr.get('seeds') or [])} seeds ({pr.get('steps')} steps, guidance "
                  f"{pr.get('guidance')}). SSIM of each cleaned image to the original's: mean {fmt(sto.get('mean'), 3)}, "
                  f"median {fmt(sto.get('median'), 3)}, lowest {fmt(sto.get('min'), 3)} (1 = unchanged). For "
                  f"scale, two seeds of the original for the same prompt: {fmt(pr.get('seed_to_seed'), 3)}"
                  + (f"; the original with as many random neurons zeroed: {fmt(section(rc, 'ssim_to_original').get('mean'), 3)}"
                     if rc else "")
                  + f". {pr.get('changed')} of {pr.get('prompts')} prompts moved further from the original than "
                  f"another seed is." + _own_prompt_text(pr), ""]
    return lines


def _own_prompt_text(pr: dict) -> str:
    if pr.get("own_prompt_nearest") is None:
        return ""
    rc = section(pr, "random_control")
    rand = f"; as many random neurons: {pct(rc['own_prompt_nearest'])}" if "own_prompt_nearest" in rc else ""
    return (f" Of the cleaned images, {pct(pr['own_prompt_nearest'])} are still nearest to their own prompt's "
            f"original image among the reference prompts' images for the same seed (the original: 100%{rand}; "
            f"chance {pct(pr.get('chance'))}). The seed's starting latents keep any prompt's image near the "
            f"original's, so this, not the SSIM, tells whether the model still draws what the prompt asks for; "
            f"the release gate holds it to the required share."
            + (f" The original keeps two prompts' images for one seed at SSIM {fmt(pr['prompt_to_prompt'], 3)} to "
               f"each other: the nearer that is to 1, the less change it takes to make an image nearer another "
               f"prompt's." if pr.get("prompt_to_prompt") is not None else ""))


def _release(info: ReleaseInfo) -> list[str]:
    v = info.verify
    mem = section(v, "memorized")
    text = releasable_text(v)
    lines = ["## Releasable", "", f"**{text}**", ""]
    why = []
    if "min_mitigated" in v and mem.get("share") is not None:
        why.append(f"{pct(mem.get('share'))} of memorized prompts mitigated (required: {pct(v['min_mitigated'])})")
    gs = section(v, "generation_summary")
    if "min_mitigated" in v and gs.get("prompts"):
        why.append(f"{pct(gs.get('removed_share'))} of training-image reproductions removed by full sampling "
                   f"(required: {pct(v['min_mitigated'])})" if gs.get("removed_share") is not None else
                   f"no training image reproduced by the original in full sampling; {gs.get('reproduced_after')} "
                   f"by the cleaned model (required: none)")
    pr = section(v, "preservation")
    if "min_preserved" in v:
        why.append(f"{pct(pr['own_prompt_nearest'])} of the reference prompts' images still nearest to their own "
                   f"prompt's original (required: {pct(v['min_preserved'])}; chance {pct(pr.get('chance'))})"
                   if pr.get("own_prompt_nearest") is not None else
                   "no reference prompt sampled in full, so the decision does not say whether their images are "
                   "still their own")
    if section(v, "weights"):
        why.append("weight check " + ("passed" if section(v, "weights").get("ok") else "failed"))
    if section(v, "equivalence"):
        why.append("masked and zeroed models " + ("identical" if section(v, "equivalence").get("exact")
                                                  else "not identical"))
    if why:
        lines += ["; ".join(why) + ".", ""]
    return lines


def _audit(info: ReleaseInfo) -> list[str]:
    lines = ["## Adversarial re-trigger audit", ""]
    if info.audit is None:
        return lines + ["Not run. No attempt was made to re-trigger the removed memorization with "
                        "optimized or perturbed prompt embeddings; see Limitations.", ""]
    a = info.audit
    st = a.get("settings") or {}
    lines += ["For each memorized prompt, a perturbation of its text embedding (L2 norm at most the budget times "
              "the embedding's norm) was optimized to make the cleaned model denoise towards the memorized image; "
              "the image counts as re-triggered when generations from the perturbed embedding are nearest to it "
              "in more than half of the seeds. Controls from the same run: the same attack on the original model, "
              "random perturbations of the same norm, and the attack towards images the model never trained on "
              "(what such an optimization can draw anyway).", ""]
    unp = a.get("unperturbed") or {}
    if unp:
        lines += [f"Without perturbation: {pct(as_float(unp.get('cleaned')))} re-triggered on the cleaned model, "
                  f"{pct(as_float(unp.get('original')))} on the original.", ""]
    lines += _table(["Budget", "Re-trigger rate (cleaned, attacked)", "Original, attacked", "Cleaned, random",
                     "Never-trained targets"],
                    [[b, pct(c), pct(o), pct(r), pct(n)] for b, c, o, r, n in info.audit_rows()])
    facts = []
    if a.get("memorized_targets") is not None:
        facts.append(f"{a['memorized_targets']} memorized targets, {a.get('control_targets', 0)} never-trained targets")
    if st:
        gen = st.get("generation") or {}
        facts.append(f"{st.get('steps')} attack steps, {len(gen.get('seeds') or [])} generation seeds, "
                     f"attack seed {st.get('seed')}")
    order = a.get("controls_in_order") or {}
    if order:
        bad = [b for b, ok in order.items() if ok is False]
        facts.append("controls in the expected order (original >= cleaned >= random) at every budget" if not bad
                     else f"controls NOT in the expected order at budget(s) {', '.join(bad)}")
    if facts:
        lines += ["; ".join(facts) + ". Every figure is in `audit.json`."]
    return lines + [""]


def _hardening(info: ReleaseInfo) -> list[str]:
    if not info.hardening:
        return []
    h = info.hardening
    st = h.get("settings") or {}
    lines = ["### Hardening", "",
             "The attacked embeddings that re-triggered a memorized image were localized as extra inputs "
             "(NeMo search on the original model), merged with the corpus's neuron sets, applied and audited "
             f"again, for at most {st.get('rounds')} round(s), stopping when the re-trigger rate stopped falling "
             f"or reference drift exceeded {pct(as_float(st.get('max_drift')))}. The figures above are those of "
             f"the round kept.", ""]
    lines += _table(["Round", "Neurons (+added / -removed)", "Adversarial inputs localized",
                     "Re-trigger rate (mean over budgets)", "Reference drift", "Reference images, SSIM to the "
                     "original's", ""],
                    [[r[0], r[1], r[2], pct(r[3]), pct(r[4]), fmt(r[5], 3), r[6]] for r in info.hardening_rows()])
    if h.get("stopped"):
        lines += [f"Stopped: {h['stopped']}. Every figure is in `harden.json`."]
    return lines + [""]


LIMITATIONS = [
    "## Limitations", "",
    "- Memorization can be less local than it looks. NeMo removes the neurons that are sufficient to stop the "
    "memorization *for the prompts and seeds tested*; other prompts, paraphrases or seeds may still reach "
    "the memorized image through other paths.",
    "- Perturbed or optimized text embeddings may re-trigger memorized images even when the plain prompts no "
    "longer do (see the audit section).",
    "- Only memorization that the detector flags in the corpus is addressed; training images not covered by "
    "the corpus are untouched.",
    "- Zeroing neurons changes the model for unrelated prompts as well; the reference-prompt figures above "
    "(first-step drift, and full sampling against the original's images) measure how much.",
    "",
]


def _provenance(info: ReleaseInfo) -> list[str]:
    return ["## Provenance", ""] + _table(["", ""], info.provenance_rows())


def render_model_card(info: ReleaseInfo) -> str:
    name = info.model_name
    lines = _front_matter(info)
    lines += [f"# {_cell(name)}: memorization neurons removed (NeMo)", ""]
    for part in (_what_was_done, _what_was_removed, _corpus, _settings, _verification, _release, _audit,
                 _hardening):
        lines += part(info)
    lines += LIMITATIONS
    lines += _provenance(info)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_model_card(path: Path, info: ReleaseInfo) -> None:
    """Write the hub model card (front matter + Markdown) to `path`, atomically."""
    write_text_atomic(Path(path), render_model_card(info))
