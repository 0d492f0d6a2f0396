"""The record the model card and the HTML report are both written from, and the small readers
they share. Every reader tolerates missing keys: a bundle built without generation measures,
without an audit or from an older plan still gets a card and a report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..provenance import libraries_text

PAPER_TITLE = "Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models"
PAPER_AUTHORS = "Dominik Hintersdorf, Lukas Struppek, Kristian Kersting, Adam Dziedzic, Franziska Boenisch"
PAPER_VENUE = "NeurIPS 2024"
PAPER_ARXIV = "2406.02366"


@dataclass
class ReleaseInfo:
    model_name: str
    base_model: str | None
    license: str | None
    tool_version: str
    model_fingerprint: str
    plan: dict  # plan.json content
    plan_sha256: str
    results: list[dict]  # per-prompt localization records
    verify: dict  # verification figures; every key optional
    include_prompts: bool = False
    audit: dict | None = None
    # (label, before (S, H, W, 3) float in [0, 1], after (S, H, W, 3))
    images: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    # (label, unperturbed generation, attacked generations per budget) from the audit
    audit_images: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    hardening: dict | None = None  # harden.json content when --harden ran

    def hardening_rows(self) -> list[list[Any]]:
        """Per hardening round: round, neurons (+added/-removed), adversarial inputs localized,
        mean re-trigger rate, reference drift, reference images' SSIM to the original's, whether it
        was kept."""
        h = self.hardening or {}
        kept = h.get("kept_round")
        out = []
        for r in h.get("rounds") or []:
            if not isinstance(r, dict):
                continue
            first = not r.get("round")  # round 0: the plan from the corpus alone
            out.append([r.get("round"),
                        str(r.get("neurons")) if first else
                        f"{r.get('neurons')} (+{r.get('added', 0)} / -{r.get('removed', 0)})",
                        "-" if first else f"{r.get('localized', 0)} of {r.get('adversarial_inputs', 0)}",
                        as_float(r.get("mean_rate")), as_float(r.get("reference_drift")),
                        as_float(r.get("reference_ssim")), "kept" if r.get("round") == kept else ""])
        return out

    def layers(self) -> dict[str, list[int]]:
        raw = self.plan.get("layers") or {}
        return {str(k): sorted(int(r) for r in v) for k, v in raw.items() if isinstance(v, list)}

    def total_neurons(self) -> int:
        return sum(len(v) for v in self.layers().values())

    def layer_width(self, path: str) -> int | None:
        shape = ((self.plan.get("model") or {}).get("shapes") or {}).get(path)
        return int(shape[0]) if isinstance(shape, (list, tuple)) and shape else None

    def memorized_results(self) -> list[dict]:
        return [r for r in self.results if r.get("memorized")]

    def neurons_per_prompt(self) -> list[int]:
        return [neurons_of(r) for r in self.memorized_results()]

    def corpus(self) -> dict[str, Any]:
        """Corpus figures from the plan, filled in from the results where the plan lacks them."""
        c = dict(self.plan.get("corpus") or {})
        c.setdefault("prompts", len(self.results) if self.results else None)
        c.setdefault("memorized", len(self.memorized_results()) if self.results else None)
        return c

    def theta_mem(self) -> float | None:
        v = section(self.verify, "memorized").get("theta_mem")
        if v is None:
            v = (self.plan.get("check") or {}).get("theta_mem")
        return as_float(v)

    def seeds(self) -> list[int] | None:
        """Scoring seeds: recorded by verification, else derived from the score settings."""
        s = self.verify.get("seeds")
        if isinstance(s, list):
            return [int(x) for x in s]
        score = (self.plan.get("settings") or {}).get("score") or {}
        if isinstance(score.get("seeds"), int):
            base = int(score.get("seed_base", 0) or 0)
            return list(range(base, base + score["seeds"]))
        return None

    def settings_rows(self) -> list[tuple[str, str]]:
        """The plan's settings as dotted rows. Calibration scores with the search's own settings
        plus a few of its own, so its copies of them are not listed twice; its tool record goes to
        the provenance."""
        rows = [(k, v) for k, v in flatten(self.plan.get("settings") or {}) if not k.startswith("calibration.tool.")]
        search = dict(rows)
        inner = "calibration.score_settings."
        same = {k for k, v in rows if k.startswith(inner) and search.get("score." + k[len(inner):]) == v}
        kept = [(k, v) for k, v in rows if k not in same]
        return sorted(kept + [(inner + "*", "as score.* where not listed")] if same else kept)

    def libraries(self) -> list[tuple[str, dict]]:
        """(stage, library versions) of the runs behind the bundle: one entry where the
        calibration, the localization, the merge and the verification ran on the same software.
        The plan's tool record is the merge's; it names the localization's apart only where the
        results were found on other versions."""
        def libs(tool: Any, key: str = "libraries") -> Any:
            return tool.get(key) if isinstance(tool, dict) else None

        merge = self.plan.get("tool")
        stages = [("calibration", libs(((self.plan.get("settings") or {}).get("calibration") or {}).get("tool"))),
                  ("localization", libs(merge, "localization_libraries") or libs(merge)),
                  ("merge", libs(merge)), ("verification", libs(self.verify.get("tool")))]
        out: list[tuple[str, dict]] = []
        for stage, versions in stages:
            if isinstance(versions, dict) and versions and all(versions != seen for _, seen in out):
                out.append((stage, versions))
        return out

    def provenance_rows(self) -> list[list[str]]:
        seeds = self.seeds()
        rows = [["tool", f"nemo-surgery {self.tool_version}"],
                ["input model", self.model_name],
                ["input model fingerprint", self.model_fingerprint]]
        if self.verify.get("cleaned_fingerprint"):
            rows.append(["output model fingerprint", str(self.verify["cleaned_fingerprint"])])
        rows += [["plan sha256", self.plan_sha256],
                 ["corpus sha256", str(self.corpus().get("sha256") or "n/a")],
                 ["seeds", ", ".join(str(s) for s in seeds) if seeds is not None else "n/a"]]
        libs = self.libraries()
        if len(libs) == 1:
            rows.append(["libraries", libraries_text(libs[0][1])])
        else:
            rows += [[f"libraries ({stage})", libraries_text(versions)] for stage, versions in libs]
        return rows

    def audit_rows(self) -> list[tuple[Any, float | None, float | None, float | None, float | None]]:
        """(budget, cleaned, original, random perturbation, never-trained) re-trigger rates in the
        audit's budget order; JSON turns numeric keys into strings, so a budget is looked up both
        ways, and a missing figure is None."""
        if not self.audit:
            return []
        budgets = self.audit.get("budgets")
        if not isinstance(budgets, list):
            budgets = list(self.audit.get("rate") or {})

        def get(key: str, b: Any) -> float | None:
            m = self.audit.get(key) or {}
            return as_float(m.get(b, m.get(str(b)))) if isinstance(m, dict) else None

        return [(b, get("rate", b), get("original_rate", b), get("random_rate", b), get("never_trained_rate", b))
                for b in budgets]

    def onnx_reports(self) -> dict[str, dict]:
        """verify["onnx"] is one export report or a mapping of part -> report."""
        o = self.verify.get("onnx")
        if not isinstance(o, dict) or not o:
            return {}
        if "path" in o or "max_abs_diff" in o:
            return {str(o.get("part", "unet")): o}
        return {str(k): v for k, v in o.items() if isinstance(v, dict)}


def neurons_of(result: dict) -> int:
    n = result.get("refined_neurons")
    if isinstance(n, int):
        return n
    return sum(len(v) for v in (result.get("refined") or {}).values())


def section(d: dict | None, key: str) -> dict:
    v = (d or {}).get(key)
    return v if isinstance(v, dict) else {}


def as_float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def floats(values: Any) -> list[float]:
    if not isinstance(values, (list, tuple)):
        return []
    out = [as_float(v) for v in values]
    return [v for v in out if v is not None and math.isfinite(v)]


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers for people: fixed digits for ordinary magnitudes, scientific for tiny ones."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    f = as_float(v)
    if f is None:
        return str(v)
    if not math.isfinite(f):
        return str(f)
    if f == 0:
        return "0"
    if abs(f) < 10 ** -digits or abs(f) >= 1e6:
        return f"{f:.2e}"
    return f"{f:.{digits}f}".rstrip("0").rstrip(".")


def pct(v: Any) -> str:
    f = as_float(v)
    return "n/a" if f is None else f"{100 * f:.1f}%"


def flatten(d: Any, prefix: str = "", max_list: int = 12) -> list[tuple[str, str]]:
    """Nested settings as dotted (key, value) rows; long lists are summarised so a table of
    settings never embeds, say, every calibration score."""
    rows: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k in sorted(d, key=str):
            rows += flatten(d[k], f"{prefix}.{k}" if prefix else str(k), max_list)
    elif isinstance(d, (list, tuple)) and len(d) > max_list:
        rows.append((prefix, f"[{len(d)} values]"))
    elif isinstance(d, (list, tuple)):
        rows.append((prefix, "[" + ", ".join(fmt(x) for x in d) + "]"))
    else:
        rows.append((prefix, fmt(d)))
    return rows


def short_layer(path: str) -> str:
    """`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v` -> `down0.att1.tb0`: readable
    chart labels; tables keep the full path."""
    parts = path.split(".")
    out: list[str] = []
    names = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "attentions": "att",
             "transformer_blocks": "tb"}
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in names:
            nxt = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].isdigit() else ""
            out.append(names[p] + nxt)
            i += 2 if nxt else 1
        elif p in ("attn2", "to_v"):
            i += 1
        else:
            out.append(p)
            i += 1
    return ".".join(out) or path


def releasable_text(verify: dict) -> str:
    r = verify.get("releasable")
    return "yes" if r is True else "no" if r is False else "not decided"


def sampling_text(gs: dict, by_type: bool = True) -> str:
    """Full sampling's verdict in a few words, per prompt type too unless `by_type` is off. Where
    no memorized prompt has a training image, it says that nothing was measured rather than "0
    before, 0 after"."""
    if not gs.get("prompts"):
        return ("reproduction of training images not measured: no memorized prompt has a training image in "
                "the corpus, so the release decision rests on the score alone")
    per_type = by_type_text(gs) if by_type else ""
    return (f"training images reproduced {fmt(gs.get('reproduced_before'))} before, "
            f"{fmt(gs.get('reproduced_after'))} after ({removal_text(gs)})" + (f"; {per_type}" if per_type else ""))


