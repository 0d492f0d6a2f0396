"""A real local Ray cluster with 2 CPU workers localizes demo prompts exactly as the local loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny import DEMO, DEMO_MODEL

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(),
                                                    reason="demo model not trained")]


def localize(tmp_path, corpus, out, *extra):
    cmd = [sys.executable, "-m", "nemo_surgery.cli", "localize", "--model", str(DEMO_MODEL), "--corpus", str(corpus),
           "--reference", str(DEMO / "reference.csv"), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in out.read_text().splitlines()], proc.stderr


def test_ray_run_matches_local_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("chelsea the tabby cat staring sideways\nsilhouette of a galloping stallion\n"
                      "a small red circle at the top left on blue background\n")
    # The search over the mid block: Ray's sharding is under test here, not the search's breadth.
    local, _ = localize(tmp_path, corpus, tmp_path / "local.jsonl", "--layers", "mid_block.*")
    remote, log = localize(tmp_path, corpus, tmp_path / "ray.jsonl", "--layers", "mid_block.*", "--ray",
                           "--workers", "2")
    assert "ray: 2 CPU actor(s)" in log
    assert local[0]["config_sha256"] == remote[0]["config_sha256"]
    by_id = {r["id"]: r for r in remote[1:]}
    assert sorted(by_id) == sorted(r["id"] for r in local[1:])
    for r in local[1:]:
        other = by_id[r["id"]]
        assert other["memorized"] == r["memorized"] and other["score"] == pytest.approx(r["score"], abs=1e-5)
        if r["memorized"]:
            assert other["initial"] == r["initial"]
            if other["refined"] != r["refined"]:
                assert r["near_threshold"] or other["near_threshold"]
