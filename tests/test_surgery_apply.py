"""Surgery on real files: a tiny SD 1.x-shaped UNet saved by diffusers, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nemo_surgery import __version__
from nemo_surgery.errors import NemoError
from nemo_surgery.files import TMP_PREFIX
from nemo_surgery.model import discover_value_layers, value_digest
from nemo_surgery.plan import Plan
from nemo_surgery.safetensors_io import read_header
from nemo_surgery.surgery import apply_plan, diffusers_to_ldm, ldm_to_diffusers

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
P = "transformer_blocks.0.attn2.to_v"
# Runs at both ends of a layer and a lone row in the middle: exercises the byte arithmetic.
ROWS = {
    f"down_blocks.0.attentions.0.{P}": [0, 3, 7],
    f"down_blocks.2.attentions.1.{P}": [4, 5, 6, 15],
    f"mid_block.attentions.0.{P}": [1, 2],
    f"up_blocks.3.attentions.2.{P}": [7],
}


def tiny_unet(dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 16, 16), layers_per_block=2, cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4, sample_size=8)
    return unet.to(dtype).eval()


def digest_of(unet) -> str:
    return value_digest({v.path: unet.get_submodule(v.path).weight for v in discover_value_layers(unet)})


def make_folder(root: Path, dtype: torch.dtype = torch.float32, shard: str | None = None) -> tuple[Path, str]:
    unet = tiny_unet(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    unet.save_pretrained(root / "unet", **kw)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text('{"hidden_size": 4}\n')
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, root / "text_encoder" / "model.safetensors")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_bytes(b'{"a": 0}')
    return root, digest_of(unet)


def make_plan(digest: str | None = None, layers: dict | None = None) -> Plan:
    model = {"value_digest": digest} if digest else {}
    return Plan(layers=dict(ROWS if layers is None else layers), model=model)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def unet_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((folder / "unet").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so equality is bit for bit (-0.0 != +0.0, NaN == NaN)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def check_surgery(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], rows: dict[str, list[int]],
                  key=lambda name: f"{name}.weight") -> None:
    assert list(before) == list(after)
    planned = {key(n): r for n, r in rows.items()}
    for k, t in before.items():
        u = after[k]
        assert u.dtype == t.dtype and u.shape == t.shape, k
        if k not in planned:
            assert torch.equal(bits(t), bits(u)), k
            continue
        zero = planned[k]
        keep = [i for i in range(t.shape[0]) if i not in zero]
        assert bool((t[zero] != 0).any()), f"{k}: rows were already zero, the test proves nothing"
        assert bool((bits(u[zero]) == 0).all()), k  # exactly +0.0
        assert torch.equal(bits(t[keep]), bits(u[keep])), k


def check_meta(path: Path, plan: Plan, original: dict[str, str]) -> None:
    meta = read_header(path).metadata
    for k, v in original.items():
        assert meta[k] == v
    assert meta["nemo_surgery.plan_sha256"] == plan.sha256()
    assert meta["nemo_surgery.version"] == __version__
    assert json.loads(meta["nemo_surgery.zeroed"]) == {k: sorted(v) for k, v in plan.layers.items()}


def public_mode(path: Path, base: int) -> bool:
    """Outputs get the permissions of any new file, not the private mode of a temporary."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (path.stat().st_mode & 0o777) == base & ~mask


def no_temporaries(folder: Path) -> bool:
    return not any(p.name.startswith(TMP_PREFIX) for p in folder.iterdir())


# --- keymap --------------------------------------------------------------------------------------

