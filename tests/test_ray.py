"""A real local Ray cluster with 2 CPU workers localizes demo prompts exactly as the local loop,
also when one of its worker processes is killed mid-prompt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import DEMO, DEMO_MODEL

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(),
                                                    reason="demo model not trained")]

PROMPTS = ["chelsea the tabby cat staring sideways", "silhouette of a galloping stallion",
           "a small red circle at the top left on blue background"]


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    # The search over the mid block: Ray's sharding is under test here, not the search's breadth.
    return [sys.executable, "-m", "nemo_surgery.cli", "localize", "--model", str(DEMO_MODEL),
            "--corpus", str(root / "corpus.txt"), "--reference", str(DEMO / "reference.csv"), "--out", str(out),
            "--cache-dir", str(root / "cache"), "--layers", "mid_block.*", *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    (root / "corpus.txt").write_text("\n".join(PROMPTS) + "\n")
    proc = subprocess.run(_cmd(root, root / "local.jsonl"), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, _records(root / "local.jsonl")


def _assert_same(local: list[dict], remote: list[dict]) -> None:
    assert local[0]["config_sha256"] == remote[0]["config_sha256"]
    by_id = {r["id"]: r for r in remote[1:]}
    assert sorted(by_id) == sorted(r["id"] for r in local[1:])
    assert len(remote) == len(local)  # no prompt lost or written twice
    for r in local[1:]:
        other = by_id[r["id"]]
        assert other["memorized"] == r["memorized"] and other["score"] == pytest.approx(r["score"], abs=1e-5)
        if r["memorized"]:
            assert other["initial"] == r["initial"]
            if other["refined"] != r["refined"]:
                assert r["near_threshold"] or other["near_threshold"]


def test_ray_run_matches_local_run(local):
    root, expected = local
    proc = subprocess.run(_cmd(root, root / "ray.jsonl", "--ray", "--workers", "2"), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray: 2 CPU actor(s)" in proc.stderr
    _assert_same(expected, _records(root / "ray.jsonl"))


def _busy_workers() -> list[int]:
    """Pids of Ray actor processes running a prompt (Ray titles them `ray::_Worker.run`)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                title = (d / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::_Worker.run"):
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_a_killed_worker_costs_only_its_prompt(local):
    root, expected = local
    err = root / "kill.log"
    with open(err, "w") as f:
        proc = subprocess.Popen(_cmd(root, root / "kill.jsonl", "--ray", "--workers", "2"), stderr=f,
                                stdout=subprocess.DEVNULL)
    try:
        victim, end = None, time.monotonic() + 600
        while victim is None and proc.poll() is None and time.monotonic() < end:
            busy = _busy_workers()
            victim = busy[0] if busy else None
            time.sleep(0.05)
        assert victim is not None, "no Ray worker was seen running a prompt:\n" + err.read_text()[-2000:]
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(900) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.read_text()
    assert "worker died on prompt" in log and "retrying on a new worker" in log, log[-2000:]
    _assert_same(expected, _records(root / "kill.jsonl"))
