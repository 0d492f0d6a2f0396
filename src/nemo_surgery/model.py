"""Model I/O: load a local diffusers Stable Diffusion folder offline, discover its value layers,
and fingerprint it.

A *value layer* is the value projection of a cross-attention block (`attn2.to_v`); a *neuron* is
one of its output features, i.e. one row of `to_v.weight` (NEMO.md, "Objects").
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import NemoError
from .files import canonical_json
from .safetensors_io import read_header

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHT_PARTS = ("unet", "text_encoder", "vae")
REQUIRED_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
VALUE_SUFFIX = "attn2.to_v"


@dataclass(frozen=True)
class ValueLayer:
    path: str  # diffusers module path, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v
    in_features: int
    out_features: int

    @property
    def weight_key(self) -> str:
        return f"{self.path}.weight"


_STAGE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _layer_order(path: str) -> tuple:
    stage = _STAGE.get(path.split(".")[0], 3)
    return (stage, [int(x) for x in re.findall(r"\.(\d+)\.", "." + path + ".")])


def discover_value_layers(unet: nn.Module) -> list[ValueLayer]:
    """Every cross-attention value projection, in the UNet's data-flow order (down, mid, up)."""
    found = []
    for name, mod in unet.named_modules():
        if name.endswith(VALUE_SUFFIX) and isinstance(mod, nn.Linear):
            if mod.bias is not None:
                # Zeroing a row equals masking the output only without a bias (NEMO.md).
                raise NemoError(f"value layer {name} has a bias; NeMo's row surgery needs bias-free to_v")
            found.append(ValueLayer(name, mod.in_features, mod.out_features))
    if not found:
        raise NemoError("the UNet has no cross-attention value layers (attn2.to_v)")
    return sorted(found, key=lambda v: _layer_order(v.path))