def test_keymap_round_trip_all_value_layers():
    layers = [v.path for v in discover_value_layers(tiny_unet())]
    assert len(layers) == 16
    mapped = [diffusers_to_ldm(p) for p in layers]
    assert len(set(mapped)) == 16
    for p, k in zip(layers, mapped):
        assert k.startswith("model.diffusion_model.") and k.endswith(P)
        assert ldm_to_diffusers(k) == p
        assert ldm_to_diffusers(diffusers_to_ldm(p + ".weight")) == p + ".weight"
    expect = {
        "down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.0.attentions.1": "input_blocks.2.1",
        "down_blocks.1.attentions.0": "input_blocks.4.1", "down_blocks.2.attentions.1": "input_blocks.8.1",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.1.attentions.0": "output_blocks.3.1", "up_blocks.2.attentions.2": "output_blocks.8.1",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
    }
    for d, ldm in expect.items():
        assert diffusers_to_ldm(f"{d}.{P}.weight") == f"model.diffusion_model.{ldm}.{P}.weight"
    assert diffusers_to_ldm("down_blocks.1.attentions.0.x", layers_per_block=1) == "model.diffusion_model.input_blocks.3.1.x"
    assert ldm_to_diffusers("model.diffusion_model.output_blocks.3.1.x", layers_per_block=1) == "up_blocks.1.attentions.1.x"


@pytest.mark.parametrize("bad", ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight",
                                 f"down_blocks.0.attentions.2.{P}", f"mid_block.attentions.1.{P}",
                                 f"up_blocks.0.attentions.3.{P}"])
def test_keymap_refuses_unmappable_diffusers_paths(bad):
    with pytest.raises(NemoError, match="attention"):
        diffusers_to_ldm(bad)


@pytest.mark.parametrize("bad", ["model.diffusion_model.input_blocks.0.0.weight",
                                 f"model.diffusion_model.input_blocks.0.1.{P}",
                                 "model.diffusion_model.input_blocks.3.1.op.weight",
                                 "model.diffusion_model.output_blocks.2.1.conv.weight",
                                 f"first_stage_model.input_blocks.1.1.{P}", "model.diffusion_model.out.2.weight"])
def test_keymap_refuses_unmappable_ldm_keys(bad):
    with pytest.raises(NemoError):
        ldm_to_diffusers(bad)


# --- diffusers folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_folder_zeroes_exactly_the_planned_rows(tmp_path, dtype):
    model, digest = make_folder(tmp_path / "model", dtype)
    before_files = tree_hashes(model)
    before = unet_tensors(model)
    in_header = read_header(model / "unet" / WEIGHTS)
    plan = make_plan(digest)
    out = tmp_path / "out"

    res = apply_plan(plan, model, out)

    assert res.out == out and res.files == (out / "unet" / WEIGHTS,)
    assert res.zeroed == ROWS and res.plan_sha256 == plan.sha256() and res.seconds >= 0
    assert tree_hashes(model) == before_files  # input untouched
    after_files = tree_hashes(out)
    assert set(after_files) == set(before_files)
    for rel, h in before_files.items():
        if rel != f"unet/{WEIGHTS}":
            assert after_files[rel] == h, rel
    check_surgery(before, unet_tensors(out), ROWS)
    check_meta(out / "unet" / WEIGHTS, plan, {"format": "pt"})
    out_header = read_header(out / "unet" / WEIGHTS)
    assert list(out_header.tensors.values()) == list(in_header.tensors.values())  # order and offsets
    assert public_mode(out, 0o777) and public_mode(out / "unet" / WEIGHTS, 0o666)
    assert no_temporaries(tmp_path)


def test_output_folder_loads_in_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    model, digest = make_folder(tmp_path / "model")
    apply_plan(make_plan(digest), model, tmp_path / "out")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet", local_files_only=True)
    ref = tiny_unet()
    for name, rows in ROWS.items():
        w, w0 = unet.get_submodule(name).weight, ref.get_submodule(name).weight
        assert bool((w[rows] == 0).all())
        keep = [i for i in range(w.shape[0]) if i not in rows]
        assert torch.equal(w[keep], w0[keep])


