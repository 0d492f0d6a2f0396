"""`report.html`: one self-contained page (inline CSS, inline SVG charts, images as data URIs)
that opens offline and from an archive, with nothing fetched from anywhere.

Charts are drawn here in a few lines of SVG rather than with a plotting library: the page must
not reference scripts or fonts, and the figures needed (bars, histogram, strip plot, lines) are simple.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..files import write_text_atomic
from .records import (BY_TYPE_HEADER, PAPER_ARXIV, PAPER_AUTHORS, PAPER_TITLE, PAPER_VENUE, ReleaseInfo,
                      by_type_rows, detection_rows, floats, fmt, neurons_of, pct, releasable_text,
                      removal_text, section, short_layer, verification_rows)

MIN_IMAGE_PX = 128  # small generations are enlarged (nearest neighbour) to at least this size
CHART_W = 640
COLORS = {"before": "#c0392b", "after": "#2471a3", "bar": "#5d6d7e", "threshold": "#222"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f6f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.15em .6em;border-radius:.3em;color:#fff;font-weight:600}
.yes{background:#1e8449}.no{background:#b03a2e}.unknown{background:#7f8c8d}
svg{display:block;margin:.5em 0;font-size:11px}svg text{fill:#333}
.grid{display:flex;flex-wrap:wrap;gap:1.2em}.pair{border:1px solid #ddd;padding:.5em;border-radius:.3em}
.pair img{image-rendering:pixelated;margin:1px}.row{display:flex;align-items:center;gap:.4em}
.row span{width:3.5em;font-size:.85em;color:#555}.muted{color:#666}code{font-size:.92em}
"""


def _e(v: Any) -> str:
    """Escaped text. `://` is written as a character reference so that no address in the data
    (a caption may contain one) reads as a link or a resource in the file."""
    s = v if isinstance(v, str) else fmt(v)
    return html.escape(s, quote=True).replace("://", "&#58;//")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(c: Any) -> str:
        numeric = isinstance(c, (int, float)) and not isinstance(c, bool)
        return f'<td class="n">{_e(c)}</td>' if numeric else f"<td>{_e(c)}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------- charts


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, t = [], start
    while t <= hi + step * 1e-9:
        out.append(round(t, 10))
        t += step
    return out


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(title)}"><title>{_e(title)}</title>{body}</svg>')


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, full_labels: Sequence[str] | None = None) -> str:
    """Horizontal bars, one per label; the value is written at the end of each bar."""
    if not labels:
        return '<p class="muted">No data.</p>'
    row, left, right, top = 18, 190, 50, 8
    h = top * 2 + row * len(labels)
    vmax = max(max(values), 1e-12)
    span = CHART_W - left - right
    parts = []
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * row
        w = max(0.0, span * v / vmax)
        tip = full_labels[i] if full_labels else lab
        parts.append(f'<g><title>{_e(tip)}: {_e(v)}</title>'
                     f'<text x="{left - 6}" y="{y + row * 0.7:.1f}" text-anchor="end">{_e(lab)}</text>'
                     f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{COLORS["bar"]}"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + row * 0.7:.1f}">{_e(v)}</text></g>')
    return _svg(CHART_W, h, "".join(parts), title)


def line_chart(xs: Sequence[float], series: Sequence[tuple[str, Sequence[float | None], str]], title: str,
               xlabel: str, ylabel: str) -> str:
    """Lines of shares in [0, 1] over a few x values (drawn at even spacing), with a legend."""
    series = [s for s in series if any(v is not None for v in s[1])]
    if not xs or not series:
        return '<p class="muted">No data.</p>'
    left, right, top, bottom, h = 56, 170, 12, 40, 240
    span_x, span_y = CHART_W - left - right, h - top - bottom

    def X(i: int) -> float:
        return left + (span_x * i / (len(xs) - 1) if len(xs) > 1 else span_x / 2)

    def Y(v: float) -> float:
        return top + span_y * (1 - v)

    parts = [f'<line x1="{left}" y1="{Y(0)}" x2="{left + span_x}" y2="{Y(0)}" stroke="#999"/>']
    for t in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:.0%}</text>'
                     f'<line x1="{left}" y1="{Y(t):.1f}" x2="{left + span_x}" y2="{Y(t):.1f}" stroke="#eee"/>')
    for i, x in enumerate(xs):
        parts.append(f'<text x="{X(i):.1f}" y="{Y(0) + 16:.1f}" text-anchor="middle">{_e(fmt(x))}</text>')
    for k, (name, vs, color) in enumerate(series):
        pts = [(X(i), Y(v)) for i, v in enumerate(vs) if v is not None]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>{_e(name)}</title></circle>'
                  for x, y in pts]
        ly = top + 14 + 18 * k
        parts.append(f'<line x1="{left + span_x + 12}" y1="{ly - 4}" x2="{left + span_x + 30}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2"/><text x="{left + span_x + 34}" y="{ly}">{_e(name)}</text>')
    parts.append(f'<text x="{left + span_x / 2}" y="{h - 6}" text-anchor="middle">{_e(xlabel)}</text>'
                 f'<text x="12" y="{top + span_y / 2}" transform="rotate(-90 12 {top + span_y / 2})" '
                 f'text-anchor="middle">{_e(ylabel)}</text>')
    return _svg(CHART_W, h, "".join(parts), title)


