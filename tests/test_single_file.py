"""The demo as an original single-file checkpoint: converted, operated on, and loaded back by
diffusers' own `from_single_file` (local config, offline) with the same weights as the folder
surgery."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from nemo_surgery.errors import NemoError
from nemo_surgery.plan import Plan
from nemo_surgery.surgery.apply import apply_plan
from nemo_surgery.surgery.convert import to_single_file
from nemo_surgery.surgery.keymap import diffusers_to_ldm, layers_per_block_of
from tiny import DEMO_MODEL

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").exists(), reason="demo model not trained")

PLAN = Plan(layers={"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": [0, 5, 63],
                    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": [7],
                    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": [31]})


def test_single_file_surgery_matches_folder_surgery(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder_out = tmp_path / "folder"
    apply_plan(PLAN, DEMO_MODEL, folder_out)
    single = tmp_path / "cleaned.safetensors"
    res = apply_plan(PLAN, DEMO_MODEL, single, fmt="single")
    assert res.out == single and not list(tmp_path.glob(".nemo-tmp-*"))
    with safe_open(str(single), "pt") as f:
        key = diffusers_to_ldm("mid_block.attentions.0.transformer_blocks.0.attn2.to_v") + ".weight"
        assert f.get_tensor(key)[7].abs().sum() == 0
        assert "nemo_surgery.plan_sha256" in f.metadata()
    a = StableDiffusionPipeline.from_pretrained(folder_out, local_files_only=True)
    b = StableDiffusionPipeline.from_single_file(str(single), config=str(DEMO_MODEL), local_files_only=True,
                                                 safety_checker=None, requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        common = set(sa) & set(sb)
        assert len(common) >= 0.95 * len(sa), part
        for k in common:
            assert torch.equal(sa[k], sb[k].reshape(sa[k].shape)), (part, k)


def test_conversion_alone_round_trips(tmp_path):
    from diffusers import UNet2DConditionModel

    single = to_single_file(DEMO_MODEL, tmp_path / "demo.safetensors")
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    original = UNet2DConditionModel.from_pretrained(DEMO_MODEL / "unet", local_files_only=True)
    assert len([k for k in keys if k.startswith("model.diffusion_model.")]) == len(original.state_dict())


def test_a_single_file_model_needs_its_configs(tmp_path):
    from nemo_surgery.errors import NemoError
    from nemo_surgery.model import load_model

    single = to_single_file(DEMO_MODEL, tmp_path / "demo.safetensors")
    with pytest.raises(NemoError, match="--model-config"):
        load_model(single)
    with pytest.raises(NemoError, match="missing unet/config.json"):
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "model_index.json").write_text("{}")
        load_model(single, config=tmp_path / "cfg")
    m = load_model(single, config=DEMO_MODEL)
    folder = load_model(DEMO_MODEL)
    assert [v.path for v in m.value_layers] == [v.path for v in folder.value_layers]
    for v in m.value_layers:
        assert torch.equal(m.to_v(v.path).weight, folder.to_v(v.path).weight)
    assert m.stored_dtype == "float32"


@pytest.mark.slow
def test_build_from_a_single_file(tmp_path):
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline

    from nemo_surgery.surgery.verify import check_weights
    from tiny import CUT_DOWN_BUILD, cut_down_demo

    single = to_single_file(DEMO_MODEL, tmp_path / "demo.safetensors")
    before = single.read_bytes()
    data = cut_down_demo(tmp_path / "data")
    out = tmp_path / "release"
    cmd = [sys.executable, "-m", "nemo_surgery.cli", "build", "--model", str(single), "--model-config", str(DEMO_MODEL),
           "--corpus", str(data / "mem.csv"), "--reference", str(data / "reference.csv"), "--out", str(out),
           *CUT_DOWN_BUILD]
    # No --cache-dir: build keeps its calibration where every command does, so the next build reuses it.
    env = os.environ | {"NEMO_SURGERY_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "calibration").glob("*/calibration.json"))) == 1
    assert single.read_bytes() == before  # the input is only read
    cleaned = out / "model.safetensors"
    assert cleaned.is_file() and not (out / "model").exists()
    assert "model.safetensors" in (out / "SHA256SUMS").read_text()
    plan = Plan.load(out / "plan.json")
    assert plan.n_neurons > 0 and check_weights(single, cleaned, plan).ok
    # The same plan applied to the diffusers folder gives the same weights, as diffusers loads them.
    folder = apply_plan(plan, DEMO_MODEL, tmp_path / "folder").out
    a = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    b = StableDiffusionPipeline.from_single_file(str(cleaned), config=str(DEMO_MODEL), local_files_only=True,
                                                 safety_checker=None, requires_safety_checker=False)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k].reshape(sa[k].shape)) for k in sa if k in sb and "attn2.to_v" in k)
    with safe_open(str(cleaned), "pt") as f:
        assert f.metadata().get("nemo_surgery.plan_sha256") == plan.sha256()
    verify = __import__("json").loads((out / "verify.json").read_text())
    assert verify["weights"]["ok"] and verify["equivalence"]["exact"]


@pytest.mark.parametrize("layers", [1, 3])
def test_single_file_of_other_blocks_per_level(tmp_path, layers):
    """A single file carries no config: the layers per block its LDM keys imply (where the first
    downsampler sits) decide which module path each value weight is, so a plan made on the
    folder zeroes the same rows in the file, and verification reads them back."""
    from nemo_surgery.model import load_model
    from nemo_surgery.surgery.verify import check_weights
    from tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "m", layers=layers)
    model = load_model(folder)
    down, up = (f"down_blocks.1.attentions.{layers - 1}.transformer_blocks.0.attn2.to_v",
                f"up_blocks.2.attentions.{layers}.transformer_blocks.0.attn2.to_v")
    plan = Plan(layers={down: [1, 2], up: [0]}, model={"value_digest": model.value_digest})
    single = to_single_file(folder, tmp_path / "m.safetensors")
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    assert layers_per_block_of(keys) == layers
    cleaned = apply_plan(plan, single, tmp_path / "cleaned.safetensors").out
    with safe_open(str(single), "pt") as a, safe_open(str(cleaned), "pt") as b:
        for path, rows in plan.layers.items():
            key = diffusers_to_ldm(path, layers) + ".weight"
            before, after = a.get_tensor(key), b.get_tensor(key)
            assert before[rows].count_nonzero() > 0 and after[rows].count_nonzero() == 0
            before[rows] = 0
            assert torch.equal(before, after)
    check = check_weights(single, cleaned, plan)
    assert check.ok and check.rows_zeroed == 3, check.problems


def test_layers_per_block_that_differ_per_level_stay_a_folder(tmp_path):
    """diffusers takes one number of layers per level; the LDM layout numbers its slots with one
    count for all levels, so such a folder is refused as a single file in one line naming it, and
    nothing is left behind. A per-level tuple of one count converts like the plain number."""
    from nemo_surgery.model import load_model
    from tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "m", config={"layers_per_block": (1, 2, 2, 1)})
    model = load_model(folder)
    plan = Plan(layers={model.value_layers[0].path: [0]}, model={"value_digest": model.value_digest})
    out = tmp_path / "out.safetensors"
    with pytest.raises(NemoError, match=r"m/unet: .*layers_per_block=\(1, 2, 2, 1\).*diffusers folder"):
        apply_plan(plan, folder, out, fmt="single")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    even = save_tiny_pipeline(tmp_path / "even", config={"layers_per_block": (2, 2, 2, 2)})
    with safe_open(str(to_single_file(even, tmp_path / "even.safetensors")), "pt") as f:
        assert layers_per_block_of(list(f.keys())) == 2
