"""Localization speed: the plain sequential published algorithm against the batched engine, on
the same prompts, same model, same machine, checking that both find the same sets.

    python bench/bench_localize.py [--model examples/demo/model] [--prompts 4] [--device cpu]

Prints seconds per prompt and UNet sample-passes per prompt for both, and their ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference_nemo import plain_nemo  # noqa: E402

from nemo_surgery.corpus import read_corpus  # noqa: E402
from nemo_surgery.engine import Runtime, make_engine, open_model  # noqa: E402
from nemo_surgery.localize.detect import detect  # noqa: E402
from nemo_surgery.localize.settings import SearchSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "examples/demo/model")
    ap.add_argument("--corpus", type=Path, default=ROOT / "examples/demo/mem.csv")
    ap.add_argument("--reference", type=Path, default=ROOT / "examples/demo/reference.csv")
    ap.add_argument("--prompts", type=int, default=4, help="memorized prompts to time")
    ap.add_argument("--layers", default="official")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()

    rt = Runtime(args.device, args.precision, args.batch_size)
    model = open_model(args.model, rt)
    eng = make_engine(model, args.reference, rt, search=SearchSettings(layers=args.layers), cache_dir=args.cache_dir,
                      log=lambda s: print(s, file=sys.stderr))
    sc = eng.scorer
    prompts = [p for p in read_corpus(args.corpus).prompts]
    rows = []
    for p in prompts:
        if len(rows) >= args.prompts:
            break
        emb = sc.embed([p.text])
        d = sc.prompt_noise_diffs(emb)
        det = detect(sc, d, eng.calibration.theta_mem)
        if not det.memorized:
            continue
        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        n0 = sc.sample_passes
        sync()
        t0 = time.perf_counter()
        ref = plain_nemo(sc, eng.calibration, eng.layers, p.text, eng.search)
        sync()
        t_plain, n_plain = time.perf_counter() - t0, sc.sample_passes - n0
        n0 = sc.sample_passes
        t0 = time.perf_counter()
        emb = sc.embed([p.text])
        d = sc.prompt_noise_diffs(emb)
        det = detect(sc, d, eng.calibration.theta_mem)
        got = eng.localizer.localize(p.id, p.text, p.type, emb, d, det)
        sync()
        t_fast, n_fast = time.perf_counter() - t0, sc.sample_passes - n0
        same = got.initial == ref["initial"] and got.refined == ref["refined"]
        rows.append((p.id, p.type, t_plain, n_plain, t_fast, n_fast, same, len(got.near_threshold),
                     sum(len(v) for v in got.refined.values())))
        print(f"{p.id:>4} {p.type or '-':2} plain {t_plain:7.2f} s {n_plain:6d} samples | batched {t_fast:6.2f} s "
              f"{n_fast:6d} samples | x{t_plain / t_fast:4.1f} time, x{n_plain / max(1, n_fast):4.1f} samples | "
              f"same sets: {same} ({got.near_threshold and 'near-threshold decisions' or 'no fragile decisions'}), "
              f"{rows[-1][-1]} neurons", flush=True)
    if not rows:
        print("no memorized prompt found")
        return
    tp = sum(r[2] for r in rows) / len(rows)
    np_ = sum(r[3] for r in rows) / len(rows)
    tf = sum(r[4] for r in rows) / len(rows)
    nf = sum(r[5] for r in rows) / len(rows)
    dev = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nmachine: {dev}; torch {torch.__version__}; layers {args.layers}; batch {args.batch_size}; "
          f"precision {args.precision}")
    print(f"plain sequential: {tp:.2f} s/prompt, {np_:.0f} UNet samples/prompt")
    print(f"batched engine:   {tf:.2f} s/prompt, {nf:.0f} UNet samples/prompt")
    print(f"speed-up: x{tp / tf:.2f} time, x{np_ / nf:.2f} samples; identical sets on "
          f"{sum(r[6] for r in rows)}/{len(rows)} prompts")


if __name__ == "__main__":
    main()
