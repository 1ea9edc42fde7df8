"""gpt2kit against an earlier gpt2kit, side by side in one run: did a change cost speed?

Each figure comes from a fresh process per round, with PYTHONPATH pointing at one tree's src/, the two trees
alternating round by round, which goes first flipping each round (so both see the same machine load), on GPT-2 small's shape with the same random
weights. Reports the median over rounds for each tree and the ratio new / old.

    git worktree add /tmp/old <commit>
    python benchmarks/versions.py --old /tmp/old --new .            # all cases, 3 rounds
    python benchmarks/versions.py --old /tmp/old --cases fp32-b1,prefill-fp32-1x1024 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {  # name: (kind, dtype, batch, tokens, new tokens)
    "fp32-b1": ("decode", "float32", 1, 16, 64),
    "bf16-b1": ("decode", "bfloat16", 1, 16, 64),
    "fp32-b8": ("decode", "float32", 8, 16, 64),
    "fp32-b32": ("decode", "float32", 32, 16, 32),
    "ttft-512": ("decode", "float32", 1, 512, 1),
    "prefill-fp32-1x1024": ("prefill", "float32", 1, 1024, 0),
    "prefill-bf16-1x1024": ("prefill", "bfloat16", 1, 1024, 0),
    "prefill-fp32-8x512": ("prefill", "float32", 8, 512, 0),
    "prefill-bf16-8x512": ("prefill", "bfloat16", 8, 512, 0),
}


def worker(case: str, repeats: int, threads: int) -> None:
    """Runs inside the tree under test: prints one JSON line {"tokens_per_s": ...}."""
    import torch

    from gpt2kit import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    kind, dtype, B, T, new = CASES[case]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().to(getattr(torch, dtype))
    ids = torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(1))
    times, cpu = [], []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first is a warm-up (packing, allocator)
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "decode":
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            else:
                model(ids, use_cache=False)
            if i:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    t = statistics.median(times)
    n = B * (new if kind == "decode" and new > 1 else T if kind == "prefill" else 1)
    figure = n / t if not (kind == "decode" and new == 1) else 1.0 / t  # ttft: first tokens per second
    # CPU seconds too: on a machine shared with other work, wall time measures the neighbours as well
    print(json.dumps({"tokens_per_s": figure, "seconds": t, "cpu_seconds": statistics.median(cpu)}))


def run(tree: str, case: str, repeats: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case, str(repeats), str(threads)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from gpt2kit.cpu import instruction_set  # this checkout's, whichever trees are compared

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=False, help="the earlier tree (a worktree of the commit to compare with)")
    ap.add_argument("--new", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions inside each process (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
    if not args.old:
        ap.error("--old is required")
    print(f"CPU instruction set: {instruction_set()}; {args.threads} threads; {args.rounds} rounds, fresh processes")
    rows = []
    for case in args.cases.split(","):
        figs = {"old": [], "new": []}
        for r in range(args.rounds):
            # the order flips every round: the second process of a pair ran bf16 cases 8-23% slower whichever
            # tree it held (measured with the trees swapped), so a fixed order biased the ratio
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                figs[side].append(run(getattr(args, side), case, args.repeats, args.threads))
        old = statistics.median(f["tokens_per_s"] for f in figs["old"])
        new = statistics.median(f["tokens_per_s"] for f in figs["new"])
        cpu_ratio = statistics.median(f["cpu_seconds"] for f in figs["old"]) / statistics.median(
            f["cpu_seconds"] for f in figs["new"])
        unit = "first tokens/s" if case.startswith("ttft") else "tokens/s"
        rows.append(dict(case=case, old=old, new=new, ratio=new / old, cpu_ratio=cpu_ratio, unit=unit, rounds=figs))
        print(f"{case:22s} old {old:9.1f}  new {new:9.1f} {unit:15s} new/old {new / old:.3f} "
              f"(CPU time old/new {cpu_ratio:.3f})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": instruction_set(), "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
