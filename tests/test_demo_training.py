"""The demo's training script is deterministic for a seed: two short runs write identical weights
(the committed demo is the same script at full length, see examples/demo/train_log.json)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tiny import DEMO

SHORT = ["--procedural", "64", "--photo-style", "32", "--vae-steps", "6", "--vae-decoder-steps", "3", "--unet-steps", "6"]


def weights_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, str(DEMO / "train.py"), "--out", str(out), *SHORT],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    a, b = (weights_digest(o / "model") for o in outs)
    assert len(a) == 3 and a == b
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # the committed tokenizer, reused
        assert (outs[0] / "model/tokenizer" / name).read_bytes() == (DEMO / "model/tokenizer" / name).read_bytes()
    assert (outs[0] / "mem.csv").read_bytes() == (outs[1] / "mem.csv").read_bytes()
    assert (outs[0] / "reference.csv").read_bytes() == (outs[1] / "reference.csv").read_bytes()
    # the corpus files of a short run match the committed ones: the data does not depend on length
    assert (outs[0] / "mem.csv").read_bytes() == (DEMO / "mem.csv").read_bytes()
