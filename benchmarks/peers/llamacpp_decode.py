"""Batch-1 decode on CPU against the peer a CPU user would pick: llama.cpp (through llama-cpp-python).

GPT-2 small's shape with random weights (written once to benchmarks/out/gpt2-small-random by gpt2kit's
save_pretrained, then exported to GGUF by gguf_export.py and quantized by llama.cpp's own quantizer), a
16-token prompt and 128 new tokens, greedy, batch 1, the same thread count for everyone. The contenders run
in one process, in alternating rounds (a noisy neighbour hurts all alike); each figure is the median of the
rounds, in new tokens per second of the whole generate call (prefill included, for both sides alike).

Also printed: the CPU's instruction set (from /proc/cpuinfo), this machine's read bandwidth (a torch.sum over
a 1 GiB float32 tensor at the same thread count) and, per contender, its bandwidth floor: the weight bytes
one decode step must read (every block matrix, the final norm and the LM head; of the embeddings only one
row) divided by that bandwidth.

    pip install -e '.[peers]'                     # compiles llama.cpp: minutes
    python benchmarks/peers/llamacpp_decode.py    # writes benchmarks/peers/results.json
    python benchmarks/peers/llamacpp_decode.py --rounds 3 --new 32 --only llama.cpp-f32,gpt2kit-float32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gguf_export  # noqa: E402  (the sibling module)

OUT = os.path.join(os.path.dirname(HERE), "out")
CKPT = os.path.join(OUT, "gpt2-small-random")
LLAMA_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_K_M")
# (gpt2kit contender, llama.cpp contender): the same weight format, or the nearest one llama.cpp has
PAIRS = [("gpt2kit-float32", "llama.cpp-f32"), ("gpt2kit-int8", "llama.cpp-q8_0"),
         ("gpt2kit-int4-g32", "llama.cpp-q4_0"), ("gpt2kit-int8-emb", "llama.cpp-q8_0"),
         ("gpt2kit-int4-g32-emb", "llama.cpp-q4_0"), ("gpt2kit-bfloat16", "llama.cpp-f16"),
         ("gpt2kit-nf4", "llama.cpp-q4_0")]


def cpu_isa() -> tuple[str, str]:
    """(this CPU's model name, the instruction set PyTorch uses on it, as gpt2kit.cpu words it)."""
    from gpt2kit.cpu import instruction_set

    name = platform.processor() or "cpu"
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                break
    return name, instruction_set()


def read_bandwidth(repeats: int = 7) -> float:
    """Bytes per second a torch.sum streams from a 1 GiB float32 tensor (far past every cache), median."""
    x = torch.ones(2**28)  # [268M] float32 = 1 GiB
    for _ in range(2):
        x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * x.element_size() / statistics.median(times)


def make_checkpoint() -> str:
    """GPT-2 small (124M) with random weights and GPT-2's tokenizer, written once (atomically, as a directory)."""
    if os.path.isfile(os.path.join(CKPT, "model.safetensors")):
        return CKPT
    from gpt2kit import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gpt2-small-", dir=OUT)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the checkpoint from other users of the tree
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)
    GPT2Tokenizer.from_pretrained("gpt2").save_pretrained(tmp)
    os.replace(tmp, CKPT)
    return CKPT


def make_ggufs(threads: int) -> dict[str, str | Exception]:
    """{llama.cpp type: GGUF path, or the error that type raised}, made once from the checkpoint."""
    d = os.path.join(OUT, "gguf")
    os.makedirs(d, exist_ok=True)
    paths = {}
    for kind in LLAMA_TYPES:
        path = os.path.join(d, f"gpt2-small-random-{kind}.gguf")
        if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(os.path.join(CKPT, "model.safetensors")):
            try:
                if kind in gguf_export.FLOAT_TYPES:
                    gguf_export.export_gguf(CKPT, path, kind)
                else:
                    gguf_export.quantize_gguf(paths["f32"], path, kind, threads)
            except Exception as e:  # a quant type this llama.cpp build lacks: report it, time the others
                paths[kind] = e
                continue
        paths[kind] = path
    return paths


