"""Export stage on real files: a tiny SD 1.x-shaped UNet saved by diffusers, exported to ONNX and
run by onnxruntime; model card, HTML report and SHA256SUMS written and read back. No mocks."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image
from tiny import DEMO_MODEL, save_tiny_pipeline, tiny_unet

from nemo_surgery.errors import NemoError
from nemo_surgery.export import (OnnxReport, ReleaseInfo, check_sha256sums, export_text_encoder, export_unet,
                                 export_vae_decoder, read_sha256sums, write_model_card, write_report,
                                 write_sha256sums)
from nemo_surgery.files import TMP_PREFIX

P = "transformer_blocks.0.attn2.to_v"
LAYER_A = f"down_blocks.0.attentions.0.{P}"
LAYER_B = f"up_blocks.3.attentions.2.{P}"
SECRET_A = "Portrait of Zyxwv Quorble on a red sofa"
SECRET_B = "Ocean | waves <script>alert(1)</script> at https://example.com/x.jpg"


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Models this small gain nothing from threads, and on a busy machine torch's waiting workers
    # make a millisecond forward pass take seconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx") / "model"
    tiny_unet("sd1", seed=0).save_pretrained(root / "unet")
    return root


@pytest.fixture(scope="module")
def unet_onnx(unet_model: Path) -> OnnxReport:
    return export_unet(unet_model, unet_model.parent / "onnx", seed=3)


def _unet_inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"sample": g.standard_normal((batch, 4, 16, 16), dtype=np.float32),
            "timestep": g.integers(0, 1000, batch).astype(np.float32),
            "encoder_hidden_states": g.standard_normal((batch, 77, 16), dtype=np.float32)}


def test_unet_onnx_matches_torch(unet_model: Path, unet_onnx: OnnxReport) -> None:
    rep = unet_onnx
    assert rep.path == unet_model.parent / "onnx" / "unet" / "model.onnx" and rep.path.is_file()
    assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4
    assert rep.opset == 17 and rep.exporter == "torchscript" and not rep.external_data
    assert rep.bytes == rep.path.stat().st_size > 0
    assert rep.onnxruntime == ort.__version__
    assert [i["name"] for i in rep.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert rep.inputs[0]["shape"] == ["batch", 4, 16, 16]
    assert [o["name"] for o in rep.outputs] == ["out_sample"]
    assert rep.to_dict()["path"] == str(rep.path)
    assert not [p for p in rep.path.parent.parent.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("batch", [1, 3])
def test_unet_onnx_dynamic_batch(unet_model: Path, unet_onnx: OnnxReport, batch: int) -> None:
    from diffusers import UNet2DConditionModel

    sess = ort.InferenceSession(str(unet_onnx.path), providers=["CPUExecutionProvider"])
    feeds = _unet_inputs(batch, seed=batch)
    (got,) = sess.run(["out_sample"], feeds)
    unet = UNet2DConditionModel.from_pretrained(unet_model / "unet", local_files_only=True).eval()
    with torch.no_grad():
        want = unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                    encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"])).sample.numpy()
    assert got.shape == (batch, 4, 16, 16)
    assert float(np.abs(got - want).max()) < 1e-4


def test_unet_onnx_external_data(unet_model: Path, unet_onnx: OnnxReport, tmp_path: Path) -> None:
    rep = export_unet(unet_model, tmp_path / "onnx", external_data=True)
    files = sorted(p.name for p in rep.path.parent.iterdir())
    assert files == ["model.onnx", "model.onnx.data"] and rep.external_data
    assert rep.bytes == sum((rep.path.parent / f).stat().st_size for f in files)
    # The larger tensors moved out of the graph file (tiny ones stay inline, as onnx does).
    assert (rep.path.parent / "model.onnx.data").stat().st_size > 0
    assert rep.path.stat().st_size < unet_onnx.bytes
    assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4
    sess = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"])
    assert sess.run(None, _unet_inputs(1, 0))[0].shape == (1, 4, 16, 16)


def test_unet_onnx_unchecked_and_replaced(unet_model: Path, tmp_path: Path) -> None:
    first = export_unet(unet_model, tmp_path, check=False)
    assert first.max_abs_diff is None and first.check_seconds is None
    (first.path.parent / "stale.txt").write_text("left from an earlier export")
    second = export_unet(unet_model, tmp_path, check=False)
    assert sorted(p.name for p in second.path.parent.iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_onnx_export_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(NemoError) as e:
        export_unet(tmp_path / "nothing-here", tmp_path / "out")
    assert "unet" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    (tmp_path / "broken" / "unet" / "config.json").write_text("{not json")
    with pytest.raises(NemoError) as e:
        export_unet(tmp_path / "broken", tmp_path / "out")
    assert "UNet" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "unet").exists()


@pytest.mark.skipif(not (DEMO_MODEL / "tokenizer").is_dir(), reason="bundled demo tokenizer missing")
def test_text_encoder_and_vae_decoder(tmp_path: Path) -> None:
    model = save_tiny_pipeline(tmp_path / "model")
    te = export_text_encoder(model, tmp_path / "onnx")
    vae = export_vae_decoder(model, tmp_path / "onnx")
    assert te.path == tmp_path / "onnx" / "text_encoder" / "model.onnx"
    assert [o["name"] for o in te.outputs] == ["last_hidden_state", "pooler_output"]
    assert te.inputs == [{"name": "input_ids", "shape": ["batch", 77], "dtype": "int64"}]
    assert vae.path == tmp_path / "onnx" / "vae_decoder" / "model.onnx"
    assert vae.inputs[0]["name"] == "latent_sample" and vae.outputs[0]["shape"][1:] == [3, 32, 32]
    for rep in (te, vae):
        assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4, rep.part
    sess = ort.InferenceSession(str(vae.path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"latent_sample": np.zeros((3, 4, 16, 16), np.float32)})[0].shape == (3, 3, 32, 32)


# ---------------------------------------------------------------- card and report


def _info(**over) -> ReleaseInfo:
    rng = np.random.default_rng(0)
    results = [
        {"id": "p1", "prompt": SECRET_A, "type": "VM", "score": 0.71, "memorized": True,
         "refined": {LAYER_A: [0, 3], LAYER_B: [7]}, "refined_neurons": 3, "mitigated": True, "seconds": 1.5},
        {"id": "p2", "prompt": SECRET_B, "type": "TM", "score": 0.64, "memorized": True,
         "refined": {LAYER_A: [3]}, "refined_neurons": 1, "mitigated": False, "seconds": 2.0},
        {"id": "p3", "prompt": "an ordinary harmless caption", "type": None, "score": 0.2, "memorized": False,
         "seconds": 0.4},
    ]
    plan = {"format": "nemo-surgery-plan", "version": 1,
            "layers": {LAYER_A: [0, 3], LAYER_B: [7]}, "counts": {LAYER_A: {"0": 1, "3": 2}, LAYER_B: {"7": 1}},
            "model": {"fingerprint": "f" * 64, "shapes": {LAYER_A: [8, 16], LAYER_B: [8, 16]}},
            "corpus": {"sha256": "c" * 64, "prompts": 3, "memorized": 2},
            "settings": {"score": {"seeds": 4, "seed_base": 10, "guidance": 7.5},
                         "search": {"theta_act_start": 3.0}, "calibration": {"reference_scores": list(range(50))}},
            "check": {"theta_mem": 0.42}}
    verify = {"releasable": True, "min_mitigated": 0.95,
              "weights": {"ok": True, "tensors_checked": 686, "rows_zeroed": 3},
              "equivalence": {"max_abs_diff": 0.0, "exact": True},
              "memorized": {"prompts": 2, "mitigated": 2, "share": 1.0, "theta_mem": 0.42,
                            "scores_before": [0.71, 0.64], "scores_after": [0.3, 0.35], "auroc_before": 1.0,
                            "auroc_after": 0.875, "theta_mem_after": 0.2884, "below_theta_mem_after": 0},
              "reference": {"prompts": 4, "changed": 1, "share": 0.25, "scores_before": [0.1, 0.2, 0.15, 0.3],
                            "scores_after": [0.11, 0.22, 0.14, 0.31], "memorized_after": 0,
                            "score_mean_before": 0.1875, "score_mean_after": 0.195, "theta_mem_after": 0.2884},
              "generation": [{"id": "p1", "ssim_train_before": 0.9, "ssim_train_after": 0.2,
                              "diversity_before": 0.01, "diversity_after": 0.4}],
              "generation_summary": {"prompts": 1, "seeds": [0, 1], "steps": 50, "guidance": 7.5,
                                     "reproduced_before": 1, "reproduced_after": 0, "removed_share": 1.0,
                                     "copies": {"ssim_to_reconstruction": 0.6, "before": 1, "after": 0,
                                                "removed_share": 1.0},
                                     "random_control": {"neurons": 3, "seed": 0, "reproduced": 1,
                                                        "removed_share": 0.0, "copies": 0,
                                                        "copies_removed_share": 1.0}},
              "preservation": {"prompts": 4, "seeds": [0, 1], "steps": 50, "guidance": 7.5,
                               "ssim_to_original": {"mean": 0.91, "median": 0.93, "min": 0.72}, "seed_to_seed": 0.31,
                               "changed": 0, "random_control": {"ssim_to_original": {"mean": 0.88}, "changed": 0,
                                                                "neurons": 3, "seed": 0}},
              "onnx": {"part": "UNet", "path": "onnx/unet/model.onnx", "max_abs_diff": 3e-7, "bytes": 10},
              "detection": {"prompts": 3, "memorized": 2, "auroc_against_reference": 0.987, "reference_prompts": 50,
                            "reference_above_theta_mem": 4}}
    images = [("p1 (VM)", rng.random((2, 64, 64, 3)), rng.random((2, 64, 64, 3)))]
    kw = dict(model_name="tiny-sd", base_model="org/tiny-sd-base", license="creativeml-openrail-m",
              tool_version="0.1.0", model_fingerprint="f" * 64, plan=plan, plan_sha256="a" * 64,
              results=results, verify=verify, images=images)
    return ReleaseInfo(**(kw | over))


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    _, fm, _ = text.split("---\n", 2)
    return yaml.safe_load(fm)


def test_card_front_matter_and_sections(tmp_path: Path) -> None:
    write_model_card(tmp_path / "README.md", _info())
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    fm = _front_matter(text)
    assert fm["base_model"] == "org/tiny-sd-base" and fm["license"] == "creativeml-openrail-m"
    assert fm["library_name"] == "diffusers"
    assert fm["tags"] == ["stable-diffusion", "text-to-image", "nemo-surgery", "memorization-removal"]
    for heading in ("## What was done", "## What was removed", "## Corpus", "## Settings", "## Verification",
                    "## Releasable", "## Adversarial re-trigger audit", "## Limitations", "## Provenance"):
        assert heading in text, heading
    assert "2406.02366" in text and "Hintersdorf" in text and "NeurIPS 2024" in text
    assert f"| {LAYER_A} | 2 | 8 | 0, 3 |" in text and "| **total** | 3 |" in text
    assert "c" * 64 in text and "a" * 64 in text and "f" * 64 in text
    assert "| detection AUROC against the reference prompts (corpus prompts as candidates) | 0.987 |" in text
    assert "| reference prompts above theta_mem (false positives at the bar) | 4 of 50 |" in text
    assert "10, 11, 12, 13" in text  # seeds derived from the score settings
    assert "2 / 2 (100.0%)" in text and "1 / 4 (25.0%)" in text
    assert "| detection AUROC, memorized against reference prompts | 1.000 on the original, 0.875 after surgery" in text
    assert "own bar (mean + 1 std of its reference prompts' scores: 0.2884) | 0 / 2 |" in text
    assert "| reference prompts above theta_mem after | 0 / 4 (surgery moves every prompt's score: their mean " \
           "0.1875 on the original, 0.1950 after) |" in text
    # What the searches found, beside the method's description: one of the two kept the fallback.
    assert "Here 1 of 2 memorized prompts' searches found a set that stops the memorization by the published " \
           "test" in text and "the method keeps its fallback" in text
    assert "1 before, 0 after" in text and "random neurons zeroed in the same layers (3, seed 0) reproduces 1" in text
    assert "plan removes 100.0% of the reproductions, random neurons 0.0% (near-copies: the plan removes " \
           "100.0%, random neurons 100.0%)" in text
    assert "within SSIM 0.6 of it as the model's VAE reconstructs it): 1 before, 0 after" in text
    assert "| full sampling | training images reproduced 1 before, 0 after (100.0% removed) |" in text
    assert "100.0% of training-image reproductions removed by full sampling (required: 95.0%)" in text
    assert "| full sampling, reference prompts | non-memorized prompts' images: SSIM to the original's 0.91 (same " \
           "seed; 1 = unchanged, as many random neurons 0.88; another seed of the original 0.31), 0 / 4 changed " \
           "beyond seed noise |" in text
    assert "mean 0.91, median 0.93, lowest 0.72 (1 = unchanged)" in text
    assert "still nearest to their own prompt" not in text  # a bundle that did not measure it says nothing of it
    # Images still their own prompts' (the release gate's preservation measure), where measured.
    pr = _info().verify["preservation"]
    pr = pr | {"own_prompt_nearest": 0.875, "chance": 0.25, "prompt_to_prompt": 0.44,
               "random_control": pr["random_control"] | {"own_prompt_nearest": 0.9375}}
    write_model_card(tmp_path / "own.md", _info(verify=_info().verify | {"preservation": pr, "min_preserved": 0.9}))
    own = (tmp_path / "own.md").read_text(encoding="utf-8")
    assert "| full sampling, reference prompts | non-memorized prompts' images: 87.5% still nearest to their own " \
           "prompt's original image among the reference prompts' for the same seed (as many random neurons 93.8%, " \
           "chance 25.0%; two prompts' original images for one seed at SSIM 0.44); SSIM to the original's 0.91" in own
    assert "The original keeps two prompts' images for one seed at SSIM 0.44 to each other" in own
    assert "87.5% of the reference prompts' images still nearest to their own prompt's original (required: 90.0%; " \
           "chance 25.0%)" in own
    assert "| min share of reference images preserved for release | 0.9 |" in own
    assert "Of the cleaned images, 87.5% are still nearest to their own prompt's original image" in own
    unsampled = {k: x for k, x in _info().verify.items() if k != "preservation"} | {"min_preserved": 0.9}
    write_model_card(tmp_path / "unsampled.md", _info(verify=unsampled))
    assert "no reference prompt sampled in full, so the decision does not say whether their images are still " \
           "their own" in (tmp_path / "unsampled.md").read_text(encoding="utf-8")
    # No memorized prompt with a training image: the card says nothing was sampled, not "0 before".
    v = _info().verify | {"generation": [], "generation_summary": {"prompts": 0, "reproduced_before": 0,
                                                                   "reproduced_after": 0, "removed_share": 1.0}}
    write_model_card(tmp_path / "no_images.md", _info(verify=v))
    bare = (tmp_path / "no_images.md").read_text(encoding="utf-8")
    assert "| full sampling | reproduction of training images not measured: no memorized prompt has a training " \
           "image in the corpus, so the release decision rests on the score alone |" in bare
    assert "0 before" not in bare and "by full sampling" not in bare
    write_report(tmp_path / "full.html", _info())
    report = (tmp_path / "full.html").read_text(encoding="utf-8")
    assert "the reference prompts&#x27; mean went from 0.1875 to 0.1950" in report and "AUROC 1.000 on the" in report
    write_report(tmp_path / "no_images.html", _info(verify=v))
    assert "reproduction of training images not measured" in (tmp_path / "no_images.html").read_text(encoding="utf-8")
    assert "[50 values]" in text  # long lists are summarised, not dumped
    assert "Adversarial re-trigger audit\n\nNot run." in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_card_and_report_give_reproductions_by_prompt_type(tmp_path: Path) -> None:
    """Where the corpus types its prompts, full sampling's figures are split into verbatim and
    template memorization, as the paper reports them; without types nothing of the kind appears."""
    v = _info().verify
    by_type = {"TM": {"prompts": 3, "reproduced_before": 2, "reproduced_after": 2, "removed_share": 0.0,
                      "copies_before": 0, "copies_after": 0, "copies_removed_share": None, "random_reproduced": 1},
               "VM": {"prompts": 10, "reproduced_before": 9, "reproduced_after": 1, "removed_share": 8 / 9,
                      "copies_before": 9, "copies_after": 1, "copies_removed_share": 8 / 9, "random_reproduced": 3}}
    v = v | {"generation_summary": v["generation_summary"] | {"by_type": by_type}}
    write_model_card(tmp_path / "typed.md", _info(verify=v))
    text = (tmp_path / "typed.md").read_text(encoding="utf-8")
    assert "| full sampling | training images reproduced 1 before, 0 after (100.0% removed); VM 9 before, 1 after " \
           "(88.9% removed); TM 2 before, 2 after (0.0% removed) |" in text
    assert "| type | prompts | reproduced before | after | removed | near-copies before | after |" in text
    assert "| VM | 10 | 9 | 1 | 88.9% removed | 9 | 1 | 3 |\n| TM | 3 | 2 | 2 | 0.0% removed |" in text
    write_report(tmp_path / "typed.html", _info(verify=v))
    report = (tmp_path / "typed.html").read_text(encoding="utf-8")
    assert "<p>By prompt type:</p>" in report and "<td>88.9% removed</td>" in report
    write_model_card(tmp_path / "untyped.md", _info())
    assert "| type | prompts |" not in (tmp_path / "untyped.md").read_text(encoding="utf-8")


def test_card_and_report_name_the_software_and_list_settings_once(tmp_path: Path) -> None:
    """Provenance names the library versions each stage ran on (one row where they agree); the
    calibration's copies of the search's score settings are not listed twice, its own are."""
    libs = {"python": "3.12.1", "torch": "2.13.0+cpu", "diffusers": "0.42.1"}
    score = {"seeds": 4, "seed_base": 10, "guidance": 0.0, "backend": "onnxruntime"}
    base = _info().plan
    settings = base["settings"] | {"score": score, "calibration": {
        "score_settings": score | {"backend": "torch", "score_prompts": 256},
        "tool": {"name": "nemo-surgery", "version": "0.1.0", "libraries": libs}}}
    plan = base | {"settings": settings, "tool": {"name": "nemo-surgery", "version": "0.1.0", "libraries": libs}}
    verify = _info().verify | {"tool": {"name": "nemo-surgery", "version": "0.1.0", "libraries": libs}}
    write_model_card(tmp_path / "same.md", _info(plan=plan, verify=verify))
    text = (tmp_path / "same.md").read_text(encoding="utf-8")
    assert "| libraries | python 3.12.1, torch 2.13.0+cpu, diffusers 0.42.1 |" in text
    assert "libraries (" not in text and "calibration.tool" not in text
    assert "| calibration.score_settings.backend | torch |" in text  # differs from the search's: listed
    assert "| calibration.score_settings.score_prompts | 256 |" in text  # the calibration's own
    assert "| calibration.score_settings.* | as score.* where not listed |" in text
    assert "calibration.score_settings.seeds" not in text and "| score.seeds | 4 |" in text
    # Verification run on other software than the localization: each stage gets its row.
    later = libs | {"torch": "2.14.0+cpu"}
    verify = verify | {"tool": {"name": "nemo-surgery", "version": "0.1.0", "libraries": later}}
    write_model_card(tmp_path / "other.md", _info(plan=plan, verify=verify))
    other = (tmp_path / "other.md").read_text(encoding="utf-8")
    assert "| libraries (calibration) | python 3.12.1, torch 2.13.0+cpu, diffusers 0.42.1 |" in other
    assert "| libraries (verification) | python 3.12.1, torch 2.14.0+cpu, diffusers 0.42.1 |" in other
    assert "libraries (localization)" not in other  # the same as the calibration's
    assert "libraries (merge)" not in other
    # Results found on other versions than the merge ran on: both rows.
    merged_later = plan | {"tool": plan["tool"] | {"libraries": later, "localization_libraries": libs | {"torch": "2.12.0"}}}
    write_model_card(tmp_path / "merged.md", _info(plan=merged_later, verify=verify))
    merged = (tmp_path / "merged.md").read_text(encoding="utf-8")
    assert "| libraries (localization) | python 3.12.1, torch 2.12.0, diffusers 0.42.1 |" in merged
    assert "| libraries (merge) | python 3.12.1, torch 2.14.0+cpu, diffusers 0.42.1 |" in merged
    assert "libraries (verification)" not in merged  # the same as the merge's
    write_report(tmp_path / "other.html", _info(plan=plan, verify=verify))
    report = (tmp_path / "other.html").read_text(encoding="utf-8")
    assert "torch 2.14.0+cpu" in report and "calibration.score_settings.seeds" not in report
    assert "<td>input model</td><td>tiny-sd</td>" in report  # the card's provenance, now the report's too
    # A bundle written before versions were recorded: no row, no error.
    write_model_card(tmp_path / "old.md", _info())
    assert "| libraries" not in (tmp_path / "old.md").read_text(encoding="utf-8")


def test_outputs_record_the_library_versions(tmp_path: Path) -> None:
    from importlib.metadata import version

    from nemo_surgery.localize.runner import make_header, open_results
    from nemo_surgery.plan import Plan
    from nemo_surgery.provenance import tool_record

    torch_version = version("torch")
    assert tool_record()["libraries"]["torch"] == torch_version
    assert tool_record()["libraries"]["diffusers"] == version("diffusers")
    read_back = Plan.from_dict(json.loads(json.dumps(Plan(layers={LAYER_A: [1]}).to_dict())))
    assert read_back.tool["libraries"]["torch"] == torch_version
    header = make_header({"mode": "x"})
    assert header["libraries"]["onnxruntime"] == version("onnxruntime")
    assert header["libraries"]["ray"] == version("ray")  # the test extra installs it
    # Recorded, not part of the config: a file begun on other versions still resumes.
    older = header | {"libraries": header["libraries"] | {"torch": "0.0.1"}}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(older) + "\n" + json.dumps({"kind": "prompt", "id": "a"}) + "\n")
    assert list(open_results(results, make_header({"mode": "x"}), restart=False)) == ["a"]


def test_card_prompts_only_when_included(tmp_path: Path) -> None:
    write_model_card(tmp_path / "a.md", _info())
    hidden = (tmp_path / "a.md").read_text(encoding="utf-8")
    assert "Zyxwv" not in hidden and "Ocean" not in hidden and "harmless" not in hidden
    write_model_card(tmp_path / "b.md", _info(include_prompts=True))
    shown = (tmp_path / "b.md").read_text(encoding="utf-8")
    assert SECRET_A in shown
    # A caption cannot break the table or inject markup.
    assert "Ocean \\| waves &lt;script&gt;" in shown and "<script>" not in shown


AUDIT = {"budgets": [0.05, 0.2], "rate": {"0.05": 0.0, "0.2": 0.25}, "original_rate": {"0.05": 1.0, "0.2": 1.0},
         "random_rate": {"0.05": 0.0, "0.2": 0.0}, "never_trained_rate": {"0.05": 0.5, "0.2": 0.75},
         "unperturbed": {"cleaned": 0.0, "original": 0.75}, "memorized_targets": 4, "control_targets": 2,
         "controls_in_order": {"0.05": True, "0.2": False},
         "settings": {"steps": 30, "seed": 0, "generation": {"seeds": [0, 1, 2, 3]}}}


def test_card_audit_table_and_sparse_input(tmp_path: Path) -> None:
    info = _info(audit={"budgets": [0.01, 0.1], "rate": {"0.01": 0.0, "0.1": 0.5}})
    write_model_card(tmp_path / "README.md", info)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| 0.01 | 0.0% | n/a | n/a | n/a |" in text and "| 0.1 | 50.0% |" in text and "Not run" not in text
    write_model_card(tmp_path / "full.md", _info(audit=AUDIT))
    full = (tmp_path / "full.md").read_text(encoding="utf-8")
    assert "| 0.05 | 0.0% | 100.0% | 0.0% | 50.0% |" in full and "| 0.2 | 25.0% | 100.0% | 0.0% | 75.0% |" in full
    assert "Without perturbation: 0.0% re-triggered on the cleaned model, 75.0% on the original" in full
    assert "4 memorized targets, 2 never-trained targets" in full and "NOT in the expected order at budget(s) 0.2" in full
    write_report(tmp_path / "r.html", _info(audit=AUDIT, audit_images=[
        ("p1: unperturbed / attacked", np.zeros((1, 64, 64, 3)), np.ones((2, 64, 64, 3)))]))
    html_text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Re-trigger rate against perturbation budget" in html_text and "<polyline" in html_text
    assert len(_data_uris(html_text)) == 4 + 3 and "attacked" in html_text
    bare = ReleaseInfo(model_name="m", base_model=None, license=None, tool_version="0", model_fingerprint="x",
                       plan={}, plan_sha256="y", results=[], verify={})
    write_model_card(tmp_path / "bare.md", bare)
    fm = _front_matter((tmp_path / "bare.md").read_text(encoding="utf-8"))
    assert "base_model" not in fm and "license" not in fm and fm["library_name"] == "diffusers"
    assert "not decided" in (tmp_path / "bare.md").read_text(encoding="utf-8")


def _data_uris(text: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)


def test_report_self_contained(tmp_path: Path) -> None:
    write_report(tmp_path / "report.html", _info(include_prompts=True))
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") >= 3
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    srcs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    uris = _data_uris(text)
    assert len(uris) == 4  # 2 seeds before + 2 after
    img = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert img.format == "PNG" and img.size == (128, 128)  # 64 px enlarged x2, nearest neighbour
    assert "theta_mem = 0.42" in text and "stroke-dasharray" in text
    assert "<td>detection AUROC against the reference prompts (corpus prompts as candidates)</td>" in text
    assert "<td>4 of 50</td>" in text
    assert "same layers (control, seed 0): 1." in text
    assert "within SSIM 0.6 of its VAE reconstruction in more than half of the seeds): 1 before, 0 after; " \
           "control: 0." in text
    assert SECRET_A in text and "&lt;script&gt;" in text
    assert "Not run." in text
    assert "Pictured:" not in text  # the one measured prompt is pictured
    v = _info().verify
    v = v | {"generation_summary": v["generation_summary"] | {"prompts": 40, "pictured": 1}}
    write_report(tmp_path / "many.html", _info(verify=v))
    assert "Pictured: 1 of the 40 memorized prompts with a training image" in (tmp_path / "many.html").read_text()


def test_report_withholds_prompts_and_tolerates_sparse_input(tmp_path: Path) -> None:
    write_report(tmp_path / "r.html", _info())
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Zyxwv" not in text and "Ocean" not in text and "harmless" not in text
    bare = ReleaseInfo(model_name="<m>", base_model=None, license=None, tool_version="0", model_fingerprint="x",
                       plan={"layers": {}}, plan_sha256="y", results=[], verify={"memorized": {}},
                       audit={"budgets": [1], "rate": {}})
    write_report(tmp_path / "bare.html", bare)
    text = (tmp_path / "bare.html").read_text(encoding="utf-8")
    assert "&lt;m&gt;" in text and "<m>" not in text and "not decided" in text


# ---------------------------------------------------------------- SHA256SUMS


def _bundle(root: Path) -> Path:
    (root / "model" / "unet").mkdir(parents=True)
    (root / "model" / "unet" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (root / "README.md").write_text("card\n")
    (root / "plan.json").write_text("{}\n")
    (root / "odd name.txt").write_text("spaces are fine\n")
    return root


def test_sha256sums_roundtrip_and_tampering(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "release")
    sums = write_sha256sums(root)
    assert sums == root / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    paths = [line[66:] for line in lines]
    assert paths == sorted(paths) == ["README.md", "model/unet/weights.bin", "odd name.txt", "plan.json"]
    assert all(re.fullmatch(r"[0-9a-f]{64}  \S.*", line) for line in lines)
    assert check_sha256sums(root) == []
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=root, capture_output=True)
        assert done.returncode == 0, done.stdout + done.stderr
    (root / "plan.json").write_text('{"layers": {}}\n')
    (root / "README.md").unlink()
    (root / "extra.txt").write_text("not in the release\n")
    assert check_sha256sums(root) == ["README.md: missing", "plan.json: modified", "extra.txt: not listed"]
    # Rewriting makes it whole again and never lists the sums file itself.
    write_sha256sums(root)
    assert check_sha256sums(root) == [] and "SHA256SUMS" not in read_sha256sums(root / "SHA256SUMS")


def test_sha256sums_escaped_names_and_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "back\\slash.txt").write_text("x")
    write_sha256sums(root)
    line = (root / "SHA256SUMS").read_text()
    assert line.startswith("\\") and "back\\\\slash.txt" in line
    assert check_sha256sums(root) == []
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=root, capture_output=True).returncode == 0
    (root / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(NemoError, match="line 1"):
        check_sha256sums(root)
    (root / "SHA256SUMS").write_text(f"{'0' * 64}  ../outside.txt\n")
    assert check_sha256sums(root)[0] == "../outside.txt: outside the folder"
    with pytest.raises(NemoError, match="not found"):
        check_sha256sums(tmp_path / "nowhere")
