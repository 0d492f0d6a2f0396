"""The demo as an original single-file checkpoint: converted, operated on, and loaded back by
diffusers' own `from_single_file` (local config, offline) with the same weights as the folder
surgery."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from nemo_surgery.plan import Plan
from nemo_surgery.surgery.apply import apply_plan
from nemo_surgery.surgery.convert import to_single_file
from nemo_surgery.surgery.keymap import diffusers_to_ldm
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
