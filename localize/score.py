"""The memorization signals: text embeddings, value activations, noise differences and the
MS-SSIM memorization score (NEMO.md, "Signals").

`Scorer` holds what is fixed for a model and settings (the seeds' initial latents, the timestep,
the MS-SSIM window) and counts every UNet sample-pass it spends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as _msssim

from ..errors import NemoError
from ..model import Model, ValueLayer
from .masks import NeuronSet, ValueMasks
from .settings import BATCH_SIZE, MsSsim, ScoreSettings

if TYPE_CHECKING:
    from .ort_unet import OrtUNet
    from .prefix import TorchPrefixUNet

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_settings(model: Model, settings: ScoreSettings) -> ScoreSettings:
    """The published MS-SSIM window where the latents allow it, else the largest valid one."""
    fitted = MsSsim.for_size(model.latent_size)
    if fitted.published:  # the published window fits: keep what was asked
        return settings
    return dataclasses.replace(settings, msssim=fitted)


@torch.no_grad()
def value_activations(model: Model, emb: torch.Tensor, layers: list[ValueLayer]) -> dict[str, torch.Tensor]:
    """Mean over token positions of |to_v(embedding)|, per neuron: needs no UNet pass, since
    to_v only ever sees the text encoder's output."""
    out = {}
    for v in layers:
        w = model.to_v(v.path).weight
        out[v.path] = (emb.to(w.dtype) @ w.T).abs().mean(dim=1).float()
    return out


EpsFrom = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _eps_from(prediction: str, alpha_prod: float, where: object = "model") -> EpsFrom:
    """eps_hat(output, x_t) for a UNet predicting `prediction` at a timestep with cumulative alpha
    `alpha_prod` (x_t = sqrt(a) x_0 + sqrt(1 - a) eps). NeMo's noise difference is defined on
    eps_hat. Taken on an SD 2.x v-prediction model's raw output instead (v ~ -x_0 at the first
    step), it would carry x_T, which differs by seed, at the weight of the predicted image that a
    memorized prompt makes the same for every seed."""
    a, s = alpha_prod ** 0.5, (1.0 - alpha_prod) ** 0.5
    if prediction == "epsilon":
        return lambda out, x: out
    if prediction == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0
        return lambda out, x: a * out + s * x
    if prediction == "sample":
        return lambda out, x: (x - a * out) / s
    raise NemoError(f"{where}: scheduler prediction_type {prediction!r}: expected epsilon, v_prediction or sample")


