"""Every threshold and default of the localization stage, in one place, with its source.

Published values are from Hintersdorf et al., "Finding NeMo", NeurIPS 2024 (arXiv 2406.02366),
as restated in docs/method.md. Settings are records: they are written into every output so a
result can say exactly how it was made, and a resumed run refuses to mix settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import NemoError

# Memorization score (paper, Sec. 3 "Detecting memorized prompts")
SEEDS = 10  # initial latents per prompt
INFERENCE_STEPS = 50  # DDIM schedule length the noise difference is taken from
TIMESTEP_INDEX = 0  # "the first denoising step"; the official code uses index 1 (t=961 of 50)
GUIDANCE = 0.0  # the noise difference is taken without classifier-free guidance
MSSSIM_KERNEL = 11  # MS-SSIM Gaussian window taps at 64x64 latents
MSSSIM_SIGMA = 1.5  # torchmetrics: a sigma of 1.5 gives the 11-tap window
MSSSIM_SCALES = 3  # betas 0.33 each
THETA_MEM_STD = 1.0  # theta_mem = mean + 1 std of the score over non-memorized prompts

# Initial neuron selection (paper, Sec. 3 "Initial neuron selection")
THETA_ACT_START = 5.0
THETA_ACT_STEP = 0.25
THETA_ACT_MIN = 1.0
TOP_K_START = 0
TOP_K_STEP = 1

# Toolkit defaults (not from the paper)
CALIBRATION_SCORE_PROMPTS = 256  # reference prompts scored with the UNet to set theta_mem
NEAR_THRESHOLD = 1e-4  # a decision closer than this to its threshold is reported as fragile
BATCH_SIZE = 128  # UNet samples per pass


@dataclass(frozen=True)
class MsSsim:
    """The MS-SSIM window actually used. Latents smaller than 41 px cannot take the published
    kernel with 3 scales, so the largest valid window is chosen and recorded."""

    kernel_size: int = MSSSIM_KERNEL
    sigma: float = MSSSIM_SIGMA
    scales: int = MSSSIM_SCALES
    published: bool = True

    @property
    def betas(self) -> tuple[float, ...]:
        return tuple([round(1.0 / self.scales, 4)] * self.scales) if self.scales != 3 else (0.33, 0.33, 0.33)

    @classmethod
    def for_size(cls, size: int) -> "MsSsim":
        """The largest window (then the most scales) that torchmetrics accepts at this size.
        Probed rather than computed: its Gaussian window follows sigma while its size check
        uses kernel_size, so sigma shrinks with the kernel (1.5 for 11 taps, 0.5 for 3)."""
        import torch
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

        x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
        for scales in (MSSSIM_SCALES, 2, 1):
            for k, sigma in ((11, 1.5), (9, 1.2), (7, 1.0), (5, 0.75), (3, 0.5)):
                m = cls(k, sigma, scales, published=(k == MSSSIM_KERNEL and scales == MSSSIM_SCALES))
                try:
                    msssim(x, x, kernel_size=k, sigma=sigma, betas=m.betas, data_range=1.0)
                except (ValueError, RuntimeError):
                    continue
                return m
        raise ValueError(f"latents of {size} px are too small for MS-SSIM")


@dataclass(frozen=True)
class ScoreSettings:
    seeds: int = SEEDS
    inference_steps: int = INFERENCE_STEPS
    timestep_index: int = TIMESTEP_INDEX
    guidance: float = GUIDANCE
    msssim: MsSsim = field(default_factory=MsSsim)
    seed_base: int = 0  # seed i uses torch.Generator().manual_seed(seed_base + i)
    # What ran the UNet: "torch" or "onnxruntime" (CPU). Set by the Scorer from what it was given;
    # recorded because the two agree within float noise, not bit for bit.
    backend: str = "torch"
    # What the UNet passes computed in ("fp32", "fp16", "bf16"). Set by the Scorer; part of the
    # calibration's cache key and of a run's settings, so that a calibration made in one precision
    # is never reused for another and a resumed run never mixes precisions.
    precision: str = "fp32"
    # The first-step timestep and what the UNet predicts there ("epsilon", "v_prediction" or
    # "sample"), read from the model's scheduler config by the Scorer: they fix the noise
    # difference as much as the weights do, so they are recorded and key the calibration.
    timestep: int | None = None
    prediction_type: str = "epsilon"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["msssim"]["betas"] = list(self.msssim.betas)
        return d


@dataclass(frozen=True)
class SearchSettings:
    theta_act_start: float = THETA_ACT_START
    theta_act_step: float = THETA_ACT_STEP
    theta_act_min: float = THETA_ACT_MIN
    top_k_start: int = TOP_K_START
    top_k_step: int = TOP_K_STEP
    layers: str = "official"
    # "published": a set mitigates when MS-SSIM(unblocked d, blocked d) < theta_mem for every
    # memorized seed (NEMO.md). "consistency": when the prompt's memorization score with the set
    # blocked is < theta_mem, the statistic theta_mem is calibrated on (see docs/method.md).
    criterion: str = "published"

    def __post_init__(self) -> None:
        # The initial selection ends when theta_act reaches its floor or k a layer's width: with
        # neither moving it would never end.
        if not self.theta_act_step >= 0 or self.top_k_step < 0:
            raise NemoError(f"search settings: theta_act_step ({self.theta_act_step}) and top_k_step "
                            f"({self.top_k_step}) must not be negative")
        if self.theta_act_step == 0 and self.top_k_step == 0:
            raise NemoError("search settings: theta_act_step and top_k_step are both 0, so the initial selection "
                            "would never end")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
