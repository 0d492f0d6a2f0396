"""A positive control: memorization planted in known value neurons (`bench/make_shape_model.py
--plant`), which the search must find (minutes: trains a small model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny import ROOT

pytestmark = pytest.mark.slow

PLANTED_PER_LAYER = 4


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "make_shape_model.py"), str(out), "--latent", "8",
                           "--steps", "1500", "--plant", str(PLANTED_PER_LAYER)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_planted_neurons_are_found(planted, tmp_path):
    """docs/demo.md, "A positive control": 12 neurons planted among the 192 of the searched layers
    (6 %); each caption's own set under the consistency criterion is 2-6 neurons, mostly planted."""
    truth = {(k, i) for k, rows in json.loads((planted / "planted.json").read_text()).items() for i in rows}
    assert len(truth) == 3 * PLANTED_PER_LAYER
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "nemo_surgery.cli", "localize", "--model", str(planted),
                           "--corpus", str(planted / "mem.csv"), "--reference", str(planted / "reference.csv"),
                           "--criterion", "consistency", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert len(recs) == 4 and all(r["memorized"] for r in recs)
    assert sum(r["mitigated"] for r in recs) >= 3
    union = set()
    for r in recs:
        found = {(k, i) for k, rows in r["refined"].items() for i in rows}
        assert 1 <= len(found) <= 8, found
        assert found & truth, (r["prompt"], found)
        union |= found
    # Chance would make 6 % of them planted.
    assert len(union & truth) >= 0.5 * len(union), (union, truth)
