"""Integration tier: the bundled demo model, end to end (minutes). Runs in CI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from tiny import DEMO, DEMO_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(),
                                                    reason="demo model not trained")]


def auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "release"
    cmd = [sys.executable, "-m", "nemo_surgery.cli", "build", "--model", str(DEMO_MODEL), "--corpus",
           str(DEMO / "mem.csv"), "--reference", str(DEMO / "reference.csv"), "--out", str(out),
           "--cache-dir", str(root / "cache"), "--allow-partial",
           # A cut-down audit (the default attacks every memorized prompt at 3 budgets: minutes more).
           "--audit-prompts", "3", "--audit-budgets", "0.2", "--audit-steps", "10", "--audit-controls", "1",
           "--verify-reference-images", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_bundle_contents(bundle):
    out, log = bundle
    for name in ("model/model_index.json", "plan.json", "results.jsonl", "verify.json", "audit.json", "README.md",
                 "report.html", "SHA256SUMS"):
        assert (out / name).exists(), name
    assert "== verify" in log and "== localize" in log
    assert "no memorized prompt's search met the published criterion" in log  # docs/demo.md: none does
    assert "Here 0 of 13 memorized prompts' searches found a set that stops" in (out / "README.md").read_text()


def test_detection_on_demo(bundle):
    out, _ = bundle
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][1:]
    vm = [r for r in recs if r["type"] == "VM"]
    assert vm and all(r["memorized"] for r in vm), [r["prompt"] for r in vm if not r["memorized"]]
    verify = json.loads((out / "verify.json").read_text())
    ref_scores = verify["reference"]["scores_before"]
    mem_scores = [r["score"] for r in recs if r["memorized"] or r["type"] in ("VM", "TM")]
    assert auroc(mem_scores, ref_scores) >= 0.95
    # What the bundle itself reports: against all 100 reference prompts calibration scored.
    det = verify["detection"]
    assert det["reference_prompts"] == 100 and det["auroc_against_reference"] >= 0.95
    assert det["by_type"]["VM"]["memorized"] == det["by_type"]["VM"]["prompts"] == len(vm)
    assert det["false_positive_share"] < 0.2


def test_plan_verification_and_model_loads(bundle):
    from diffusers import StableDiffusionPipeline

    out, _ = bundle
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "nemo-surgery-plan" and plan["check"]["neurons"] <= plan["check"]["union_neurons"]
    verify = json.loads((out / "verify.json").read_text())
    assert verify["weights"]["ok"] and verify["equivalence"]["exact"]
    mem = verify["memorized"]
    # The plan lowers every memorized prompt's score on average; whether it gets below theta_mem is
    # what the releasable flag reports (the demo does not reach 95 %: see docs/demo.md).
    assert sum(mem["scores_after"]) < sum(mem["scores_before"])
    # The detector read on the cleaned model as its user would calibrate it: surgery raises the
    # reference prompts' scores (docs/demo.md: mean 0.189 -> 0.209), so theta_mem, taken on the
    # original, is read beside the cleaned model's own bar and the AUROC, which needs no bar.
    ref = verify["reference"]
    after = ref["scores_after"]
    bar = statistics.mean(after) + statistics.stdev(after)
    assert mem["theta_mem_after"] == pytest.approx(bar, abs=1e-5) == ref["theta_mem_after"]
    assert mem["below_theta_mem_after"] == sum(a <= mem["theta_mem_after"] for a in mem["scores_after"])
    assert mem["auroc_before"] == pytest.approx(auroc(mem["scores_before"], ref["scores_before"]), abs=1e-6)
    assert mem["auroc_after"] == pytest.approx(auroc(mem["scores_after"], after), abs=1e-6)
    assert mem["auroc_after"] < mem["auroc_before"]  # the plan brings them closer, if not below the bar
    assert ref["score_mean_after"] > ref["score_mean_before"]
    assert f"{mem['auroc_before']:.3f} on the original, {mem['auroc_after']:.3f} after" in (out / "README.md").read_text()
    gen = verify["generation_summary"]
    assert gen["reproduced_before"] >= 9  # the demo reproduces its photos before surgery
    # The control: as many random neurons in the same layers. The plan's own removal must not fall
    # below it (docs/demo.md, same draws and seeds: 8 of 11 removed against 6).
    rc = gen["random_control"]
    assert rc["neurons"] == plan["check"]["neurons"] and rc["seed"] == 0
    assert gen["removed_share"] >= rc["removed_share"] and rc["reproduced"] >= gen["reproduced_after"]
    assert f"reproduces {rc['reproduced']}; the plan removes" in (out / "README.md").read_text()
    # Near-copies (docs/demo.md: 9 before, the plan removes 9 of them, random neurons 6).
    cp = gen["copies"]
    assert cp["before"] >= 8 and cp["after"] <= rc["copies"]
    assert cp["removed_share"] >= rc["copies_removed_share"]
    # Split by type as the paper reports it (docs/demo.md, 50 steps: VM 9 -> 1, TM 2 -> 2): the plan
    # works on verbatim memorization, whose photos it was searched for, more than on the templates.
    bt = gen["by_type"]
    assert (bt["VM"]["prompts"], bt["TM"]["prompts"]) == (10, 3)
    for key in ("reproduced_before", "reproduced_after"):
        assert bt["VM"][key] + bt["TM"][key] == gen[key]
    assert bt["VM"]["removed_share"] >= gen["removed_share"]
    assert f"VM {bt['VM']['reproduced_before']} before, {bt['VM']['reproduced_after']} after" in \
        (out / "README.md").read_text()
    # Images of prompts the plan was not aimed at move (250 of 384 neurons of the searched layers go;
    # docs/demo.md: SSIM 0.49 to the original's over 16 prompts), about as much as under random neurons
    # of the plan's size, yet stay closer to the original's than another seed of the original is.
    pr = verify["preservation"]
    assert pr["prompts"] == 8 and pr["random_control"]["neurons"] == rc["neurons"]
    assert pr["seed_to_seed"] < pr["ssim_to_original"]["mean"] < 1 and pr["changed"] <= 2
    assert abs(pr["ssim_to_original"]["mean"] - pr["random_control"]["ssim_to_original"]["mean"]) < 0.15
    assert "Non-memorized prompts: 8 reference prompts" in (out / "README.md").read_text()
    assert 'alt="reference prompt 4 (not memorized) after 3"' in (out / "report.html").read_text()
    # Whether the images are still their own prompts' (nearest among the 8 prompts' originals for
    # the same seed): the plan leaves some, as random neurons of its size do (docs/demo.md).
    assert pr["chance"] == 0.125 and 0 < pr["own_prompt_nearest"] < 1 and 0 < pr["prompt_to_prompt"] < 1
    assert 0 < pr["random_control"]["own_prompt_nearest"] < 1
    assert verify["releasable"] == (mem["share"] >= verify["min_mitigated"]
                                    and gen["removed_share"] >= verify["min_mitigated"]
                                    and pr["own_prompt_nearest"] >= verify["min_preserved"])
    cond = verify["conditions"]
    assert cond["preserved"] == {"share": pr["own_prompt_nearest"], "required": 0.95,
                                 "met": pr["own_prompt_nearest"] >= 0.95}
    assert cond["removed_by_sampling"]["share"] == round(gen["removed_share"], 4)
    assert verify["releasable"] == all(c["met"] for c in cond.values())
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", local_files_only=True)
    img = pipe("a small red circle at the top left on blue background", num_inference_steps=5, height=64,
               width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_audit_in_bundle(bundle):
    out, log = bundle
    audit = json.loads((out / "audit.json").read_text())
    assert audit["memorized_targets"] == 3 and audit["control_targets"] == 1
    # The original reproduces its photos, so the attack on it must; the cleaned model may be
    # re-triggered, but an attack should do at least as well as random noise of the same norm.
    assert audit["original_rate"]["0.2"] >= 2 / 3
    assert audit["original_rate"]["0.2"] >= audit["rate"]["0.2"] >= audit["random_rate"]["0.2"]
    assert audit["controls_in_order"]["0.2"] is True
    assert all(t["budgets"]["0.2"]["cleaned"]["loss_end"] < t["budgets"]["0.2"]["cleaned"]["loss_start"]
               for t in audit["targets"])  # the attack optimizes
    card = (out / "README.md").read_text()
    rate = audit["rate"]["0.2"]
    assert f"| 0.2 | {100 * rate:.1f}% |" in card and "Never-trained targets" in card
    report = (out / "report.html").read_text()
    assert "Re-trigger rate against perturbation budget" in report and "== audit" in log


def test_refined_sets_are_specific_to_their_prompts(bundle):
    """NeMo's claim, in images: each memorized prompt sampled with its own refined set zeroed
    loses its training image more often than with as many random neurons in the same layers
    (docs/demo.md: 4 of 11 reproductions removed against 0 at 50 steps; at 10 steps 5 against 0)."""
    from nemo_surgery.corpus import read_corpus
    from nemo_surgery.generation import GenSettings
    from nemo_surgery.model import load_model
    from nemo_surgery.surgery.verify import own_set_specificity

    out, _ = bundle
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][1:]
    spec = own_set_specificity(load_model(DEMO_MODEL), read_corpus(DEMO / "mem.csv").prompts, recs,
                               GenSettings(steps=10))
    assert spec["prompts"] == 13 and spec["reproduced"] >= 9
    assert spec["removed_by_own_set"] >= spec["removed_by_random"] + 2
    mean = spec["own_nearest"]
    assert mean["own"] <= mean["random"] - 0.1 and mean["own"] < mean["original"]


def test_batched_engine_matches_plain_algorithm_on_demo(tmp_path):
    from nemo_surgery.corpus import read_corpus
    from nemo_surgery.engine import Runtime, make_engine, open_model
    from nemo_surgery.localize.detect import detect
    from nemo_surgery.localize.score import Scorer
    from reference_nemo import assert_differs_by_float_noise, first_divergence, plain_nemo

    model = open_model(DEMO_MODEL, Runtime())
    eng = make_engine(model, DEMO / "reference.csv", Runtime(), cache_dir=tmp_path)
    prompt = read_corpus(DEMO / "mem.csv").prompts[1]
    # The published algorithm on torch, as its code runs; the engine on what `auto` picks here.
    ref = plain_nemo(Scorer(model, eng.scorer.settings), eng.calibration, eng.layers, prompt.text, eng.search)
    emb = eng.scorer.embed([prompt.text])
    d = eng.scorer.prompt_noise_diffs(emb)
    got = eng.localizer.localize(prompt.id, prompt.text, prompt.type, emb, d, detect(eng.scorer, d, eng.calibration.theta_mem))
    assert got.initial == ref["initial"]
    if got.refined != ref["refined"]:
        assert_differs_by_float_noise(ref, got)
    else:
        assert first_divergence(ref["decisions"], got.decisions) is None
