"""generate() speed: transformers and gpt2kit side by side in one run, on GPT-2 small's shape (124M, random
weights, the same weights in both).

Each case decodes the same prompt for the same number of new tokens (min_new_tokens = max_new_tokens, so
nothing stops early), alternating the two libraries run by run, and reports the median of --runs runs in
tokens per second. It also measures this machine's read bandwidth (a large matrix-vector product) and
prints the bandwidth floor: the weight bytes a decode step must read divided by that bandwidth.

    python benchmarks/generate.py                  # all CPU cases, 5 runs each; writes generate.json / .png
    python benchmarks/generate.py --cases fp32-b1,ttft --runs 3
    python benchmarks/generate.py --device cuda    # GPU: eager, static-cache+compile references
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {  # name: (dtype, batch, prompt tokens, new tokens); ttft decodes one token after a long prompt
    "fp32-b1": (torch.float32, 1, 16, 128),
    "bf16-b1": (torch.bfloat16, 1, 16, 128),
    "fp32-b8": (torch.float32, 8, 16, 128),
    "fp32-b32": (torch.float32, 32, 16, 128),
    "ttft-512": (torch.float32, 1, 512, 1),
}


def build(device):
    import transformers

    from gpt2kit import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    ours = GPT2LMHeadModel(GPT2Config()).eval()
    ours.load_state_dict(hf.state_dict())
    return hf.to(device), ours.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_bandwidth(device, dtype=torch.float32) -> float:
    """Bytes per second that a large matrix-vector product reads (a matrix far larger than the caches): the
    faster of torch.mv and, on CPU, oneDNN's product on the same matrix. On this AMD EPYC torch.mv reads at
    only 20-24 GB/s where oneDNN (and a plain sum) reach ~32 GB/s, so torch.mv alone would set the floor
    too low and let a decoder appear to beat it."""
    n = 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    v = torch.randn(n, dtype=dtype, device=device)
    readers = [lambda: torch.mv(a, v)]
    if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed, row = torch.ops.mkldnn._reorder_linear_weight(a, 1), v[None]
        readers.append(lambda: torch.ops.mkldnn._linear_pointwise(row, packed, None, "none", [], ""))
    best = 0.0
    for read in readers:
        for _ in range(3):
            read()
        sync(device)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            read()
            sync(device)
            times.append(time.perf_counter() - t)
        best = max(best, a.numel() * a.element_size() / statistics.median(times))
    return best


def weight_bytes_per_token(model, dtype) -> int:
    """What one decode step reads: every block weight, ln_f and the LM head (one row of wte/wpe is noise)."""
    cfg = model.config
    body = sum(p.numel() for n, p in model.transformer.named_parameters() if not n.startswith(("wte", "wpe")))
    head = cfg.vocab_size * cfg.n_embd
    return (body + head) * torch.tensor([], dtype=dtype).element_size()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def run_case(name, hf, ours, device, runs, extra_refs):
    dtype, batch, prompt_len, new = CASES[name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50000, (batch, prompt_len), generator=g).to(device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=50256)
    hf_m, ours_m = hf.to(dtype), ours.to(dtype)
    contenders = {"transformers": lambda: hf_m.generate(ids, **kw), "gpt2kit": lambda: ours_m.generate(ids, **kw)}
    for ref_name, make in extra_refs.items():
        contenders[ref_name] = make(hf_m, ids, kw)
    with torch.no_grad():
        for fn in contenders.values():  # warm up (and compile, where a contender compiles)
            fn()
        times = {k: [] for k in contenders}
        for _ in range(runs):  # alternate, so that a noisy neighbour hurts both alike
            for k, fn in contenders.items():
                times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    hf.to(torch.float32), ours.to(torch.float32)
    if name.startswith("ttft"):
        return {k: {"seconds": m, "all": times[k]} for k, m in med.items()}
    return {k: {"tokens_per_s": batch * new / m, "seconds": m, "all": times[k]} for k, m in med.items()}


def gpu_refs(device):
    """transformers' own fast path on a GPU: static cache + torch.compile (its auto-compile)."""
    if device.type != "cuda":
        return {}

    def static_compiled(hf_m, ids, kw):
        return lambda: hf_m.generate(ids, **kw, cache_implementation="static")

    return {"transformers-static-compile": static_compiled}


