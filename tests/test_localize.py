"""Localization on tiny in-code models: masks vs surgery, the onnxruntime backend against torch,
calibration cache, the batched engine against the plain published algorithm, resumable results,
the merge."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention

from nemo_surgery.corpus import read_corpus
from nemo_surgery.engine import Runtime, make_engine, make_scorer
from nemo_surgery.errors import NemoError
from nemo_surgery.localize.detect import detect
from nemo_surgery.localize.fused_attention import FusedAttnProcessor, _MultiHeadAttention, fused_attention, fused_nodes
from nemo_surgery.localize.merge import MergeSettings, make_plan, union
from nemo_surgery.localize.ort_unet import open_ort_unet
from nemo_surgery.localize.prefix import CACHE_BYTES
from nemo_surgery.localize.runner import results_libraries, run_corpus
from nemo_surgery.localize.score import Scorer, value_activations
from nemo_surgery.localize.search import Localizer
from nemo_surgery.localize.settings import MsSsim, ScoreSettings, SearchSettings
from nemo_surgery.model import load_model, zeroed_rows
from reference_nemo import assert_differs_by_float_noise, first_divergence, plain_nemo
from tiny import save_tiny_pipeline

PROMPTS = ["a small red circle at the top left on blue background",
           "a large green square at the center on white background",
           "a medium yellow star at the bottom on black background",
           "rusty teapot photographed at dawn", "golden violin photographed by night",
           "frozen harbor photographed in winter"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    model_dir = save_tiny_pipeline(root / "model", seed=3)
    ref = root / "reference.txt"
    ref.write_text("\n".join(PROMPTS) + "\n")
    corpus = root / "corpus.txt"
    corpus.write_text("official portrait of astronaut eileen collins\nchelsea the tabby cat staring sideways\n")
    model = load_model(model_dir)
    engine = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), SearchSettings(),
                         cache_dir=root / "cache")
    assert engine.scorer.settings.backend == "onnxruntime"  # what `auto` picks on a CPU
    return root, model, engine, ref, corpus


def torch_scorer(engine) -> Scorer:
    return Scorer(engine.model, engine.scorer.settings, engine.scorer.batch_size)


def force_memorized(engine, theta=0.05):
    """The random tiny model memorizes nothing; a low theta_mem makes every prompt take the
    whole search so that every code path and decision is exercised."""
    engine.calibration = dataclasses.replace(engine.calibration, theta_mem=theta)
    return engine


def test_msssim_window_fits_small_latents():
    assert MsSsim.for_size(64) == MsSsim(11, 1.5, 3, True)
    small = MsSsim.for_size(16)
    assert (small.kernel_size, small.sigma, small.scales, small.published) == (3, 0.5, 3, False)


def test_masks_equal_zeroed_rows_bit_for_bit(tiny):
    _, model, engine, _, _ = tiny
    sc = torch_scorer(engine)
    neurons = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": frozenset({0, 3, 7}),
               "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": frozenset({1})}
    emb = sc.embed(["official portrait of astronaut eileen collins"]).expand(4, -1, -1)
    masked = sc.noise_diff(emb, sc.latents, [neurons] * 4)
    with zeroed_rows(model, neurons):
        zeroed = sc.noise_diff(emb, sc.latents)
    plain = sc.noise_diff(emb, sc.latents)
    assert torch.equal(masked, zeroed)
    assert not torch.equal(masked, plain)
    # per-sample masks: only sample 1 blocked
    mixed = sc.noise_diff(emb, sc.latents, [{}, neurons, {}, {}])
    assert torch.equal(mixed[1], masked[1]) and torch.equal(mixed[0], plain[0])


def test_onnxruntime_backend_agrees_with_torch(tiny, tmp_path):
    root, model, engine, _, _ = tiny
    fast, exact = engine.scorer, torch_scorer(engine)
    layers = [v.path for v in model.value_layers]
    emb = exact.embed(["official portrait of astronaut eileen collins"]).expand(8, -1, -1)
    lat = exact.latents.repeat(2, 1, 1, 1)
    # per-sample sets over several layers, up path included, and unmasked samples
    sets = [{}, {layers[0]: frozenset({0, 1})}, {layers[3]: frozenset(range(5)), layers[-1]: frozenset({2})}, {},
            {layers[6]: frozenset({4})}, {}, {layers[1]: frozenset({3}), layers[9]: frozenset({0, 7})}, {}]
    want = exact.noise_diff(emb, lat, sets)
    got = fast.noise_diff(emb, lat, sets)
    assert (got - want).abs().max() < 1e-4
    assert not torch.equal(want[1], want[0])  # the masks changed something the check can see
    # Candidates that share their first layers (as in refinement): the shared layers run once per
    # distinct (latent, prompt) row, then the rows are gathered out to the candidates.
    unet = fast.unet
    assert unet.points and unet.split == 2, "the tiny UNet has an SD layout: the search graph is cut after level 0"
    common = {layers[1]: frozenset({0, 2})}
    cands = [{**common, layers[4]: frozenset({k})} for k in range(3)] + [{**common, layers[12]: frozenset({1})}]
    emb16, lat16, sets16 = emb[:1].expand(16, -1, -1), exact.latents.repeat_interleave(4, 0), cands * 4
    feeds, _ = unet.feeds(lat16.numpy(), 981.0, emb16.contiguous().numpy(), sets16)
    assert len(feeds["sample"]) == 4 and len(feeds["mask_0"]) == 4 and len(feeds[f"mask_{len(layers) - 1}"]) == 16
    assert_head_states_kept(fast, exact, unet, emb16, lat16, sets16, common, layers)
    # Candidates that part at different layers: each block runs once per distinct state there.
    # Of the four distinct candidates, one parts from the others at layer 4, the rest only in the
    # up path; the first is there twice and computed once.
    parting = [{**common}, {**common, layers[4]: frozenset({1})}, {**common, layers[12]: frozenset({2})},
               {**common, layers[12]: frozenset({3})}, {**common}]
    lat20, emb20, sets20 = exact.latents.repeat_interleave(5, 0), emb[:1].expand(20, -1, -1), parting * 4
    feeds, out = unet.feeds(lat20.numpy(), 981.0, emb20.contiguous().numpy(), sets20)
    assert len(feeds["mask_4"]) == 8 and len(feeds[f"mask_{len(layers) - 1}"]) == 16 and len(out) == 20
    got20 = fast.noise_diff(emb20, lat20, sets20)
    assert torch.equal(got20[0], got20[4])
    alone = torch.cat([fast.noise_diff(emb20[i:i + 1], lat20[i:i + 1], sets20[i:i + 1]) for i in range(20)])
    assert (got20 - alone).abs().max() < 1e-6
    assert (got20 - exact.noise_diff(emb20, lat20, sets20)).abs().max() < 1e-4
    # A sample's result does not depend on how the batch is cut over the worker threads.
    one = fast.unet.threads
    fast.unet.threads = 1
    try:
        assert (fast.noise_diff(emb, lat, sets) - got).abs().max() < 1e-6
    finally:
        fast.unet.threads = one
    # The graph is cached per model; a damaged cached graph is exported again, not trusted.
    logs: list[str] = []
    again = open_ort_unet(model, root / "cache", log=logs.append)
    assert again.graphs == fast.unet.graphs and any("reusing" in m for m in logs)
    # onnxslim rewrote both graphs (fewer nodes), and the results above were checked on them.
    report = json.loads((again.folder / "search.json").read_text())
    assert report["split"] == 2 and report["graphs"] == ["head", "tail"]
    for simplified in report["simplified"]:
        slim = re.fullmatch(r"onnxslim \S+: (\d+) -> (\d+) nodes", simplified)
        assert slim and int(slim[2]) < int(slim[1])
    # Every attention ran as one fused onnxruntime node in the results above.
    attentions = sum(isinstance(m, Attention) for m in model.unet.modules())
    assert report["fused_attention"] == sum(map(fused_nodes, again.graphs)) == attentions > 0
    assert not report["unfused_because"]
    tail = again.graphs[1]
    data = tail.read_bytes()
    tail.write_bytes(data[: len(data) // 2])
    logs.clear()
    fixed = open_ort_unet(model, root / "cache", log=logs.append)
    assert any("exporting" in m for m in logs) and fixed.graphs[1].stat().st_size == len(data)
    # A model whose weights differ only outside the value layers (same NeMo fingerprint) gets its own graph.
    w = model.unet.conv_in.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.5)
    try:
        other = open_ort_unet(model, root / "cache", log=logs.append)
        assert other.folder != fast.unet.folder
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert make_scorer(model, Runtime(backend="torch"), ScoreSettings(seeds=4)).settings.backend == "torch"
    with pytest.raises(NemoError, match="backend"):
        make_scorer(model, Runtime(backend="tpu"))


def test_fused_attention_traces_as_diffusers_and_falls_back(tiny, tmp_path, monkeypatch):
    root, model, engine, _, _ = tiny
    unet = model.unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, model.latent_size, model.latent_size, generator=g)
    e = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    with torch.no_grad():
        want = unet(x, 981, encoder_hidden_states=e).sample
        with fused_attention(unet) as n:
            assert n == len(before) and all(type(p) is FusedAttnProcessor for p in unet.attn_processors.values())
            got = unet(x, 981, encoder_hidden_states=e).sample
    assert torch.equal(got, want)  # what the tracer sees is diffusers' attention, op for op
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before
    # A graph whose fused nodes onnxruntime cannot run is exported again unfused, and says why.
    monkeypatch.setattr(_MultiHeadAttention, "symbolic",
                        staticmethod(lambda g, q, k, v, heads: g.op("com.microsoft::NoSuchAttention", q, k, v)))
    logs: list[str] = []
    runner = open_ort_unet(model, tmp_path / "cache", log=logs.append)
    report = json.loads((runner.folder / "search.json").read_text())
    assert report["fused_attention"] == sum(map(fused_nodes, runner.graphs)) == 0
    assert "NoSuchAttention" in report["unfused_because"]
    assert any(m.startswith("onnxruntime: fused attention left out") for m in logs)
    try:
        assert (runner(x, torch.tensor(981.0), e, None) - want).abs().max() < 1e-4
    finally:
        runner.close()


def test_detection_summary_and_auroc():
    """The paper's detection figure: AUROC of the corpus's scores against the reference prompts',
    ties counted half, with the false positives at theta_mem; checked against a pair-by-pair count."""
    from nemo_surgery.localize.detect import auroc, detection_summary, detection_text

    rng = np.random.default_rng(0)
    pos, neg = rng.random(40).round(2) + 0.3, rng.random(70).round(2)
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(list(pos), list(neg)) == pytest.approx(pairs, abs=1e-12) and 0.5 < pairs < 1
    assert auroc([0.9], [0.1, 0.2]) == 1.0 and auroc([0.2], [0.2]) == 0.5 and auroc([], [0.1]) is None
    recs = [{"score": 0.7, "type": "VM", "memorized": True}, {"score": 0.5, "type": "TM", "memorized": True},
            {"score": 0.15, "type": "TM", "memorized": False}]
    d = detection_summary(recs, [0.1, 0.2, 0.3, 0.12], theta_mem=0.25)
    assert d["memorized"] == 2 and d["by_type"] == {"TM": {"prompts": 2, "memorized": 1}, "VM": {"prompts": 1,
                                                                                             "memorized": 1}}
    assert d["reference_above_theta_mem"] == 1 and d["false_positive_share"] == 0.25
    assert d["auroc_against_reference"] == pytest.approx((4 + 4 + 2) / 12, abs=1e-6)
    assert detection_text(d) == ("2 of 3 prompts memorized (TM 1/2, VM 1/1); AUROC 0.833 against 4 reference "
                                 "prompts, 1 of them (25%) above theta_mem 0.2500")


def test_calibration_resumes_its_scoring(tiny, tmp_path):
    """Scoring the reference prompts is calibration's long part: interrupted, it resumes from the
    scores already kept, and gives what an uninterrupted calibration gives."""
    from nemo_surgery.engine import get_calibration

    _, model, engine, ref, _ = tiny
    scorer, calls = engine.scorer, []
    real = scorer.prompt_noise_diffs

    def counted(emb, stop_at=None):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(emb)

    whole = get_calibration(model, scorer, ref, tmp_path / "a")
    try:
        scorer.prompt_noise_diffs = lambda emb: counted(emb, stop_at=4)
        with pytest.raises(KeyboardInterrupt):
            get_calibration(model, scorer, ref, tmp_path / "b")
        (journal,) = (tmp_path / "b" / "calibration").glob("*.scores.jsonl")
        assert len(journal.read_text().splitlines()) == 1 + 3
        calls.clear()
        logs: list[str] = []
        scorer.prompt_noise_diffs = counted
        resumed = get_calibration(model, scorer, ref, tmp_path / "b", log=logs.append)
    finally:
        del scorer.prompt_noise_diffs
    assert len(calls) == len(PROMPTS) - 3 and any("resuming: 3 of 6" in m for m in logs)
    assert resumed.reference_scores == whole.reference_scores and resumed.theta_mem == whole.theta_mem
    assert not journal.exists() and resumed.key() == whole.key()


def test_calibration_statistics_and_cache(tiny):
    root, model, engine, ref, _ = tiny
    cal = engine.calibration
    assert set(cal.mean) == {v.path for v in model.value_layers}
    assert cal.n_reference == len(PROMPTS) and len(cal.reference_scores) == len(PROMPTS)
    scores = torch.tensor(cal.reference_scores, dtype=torch.float64)
    assert cal.theta_mem == pytest.approx(float(scores.mean() + scores.std()), abs=1e-5)
    # activation mean computed independently for one layer
    layer = model.value_layers[0].path
    emb = engine.scorer.embed(PROMPTS)
    a = (emb @ model.to_v(layer).weight.T).abs().mean(1)
    assert torch.allclose(cal.mean[layer], a.mean(0), atol=1e-6)
    again = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), cache_dir=root / "cache")
    assert again.calibration.theta_mem == cal.theta_mem
    assert torch.equal(again.calibration.std[layer], cal.std[layer])
    # --theta-mem: the user's threshold replaces mean + 1 std, is recorded as given, and leaves the
    # cached calibration alone.
    given = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), cache_dir=root / "cache",
                        theta_mem=0.5)
    assert given.calibration.theta_mem == 0.5 and given.calibration.summary()["theta_mem_given"] is True
    assert given.calibration.reference_scores == cal.reference_scores and not cal.theta_mem_given
    kept = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), cache_dir=root / "cache")
    assert kept.calibration.theta_mem == cal.theta_mem and not kept.calibration.theta_mem_given
    # Made on another torch: still reused (recalibrating is hours on a CPU), and said.
    meta_path = root / "cache" / "calibration" / cal.key() / "calibration.json"
    meta = json.loads(meta_path.read_text())
    torch_now = meta["tool"]["libraries"]["torch"]
    meta["tool"]["libraries"]["torch"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    said: list[str] = []
    older = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), cache_dir=root / "cache",
                        log=said.append)
    assert older.calibration.theta_mem == cal.theta_mem
    [note] = [m for m in said if m.startswith("calibration: reusing")]
    assert f"made on other library versions: torch 0.0.1 -> {torch_now}" in note, note
    # Another precision is another calibration: a bf16 one must never stand in for fp32's.
    logs: list[str] = []
    half = make_engine(model, ref, Runtime(batch_size=32, precision="bf16", backend="torch"), ScoreSettings(seeds=4),
                       cache_dir=root / "cache", log=logs.append)
    assert half.scorer.settings.precision == "bf16" and cal.score_settings["precision"] == "fp32"
    assert half.calibration.key() != cal.key() and not any("reusing" in m for m in logs)
    # theta_mem comes from UNet passes: a UNet that differs outside the value layers (same
    # fingerprint) is another calibration.
    import copy

    from nemo_surgery.localize.calibrate import cache_key, calibration_settings
    from nemo_surgery.model import fingerprint

    n = cal.score_settings["score_prompts"]
    assert cache_key(model.fingerprint, cal.reference_sha256, calibration_settings(model, engine.scorer, n)) == cal.key()
    other = dataclasses.replace(model, unet=copy.deepcopy(model.unet))
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1e-3)
    assert fingerprint(other.unet, other.text_encoder, other.tokenizer) == model.fingerprint
    assert cache_key(model.fingerprint, cal.reference_sha256, calibration_settings(other, engine.scorer, n)) != cal.key()


class _Predicting:
    """The tiny model's UNet as if trained to predict v or the clean sample: its epsilon output
    turned into the other target with diffusers' own definitions."""

    def __init__(self, model, prediction: str, alpha_prod: float):
        self.model, self.prediction, self.a = model, prediction, alpha_prod

    @torch.no_grad()
    def __call__(self, x, t, text, sets):
        eps = self.model.unet(x, t, encoder_hidden_states=text).sample
        x0 = (x - (1 - self.a) ** 0.5 * eps) / self.a ** 0.5
        if self.prediction == "sample":
            return x0
        return DDIMScheduler.from_config(self.model.scheduler_config).get_velocity(x0, eps, t.reshape(1))

    def close(self):
        pass


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_noise_difference_is_taken_on_epsilon_whatever_the_unet_predicts(tiny, prediction):
    """NeMo's noise difference is eps_hat - x_T: a UNet that predicts v (SD 2.x 768) or the clean
    sample must give the same difference as the epsilon model it was derived from, and the target
    is recorded with the timestep."""
    model = tiny[1]
    settings = ScoreSettings(seeds=4)
    eps_scorer = Scorer(model, settings, 32)
    emb = eps_scorer.embed(["official portrait of astronaut eileen collins"])
    want = eps_scorer.prompt_noise_diffs(emb)
    other = dataclasses.replace(model, scheduler_config={**model.scheduler_config, "prediction_type": prediction})
    t = eps_scorer.timestep
    alpha = float(DDIMScheduler.from_config(model.scheduler_config).alphas_cumprod[int(t)])
    scorer = Scorer(other, settings, 32, unet=_Predicting(model, prediction, alpha))
    got = scorer.prompt_noise_diffs(emb)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    raw = Scorer(model, settings, 32, unet=_Predicting(model, prediction, alpha)).prompt_noise_diffs(emb)
    assert not torch.allclose(raw, want, atol=1e-2)  # read as epsilon, the output is another signal
    assert scorer.settings.prediction_type == prediction and scorer.settings.timestep == int(t)
    assert eps_scorer.settings.to_dict()["prediction_type"] == "epsilon"
    bad = dataclasses.replace(model, scheduler_config={**model.scheduler_config, "prediction_type": "flow"})
    with pytest.raises(NemoError, match="prediction_type 'flow'"):
        Scorer(bad, settings, 32)


