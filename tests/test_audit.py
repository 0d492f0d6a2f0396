"""The adversarial re-trigger audit on tiny in-code models: the attack's budget and effect,
determinism, resuming, the summary's figures and order check, and refusing a foreign model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from nemo_surgery.corpus import Prompt
from nemo_surgery.errors import NemoError
from nemo_surgery.files import read_jsonl
from nemo_surgery.generation import GenSettings, encode, from_uint8, image_size, ssim
from nemo_surgery.model import load_model
from nemo_surgery.surgery.audit import (AuditSettings, attack, latents_of, memorized_targets, random_perturbation,
                                        run_audit, summarize, summary_text)
from tiny import save_tiny_pipeline

SETTINGS = AuditSettings(budgets=(0.1, 0.5), steps=4, timesteps=2, controls=1,
                         generation=GenSettings(steps=4, seeds=(0, 1)))
PROMPTS = [Prompt("a", "official portrait of astronaut eileen collins", "VM", None, 1),
           Prompt("b", "chelsea the tabby cat staring sideways", "VM", None, 2)]
REFERENCE = ["a small red circle at the top left on blue background", "rusty teapot photographed at dawn",
             "frozen harbor photographed in winter"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    original = load_model(save_tiny_pipeline(root / "original", seed=5))
    cleaned = load_model(root / "original")
    with torch.no_grad():  # a cleaned copy: a few value rows zeroed, as surgery does
        for v in cleaned.value_layers[:3]:
            cleaned.to_v(v.path).weight[:4] = 0
    other = load_model(save_tiny_pipeline(root / "other", seed=6))
    return original, cleaned, other, root


def test_attack_stays_within_budget_lowers_loss_and_is_deterministic(models) -> None:
    original, cleaned, _, _ = models
    emb, _ = encode(original, [PROMPTS[0].text])
    z0 = latents_of(original, np.random.default_rng(0).random((32, 32, 3), dtype=np.float32))
    s = dataclasses.replace(SETTINGS, steps=12, timesteps=4)
    grads_before = [p.requires_grad for p in cleaned.unet.parameters()]
    (delta, start, end), (small, start_small, _) = attack(cleaned, emb, z0, (0.3, 0.02), s, seed=7)
    assert [p.requires_grad for p in cleaned.unet.parameters()] == grads_before  # restored as found
    assert float(delta.norm()) <= 0.3 * float(emb.norm()) * (1 + 1e-5)
    assert float(delta.norm()) > 0.1 * float(emb.norm())  # it moved, not a no-op
    assert float(small.norm()) <= 0.02 * float(emb.norm()) * (1 + 1e-5)
    assert end < start and start_small == start
    [(again, start2, end2)] = attack(cleaned, emb, z0, (0.3,), s, seed=7)
    # Budgets attacked side by side are independent runs: the same as one budget alone.
    assert torch.allclose(delta, again, atol=1e-4 * float(emb.norm())) and abs(end - end2) < 1e-4
    assert start == start2
    [(same, _, _)] = attack(cleaned, emb, z0, (0.3,), s, seed=7)
    assert torch.equal(again, same)
    [(other_seed, _, _)] = attack(cleaned, emb, z0, (0.3,), s, seed=8)
    assert not torch.allclose(again, other_seed)
    # Deltas come back ready to add: on the embedding's device and in its dtype.
    half = emb.to(torch.bfloat16)
    [(d16, _, _)] = attack(cleaned, half, z0, (0.3,), dataclasses.replace(s, steps=2), seed=7)
    assert d16.dtype == half.dtype and d16.device == half.device and d16.shape == half.shape
    r = random_perturbation(emb, 0.2, seed=1)
    assert abs(float(r.norm()) - 0.2 * float(emb.norm())) < 1e-3 * float(emb.norm())


def test_run_audit_records_resumes_and_repeats(models) -> None:
    original, cleaned, _, root = models
    path = root / "audit.jsonl"
    lines: list[str] = []
    pictures = root / "audit.examples"
    audit, examples = run_audit(original, cleaned, PROMPTS, REFERENCE, [0.3, 0.1, 0.2], 3, path, SETTINGS,
                                pictures=pictures, log=lines.append)
    assert audit["memorized_targets"] == 2 and audit["control_targets"] == 1
    assert set(audit["rate"]) == {"0.1", "0.5"} and audit["budgets"] == [0.1, 0.5]
    recs = [r for r in read_jsonl(path) if r.get("kind") == "target"]
    assert [r["id"] for r in recs] == ["a", "b", "control:0"]
    mem = recs[0]
    assert set(mem["budgets"]["0.5"]) == {"cleaned", "original", "random"}
    assert set(recs[2]["budgets"]["0.5"]) == {"cleaned"}  # a control is attacked on the cleaned model only
    # The least memorized reference prompt (score 0.1) supplies the never-trained target.
    assert "rusty teapot" in recs[2]["source"]
    assert len(examples) == 2 and examples[0][2].shape[0] == 2  # one attacked image per budget
    assert len([x for x in lines if "audit memorized" in x]) == 2

    # Rerun: everything is read back, nothing recomputed, same figures.
    lines.clear()
    again, ex2 = run_audit(original, cleaned, PROMPTS, REFERENCE, [0.3, 0.1, 0.2], 3, path, SETTINGS,
                           pictures=pictures, log=lines.append)
    assert any("resuming, 3 of 3" in x for x in lines) and not any("audit memorized" in x for x in lines)
    # The report's example images come back from disk, identical.
    assert [x[0] for x in ex2] == [x[0] for x in examples]
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) for a, b in zip(ex2, examples))
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in audit.items() if k != "seconds"}

    # A fresh run with the same seed gives the same records (timings aside).
    fresh = root / "fresh.jsonl"
    run_audit(original, cleaned, PROMPTS, REFERENCE, [0.3, 0.1, 0.2], 3, fresh, SETTINGS)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(path)[1:]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(fresh)[1:]]

    # Other settings refuse to mix with the old records.
    with pytest.raises(NemoError, match="other settings"):
        run_audit(original, cleaned, PROMPTS, REFERENCE, [0.3, 0.1, 0.2], 3, path,
                  dataclasses.replace(SETTINGS, steps=5))


def test_audit_measures_verifications_samples_as_the_pixels_they_are(models, tmp_path) -> None:
    """`build` hands the audit verification's unperturbed samples, kept as uint8: they are measured
    as the images they encode, not as numbers from 0 to 255, and not sampled again."""
    original, cleaned, _, _ = models
    rng = np.random.default_rng(3)
    size = image_size(original)
    known = {p.id: {m: rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8) for m in ("original", "cleaned")}
             for p in PROMPTS}
    audit, _ = run_audit(original, cleaned, PROMPTS, REFERENCE, [0.3, 0.1, 0.2], 3, tmp_path / "a.jsonl", SETTINGS,
                         known=known)
    for target in memorized_targets(original, PROMPTS, SETTINGS):
        [rec] = [r for r in audit["targets"] if r["id"] == target.id]
        for m in ("original", "cleaned"):
            expected = np.mean([ssim(x, target.image) for x in from_uint8(known[target.id][m])])
            assert rec["unperturbed"][m]["ssim"] == round(float(expected), 4)


def test_targets_hold_their_images_as_the_8bit_pixels_they_are(models, tmp_path) -> None:
    """A target's image is kept as uint8 and read back as exactly the image it was: a training
    image's file, or what the original drew (sampling's output is 8-bit already)."""
    from PIL import Image

    from nemo_surgery.generation import generate, load_image

    original, _, _, _ = models
    size = image_size(original)
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (size + 6, size + 6, 3), dtype=np.uint8)).save(
        tmp_path / "photo.png")
    with_file = dataclasses.replace(PROMPTS[0], image=tmp_path / "photo.png")
    from_file, drawn = memorized_targets(original, [with_file, PROMPTS[1]], SETTINGS)
    assert from_file.pixels.dtype == drawn.pixels.dtype == np.uint8
    assert from_file.image.dtype == np.float32 and np.array_equal(from_file.image, load_image(with_file.image, size))
    first_seed = dataclasses.replace(SETTINGS.generation, seeds=SETTINGS.generation.seeds[:1])
    assert np.array_equal(drawn.image, generate(original, [PROMPTS[1].text], first_seed)[0][0])


def test_a_later_audit_reuses_the_originals_attacks(models, tmp_path, monkeypatch) -> None:
    """Hardening audits the same original every round: its attacks are kept and read back, giving
    the records a fresh audit gives; a damaged copy is attacked again."""
    import nemo_surgery.surgery.audit as audit_mod

    original, cleaned, _, _ = models
    on_original, real = [], audit_mod.attack
    monkeypatch.setattr(audit_mod, "attack", lambda m, *a, **k: (on_original.append(1) if m is original else None)
                        or real(m, *a, **k))
    kept = tmp_path / "originals"
    args = (original, cleaned, PROMPTS, REFERENCE, [0.3, 0.1, 0.2], 3)
    run_audit(*args, tmp_path / "a.jsonl", SETTINGS, originals=kept)
    assert len(on_original) == 2 and len(list(kept.glob("original-*.json"))) == 2
    on_original.clear()
    lines: list[str] = []
    run_audit(*args, tmp_path / "b.jsonl", SETTINGS, originals=kept, log=lines.append)
    assert on_original == [] and sum("original's attacks kept" in x for x in lines) == 2
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(tmp_path / "a.jsonl")[1:]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(tmp_path / "b.jsonl")[1:]] == strip
    for f in kept.glob("original-*.json"):
        f.write_text("{not json")
    run_audit(*args, tmp_path / "c.jsonl", SETTINGS, originals=kept)
    assert len(on_original) == 2


def test_run_audit_refuses_a_model_that_is_not_a_cleaned_copy(models, tmp_path) -> None:
    original, _, _, _ = models
    from tiny import tiny_unet

    other = load_model(save_tiny_pipeline(tmp_path / "m", seed=1))
    other.unet = tiny_unet("sd2")  # different value-layer shapes
    from nemo_surgery.model import discover_value_layers

    other.value_layers = discover_value_layers(other.unet)
    with pytest.raises(NemoError, match="not a cleaned copy"):
        run_audit(original, other, PROMPTS, REFERENCE, [0.1], 1, tmp_path / "a.jsonl", SETTINGS)


def _rec(role: str, cells: dict[str, dict[str, bool]], unperturbed: dict[str, bool] | None = None) -> dict:
    r = {"role": role, "budgets": {b: {c: {"retriggered": v} for c, v in row.items()} for b, row in cells.items()}}
    if unperturbed is not None:
        r["unperturbed"] = {c: {"retriggered": v} for c, v in unperturbed.items()}
    return r


def test_summary_rates_and_order_check() -> None:
    s = AuditSettings(budgets=(0.1, 0.2))
    recs = [_rec("memorized", {"0.1": {"cleaned": False, "original": True, "random": False},
                               "0.2": {"cleaned": True, "original": True, "random": False}},
                 {"cleaned": False, "original": True}),
            _rec("memorized", {"0.1": {"cleaned": False, "original": True, "random": False},
                               "0.2": {"cleaned": False, "original": False, "random": True}},
                 {"cleaned": False, "original": False}),
            _rec("control", {"0.1": {"cleaned": True}, "0.2": {"cleaned": True}})]
    out = summarize(recs, s)
    assert out["rate"] == {"0.1": 0.0, "0.2": 0.5}
    assert out["original_rate"] == {"0.1": 1.0, "0.2": 0.5}
    assert out["random_rate"] == {"0.1": 0.0, "0.2": 0.5}
    assert out["never_trained_rate"] == {"0.1": 1.0, "0.2": 1.0}
    assert out["unperturbed"] == {"cleaned": 0.0, "original": 0.5}
    assert out["controls_in_order"] == {"0.1": True, "0.2": True}
    recs[1]["budgets"]["0.2"]["original"]["retriggered"] = False
    recs[0]["budgets"]["0.2"]["original"]["retriggered"] = False
    assert summarize(recs, s)["controls_in_order"]["0.2"] is False
    text = summary_text(out | {"memorized_targets": 2, "control_targets": 1})
    assert "0.2" in text and "50%" in text and json.dumps(out)


def test_unreadable_image_is_a_one_line_error(tmp_path) -> None:
    from nemo_surgery.generation import load_image

    bad = tmp_path / "a.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(NemoError, match="a.png: not a readable image"):
        load_image(bad, 32)


def _sampling_case(cleaned, folder):
    """Five prompts with (random) training images, settings that sample in seconds, a plan of 4
    neurons and 3 reference prompts."""
    from PIL import Image

    rng = np.random.default_rng(0)
    prompts = []
    for i, text in enumerate(["a red fox", "a blue boat", "a green tree", "a tall tower", "a small bird"]):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        prompts.append(Prompt(f"p{i}", text, None, folder / f"{i}.png", i + 2))
    return (prompts, GenSettings(steps=3, seeds=(0, 1)), {cleaned.value_layers[0].path: [0, 1, 2, 3]},
            ["a quiet lake", "an old car", "a sunny field"])


def test_verification_sampling_in_chunks_measures_the_same(models, tmp_path, monkeypatch) -> None:
    """Verification samples a corpus a chunk at a time so memory stays flat: the figures must not
    depend on the chunking, the report pictures an evenly spaced few, and only the prompts the
    audit will reuse keep their images."""
    import nemo_surgery.surgery.verify as verify

    original, cleaned, _, _ = models
    prompts, gs, neurons, ref = _sampling_case(cleaned, tmp_path)
    whole = verify.generation_measures(original, cleaned, prompts, gs, neurons, reference=ref)
    monkeypatch.setattr(verify, "CHUNK_PROMPTS", 2)
    monkeypatch.setattr(verify, "GRID_SHOWN", 2)
    lines: list[str] = []
    chunked = verify.generation_measures(original, cleaned, prompts, gs, neurons, reference=ref,
                                         keep={"p1"}, log=lines.append)
    # The same figures; only the number of prompts pictured follows the (patched) picture cap.
    assert chunked[0].pop("pictured") == 2 and whole[0].pop("pictured") == 5
    assert chunked[0] == whole[0] and whole[0]["prompts"] == 5 and whole[0]["preservation"]["prompts"] == 3
    assert whole[0]["preservation"]["random_control"]["neurons"] == 4
    assert len(lines) == 4 and lines[-1].startswith("verify: sampled 8/8 prompts (5 memorized, 3 reference)")
    labels = [g[0] for g in chunked[1]]
    assert labels == ["p0 (-)", "p4 (-)"] + [f"reference prompt {k} (not memorized)" for k in (1, 2, 3)]
    assert len(whole[1]) == 5 + 3 and set(whole[2]) == {f"p{i}" for i in range(5)}
    assert set(chunked[2]) == {"p1"} and np.array_equal(chunked[2]["p1"]["cleaned"], whole[2]["p1"]["cleaned"])
    assert chunked[2]["p1"]["cleaned"].dtype == np.uint8  # held for the audit as the pixels they are
    # Without a VAE nothing can be sampled: no figures, and no failure either.
    bare = verify.generation_measures(dataclasses.replace(original, vae=None), cleaned, prompts, gs, neurons,
                                      reference=ref)
    assert bare == ({"prompts": 0, "reproduced_before": 0, "reproduced_after": 0, "removed_share": None, "rows": []},
                    [], {})


def test_verification_sampling_resumes_from_its_journal(models, tmp_path, monkeypatch) -> None:
    """Full sampling of a large corpus takes hours: a run stopped after some chunks resumes from
    its journal, samples only the chunks it lacks, and gives what an uninterrupted run gives,
    pictures and reusable samples included. A journal of other inputs is started afresh."""
    import nemo_surgery.surgery.verify as verify

    original, cleaned, _, _ = models
    prompts, gs, neurons, ref = _sampling_case(cleaned, tmp_path)
    monkeypatch.setattr(verify, "CHUNK_PROMPTS", 3)  # 8 prompts: chunks of 3, 3 and 2
    calls = []
    real = verify.generate
    monkeypatch.setattr(verify, "generate", lambda model, texts, settings: calls.append(len(texts)) or real(
        model, texts, settings))

    def run(journal=None, neurons=neurons):
        calls.clear()
        return verify.generation_measures(original, cleaned, prompts, gs, neurons, reference=ref, keep={"p1", "p4"},
                                          journal=journal)

    whole = run()
    # the reference prompts span two chunks: whether each image is still its own prompt's is
    # judged among all of them, from thumbnails a resumed run reads back from the journal
    assert whole[0]["preservation"]["chance"] == round(1 / len(ref), 4) and len(ref) > 2
    journal = tmp_path / "work" / "verify.jsonl"
    first = run(journal)
    assert first[0] == whole[0] and len(calls) == 3 * 3  # before, after, control for each chunk
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 3
    from safetensors.numpy import load_file

    assert {v.dtype for f in (tmp_path / "work" / "verify-images").iterdir() for v in load_file(str(f)).values()} == {
        np.dtype(np.uint8)}  # and read back bit for bit below
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # stopped while writing chunk 2
    resumed = run(journal)
    assert calls == [3, 3, 3, 2, 2, 2]  # chunks 2 and 3 only
    assert resumed[0] == whole[0]
    assert [g[0] for g in resumed[1]] == [g[0] for g in whole[1]]
    for a, b in zip(resumed[1], whole[1]):
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert set(resumed[2]) == {"p1", "p4"}
    assert all(np.array_equal(resumed[2][k][m], whole[2][k][m]) for k in resumed[2] for m in ("original", "cleaned"))
    loaded = []
    real_load = verify.load_image
    monkeypatch.setattr(verify, "load_image", lambda path, size: loaded.append(path) or real_load(path, size))
    again = run(journal)
    # All on record: nothing sampled, and no training image read for a nearest-image search.
    assert calls == [] and loaded == [] and again[0] == whole[0]
    other = run(journal, neurons={cleaned.value_layers[0].path: [5, 6]})
    assert len(calls) == 9 and other[0]["random_control"]["neurons"] == 2
    # The same neurons listed in another layer order draw the same control, so the journal holds.
    a, b = (v.path for v in cleaned.value_layers[:2])
    first_order = run(journal, neurons={a: [1], b: [2]})
    reordered = run(journal, neurons={b: [2], a: [1]})
    assert calls == [] and reordered[0] == first_order[0] == run(neurons={b: [2], a: [1]})[0]


def test_original_images_are_kept_and_reused(models, tmp_path, monkeypatch) -> None:
    """`curve` measures many plans against one original: its images are sampled once, kept bit for
    bit, and sampled again only for other prompts or settings, or where the kept copy is damaged."""
    import nemo_surgery.surgery.verify as verify

    original = models[0]
    calls, real = [], verify.generate
    monkeypatch.setattr(verify, "generate", lambda m, t, s: calls.append(t) or real(m, t, s))
    gs = GenSettings(steps=2, seeds=(0, 1))
    first, was_kept = verify._original_images(original, ["a red fox"], gs, tmp_path)
    again, kept_now = verify._original_images(original, ["a red fox"], gs, tmp_path)
    assert len(calls) == 1 and np.array_equal(first, again) and again.dtype == first.dtype
    assert not was_kept and kept_now
    # Kept as the 8-bit pixels sampling gives (a quarter of float32's bytes), read back exactly.
    from safetensors.numpy import load_file

    (stored,) = load_file(str(next(tmp_path.glob("original-*.safetensors")))).values()
    assert stored.dtype == np.uint8 and np.array_equal(stored.astype(np.float32) / 255, first)
    verify._original_images(original, ["a red fox"], GenSettings(steps=3, seeds=(0, 1)), tmp_path)
    verify._original_images(original, ["a blue boat"], gs, tmp_path)
    assert len(calls) == 3
    kept = sorted(tmp_path.glob("original-*.safetensors"))
    assert len(kept) == 3
    for f in kept:
        f.write_bytes(f.read_bytes()[:40])
    resampled, from_disk = verify._original_images(original, ["a red fox"], gs, tmp_path)
    assert np.array_equal(resampled, first) and not from_disk and len(calls) == 4


def test_image_size_need_not_be_a_multiple_of_8(tmp_path) -> None:
    """A model trained elsewhere may pair 10 px latents with a VAE that doubles them: diffusers'
    pipeline refuses 20 px, but sampling passes latents of the model's own size and works."""
    from nemo_surgery.generation import generate, image_size

    model = load_model(save_tiny_pipeline(tmp_path / "m", sample_size=10))
    assert image_size(model) == 20
    images = generate(model, ["a red fox"], GenSettings(steps=2, seeds=(0, 1)))
    assert images.shape == (1, 2, 20, 20, 3) and np.isfinite(images).all() and images.std() > 0


