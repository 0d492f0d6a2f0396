"""ONNX export of the cleaned model's parts, each checked against torch with onnxruntime.

Layout follows diffusers' ONNX pipelines (`unet/model.onnx`, `text_encoder/model.onnx`,
`vae_decoder/model.onnx`, same input and output names), so the folder can be loaded by tools that
already read that layout. A part's folder appears only once its file is complete and, when
checked, agrees with torch: it is built under a temporary name and renamed at the end.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import NemoError
from ..files import atomic_dir, check_apart
from ..model import cross_attention_widths, weight_variant

CHECK_BATCH = 2
# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it, since the graph adds
# a little to the weights.
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_NAME = "model.onnx.data"
DEFAULT_SEQ_LEN = 77  # CLIP's context length, used when the model has no text encoder config
# Allowed |onnxruntime - torch| relative to the output's magnitude (at least 1). fp32 kernels
# differ in summation order; a wrong graph differs by far more than this.
DEFAULT_TOLERANCE = 1e-3


@dataclass
class OnnxReport:
    part: str
    path: Path
    bytes: int
    seconds: float
    opset: int
    max_abs_diff: float | None  # None when not checked
    inputs: list[dict[str, Any]]  # {"name", "shape" (ints, symbolic dims as names), "dtype"}
    outputs: list[dict[str, Any]]
    external_data: bool
    onnxruntime: str
    exporter: str  # "torchscript" (legacy) or "dynamo"
    check_seconds: float | None = None
    check_batch: int | None = None
    tolerance: float | None = None
    simplified: str | None = None  # the simplifier that rewrote the graph, or why none did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"path": str(self.path)}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _load(cls: Any, model_dir: Path, sub: str, part: str, **kwargs: Any) -> Any:
    folder = Path(model_dir) / sub
    if not folder.is_dir():
        raise NemoError(f"{model_dir}: no {sub}/ folder, cannot export the {part}")
    variant = weight_variant(folder)
    try:
        m = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, variant=variant, **kwargs)
    except Exception as e:  # library errors vary by version; the user needs one line
        raise NemoError(f"{folder}: cannot load the {part} ({_one_line(e)})") from None
    # fp32 on CPU: the check compares against torch, and fp16 CPU kernels are neither complete
    # nor a fair reference. (Transformers takes its dtype argument under two names across
    # versions, so the text encoder is cast here instead.)
    m = m.to("cpu")
    if any(p.dtype != torch.float32 for p in m.parameters()):
        m = m.float()
    return m.eval()


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _seq_len(model_dir: Path) -> int:
    cfg = Path(model_dir) / "text_encoder" / "config.json"
    if cfg.is_file():
        import json

        try:
            return int(json.loads(cfg.read_text(encoding="utf-8")).get("max_position_embeddings", DEFAULT_SEQ_LEN))
        except (ValueError, TypeError, OSError):
            pass
    return DEFAULT_SEQ_LEN


class _UNetWrapper(nn.Module):
    """Positional tensors in, the noise prediction out: what an ONNX graph can express."""

    def __init__(self, unet: nn.Module, text_time: bool):
        super().__init__()
        self.unet = unet
        self.text_time = text_time

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.text_time else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class _TextWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _torch_export(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path,
                  opset: int, own_batch: bool = False) -> str:
    """Write `path`; returns the exporter used. The TorchScript exporter goes first: it handles
    diffusers UNets reliably and needs no onnxscript. The dynamo exporter is the fallback.
    `own_batch`: each input and output has its own dynamic first dimension instead of one shared
    batch (onnxruntime plans buffers assuming that equal names mean equal sizes)."""
    names = list(inputs)
    dynamic = {n: {0: f"{n}_rows" if own_batch else "batch"} for n in names + outputs}
    args = tuple(inputs.values())
    common = dict(input_names=names, output_names=outputs, opset_version=opset, dynamic_axes=dynamic)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer and deprecation chatter is noise to a user; real failures raise.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=True, **common)
            return "torchscript"
        except Exception as legacy_error:
            try:
                import onnxscript  # noqa: F401  (the dynamo exporter needs it)
            except ImportError:
                raise legacy_error from None
            for p in path.parent.iterdir():
                p.unlink()
            try:
                torch.onnx.export(module, args, str(path), dynamo=True, external_data=True, **common)
            except Exception:
                raise legacy_error from None
            return "dynamo"


def _value_infos(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}

    def info(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower()}

    return [info(v) for v in graph.input if v.name not in init], [info(v) for v in graph.output]


def ort_session(path: Path, threads: int | None = None) -> Any:
    """A CPU session on `threads` intra-op threads (default: torch's thread budget)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Respect the process's thread budget instead of onnxruntime's default of every core.
    so.intra_op_num_threads = max(1, threads if threads is not None else torch.get_num_threads())
    # Spinning workers burn the cores they wait on; on a shared or busy machine that turns a
    # sub-second check into many seconds.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
           tolerance: float, part: str) -> float:
    import numpy as np

    try:
        got = ort_session(path).run(outputs, {k: v.numpy() for k, v in inputs.items()})
    except Exception as e:
        raise NemoError(f"ONNX check of the {part} failed: onnxruntime cannot run it ({_one_line(e)})") from None
    with torch.no_grad():
        want = module(*inputs.values())
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    diff = 0.0
    for name, g, w in zip(outputs, got, want):
        w = w.numpy()
        if g.shape != w.shape:
            raise NemoError(f"ONNX check of the {part} failed: output {name} has shape {list(g.shape)}, "
                            f"torch gives {list(w.shape)}")
        d = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) if g.size else 0.0
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        if not np.isfinite(d) or d > tolerance * scale:
            raise NemoError(f"ONNX check of the {part} failed: output {name} differs from torch by {d:.3g} "
                            f"(allowed {tolerance * scale:.3g})")
        diff = max(diff, d)
    return diff