def test_z_scores_follow_the_activations_device(tiny):
    """The statistics live on the CPU (saved, loaded, cached); a model on a GPU hands in
    activations on the GPU. The meta device stands in for one: no values, but device mixing
    fails there as it does on CUDA."""
    _, model, engine, _, _ = tiny
    cal = engine.calibration
    acts = {k: torch.empty(1, len(v), device="meta", dtype=torch.float16) for k, v in cal.mean.items()}
    z = cal.z(acts)
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in z.values())
    masks = engine.scorer.masks.build([{model.value_layers[0].path: {0, 1}}], torch.device("meta"))
    assert all(m.device.type == "meta" for m in masks.values())


def test_initial_selection_steps(tiny):
    """theta_act from its start down by its step to its floor, k from --top-k-start up by its step:
    each step's set holds every neuron above theta_act and the layer's top k."""
    _, model, engine, _, _ = tiny
    s = SearchSettings(theta_act_start=3.0, theta_act_step=0.5, theta_act_min=1.0, top_k_start=2, top_k_step=1)
    loc = Localizer(engine.scorer, engine.calibration, engine.layers, s)
    emb = engine.scorer.embed(["chelsea the tabby cat staring sideways"])
    steps = loc.initial_candidates(emb)
    assert [(t, k) for t, k, _ in steps] == [(3.0, 2), (2.5, 3), (2.0, 4), (1.5, 5), (1.0, 6)]
    # k stops at the narrowest layer's width (8) before theta_act reaches its floor
    wide = Localizer(engine.scorer, engine.calibration, engine.layers, dataclasses.replace(s, top_k_step=3))
    assert [k for _, k, _ in wide.initial_candidates(emb)] == [2, 5, 8]
    z = engine.calibration.z(value_activations(model, emb, engine.layers))
    for theta, k, sel in steps:
        for v in engine.layers:
            above = set(torch.nonzero(z[v.path][0] > theta).flatten().tolist())
            assert above <= sel[v.path] and len(sel[v.path]) >= min(k, v.out_features)


