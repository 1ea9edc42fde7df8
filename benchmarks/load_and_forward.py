"""Import time, load time, peak memory and prefill throughput: gpt2kit against transformers, side by side.

GPT-2 small's shape (124M parameters, random weights) is written once as model.safetensors by
transformers' save_pretrained into a temporary directory, so both libraries read the same file. Every
figure comes from fresh subprocesses (this script re-runs itself with --worker), alternating between the
two libraries so that load on a shared machine hits both alike; times are medians of the rounds, except
prefill, where each figure is the best over rounds of fresh processes (contention only slows runs down). Prints a table with ratios and writes
JSON to benchmarks/out/load_and_forward.json. For each prefill it also prints the compute floor (see
worker_floor): how close each library is to what this machine's GEMMs allow.

    python benchmarks/load_and_forward.py            # everything (a few minutes on 2 cores)
    python benchmarks/load_and_forward.py --quick    # fewer repeats, prefill only 1 x 1024
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
IMPORTS = {
    "torch": "import torch",
    "gpt2kit": "import gpt2kit",  # lazy: the public names load on first use
    "gpt2kit_model": "from gpt2kit import GPT2LMHeadModel",  # what a script needs before from_pretrained
    "transformers": "import transformers; from transformers import GPT2LMHeadModel",
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers (run in a fresh process each) --------------------------------------------------------------

def _model_class(lib: str):
    if lib == "gpt2kit":
        from gpt2kit import GPT2LMHeadModel
    else:
        from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel


def worker_load(lib: str, ckpt: str) -> dict:
    """from_pretrained to a ready model, then one forward over a 32-token prompt (as a generate call would
    start); peak memory relative to right after import."""
    import torch

    cls = _model_class(lib)
    after_import = rss_mb()
    t0 = time.perf_counter()
    model = cls.from_pretrained(ckpt)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)
    peak = peak_mb()
    return {"load_s": load_s, "rss_after_import_mb": after_import, "peak_mb": peak, "delta_mb": peak - after_import}


def worker_prefill(lib: str, ckpt: str, dtype: str, batch: int, seq: int, repeats: int) -> dict:
    """Tokens per second of one forward over batch x seq tokens, all logits, after one warm-up forward."""
    import torch

    model = _model_class(lib).from_pretrained(ckpt, dtype=getattr(torch, dtype))
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(ids)  # warm-up: allocator, oneDNN primitive caches
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = model(ids).logits
            times.append(time.perf_counter() - t0)
    assert logits.shape == (batch, seq, 50257)
    # the fastest repeat: on a shared machine other processes only ever slow a run down
    return {"tokens_per_s": batch * seq / min(times), "times_s": times}


def worker_floor(dtype: str, batch: int, seq: int) -> dict:
    """The compute floor of a prefill: its matrix-product FLOPs over the best GEMM throughput this machine
    reaches on GPT-2 small's own matrices at batch x seq rows (oneDNN, weights packed, hot in cache; plain
    torch.matmul where oneDNN is missing). Attention is counted at the same rate, so this is an upper bound
    on what any implementation could reach."""
    import torch

    dt = getattr(torch, dtype)
    rows, C, V, L = batch * seq, 768, 50257, 12
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, V)]  # (in, out) of every product a token meets
    x = {k: torch.randn(rows, k, dtype=dt) for k in {C, 4 * C}}
    best = 0.0
    for k, n in shapes:
        w = torch.randn(n, k, dtype=dt)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            run = lambda: torch.ops.mkldnn._linear_pointwise(x[k], packed, None, "none", [], "")  # noqa: E731
            run()
        except (AttributeError, RuntimeError):
            wt = w.t().contiguous()
            run = lambda: x[k] @ wt  # noqa: E731
        run()
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            run()
        best = max(best, 2 * rows * k * n * reps / (time.perf_counter() - t0))
    per_token = 2 * (L * sum(k * n for k, n in shapes[:4]) + C * V) + 2 * seq * C * L  # products + causal attention
    return {"gemm_gflops": best / 1e9, "flops_per_token": per_token, "floor_tokens_per_s": best / per_token}


# -- driver ---------------------------------------------------------------------------------------------

def run_worker(*args: str) -> dict:
    out = subprocess.run([PY, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_import(stmt: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", stmt], check=True, capture_output=True)
    return time.perf_counter() - t0


def write_checkpoint(directory: str) -> str:
    code = ("import torch, transformers, sys; torch.manual_seed(0); "
            "transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(sys.argv[1])")
    subprocess.run([PY, "-c", code, directory], check=True, capture_output=True)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats; prefill 1 x 1024 only")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per prefill figure (best is kept)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "load":
            result = worker_load(*rest)
        elif kind == "floor":
            dtype, b, t = rest
            result = worker_floor(dtype, int(b), int(t))
        else:
            lib, ckpt, dtype, b, t, r = rest
            result = worker_prefill(lib, ckpt, dtype, int(b), int(t), int(r))
        print(json.dumps(result))
        return

    reps = 2 if args.quick else 3
    libs = ("gpt2kit", "transformers")
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(os.path.join(tmp, "gpt2-small"))
        size_mb = os.path.getsize(os.path.join(ckpt, "model.safetensors")) / 2**20
        results["checkpoint_mb"] = size_mb

        imports = {k: [] for k in IMPORTS}
        for _ in range(reps + 2):
            for k, stmt in IMPORTS.items():
                imports[k].append(time_import(stmt))
        results["import_s"] = {k: statistics.median(v) for k, v in imports.items()}

        loads = {lib: [] for lib in libs}
        for _ in range(reps):
            for lib in libs:
                loads[lib].append(run_worker("load", lib, ckpt))
        results["load"] = {lib: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                           for lib, runs in loads.items()}

        shapes = [(1, 1024)] if args.quick else [(1, 1024), (8, 512)]
        results["prefill"] = []
        if not args.skip_prefill:
            for dtype in ("float32", "bfloat16"):
                for b, t in shapes:
                    row = {"dtype": dtype, "batch": b, "seq": t, "runs": {lib: [] for lib in libs}}
                    for _ in range(args.rounds):  # fresh processes, alternating, best of the rounds
                        for lib in libs:
                            tps = run_worker("prefill", lib, ckpt, dtype, str(b), str(t), "2")["tokens_per_s"]
                            row["runs"][lib].append(tps)
                    for lib in libs:
                        row[lib] = max(row["runs"][lib])
                    row["floor"] = run_worker("floor", dtype, str(b), str(t))
                    results["prefill"].append(row)

    from gpt2kit.cpu import instruction_set

    results["instruction_set"] = instruction_set()
    print(f"CPU instruction set: {results['instruction_set']}")
    report(results)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "load_and_forward.json"), "w") as f:
        json.dump(results, f, indent=2)


def report(r: dict) -> None:
    imp, load, ours, ref = r["import_s"], r["load"], r["load"]["gpt2kit"], r["load"]["transformers"]
    lines = [
        "| measure | gpt2kit | transformers | ratio | bar |",
        "|---|---|---|---|---|",
        f"| `import gpt2kit` (s; `import torch` = {imp['torch']:.2f}) | {imp['gpt2kit']:.2f} | {imp['transformers']:.2f} | "
        f"{imp['gpt2kit'] - imp['torch']:+.2f} s vs torch | <= torch + 0.30 s |",
        f"| `from gpt2kit import GPT2LMHeadModel` (s) | {imp['gpt2kit_model']:.2f} | {imp['transformers']:.2f} | "
        f"{imp['gpt2kit_model'] - imp['torch']:+.2f} s vs torch | <= torch + 0.30 s |",
        f"| load, from_pretrained (s) | {ours['load_s']:.3f} | {ref['load_s']:.3f} | "
        f"{ours['load_s'] / ref['load_s']:.2f}x | <= 0.5x |",
        f"| peak RSS of load + 32-token forward - RSS after import (MB; checkpoint {r['checkpoint_mb']:.0f} MB) | "
        f"{ours['delta_mb']:.0f} | {ref['delta_mb']:.0f} | {ours['delta_mb'] / r['checkpoint_mb']:.2f}x checkpoint | "
        "<= 1.15x checkpoint |",
        f"| whole peak RSS (MB) | {ours['peak_mb']:.0f} | {load['transformers']['peak_mb']:.0f} | "
        f"{ours['peak_mb'] / ref['peak_mb']:.2f}x | <= 1.0x |",
    ]
    fp32 = {(row["batch"], row["seq"]): row["transformers"] for row in r["prefill"] if row["dtype"] == "float32"}
    for row in r["prefill"]:
        bar = "1.0x" if row["dtype"] == "float32" else "1.8x"
        ratio = f"{row['gpt2kit'] / row['transformers']:.2f}x"
        ref32 = fp32.get((row["batch"], row["seq"]))
        if row["dtype"] != "float32" and ref32:
            ratio += f" ({row['gpt2kit'] / ref32:.2f}x its float32)"
        lines.append(f"| prefill {row['batch']} x {row['seq']} {row['dtype']}, all logits (tokens/s) | "
                     f"{row['gpt2kit']:.0f} | {row['transformers']:.0f} | {ratio} | >= {bar} |")
    print("\n".join(lines))
    print("\ncompute floor of each prefill (its FLOPs at the best GEMM rate measured on GPT-2's matrices):")
    for row in r["prefill"]:
        f = row["floor"]
        print(f"  {row['batch']} x {row['seq']} {row['dtype']}: GEMM {f['gemm_gflops']:.0f} GFLOP/s, "
              f"{f['flops_per_token'] / 1e6:.0f} MFLOP/token -> floor {f['floor_tokens_per_s']:.0f} tokens/s; gpt2kit at "
              f"{row['gpt2kit'] / f['floor_tokens_per_s']:.0%}, transformers at {row['transformers'] / f['floor_tokens_per_s']:.0%}; "
              f"the most any library could reach is {f['floor_tokens_per_s'] / row['transformers']:.2f}x transformers")


if __name__ == "__main__":
    main()
