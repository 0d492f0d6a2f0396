"""The search graph's attention fused or as exported: the cost of one search pass and its peak
memory, against torch's forward.

    python bench/bench_search_graph.py [--model examples/demo/model] [--batch 64] [--threads 2]

Exports the model's search graph twice: with every attention as onnxruntime's fused
`MultiHeadAttention` (what the search uses) and as the TorchScript exporter writes it (MatMul,
Softmax, MatMul). Each variant then runs in its own process, so that its peak RSS is its own:
two passes of `--batch` samples, every one its own (seed, prompt) row with no neurons blocked,
cut over `--threads` single-threaded runs as the search does; the second pass is timed. A third
process times diffusers' forward on torch at a batch of 10 (the plain algorithm's pass). Prints
ms per sample, peak RSS and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import contextlib, json, resource, sys, time
from pathlib import Path
import torch
import nemo_surgery.localize.ort_unet as O
from nemo_surgery.engine import Runtime, open_model
from nemo_surgery.localize.prefix import gather_points
variant, model_dir, cache, batch, threads = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
if variant.endswith("unfused"):
    O.fused_attention = lambda module: contextlib.nullcontext(0)
model = open_model(model_dir, Runtime("cpu", "fp32", batch, backend="torch"))
if variant.startswith("export"):
    O.open_ort_unet(model, cache).close()
    sys.exit(0)
g = torch.Generator().manual_seed(0)
n, d = model.latent_size, model.unet.config.cross_attention_dim
x = torch.randn(batch, model.unet.config.in_channels, n, n, generator=g)
e = torch.randn(batch, 77, d, generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if variant == "torch":
    def run():
        with torch.no_grad():
            model.unet(x, 981, encoder_hidden_states=e)
else:
    layers = [(v.path, v.out_features) for v in model.value_layers]
    (report,) = (cache / "onnx-search").glob("*/search.json")
    unet = O.OrtUNet(report.parent, layers, gather_points(model), threads)
    def run():
        unet.clear()  # a whole pass: no head states kept from the first
        unet(x, torch.tensor(981.0), e, None)
run()
t0 = time.perf_counter()
run()
ms = (time.perf_counter() - t0) / batch * 1000
print(json.dumps({"ms": ms, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mb": before / 1024}))
'''


def child(*args: object) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {args[0]} failed:\n{out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "examples/demo/model")
    ap.add_argument("--batch", type=int, default=64, help="samples in the timed onnxruntime pass")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where the graphs go (default: a temporary folder)")
    args = ap.parse_args()
    with (contextlib.nullcontext(str(args.workdir)) if args.workdir else tempfile.TemporaryDirectory()) as work:
        rows = {}
        for variant in ("fused", "unfused"):
            cache = Path(work) / variant
            child(f"export-{variant}", args.model, cache, 2, args.threads)
            rows[variant] = child(variant, args.model, cache, args.batch, args.threads)
        rows["torch"] = child("torch", args.model, Path(work), 10, args.threads)
    t = rows["torch"]["ms"]
    print(f"model {args.model}: onnxruntime passes of {args.batch} samples over {args.threads} runs, "
          f"torch on {args.threads} threads")
    print(f"torch forward (batch 10): {t:8.1f} ms/sample, peak RSS {rows['torch']['peak_mb']:6.0f} MB")
    for variant, label in (("unfused", "onnxruntime, attention as exported"), ("fused", "onnxruntime, fused attention")):
        r = rows[variant]
        print(f"{label:35s}: {r['ms']:8.1f} ms/sample, peak RSS {r['peak_mb']:6.0f} MB "
              f"(before the passes {r['before_mb']:.0f} MB): x{t / r['ms']:.2f} of torch")
    f, u = rows["fused"], rows["unfused"]
    print(f"fused against as exported: x{u['ms'] / f['ms']:.2f} time, x{u['peak_mb'] / f['peak_mb']:.2f} peak RSS")


if __name__ == "__main__":
    main()
