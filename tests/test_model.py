"""Model I/O: offline loading, value-layer discovery, pickle refusal, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from nemo_surgery.errors import NemoError
from nemo_surgery.model import discover_value_layers, load_model, select_layers
from tiny import DEMO_MODEL, save_tiny_pipeline, tiny_unet

OFFICIAL_SD1 = [f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_v" for i in range(3) for j in range(2)] + [
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model")


def test_pipeline_round_trip_loads_and_generates(tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    img = pipe("a small red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    m = load_model(tiny_dir)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(m.unet.state_dict()[k], v)


def test_discovery_sd1_layout_matches_paper_positions(tiny_dir):
    m = load_model(tiny_dir)
    paths = [v.path for v in m.value_layers]
    assert len(paths) == 16
    assert [v.path for v in select_layers(m.value_layers, "official")] == OFFICIAL_SD1
    assert paths[6] == OFFICIAL_SD1[6]  # data-flow order: down, mid, then up
    assert all(p.startswith("up_blocks.") for p in paths[7:])
    assert {v.in_features for v in m.value_layers} == {16}


@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="demo model not trained")
def test_discovery_on_demo_model():
    m = load_model(DEMO_MODEL, with_vae=False)
    assert len(m.value_layers) == 16
    assert [v.path for v in select_layers(m.value_layers, "official")] == OFFICIAL_SD1
    assert sum(v.out_features for v in select_layers(m.value_layers, "official")) == 384


def test_discovery_sd2_and_sdxl_shapes():
    sd2 = discover_value_layers(tiny_unet("sd2"))
    assert len(sd2) == 16 and {v.in_features for v in sd2} == {1024}
    xl = discover_value_layers(tiny_unet("sdxl"))
    # SDXL: no attention in the first down block; 2 transformer blocks per attention here.
    assert not any(v.path.startswith("down_blocks.0.") for v in xl)
    assert any(".transformer_blocks.1.attn2.to_v" in v.path for v in xl)
    assert {v.in_features for v in xl} == {2048}
    assert len(xl) == 2 * (2 + 2) + 2 + 2 * (3 + 3)  # down 2 blocks x 2 layers, mid, up 2 blocks x 3 layers


def test_layer_selection_globs_and_errors(tiny_dir):
    m = load_model(tiny_dir)
    assert len(select_layers(m.value_layers, "all")) == 16
    assert len(select_layers(m.value_layers, "up_blocks.1.*")) == 3
    assert len(select_layers(m.value_layers, "mid_block.*,down_blocks.0.*")) == 3
    with pytest.raises(NemoError, match="no value layer matches"):
        select_layers(m.value_layers, "nonsense.*")


def test_pickle_weights_refused_unless_allowed(tmp_path):
    d = save_tiny_pipeline(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(NemoError, match="pickle") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    m = load_model(d, allow_pickle=True)
    assert len(m.value_layers) == 16


def test_missing_part_and_corrupt_weights(tmp_path, tiny_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(NemoError, match="missing scheduler/"):
        load_model(broken)
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_dir, trunc)
    f = trunc / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(NemoError, match="truncated"):
        load_model(trunc)


def test_parts_that_do_not_fit_are_refused(tmp_path, tiny_dir):
    """An SDXL-style UNet (added text/size conditions), a UNet whose cross-attention width is not
    the text encoder's, an inpainting-style UNet, a UNet with dual cross-attention (whose blocks
    diffusers' own forward cannot run), a VAE of other latent channels, a text encoder
    shorter than the tokenizer's context: one line naming it when the model is loaded, not a shape error
    mid-run."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel

    inpaint = UNet2DConditionModel.from_config({**tiny_unet("sd1").config, "in_channels": 9})
    dual = tiny_unet("sd1", config={"dual_cross_attention": True})
    short = CLIPTextConfig.from_pretrained(tiny_dir / "text_encoder")
    short.max_position_embeddings = 64
    vae = AutoencoderKL.from_config({**AutoencoderKL.load_config(tiny_dir / "vae"), "latent_channels": 3})
    for name, part, module, match in (
            ("xl", "unet", tiny_unet("sdxl"), "addition_embed_type='text_time'"),
            ("mixed", "unet", tiny_unet("sd1", text_dim=24), r"text encoder's width \(16\).*width \(24\)"),
            ("inpaint", "unet", inpaint, "takes 9 input channels and predicts 4"),
            ("dual", "unet", dual, "dual cross-attention"),
            ("vae", "vae", vae, "VAE's 3 latent channels do not match the UNet's 4"),
            ("short", "text_encoder", CLIPTextModel(short), "pads prompts to 77 tokens but the text encoder holds 64")):
        d = tmp_path / name
        shutil.copytree(tiny_dir, d)
        shutil.rmtree(d / part)
        module.save_pretrained(d / part)
        with pytest.raises(NemoError, match=match):
            load_model(d)
    d = tmp_path / "no_length"  # a tokenizer that pads to no length of its own
    shutil.copytree(tiny_dir, d)
    cfg = d / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if "max_length" not in k}))
    with pytest.raises(NemoError, match="the tokenizer sets no model_max_length"):
        load_model(d)


