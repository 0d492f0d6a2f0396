"""Train the bundled demo model: a tiny Stable Diffusion 1.x that memorizes some photos.

    python examples/demo/train.py --out examples/demo/model

Deterministic for a seed on a given torch build and thread count (recorded in train_log.json).
On 2 CPU cores the defaults take about 36 minutes. The vocabulary is reused from the committed
demo (`--tokenizer`), since a newly trained BPE vocabulary is not reproducible. The output is a diffusers folder that
`StableDiffusionPipeline.from_pretrained` loads, plus `mem.csv` (the memorized captions, in the
NeMo paper's format), `reference.csv` (never-trained prompts) and the memorized training images.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as demo_data  # noqa: E402

from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

# SD 1.x noise schedule (scaled_linear, 0.00085 -> 0.012, 1000 steps), as in its scheduler config.
SD1_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(texts: list[str], out: Path) -> CLIPTokenizer:
    """A CLIP BPE whose merges make every caption word one token (CLIP's lowercasing and
    byte-level alphabet, `</w>` word ends), saved as vocab.json + merges.txt."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, special_tokens=[BOS, EOS],
                                  initial_alphabet=alphabet + [a + "</w>" for a in alphabet],
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                               ensure_ascii=False))
    merge_lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    return clip_tokenizer(out)


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIPTokenizer of a folder's vocab.json + merges.txt, built the same way whether the
    vocabulary is new or reused, so that both save the same tokenizer files."""
    clip_tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    clip_tok.model_max_length = 77
    return clip_tok


def make_text_encoder(vocab_size: int, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         projection_dim=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModel(cfg).eval()
    model.requires_grad_(False)
    return model


def make_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(32, 64, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=demo_data.SIZE)


def make_unet(seed: int, sample_size: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=2, norm_num_groups=16)


def to_tensor(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous() * 2 - 1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def train_vae(vae: AutoencoderKL, photos: torch.Tensor, procedural: torch.Tensor, steps: int,
              decoder_steps: int, gen: torch.Generator) -> None:
    # Half of every batch is a memorized photo: the VAE's reconstruction of those is the ceiling
    # for any generation, so they get the capacity.
    def batch() -> torch.Tensor:
        a = photos[torch.randint(len(photos), (8,), generator=gen)]
        b = procedural[torch.randint(len(procedural), (8,), generator=gen)]
        return torch.cat([a, b])

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warm=min(50, steps // 10 + 1))
    for step in range(steps):
        x = batch()
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    # Decoder only: the encoder is frozen so latents cached for the UNet stay valid.
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, decoder_steps)
    for step in range(decoder_steps):
        x = batch()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == decoder_steps - 1:
            log(f"vae decoder step {step}/{decoder_steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + bs]).latent_dist.mean for i in range(0, len(x), bs)])


@torch.no_grad()
def embed(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str], bs: int = 256) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    return torch.cat([text_encoder(ids[i:i + bs])[0] for i in range(0, len(ids), bs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--procedural", type=int, default=4000)
    ap.add_argument("--photo-style", type=int, default=1280,
                    help="non-memorized training images captioned in the memorized photos' style (at most 1,280)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-decoder-steps", type=int, default=300)
    ap.add_argument("--unet-steps", type=int, default=2600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parent / "model" / "tokenizer",
                    help="reuse this CLIP tokenizer folder (default: the committed demo's); 'new' builds one. "
                         "The tokenizers library breaks ties between equally frequent merges in hash order, "
                         "so a new vocabulary differs from run to run; the committed one pins it.")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    out: Path = args.out
    model_dir = out / "model"
    data = demo_data.build(args.seed, args.procedural, args.photo_style)
    log(f"data: {len(data.vm)} VM, {len(data.tm)} TM images, {len(data.procedural)} procedural, "
        f"{len(data.photo_style)} photo-style, {len(data.reference)} reference prompts")

    texts = ([s.caption for s in data.vm + data.tm + data.procedural + data.photo_style]
             + [p for p, _ in data.reference])
    if str(args.tokenizer) != "new" and (args.tokenizer / "vocab.json").is_file():
        (model_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):  # save_pretrained writes tokenizer.json only
            if (args.tokenizer / name).resolve() != (model_dir / "tokenizer" / name).resolve():
                shutil.copyfile(args.tokenizer / name, model_dir / "tokenizer" / name)
        tokenizer = clip_tokenizer(model_dir / "tokenizer")
        log(f"tokenizer: reusing {args.tokenizer} ({len(tokenizer)} tokens)")
    else:
        tokenizer = build_tokenizer(texts, model_dir / "tokenizer")
    text_encoder = make_text_encoder(len(tokenizer), tokenizer, args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    photos = to_tensor([s.image for s in data.vm + data.tm])
    procedural = to_tensor([s.image for s in data.procedural])
    vae = make_vae(args.seed)
    train_vae(vae, photos, procedural, args.vae_steps, args.vae_decoder_steps, gen)
    log(f"vae done ({time.time() - t0:.0f}s)")

    lat_mem = encode_all(vae, photos)
    lat_proc = encode_all(vae, procedural)
    lat_photo = encode_all(vae, to_tensor([s.image for s in data.photo_style]))
    scaling = float(1.0 / torch.cat([lat_mem, lat_proc]).std())
    vae.register_to_config(scaling_factor=scaling)
    lat_mem, lat_proc, lat_photo = lat_mem * scaling, lat_proc * scaling, lat_photo * scaling
    emb_mem = embed(text_encoder, tokenizer, [s.caption for s in data.vm + data.tm])
    emb_proc = embed(text_encoder, tokenizer, [s.caption for s in data.procedural])
    emb_null = embed(text_encoder, tokenizer, [""])
    emb_photo = embed(text_encoder, tokenizer, [s.caption for s in data.photo_style])

    unet = make_unet(args.seed, lat_mem.shape[-1])
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")
    noise_sched = DDPMScheduler(**{k: v for k, v in SD1_SCHEDULE.items() if k != "set_alpha_to_one"})
    acp = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, args.unet_steps, warm=100)
    n_vm, n_tm = len(data.vm), len(data.tm)
    unet.train()
    for step in range(args.unet_steps):
        # Batch of 35: 16 VM photos, 4 TM images, 12 procedural (each seen ~8 times in all) and 3
        # photo-style images (each seen ~6 times), so that the memorized photos' caption style is
        # not the only non-procedural one the UNet knows.
        i_vm = torch.randint(n_vm, (16,), generator=gen)
        i_tm = n_vm + torch.randint(n_tm, (4,), generator=gen)
        i_pr = torch.randint(len(lat_proc), (12,), generator=gen)
        i_ph = torch.randint(len(lat_photo), (3,), generator=gen)
        x0 = torch.cat([lat_mem[torch.cat([i_vm, i_tm])], lat_proc[i_pr], lat_photo[i_ph]])
        cond = torch.cat([emb_mem[torch.cat([i_vm, i_tm])], emb_proc[i_pr], emb_photo[i_ph]])
        drop = torch.rand(len(cond), generator=gen) < 0.1  # caption dropout for guidance
        cond = torch.where(drop[:, None, None], emb_null.expand_as(cond), cond)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} ({time.time() - t0:.0f}s)")
    unet.eval().requires_grad_(False)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD1_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    write_corpus_files(out, data)
    (out / "train_log.json").write_text(json.dumps({
        "seed": args.seed, "procedural": args.procedural, "photo_style": args.photo_style,
        "vae_steps": args.vae_steps,
        "vae_decoder_steps": args.vae_decoder_steps, "unet_steps": args.unet_steps, "lr": args.lr,
        "threads": args.threads, "torch": torch.__version__, "seconds": round(time.time() - t0),
        "final_loss": round(loss.item(), 5), "vae_scaling_factor": scaling,
    }, indent=2) + "\n")
    log(f"saved to {model_dir} in {time.time() - t0:.0f}s")


def write_corpus_files(out: Path, data: demo_data.DemoData) -> None:
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in data.vm:
        fname = f"images/{s.name}.png"
        Image.fromarray((s.image * 255).round().astype(np.uint8)).save(out / fname)
        rows.append((s.caption, f"skimage://{s.name}", "VM", fname))
    for name, cap in demo_data.TM_CAPTIONS:
        # A TM caption has many training images; the first variant is named as its example.
        first = next(s for s in data.tm if s.caption == cap)
        fname = f"images/{first.name}.png"
        Image.fromarray((first.image * 255).round().astype(np.uint8)).save(out / fname)
        rows.append((cap, f"demo://{name}", "TM", fname))
    with open(out / "mem.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["", "Caption", "URL", "type", "Index", "image"])
        for i, (cap, url, typ, fname) in enumerate(rows):
            w.writerow([i, cap, url, typ, i, fname])
    with open(out / "reference.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "style"])
        w.writerows(data.reference)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