def gguf_weight_bytes(path: str) -> int:
    """Bytes a llama.cpp decode step reads: every tensor but position_embd; token_embd counts in full when it
    is also the (tied) output matrix, else as one row (noise)."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors
               if not t.name.startswith("position_embd") and not (untied and t.name.startswith("token_embd")))


def gpt2kit_weight_bytes(model) -> int:
    """Bytes a gpt2kit decode step reads: every tensor as stored (quantized ones included) once, the LM head
    in full (the tied wte, or its quantized table; a float32 head as its int8 screen, which greedy batch 1
    reads instead); wpe, and an untied wte, only one row (not counted)."""
    head = {t.data_ptr() for t in model.lm_head.state_dict().values()}
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if name.startswith("transformer.wpe.") or t.data_ptr() in seen:
            continue
        if name.startswith("transformer.wte.") and t.data_ptr() not in head:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    from gpt2kit import native
    from gpt2kit.model.linear import LMHead

    w = model.lm_head.weight if isinstance(model.lm_head, LMHead) else None
    if w is not None and w.dtype == torch.float32 and native.library() is not None:
        total -= w.numel() * 3 - w.shape[0] * 8  # greedy batch 1 reads the float32 head's int8 screen (LMHead.argmax)
    return total


def llama_contender(llama_cpp, path, prompt, new, threads):
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + new + 16,
                          n_batch=64, verbose=False, seed=0)

    def run():
        llm.reset()  # a fresh sequence: no KV prefix reused from the last round
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == new:
                return out

    return run, gguf_weight_bytes(path)


def gpt2kit_contenders(prompt, new) -> dict:
    """{name: (dtype or quantization_config, ...)} for what this gpt2kit has: float32 and bfloat16 always, the
    quantized modes where gpt2kit.TorchAoConfig / BitsAndBytesConfig exist."""
    import gpt2kit

    modes = {"gpt2kit-float32": dict(dtype=torch.float32), "gpt2kit-bfloat16": dict(dtype=torch.bfloat16)}
    try:
        TorchAoConfig, BitsAndBytesConfig = gpt2kit.TorchAoConfig, gpt2kit.BitsAndBytesConfig
    except AttributeError:
        print("gpt2kit has no quantization yet (no gpt2kit.TorchAoConfig): timing float32 and bfloat16 only")
    else:
        modes["gpt2kit-int8"] = dict(quantization_config=TorchAoConfig("int8_weight_only"))
        modes["gpt2kit-int4-g32"] = dict(quantization_config=TorchAoConfig("int4_weight_only", group_size=32))
        # the tied embedding / head quantized too, as llama.cpp's q8_0 / q4_0 files quantize token_embd
        modes["gpt2kit-int8-emb"] = dict(quantization_config=TorchAoConfig(
            "int8_weight_only", include_input_output_embeddings=True))
        modes["gpt2kit-int4-g32-emb"] = dict(quantization_config=TorchAoConfig(
            "int4_weight_only", group_size=32, include_input_output_embeddings=True))
        modes["gpt2kit-nf4"] = dict(quantization_config=BitsAndBytesConfig(  # the reference page's example
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16",
            bnb_4bit_use_double_quant=True))
    ids = torch.tensor([prompt])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=50256)
    out = {}
    for name, load_kw in modes.items():
        model = gpt2kit.GPT2LMHeadModel.from_pretrained(CKPT, **load_kw).eval()

        def run(model=model):
            with torch.no_grad():
                return model.generate(ids, **kw)[0, len(prompt):].tolist()

        out[name] = (run, gpt2kit_weight_bytes(model))
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens")
    ap.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install -e '.[peers]' (it compiles llama.cpp: minutes)")
    torch.set_num_threads(args.threads)
    cpu, isa = cpu_isa()
    tag = f"[{cpu}; {isa}; {args.threads} threads]"
    load_before = os.getloadavg()
    bw = read_bandwidth()
    print(f"{tag} read bandwidth (torch.sum over 1 GiB float32): {bw / 1e9:.1f} GB/s; load average {load_before[0]:.1f}")

    make_checkpoint()
    prompt = torch.randint(0, 50257, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    contenders, errors = {}, {}
    for kind, path in make_ggufs(args.threads).items():
        if isinstance(path, Exception):
            errors[f"llama.cpp-{kind}"] = f"{type(path).__name__}: {path}"
            continue
        contenders[f"llama.cpp-{kind}"] = llama_contender(llama_cpp, path, prompt, args.new, args.threads)
    contenders.update(gpt2kit_contenders(prompt, args.new))
    if args.only:
        keep = {c.strip() for c in args.only.split(",")}
        contenders = {k: v for k, v in contenders.items() if k in keep}

    print(f"timing {', '.join(contenders)}: warm-up, then {args.rounds} alternating rounds", flush=True)
    tokens = {k: run() for k, (run, _) in contenders.items()}  # warm-up, and each one's greedy tokens
    times = {k: [] for k in contenders}
    for i in range(args.rounds):
        for k, (run, _) in contenders.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {args.new / v[-1]:.1f}" for k, v in times.items())
              + " tok/s", flush=True)
    load_after = os.getloadavg()

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "isa": isa, "threads": args.threads,
               "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
               "load_average_before_after": [load_before[0], load_after[0]], "read_bandwidth_GBps": bw / 1e9,
               "prompt_tokens": args.prompt, "new_tokens": args.new, "rounds": args.rounds,
               "contenders": {}, "ratios": {}, "errors": errors}
    for k, (_, nbytes) in contenders.items():
        med = statistics.median(times[k])
        tps, floor = args.new / med, bw / nbytes
        results["contenders"][k] = {"tokens_per_s": tps, "seconds": med, "all_seconds": times[k],
                                    "weight_MB_per_token": nbytes / 1e6, "floor_tokens_per_s": floor,
                                    "of_floor": tps / floor}
        print(f"{tag} {k:18s} {tps:7.1f} tok/s   reads {nbytes / 1e6:6.1f} MB/token, floor {floor:6.1f} tok/s, "
              f"at {tps / floor:4.0%} of it")
    for ours, peer in PAIRS:
        if ours in results["contenders"] and peer in results["contenders"]:
            r = results["contenders"][ours]["tokens_per_s"] / results["contenders"][peer]["tokens_per_s"]
            results["ratios"][f"{ours} / {peer}"] = r
            print(f"{tag} {ours} / {peer}: {r:.2f}x")
    if "gpt2kit-float32" in tokens and "llama.cpp-f32" in tokens:
        n = agreement(tokens["gpt2kit-float32"], tokens["llama.cpp-f32"])
        results["greedy_tokens_shared_f32"] = n
        print(f"greedy continuations, gpt2kit float32 vs llama.cpp f32: first {n} of {args.new} tokens identical")
    for k, e in errors.items():
        print(f"{k}: not timed ({e})")
    print("\n| contender | tok/s | MB read / token | floor tok/s | of floor |\n|---|---:|---:|---:|---:|")
    for k, r in results["contenders"].items():
        print(f"| {k} | {r['tokens_per_s']:.1f} | {r['weight_MB_per_token']:.0f} | {r['floor_tokens_per_s']:.0f} "
              f"| {r['of_floor']:.0%} |")
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (2 cores: others were running)")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
