"""A client nobody here wrote: lm-eval's `local-completions` against `gpt2kit serve`, and lm-eval's own `hf`
backend (transformers) on the same checkpoint, on a small local multiple-choice task. Prints both scores
and the largest difference between the per-choice loglikelihoods; exits 1 when they disagree.

    pip install "lm-eval[api]"
    python benchmarks/serve_lm_eval.py            # the embedded default model, offline

local-completions scores each choice with one request {prompt: token ids, echo: true, max_tokens: 1,
logprobs: 1} and sums the prompt logprobs past the context; the hf backend runs transformers' forward.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LINES = [
    ("ROMEO: But soft, what light through yonder window", ["breaks", "sings", "falls", "burns"]),
    ("To be, or not to be, that is the", ["question", "answer", "king", "night"]),
    ("Now is the winter of our", ["discontent", "summer", "castle", "horse"]),
    ("A horse! a horse! my kingdom for a", ["horse", "sword", "crown", "song"]),
    ("All the world's a stage, and all the men and women merely", ["players", "kings", "horses", "stones"]),
    ("Friends, Romans, countrymen, lend me your", ["ears", "eyes", "hands", "swords"]),
    ("The quality of mercy is not", ["strained", "kind", "sweet", "sold"]),
    ("If music be the food of love, play", ["on", "off", "down", "away"]),
    ("What's in a name? That which we call a rose by any other name would smell as", ["sweet", "bad", "red", "old"]),
    ("Good night, good night! Parting is such sweet", ["sorrow", "joy", "bread", "wine"]),
    ("First Citizen: Before we proceed any further, hear me", ["speak", "sing", "run", "die"]),
    ("KING RICHARD: My lord, the", ["duke", "queen", "day", "sword"]),
]


def write_task(folder: pathlib.Path) -> str:
    rng = random.Random(0)
    rows = []
    for context, choices in LINES:
        order = choices[:]
        rng.shuffle(order)
        rows.append({"context": context, "choices": [" " + c for c in order], "label": order.index(choices[0])})
    data = folder / "tiny_shakespeare_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_shakespeare_mc.yaml").write_text(f"""task: tiny_shakespeare_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return "tiny_shakespeare_mc"


def evaluate(model: str, model_args: str, task: str, include: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=TaskManager(include_path=include),
                                  log_samples=True, batch_size=4)
    scores = {k: v for k, v in out["results"][task].items() if k.split(",")[0] in ("acc", "acc_norm")}
    lls = [[r[0][0] for r in s["resps"]] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    return scores, lls


def main() -> int:
    from serve_helpers import DEFAULT_MODEL, ServerProcess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a local GPT-2 directory (default: the embedded model)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        task = write_task(pathlib.Path(tmp))
        hf_scores, hf_lls = evaluate("hf", f"pretrained={args.model},dtype=float32,device=cpu", task, tmp)
        srv = ServerProcess(args.model, "--no-ui", "--max-num-seqs", "8")
        try:
            api_args = (f"model={args.model},base_url={srv.base}/completions,tokenizer={args.model},"
                        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=2,max_retries=1")
            api_scores, api_lls = evaluate("local-completions", api_args, task, tmp)
        finally:
            code = srv.stop()
    diff = max(abs(a - b) for x, y in zip(hf_lls, api_lls) for a, b in zip(x, y))
    print(f"lm-eval hf backend:          {json.dumps(hf_scores)}")
    print(f"lm-eval local-completions:   {json.dumps(api_scores)}")
    print(f"choices scored: {sum(len(x) for x in hf_lls)}; largest loglikelihood difference: {diff:.2e}; server exit {code}")
    same = {k.split(",")[0]: v for k, v in hf_scores.items() if "stderr" not in k} == \
           {k.split(",")[0]: v for k, v in api_scores.items() if "stderr" not in k}
    ok = same and diff < 1e-3 and code == 0
    print("SAME SCORES" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
