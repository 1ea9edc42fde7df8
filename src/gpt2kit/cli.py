"""The `gpt2kit` command: generate, train, eval, serve.

    gpt2kit generate "Hello, I'm a language model"      # the embedded default model, offline
    gpt2kit train shakespeare.txt --preset gpt2 --out runs/gpt2-shakespeare
    torchrun --nproc_per_node 4 -m gpt2kit train ...      # data-parallel on one or more machines
    gpt2kit eval --model runs/gpt2-shakespeare notes.txt
    gpt2kit serve runs/gpt2-shakespeare --port 8000     # an OpenAI-compatible server (serving/cli.py)

Errors a person can cause (a missing model or file, a prompt too long, a bad flag value, an absent
GPU) end the command with one line on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from .allocator import keep_freed_memory_for_reuse
from .errors import GPT2KitError
from .loading import add_quantize_flag, load_model_and_tokenizer

EXIT_USAGE, EXIT_ERROR = 2, 1
DEFAULT_MAX_NEW_TOKENS = 50


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help states each option's default: "(default: X)" is added to a help text that does not already say
    its default (an option whose default is None or off must say in its help what happens without it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or "%(default)" in text or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action, argparse._StoreConstAction):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (not the whole usage block), suggests the option
    closest to a mistyped one, and shows every default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand's parser, which knows the options it meant
            parser = self._subcommand_parser(getattr(namespace, "command", None)) or self
            parser.error(f"unrecognized arguments: {' '.join(extras)}", suggestion=parser._suggest(extras))
        return namespace

    def _subcommand_parser(self, name):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None

    def _suggest(self, extras) -> str:
        """ " (did you mean --max-new-tokens?)" for the unknown options in `extras` that resemble one of ours."""
        import difflib

        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for arg in extras:
            flag = arg.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
            if close:
                hints.append((flag, close[0]))
        if len(hints) == 1:
            return f" (did you mean {hints[0][1]}?)"
        return f" (did you mean {', '.join(f'{right} for {wrong}' for wrong, right in hints)}?)" if hints else ""

    def error(self, message, suggestion: str = ""):
        if len(message) > 300:  # argparse echoes unrecognized arguments whole: a long prompt would fill the screen
            message = f"{message[:240]}... ({len(message) - 240} more characters)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{suggestion} (see {self.prog} --help)\n")


# -- argument types that reject bad values with a clear message --------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _float_in(lo: float, hi: float, lo_open=False, hi_open=False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {text}")
        return value

    return parse


probability = _float_in(0.0, 1.0)
positive_float = _float_in(0.0, float("inf"), lo_open=True, hi_open=True)
fraction = _float_in(0.0, 1.0, hi_open=True)
DTYPES = ("auto", "float32", "bfloat16", "float16")


# -- generate ---------------------------------------------------------------------------------------
def generation_value(field: str, parse):
    """An argparse type for a GenerationConfig field: the value must pass the rule generate() applies to it
    (generation.config.RULES, imported only when the flag is given, as it brings in torch)."""
    def convert(text: str):
        from .generation.config import RULES, SAMPLING_RULES

        test, what = RULES[field]
        hint = " (for greedy decoding use --greedy)" if field in SAMPLING_RULES else ""
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}{hint}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


# flags that only sampling reads: giving one asks for sampling, and contradicts --greedy
SAMPLING_ONLY_FLAGS = ("temperature", "top_k", "top_p", "typical_p", "min_p")


def check_generate_flags(args, parser):
    """Refuse flags that contradict each other (argparse would let the last one win silently)."""
    given = [f"--{k.replace('_', '-')}" for k in SAMPLING_ONLY_FLAGS if getattr(args, k) is not None]
    if given and args.do_sample is False:
        parser.error(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when sampling, but --greedy "
                     f"was given: drop {' and '.join(given)} or --greedy")
    if given and args.do_sample is None:
        args.do_sample = True
    return args


def add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt with a GPT-2 model, streaming tokens as they come",
                       description="Continue PROMPT (or standard input) with a GPT-2 model and stream the text as it "
                                   "is generated. Without --model, the small default model bundled with gpt2kit is "
                                   "used, so this works offline.")
    p.add_argument("prompt", nargs="?", help="the text to continue (UTF-8); read from standard input when omitted or "
                                             "'-', less one trailing newline (the one echo adds)")
    p.add_argument("--model", "-m", help="a local model directory or a Hugging Face Hub name (e.g. openai-community/gpt2); "
                                         "default: the embedded Shakespeare model")
    p.add_argument("--max-new-tokens", type=generation_value("max_new_tokens", int), default=None,
                   help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}, or fewer where the model's context "
                        "ends sooner)")
    p.add_argument("--num-return-sequences", "-n", type=generation_value("num_return_sequences", int), default=1,
                   help="continuations to generate (default 1; more than 1 samples, or returns the best beams)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                      help="sample the next token (default: as the model's generation_config.json says; "
                           "the embedded model samples with top-k 50)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="pick the most likely token every step")
    sampling = "; implies --do-sample (default: the model's generation_config)"
    p.add_argument("--temperature", type=generation_value("temperature", float),
                   help=f"sampling temperature, above 0{sampling}")
    p.add_argument("--top-k", type=generation_value("top_k", int),
                   help=f"sample among the k most likely tokens, 0 = all{sampling}")
    p.add_argument("--top-p", type=generation_value("top_p", float),
                   help=f"nucleus sampling: the most likely tokens up to this probability mass{sampling}")
    p.add_argument("--typical-p", type=generation_value("typical_p", float),
                   help=f"typical sampling: the tokens closest to the expected information, up to this mass{sampling}")
    p.add_argument("--min-p", type=generation_value("min_p", float),
                   help=f"drop tokens below min_p x the top probability{sampling}")
    p.add_argument("--repetition-penalty", type=generation_value("repetition_penalty", float),
                   help="penalty > 1 discourages repeats")
    p.add_argument("--no-repeat-ngram-size", type=generation_value("no_repeat_ngram_size", int),
                   help="never repeat an n-gram of this size")
    p.add_argument("--num-beams", type=generation_value("num_beams", int),
                   help="beam search with this many beams: with --greedy plain beam search, with --do-sample (or a "
                        "model that samples by default, as the embedded one does) beam sampling")
    p.add_argument("--seed", type=nonneg_int, help="random seed, for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weight precision (auto: float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text: per sequence "
                                                       "the text, new_tokens and finish_reason (stop or length)")
    add_quantize_flag(p)
    p.set_defaults(run=lambda args: run_generate(check_generate_flags(args, p)))


SAMPLING_FLAGS = ("do_sample", "temperature", "top_k", "top_p", "typical_p", "min_p", "repetition_penalty",
                  "no_repeat_ngram_size", "num_beams")


def run_generate(args) -> int:
    import torch

    from . import generate_io
    from .utils import set_seed

    prompt = generate_io.read_prompt(args.prompt)
    if not prompt:
        raise GPT2KitError("The prompt is empty: give some text to continue.")
    model, tok, name = load_model_and_tokenizer(args.model, args.device, args.dtype, args.quantize,
                                                args.quantize_embeddings)
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.device)  # (1, L)
    n_pos, L = model.config.n_positions, ids.shape[1]
    max_new = args.max_new_tokens
    if max_new is None:  # the default fits the model's context; a value the user gave stays strict (engine)
        max_new = DEFAULT_MAX_NEW_TOKENS
        if 0 < n_pos - L < max_new:
            max_new = n_pos - L
            print(f"note: generating at most {max_new} tokens: the prompt ({L} tokens) leaves no more room in this "
                  f"model's {n_pos}-token context (--max-new-tokens to choose)", file=sys.stderr)
    if args.seed is not None:
        set_seed(args.seed)
    kwargs = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    n = args.num_return_sequences
    if "do_sample" not in kwargs and (args.num_beams or 1) == 1 and n > 1:
        kwargs["do_sample"] = True  # several different continuations need sampling (or beams)
    stream = not args.json and n == 1 and (args.num_beams or 1) == 1
    streamer = None
    if stream:
        streamer = generate_io.CommandStreamer(tok, prompt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.config.eos_token_id
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             num_return_sequences=n, streamer=streamer, pad_token_id=pad, **kwargs)
    finally:
        if streamer is not None:  # an error or Ctrl-C mid-stream: its message starts on a line of its own
            streamer.finish()
    if stream:
        return 0
    results = generate_io.sequence_results(out, L, model.generation_config.eos_token_id,
                                           lambda new: tok.decode(new, skip_special_tokens=True))
    if args.json:
        generate_io.print_json(name, prompt, L, results)
    else:
        generate_io.print_text(prompt, results)
    return 0


# -- train ------------------------------------------------------------------------------------------
def add_train(sub):
    from .training.settings import FINETUNE_LR, PRESETS, PRETRAIN_LR, TrainConfig

    d = TrainConfig(files=[], out_dir="")
    p = sub.add_parser("train", help="train or fine-tune a GPT-2 model on text files",
                       description="Train a GPT-2 model from scratch (--preset or sizes) or fine-tune one (--model) on "
                                   "UTF-8 text files, writing a Hugging Face model directory to --out. Run it under "
                                   "`torchrun --nproc_per_node N -m gpt2kit train ...` for data-parallel training.")
    p.add_argument("files", nargs="+", help="UTF-8 text files to train on")
    p.add_argument("--out", "-o", required=True, dest="out_dir",
                   help="run directory: model, checkpoints, log.jsonl, loss.png (one that holds a run needs --resume "
                        "or --overwrite)")
    what = p.add_argument_group("model (one of --model, --preset, or sizes)")
    what.add_argument("--model", "-m", help="fine-tune this checkpoint (a local directory or Hub name); default: "
                                            "train a new model")
    what.add_argument("--preset", choices=sorted(PRESETS), help="train from scratch at a GPT-2 size (default: none; "
                                                                "give the sizes below)")
    what.add_argument("--n-layer", type=positive_int, help="transformer blocks of a new model (default: the preset's)")
    what.add_argument("--n-embd", type=positive_int, help="hidden size of a new model (default: the preset's)")
    what.add_argument("--n-head", type=positive_int, help="attention heads of a new model (default: the preset's)")
    what.add_argument("--n-positions", type=positive_int, help="context length of a new model (default: the preset's, "
                                                               "else 1024)")
    what.add_argument("--dropout", type=fraction, help="dropout probability (default 0 from scratch; the checkpoint's when fine-tuning)")
    data = p.add_argument_group("data")
    data.add_argument("--val-file", action="append", default=[], dest="val_files",
                      help="held-out text (repeatable); default: the last --val-fraction of each training file")
    data.add_argument("--val-fraction", type=fraction, default=d.val_fraction,
                      help="fraction of each file, by bytes from its end, held out for validation")
    data.add_argument("--seq-len", type=positive_int, help="tokens per training window (default: n_positions)")
    data.add_argument("--cache-dir", help="where tokenized text is cached (default ~/.cache/gpt2kit/tokens)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="windows per process per micro-step")
    opt.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-steps per optimizer step")
    opt.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="optimizer steps")
    opt.add_argument("--lr", type=positive_float,
                     help=f"peak learning rate (default: {PRETRAIN_LR:g} from scratch, {FINETUNE_LR:g} when "
                          "fine-tuning with --model)")
    opt.add_argument("--min-lr-ratio", type=probability, default=d.min_lr_ratio,
                     help="final lr of the cosine decay, as a fraction of the peak")
    opt.add_argument("--warmup-steps", type=nonneg_int, help="linear warmup steps, at most --max-steps (default 5%% of "
                                                             "--max-steps)")
    opt.add_argument("--weight-decay", type=_float_in(0.0, float("inf")), default=d.weight_decay,
                     help="AdamW weight decay, on matrices only")
    opt.add_argument("--beta1", type=fraction, default=d.betas[0], help="AdamW beta1")
    opt.add_argument("--beta2", type=fraction, default=d.betas[1], help="AdamW beta2")
    opt.add_argument("--grad-clip", type=_float_in(0.0, float("inf")), default=d.grad_clip, help="max gradient norm (0 = off)")
    opt.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="autocast precision (auto: bfloat16 where the GPU or CPU supports it natively, else float32)")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    opt.add_argument("--seed", type=nonneg_int, default=d.seed, help="seed of the initial weights, data order and dropout")
    opt.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)")
    run = p.add_argument_group("evaluation, checkpoints, logs")
    run.add_argument("--eval-every", type=nonneg_int, default=d.eval_every, help="validate every N steps (0 = only at the end)")
    run.add_argument("--eval-batches", type=positive_int, default=d.eval_batches, help="validation batches per evaluation")
    run.add_argument("--save-every", type=nonneg_int, default=d.save_every, help="checkpoint every N steps (0 = only at the end)")
    run.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints,
                     help="newest checkpoints kept (a damaged newest one is skipped on --resume)")
    run.add_argument("--log-every", type=positive_int, default=d.log_every, help="log the training loss every N steps")
    run.add_argument("--save-dtype", choices=DTYPES[1:], default=d.save_dtype, help="precision of the saved model's weights")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest checkpoint (repeat the original flags)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out: its checkpoints and log are deleted first")
    run.add_argument("--stop-after", type=positive_int, help=argparse.SUPPRESS)  # tests: end as a crash would
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars (they show only on a terminal; elsewhere log lines)")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from .training.loop import train
    from .training.settings import TrainConfig

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["betas"] = (args.beta1, args.beta2)
    if args.eval_every == 0:
        fields["eval_every"] = args.max_steps  # only at the end
    summary = train(TrainConfig(**fields))
    return 130 if summary.get("interrupted") else 0  # 130: stopped by Ctrl-C (with a checkpoint)


# -- eval -------------------------------------------------------------------------------------------
def add_eval(sub):
    p = sub.add_parser("eval", help="perplexity and bits per byte of a model on a text file",
                       description="Perplexity of a model on a UTF-8 text file by the standard sliding-window method: "
                                   "windows of n_positions tokens advanced by --stride, each scoring only the tokens "
                                   "no earlier window scored.")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--model", "-m", help="a local model directory or Hub name (default: the embedded model)")
    p.add_argument("--stride", type=positive_int, help="tokens the window advances (default: half the window)")
    p.add_argument("--max-length", type=positive_int, help="window length (default: the model's n_positions)")
    p.add_argument("--val-fraction", type=fraction, default=0.0,
                   help="score only the last FRACTION of the file by bytes, the part `train --val-fraction` held out "
                        "(default 0: all of it)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows scored at once")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight precision (default float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they show only on a terminal)")
    add_quantize_flag(p)
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from .training.eval import eval_command

    return eval_command(args)


# -- entry point ------------------------------------------------------------------------------------
def build_parser() -> Parser:
    from . import __version__

    parser = Parser(prog="gpt2kit", description="GPT-2 from the command line: generate text, train, evaluate.")
    parser.add_argument("--version", action="version", version=f"gpt2kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_generate(sub)
    add_train(sub)
    add_eval(sub)
    from .serving.cli import add_serve

    add_serve(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    keep_freed_memory_for_reuse()  # this process is ours: see allocator.py (~10% of a prefill here)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("gpt2kit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gpt2kit generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except GPT2KitError as e:  # a user's problem: one line; anything else is a bug and keeps its traceback
        if os.environ.get("GPT2KIT_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"gpt2kit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
