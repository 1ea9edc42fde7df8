"""Quantized decoding on the CPU: gpt2kit float32 / nf4 / fp4 / int8 / int4 against transformers + bitsandbytes
nf4 / int8, on GPT-2 small's and GPT-2 XL's shapes (random weights, one float32 checkpoint per shape that
every case loads).

Every case runs in a fresh process (so that load time, peak RSS and peak anonymous memory are its own):
it loads the checkpoint (quantizing while loading), reports get_memory_footprint(), then decodes greedily
from a 16-token prompt at batch 1 and batch 8 (min_new_tokens = max_new_tokens), --runs times, and reports
the median tokens per second; alternating with each run, a generate of one token (the prompt's prefill and its
first token), so that the two phases are reported apart too: the prefill + first token's seconds and the decode
steps' tokens per second after it ((new tokens - 1) over the whole time less the first token's). The parent prints the CPU's instruction set, this machine's read bandwidth
(a large float32 matrix-vector product) and each mode's bandwidth floor: the bytes one decode step must
read (the block matrices in the mode's format plus the LM head: float32 for bitsandbytes, its int8 screen (one
byte a weight and 8 bytes a row) for gpt2kit's greedy batch 1 where the native kernels are built, the mode's
format with "-emb") over that
bandwidth.

    python benchmarks/quantize.py                      # both shapes, all cases; writes quantize.json
    python benchmarks/quantize.py --sizes small --runs 3
    python benchmarks/quantize.py --kernels xl         # only the four block products of one GPT-2 XL block,
                                                       # per mode, batch 1 and 8 (no checkpoint, seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"small": dict(n_layer=12, n_embd=768, n_head=12), "xl": dict(n_layer=48, n_embd=1600, n_head=25)}
CASES = [("gpt2kit", "fp32"), ("gpt2kit", "nf4"), ("gpt2kit", "fp4"), ("gpt2kit", "int8"), ("gpt2kit", "int4"),
         ("gpt2kit", "int8-emb"), ("gpt2kit", "int4-emb"), ("transformers+bnb", "nf4"), ("transformers+bnb", "int8")]
BYTES_PER_WEIGHT = {"fp32": 4.0, "nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "int8": 1.0,
                    "int4": 0.5 + 8 / 32}  # codes + the float32 per-block scales (and zeros) a decode step reads
# "-emb": the tied embedding / LM head quantized too (TorchAoConfig(include_input_output_embeddings=True))


def rss_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def qconfig_for(lib, mode):
    if mode == "fp32":
        return None
    if lib == "gpt2kit":
        from gpt2kit.quantization.config import config_for

        return config_for(mode.removesuffix("-emb"), embeddings=mode.endswith("-emb"))
    import transformers

    if mode == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)


def child(spec):
    lib, mode, path = spec["lib"], spec["mode"], spec["dir"]
    peak = {"anon": 0}
    done = threading.Event()

    def sample():  # the peak of RssAnon while loading (the kernel keeps no high-water mark for it)
        while not done.is_set():
            peak["anon"] = max(peak["anon"], rss_status()["RssAnon"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    # the libraries are imported and the config built before the baseline: the figure is the load's memory,
    # not the imports' (which varied by hundreds of MB between fresh processes)
    if lib == "gpt2kit":
        from gpt2kit import AutoModelForCausalLM as auto
    else:
        import transformers

        auto = transformers.AutoModelForCausalLM
    qconfig = qconfig_for(lib, mode)
    kwargs = {"device_map": "cpu"} if lib != "gpt2kit" and mode != "fp32" else {}
    before = rss_status()["RssAnon"]
    sampler.start()
    t0 = time.perf_counter()
    model = auto.from_pretrained(path, quantization_config=qconfig, **kwargs)
    load_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    result = dict(lib=lib, mode=mode, load_s=load_s, footprint=model.get_memory_footprint(),
                  peak_anon_load=peak["anon"] - before)
    model.eval()
    g = torch.Generator().manual_seed(0)
    for batch in spec["batches"]:
        ids = torch.randint(0, 50257, (batch, 16), generator=g)
        kw = dict(max_new_tokens=spec["new"], min_new_tokens=spec["new"], do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            times, firsts = [], []
            for _ in range(spec["runs"]):  # alternating: the whole generate, and the prefill + its first token alone
                t = time.perf_counter()
                model.generate(ids, **kw)
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.generate(ids, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1})
                firsts.append(time.perf_counter() - t)
        result[f"tok_s_b{batch}"] = batch * spec["new"] / statistics.median(times)
        # the two phases apart: the prompt's prefill (+ the first token), and the decode steps after it
        first = statistics.median(firsts)
        result[f"first_s_b{batch}"] = first
        if spec["new"] > 1:
            result[f"step_tok_s_b{batch}"] = batch * (spec["new"] - 1) / max(statistics.median(times) - first, 1e-9)
        if lib == "gpt2kit":  # the kernels the last decode step at this batch ran
            from gpt2kit.quantization.replace import quantized_modules

            result[f"kernels_b{batch}"] = sorted({m.last_kernel for m in quantized_modules(model).values()})
    result["peak_rss"] = rss_status()["VmHWM"]
    if lib == "gpt2kit":
        result["kernels"] = sorted({k for b in spec["batches"] for k in result[f"kernels_b{b}"]})
    print("RESULT " + json.dumps(result), flush=True)


def checkpoint_bytes(path):
    """The float32 checkpoint's size: model.safetensors, or its shards (GPT-2 XL is saved in two)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def make_checkpoint(size, root):
    path = os.path.join(root, f"gpt2-{size}-f32")
    if not os.path.exists(os.path.join(path, "config.json")) or not checkpoint_bytes(path):
        from gpt2kit import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**SIZES[size])).save_pretrained(path)
    return path


