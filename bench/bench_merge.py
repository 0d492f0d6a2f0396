"""How the corpus-level pruning's cost grows with the corpus: `merge` on the first N memorized
prompts of a localized corpus, for growing N.

    python bench/bench_merge.py [--model examples/demo/model] --results results.jsonl [--sizes 1,2,4,8,0]

`--results`: the `results.jsonl` of `nemo-surgery localize` (or a build's work folder) for
`--corpus` on `--model` with the same reference, `--layers` and `--criterion`. Size 0 is every memorized prompt.
For each N prints the union and pruned sizes, the UNet samples the merge spent (its union and
final checks and the pruning), the seconds, and samples per (prompt x union neuron): a drop must
see every memorized seed of every prompt, so the pruning's cost grows with prompts times neurons,
and that last figure says how far the early exit and staged groups keep it below that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nemo_surgery.corpus import read_corpus
from nemo_surgery.engine import Runtime, make_engine, open_model
from nemo_surgery.errors import NemoError
from nemo_surgery.localize.merge import MergeSettings, make_plan
from nemo_surgery.localize.runner import make_header, open_results
from nemo_surgery.localize.settings import SearchSettings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "examples/demo/model")
    ap.add_argument("--corpus", type=Path, default=ROOT / "examples/demo/mem.csv")
    ap.add_argument("--reference", type=Path, default=ROOT / "examples/demo/reference.csv")
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--sizes", default="1,2,4,8,0", help="comma-separated prompt counts; 0: all memorized")
    ap.add_argument("--layers", default="official")
    ap.add_argument("--criterion", default="published", help="as localize's --criterion")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()

    rt = Runtime(args.device, "fp32", args.batch_size)
    search = SearchSettings(layers=args.layers, criterion=args.criterion)
    engine = make_engine(open_model(args.model, rt), args.reference, rt, search=search, cache_dir=args.cache_dir,
                         log=lambda s: print(s, file=sys.stderr))
    corpus = read_corpus(args.corpus)
    # Refuses results localized with another model, reference or settings, as `merge` does.
    try:
        records = open_results(args.results, make_header(engine.config(corpus, "localize")), restart=False)
    except NemoError as e:
        sys.exit(str(e))
    memorized = [records[p.id] for p in corpus.prompts if p.id in records and records[p.id].get("memorized")]
    if not memorized:
        sys.exit(f"{args.results}: no localized memorized prompt of {args.corpus}")
    sizes = [int(s) or len(memorized) for s in args.sizes.split(",")]
    print(f"{'prompts':>7} {'union':>6} {'pruned':>6} {'samples':>8} {'seconds':>8} {'samples/(prompt*neuron)':>24}")
    for n in sizes:
        recs = memorized[:n]
        sc = engine.scorer
        n0, t0 = sc.sample_passes, time.perf_counter()
        plan = make_plan(engine, corpus, recs, MergeSettings())
        seconds, samples = time.perf_counter() - t0, sc.sample_passes - n0
        ch = plan.check
        print(f"{len(recs):7d} {ch['union_neurons']:6d} {ch['neurons']:6d} {samples:8d} {seconds:8.1f} "
              f"{samples / (len(recs) * ch['union_neurons']):24.3f}", flush=True)


if __name__ == "__main__":
    main()