def test_apply_sharded_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    model, digest = make_folder(tmp_path / "model", shard="50KB")
    shards = sorted((model / "unet").glob("*.safetensors"))
    assert len(shards) > 2 and (model / "unet" / INDEX).is_file()
    weight_map = json.loads((model / "unet" / INDEX).read_text())["weight_map"]
    holding = {f for k, f in weight_map.items() if k.endswith("attn2.to_v.weight")}
    assert len(holding) > 1 and len(holding) < len(shards)  # both kinds of shard are exercised
    before_files = tree_hashes(model)
    before = unet_tensors(model)
    plan = make_plan(digest)
    out = tmp_path / "out"

    res = apply_plan(plan, model, out)

    assert sorted(res.files) == sorted(out / "unet" / f for f in holding)
    assert tree_hashes(model) == before_files
    after_files = tree_hashes(out)
    assert set(after_files) == set(before_files)
    for rel, h in before_files.items():
        if Path(rel).name not in holding:
            assert after_files[rel] == h, rel  # index, shards without value layers, other parts
    check_surgery(before, unet_tensors(out), ROWS)
    for f in holding:
        check_meta(out / "unet" / f, plan, {"format": "pt"})
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    for name, rows in ROWS.items():
        assert bool((unet.get_submodule(name).weight[rows] == 0).all())


@pytest.fixture
def folder(tmp_path) -> tuple[Path, str]:
    return make_folder(tmp_path / "model")


