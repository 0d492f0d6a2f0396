"""A real local Ray cluster with 2 CPU workers localizes demo prompts exactly as the local loop,
also when one of its worker processes is killed mid-prompt, and prunes a plan as the local
merge does, in a build's hardening rounds too."""

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


def test_pruning_on_ray_takes_the_local_decisions(local):
    """The corpus pruning's passes dealt out over 2 actors of a real local cluster: every group's
    value is the local checker's, candidates of uneven group lists included, a worker killed
    between passes is replaced without changing a value, and the walk ends in the local pruning's
    set."""
    import dataclasses

    from nemo_surgery.corpus import read_corpus
    from nemo_surgery.engine import Runtime, make_engine, open_model
    from nemo_surgery.localize.distributed import RayPruning, RaySettings
    from nemo_surgery.localize.merge import _corpus_checker, blocked_scores, memorized_units, prune, union
    from nemo_surgery.localize.runner import make_header, open_results
    from nemo_surgery.localize.search import count
    from nemo_surgery.localize.settings import SearchSettings

    root, _ = local
    rt = Runtime()
    engine = make_engine(open_model(DEMO_MODEL, rt), DEMO / "reference.csv", rt,
                         search=SearchSettings(layers="mid_block.*"), cache_dir=root / "cache")
    corpus = read_corpus(root / "corpus.txt")
    done = open_results(root / "local.jsonl", make_header(engine.config(corpus, "localize")), restart=False)
    recs = [done[p.id] for p in corpus.prompts]
    # Their initial selections: over the mid block alone the refined sets come out small or empty.
    merged, counts = union([{"refined": r["initial"]} for r in recs if r["memorized"]])
    prompts = memorized_units(engine, recs)
    assert len(prompts) >= 2 and count(merged) > 0
    before = blocked_scores(engine, prompts, merged)
    # A bar above every blocked score: each prompt counts as mitigated, so neurons drop and the
    # walk's passes carry several candidates.
    engine.calibration = dataclasses.replace(engine.calibration, theta_mem=(max(before.values()) + 1) / 2)
    with engine.scorer.searching():
        expected = prune(engine, prompts, merged, counts, before)
    assert count(expected) < count(merged)
    said: list[str] = []
    with RayPruning(engine, DEMO_MODEL, RaySettings(workers=2), said.append, cache_dir=root / "cache") as shard:
        checker = _corpus_checker(engine, prompts, by_seed=True)
        remote = shard(checker)
        assert len(remote.actors) == 2
        n = len(checker.groups)
        half = {k: frozenset(sorted(v)[::2]) for k, v in merged.items()}
        sets, gids = [merged, {}, half, expected], [list(range(n)), [0], list(range(1, n, 2)), [n - 1, 0]]
        with engine.scorer.searching():
            want = checker.group_scores(sets, gids)
        got = remote.group_scores(sets, gids)
        assert [len(g) for g in got] == [len(g) for g in gids]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-5)
        # A worker killed between passes: its share of the next pass goes to a new one.
        dead = remote.actors[0]
        ray.kill(dead, no_restart=True)
        assert remote.group_scores(sets, gids) == got
        assert remote.actors[0] is not dead and any("pruning worker(s) died" in x for x in said), said
        assert prune(engine, prompts, merged, counts, before, shard=shard) == expected


def test_build_prunes_on_ray_in_every_hardening_round(tmp_path):
    """`build --ray --harden`: the first merge's pruning and each hardening round's run on actors,
    started for each merge and stopped after it; the bundle holds the kept round's plan."""
    from nemo_surgery.plan import Plan
    from nemo_surgery.surgery.verify import check_weights
    from tiny import CUT_DOWN_BUILD, cut_down_demo

    # As test_harden's build, pruned: round 1 has adversarial embeddings to localize and merge.
    data = cut_down_demo(tmp_path / "data", rows=(11, 13))
    out = tmp_path / "release"
    cmd = [sys.executable, "-m", "nemo_surgery.cli", "build", "--model", str(DEMO_MODEL),
           "--corpus", str(data / "mem.csv"), "--reference", str(data / "reference.csv"), "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), *[a for a in CUT_DOWN_BUILD if a != "--no-prune"],
           "--audit-prompts", "2", "--harden", "--harden-rounds", "1", "--ray", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads((out / "harden.json").read_text())["rounds"]
    assert len(rounds) == 2, proc.stderr[-3000:]
    assert proc.stderr.count("ray: 2 CPU actor(s) for the pruning") == 2, proc.stderr[-3000:]
    round_1 = proc.stderr.split("harden: round 1: localizing")[1]
    assert "ray: 2 CPU actor(s) for the pruning" in round_1 and "pruning: neurons ->" in round_1
    assert check_weights(DEMO_MODEL, out / "model", Plan.load(out / "plan.json")).ok