def export_module(part: str, folder: str, module: nn.Module, make_inputs: Callable[[int, int], dict[str, torch.Tensor]],
                  outputs: list[str], out: Path, *, opset: int, check: bool, seed: int, tolerance: float,
                  external_data: bool | None, own_batch: bool = False, simplify: bool = False) -> OnnxReport:
    """Export `module` to `out/folder/model.onnx` (atomically), check it against torch on
    `make_inputs(CHECK_BATCH, seed)` and describe it. `make_inputs(batch, seed)` gives the named
    inputs, batch first (`own_batch`: see `_torch_export`; `simplify`: see `_simplify`)."""
    import onnx
    import onnxruntime

    final = Path(out) / folder
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with atomic_dir(final) as tmp:
            scratch = tmp / "export"
            scratch.mkdir()
            t0 = time.perf_counter()
            try:
                exporter = _torch_export(module, make_inputs(CHECK_BATCH, seed + 1), outputs,
                                         scratch / "model.onnx", opset, own_batch)
            except Exception as e:
                raise NemoError(f"ONNX export of the {part} failed ({_one_line(e)})") from None
            spilled = len(list(scratch.iterdir())) > 1  # the exporter itself wrote external tensors
            external = external_data if external_data is not None else (spilled or param_bytes >= EXTERNAL_DATA_BYTES)
            if external or spilled:
                # One data file beside the graph instead of one file per tensor.
                model = onnx.load(str(scratch / "model.onnx"))
                onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=EXTERNAL_DATA_NAME, size_threshold=1024)
                del model
                external = True
            else:
                os.replace(scratch / "model.onnx", tmp / "model.onnx")
            shutil.rmtree(scratch)
            simplified = _simplify(tmp / "model.onnx") if simplify and not external else (
                "not simplified: weights stored outside the graph" if simplify else None)
            try:
                onnx.checker.check_model(str(tmp / "model.onnx"))  # by path: works beyond 2 GiB
            except Exception as e:
                raise NemoError(f"ONNX export of the {part} failed: invalid model ({_one_line(e)})") from None
            seconds = time.perf_counter() - t0
            diff = check_seconds = None
            if check:
                t1 = time.perf_counter()
                diff = check_onnx(tmp / "model.onnx", module, make_inputs(CHECK_BATCH, seed), outputs, tolerance, part)
                check_seconds = time.perf_counter() - t1
            ins, outs = _value_infos(tmp / "model.onnx")
            size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    except OSError as e:
        raise NemoError(f"{final}: cannot write the ONNX {part} ({e.strerror or e})") from None
    return OnnxReport(part=part, path=final / "model.onnx", bytes=size, seconds=round(seconds, 3), opset=opset,
                      max_abs_diff=diff, inputs=ins, outputs=outs, external_data=external,
                      onnxruntime=onnxruntime.__version__, exporter=exporter,
                      check_seconds=None if check_seconds is None else round(check_seconds, 3),
                      check_batch=CHECK_BATCH if check else None, tolerance=tolerance if check else None,
                      simplified=simplified)


def _simplify(path: Path) -> str:
    """Rewrite the graph at `path` with onnxslim (constant folding, shape-op elimination, common
    subexpressions); returns what was done. Why: the TorchScript exporter spells every reshape of
    a dynamic batch as a chain of Shape/Gather/Unsqueeze/Concat nodes, a third of a UNet graph's
    nodes; onnxruntime pays a fixed cost per node, which dominates a run of a few samples on a
    small model. A graph the simplifier cannot handle is kept as exported: it is slower, not
    wrong, and the check against torch runs either way."""
    import onnx

    try:
        import onnxslim

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnx.load(str(path))
            before = len(model.graph.node)
            model = onnxslim.slim(model)
            after = len(model.graph.node)
            onnx.save_model(model, str(path))
    except Exception as e:  # a simplifier failure costs speed only: keep the exported graph
        return f"not simplified: onnxslim failed ({_one_line(e)})"
    return f"onnxslim {onnxslim.__version__}: {before} -> {after} nodes"