def by_type_text(gs: dict) -> str:
    """"VM 9 before, 1 after (88.9% removed); TM 2 before, 2 after (0.0% removed)"; empty where the
    corpus gives no types."""
    return "; ".join(f"{t} {b} before, {a} after ({r})" for t, _, b, a, r, *_ in by_type_rows(gs))


TYPE_ORDER = ("VM", "TM")  # verbatim first, as the paper's tables
BY_TYPE_HEADER = ["type", "prompts", "reproduced before", "after", "removed", "near-copies before", "after",
                  "reproduced with as many random neurons"]


def by_type_rows(gs: dict) -> list[list[str]]:
    """Full sampling's figures per prompt type (VM, TM), rows under BY_TYPE_HEADER; none where
    the corpus gives no types."""
    rows = []
    by_type = section(gs, "by_type")
    for t in sorted(by_type, key=lambda t: (TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER), t)):
        d = by_type[t]
        if isinstance(d, dict):
            removed = "nothing to remove" if d.get("removed_share") is None else f"{pct(d['removed_share'])} removed"
            rows.append([str(t), fmt(d.get("prompts")), fmt(d.get("reproduced_before")), fmt(d.get("reproduced_after")),
                         removed, fmt(d.get("copies_before")), fmt(d.get("copies_after")),
                         fmt(d.get("random_reproduced"))])
    return rows