def test_reproductions_counted_per_prompt_type() -> None:
    """Full sampling's counts split by the corpus's prompt types add up to the totals; a corpus
    without types gets no split."""
    from nemo_surgery.generation import GenSettings
    from nemo_surgery.surgery.verify import _generation_summary

    def row(ptype: str | None, before: bool, after: bool, rand: bool) -> dict:
        return {"type": ptype, "reproduced_before": before, "reproduced_after": after, "reproduced_random": rand,
                "copied_before": before, "copied_after": False, "copied_random": rand}

    rows = [row("VM", True, False, True), row("VM", True, True, True), row("VM", False, False, False),
            row("TM", True, True, False), row(None, False, False, False)]
    s = _generation_summary(rows, [], GenSettings(steps=2, seeds=(0, 1)), {"neurons": 3, "seed": 0}, pictured=5)
    vm, tm, untyped = s["by_type"]["VM"], s["by_type"]["TM"], s["by_type"]["untyped"]
    assert (vm["prompts"], vm["reproduced_before"], vm["reproduced_after"], vm["removed_share"]) == (3, 2, 1, 0.5)
    assert (vm["copies_before"], vm["copies_after"], vm["random_reproduced"], vm["random_removed_share"]) == (2, 0, 2, 0.0)
    assert (tm["reproduced_before"], tm["reproduced_after"], tm["removed_share"]) == (1, 1, 0.0)
    assert untyped["removed_share"] is None
    assert sum(t["reproduced_after"] for t in s["by_type"].values()) == s["reproduced_after"] == 2
    bare = _generation_summary([row(None, True, False, False)], [], GenSettings(steps=2, seeds=(0, 1)), None, 1)
    assert "by_type" not in bare and "random_reproduced" not in str(bare)