def assert_plain_decisions(engine, prompt: str):
    """The published algorithm as its code runs it (torch, one candidate per pass) against the
    batched engine (onnxruntime): the same initial and refined sets."""
    ref = plain_nemo(torch_scorer(engine), engine.calibration, engine.layers, prompt, engine.search)
    emb = engine.scorer.embed([prompt])
    d = engine.scorer.prompt_noise_diffs(emb)
    det = detect(engine.scorer, d, engine.calibration.theta_mem)
    got = Localizer(engine.scorer, engine.calibration, engine.layers, engine.search).localize(
        "x", prompt, None, emb, d, det)
    assert ref["memorized"] and list(det.memorized_seeds) == ref["seeds"]
    assert got.initial == ref["initial"]
    assert got.threshold == pytest.approx(ref["threshold"], abs=1e-5)
    if got.refined != ref["refined"]:
        # Only a decision within float noise of its threshold may flip between backends and
        # batch layouts, and the engine must have reported it.
        assert got.near_threshold
        assert_differs_by_float_noise(ref, got)
    else:  # the engine's trace is the sequential walk's, decision for decision
        assert first_divergence(ref["decisions"], got.decisions) is None
    return got


@pytest.mark.parametrize("criterion", ["published", "consistency"])
def test_batched_engine_takes_the_plain_algorithms_decisions(tiny, criterion):
    _, _, engine, _, _ = tiny
    force_memorized(engine)
    engine = dataclasses.replace(engine, search=dataclasses.replace(engine.search, criterion=criterion))
    for prompt in ["official portrait of astronaut eileen collins", "chelsea the tabby cat staring sideways"]:
        assert_plain_decisions(engine, prompt)


