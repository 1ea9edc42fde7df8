"""`gpt2kit serve`: the OpenAI-compatible server, from the command line.

    gpt2kit serve                                   # the embedded default model on 127.0.0.1:8000
    gpt2kit serve runs/gpt2-shakespeare --port 9000 --api-key secret --max-num-seqs 16

The HTTP server starts first (GET /health answers 503), the model loads in the background, then one
line says it is ready. SIGTERM or Ctrl-C drains: new requests get 503, running ones finish (up to
--drain-timeout seconds), then the process exits 0. A second signal exits at once.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time

from ..errors import GPT2KitError

DEFAULT_NAME = "gpt2kit-default"
MODEL_IMPLS = ("auto", "gpt2kit", "transformers")
GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # what vLLM takes from it


def add_serve(sub):
    from ..cli import DTYPES, nonneg_int, positive_float, positive_int
    from ..loading import add_quantize_flag

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching)",
                       description="Serve MODEL (a local directory or a Hub name; default: the embedded model) over "
                                   "the OpenAI API as vLLM implements it: /v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics, /tokenize, /detokenize, /version.")
    p.add_argument("model", nargs="?", help="a local model directory or a Hub name (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=nonneg_int, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--api-key", default=os.environ.get("GPT2KIT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $GPT2KIT_API_KEY, else none)")
    p.add_argument("--served-model-name", nargs="+", help="the name(s) clients use in `model` (default: MODEL as given)")
    p.add_argument("--max-num-seqs", type=positive_int, default=32, help="sequences decoded together: the cache's slots (default 32)")
    p.add_argument("--max-model-len", type=positive_int, help="longest prompt + completion (default: the model's n_positions)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="sequences that may wait for a slot; beyond it requests get 503 with Retry-After (default 256)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512,
                   help="most prompt tokens read per step while other sequences decode (chunked prefill: three per decoding row and 16 per prompt waiting, up to this; default 512)")
    p.add_argument("--max-logprobs", type=nonneg_int, default=20, help="cap on logprobs / top_logprobs (default 20)")
    p.add_argument("--max-body-bytes", type=positive_int, default=16 << 20, help="largest request body (default 16 MiB)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weight precision (auto: float32 on CPU)")
    add_quantize_flag(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the tokenizer config's, else a plain one)")
    p.add_argument("--generation-config", choices=("auto", "vllm"), default="auto",
                   help="auto: unset sampling fields default to the model's generation_config.json (as vLLM); "
                        "vllm: to the OpenAI defaults")
    p.add_argument("--model-impl", choices=MODEL_IMPLS, default="auto",
                   help="the model's implementation: gpt2kit's own (auto, gpt2kit); transformers: gpt2kit's, first "
                        "checked at load against transformers' GPT2LMHeadModel on the same weights (the server refuses "
                        "to start where their logits differ), as the page's `vllm serve ... --model-imp transformers` asks")
    p.add_argument("--drain-timeout", type=positive_float, default=30.0, help="seconds to let running requests finish on SIGTERM")
    p.add_argument("--no-ui", action="store_true", help="do not serve the playground page at /")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                   help="server log level (default warning; info adds one line per HTTP request)")
    p.set_defaults(run=run_serve)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GPT2KitError(f"cannot listen on {host}:{port}: {e.strerror}. Pick another --port (0 picks a free one).") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _generation_defaults(source: str | None, mode: str) -> dict:
    if mode != "auto" or not source or not os.path.isdir(source):
        return {}
    path = os.path.join(source, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return {k: cfg[k] for k in GENERATION_DEFAULTS if cfg.get(k) is not None}


def load_engine(state, args) -> None:
    """Load the model and start the engine (runs in a background thread while /health says 503)."""
    from ..loading import load_model_and_tokenizer
    from ..default_model import default_model_dir
    from .chat import load_chat_template
    from .engine_requests import Limits
    from .metrics import Metrics
    from .scheduler import Engine

    if args.model_impl == "transformers" and args.quantize:
        raise GPT2KitError("--model-impl transformers checks gpt2kit's model against transformers' on the float "
                           "weights; it does not combine with --quantize. Drop one of them.")
    model, tok, _ = load_model_and_tokenizer(args.model, args.device, args.dtype, args.quantize,
                                              args.quantize_embeddings)
    if args.model_impl == "transformers":
        from .parity import check_against_transformers

        diff = check_against_transformers(model)
        print(f"gpt2kit serve: --model-impl transformers: gpt2kit's model gives transformers' GPT2LMHeadModel's logits "
              f"on these weights (largest difference {diff:.1e}); serving gpt2kit's", flush=True)
    cfg = model.config
    source = args.model if args.model is not None else default_model_dir()
    max_len = args.max_model_len or cfg.n_positions
    if max_len > cfg.n_positions:
        raise GPT2KitError(f"--max-model-len {max_len} is beyond this model's n_positions={cfg.n_positions}.")
    state.chat_template = load_chat_template(args.chat_template, source if os.path.isdir(source) else None)
    state.special_tokens = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    state.tokenizer = tok
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_token_id
    state.limits = Limits(vocab_size=min(cfg.vocab_size, len(tok)), n_positions=cfg.n_positions, max_model_len=max_len,
                          max_num_seqs=args.max_num_seqs, eos_id=eos, defaults=_generation_defaults(source, args.generation_config),
                          max_logprobs=args.max_logprobs)
    state.metrics = Metrics(state.served_names[0])
    engine = Engine(model, tok, max_num_seqs=args.max_num_seqs, max_model_len=max_len, metrics=state.metrics,
                    max_waiting=args.max_waiting, prefill_chunk=args.prefill_chunk)
    engine.warm_up()  # before the ready line: no request pays for a first call's packing
    engine.start()
    state.engine = engine


def run_serve(args) -> int:
    import uvicorn

    from .app import InFlight, ServerState, build_app

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="gpt2kit serve: %(levelname)s: %(message)s")
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    names = args.served_model_name or [args.model if args.model is not None else DEFAULT_NAME]
    from ..default_model import default_model_dir

    state = ServerState(served_names=names, root=args.model if args.model is not None else default_model_dir(),
                        api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    app = InFlight(build_app(state, ui=not args.no_ui), state)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("debug", "info"),
                            lifespan="off", timeout_graceful_shutdown=max(1, int(args.drain_timeout)))
    server = _server_class()(config, state, args.drain_timeout)

    def load():
        try:
            load_engine(state, args)
        except GPT2KitError as e:
            state.load_error = " ".join(str(e).split())
        except Exception as e:  # a bug: keep the traceback in the log, stop the server
            logging.getLogger("gpt2kit.serve").exception("loading the model failed")
            state.load_error = f"loading the model failed: {type(e).__name__}: {e}"
        if state.load_error:
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        state.ready = True
        lim = state.limits
        print(f"gpt2kit serve: ready on http://{host}:{port} (model {names[0]}, {lim.max_num_seqs} slots of "
              f"{lim.max_model_len} tokens)", flush=True)

    threading.Thread(target=load, name="gpt2kit-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.engine is not None:
            state.engine.shutdown()
    if state.load_error:
        raise GPT2KitError(state.load_error)
    return 0


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing (the second exits at once)."""

        def __init__(self, config, state, drain_timeout: float):
            super().__init__(config)
            self.state, self.drain_timeout = state, drain_timeout

        def handle_exit(self, sig, frame):
            # not uvicorn's own handler: that one re-raises the signal after shutdown, and we exit 0
            if self.state.draining or not self.state.ready:
                self.force_exit = self.should_exit
                self.should_exit = True
                return
            self.state.draining = True
            print("gpt2kit serve: draining (new requests get 503; signal again to exit now)", file=sys.stderr, flush=True)
            threading.Thread(target=self._drain, name="gpt2kit-drain", daemon=True).start()

        def _drain(self):
            deadline = time.monotonic() + self.drain_timeout
            engine = self.state.engine
            while time.monotonic() < deadline and (self.state.inflight > 0 or (engine is not None and engine.busy)):
                time.sleep(0.02)
            if self.state.inflight > 0:
                print(f"gpt2kit serve: {self.state.inflight} request(s) still running after --drain-timeout; closing",
                      file=sys.stderr, flush=True)
            self.should_exit = True

    return DrainingServer

