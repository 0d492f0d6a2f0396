"""The command line: help and version, and bad input ending in one line, a non-zero exit, no
traceback and unchanged inputs."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from nemo_surgery.cli import main
from tiny import save_tiny_pipeline

COMMANDS = ["calibrate", "detect", "localize", "merge", "apply", "verify", "export", "audit", "curve", "build"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str) -> Result:
    """The command line's `main()` in this process (a new interpreter per call would cost seconds
    of imports each); the real process entry point is exercised by test_demo and test_crash.
    Anything escaping `main()` lands in stderr as a traceback, which the assertions reject."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "argv", ["nemo-surgery", *args]):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported as the traceback a user would see
            traceback.print_exc(file=err)
            code = 1
    return Result(code, out.getvalue(), err.getvalue())


def tree_hash(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


def assert_clean_error(proc: Result, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_version_and_help_on_every_command():
    from nemo_surgery import __version__

    assert __version__ in run("--version").stdout
    # Once as a real process: the module entry point, exit status and streams.
    proc = subprocess.run([sys.executable, "-m", "nemo_surgery.cli", "build", "--seeds", "x"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: nemo-surgery build:") and not proc.stdout
    for cmd in COMMANDS:
        proc = run(cmd, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout, cmd


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("cli") / "model")


def test_missing_model_and_bad_corpus(tmp_path, tiny_model):
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    proc = run("detect", "--model", str(tmp_path / "nope"), "--corpus", str(ref), "--reference", str(ref),
               "--out", str(tmp_path / "d.jsonl"))
    assert_clean_error(proc, "model not found")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"Caption;type\n\"unclosed;VM\n")
    before = tree_hash(bad)
    proc = run("detect", "--model", str(tiny_model), "--corpus", str(bad), "--reference", str(ref),
               "--out", str(tmp_path / "d.jsonl"))
    assert_clean_error(proc, str(bad))
    assert tree_hash(bad) == before
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_error(run("detect", "--model", str(tiny_model), "--corpus", str(empty), "--reference", str(ref),
                           "--out", str(tmp_path / "d.jsonl")), "empty")
    # onnxruntime runs the search in fp32 only
    proc = run("calibrate", "--model", str(tiny_model), "--reference", str(ref), "--backend", "onnxruntime",
               "--precision", "bf16", "--cache-dir", str(tmp_path / "cache"))
    assert_clean_error(proc, "--backend onnxruntime", "fp32")
    assert_clean_error(run("calibrate", "--model", str(tiny_model), "--reference", str(ref), "--backend", "tpu"),
                       "--backend")


def test_apply_refuses_foreign_plan_and_existing_out(tmp_path, tiny_model):
    plan = {"format": "nemo-surgery-plan", "version": 1,
            "layers": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": [0, 99]}}
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    before = tree_hash(tiny_model)
    assert_clean_error(run("apply", "--model", str(tiny_model), "--plan", str(p), "--out", str(tmp_path / "o")),
                       "out of range")
    plan["layers"] = {"down_blocks.9.attn2.to_v": [0]}
    p.write_text(json.dumps(plan))
    assert_clean_error(run("apply", "--model", str(tiny_model), "--plan", str(p), "--out", str(tmp_path / "o")),
                       "unknown layer")
    plan["layers"] = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": [1]}
    p.write_text(json.dumps(plan))
    out = tmp_path / "o"
    assert run("apply", "--model", str(tiny_model), "--plan", str(p), "--out", str(out)).returncode == 0
    assert_clean_error(run("apply", "--model", str(tiny_model), "--plan", str(p), "--out", str(out)), "exists")
    proc = run("verify", "--original", str(tiny_model), "--cleaned", str(out), "--plan", str(p))
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"]
    p.write_text("{not json")
    assert_clean_error(run("apply", "--model", str(tiny_model), "--plan", str(p), "--out", str(tmp_path / "o2")),
                       "not valid JSON")
    assert tree_hash(tiny_model) == before


def test_pickle_model_refused(tmp_path):
    d = save_tiny_pipeline(tmp_path / "pickled", safe_serialization=False)
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    assert_clean_error(run("calibrate", "--model", str(d), "--reference", str(ref)), "pickle")


def test_build_refuses_existing_output(tmp_path, tiny_model):
    out = tmp_path / "release"
    out.mkdir()
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    assert_clean_error(run("build", "--model", str(tiny_model), "--corpus", str(ref), "--reference", str(ref),
                           "--out", str(out)), "exists", "--force")


def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path, tiny_model, monkeypatch):
    """`--out` naming the model (with --force, build would replace it by the bundle), a folder
    holding it, a path inside it, the corpus (--restart would empty it) or the results merge reads:
    each is refused before anything is written, and the inputs stay as they were."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    corpus = tmp_path / "mem.txt"
    corpus.write_text("a red circle\na blue square\n")
    results = tmp_path / "results.jsonl"
    results.write_text("")
    images = tmp_path / "data"
    (images / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(images / "images" / "red.png")
    with_images = images / "mem.csv"
    with_images.write_text("caption,image\na red circle,images/red.png\n")
    before = {p: tree_hash(p) for p in (model, corpus, results, images)}
    common = ["--reference", str(corpus), "--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["build", "--model", str(model), "--corpus", str(corpus), "--out", str(model), "--force"], "model"),
        (["build", "--model", str(model), "--corpus", str(corpus), "--out", str(model / "release")], "model"),
        (["build", "--model", str(model), "--corpus", str(corpus), "--out", str(tmp_path), "--force"], "model"),
        (["build", "--model", str(model), "--corpus", str(with_images), "--out", str(images / "images"), "--force"],
         "training images"),
        (["detect", "--model", str(model), "--corpus", str(corpus), "--out", str(corpus), "--restart"], "corpus"),
        (["localize", "--model", str(model), "--corpus", str(corpus), "--out", str(model / "r.jsonl")], "model"),
        (["merge", "--model", str(model), "--corpus", str(corpus), "--results", str(results), "--out", str(results)],
         "results"),
        (["calibrate", "--model", str(model), "--out", str(corpus)], "reference prompts"),
        (["export", "--model", str(model), "--out", str(model)], "model"),
    ]
    for args, what in cases:
        extra = [] if args[0] == "export" else common
        assert_clean_error(run(*args, *extra), "output must lie outside the" if what != "training images"
                           else "must not hold the corpus's training images", what)
    # `--out .` has no name to hang the work folder on: it is resolved, not a traceback.
    monkeypatch.chdir(tmp_path)
    assert_clean_error(run("build", "--model", "model", "--corpus", str(corpus), "--out", ".", *common),
                       str(tmp_path), "model")
    assert {p: tree_hash(p) for p in before} == before
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("*.work"))


def test_build_refuses_a_checkpoint_it_could_not_edit_before_any_work(tmp_path, tiny_model):
    """A hub snapshot often holds the UNet twice (plain and an fp16 variant): surgery refuses to
    ship an unedited copy, and build says so before calibrating, not after hours of localization."""
    import shutil

    m = tmp_path / "two_sets"
    shutil.copytree(tiny_model, m)
    shutil.copy(m / "unet" / "diffusion_pytorch_model.safetensors", m / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    proc = run("build", "--model", str(m), "--corpus", str(ref), "--reference", str(ref), "--out", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path / "cache"))
    assert_clean_error(proc, "more than one UNet weight file", "remove variant files")
    assert "calibrat" not in proc.stderr + proc.stdout and not (tmp_path / "cache").exists()


def test_build_restart_discards_the_earlier_runs_work(tmp_path, tiny_model):
    """`--restart` starts over: every journal of the earlier run in DIR.work goes (some key on the
    model's fingerprint only); the cache, outside it, stays. Without it they are kept for resuming."""
    import shutil

    m = tmp_path / "two_sets"  # refused after the work folder is prepared: the test needs no full build
    shutil.copytree(tiny_model, m)
    shutil.copy(m / "unet" / "diffusion_pytorch_model.safetensors", m / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    work = tmp_path / "o.work"
    (work / "verify-images").mkdir(parents=True)
    (work / "verify.jsonl").write_text("{}\n")
    cache = tmp_path / "cache"
    (cache / "calibration").mkdir(parents=True)
    (cache / "calibration" / "kept").write_text("x")
    args = ["build", "--model", str(m), "--corpus", str(ref), "--reference", str(ref), "--out", str(tmp_path / "o"),
            "--cache-dir", str(cache)]
    assert_clean_error(run(*args), "more than one UNet weight file")
    assert sorted(p.name for p in work.iterdir()) == ["verify-images", "verify.jsonl"]
    assert_clean_error(run(*args, "--restart"), "more than one UNet weight file")
    assert list(work.iterdir()) == [] and (cache / "calibration" / "kept").exists()


def test_bad_flags_end_in_one_line():
    assert_clean_error(run("build", "--seeds", "x"), "nemo-surgery build", "--seeds")
    assert_clean_error(run("build"), "Missing option '--model'")
    assert_clean_error(run("audit", "--original", "a", "--cleaned", "b", "--corpus", "c", "--reference", "r",
                           "--audit-budgets", "0.1,x"), "--audit-budgets", "comma-separated")
    assert_clean_error(run("audit", "--original", "a", "--cleaned", "b", "--corpus", "c", "--reference", "r",
                           "--audit-budgets", "-0.1"), "positive")
    assert_clean_error(run("no-such-command"), "No such command")
    assert_clean_error(run("build", "--model", "m", "--corpus", "c", "--reference", "r", "--out", "o", "--no-audit",
                           "--harden"), "--harden needs the audit")
    # Neither theta_act nor k would move: the initial selection would never end.
    assert_clean_error(run("localize", "--model", "m", "--corpus", "c", "--reference", "r", "--theta-act-step", "0",
                           "--top-k-step", "0"), "both 0")
    assert_clean_error(run("merge", "--model", "m", "--corpus", "c", "--reference", "r", "--theta-act-step", "-1"),
                       "must not be negative")


def test_audit_refuses_a_model_that_is_not_a_cleaned_copy(tmp_path, tiny_model):
    other = save_tiny_pipeline(tmp_path / "other", seed=1, widths=(16, 16, 16, 16))  # value layers of another width
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red circle\n")
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"kind": "header"}) + "\n"
                       + json.dumps({"kind": "prompt", "id": "1", "memorized": True}) + "\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    args = ["audit", "--original", str(tiny_model), "--corpus", str(corpus), "--reference", str(ref),
            "--cache-dir", str(tmp_path / "cache"), "--calibration-prompts", "2", "--seeds", "2"]
    assert_clean_error(run(*args, "--cleaned", str(other), "--results", str(results), "--out", str(tmp_path / "a.json")),
                       "not a cleaned copy")
    assert_clean_error(run(*args, "--cleaned", str(tiny_model), "--results", str(tmp_path / "none.jsonl")),
                       "no such results file")
    results.write_text(json.dumps({"kind": "header"}) + "\n")
    assert_clean_error(run(*args, "--cleaned", str(tiny_model), "--results", str(results)), "no memorized prompts")


@pytest.fixture
def read_only_dir(tmp_path):
    """A really read-only folder: a read-only tmpfs (root ignores a folder's mode bits)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_read_only_output_location(read_only_dir, tmp_path, tiny_model):
    ref = tmp_path / "ref.txt"
    ref.write_text("a red circle\na blue square\n")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "nemo-surgery-plan", "version": 1,
                                "layers": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": [1]}}))
    before = tree_hash(tiny_model)
    assert_clean_error(run("build", "--model", str(tiny_model), "--corpus", str(ref), "--reference", str(ref),
                           "--out", str(read_only_dir / "release")), "Read-only file system", "release.work")
    assert_clean_error(run("apply", "--model", str(tiny_model), "--plan", str(plan), "--out",
                           str(read_only_dir / "cleaned")), "cleaned")
    assert_clean_error(run("detect", "--model", str(tiny_model), "--corpus", str(ref), "--reference", str(ref),
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(read_only_dir / "d.jsonl")),
                       "d.jsonl")
    assert tree_hash(tiny_model) == before and not list(read_only_dir.iterdir())


def test_defaults_reference_and_file_names(tmp_path, tiny_model, monkeypatch):
    """`--reference` is optional: calibration then runs on the bundled generic captions, says so,
    and records their hash like any reference file's. Outputs default to the README's file names
    in the working directory, and merge without results stops before calibrating."""
    from nemo_surgery.corpus import bundled_reference

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red circle\n")
    merge = run("merge", "--model", str(tiny_model), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"))
    assert_clean_error(merge, "results.jsonl: results file not found")
    assert not (tmp_path / "c").exists() and not (tmp_path / "plan.json").exists()
    proc = run("detect", "--model", str(tiny_model), "--corpus", str(corpus),
               "--seeds", "2", "--calibration-prompts", "4", "--backend", "torch", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["id"] for x in (tmp_path / "detections.jsonl").read_text().splitlines()[1:]] == ["1"]
    assert "reference: none given; calibrating on the 500 generic captions bundled" in proc.stderr
    # It ends with the detection figures, against the 4 reference prompts calibration scored.
    assert "; AUROC " in proc.stderr and " against 4 reference prompts, " in proc.stderr
    (cal,) = (tmp_path / "c").glob("calibration/*/calibration.json")
    meta = json.loads(cal.read_text())
    assert meta["n_reference"] == 500
    assert meta["reference_sha256"] == hashlib.sha256(bundled_reference().read_bytes()).hexdigest()


def test_curve_of_smaller_plans(tmp_path, tiny_model):
    """`curve` zeroes the plan's K most needed neurons for each K (and the whole plan) and measures
    each as verification does; K = 0 is the original itself."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("fox", "boat"):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    corpus = tmp_path / "mem.csv"
    corpus.write_text("caption,image,type\na red fox,fox.png,VM\na blue boat,boat.png,TM\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a quiet lake\nan old car\na sunny field\n")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "nemo-surgery-plan", "version": 1, "layers": {layer: [0, 1, 2, 3]},
                                "counts": {layer: {"0": 1, "1": 2, "2": 2, "3": 1}}}))
    out = tmp_path / "curve.json"
    args = ["curve", "--model", str(tiny_model), "--corpus", str(corpus), "--plan", str(plan), "--reference", str(ref),
            "--reference-images", "2", "--sample-steps", "2", "--sample-seeds", "2", "--out", str(out)]
    import nemo_surgery.surgery.verify as verify

    calls, real = [], verify.generate

    def generate(model, texts, settings, stop_at=None):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(model, texts, settings)

    with mock.patch.object(verify, "generate", generate):
        proc = run(*args, "--sizes", "0,2")
    assert proc.returncode == 0, proc.stderr
    # The original is sampled once for all sizes; then the cleaned model and the control per size.
    assert len(calls) == 1 + 2 + 2
    c = json.loads(out.read_text())
    rows = c["sizes"]
    assert [r["neurons"] for r in rows] == [0, 2, 4] and c["plan_neurons"] == 4 and c["reference_prompts"] == 2
    assert c["reference_sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert rows[0]["reference_ssim"] == 1.0 and rows[0]["reproduced_after"] == rows[0]["reproduced_before"]
    assert rows[0]["random_reference_ssim"] is None and rows[2]["random_reference_ssim"] is not None
    assert rows[0]["reference_own_prompt_nearest"] == 1.0 and rows[2]["random_reference_own_prompt_nearest"] is not None
    assert c["choice"]["min_mitigated"] == c["choice"]["min_preserved"] == 0.95 and "curve: " in proc.stderr
    assert all(r["prompts"] == 2 for r in rows) and "curve: 4 neurons: reproductions" in proc.stderr
    # Each size split by the prompts' types, as verification splits a release's figures.
    for r in rows:
        assert {t: v["prompts"] for t, v in r["by_type"].items()} == {"VM": 1, "TM": 1}
        assert sum(v["reproduced_after"] for v in r["by_type"].values()) == r["reproduced_after"]
    assert "curve, 4 neurons: sampled 4/4 prompts" in proc.stderr and "kept from an earlier run" in proc.stderr
    assert not (tmp_path / "curve.json.work").exists()
    # Sampling the original anew for each size measures the same.
    from nemo_surgery.corpus import evenly_spaced, read_corpus
    from nemo_surgery.generation import GenSettings
    from nemo_surgery.model import load_model
    from nemo_surgery.plan import Plan

    fresh = verify.removal_curve(*(load_model(tiny_model) for _ in range(2)), Plan.load(plan), [0, 2, 4],
                                 read_corpus(corpus).prompts,
                                 [p.text for p in evenly_spaced(list(read_corpus(ref).prompts), 2)],
                                 GenSettings(steps=2, seeds=(0, 1)))
    assert fresh["sizes"] == rows
    # Interrupted while sampling the second size, it resumes there: the first size and the
    # original are not sampled again.
    out.unlink()
    calls.clear()
    with mock.patch.object(verify, "generate", functools.partial(generate, stop_at=3)):
        assert run(*args, "--sizes", "0,2").returncode == 130 and not out.exists()
    calls.clear()
    with mock.patch.object(verify, "generate", generate):
        again = run(*args, "--sizes", "0,2")
    assert again.returncode == 0 and len(calls) == 2 + 2  # the cleaned model and the control for sizes 2 and 4
    assert "curve, 0 neurons: resuming: 1 of 1 chunks" in again.stderr and json.loads(out.read_text()) == c
    assert_clean_error(run(*args, "--sizes", "2,x"), "--sizes", "whole numbers")
    corpus.write_text("caption\na red fox\n")
    assert_clean_error(run(*args), str(corpus), "no prompt names a training image")
    corpus.write_text("caption,image\na red fox,fox.png\n")
    plan.write_text(json.dumps({"format": "nemo-surgery-plan", "version": 1, "layers": {layer: [99]}}))
    assert_clean_error(run(*args), "out of range")


def test_localize_then_merge_writes_the_plan(tmp_path, tiny_model):
    """`localize` then `merge`, as the README's step-by-step commands run them: plan.json in the
    issue's format, its neurons those of the results' refined sets; merged from results found on
    other library versions, the plan keeps theirs beside the merge's own."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red circle\na blue square\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a quiet lake\nan old car\na sunny field\na green hill\n")
    common = ["--model", str(tiny_model), "--corpus", str(corpus), "--reference", str(ref), "--seeds", "2",
              "--backend", "torch", "--theta-mem", "-1", "--cache-dir", str(tmp_path / "cache")]
    results, plan_path = tmp_path / "results.jsonl", tmp_path / "plan.json"
    proc = run("localize", *common, "--out", str(results))
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["header", "prompt", "prompt"] and all(r["memorized"] for r in recs[1:])
    proc = run("merge", *common, "--results", str(results), "--out", str(plan_path))
    assert proc.returncode == 0, proc.stderr
    assert "neurons in the union" in proc.stderr
    plan = json.loads(plan_path.read_text())
    assert plan["format"] == "nemo-surgery-plan" and plan["version"] == 1
    assert plan["corpus"]["prompts"] == 2 and plan["corpus"]["memorized"] == 2
    assert plan["corpus"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    refined = {(k, i) for r in recs[1:] for k, rows in r["refined"].items() for i in rows}
    planned = {(k, i) for k, rows in plan["layers"].items() for i in rows}
    assert refined and planned <= refined and plan["check"]["union_neurons"] == len(refined)
    assert "localization_libraries" not in plan["tool"]
    recs[0]["libraries"] |= {"torch": "0.0.1"}
    results.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run("merge", *common, "--results", str(results), "--out", str(plan_path)).returncode == 0
    again = json.loads(plan_path.read_text())
    assert again["tool"]["localization_libraries"]["torch"] == "0.0.1"
    assert again["tool"]["libraries"] == plan["tool"]["libraries"] and again["layers"] == plan["layers"]