def assert_head_states_kept(fast, exact, runner, emb16, lat16, sets16, common, layers):
    """A runner cut after level 0 keeps the head's states from pass to pass: what it computes,
    what it reuses, and its budget (`prefix.HeadStates`). 16 samples: 4 seeds x `sets16`'s 4
    candidates, which share `common` and differ from layer 4 on (after the cut)."""
    cache = runner.cache
    runner.clear()  # an empty cache: what the head computes is counted below
    rows0 = cache.computed
    got16 = fast.noise_diff(emb16, lat16, sets16)
    assert (got16 - exact.noise_diff(emb16, lat16, sets16)).abs().max() < 1e-4
    # The head (everything before down_blocks.1) ran once per seed, its states kept: another pass
    # whose candidates differ only after the cut runs the tail alone, with the same results as
    # computing everything again.
    assert cache.computed - rows0 == 4 and len(cache) == 4
    later = [{**common, layers[5]: frozenset({k})} for k in range(4)] * 4
    got_later = fast.noise_diff(emb16, lat16, later)
    assert cache.computed - rows0 == 4
    runner.clear()
    assert (fast.noise_diff(emb16, lat16, later) - got_later).abs().max() < 1e-6
    assert cache.computed - rows0 == 8
    assert (got_later - exact.noise_diff(emb16, lat16, later)).abs().max() < 1e-4
    # A candidate that differs before the cut has its own head state; the others' are reused.
    before = [{**common, layers[0]: frozenset({1})}] + later[1:]
    got_before = fast.noise_diff(emb16, lat16, before)
    assert cache.computed - rows0 == 9
    assert (got_before - exact.noise_diff(emb16, lat16, before)).abs().max() < 1e-4
    # The cache holds at most its budget: the oldest states go first.
    cache.cap = 2 * sum(a.nbytes for a in next(iter(cache.items.values())))
    runner.clear()
    fast.noise_diff(emb16, lat16, later)
    assert len(cache) == 2 and cache.bytes <= cache.cap
    cache.cap = CACHE_BYTES