def test_weights_saved_only_as_a_variant_load_as_saved(tmp_path, tiny_dir):
    """A folder saved with `save_pretrained(variant="fp16")` (the fp16 copies hub repositories ship)
    loads as it was saved, its stored dtype read from the file (diffusers upcasts on load), and its
    surgery writes the same layout, which loads again; two variants and no plain weight set are
    refused in one line."""
    import shutil

    from nemo_surgery.plan import Plan
    from nemo_surgery.surgery import apply_plan

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True, dtype=torch.float16)
    d = tmp_path / "fp16"
    pipe.save_pretrained(d, variant="fp16")
    assert (d / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (d / "unet" / "diffusion_pytorch_model.safetensors").exists()
    m = load_model(d)
    assert m.stored_dtype == "float16" and len(m.value_layers) == 16
    # the same values as the fp32 original, rounded to fp16
    ref = load_model(tiny_dir)
    path = m.value_layers[0].path
    assert torch.equal(m.to_v(path).weight, ref.to_v(path).weight.half().float())
    assert ref.stored_dtype == "float32"
    assert load_model(save_tiny_pipeline(tmp_path / "plain16", dtype=torch.float16)).stored_dtype == "float16"
    apply_plan(Plan(layers={path: [0, 3]}, model={"value_digest": m.value_digest}), d, tmp_path / "cleaned")
    assert sorted(f.name for f in (tmp_path / "cleaned" / "unet").iterdir()) == sorted(f.name for f in (d / "unet").iterdir())
    w = load_model(tmp_path / "cleaned").to_v(path).weight
    assert bool((w[[0, 3]] == 0).all()) and torch.equal(w[1:3], m.to_v(path).weight[1:3])
    two = tmp_path / "two"
    shutil.copytree(d, two)
    shutil.copy(two / "unet" / "diffusion_pytorch_model.fp16.safetensors", two / "unet" / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(NemoError, match="weights saved only as variants ema, fp16"):
        load_model(two)


def test_fingerprint_stable_and_sensitive_to_one_row(tmp_path, tiny_dir):
    import shutil

    a = load_model(tiny_dir)
    b = load_model(tiny_dir)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    edited = tmp_path / "edited"
    shutil.copytree(tiny_dir, edited)
    f = edited / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    key = "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight"
    sd[key][5] = 0
    save_file(sd, f, metadata={"format": "pt"})
    c = load_model(edited)
    assert c.fingerprint != a.fingerprint and c.value_digest != a.value_digest
    # the config is part of it too
    cfg = json.loads((edited / "unet" / "config.json").read_text())
    assert cfg["cross_attention_dim"] == 16
    # and the tokenizer, which decides the token ids the text encoder sees: a vocabulary with two
    # words swapped, or another padded length, is another model with the same weights
    tok = tmp_path / "tokenizer_edited"
    shutil.copytree(tiny_dir, tok)
    tj = tok / "tokenizer" / "tokenizer.json"
    spec = json.loads(tj.read_text())
    vocab = spec["model"]["vocab"]
    words = sorted(vocab, key=vocab.get)
    a_word, b_word = words[300], words[301]
    vocab[a_word], vocab[b_word] = vocab[b_word], vocab[a_word]
    tj.write_text(json.dumps(spec))
    d = load_model(tok)
    assert d.tokenizer.convert_tokens_to_ids(a_word) == vocab[a_word]  # the edit took
    assert d.fingerprint != a.fingerprint and d.value_digest == a.value_digest
    shutil.copytree(tiny_dir / "tokenizer", tok / "tokenizer", dirs_exist_ok=True)  # the vocabulary as it was
    tcfg = tok / "tokenizer" / "tokenizer_config.json"
    tcfg.write_text(json.dumps(json.loads(tcfg.read_text()) | {"model_max_length": 64}))
    e = load_model(tok)
    assert e.context == 64 and e.fingerprint not in (a.fingerprint, d.fingerprint)