def test_removal_where_nothing_was_reproduced_before() -> None:
    """"0 before, 1 after" is not "100 % removed": nothing was there to remove, a reproduction
    that appears only after surgery is counted as such, and the release gate fails on it."""
    from nemo_surgery.export.records import removal_text
    from nemo_surgery.surgery.verify import _appeared, _gone, sampling_removal

    def row(before: bool, after: bool) -> dict:
        return {"reproduced_before": before, "reproduced_after": after}

    rows = [row(True, False), row(True, True), row(False, True), row(False, False)]
    was = [r for r in rows if r["reproduced_before"]]
    assert _gone(was, "reproduced_after") == 0.5 and _appeared(rows, "reproduced") == 1
    assert _gone([], "reproduced_after") is None
    summary = {"removed_share": 0.5, "reproduced_after": 2, "appeared_after": 1}
    assert sampling_removal(summary) == 0.5 and removal_text(summary) == "50.0% removed; 1 reproduced only after surgery"
    fresh = {"removed_share": None, "reproduced_after": 1, "appeared_after": 1}
    assert sampling_removal(fresh) == 0.0 and removal_text(fresh).startswith("nothing to remove")
    clean = {"removed_share": None, "reproduced_after": 0, "appeared_after": 0}
    assert sampling_removal(clean) == 1.0 and removal_text(clean) == "nothing to remove"


