"""Training throughput: gpt2kit's training step against transformers' GPT2LMHeadModel in a plain PyTorch loop.

Both models get the same config, the same initial weights, the same batch and sequence length, and
alternate step by step in one process (so a busy machine slows both alike). transformers is driven the
way its documentation trains a causal LM by hand: `model(input_ids, labels=input_ids).loss`, backward,
`torch.optim.AdamW(model.parameters())`. gpt2kit runs the step its `gpt2kit train` runs: the fused
LM-head cross-entropy (training/loss.py) and AdamW with weight-decay groups, fused when the device has it.
Each precision setting (float32, bfloat16 autocast) is applied to both sides alike. Reports tokens/s
(median step time) and the ratio, and the ratio by process CPU time, which a machine shared with other
jobs disturbs less (with --threads 1 it counts no spinning threads).

Each row (config x precision) runs in a fresh process of its own (--same-process runs them all in this one):
a row's allocations change the next row's figures through glibc's heap (measured: transformers' bf16 GPT-2
small step went from 215-267 to 312-325 tokens/s when float32 rows had run before it in the process).

    python benchmarks/train.py                                  # both model sizes, float32 and bf16 autocast
    python benchmarks/train.py --configs small4 --steps 6 --precisions bf16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {  # name: (model sizes, batch, sequence length)
    "small4": (dict(n_layer=4, n_embd=128, n_head=4, n_positions=256), 8, 256),  # the embedded default's shape
    "gpt2": (dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024), 4, 256),  # GPT-2 small, 124M
}


def build(sizes, device, compile_body=False):
    import transformers

    from gpt2kit import GPT2Config, GPT2LMHeadModel
    from gpt2kit.training.loss import CausalLMLoss
    from gpt2kit.training.optim import build_adamw

    common = dict(vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **sizes)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**common, attn_implementation="sdpa")).to(device).train()
    ours = GPT2LMHeadModel(GPT2Config(**common, attn_implementation="sdpa")).to(device).train()
    ours.load_state_dict(hf.state_dict())
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)
    if compile_body:  # as `gpt2kit train --compile` does
        ours.transformer.compile()
    ours_loss = CausalLMLoss(ours)
    ours_opt = build_adamw(ours, lr=1e-4, weight_decay=0.1)

    def hf_step(x, y):
        loss = hf(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss

    def ours_step(x, y):
        loss = ours_loss(x, y)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return loss

    return {"transformers": hf_step, "gpt2kit": ours_step}


def measure(config, precision, steps, warmup, device, compile_body=False):
    sizes, B, T = CONFIGS[config]
    steps_fns = build(sizes, device, compile_body)
    g = torch.Generator().manual_seed(1)
    xy = torch.randint(0, 50257, (B, T + 1), generator=g).to(device)
    x, y = xy[:, :-1], xy[:, 1:]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = {name: [] for name in steps_fns}
    cpu = {name: [] for name in steps_fns}  # process CPU seconds: steadier than wall time on a shared machine
    for i in range(warmup + steps):
        order = list(steps_fns) if i % 2 == 0 else list(reversed(steps_fns))  # alternate who goes first
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            with amp:
                loss = steps_fns[name](x, y)
            float(loss.detach())  # waits for the device
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    row = {"config": config, "precision": precision, "gpt2kit_compiled": compile_body, "batch": B, "seq_len": T, "steps": steps, **sizes}
    for name, ts in times.items():
        row[f"{name}_tok_s"] = round(B * T / statistics.median(ts), 1)
        row[f"{name}_tok_per_cpu_s"] = round(B * T / statistics.median(cpu[name]), 1)
    row["ratio"] = round(row["gpt2kit_tok_s"] / row["transformers_tok_s"], 3)
    row["cpu_ratio"] = round(row["gpt2kit_tok_per_cpu_s"] / row["transformers_tok_per_cpu_s"], 3)
    return row


def run_row(args, config, precision) -> dict:
    """One row in a fresh interpreter with the same settings."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, precision, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device]
    if args.compile:
        cmd.append("--compile")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"row {config}/{precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small4,gpt2", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast), applied to both")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per library (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="compile gpt2kit's body (gpt2kit train --compile)")
    ap.add_argument("--threads", type=int, help="torch threads (1 makes CPU time a fair measure on a shared machine)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "train.json"))
    ap.add_argument("--same-process", action="store_true", help="run every row in this process (rows then "
                    "influence each other through the allocator's state)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # config precision: one row, JSON on stdout
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(*args.worker, args.steps, args.warmup, device, args.compile)))
        return
    import transformers

    from gpt2kit.cpu import instruction_set

    rows = []
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{instruction_set()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"{'config':8} {'prec':5} {'B x T':>9} {'transformers tok/s':>19} {'gpt2kit tok/s':>14} {'ratio':>6}"
          f" {'ratio by CPU time':>18}")
    for config in args.configs.split(","):
        for precision in args.precisions.split(","):
            if args.same_process:
                row = measure(config, precision, args.steps, args.warmup, device, args.compile)
            else:
                row = run_row(args, config, precision)
            rows.append(row)
            print(f"{config:8} {precision:5} {row['batch']:>4}x{row['seq_len']:<4} {row['transformers_tok_s']:>19.1f} "
                  f"{row['gpt2kit_tok_s']:>14.1f} {row['ratio']:>5.2f}x {row['cpu_ratio']:>17.2f}x", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