def histogram(values: Sequence[float], title: str, xlabel: str, integer: bool = True, max_bins: int = 30) -> str:
    """Vertical bars of counts; integer data gets one bin per value while that stays readable."""
    if not values:
        return '<p class="muted">No data.</p>'
    lo, hi = min(values), max(values)
    if integer and hi - lo + 1 <= max_bins:
        edges = [lo - 0.5 + k for k in range(int(hi - lo) + 2)]
    else:
        n = max(1, min(max_bins, int(math.sqrt(len(values))) + 1))
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = [lo + (hi - lo) * k / n for k in range(n + 1)]
    counts = [0] * (len(edges) - 1)
    for v in values:
        k = int(np.searchsorted(edges, v, side="right")) - 1
        counts[min(max(k, 0), len(counts) - 1)] += 1
    left, right, top, bottom, height = 40, 20, 10, 38, 200
    span_x, span_y = CHART_W - left - right, height - top - bottom
    cmax = max(counts)
    x0, x1 = edges[0], edges[-1]

    def X(v: float) -> float:
        return left + span_x * (v - x0) / (x1 - x0)

    def Y(c: float) -> float:
        return top + span_y * (1 - c / cmax)

    parts = [f'<line x1="{left}" y1="{Y(0)}" x2="{CHART_W - right}" y2="{Y(0)}" stroke="#999"/>']
    for k, c in enumerate(counts):
        if c:
            parts.append(f'<rect x="{X(edges[k]) + 1:.1f}" y="{Y(c):.1f}" width="{X(edges[k + 1]) - X(edges[k]) - 2:.1f}" '
                         f'height="{Y(0) - Y(c):.1f}" fill="{COLORS["bar"]}"><title>{_e(c)}</title></rect>')
    xt = _ticks(x0, x1) if not integer or x1 - x0 > 20 else [e + 0.5 for e in edges[:-1]]
    for t in xt:
        parts.append(f'<text x="{X(t):.1f}" y="{Y(0) + 14}" text-anchor="middle">{_e(fmt(t, 3))}</text>')
    for t in _ticks(0, cmax, 4):
        if float(t).is_integer():
            parts.append(f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{int(t)}</text>')
    parts.append(f'<text x="{left + span_x / 2}" y="{height - 4}" text-anchor="middle">{_e(xlabel)}</text>')
    return _svg(CHART_W, height, "".join(parts), title)


def strip_plot(groups: Sequence[tuple[str, Sequence[float], str]], threshold: float | None, title: str,
               xlabel: str = "memorization score") -> str:
    """One row of dots per group (name, values, colour) on a shared axis, with a dashed line at the
    threshold. Dots are spread vertically by a fixed sequence so the page is reproducible."""
    groups = [g for g in groups if g[1]]
    if not groups:
        return '<p class="muted">No scores recorded.</p>'
    vals = [v for _, vs, _ in groups for v in vs] + ([threshold] if threshold is not None else [])
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 0.05
    lo, hi = lo - pad, hi + pad
    row, left, right, top, bottom = 34, 170, 20, 10, 36
    h = top + bottom + row * len(groups)

    def X(v: float) -> float:
        return left + (CHART_W - left - right) * (v - lo) / (hi - lo)

    parts = []
    for i, (name, vs, color) in enumerate(groups):
        y = top + i * row
        parts.append(f'<text x="{left - 8}" y="{y + row / 2 + 4:.1f}" text-anchor="end">{_e(name)} (n={len(vs)})</text>'
                     f'<line x1="{left}" y1="{y + row / 2}" x2="{CHART_W - right}" y2="{y + row / 2}" stroke="#eee"/>')
        for k, v in enumerate(vs):
            jitter = ((k * 0.6180339887) % 1 - 0.5) * (row - 12)
            parts.append(f'<circle cx="{X(v):.1f}" cy="{y + row / 2 + jitter:.1f}" r="3" fill="{color}" '
                         f'fill-opacity="0.7"><title>{_e(v)}</title></circle>')
    axis_y = top + row * len(groups)
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{CHART_W - right}" y2="{axis_y}" stroke="#999"/>')
    for t in _ticks(lo, hi):
        parts.append(f'<text x="{X(t):.1f}" y="{axis_y + 14}" text-anchor="middle">{_e(fmt(t, 3))}</text>')
    if threshold is not None:
        parts.append(f'<line x1="{X(threshold):.1f}" y1="{top}" x2="{X(threshold):.1f}" y2="{axis_y}" '
                     f'stroke="{COLORS["threshold"]}" stroke-dasharray="4 3"/>'
                     f'<text x="{X(threshold) + 4:.1f}" y="{top + 9}">theta_mem = {_e(fmt(threshold))}</text>')
    parts.append(f'<text x="{left + (CHART_W - left - right) / 2}" y="{h - 4}" text-anchor="middle">{_e(xlabel)}</text>')
    return _svg(CHART_W, h, "".join(parts), title)


# ---------------------------------------------------------------- images


def png_data_uri(image: np.ndarray, min_px: int = MIN_IMAGE_PX) -> str:
    """A float [0, 1] (or uint8) HxWx3 / HxW array as a PNG data URI, enlarged by an integer
    factor with nearest neighbour so small generations stay crisp and visible."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.nan_to_num(a.astype(np.float32), nan=0.0).clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    img = Image.fromarray(a)
    scale = max(1, math.ceil(min_px / max(1, min(img.size))))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _samples(a: np.ndarray) -> list[np.ndarray]:
    """(S, H, W, C) -> S images; a single (H, W, C) or (H, W) image is accepted too."""
    a = np.asarray(a)
    return list(a) if a.ndim == 4 else [a]


def image_grid(images: Sequence[tuple[str, np.ndarray, np.ndarray]],
               rows: tuple[str, str] = ("before", "after")) -> str:
    if not images:
        return '<p class="muted">No generations recorded (no training images in the corpus, or no VAE).</p>'
    out = ['<div class="grid">']
    for label, before, after in images:
        out.append(f'<div class="pair"><div><b>{_e(label)}</b></div>')
        for name, arr in zip(rows, (before, after)):
            imgs = "".join(f'<img alt="{_e(label)} {name} {k}" src="{png_data_uri(x)}">'
                           for k, x in enumerate(_samples(arr)))
            out.append(f'<div class="row"><span>{name}</span>{imgs}</div>')
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


# ---------------------------------------------------------------- page


def _summary(info: ReleaseInfo) -> str:
    r = info.verify.get("releasable")
    cls = "yes" if r is True else "no" if r is False else "unknown"
    mem = section(info.verify, "memorized")
    rows = [["model", info.model_name], ["base model", info.base_model or "n/a"],
            ["neurons zeroed", info.total_neurons()], ["layers touched", len(info.layers())]]
    if mem:
        rows.append(["memorized prompts mitigated", f"{fmt(mem.get('mitigated'))} / {fmt(mem.get('prompts'))} "
                                                    f"({pct(mem.get('share'))})"])
    rows += detection_rows(info.verify)
    return (f'<p>Releasable: <span class="badge {cls}">{_e(releasable_text(info.verify))}</span></p>'
            + _table(["", ""], rows))


def _scores_section(info: ReleaseInfo) -> str:
    mem, ref = section(info.verify, "memorized"), section(info.verify, "reference")
    groups = [("memorized, before", floats(mem.get("scores_before")), COLORS["before"]),
              ("memorized, after", floats(mem.get("scores_after")), COLORS["after"]),
              ("reference, before", floats(ref.get("scores_before")), COLORS["before"]),
              ("reference, after", floats(ref.get("scores_after")), COLORS["after"])]
    theta = info.theta_mem()
    moved = ""
    if "score_mean_after" in ref and mem.get("auroc_after") is not None:
        # theta_mem was calibrated on the original; surgery moves never-memorized prompts' scores too
        moved = (f" Surgery moves every prompt's score: the reference prompts' mean went from "
                 f"{ref['score_mean_before']:.4f} to {ref['score_mean_after']:.4f}. Read without the line, the "
                 f"score tells memorized from reference prompts with AUROC {mem['auroc_before']:.3f} on the "
                 f"original and {mem['auroc_after']:.3f} after (0.5: not at all).")
    return ("<p>Memorization score of each prompt (mean over seeds) on the original and the cleaned model. "
            f"A prompt scoring above the dashed line counts as memorized.{_e(moved)}</p>"
            + strip_plot(groups, theta, "Memorization scores before and after"))


def _results_table(info: ReleaseInfo) -> str:
    if not info.results:
        return '<p class="muted">No per-prompt results recorded.</p>'
    header = ["id", "type", "score", "memorized", "neurons", "mitigated by own set", "seconds"]
    if info.include_prompts:
        header.insert(1, "prompt")
    rows = []
    for r in info.results:
        mem = bool(r.get("memorized"))
        row = [str(r.get("id", "")), str(r.get("type") or "-"), r.get("score"), mem,
               neurons_of(r) if mem else "-", r.get("mitigated") if mem else "-", r.get("seconds")]
        if info.include_prompts:
            row.insert(1, str(r.get("prompt", "")))
        rows.append(row)
    note = "" if info.include_prompts else ('<p class="muted">Captions are withheld (the release was built '
                                            'without including prompts).</p>')
    return note + _table(header, rows)


def _generation(info: ReleaseInfo) -> str:
    gen = [g for g in (info.verify.get("generation") or []) if isinstance(g, dict)]
    if not gen:
        return ""
    gs = info.verify.get("generation_summary")
    rc = gs.get("random_control") if isinstance(gs, dict) else None
    control = ""
    if isinstance(rc, dict):
        control = (f"<p>Training images reproduced: {_e(fmt(gs.get('reproduced_before')))} before, "
                   f"{_e(fmt(gs.get('reproduced_after')))} after ({_e(removal_text(gs))}); the original with as "
                   f"many random neurons zeroed in the same layers (control, seed {_e(fmt(rc.get('seed')))}): {_e(fmt(rc.get('reproduced')))}.</p>")
        cp = gs.get("copies")
        if isinstance(cp, dict):
            control += (f"<p>Near-copies (own image nearest and within SSIM {_e(fmt(cp.get('ssim_to_reconstruction')))} "
                        f"of its VAE reconstruction in more than half of the seeds): {_e(fmt(cp.get('before')))} "
                        f"before, {_e(fmt(cp.get('after')))} after; control: {_e(fmt(rc.get('copies')))}.</p>")
    if isinstance(gs, dict) and by_type_rows(gs):
        control += "<p>By prompt type:</p>" + _table(BY_TYPE_HEADER, by_type_rows(gs))
    return ("<h3>Generation measures</h3>"
            + _table(["id", "SSIM to training image before", "after", "diversity before", "after"],
                     [[str(g.get("id", "")), g.get("ssim_train_before"), g.get("ssim_train_after"),
                       g.get("diversity_before"), g.get("diversity_after")] for g in gen]) + control)


def _audit(info: ReleaseInfo) -> str:
    if info.audit is None:
        return "<p>Not run.</p>"
    rows = info.audit_rows()
    chart = line_chart([b for b, *_ in rows],
                       [("original, attacked", [r[2] for r in rows], COLORS["before"]),
                        ("cleaned, attacked", [r[1] for r in rows], COLORS["after"]),
                        ("cleaned, random", [r[3] for r in rows], COLORS["bar"]),
                        ("never-trained targets", [r[4] for r in rows], "#b9770e")],
                       "Re-trigger rate against perturbation budget", "budget (fraction of the embedding norm)",
                       "re-triggered")
    table = _table(["budget", "cleaned, attacked", "original, attacked", "cleaned, random", "never-trained"],
                   [[b, pct(c), pct(o), pct(r), pct(n)] for b, c, o, r, n in rows])
    examples = ""
    if info.audit_images:
        examples = ("<h3>Cleaned model: unperturbed and attacked (first seed, one image per budget)</h3>"
                    + image_grid(info.audit_images, ("unperturbed", "attacked")))
    return chart + table + examples


def _hardening(info: ReleaseInfo) -> str:
    rows = info.hardening_rows()
    if not rows:
        return ""
    chart = line_chart([r[0] for r in rows], [("re-trigger rate (mean over budgets)", [r[3] for r in rows],
                                               COLORS["after"]),
                                              ("reference drift", [r[4] for r in rows], COLORS["bar"])],
                       "Hardening rounds", "round", "share")
    return ("<h3>Hardening</h3>" + chart
            + _table(["round", "neurons (+added / -removed)", "adversarial inputs localized", "re-trigger rate",
                      "reference drift", "reference images, SSIM to the original's", ""],
                     [[r[0], r[1], r[2], pct(r[3]), pct(r[4]), fmt(r[5], 3), r[6]] for r in rows])
            + f"<p>Stopped: {_e((info.hardening or {}).get('stopped', ''))}</p>")


def _grid_note(info: ReleaseInfo) -> str:
    """How many of the measured prompts the pictures show (a corpus of hundreds is not pictured whole)."""
    gs = section(info.verify, "generation_summary")
    total, shown = gs.get("prompts"), gs.get("pictured")
    if not isinstance(total, int) or not isinstance(shown, int) or total <= shown:
        return ""
    return (f'<p class="muted">Pictured: {shown} of the {total} memorized prompts with a training image, evenly spaced '
            f"over the corpus; the figures of every one are in verify.json.</p>")


def _onnx(info: ReleaseInfo) -> str:
    reps = info.onnx_reports()
    if not reps:
        return ""
    rows = [[part, str(o.get("path", "")), o.get("bytes"), o.get("seconds"), o.get("opset"), o.get("max_abs_diff"),
             o.get("external_data"), str(o.get("onnxruntime", ""))] for part, o in reps.items()]
    return "<h3>ONNX export</h3>" + _table(
        ["part", "path", "bytes", "export s", "opset", "max abs diff vs torch", "external data", "onnxruntime"], rows)


def render_report(info: ReleaseInfo) -> str:
    layers = info.layers()
    names = sorted(layers)
    per_layer = bar_chart([short_layer(n) for n in names], [len(layers[n]) for n in names],
                          "Neurons zeroed per layer", full_labels=names)
    per_prompt = histogram(info.neurons_per_prompt(), "Neurons per memorized prompt",
                           "neurons in the prompt's refined set")
    settings = info.settings_rows()
    body = [
        f"<h1>{_e(info.model_name)}: memorization neurons removed (NeMo)</h1>",
        _summary(info),
        f'<p class="muted">Method: {_e(PAPER_AUTHORS)}, <i>{_e(PAPER_TITLE)}</i>, {_e(PAPER_VENUE)}, '
        f"arXiv {_e(PAPER_ARXIV)}.</p>",
        "<h2>Neurons removed</h2>", per_layer, per_prompt,
        _table(["layer", "neurons", "indices"], [[n, len(layers[n]), ", ".join(map(str, layers[n]))] for n in names]
               + [["total", info.total_neurons(), ""]]),
        "<h2>Scores before and after</h2>", _scores_section(info),
        "<h2>Generations before and after</h2>", _grid_note(info), image_grid(info.images), _generation(info),
        "<h2>Verification</h2>", _table(["check", "result"], verification_rows(info)), _onnx(info),
        "<h2>Adversarial re-trigger audit</h2>", _audit(info), _hardening(info),
        "<h2>Per-prompt results</h2>", _results_table(info),
        "<h2>Settings</h2>", _table(["setting", "value"], settings) if settings else "<p>None recorded.</p>",
        "<h2>Provenance</h2>", _table(["", ""], info.provenance_rows()),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(info.model_name)}: NeMo surgery report</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(path: Path, info: ReleaseInfo) -> None:
    """Write the self-contained HTML report to `path`, atomically."""
    write_text_atomic(Path(path), render_report(info))
