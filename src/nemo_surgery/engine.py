"""Composition of the localization stage: load a model, calibrate (cached) and build the Engine
that the CLI commands and `build` share. A notebook can call the same functions."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .corpus import read_corpus
from .errors import NemoError
from .files import append_jsonl
from .localize.calibrate import Calibration, cache_key, calibrate, calibration_settings
from .localize.runner import Engine, open_journal
from .localize.score import PRECISIONS, Scorer
from .localize.settings import BATCH_SIZE, CALIBRATION_SCORE_PROMPTS, ScoreSettings, SearchSettings
from .model import Model, load_model, select_layers, unet_digest
from .provenance import libraries, versions_changed

if TYPE_CHECKING:
    from .localize.prefix import TorchPrefixUNet


@dataclass(frozen=True)
class Runtime:
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = BATCH_SIZE
    allow_pickle: bool = False
    model_config: Path | None = None  # a single-file checkpoint's configs and tokenizer (a diffusers folder)
    # What runs the search's UNet passes: "torch", "onnxruntime" (CPU, fp32), or "auto":
    # onnxruntime where it applies (a CPU and fp32), else torch.
    backend: str = "auto"

    def resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise NemoError(f"--device {self.device}: no CUDA device is available (install a CUDA build of torch)")
        return self.device


CALIBRATION_JOURNAL_FORMAT = "nemo-surgery-calibration-scores"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEMO_SURGERY_CACHE", Path.home() / ".cache" / "nemo-surgery"))


def open_model(path: Path, runtime: Runtime) -> Model:
    device = runtime.resolve_device()
    if runtime.precision not in PRECISIONS:
        raise NemoError(f"--precision {runtime.precision!r}: choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[runtime.precision]
    if device == "cpu" and dtype == torch.float16:
        raise NemoError("--precision fp16 needs --device cuda (CPU kernels are fp32/bf16)")
    if device.startswith("cuda") and dtype == torch.float32:
        # cuDNN convolutions default to TF32 tensor cores (inputs rounded to a 10-bit mantissa) on
        # Ampere and newer GPUs; --precision fp32 is a promise of fp32's float noise, which is what
        # the search's near-threshold reporting and the bit-exact verification are sized for.
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    return load_model(path, allow_pickle=runtime.allow_pickle, device=device, dtype=dtype, config=runtime.model_config)


def get_calibration(model: Model, scorer: Scorer, reference: Path, cache_dir: Path | None,
                    score_prompts: int = CALIBRATION_SCORE_PROMPTS,
                    log: Callable[[str], None] = lambda s: None, digest: str | None = None) -> Calibration:
    """The cached calibration, made and saved on a miss. `digest`: see `make_scorer`."""
    ref = read_corpus(reference)
    settings = calibration_settings(model, scorer, score_prompts, digest)
    key = cache_key(model.fingerprint, ref.sha256, settings)
    folder = (cache_dir or default_cache_dir()) / "calibration" / key
    if (folder / "calibration.json").is_file():
        cal = Calibration.load(folder)
        # Kept whatever the versions: theta_mem moves only by float noise between them, and a
        # recalibration is hours on a CPU. Said here; the plan keeps the calibration's versions and
        # the model card lists them beside the localization's where they differ.
        changed = versions_changed(cal.tool.get("libraries"), libraries())
        log(f"calibration: reusing {folder}" + (f" (made on other library versions: {', '.join(changed)}; "
                                                f"delete it to recalibrate)" if changed else ""))
        return cal
    n_scored = min(score_prompts, len(ref.prompts))
    log(f"calibration: {len(ref.prompts)} reference prompts (activations), {n_scored} scored for theta_mem")
    # Each reference prompt's score is kept as it comes, so an interrupted calibration resumes:
    # with the defaults that is 256 prompts x 10 seeds = 2,560 UNet samples, about 3 hours for a
    # full-size SD 1.5 UNet on 2 CPU cores (4.2 s a sample).
    journal = folder.with_name(f"{key}.scores.jsonl")
    done, _ = open_journal(journal, {"key": key, "model": model.fingerprint, "reference_sha256": ref.sha256,
                                     "settings": settings}, CALIBRATION_JOURNAL_FORMAT)
    known = {int(k): float(r["score"]) for k, r in done.items()}
    if known:
        log(f"calibration: resuming: {len(known)} of {n_scored} reference prompts already scored in {journal}")
    step = max(1, n_scored // 10)

    def progress(i: int, n: int) -> None:
        if i % step == 0 or i == n:
            log(f"calibration: scored {i}/{n} reference prompts")

    def keep(i: int, prompt: str, score: float) -> None:
        append_jsonl(journal, {"id": str(i), "prompt": prompt, "score": score})

    cal = calibrate(model, scorer, [p.text for p in ref.prompts], ref.sha256, score_prompts, progress, settings,
                    known, keep)
    cal.save(folder)
    journal.unlink(missing_ok=True)
    log(f"calibration: theta_mem = {cal.theta_mem:.4f} (mean {cal.score_mean:.4f} + 1 std {cal.score_std:.4f}), "
        f"{cal.seconds:.1f} s, saved to {folder}")
    return cal


BACKENDS = ("auto", "torch", "onnxruntime")


def make_scorer(model: Model, runtime: Runtime, score: ScoreSettings = ScoreSettings(),
                cache_dir: Path | None = None, log: Callable[[str], None] = lambda s: None,
                digest: str | None = None) -> Scorer:
    """The scorer of `model` on the runtime's backend (see `Runtime.backend`). `digest`: the
    model's `unet_digest`, where the caller has it already."""
    from .localize.ort_unet import open_ort_unet, supported

    if runtime.backend not in BACKENDS:
        raise NemoError(f"--backend {runtime.backend!r}: choose one of {', '.join(BACKENDS)}")
    autocast = None if runtime.precision == "fp32" else PRECISIONS[runtime.precision]
    unet = None
    if runtime.backend == "onnxruntime" or (runtime.backend == "auto" and supported(model) is None):
        try:
            unet = open_ort_unet(model, cache_dir or default_cache_dir(), log=log, digest=digest)
        except NemoError as e:
            if runtime.backend == "onnxruntime":
                raise
            log(f"note: {e}; the search runs on torch")
    prefix = None if unet is not None else torch_prefix(model, autocast, log)
    return Scorer(model, score, runtime.batch_size, autocast, unet, prefix)