def test_torch_prefix_agrees_with_diffusers_forward(tiny):
    """The torch search pass computes each block once per distinct state (what candidates share
    once per (latent, prompt) row), as the search graph does: same noise differences as diffusers' forward within float noise, and the
    plain algorithm's decisions."""
    _, model, engine, _, _ = tiny
    fast = make_scorer(model, Runtime(backend="torch"), ScoreSettings(seeds=4))
    exact = torch_scorer(engine)
    assert fast.settings.backend == "torch" and fast.prefix is not None and exact.prefix is None
    layers = [v.path for v in model.value_layers]
    emb = exact.embed(["official portrait of astronaut eileen collins"])
    common = {layers[1]: frozenset({0, 2})}
    cands = [{**common, layers[4]: frozenset({k})} for k in range(3)] + [{**common, layers[12]: frozenset({1})}]
    parting = [common, {**common, layers[4]: frozenset({1})}, {**common, layers[12]: frozenset({2})}, common]
    for sets in (cands * 4, [{}] * 16, [{layers[0]: frozenset({1})}, {}] * 8, parting * 4):
        lat = exact.latents.repeat_interleave(4, 0)
        e = emb.expand(16, -1, -1)
        assert (fast.noise_diff(e, lat, sets) - exact.noise_diff(e, lat, sets)).abs().max() < 1e-4
    assert fast.prefix.split == 2
    assert_head_states_kept(fast, exact, fast.prefix, emb.expand(16, -1, -1), exact.latents.repeat_interleave(4, 0),
                            cands * 4, common, layers)
    layout = fast.prefix.layout
    m = layout.mask(cands * 4, 16)
    states = layout.tree(m, np.arange(16) // 4).states  # rows, then each gather point's
    part = layout.point_of[4] + 1  # the 4 seeds share everything before layer 4
    assert states[:part] == [4] * part and states[part:] == [16] * (len(states) - part)
    torch_engine = dataclasses.replace(force_memorized(engine), scorer=fast)
    assert_plain_decisions(torch_engine, "official portrait of astronaut eileen collins")
    fast.close()


def test_torch_prefix_falls_back_to_diffusers_forward(tiny, monkeypatch):
    """A UNet the block-by-block forward gets wrong or cannot run is searched with diffusers' own
    forward, and the log says why."""
    from nemo_surgery.engine import torch_prefix
    from nemo_surgery.localize.prefix import PrefixUNet

    _, model, _, _, _ = tiny
    hooks = len(model.to_v(model.value_layers[0].path)._forward_hooks)
    for broken, why in ((lambda self, *a: a[0] * 0.5, "differs from diffusers'"),
                        (lambda self, *a: self.unet.no_such_block, "fails on this model (AttributeError")):
        monkeypatch.setattr(PrefixUNet, "forward", broken)
        logs: list[str] = []
        assert torch_prefix(model, None, logs.append) is None
        assert len(logs) == 1 and why in logs[0] and "diffusers' forward" in logs[0]
    # Neither attempt leaves a mask hook behind on the model.
    assert len(model.to_v(model.value_layers[0].path)._forward_hooks) == hooks


def test_other_widths_and_latent_size(tmp_path):
    """An SD 1.x layout of other widths, head size, blocks per level, text width, text context and
    latent size, as a model trained elsewhere would have: 24 px latents are too small for the
    published MS-SSIM, so a smaller window is chosen and recorded; prompts are embedded over the
    model's own 32 token positions, not CLIP's 77; the search graph exports, agrees with torch and
    takes the plain algorithm's decisions; the plan fits the model's layers."""
    model = load_model(save_tiny_pipeline(tmp_path / "model", seed=4, text_dim=24, context=32, sample_size=24,
                                          widths=(16, 16, 32, 32), head_dim=4, layers=1))
    assert model.latent_size == 24 and model.shapes[model.value_layers[-1].path] == (16, 24)
    assert model.context == 32 and len(model.value_layers) == 10  # down 3, mid 1, up 6
    ref = tmp_path / "reference.txt"
    ref.write_text("\n".join(PROMPTS) + "\n")
    engine = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), SearchSettings(),
                         cache_dir=tmp_path / "cache")
    assert engine.scorer.settings.backend == "onnxruntime" and len(engine.layers) == 4  # official: down, mid
    m = engine.scorer.settings.msssim
    assert m == MsSsim.for_size(24) and not m.published and m.kernel_size > 3
    assert engine.scorer.embed(["a", "b c"]).shape == (2, 32, 24)
    force_memorized(engine)
    got = assert_plain_decisions(engine, "official portrait of astronaut eileen collins")
    assert got.refined and set(got.refined) <= {v.path for v in engine.layers}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("official portrait of astronaut eileen collins\n")
    recs = run_corpus(engine, read_corpus(corpus), tmp_path / "r.jsonl")
    assert recs[0]["refined"] == got.refined
    header = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert header["config"]["score"]["msssim"]["kernel_size"] == m.kernel_size
    plan = make_plan(engine, read_corpus(corpus), recs, MergeSettings())
    plan.check_against(model.shapes, fingerprint=model.fingerprint)