def bandwidth_gb_s():
    w = torch.randn(8192, 16384)  # 512 MiB: far past any cache
    x = torch.randn(16384, 1)
    w @ x
    times = []
    for _ in range(5):
        t = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - t)
    return w.numel() * 4 / min(times) / 1e9


def kernels(size, repeats=30):
    """Median time of one block's four products (c_attn, attn c_proj, c_fc, mlp c_proj) per mode, x n_layer."""
    from gpt2kit.quantization.config import config_for
    from gpt2kit.quantization.replace import from_float

    cfg = SIZES[size]
    C = cfg["n_embd"]
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]  # Conv1D [in, out]
    torch.manual_seed(0)
    weights = [(torch.randn(i, o) * 0.02, torch.zeros(o)) for i, o in shapes]
    out = {}
    for mode in ("fp32", "nf4", "fp4", "int8", "int4"):
        if mode == "fp32":
            fns = [lambda x, w=w, b=b: torch.addmm(b, x, w) for w, b in weights]
        else:
            mods = [from_float(w, b, config_for(mode)) for w, b in weights]
            fns = [lambda x, m=m: m(x) for m in mods]
        for batch in (1, 8):
            xs = [torch.randn(batch, i) for i, _ in shapes]
            for f, x in zip(fns, xs):
                f(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                for f, x in zip(fns, xs):
                    f(x)
                times.append(time.perf_counter() - t)
            out[f"{mode}_b{batch}_ms_per_token"] = statistics.median(times) * 1e3 * cfg["n_layer"]
    for batch in (1, 8):
        print(f"{size} block products x {cfg['n_layer']} layers, batch {batch}: " + ", ".join(
            f"{m} {out[f'{m}_b{batch}_ms_per_token']:.1f} ms ({out[f'fp32_b{batch}_ms_per_token'] / out[f'{m}_b{batch}_ms_per_token']:.2f}x fp32)"
            for m in ("fp32", "nf4", "fp4", "int8", "int4")))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,xl")
    ap.add_argument("--cases", default=",".join(f"{lib}:{mode}" for lib, mode in CASES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", default="small=32,xl=8", help="new tokens per run, by size")
    ap.add_argument("--root", default="/tmp/gpt2kit-bench-quantize", help="where the float32 checkpoints are written")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per case")
    ap.add_argument("--out", default=os.path.join(HERE, "quantize.json"))
    ap.add_argument("--kernels", help="time only the block products of this size (small or xl)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from gpt2kit.cpu import instruction_set

    if args.kernels:
        print(json.dumps(dict(instruction_set=instruction_set(), threads=torch.get_num_threads(),
                              load_average=os.getloadavg())))
        return kernels(args.kernels)

    from gpt2kit import native

    bw = bandwidth_gb_s()
    info = dict(instruction_set=instruction_set(), native_kernels=native.library() is not None,
                threads=torch.get_num_threads(), bandwidth_gb_s=bw, load_average=os.getloadavg())
    print(json.dumps(info))
    new = dict(item.split("=") for item in args.new_tokens.split(","))
    results = {"machine": info, "sizes": {}}
    for size in args.sizes.split(","):
        path = make_checkpoint(size, args.root)
        cfg = SIZES[size]
        block_weights = cfg["n_layer"] * 12 * cfg["n_embd"] ** 2
        head_bytes = 50257 * cfg["n_embd"] * 4
        rows = []
        for case in args.cases.split(","):
            lib, mode = case.split(":")
            spec = dict(lib=lib, mode=mode, dir=path, batches=[1, 8], new=int(new[size]), runs=args.runs)
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, timeout=args.timeout)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                row = json.loads(line[7:]) if line else dict(lib=lib, mode=mode, error=proc.stderr[-400:])
            except subprocess.TimeoutExpired:
                row = dict(lib=lib, mode=mode, error=f"over {args.timeout} s")
            base = mode.removesuffix("-emb")
            head = head_bytes * BYTES_PER_WEIGHT[base] / 4 if mode.endswith("-emb") else head_bytes
            if lib == "gpt2kit" and not mode.endswith("-emb") and info["native_kernels"]:
                head = head_bytes / 4 + 50257 * 8  # greedy batch 1 reads the float32 head's int8 screen (LMHead.argmax)
            row["floor_tok_s_b1"] = bw * 1e9 / (block_weights * BYTES_PER_WEIGHT[base] + head)
            print(size, json.dumps(row), flush=True)
            rows.append(row)
        results["sizes"][size] = dict(checkpoint_bytes=checkpoint_bytes(path), rows=rows)
        print_table(size, results["sizes"][size])
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.out)


def print_table(size, data):
    rows = {(r["lib"], r["mode"]): r for r in data["rows"]}
    base = rows.get(("gpt2kit", "fp32"), {})
    print(f"\n{size}: checkpoint {data['checkpoint_bytes'] / 1e9:.2f} GB")
    print("| case | b1 tok/s | b8 tok/s | b1 vs gpt2kit fp32 | b1 vs transformers+bnb | b1 prefill + 1st s | "
          "b1 steps tok/s | steps vs transformers+bnb | floor b1 | load s | peak anon (load) / ckpt | "
          "footprint / fp32 | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (lib, mode), r in rows.items():
        if "error" in r:
            print(f"| {lib} {mode} | error: {r['error'][-80:]!r} |")
            continue
        peer = rows.get(("transformers+bnb", mode), {}).get("tok_s_b1")
        vs_peer = f"{r['tok_s_b1'] / peer:.2f}x" if peer and lib == "gpt2kit" else ""
        vs_base = f"{r['tok_s_b1'] / base['tok_s_b1']:.2f}x" if base.get("tok_s_b1") else ""
        fp = f"{r['footprint'] / base['footprint']:.2f}" if base.get("footprint") else ""
        steps = r.get("step_tok_s_b1")
        peer_steps = rows.get(("transformers+bnb", mode), {}).get("step_tok_s_b1")
        vs_steps = f"{steps / peer_steps:.2f}x" if steps and peer_steps and lib == "gpt2kit" else ""
        print(f"| {lib} {mode} | {r['tok_s_b1']:.1f} | {r['tok_s_b8']:.1f} | {vs_base} | {vs_peer} | "
              f"{r.get('first_s_b1', float('nan')):.2f} | {steps or float('nan'):.1f} | {vs_steps} | "
              f"{r['floor_tok_s_b1']:.0f} | {r['load_s']:.1f} | {r['peak_anon_load'] / data['checkpoint_bytes']:.2f} | "
              f"{fp} | {r['peak_rss'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