def torch_prefix(model: Model, autocast: torch.dtype | None,
                 log: Callable[[str], None] = lambda s: None) -> "TorchPrefixUNet | None":
    """The torch search pass that computes what candidates share once, where the UNet's layout
    allows it and its block-by-block forward agrees with diffusers' on this model (checked on two
    samples), else None: diffusers' own forward."""
    from .localize.ort_unet import _MaskedUNet
    from .localize.prefix import TorchPrefixUNet, gather_points, same_as_diffusers

    points = gather_points(model)
    if points is None:
        return None
    runner = TorchPrefixUNet(model, points)
    plain = _MaskedUNet(model).eval()
    try:
        g = torch.Generator().manual_seed(7)
        cfg, n, dev, dt = model.unet.config, model.latent_size, model.device, model.unet.dtype
        inputs = {"sample": torch.randn(2, cfg.in_channels, n, n, generator=g).to(dev, dt),
                  "timestep": torch.tensor([981, 981], device=dev),
                  "encoder_hidden_states": torch.randn(2, model.context, model.text_width, generator=g).to(dev, dt)}
        for li, v in enumerate(model.value_layers):
            inputs[f"mask_{li}"] = (torch.rand(2, v.out_features, generator=g) > 0.3).float().to(dev)
        tol = (1e-4, 1e-5) if autocast is None and dt == torch.float32 else (2e-2, 2e-2)
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            diff = same_as_diffusers(runner.module, plain, inputs, *tol)
        why = None if diff is None else f"differs from diffusers' on this model by {diff:.3g}"
    except (RuntimeError, AttributeError, TypeError, ValueError) as e:  # a block this forward does not know
        why = f"fails on this model ({type(e).__name__}: {e})"
    finally:
        plain.masks.remove()
    if why is not None:
        runner.close()
        log(f"note: the block-by-block UNet forward {why}; the search runs diffusers' forward")
        return None
    return runner


def make_engine(model: Model, reference: Path, runtime: Runtime, score: ScoreSettings = ScoreSettings(),
                search: SearchSettings = SearchSettings(), cache_dir: Path | None = None,
                score_prompts: int = CALIBRATION_SCORE_PROMPTS,
                log: Callable[[str], None] = lambda s: None, theta_mem: float | None = None) -> Engine:
    """`theta_mem`: a memorization threshold to use instead of the calibrated one (recorded as given)."""
    # Every UNet weight hashed once: the search graph and the calibration are both keyed by it.
    digest = unet_digest(model.unet)
    scorer = make_scorer(model, runtime, score, cache_dir, log, digest)
    if not scorer.settings.msssim.published:
        m = scorer.settings.msssim
        log(f"note: latents of {model.unet.config.sample_size} px are too small for the published MS-SSIM "
            f"(kernel 11, 3 scales); using kernel {m.kernel_size}, sigma {m.sigma}, {m.scales} scales "
            f"(recorded in every output)")
    cal = get_calibration(model, scorer, reference, cache_dir, score_prompts, log, digest)
    if theta_mem is not None:
        log(f"theta_mem: {theta_mem:.4f} as given (the reference prompts' mean + 1 std, {cal.theta_mem:.4f}, is not used)")
        cal = replace(cal, theta_mem=float(theta_mem), theta_mem_given=True)
    layers = select_layers(model.value_layers, search.layers)
    return Engine(model, scorer, cal, layers, search)
