"""Serving throughput and latency: gpt2kit serve against `transformers serve` (with and without
--continuous-batching) on the same checkpoint (GPT-2 small's shape, random weights), in one run.

    python benchmarks/serve.py                       # everything (long on a 2-core CPU)
    python benchmarks/serve.py --concurrency 1,8 --requests 2 --servers gpt2kit

For each server and each concurrency C: C clients in a closed loop, each sending --requests streamed
completions of 128 tokens (ignore_eos where the server has it) after a prompt of 64-512 random tokens.
Reported: output tokens/s, requests/s, time to first token and inter-token latency p50/p99 (from the
arrival times of the stream's chunks). Then, for gpt2kit only: offline `generate` at batch 1 and 32 (the
ceiling the server is held against), the inter-token latency of running streams while a 1000-token
prompt is read (chunked prefill), and the first-token time of a request whose 512-token prefix is cached
against one whose prefix is not. Writes benchmarks/serve.json and serve.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RESULTS = REPO / "benchmarks"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def make_checkpoint(folder: pathlib.Path, n_positions: int) -> pathlib.Path:
    import torch

    from gpt2kit import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=n_positions))  # GPT-2 small: 12 x 768, 124M parameters
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(REPO / "src" / "gpt2kit" / "assets" / "default-model" / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model: pathlib.Path, port: int, max_seqs: int):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    if kind == "gpt2kit":
        cmd = [sys.executable, "-m", "gpt2kit", "serve", str(model), "--port", str(port), "--max-num-seqs",
               str(max_seqs), "--no-ui", "--served-model-name", "bench"]
    else:
        exe = pathlib.Path(sys.executable).parent / "transformers"  # the same environment's CLI
        cmd = [str(exe) if exe.exists() else "transformers", "serve", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32"]
        if kind == "transformers-cb":
            cmd.append("--continuous-batching")
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{kind} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{kind} did not start")


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_stream(client, url: str, model: str, prompt, max_tokens: int, kind: str):
    """(ttft, [inter-token gaps], tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if kind == "gpt2kit":
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{kind}: HTTP {r.status_code}: {(await r.aread())[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    if not times:
        return None
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], len(times)


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def closed_loop(port, kind, prompts, concurrency, requests, max_tokens):
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    model = "bench" if kind == "gpt2kit" else str(prompts["model"])
    queue = list(prompts["texts"][: concurrency * requests])
    results = []
    async with httpx.AsyncClient(timeout=3600) as client:
        async def worker():
            while queue:
                p = queue.pop()
                results.append(await one_stream(client, url, model, p, max_tokens, kind))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    results = [r for r in results if r]
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    itl = [g for r in results for g in r[1]]
    return {"server": kind, "concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99)}


def offline_generate(model_dir, batch, prompt_len, max_tokens):
    import torch

    from gpt2kit import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 50000, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=50256)
    return batch * max_tokens / (time.perf_counter() - t0)


async def chunked_prefill_probe(port, tok, streams=4, long_len=1000, max_tokens=128):
    """Inter-token gaps of running streams before and while a long prompt is read."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = random.Random(1)
    long_prompt = [rng.randrange(50000) for _ in range(long_len)]
    gaps_during, marks = [], {}
    async with httpx.AsyncClient(timeout=3600) as client:
        async def streamer(i):
            body = {"model": "bench", "prompt": [rng.randrange(50000) for _ in range(16)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            times = []
            async with client.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            return times

        async def long_request():
            await asyncio.sleep(2.0)  # the streams are running by now
            marks["start"] = time.perf_counter()
            body = {"model": "bench", "prompt": long_prompt, "max_tokens": 1, "temperature": 0}
            await client.post(url, json=body)
            marks["end"] = time.perf_counter()

        *all_times, _ = await asyncio.gather(*(streamer(i) for i in range(streams)), long_request())
    before = []
    for times in all_times:
        for a, b in zip(times, times[1:]):
            if marks["start"] <= b <= marks["end"]:
                gaps_during.append(b - a)
            elif b < marks["start"]:
                before.append(b - a)
    return {"streams": streams, "long_prompt_tokens": long_len, "prefill_s": marks["end"] - marks["start"],
            "itl_p50_s": percentile(before + gaps_during, 50), "itl_p99_during_prefill_s": percentile(gaps_during, 99),
            "p99_over_p50": percentile(gaps_during, 99) / percentile(before + gaps_during, 50)}


async def prefix_probe(port, repeats=3, prefix_len=512):
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    rng = random.Random(2)
    out = []
    async with httpx.AsyncClient(timeout=3600) as client:
        for _ in range(repeats):
            prefix = [rng.randrange(50000) for _ in range(prefix_len)]
            times = []
            for suffix in ([1, 2, 3], [4, 5, 6]):
                t0 = time.perf_counter()
                r = await client.post(url, json={"model": "bench", "prompt": prefix + suffix, "max_tokens": 1,
                                                 "temperature": 0})
                times.append((time.perf_counter() - t0, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]))
            out.append(times)
    uncached = statistics.median(t[0][0] for t in out)
    cached = statistics.median(t[1][0] for t in out)
    return {"prefix_tokens": prefix_len, "ttft_uncached_s": uncached, "ttft_cached_s": cached,
            "speedup": uncached / cached, "cached_tokens_reported": out[0][1][1]}


def chart(rows, path, isa: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["server"] for r in rows):
        pts = [(r["concurrency"], r["output_tokens_per_s"]) for r in rows if r["server"] == kind]
        ax.plot(*zip(*pts), marker="o", label=kind)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_title(f"GPT-2 small shape, CPU ({isa}), 128 tokens per request", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="gpt2kit,transformers-cb,transformers")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--skip-probes", action="store_true")
    args = ap.parse_args()
    from gpt2kit import GPT2Tokenizer

    levels = [int(c) for c in args.concurrency.split(",")]
    from gpt2kit.cpu import instruction_set

    results = {"machine": {"cpus": os.cpu_count(), "instruction_set": instruction_set(),
                           "load_average_at_start": os.getloadavg()}, "closed_loop": []}
    print(json.dumps(results["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(pathlib.Path(tmp) / "gpt2-small-random", n_positions=1024 + 128)
        tok = GPT2Tokenizer.from_pretrained(str(model_dir))
        rng = random.Random(0)
        texts = [tok.decode([rng.randrange(50000) for _ in range(rng.randint(args.prompt_min, args.prompt_max))])
                 for _ in range(max(levels) * args.requests)]
        prompts = {"texts": texts, "model": model_dir}
        for kind in args.servers.split(","):
            port = free_port()
            proc = start(kind, model_dir, port, max(levels))
            try:
                for c in levels:
                    row = asyncio.run(closed_loop(port, kind, prompts, c, args.requests, args.max_tokens))
                    print(json.dumps(row), flush=True)
                    results["closed_loop"].append(row)
                if kind == "gpt2kit" and not args.skip_probes:
                    results["chunked_prefill"] = asyncio.run(chunked_prefill_probe(port, tok))
                    print(json.dumps(results["chunked_prefill"]), flush=True)
                    results["prefix_cache"] = asyncio.run(prefix_probe(port))
                    print(json.dumps(results["prefix_cache"]), flush=True)
            finally:
                stop(proc)
        mean_prompt = (args.prompt_min + args.prompt_max) // 2
        results["offline_generate"] = {f"batch_{b}_tokens_per_s": offline_generate(model_dir, b, mean_prompt, args.max_tokens)
                                       for b in sorted({1, max(levels)})}
        print(json.dumps(results["offline_generate"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=2))
    chart(results["closed_loop"], RESULTS / "serve.png", results["machine"]["instruction_set"])
    print("| server | clients | output tok/s | req/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["closed_loop"]:
        print(f"| {r['server']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | {r['requests_per_s']:.3f} | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {1e3 * r['itl_p50_s']:.0f} / {1e3 * r['itl_p99_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