class Scorer:
    """`unet`: runs the UNet instead of torch (`ort_unet.OrtUNet`); None runs the model's UNet on
    torch, through `prefix` (`prefix.TorchPrefixUNet`: what candidates share computed once) where
    given, else as diffusers' forward."""

    def __init__(self, model: Model, settings: ScoreSettings, batch_size: int = BATCH_SIZE,
                 autocast_dtype: torch.dtype | None = None, unet: "OrtUNet | None" = None,
                 prefix: "TorchPrefixUNet | None" = None):
        from diffusers import DDIMScheduler

        self.model = model
        self.unet = unet
        dtype = autocast_dtype or model.unet.dtype
        sched = DDIMScheduler.from_config(model.scheduler_config)
        sched.set_timesteps(settings.inference_steps)
        self.timestep = sched.timesteps[settings.timestep_index]
        prediction = sched.config.prediction_type
        self._to_eps = _eps_from(prediction, float(sched.alphas_cumprod[int(self.timestep)]), model.path)
        self.settings = dataclasses.replace(resolve_settings(model, settings),
                                            backend="torch" if unet is None else "onnxruntime",
                                            precision=next((k for k, v in PRECISIONS.items() if v == dtype), str(dtype)),
                                            timestep=int(self.timestep), prediction_type=prediction)
        self.batch_size = max(1, batch_size)
        self.autocast_dtype = autocast_dtype
        self.device = model.device
        c = model.unet.config.in_channels
        size = model.latent_size
        # Initial latents come from a CPU generator so a seed means the same x_T on any device.
        self.latents = torch.stack([
            torch.randn((c, size, size), generator=torch.Generator().manual_seed(self.settings.seed_base + i))
            for i in range(self.settings.seeds)]) * sched.init_noise_sigma
        self.masks = ValueMasks(model)
        self.prefix = prefix
        self.sample_passes = 0
        self.truncated_prompts = 0

    # --- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        tok, n = self.model.tokenizer, self.model.context
        full = tok(prompts, truncation=False, padding=False).input_ids
        long = sum(len(ids) > n for ids in full)
        if long:
            self.truncated_prompts += long
            warnings.warn(f"{long} prompt(s) longer than {n} tokens are truncated, as the text "
                          f"encoder does", stacklevel=2)
        ids = tok(prompts, padding="max_length", max_length=n, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.model.text_encoder(ids)[0]

    # --- noise differences ------------------------------------------------------------------
    @torch.no_grad()
    def noise_diff(self, emb: torch.Tensor, latents: torch.Tensor,
                   sets: list[NeuronSet] | None = None) -> torch.Tensor:
        """d = eps_hat(x_T, t, prompt) - x_T per sample, each channel min-max scaled to [0, 1]
        (eps_hat derived from the UNet's output where it predicts v or the clean sample).
        `sets[i]` are the neurons deactivated for sample i (None: nothing blocked)."""
        outs = []
        for start in range(0, len(latents), self.batch_size):
            sl = slice(start, start + self.batch_size)
            x = latents[sl].to(self.device)
            e = emb[sl].to(self.device)
            chunk_sets = None if sets is None else list(sets[sl])
            if self.unet is not None:
                eps = self.unet(x, self.timestep, e, chunk_sets)
            elif self.prefix is not None:
                with self._autocast():
                    dt = self.model.unet.dtype
                    eps = self.prefix(x.to(dt), self.timestep, e.to(dt), chunk_sets)
            else:
                with self.masks.active(chunk_sets, self.device), self._autocast():
                    eps = self.model.unet(x.to(self.model.unet.dtype), self.timestep,
                                          encoder_hidden_states=e.to(self.model.unet.dtype)).sample
            self.sample_passes += len(x)
            outs.append(self._to_eps(eps.float(), x.float()) - x.float())
        d = torch.cat(outs)
        lo = d.amin(dim=(2, 3), keepdim=True)
        hi = d.amax(dim=(2, 3), keepdim=True)
        return ((d - lo) / (hi - lo).clamp_min(1e-12)).cpu()

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- MS-SSIM ------------------------------------------------------------------------------
    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """MS-SSIM per sample between two stacks of scaled noise differences."""
        m = self.settings.msssim
        return _msssim(a.float(), b.float(), gaussian_kernel=True, sigma=m.sigma, kernel_size=m.kernel_size,
                       reduction="none", data_range=1.0, betas=m.betas)

    def seed_scores(self, d: torch.Tensor) -> torch.Tensor:
        """For each seed, its highest MS-SSIM against any other seed: a memorized prompt makes the
        model predict the same image whatever the seed."""
        n = len(d)
        pairs = list(itertools.combinations(range(n), 2))
        i, j = (torch.tensor(x) for x in zip(*pairs))
        s = self.similarity(d[i], d[j])
        best = torch.full((n,), -1.0)
        best = best.scatter_reduce(0, i, s, reduce="amax").scatter_reduce(0, j, s, reduce="amax")
        return best

    def prompt_score(self, d: torch.Tensor) -> float:
        """A prompt's memorization score: the mean over its seeds of each seed's best MS-SSIM."""
        return float(self.seed_scores(d).mean())

    @contextlib.contextmanager
    def searching(self) -> Iterator[None]:
        """One search (a prompt's, or a corpus pruning). On the way out the head states the UNet
        runner kept are dropped: they are named by the search's embeddings, so no other search
        uses them, and they can hold hundreds of MB. While onnxruntime runs the UNet passes,
        torch's own work between them (scaling, MS-SSIM) runs on one thread: after each parallel
        op torch's OpenMP workers spin-wait on the cores onnxruntime's next run needs (measured on
        2 cores: 8-12 % of a prompt's search)."""
        threads = torch.get_num_threads()
        if self.unet is not None:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            for runner in (self.unet, self.prefix):
                if runner is not None:
                    runner.clear()

    def prompt_noise_diffs(self, emb: torch.Tensor) -> torch.Tensor:
        """Unblocked noise differences of one prompt embedding (1, T, D) for every seed."""
        return self.noise_diff(emb.expand(len(self.latents), -1, -1), self.latents)

    def close(self) -> None:
        self.masks.remove()
        for runner in (self.unet, self.prefix):
            if runner is not None:
                runner.close()