def export_unet(model_dir: Path, out: Path, *, opset: int = 17, check: bool = True, seed: int = 0,
                tolerance: float = DEFAULT_TOLERANCE, external_data: bool | None = None) -> OnnxReport:
    """Export `model_dir/unet` to `out/unet/model.onnx` (inputs sample, timestep,
    encoder_hidden_states; output out_sample; batch dynamic). `external_data`: None decides by
    size (weights over 2 GiB go to `model.onnx.data`), True/False force it."""
    from diffusers import UNet2DConditionModel

    check_apart(Path(out) / "unet", model=model_dir)
    unet = _load(UNet2DConditionModel, model_dir, "unet", "UNet", torch_dtype=torch.float32)
    cfg = unet.config
    if cfg.class_embed_type is not None or cfg.addition_embed_type not in (None, "text_time"):
        raise NemoError(f"{model_dir}: UNet needs conditioning other than text "
                        f"(class_embed_type={cfg.class_embed_type!r}, addition_embed_type={cfg.addition_embed_type!r}); "
                        "ONNX export supports Stable Diffusion 1.x/2.x/XL UNets")
    widths = cross_attention_widths(cfg)
    if len(widths) != 1:
        raise NemoError(f"{model_dir}: UNet has per-block cross-attention widths "
                        f"({', '.join(map(str, sorted(widths)))}); ONNX export supports one width")
    (text_width,) = widths
    text_time = cfg.addition_embed_type == "text_time"
    h, w = _size(cfg.sample_size)
    seq = _seq_len(model_dir)
    if text_time:
        n_time = 6  # SDXL's micro-conditioning: original size, crop, target size
        text_dim = int(cfg.projection_class_embeddings_input_dim) - n_time * int(cfg.addition_time_embed_dim)

    def make_inputs(batch: int, s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(s)
        d = {"sample": torch.randn(batch, cfg.in_channels, h, w, generator=g),
             "timestep": torch.randint(0, 1000, (batch,), generator=g).float(),
             "encoder_hidden_states": torch.randn(batch, seq, text_width, generator=g)}
        if text_time:
            d["text_embeds"] = torch.randn(batch, text_dim, generator=g)
            d["time_ids"] = torch.randint(0, 1025, (batch, n_time), generator=g).float()
        return d

    return export_module("UNet", "unet", _UNetWrapper(unet, text_time), make_inputs, ["out_sample"], out,
                        opset=opset, check=check, seed=seed, tolerance=tolerance, external_data=external_data)


def export_text_encoder(model_dir: Path, out: Path, *, opset: int = 17, check: bool = True, seed: int = 0,
                        tolerance: float = DEFAULT_TOLERANCE, external_data: bool | None = None) -> OnnxReport:
    """Export `model_dir/text_encoder` (CLIP) to `out/text_encoder/model.onnx` (input input_ids;
    outputs last_hidden_state, pooler_output)."""
    from transformers import CLIPTextModel

    check_apart(Path(out) / "text_encoder", model=model_dir)
    te = _load(CLIPTextModel, model_dir, "text_encoder", "text encoder")
    cfg = te.config
    seq = int(cfg.max_position_embeddings)

    def make_inputs(batch: int, s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, int(cfg.vocab_size), (batch, seq), generator=g)
        # Shaped like tokenizer output (start token, words, end token padding) so the pooled
        # output is read at a real end-of-text position.
        if cfg.bos_token_id is not None and cfg.bos_token_id < cfg.vocab_size:
            ids[:, 0] = cfg.bos_token_id
        if cfg.eos_token_id is not None and cfg.eos_token_id < cfg.vocab_size:
            for i in range(batch):
                ids[i, 1 + (3 * i + seq // 4) % max(1, seq - 1):] = cfg.eos_token_id
        return {"input_ids": ids}

    return export_module("text encoder", "text_encoder", _TextWrapper(te), make_inputs,
                        ["last_hidden_state", "pooler_output"], out, opset=opset, check=check, seed=seed,
                        tolerance=tolerance, external_data=external_data)


def export_vae_decoder(model_dir: Path, out: Path, *, opset: int = 17, check: bool = True, seed: int = 0,
                       tolerance: float = DEFAULT_TOLERANCE, external_data: bool | None = None) -> OnnxReport:
    """Export the decoder of `model_dir/vae` to `out/vae_decoder/model.onnx` (input
    latent_sample, unscaled; output sample)."""
    from diffusers import AutoencoderKL

    check_apart(Path(out) / "vae_decoder", model=model_dir)
    vae = _load(AutoencoderKL, model_dir, "vae", "VAE decoder", torch_dtype=torch.float32)
    cfg = vae.config
    down = 2 ** (len(cfg.block_out_channels) - 1)
    h, w = _size(cfg.sample_size)
    h, w = max(1, h // down), max(1, w // down)

    def make_inputs(batch: int, s: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(s)
        return {"latent_sample": torch.randn(batch, cfg.latent_channels, h, w, generator=g)}

    return export_module("VAE decoder", "vae_decoder", _VaeDecoderWrapper(vae), make_inputs, ["sample"], out,
                        opset=opset, check=check, seed=seed, tolerance=tolerance, external_data=external_data)
