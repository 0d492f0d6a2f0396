"""Hardening (`build --harden`): the audit's re-triggering embeddings localized as extra inputs,
merged, re-applied and re-audited; the stop rules; the bundle's records of every round."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nemo_surgery.plan import Plan
from nemo_surgery.surgery.audit import save_adversarial
from nemo_surgery.surgery.harden import HardenSettings, rejected, retriggered, unlocalized
from tiny import CUT_DOWN_BUILD, DEMO_MODEL, cut_down_demo


def test_a_round_is_kept_only_when_the_rate_falls_within_the_drift_bound():
    s = HardenSettings(rounds=3, max_drift=0.1)
    prev = {"round": 1, "mean_rate": 0.5, "reference_drift": 0.02}
    assert rejected(prev, {"round": 2, "mean_rate": 0.25, "reference_drift": 0.1}, s) is None
    why = rejected(prev, {"round": 2, "mean_rate": 0.0, "reference_drift": 0.11}, s)
    assert why.startswith("round 2: reference drift") and "round 1 kept" in why
    why = rejected(prev, {"round": 2, "mean_rate": 0.5, "reference_drift": 0.0}, s)
    assert "stopped falling" in why and "round 1 kept" in why


def test_only_re_triggering_embeddings_become_inputs(tmp_path):
    embs = {"0.05": torch.randn(77, 16), "0.2": torch.randn(77, 16)}
    save_adversarial(tmp_path, "cat", embs)
    cell = {"retriggered": False}
    audit = {"targets": [
        {"id": "cat", "role": "memorized", "prompt": "a cat",
         "budgets": {"0.05": {"cleaned": cell}, "0.2": {"cleaned": {"retriggered": True}}}},
        {"id": "dog", "role": "memorized", "prompt": "a dog",  # nothing re-triggered: its file is never read
         "budgets": {"0.05": {"cleaned": cell}, "0.2": {"cleaned": cell}}},
        {"id": "control:0", "role": "control", "prompt": "a cat",
         "budgets": {"0.2": {"cleaned": {"retriggered": True}}}}]}
    got = retriggered(audit, tmp_path, 1)
    assert [(i, p) for i, p, _ in got] == [("adversarial:r1:cat:0.2", "a cat")]
    assert torch.equal(got[0][2][0], embs["0.2"])


def test_a_round_with_nothing_to_merge_says_why():
    flagged = {"memorized": True, "refined": {}}
    assert "none of the 2 re-triggering embeddings is memorized" in unlocalized(1, [{"memorized": False}] * 2)
    why = unlocalized(2, [flagged, {"memorized": False}])
    assert why.startswith("round 2: 1 of the 2") and "found no neurons" in why


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not trained")
def test_build_with_harden_on_demo(tmp_path):
    from nemo_surgery.export.records import fmt
    from nemo_surgery.surgery.verify import check_weights

    # The wall clock and the logo shirt (TM): the published plan does not hold them (even random
    # perturbations re-trigger them), and their attacks' embeddings are memorized on the original
    # model with non-empty neuron sets, so round 1 has work to do. (Searched in the mid block
    # alone, their sets come out empty and round 1 stops with `unlocalized`'s second reason.)
    data = cut_down_demo(tmp_path / "data", rows=(11, 13))
    out = tmp_path / "release"
    cmd = [sys.executable, "-m", "nemo_surgery.cli", "build", "--model", str(DEMO_MODEL),
           "--corpus", str(data / "mem.csv"), "--reference", str(data / "reference.csv"), "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), *CUT_DOWN_BUILD, "--audit-prompts", "2",
           "--harden", "--harden-rounds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h = json.loads((out / "harden.json").read_text())
    rounds = h["rounds"]
    assert rounds[0]["round"] == 0 and h["stopped"]
    plan = Plan.load(out / "plan.json")
    audit = json.loads((out / "audit.json").read_text())
    kept = rounds[h["kept_round"]]
    # The bundle is the kept round's: its plan, its audit, and weights that match that plan.
    assert plan.n_neurons == kept["neurons"] and audit["rate"] == kept["rate"]
    assert check_weights(DEMO_MODEL, out / "model", plan).ok
    assert rounds[0]["mean_rate"] > 0 and len(rounds) == 2, h["stopped"]
    r1 = rounds[1]
    assert r1["adversarial_inputs"] >= 1 and r1["localized"] >= 1
    # Unpruned, the merge is a union: round 1 only adds neurons.
    assert r1["added"] > 0 and r1["removed"] == 0 and r1["neurons"] == rounds[0]["neurons"] + r1["added"]
    assert h["adversarial_records"] and all(r["type"] == "adversarial" for r in h["adversarial_records"])
    assert h["kept_round"] == (1 if r1["mean_rate"] < rounds[0]["mean_rate"] and r1["reference_drift"] <= 0.1
                               else 0)
    assert "harden (round 1)" in proc.stderr and "audit (round 1)" in proc.stderr
    # Round 1 measures against the original's images round 0 sampled.
    round_1 = proc.stderr.split("harden (round 1)")[1]
    assert "(the original's images kept from an earlier run)" in round_1
    # ... and its audit reads the original's attacks round 0 made, instead of attacking it again.
    assert "(the original's attacks kept from an earlier run)" in round_1
    assert all(0 < r["reference_ssim"] <= 1 for r in rounds)
    card = (out / "README.md").read_text()
    assert "### Hardening" in card and h["stopped"] in card
    assert f"| {fmt(rounds[0]['reference_ssim'], 3)} |" in card
    assert "Hardening rounds" in (out / "report.html").read_text()
    assert "== harden" in proc.stderr