def removal_text(gs: dict) -> str:
    """"72.7% removed", or "nothing to remove" where the original reproduced none; with the prompts
    the cleaned model reproduces that the original did not, if any."""
    removed = (f"{pct(gs['removed_share'])} removed" if gs.get("removed_share") is not None
               else "nothing to remove")
    new = gs.get("appeared_after")
    return removed + (f"; {new} reproduced only after surgery" if new else "")


def preservation_text(pr: dict) -> str:
    """The non-memorized prompts' images in a few words: how often each is still nearest to its
    own prompt's original image (against random neurons and chance), and same-seed SSIM to the
    original's, against random neurons of the plan's size and another seed of the original."""
    mean = section(pr, "ssim_to_original").get("mean")
    rc = section(pr, "random_control")
    rand = f", as many random neurons {fmt(section(rc, 'ssim_to_original').get('mean'), 3)}" if rc else ""
    own = ""
    if pr.get("own_prompt_nearest") is not None:
        own_rand = f"as many random neurons {pct(rc['own_prompt_nearest'])}, " if "own_prompt_nearest" in rc else ""
        apart = (f"; two prompts' original images for one seed at SSIM {fmt(pr['prompt_to_prompt'], 3)}"
                 if pr.get("prompt_to_prompt") is not None else "")
        own = (f"{pct(pr['own_prompt_nearest'])} still nearest to their own prompt's original image among the "
               f"reference prompts' for the same seed ({own_rand}chance {pct(pr.get('chance'))}{apart}); ")
    return (f"non-memorized prompts' images: {own}SSIM to the original's {fmt(mean, 3)} (same seed; 1 = unchanged"
            f"{rand}; another seed of the original {fmt(pr.get('seed_to_seed'), 3)}), "
            f"{fmt(pr.get('changed'))} / {fmt(pr.get('prompts'))} changed beyond seed noise")


