"""The corpus runner: detection and localization for every prompt of a corpus, one JSONL record
appended per prompt as soon as it is done, resumable, refusing to mix settings.

`process_prompt` is the unit of work; the local loop here and a Ray actor call the same function.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import __version__
from ..corpus import Corpus, Prompt
from ..errors import NemoError
from ..files import append_jsonl, canonical_json, read_jsonl, sha256_bytes
from ..model import Model, ValueLayer
from ..provenance import libraries, versions_changed
from .calibrate import Calibration
from .detect import detect
from .score import Scorer
from .search import Localizer
from .settings import SearchSettings

RESULTS_FORMAT = "nemo-surgery-results"


@dataclass
class Engine:
    """What every prompt of a run shares: the model, its scorer and calibration, the search."""

    model: Model
    scorer: Scorer
    calibration: Calibration
    layers: list[ValueLayer]
    search: SearchSettings

    @property
    def localizer(self) -> Localizer:
        return Localizer(self.scorer, self.calibration, self.layers, self.search)

    def config(self, corpus: Corpus, mode: str) -> dict:
        """Everything a result depends on; a resumed run must match it exactly."""
        return {
            "mode": mode,
            "model": {"fingerprint": self.model.fingerprint, "value_digest": self.model.value_digest},
            "corpus_sha256": corpus.sha256,
            "calibration": self.calibration.key(),
            "theta_mem": self.calibration.theta_mem,
            "score": self.scorer.settings.to_dict(),
            "search": self.search.to_dict() if mode == "localize" else None,
            "layers": [v.path for v in self.layers] if mode == "localize" else None,
        }


def process_prompt(engine: Engine, prompt: Prompt, localize: bool = True) -> dict:
    return process_embedding(engine, prompt.id, prompt.text, prompt.type, None, localize)


def process_embedding(engine: Engine, pid: str, text: str, ptype: str | None, emb: torch.Tensor | None,
                      localize: bool = True) -> dict:
    """Detection and localization of one input: a prompt (`emb` None: its text is encoded) or a
    prompt in embedding form (1, T, D), such as an adversarial embedding the audit found."""
    t0 = time.perf_counter()
    passes0 = engine.scorer.sample_passes
    if emb is None:
        emb = engine.scorer.embed([text])
    d = engine.scorer.prompt_noise_diffs(emb)
    det = detect(engine.scorer, d, engine.calibration.theta_mem)
    if localize:
        res = engine.localizer.localize(pid, text, ptype, emb, d, det)
        rec = res.to_record()
    else:
        rec = {"id": pid, "prompt": text, "type": ptype, **det.to_dict()}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["sample_passes"] = engine.scorer.sample_passes - passes0
    return {"kind": "prompt", **rec}


def open_results(path: Path, header: dict, restart: bool, fmt: str = RESULTS_FORMAT) -> dict[str, dict]:
    """Records already in `path` for the same configuration; a different one is refused unless
    `restart`, which starts the file afresh."""
    path = Path(path)
    if restart and path.exists():
        path.unlink()
    records = read_jsonl(path)
    if not records:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, header)
        return {}
    old = records[0]
    if old.get("kind") != "header" or old.get("format") != fmt:
        raise NemoError(f"{path}: not a {fmt} file; pass --restart to replace it")
    if old.get("config_sha256") != header["config_sha256"]:
        diff = sorted(k for k in header["config"] if old.get("config", {}).get(k) != header["config"][k])
        raise NemoError(f"{path}: was made with other settings ({', '.join(diff)} differ); "
                        f"pass --restart to discard it, or use another output")
    done: dict[str, dict] = {}
    for r in records[1:]:  # after the header, one record per finished unit (prompt, audit target)
        if "id" in r:
            done.setdefault(str(r["id"]), r)
    return done


def open_journal(path: Path, config: dict, fmt: str) -> tuple[dict[str, dict], bool]:
    """`open_results` for a journal: a cache of what its config determines, not a result to
    protect, so one made with another config (or unreadable) is started afresh instead of refused.
    Returns the records on file and whether the journal was started afresh."""
    header = make_header(config, fmt)
    try:
        return open_results(path, header, restart=False, fmt=fmt), False
    except NemoError:
        return open_results(path, header, restart=True, fmt=fmt), True


def results_libraries(path: Path) -> dict:
    """The library versions a results file was begun on, from its header ({} for a file written
    before versions were recorded)."""
    with open(path, "rb") as f:
        libs = json.loads(f.readline()).get("libraries")
    return libs if isinstance(libs, dict) else {}


def libraries_changed(path: Path, header: dict) -> str:
    """What a resumed file's first run ran on that this run does not ("" where nothing differs):
    the records go on mixing both, which can move decisions within float noise of a bar."""
    changed = versions_changed(results_libraries(path), header.get("libraries") or {})
    if not changed:
        return ""
    return (f"; begun on other library versions ({', '.join(changed)}): decisions within float noise of a bar "
            f"may differ from those a run on one version takes")


def make_header(config: dict, fmt: str = RESULTS_FORMAT) -> dict:
    # The libraries are recorded, not part of the config: a resumed file keeps the first run's.
    return {"kind": "header", "format": fmt, "version": 1, "tool": __version__, "libraries": libraries(),
            "config": config, "config_sha256": sha256_bytes(canonical_json(config).encode())}


def run_corpus(engine: Engine, corpus: Corpus, results: Path, *, localize: bool = True,
               restart: bool = False, log: Callable[[str], None] = lambda s: None,
               worker: Callable[[Iterable[Prompt]], Iterable[dict]] | None = None) -> list[dict]:
    """Run every prompt not yet in `results`; returns all records in corpus order."""
    header = make_header(engine.config(corpus, "localize" if localize else "detect"))
    done = open_results(results, header, restart)
    todo = [p for p in corpus.prompts if p.id not in done]
    if done:
        log(f"resuming: {len(done)} of {len(corpus.prompts)} prompts already done in {results}"
            + libraries_changed(results, header))
    n = len(corpus.prompts)
    stream = worker(todo) if worker else (process_prompt(engine, p, localize) for p in todo)
    for rec in stream:
        append_jsonl(results, rec)
        done[str(rec["id"])] = rec
        log(describe(rec, len(done), n))
    return [done[p.id] for p in corpus.prompts if p.id in done]


def records_digest(records: list[dict]) -> str:
    """sha256 over the records without their timings: the same results give the same digest
    however long they took, so a plan (and the weights it writes) is reproducible byte for byte."""
    stable = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    return sha256_bytes(canonical_json(stable).encode())


def unmet_criterion_note(records: list[dict], criterion: str) -> str | None:
    """A line for the log where no memorized prompt's search met the published criterion: every
    set then came from the fallback, refined against its own best score. On small models the
    reason is known (docs/demo.md, "A positive control"), and so is what to try."""
    mem = [r for r in records if r["memorized"] and "refined" in r]
    if criterion != "published" or not mem or any(r["mitigated"] for r in mem):
        return None
    best = [r["initial_score"] for r in mem]
    return (f"note: no memorized prompt's search met the published criterion: with its largest selection "
            f"blocked, a seed's noise difference stays at MS-SSIM {min(best):.2f}-{max(best):.2f} of its unblocked "
            f"self, against theta_mem {mem[0]['theta_mem']:.3f}, so every set is the fallback's. On small models a "
            f"seed's own noise keeps that similarity high even where memorization is local; --criterion "
            f"consistency tests the prompt's own score instead (docs/demo.md, \"A positive control\")")


def describe(rec: dict, i: int, n: int) -> str:
    text = rec["prompt"] if len(rec["prompt"]) <= 48 else rec["prompt"][:45] + "..."
    head = f"[{i}/{n}] {rec.get('type') or '-':2} {text!r}: score {rec['score']:.3f}"
    if not rec["memorized"]:
        return f"{head}, not memorized ({rec['seconds']:.1f} s)"
    if "refined" not in rec:
        return f"{head}, memorized on {len(rec['memorized_seeds'])} seeds ({rec['seconds']:.1f} s)"
    state = ("mitigated" if rec["mitigated"] else
             f"NOT mitigated (best {rec['blocked_score']:.3f}, theta_mem {rec['theta_mem']:.3f})")
    return (f"{head}, {rec['initial_neurons']} -> {rec['refined_neurons']} neurons, {state} "
            f"({rec['seconds']:.1f} s, {rec['sample_passes']} UNet samples)")
