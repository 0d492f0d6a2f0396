"""Surgery speed and memory on a synthetic full-size checkpoint: a single-file .safetensors with
Stable Diffusion 1.5's UNet key layout and shapes (random values), plus a plan of 300 neurons.

    python bench/bench_surgery.py [--dtype fp16|fp32] [--workdir DIR]

Each method runs in its own process so that its peak RSS is its own:
- plain file copy (shutil.copyfile): the time floor;
- nemo-surgery's streaming apply;
- naive: load every tensor, zero the rows, save everything (safetensors.torch load_file/save_file).
Prints seconds, peak RSS and the ratios against the copy, plus the largest tensor's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, os, resource, shutil, sys, time
from pathlib import Path
method, src, dst, plan_path = sys.argv[1:5]
if method == "make":
    sys.path.insert(0, plan_path)
    from bench_surgery import make_checkpoint
    print(json.dumps(make_checkpoint(Path(src), dst)))
    sys.exit(0)
# imports before the clock: a one-off start-up cost, not the operation
if method in ("apply", "naive"):
    from nemo_surgery.plan import Plan
    from nemo_surgery.surgery.apply import apply_plan
    from nemo_surgery.surgery.keymap import diffusers_to_ldm
    from safetensors.torch import load_file, save_file
t0 = time.perf_counter()
if method.startswith("copy"):
    shutil.copyfile(src, dst)
    if method == "copy+fsync":
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
elif method == "apply":
    apply_plan(Plan.load(Path(plan_path)), Path(src), Path(dst))
else:
    sd = load_file(src)
    for layer, rows in Plan.load(Path(plan_path)).layers.items():
        sd[diffusers_to_ldm(layer) + ".weight"][rows] = 0
    save_file(sd, dst)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def make_checkpoint(path: Path, dtype: str) -> tuple[int, int]:
    """Write the synthetic checkpoint tensor by tensor; returns (bytes, largest tensor bytes)."""
    import torch
    from diffusers import UNet2DConditionModel

    from nemo_surgery.safetensors_io import TensorEntry, encode_header
    from nemo_surgery.surgery.convert import unet_key

    cfg = dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
               layers_per_block=2, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    full_cfg = dict(unet.config)
    tdt = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    item = torch.tensor([], dtype=tdt).element_size()
    entries, off = [], 0
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    for k, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        entries.append(TensorEntry(unet_key(k, full_cfg), dtype.upper().replace("FP", "F"), shape, off, off + n * item))
        off += n * item
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(encode_header(entries, {"format": "pt"}))
        for e in entries:
            f.write(torch.randn(e.shape, generator=g).to(tdt).contiguous().view(torch.uint8).numpy().tobytes())
    return off, max(e.end - e.begin for e in entries)


def run(method: str, src: Path, dst: Path, plan: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(src), str(dst), str(plan)],
                         capture_output=True, text=True, check=True)
    dst.unlink(missing_ok=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp32")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nemo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "sd15-unet.safetensors"
    t0 = time.perf_counter()
    # Made in a child process: on Linux a child's peak RSS starts at its parent's, so this process
    # stays small (no torch) and each measured method gets a fresh, small parent.
    made = subprocess.run([sys.executable, "-c", CHILD, "make", str(src), args.dtype, str(Path(__file__).parent)],
                          capture_output=True, text=True, check=True)
    size, largest = json.loads(made.stdout.strip().splitlines()[-1])
    print(f"synthetic SD 1.5 UNet checkpoint: {size / 1e9:.2f} GB ({args.dtype}), largest tensor "
          f"{largest / 1e6:.0f} MB, written in {time.perf_counter() - t0:.0f} s")
    layers = [f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_v" for i in range(3) for j in range(2)]
    layers.append("mid_block.attentions.0.transformer_blocks.0.attn2.to_v")
    plan = work / "plan.json"
    plan.write_text(json.dumps({"format": "nemo-surgery-plan", "version": 1,
                                "layers": {p: list(range(0, 300, 7)) for p in layers}}))
    results = {}
    for method in ("copy", "copy+fsync", "apply", "naive"):
        runs = [run(method, src, work / f"out-{method}.safetensors", plan) for _ in range(args.repeat)]
        results[method] = {"seconds": min(r["seconds"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
        r = results[method]
        print(f"{method:10} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:8.0f} MB")
    c, cf, a, n = results["copy"], results["copy+fsync"], results["apply"], results["naive"]
    print(f"apply / copy: x{a['seconds'] / c['seconds']:.2f}; apply (durable: fsync before rename) / "
          f"copy+fsync: x{a['seconds'] / cf['seconds']:.2f} (target <= 1.3); naive / copy: x{n['seconds'] / c['seconds']:.2f}")
    print(f"apply peak RSS {a['peak_rss_mb']:.0f} MB vs largest tensor + 300 MB = {largest / 2**20 + 300:.0f} MB; "
          f"naive {n['peak_rss_mb']:.0f} MB")
    src.unlink()


if __name__ == "__main__":
    main()