def test_curve_choice_names_the_sizes_a_release_could_take() -> None:
    """`curve`'s choice, in the release gate's terms: the smallest K removing enough, the K that
    removes most while the other prompts keep their images, and the smallest doing both."""
    from nemo_surgery.surgery.verify import curve_choice, curve_choice_text

    def row(k, removed, own):
        return {"neurons": k, "removed_share": removed, "reference_own_prompt_nearest": own}

    # The demo's curve (docs/demo.md): no size does both.
    demo = [row(0, 0.0, 1.0), row(10, 0.0, 0.95), row(25, 0.0, 0.91), row(50, 0.09, 0.78), row(248, 0.73, 0.27)]
    c = curve_choice(demo, 0.95, 0.95)
    assert (c["smallest_removing"], c["most_removing_preserved"], c["meets_both"]) == (None, 10, None)
    assert curve_choice(demo, 0.7, 0.9)["smallest_removing"] == 248  # K = 0, the original, is never chosen
    assert curve_choice(demo, 0.7, 0.9)["most_removing_preserved"] == 10  # a tie in removal: the smaller
    assert curve_choice(demo, 0.7, 0.75)["most_removing_preserved"] == 50
    text = curve_choice_text(c, demo)
    assert "no size has both 95% of reproductions removed and 95% of reference images" in text
    assert "none removes that many" in text and "K = 10 removes most (0%) while keeping that many" in text
    # A model whose memorization is local: a small K does both, and the smallest such is named.
    local = [row(2, 0.5, 1.0), row(5, 1.0, 0.97), row(8, 1.0, 0.96), row(40, 1.0, 0.6)]
    c = curve_choice(local, 0.95, 0.95)
    assert (c["smallest_removing"], c["most_removing_preserved"], c["meets_both"]) == (5, 5, 5)
    assert curve_choice_text(c, local).startswith("curve: K = 5 is the smallest size with both")
    # Without a reference image sampled nothing counts as preserved; nothing to remove, no K.
    assert curve_choice([row(5, 1.0, None)], 0.95, 0.95)["most_removing_preserved"] is None
    assert curve_choice([row(5, None, 1.0)], 0.95, 0.95)["meets_both"] is None