@pytest.mark.parametrize("layers, message", [
    ({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": [0]}, "unknown layer"),
    ({"down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_v": [0]}, "unknown layer"),
    ({f"down_blocks.0.attentions.0.{P}": [8]}, "neuron 8 out of range"),
])
def test_bad_plan_refused_before_writing(tmp_path, folder, layers, message):
    model, digest = folder
    with pytest.raises(NemoError, match=message):
        apply_plan(make_plan(digest, layers), model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_temporaries(tmp_path)


def test_plan_for_another_model_refused(tmp_path, folder):
    model, _ = folder
    with pytest.raises(NemoError, match="plan was made for another model"):
        apply_plan(make_plan("0" * 64), model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plan_shapes_checked(tmp_path, folder):
    model, digest = folder
    plan = make_plan(digest)
    plan.model["shapes"] = {f"mid_block.attentions.0.{P}": [32, 16]}
    with pytest.raises(NemoError, match="plan expects"):
        apply_plan(plan, model, tmp_path / "out")


def test_existing_output_needs_force(tmp_path, folder):
    model, digest = folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(NemoError, match="exists"):
        apply_plan(make_plan(digest), model, out)
    assert (out / "old.txt").read_text() == "old"
    apply_plan(make_plan(digest), model, out, force=True)
    assert not (out / "old.txt").exists() and (out / "unet" / WEIGHTS).is_file()
    assert no_temporaries(tmp_path)


def test_output_inside_or_onto_input_refused_even_with_force(tmp_path, folder):
    model, digest = folder
    before = tree_hashes(model)
    for out in (model, model / "edited", tmp_path):
        with pytest.raises(NemoError, match="outside the input"):
            apply_plan(make_plan(digest), model, out, force=True)
    assert tree_hashes(model) == before


def test_pickle_refused(tmp_path, folder):
    model, digest = folder
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(NemoError, match="pickle"):
        apply_plan(make_plan(digest), model, tmp_path / "out")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(NemoError, match="pickle"):
        apply_plan(make_plan(digest), ckpt, tmp_path / "out.safetensors")


def test_second_weight_set_refused(tmp_path, folder):
    # A leftover variant would ship the memorized neurons unedited.
    model, digest = folder
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(
        (model / "unet" / WEIGHTS).read_bytes())
    with pytest.raises(NemoError, match="more than one"):
        apply_plan(make_plan(digest), model, tmp_path / "out")


def test_folder_to_single_file_needs_every_part(tmp_path, folder):
    model, digest = folder  # a UNet alone cannot make a whole single-file checkpoint
    with pytest.raises(NemoError, match="vae"):
        apply_plan(make_plan(digest), model, tmp_path / "out.safetensors", fmt="single")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(NemoError, match="unknown"):
        apply_plan(make_plan(digest), model, tmp_path / "out", fmt="onnx")


def test_corrupt_weights_refused(tmp_path, folder):
    model, digest = folder
    w = model / "unet" / WEIGHTS
    w.write_bytes(w.read_bytes()[:-4])
    with pytest.raises(NemoError, match="truncated"):
        apply_plan(make_plan(digest), model, tmp_path / "out")


# --- single files --------------------------------------------------------------------------------

def make_single(path: Path, unet, ldm: bool = True) -> dict[str, torch.Tensor]:
    """A single-file checkpoint: value layers under LDM names, other tensors under any names."""
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {"cond_stage_model.embed.weight": torch.randn(5, 3)}
    for k, v in sd.items():
        if k.endswith("attn2.to_v.weight"):
            tensors[diffusers_to_ldm(k) if ldm else k] = v
    tensors["model.diffusion_model.out.2.weight"] = sd["conv_out.weight"]
    tensors["first_stage_model.steps"] = torch.arange(7, dtype=torch.int64)
    tensors["alphas_cumprod"] = torch.linspace(1, 0, 10, dtype=torch.float64)
    save_file(tensors, path, metadata={"format": "pt", "author": "test"})
    return tensors


def test_apply_single_ldm_file(tmp_path):
    unet = tiny_unet(torch.float16)
    src = tmp_path / "sd.safetensors"
    make_single(src, unet)
    before_hash = hashlib.sha256(src.read_bytes()).hexdigest()
    plan = make_plan(digest_of(unet))  # the folder's digest: LDM names are mapped back
    out = tmp_path / "edited.safetensors"

    res = apply_plan(plan, src, out)

    assert res.out == out and res.files == (out,) and res.zeroed == ROWS
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before_hash
    check_surgery(load_file(src), load_file(out), ROWS, key=lambda n: diffusers_to_ldm(n + ".weight"))
    check_meta(out, plan, {"format": "pt", "author": "test"})
    with safe_open(str(out), framework="pt") as f:  # the safetensors library accepts the new header
        assert f.metadata()["nemo_surgery.plan_sha256"] == plan.sha256()
    assert list(read_header(out).tensors.values()) == list(read_header(src).tensors.values())
    assert public_mode(out, 0o666)
    assert no_temporaries(tmp_path)


def test_apply_single_diffusers_named_file(tmp_path):
    unet = tiny_unet()
    src = tmp_path / "unet.safetensors"
    make_single(src, unet, ldm=False)
    out = tmp_path / "edited.safetensors"
    apply_plan(make_plan(digest_of(unet)), src, out)
    check_surgery(load_file(src), load_file(out), ROWS)


def test_single_file_errors(tmp_path):
    unet = tiny_unet()
    src = tmp_path / "sd.safetensors"
    make_single(src, unet)
    out = tmp_path / "edited.safetensors"
    with pytest.raises(NemoError, match="plan was made for another model"):
        apply_plan(make_plan("f" * 64), src, out)
    with pytest.raises(NemoError, match="out of range"):
        apply_plan(make_plan(None, {f"up_blocks.3.attentions.0.{P}": [8]}), src, out)
    with pytest.raises(NemoError, match=r"\.safetensors"):
        apply_plan(make_plan(), src, tmp_path / "edited.bin")
    with pytest.raises(NemoError, match="not supported"):
        apply_plan(make_plan(), src, tmp_path / "folder", fmt="diffusers")
    out.write_bytes(b"old")
    with pytest.raises(NemoError, match="exists"):
        apply_plan(make_plan(), src, out)
    assert out.read_bytes() == b"old"
    apply_plan(make_plan(), src, out, force=True)
    check_surgery(load_file(src), load_file(out), ROWS, key=lambda n: diffusers_to_ldm(n + ".weight"))
    assert no_temporaries(tmp_path)