# UNet layouts a model trained elsewhere may have (diffusers arguments beyond tiny_unet's).
LAYOUTS = {
    "per-block cross-attention widths": {"cross_attention_dim": (16, 16, 16, 16)},
    "no mid block": {"mid_block_type": None},
    "three levels": {"down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                     "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, "block_out_channels": (8, 16, 16)},
    "simple cross-attention mid block": {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
    "layers per level": {"layers_per_block": (1, 2, 2, 1), "transformer_layers_per_block": (1, 2, 1, 1)},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unet_layouts_of_models_trained_elsewhere(tmp_path, layout):
    """Both search backends open on each layout (each checked against diffusers' forward when
    opened, on random text of the model's width) and agree; the cross-attention width may be
    given once per block, and such a UNet exports to ONNX."""
    folder = save_tiny_pipeline(tmp_path / "model", seed=2, config=LAYOUTS[layout])
    model = load_model(folder)
    assert model.text_width == 16
    diffs = []
    for backend in ("onnxruntime", "torch"):
        scorer = make_scorer(model, Runtime(batch_size=8, backend=backend), ScoreSettings(seeds=3),
                             cache_dir=tmp_path / "cache")
        assert scorer.settings.backend == backend
        diffs.append(scorer.prompt_noise_diffs(scorer.embed([PROMPTS[0]])[0]))
        scorer.close()
    assert diffs[0].shape == diffs[1].shape and torch.allclose(diffs[0], diffs[1], atol=1e-4)
    if layout == "per-block cross-attention widths":
        from nemo_surgery.export.onnx import export_unet

        export_unet(folder, tmp_path / "onnx")
        assert (tmp_path / "onnx" / "unet" / "model.onnx").is_file()


def test_results_resume_and_refuse_changed_settings(tiny, tmp_path):
    _, model, engine, ref, corpus_path = tiny
    force_memorized(engine)
    corpus = read_corpus(corpus_path)
    out = tmp_path / "results.jsonl"
    full = run_corpus(engine, corpus, out)
    assert [r["id"] for r in full] == [p.id for p in corpus.prompts]
    lines = out.read_text().splitlines()
    # a crash after the first prompt, in the middle of writing the second record
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    said: list[str] = []
    resumed = run_corpus(engine, corpus, out, log=said.append)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["header", "prompt", "prompt"]
    assert [r["refined"] for r in resumed] == [r["refined"] for r in full]
    assert said[0].startswith("resuming: 1 of 2") and "library versions" not in said[0]
    # Begun on another torch: the resume goes on and says what differs.
    torch_now = recs[0]["libraries"]["torch"]
    recs[0]["libraries"] |= {"torch": "0.0.1"}
    out.write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n")
    said.clear()
    run_corpus(engine, corpus, out, log=said.append)
    assert f"begun on other library versions (torch 0.0.1 -> {torch_now})" in said[0], said[0]
    other = dataclasses.replace(engine, search=SearchSettings(theta_act_start=4.0))
    with pytest.raises(NemoError, match="other settings"):
        run_corpus(other, corpus, out)
    again = run_corpus(other, corpus, out, restart=True)
    assert len(again) == 2


def test_merge_union_counts_and_filters():
    recs = [{"refined": {"a": [1, 2], "b": [0]}}, {"refined": {"a": [2]}}, {"refined": {}}]
    merged, counts = union(recs)
    assert merged == {"a": frozenset({1, 2}), "b": frozenset({0})}
    assert counts == {"a": {1: 1, 2: 2}, "b": {0: 1}}
    assert union(recs, min_prompts=2)[0] == {"a": frozenset({2})}
    assert union(recs, max_neurons=1)[0] == {"a": frozenset({2})}


def test_make_plan_checks_and_prunes(tiny, tmp_path):
    _, model, engine, _, corpus_path = tiny
    force_memorized(engine)
    corpus = read_corpus(corpus_path)
    recs = run_corpus(engine, corpus, tmp_path / "r.jsonl")
    plan = make_plan(engine, corpus, recs, MergeSettings())
    union_n = sum(len(r["refined"]) and sum(len(v) for v in r["refined"].values()) for r in recs)
    assert plan.check["union_neurons"] <= union_n
    assert plan.n_neurons <= plan.check["union_neurons"]
    assert plan.check["mitigated_share"] >= plan.check["union_mitigated_share"] or plan.n_neurons < plan.check["union_neurons"]
    assert plan.model["fingerprint"] == model.fingerprint
    assert plan.corpus["sha256"] == corpus.sha256
    plan.save(tmp_path / "plan.json")
    again = type(plan).load(tmp_path / "plan.json")
    assert again.layers == plan.layers
    again.check_against(model.shapes, fingerprint=model.fingerprint)
    # Results found on other library versions: the plan keeps theirs beside its own, and only then.
    found_on = results_libraries(tmp_path / "r.jsonl")
    assert found_on == plan.tool["libraries"]
    same = make_plan(engine, corpus, recs, MergeSettings(), localized_on=found_on)
    assert same.to_dict() == plan.to_dict()
    older = found_on | {"torch": "0.0.1"}
    other = make_plan(engine, corpus, recs, MergeSettings(), localized_on=older)
    assert other.tool["localization_libraries"] == older and other.tool["libraries"] == plan.tool["libraries"]
    assert other.layers == plan.layers


def test_pruning_resumes_from_its_journal(tiny, tmp_path, monkeypatch):
    """A pruning interrupted in its neuron walk restarts where its journal says and ends in the
    plan an uninterrupted merge makes; a journal of other inputs, or a damaged one, is not trusted."""
    from nemo_surgery.localize import merge as merge_mod
    from nemo_surgery.localize.search import count

    _, _, engine, _, corpus_path = tiny
    force_memorized(engine)
    corpus = read_corpus(corpus_path)
    recs = run_corpus(engine, corpus, tmp_path / "r.jsonl")
    # Nothing is mitigated at the forced theta_mem, so nothing could be pruned: a bar halfway
    # between the union's scores and 1 leaves the walk something to re-activate.
    worst = max(make_plan(engine, corpus, recs, MergeSettings()).check["blocked_scores"].values())
    monkeypatch.setattr(engine, "calibration", dataclasses.replace(engine.calibration, theta_mem=(worst + 1) / 2))
    whole = make_plan(engine, corpus, recs, MergeSettings())
    assert whole.n_neurons < whole.check["union_neurons"]
    journal = tmp_path / "plan.json.prune.json"
    monkeypatch.setattr(merge_mod, "JOURNAL_EVERY", 0.0)
    save = merge_mod.PruneJournal.save

    def interrupted(self, stage, start, decided, current, force=False):
        save(self, stage, start, decided, current, force)
        if stage == "neurons" and count(current) < count(start):  # after the first re-activation
            raise KeyboardInterrupt

    monkeypatch.setattr(merge_mod.PruneJournal, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_plan(engine, corpus, recs, MergeSettings(), journal=journal)
    saved = json.loads(journal.read_text())
    assert saved["stage"] == "neurons" and saved["decided"] > 0 and saved["current"] != saved["start"]
    monkeypatch.setattr(merge_mod.PruneJournal, "save", save)
    logs: list[str] = []
    resumed = make_plan(engine, corpus, recs, MergeSettings(), logs.append, journal=journal)
    assert any(f"resuming the neurons at {saved['decided']} of" in line for line in logs), logs
    assert resumed.layers == whole.layers and resumed.check["mitigated_share"] == whole.check["mitigated_share"]
    assert not journal.exists()  # the plan is made: nothing left to resume
    for text, why in ((json.dumps({**saved, "key": "other"}), "from other inputs"), ("{not json", "unreadable")):
        journal.write_text(text)
        logs = []
        assert make_plan(engine, corpus, recs, MergeSettings(), logs.append, journal=journal).layers == whole.layers
        assert any(why in line for line in logs) and not any("resuming" in line for line in logs)


def test_pruning_takes_the_plain_sequential_walks_decisions(tiny, tmp_path):
    """The corpus pruning (staged, pipelined, a (prompt, seed) pair per group under the published
    criterion) keeps exactly what the plain walk keeps: each layer, then each neuron (least needed
    first), re-activated alone and dropped when every prompt's whole blocked score stays under
    its bar."""
    from nemo_surgery.localize.merge import blocked_scores, memorized_units
    from nemo_surgery.localize.search import count, without

    root, model, _, ref, _ = tiny
    engine = make_engine(model, ref, Runtime(batch_size=32), ScoreSettings(seeds=4), SearchSettings(layers="all"),
                         cache_dir=root / "cache")
    force_memorized(engine)
    path = tmp_path / "corpus.txt"
    path.write_text("official portrait of astronaut eileen collins\nchelsea the tabby cat staring sideways\n"
                    "a bowl of ramen on a wooden table\nsunset over a mountain lake\n")
    corpus = read_corpus(path)
    recs = run_corpus(engine, corpus, tmp_path / "r.jsonl")
    # Nothing is mitigated at the forced theta_mem; a bar a little above the union's worst score
    # gives the walk decisions both ways.
    worst = max(make_plan(engine, corpus, recs, MergeSettings()).check["blocked_scores"].values())
    engine.calibration = dataclasses.replace(engine.calibration, theta_mem=worst + 0.05 * (1 - worst))
    plan = make_plan(engine, corpus, recs, MergeSettings())

    current, counts = union(recs)
    prompts = memorized_units(engine, recs)
    theta = engine.calibration.theta_mem
    before = blocked_scores(engine, prompts, current)
    bars = {p: theta if s < theta else s + 1e-9 for p, s in before.items()}

    def ok(s) -> bool:
        return all(v < bars[p] for p, v in blocked_scores(engine, prompts, s).items())

    order = [v.path for v in reversed(engine.layers)]
    for item in [("layer", p, None) for p in order if current.get(p)]:
        if ok(without(current, item)):
            current = without(current, item)
    items = sorted((("neuron", p, n) for p, rows in current.items() for n in rows),
                   key=lambda it: (counts.get(it[1], {}).get(it[2], 0), order.index(it[1]), it[2]))
    for item in items:
        if ok(without(current, item)):
            current = without(current, item)
    assert len(prompts) == 4 and 0 < count(current) < len(items) < plan.check["union_neurons"]  # both ways
    assert plan.layers == {k: sorted(v) for k, v in current.items() if v}


def test_a_search_that_never_met_the_published_criterion_is_named():
    from nemo_surgery.localize.runner import unmet_criterion_note

    def rec(mitigated, initial, memorized=True):
        return {"memorized": memorized, "refined": {}, "mitigated": mitigated, "initial_score": initial,
                "theta_mem": 0.2}

    recs = [rec(False, 0.78), rec(False, 0.91), {"memorized": False}]
    note = unmet_criterion_note(recs, "published")
    assert "MS-SSIM 0.78-0.91" in note and "theta_mem 0.200" in note and "--criterion consistency" in note
    assert unmet_criterion_note(recs + [rec(True, 0.1)], "published") is None  # one search met it
    assert unmet_criterion_note(recs, "consistency") is None
    assert unmet_criterion_note([{"memorized": False}], "published") is None  # nothing was searched