def detection_rows(verify: dict) -> list[list[Any]]:
    """The detection figures of a bundle (card and report), where it recorded them."""
    det = section(verify, "detection")
    if det.get("auroc_against_reference") is None:
        return []
    return [["detection AUROC against the reference prompts (corpus prompts as candidates)",
             det["auroc_against_reference"]],
            ["reference prompts above theta_mem (false positives at the bar)",
             f"{det.get('reference_above_theta_mem')} of {det.get('reference_prompts')}"]]


def verification_rows(info: ReleaseInfo) -> list[list[Any]]:
    """(check, result) rows shared by the card and the report, from whatever verify holds."""
    v = info.verify
    mem, ref = section(v, "memorized"), section(v, "reference")
    w, eq = section(v, "weights"), section(v, "equivalence")
    rows: list[list[Any]] = []
    if mem:
        rows.append(["memorized prompts mitigated",
                     f"{fmt(mem.get('mitigated'))} / {fmt(mem.get('prompts'))} ({pct(mem.get('share'))})"])
        if mem.get("auroc_after") is not None:
            rows.append(["detection AUROC, memorized against reference prompts",
                         f"{mem['auroc_before']:.3f} on the original, {mem['auroc_after']:.3f} after surgery (0.5: "
                         f"the score no longer tells them apart)"])
            rows.append([f"memorized prompts at or below the cleaned model's own bar (mean + 1 std of its reference "
                         f"prompts' scores: {mem['theta_mem_after']:.4f})",
                         f"{mem['below_theta_mem_after']} / {mem['prompts']}"])
    if ref:
        rows.append(["reference prompts changed beyond seed noise",
                     f"{fmt(ref.get('changed'))} / {fmt(ref.get('prompts'))} ({pct(ref.get('share'))})"])
        if "memorized_after" in ref:
            moved = (f" (surgery moves every prompt's score: their mean {ref['score_mean_before']:.4f} on the "
                     f"original, {ref['score_mean_after']:.4f} after)" if "score_mean_after" in ref else "")
            rows.append(["reference prompts above theta_mem after",
                         f"{ref['memorized_after']} / {fmt(ref.get('prompts'))}{moved}"])
    gs = section(v, "generation_summary")
    if mem.get("prompts") and gs:
        rows.append(["full sampling", sampling_text(gs)])
    pr = section(v, "preservation")
    if pr.get("prompts"):
        rows.append(["full sampling, reference prompts", preservation_text(pr)])
    if w:
        rows.append(["weight check", "passed" if w.get("ok") else "FAILED"])
        rows.append(["tensors checked", w.get("tensors_checked")])
        rows.append(["rows zeroed", w.get("rows_zeroed")])
        for p in (w.get("problems") or [])[:5]:
            rows.append(["weight problem", str(p)])
    if eq:
        rows.append(["max abs diff, masked original vs zeroed", eq.get("max_abs_diff")])
        rows.append(["identical", eq.get("exact")])
    for part, o in info.onnx_reports().items():
        rows.append([f"ONNX {part}: max abs diff vs torch", o.get("max_abs_diff")])
    return rows