def select_layers(layers: list[ValueLayer], spec: str) -> list[ValueLayer]:
    """`official`: the down- and mid-block layers, which on an SD 1.x/2.x UNet are exactly the 7
    the paper searches (down_blocks[0..2].attentions[0..1], mid_block.attentions[0]);
    `all`; or comma-separated glob patterns over module paths."""
    spec = spec.strip()
    if spec == "all":
        return list(layers)
    if spec == "official":
        return [v for v in layers if v.path.startswith(("down_blocks.", "mid_block."))]
    chosen: list[ValueLayer] = []
    for pat in [p.strip() for p in spec.split(",") if p.strip()]:
        hits = [v for v in layers if fnmatch.fnmatchcase(v.path, pat) or fnmatch.fnmatchcase(v.path, pat + ".attn2.to_v")]
        if not hits:
            raise NemoError(f"--layers: no value layer matches {pat!r} (try 'official', 'all', "
                            f"or a glob such as 'down_blocks.*')")
        chosen += [v for v in hits if v not in chosen]
    if not chosen:
        raise NemoError("--layers: empty selection")
    return sorted(chosen, key=lambda v: _layer_order(v.path))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # float32 so that a checkpoint and its fp16 copy upcast to fp32 hash the same way when their
    # values agree; the stored dtype is recorded separately.
    return t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def value_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the value-layer weights (float32, module order): computable from a diffusers
    folder or a single-file checkpoint alike, so a plan can be checked against either."""
    h = hashlib.sha256()
    for name in sorted(weights, key=_layer_order):
        h.update(name.encode() + b"\0" + _tensor_bytes(weights[name]))
    return h.hexdigest()


def _own_config(unet: nn.Module) -> dict:
    """The UNet's config without diffusers' bookkeeping keys (`_name_or_path`: where it was loaded
    from, `_diffusers_version`, ...): what the model is, not where it came from."""
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def unet_digest(unet: nn.Module) -> str:
    """sha256 over the UNet's config and every tensor as held in memory. The fingerprint covers
    what a plan is checked against; the memorization score and the search graph depend on every
    UNet weight, so what caches them is keyed by this as well."""
    h = hashlib.sha256()
    h.update(json.dumps(_own_config(unet), sort_keys=True, default=str).encode())
    for name, t in unet.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # the buffer itself, not a copy
    return h.hexdigest()


def _tokenizer_json(tokenizer: Any) -> str:
    """What decides the token ids a prompt gets and how many there are: the vocabulary, the merges
    and the padded length. Merges are spelled one way ("a b"), whichever way the tokenizers
    library writes them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        bpe = json.loads(backend.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
        what: dict[str, Any] = {"vocab": bpe.get("vocab"), "merges": merges}
    else:
        what = {"vocab": tokenizer.get_vocab()}
    what["model_max_length"] = int(tokenizer.model_max_length)
    return canonical_json(what)


def fingerprint(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any = None) -> str:
    """sha256 over the UNet config, the value-layer weights, the text-encoder weights and the
    tokenizer: what the activation signals and a plan's rows depend on. Keys every cache and
    output; caches of UNet passes (the calibration's theta_mem, the search graph) add
    `unet_digest`."""
    h = hashlib.sha256()
    if tokenizer is not None:
        h.update(b"tokenizer\0" + _tokenizer_json(tokenizer).encode())
    h.update(canonical_json(json.loads(json.dumps(_own_config(unet), default=list))).encode())
    layers = discover_value_layers(unet)
    h.update(value_digest({v.path: unet.get_submodule(v.path).weight for v in layers}).encode())
    for name, t in sorted(text_encoder.state_dict().items()):
        h.update(name.encode() + b"\0" + _tensor_bytes(t))
    return h.hexdigest()


@dataclass
class Model:
    """A loaded Stable Diffusion model: its parts, value layers and fingerprint."""

    path: Path
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    vae: Any | None
    value_layers: list[ValueLayer]
    fingerprint: str
    value_digest: str
    stored_dtype: str

    def to_v(self, path: str) -> nn.Linear:
        return self.unet.get_submodule(path)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {v.path: (v.out_features, v.in_features) for v in self.value_layers}

    @property
    def context(self) -> int:
        """Token positions of every prompt embedding: what the tokenizer pads prompts to, as the
        pipeline does (CLIP's 77 on Stable Diffusion; `check_context` holds it to the encoder's)."""
        return int(self.tokenizer.model_max_length) if self.tokenizer is not None else CONTEXT

    @property
    def text_width(self) -> int:
        """Width of the prompt embedding every `to_v` reads: the text encoder's, which `check_parts`
        holds equal to the UNet's cross-attention width (one number, or one per block)."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def latent_size(self) -> int:
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "fingerprint": self.fingerprint, "value_digest": self.value_digest,
                "dtype": self.stored_dtype, "value_layers": len(self.value_layers),
                "shapes": {k: list(v) for k, v in self.shapes.items()}}


def _weight_files(part_dir: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in part_dir.iterdir() if p.is_file()]
    safe = sorted(p for p in files if p.suffix == ".safetensors")
    pickled = sorted(p for p in files if p.suffix in PICKLE_SUFFIXES)
    return safe, pickled


WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
ST_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def weight_variant(part_dir: Path) -> str | None:
    """The variant (`fp16`, `ema`, ...) a part's safetensors weights carry in their file names when
    they were saved only that way (`save_pretrained(variant="fp16")`, as hub repositories ship fp16
    copies), so that they load as saved; None where the plain weights are there. More than one
    variant and no plain set is refused: surgery edits one weight set and must not ship another."""
    part_dir = Path(part_dir)
    stem = WEIGHT_STEMS.get(part_dir.name, "diffusion_pytorch_model")
    names = {p.name for p in part_dir.iterdir() if p.is_file()}
    if f"{stem}.safetensors" in names or f"{stem}.safetensors.index.json" in names:
        return None
    s = re.escape(stem)
    pat = re.compile(rf"^{s}\.(\w+?)(?:-\d+-of-\d+)?\.safetensors$|^{s}\.safetensors\.index\.(\w+)\.json$")
    found = sorted({m.group(1) or m.group(2) for n in names if (m := pat.match(n))})
    if len(found) > 1:
        raise NemoError(f"{part_dir}: weights saved only as variants {', '.join(found)}; keep one weight set "
                        f"so no unedited copy ships")
    return found[0] if found else None


def _stored_dtype(unet_dir: Path, variant: str | None) -> str | None:
    """The dtype the UNet's value weights are stored in, from the safetensors headers of the weight
    set that loads (`variant`: `weight_variant`'s; diffusers upcasts fp16 files to fp32 on load, so
    the module cannot tell)."""
    stem = WEIGHT_STEMS["unet"] + (f".{variant}" if variant else "")
    pat = re.compile(rf"^{re.escape(stem)}(-\d+-of-\d+)?\.safetensors$")
    for f in sorted(unet_dir.iterdir()):
        if pat.match(f.name):
            for key, entry in read_header(f).tensors.items():
                if key.endswith(f"{VALUE_SUFFIX}.weight"):
                    return ST_DTYPE_NAMES.get(entry.dtype, entry.dtype.lower())
    return None


def check_model_folder(path: Path, allow_pickle: bool = False, parts: tuple[str, ...] = REQUIRED_PARTS) -> None:
    """Everything that can be said about a folder before loading it, as one-line errors."""
    path = Path(path)
    if not path.exists():
        raise NemoError(f"{path}: model not found")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise NemoError(f"{path}: pickle checkpoints are refused (they can run code when loaded); "
                            f"convert to safetensors, or pass --allow-pickle if you trust the file")
        if path.suffix != ".safetensors":
            raise NemoError(f"{path}: expected a diffusers model folder (model_index.json, unet/, ...) or a "
                            f"single-file .safetensors checkpoint")
        read_header(path)
        return
    if not (path / "model_index.json").is_file():
        raise NemoError(f"{path}: not a diffusers model folder (model_index.json missing)")
    for part in parts:
        d = path / part
        if not d.is_dir():
            raise NemoError(f"{path}: model folder is missing {part}/")
        if part in WEIGHT_PARTS:
            if not (d / "config.json").is_file():
                raise NemoError(f"{d}: config.json missing")
            safe, pickled = _weight_files(d)
            if not safe and not pickled:
                raise NemoError(f"{d}: no weights (expected *.safetensors)")
            if not safe:
                if not allow_pickle:
                    raise NemoError(f"{pickled[0]}: pickle weights are refused (they can run code when "
                                    f"loaded); convert to safetensors, or pass --allow-pickle if you trust them")
            for f in safe:
                read_header(f)


def check_config_folder(path: Path) -> None:
    """A single-file checkpoint's companion: the configs and tokenizer of a diffusers folder of
    the same architecture (its weights, if any, are not read)."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise NemoError(f"{path}: --model-config must be a diffusers model folder (model_index.json missing)")
    for need in ("unet/config.json", "text_encoder/config.json", "vae/config.json",
                 "scheduler/scheduler_config.json", "tokenizer"):
        if not (path / need).exists():
            raise NemoError(f"{path}: --model-config folder is missing {need}")


def _load_single_file(path: Path, config: Path | None, with_vae: bool) -> tuple:
    """UNet, text encoder, tokenizer, VAE, scheduler config and the value weights' stored dtype of
    an original (LDM-keyed) single-file checkpoint, converted by diffusers' own
    `from_single_file`, offline. The dtype comes from the file: the conversion may change it."""
    from diffusers import StableDiffusionPipeline

    if config is None:
        raise NemoError(f"{path}: a single-file checkpoint needs the configs and tokenizer of a diffusers folder of "
                        f"the same architecture (build --model-config DIR; other commands take that folder itself)")
    check_config_folder(config)
    tensors = read_header(path).tensors
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    if not unet_keys:
        raise NemoError(f"{path}: not an original Stable Diffusion checkpoint (no model.diffusion_model.* keys)")
    value = [tensors[k].dtype for k in unet_keys if k.endswith("attn2.to_v.weight")]
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    stored = ST_DTYPE_NAMES.get(value[0], value[0].lower()) if value else None
    return (pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae if with_vae else None,
            dict(pipe.scheduler.config), stored)


CONTEXT = 77  # CLIP's context, Stable Diffusion's; a model's own is its tokenizer's (`Model.context`)


def cross_attention_widths(unet_config: Any) -> set[int]:
    """The text widths the UNet's cross-attention blocks read: diffusers takes one number or one
    per block."""
    cross = unet_config.get("cross_attention_dim")
    return set(cross) if isinstance(cross, (list, tuple)) else {cross}


def check_parts(path: Path, unet_config: Any, text_config: Any, vae_config: Any | None) -> None:
    """The parts must fit together as a text-to-image SD 1.x/2.x model, as NeMo's signals assume:
    the UNet conditioned on this text encoder's output alone (an SDXL-style UNet also takes pooled
    text and size conditions from a second encoder), denoising latents of the VAE's channels into
    as many (an inpainting UNet takes the masked image as well)."""
    extra = {k: unet_config.get(k) for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type")
             if unet_config.get(k) is not None}
    if extra:
        what = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise NemoError(f"{path}: the UNet takes conditioning besides the text embedding ({what}, as SDXL does); "
                        f"nemo-surgery handles UNets conditioned on one text encoder (SD 1.x/2.x layouts)")
    if unet_config.get("dual_cross_attention"):
        raise NemoError(f"{path}: the UNet has dual cross-attention (two text streams per block, as Versatile "
                        f"Diffusion does); nemo-surgery handles UNets conditioned on one text encoder "
                        f"(SD 1.x/2.x layouts)")
    width = text_config.hidden_size
    widths = cross_attention_widths(unet_config)
    if widths != {width}:
        raise NemoError(f"{path}: the text encoder's width ({width}) does not match the UNet's cross-attention "
                        f"width ({', '.join(map(str, sorted(widths)))}): the parts come from different models")
    c_in, c_out = unet_config.get("in_channels"), unet_config.get("out_channels")
    if c_in != c_out:
        raise NemoError(f"{path}: the UNet takes {c_in} input channels and predicts {c_out} (an inpainting or "
                        f"otherwise image-conditioned UNet); nemo-surgery handles text-to-image UNets")
    latent = vae_config.get("latent_channels") if vae_config is not None else c_in
    if latent != c_in:
        raise NemoError(f"{path}: the VAE's {latent} latent channels do not match the UNet's {c_in}: "
                        f"the parts come from different models")


def check_context(path: Path, tokenizer: Any, text_config: Any) -> None:
    """The tokenizer pads every prompt to its `model_max_length` (the pipeline does so too), so the
    text encoder must hold that many positions. Models trained with a shorter context than CLIP's 77
    are fine; a tokenizer without a length, or one longer than the encoder, is not."""
    n = getattr(tokenizer, "model_max_length", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(n, int) or n > 100_000:
        raise NemoError(f"{path}: the tokenizer sets no model_max_length (tokenizer/tokenizer_config.json); "
                        f"Stable Diffusion pads prompts to the text encoder's {positions or CONTEXT} positions")
    if positions is not None and n > positions:
        raise NemoError(f"{path}: the tokenizer pads prompts to {n} tokens but the text encoder holds "
                        f"{positions} positions: the parts come from different models")


def load_model(path: Path, *, allow_pickle: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32, with_vae: bool = True, config: Path | None = None) -> Model:
    """Load the parts NeMo needs from a local diffusers folder, or from a single-file checkpoint
    with `config` (a diffusers folder giving its configs and tokenizer), offline, safetensors only
    unless `allow_pickle`. Never executes code from the folder (no custom pipelines or remote code)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    check_model_folder(path, allow_pickle)
    kw: dict[str, Any] = dict(local_files_only=True)
    use_st = None if allow_pickle else True
    try:
        stored = None
        if path.is_file():
            unet, text_encoder, tokenizer, vae, scheduler_config, stored = _load_single_file(path, config, with_vae)
        else:
            names = ("unet", "text_encoder") + (("vae",) if with_vae else ())
            variants = {name: weight_variant(path / name) for name in names}

            def part(cls: Any, name: str) -> Any:
                return cls.from_pretrained(path / name, use_safetensors=use_st, variant=variants[name], **kw)

            stored = _stored_dtype(path / "unet", variants["unet"])
            unet = part(UNet2DConditionModel, "unet")
            text_encoder = part(CLIPTextModel, "text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
            vae = part(AutoencoderKL, "vae") if with_vae else None
            sched_file = path / "scheduler" / "scheduler_config.json"
            scheduler_config = json.loads(sched_file.read_text())
    except NemoError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NemoError(f"{path}: cannot load model ({first})") from None
    check_parts(path, unet.config, text_encoder.config, vae.config if vae is not None else None)
    check_context(path, tokenizer, text_encoder.config)
    stored = stored or str(next(unet.parameters()).dtype).replace("torch.", "")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    layers = discover_value_layers(unet)
    fp = fingerprint(unet, text_encoder, tokenizer)
    vd = value_digest({v.path: unet.get_submodule(v.path).weight for v in layers})
    unet.to(device=device, dtype=dtype)
    text_encoder.to(device=device, dtype=dtype)
    if vae is not None:
        vae.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return Model(path, unet, text_encoder, tokenizer, scheduler_config, vae, layers, fp, vd, stored)


def random_rows(shapes: dict[str, tuple[int, int]], neurons: dict[str, Any], generator: torch.Generator
                ) -> dict[str, list[int]]:
    """As many rows as `neurons` has in each layer, drawn at random (the control that tells neurons
    specific to memorization from any damage of the same size). Drawn layer by layer in the
    layers' sorted order, so that the same neurons draw the same control whatever order they come
    in: a build's plan, a curve's K most needed neurons and an auditor's reading of plan.json."""
    return {k: torch.randperm(shapes[k][0], generator=generator)[:len(neurons[k])].tolist() for k in sorted(neurons)}


class zeroed_rows:
    """Context manager: the given rows of the value layers are zero inside the block, restored
    after. The in-memory twin of the surgery, for comparisons (plan vs random neurons)."""

    def __init__(self, model: Model, neurons: dict[str, Any]):
        self.model = model
        self.neurons = {k: sorted(v) for k, v in neurons.items() if v}
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Model:
        for path, rows in self.neurons.items():
            w = self.model.to_v(path).weight
            self.saved[path] = w.data[rows].clone()
            w.data[rows] = 0
        return self.model

    def __exit__(self, *exc: object) -> None:
        for path, rows in self.neurons.items():
            self.model.to_v(path).weight.data[rows] = self.saved[path]
        self.saved = {}
