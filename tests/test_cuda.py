"""The GPU path: the README's GPU flags (`--device cuda --precision fp16`) end to end on the demo,
and the batched engine against the plain published algorithm on CUDA. Skipped where torch sees no
CUDA device (CI has none); run `pytest tests/test_cuda.py` on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tiny import DEMO, DEMO_MODEL

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not trained")]


def test_build_on_cuda_fp16(tmp_path):
    out = tmp_path / "release"
    cmd = [sys.executable, "-m", "nemo_surgery.cli", "build", "--model", str(DEMO_MODEL), "--corpus",
           str(DEMO / "mem.csv"), "--reference", str(DEMO / "reference.csv"), "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), "--allow-partial", "--device", "cuda", "--precision", "fp16",
           "--audit-prompts", "3", "--audit-budgets", "0.2", "--audit-steps", "10", "--audit-controls", "1",
           "--sample-steps", "25"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][1:]
    assert all(r["memorized"] for r in recs if r["type"] == "VM")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["check"]["neurons"] > 0
    verify = json.loads((out / "verify.json").read_text())
    # Zeroed rows and masked outputs are both exact zeros, in fp16 as in fp32.
    assert verify["weights"]["ok"] and verify["equivalence"]["exact"]
    assert sum(verify["memorized"]["scores_after"]) < sum(verify["memorized"]["scores_before"])
    assert json.loads((out / "audit.json").read_text())["memorized_targets"] == 3


def test_batched_engine_matches_plain_algorithm_on_cuda(tmp_path):
    from nemo_surgery.corpus import read_corpus
    from nemo_surgery.engine import Runtime, make_engine, open_model
    from nemo_surgery.localize.detect import detect
    from nemo_surgery.localize.score import Scorer
    from reference_nemo import assert_differs_by_float_noise, plain_nemo

    rt = Runtime(device="cuda", batch_size=160)
    model = open_model(DEMO_MODEL, rt)
    eng = make_engine(model, DEMO / "reference.csv", rt, cache_dir=tmp_path)
    assert eng.scorer.settings.backend == "torch" and model.device.type == "cuda"
    assert not torch.backends.cudnn.allow_tf32  # fp32 means fp32, not TF32 convolutions
    for prompt in read_corpus(DEMO / "mem.csv").prompts[:3]:
        ref = plain_nemo(Scorer(model, eng.scorer.settings), eng.calibration, eng.layers, prompt.text, eng.search)
        emb = eng.scorer.embed([prompt.text])
        d = eng.scorer.prompt_noise_diffs(emb)
        got = eng.localizer.localize(prompt.id, prompt.text, prompt.type, emb, d,
                                     detect(eng.scorer, d, eng.calibration.theta_mem))
        assert got.initial == ref["initial"]
        if got.refined != ref["refined"]:
            assert_differs_by_float_noise(ref, got)