def test_release_conditions_say_which_one_failed() -> None:
    """verify.json's `conditions`: each figure against its bar; what was not measured is said so
    and not held against the bundle."""
    from nemo_surgery.surgery.verify import is_releasable, release_conditions

    mem = {"prompts": 13, "share": 0.0}
    gen = {"prompts": 13, "removed_share": 0.727, "reproduced_after": 3}
    c = release_conditions(True, True, mem, gen, {"own_prompt_nearest": 0.266}, 0.95, 0.95)
    assert c["weights"] == c["masked_equals_zeroed"] == {"met": True}
    assert c["mitigated_by_score"] == {"share": 0.0, "required": 0.95, "met": False}
    assert c["removed_by_sampling"] == {"share": 0.727, "required": 0.95, "met": False}
    assert c["preserved"] == {"share": 0.266, "required": 0.95, "met": False}
    good = release_conditions(True, True, {"prompts": 2, "share": 1.0}, {"prompts": 2, "removed_share": 1.0},
                              {"own_prompt_nearest": 0.97}, 0.95, 0.95)
    assert all(v["met"] for v in good.values()) and is_releasable(good) and not is_releasable(c)
    assert not release_conditions(False, True, {"prompts": 2, "share": 1.0}, {"prompts": 2, "removed_share": 1.0},
                                  {"own_prompt_nearest": 0.97}, 0.95, 0.95)["weights"]["met"]
    # No training image, no reference prompt sampled: the score alone decides.
    bare = release_conditions(True, True, {"prompts": 2, "share": 1.0}, {"prompts": 0, "removed_share": None,
                                                                         "reproduced_after": 0}, None, 0.95, 0.95)
    assert bare["removed_by_sampling"] == bare["preserved"] == {"measured": False, "met": True}
    # Nothing the original reproduced, but the cleaned model began to: not removed.
    began = release_conditions(True, True, {"prompts": 2, "share": 1.0},
                               {"prompts": 2, "removed_share": None, "reproduced_after": 1}, None, 0.95, 0.95)
    assert began["removed_by_sampling"]["met"] is False
    # No memorized prompt at all: nothing to mitigate or remove.
    none = release_conditions(True, True, {"prompts": 0, "share": 1.0}, {"prompts": 0, "removed_share": None,
                                                                         "reproduced_after": 0}, None, 0.95, 0.95)
    assert none["mitigated_by_score"] == {"measured": False, "met": True}