def profile(ours, device):
    """Where gpt2kit's float32 batch-1 decode spends its time, by operator."""
    from torch.profiler import profile as torch_profile

    ids = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=50256)
    with torch.no_grad():
        ours.generate(ids, **kw)
        with torch_profile() as prof:
            ours.generate(ids, **kw)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [c for c in results["cases"] if not c.startswith("ttft")]
    names = sorted({k for c in speed for k, v in results["cases"][c].items() if isinstance(v, dict)},
                   key=lambda k: (k != "transformers", k != "gpt2kit", k))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(names))
    for i, who in enumerate(names):
        vals = [results["cases"][c].get(who, {}).get("tokens_per_s", 0) for c in speed]
        axes[0].bar([x + i * width for x in range(len(speed))], vals, width, label=who, color=colors[who])
    axes[0].set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(speed))], speed)
    axes[0].set_ylabel("tokens / s (median)")
    floor = results.get("floor_tokens_per_s_fp32_b1")
    if floor:
        axes[0].axhline(floor, color="gray", ls="--", lw=1, label=f"fp32 b1 floor {floor:.0f}")
    axes[0].legend(fontsize=8)
    ttft = [c for c in results["cases"] if c.startswith("ttft")]
    for c in ttft:
        who = [k for k, v in results["cases"][c].items() if isinstance(v, dict)]
        axes[1].bar(who, [results["cases"][c][w]["seconds"] * 1e3 for w in who],
                    color=[colors.get(w, "C3") for w in who])
        axes[1].set_ylabel(f"{c}: time to first token (ms)")
        axes[1].tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"GPT-2 small generate, {results['device']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=None, help="override the number of new tokens (quick checks)")
    ap.add_argument("--profile", action="store_true", help="also print where gpt2kit's time goes (torch.profiler)")
    ap.add_argument("--out", default=os.path.join(HERE, "generate.json"))
    ap.add_argument("--png", default=os.path.join(HERE, "generate.png"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")

    if args.new:
        for c in CASES:
            if not c.startswith("ttft"):
                CASES[c] = CASES[c][:3] + (args.new,)
    hf, ours = build(device)
    bw = read_bandwidth(device)
    floor_b1 = bw / weight_bytes_per_token(ours, torch.float32)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    from gpt2kit.cpu import instruction_set

    isa = instruction_set() if device.type == "cpu" else "n/a"
    results = {"device": dev_name, "instruction_set": isa, "threads": args.threads, "torch": torch.__version__,
               "transformers": transformers.__version__, "read_bandwidth_GBps": bw / 1e9,
               "floor_tokens_per_s_fp32_b1": floor_b1, "cases": {}}
    print(f"device {dev_name}, instruction set {isa}, {args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"read bandwidth (8192x8192 float32 matrix-vector): {bw / 1e9:.1f} GB/s")
    for dt in (torch.float32, torch.bfloat16):
        wb = weight_bytes_per_token(ours, dt)
        print(f"floor, {str(dt)[6:]}: {wb / 1e6:.0f} MB of weights per decode step -> {bw / wb:.1f} steps/s "
              f"({1e3 * wb / bw:.1f} ms per step)")
    for c in cases:
        r = run_case(c, hf, ours, device, args.runs, gpu_refs(device))
        results["cases"][c] = r
        dtype, batch, _, _ = CASES[c]
        if c.startswith("ttft"):
            ref = r["transformers"]["seconds"]
            line = ", ".join(f"{k} {v['seconds'] * 1e3:.0f} ms ({v['seconds'] / ref:.2f}x)" for k, v in r.items())
        else:
            ref = r["transformers"]["tokens_per_s"]
            floor = batch * bw / weight_bytes_per_token(ours, dtype)
            r["floor_tokens_per_s"] = floor
            line = ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s ({v['tokens_per_s'] / ref:.2f}x)"
                             for k, v in r.items() if isinstance(v, dict))
            line += f"; floor {floor:.0f} tok/s, gpt2kit at {r['gpt2kit']['tokens_per_s'] / floor:.0%} of it"
        if c == "bf16-b1" and "fp32-b1" in results["cases"]:
            base = results["cases"]["fp32-b1"]["transformers"]["tokens_per_s"]
            r["gpt2kit_vs_transformers_fp32"] = r["gpt2kit"]["tokens_per_s"] / base
            line += f"; gpt2kit bf16 vs transformers fp32: {r['gpt2kit_vs_transformers_fp32']:.2f}x"
        print(f"{c:9s} {line}", flush=True)
    if args.profile:
        profile(ours, device)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    chart(results, args.png)
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
