"""The serving engine: continuous batching over the slots of one preallocated cache.

One background thread owns the model and the cache. Each step it
1. takes in new requests and cancellations (a thread-safe inbox),
2. admits waiting requests into free slots (a request with n choices takes n slots at once), reusing the
   longest prompt prefix already stored in any slot (copy_prefix), so a repeated system prompt or
   document is not recomputed,
3. runs one forward (`model.decode_parts`) over every running sequence, whatever its position (one new
   token each), and this step's chunks of the prompts being read (chunked prefill: a long prompt is read
   over several steps, and running streams get a token every step meanwhile); the weights are read once
   a step for both,
4. samples per row (sampling.py), detokenizes and matches stop strings (stop.py), and hands each
   request's news to its asyncio handler through the `sink` the handler gave (call_soon_threadsafe).
A sequence leaves the batch the step it finishes; a failure inside one request fails that request only.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..generation.guards import nonfinite_rows
from ..model import linear
from ..model.cache import StaticCache
from ..model.replay import DecodeReplay
from ..quantization.replace import batch_invariant
from .sampling import RowSampler, SamplingParams, sample_rows
from .stop import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("gpt2kit.serve")
MIN_CHUNK = 16  # prompt tokens read per step beside running decodes, however few they are
PROMPT_TOKENS_PER_ROW = 3  # prompt tokens a step reads per decoding row (see Engine._chunks)


@dataclass
class TokenInfo:
    """One token of a choice (or of the prompt, for echo): what logprobs report about it."""

    id: int
    logprob: float | None = None  # None: the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] | None = None  # the top-N alternatives (id, logprob), best first
    text_offset: int = 0  # characters of the choice's text before this token


@dataclass
class ChoiceUpdate:
    index: int  # the choice's index in the response
    text: str  # newly released text
    tokens: list[TokenInfo]  # newly generated tokens (with logprobs when asked for)
    finish_reason: str | None = None  # "stop" | "length" once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    completion_tokens: int = 0


@dataclass
class PromptDone:
    """Sent once per prompt when its prefill is done."""

    cached_tokens: int
    prompt_tokens: list[TokenInfo] | None  # with prompt logprobs (echo scoring), else None


@dataclass
class Failed:
    status: int
    message: str


@dataclass
class EngineRequest:
    """One prompt with n choices, as the HTTP layer hands it to the engine (all fields already checked)."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    sink: object  # callable(event), safe to call from the engine thread
    n: int = 1
    choice_offset: int = 0  # index of its first choice in the response
    stops: list[str] = field(default_factory=list)
    include_stop: bool = False
    stop_token_ids: frozenset = frozenset()
    eos_id: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs for generated tokens (0: the chosen token's only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo with logprobs)
    skip_special_tokens: bool = True
    arrival: float = field(default_factory=time.monotonic)
    # engine-side state
    remaining: int = 0  # sequences not finished
    first_token_at: float | None = None


class Sequence:
    """One choice: a slot, the tokens it has produced, its sampler, detokenizer and stop matcher."""

    def __init__(self, req: EngineRequest, index: int, slot: int, tokenizer, device):
        self.req, self.index, self.slot = req, index, slot
        self.output: list[int] = []
        self.sampler = RowSampler(req.params, device, seed_offset=index)
        self.detok = IncrementalDetokenizer(tokenizer, req.skip_special_tokens)
        self.matcher = StopMatcher(req.stops, req.include_stop)
        self.pending: int | None = None  # sampled, not yet fed to the model
        self.fed = 0  # prompt tokens already in the slot
        self.last_token_at: float | None = None
        self.done = False
        self.cached = 0  # prompt tokens taken from the cache instead of computed
        self.prompt_infos: list[TokenInfo] | None = None  # prompt logprobs (echo scoring)


class Engine:
    def __init__(self, model, tokenizer, *, max_num_seqs: int, max_model_len: int, metrics=None,
                 max_waiting: int = 1024, prefill_chunk: int = 512, prefill_chunk_idle: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.max_waiting = max_waiting
        self.prefill_chunk, self.prefill_chunk_idle = prefill_chunk, prefill_chunk_idle
        self.metrics = metrics
        self.device = model.device
        cfg = model.config
        # a completion equals generate's for its prompt alone, whatever shares its steps: 4-bit products float32-exact
        # at every row count, where AMX would compute a bf16 / float16 compute dtype in bf16 parts from 8-16 rows on
        batch_invariant(model)
        # one fixed packing layout for every batch size, so that rows joining or leaving never repack weights
        hint = linear.pack_rows_hint(model.dtype, max_num_seqs)
        self.cache = StaticCache(cfg, max_num_seqs, max_model_len, device=self.device, dtype=model.dtype)
        # steps of decoding rows only, where they are only gpt2kit's kernels (quantized, or float32 at 1-2 rows),
        # replay as recorded kernel calls (model/replay.py), a recording per batch size
        self.replay = DecodeReplay(limit=min(max_num_seqs, 16))
        self._decode_parts = lambda parts: model.decode_parts(parts, self.cache, rows_hint=hint, replay=self.replay)
        # a step of greedy rows only, none asking for logprobs: their argmax from the head (model.decode_greedy)
        # (any_rows: at more rows too, as the native row kernel sums the logits, so a row's token does not depend
        # on the rows beside it); and the same for the decoding rows of a step that also reads prompt chunks
        self._decode_greedy = lambda ids, slots: model.decode_greedy(ids, self.cache, rows=slots, rows_hint=hint,
                                                                     replay=self.replay, any_rows=True)
        self._decode_parts_greedy = lambda parts: model.decode_parts_greedy(parts, self.cache, rows_hint=hint)
        # the fused decode kernel (native/attention.c) reads each row's keys in its own slot, wherever it lies; any
        # other attention reads the cache as views only for rows in slots 0..B-1 (else every layer gathers a copy),
        # so only then are the decoding rows compacted (_compact). Should a step gather all the same, from then on.
        self.compact = not (self.cache.decode_kernel_fits() and cfg._attn_implementation != "eager")
        self.greedy_steps = 0  # steps whose tokens came from the head's argmax, without logits
        self.mixed_forwards = 0  # forwards that carried decoding rows and prompt tokens together
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_num_seqs)]  # what each slot's cache holds
        self.free: dict[int, float] = {s: 0.0 for s in range(max_num_seqs)}  # free slot -> when freed (LRU)
        self.waiting: deque[EngineRequest] = deque()
        self.prefilling: deque[Sequence] = deque()  # primary sequences whose prompt is being read
        self.running: list[Sequence] = []  # sequences in decode
        self.siblings: dict[str, list[Sequence]] = {}  # request id -> its other n-1 sequences, until prefill ends
        self.inbox: queue.Queue = queue.Queue()
        self.waiting_count = 0  # sequences submitted and not yet admitted (read by the HTTP thread)
        self._lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="gpt2kit-engine", daemon=True)

    def warm_up(self) -> None:
        """Run each kind of forward a step takes once, before serving, so that no request pays for what a first call
        does (packing the weights for the step's row layout and for a long chunk's fused path, the head's int8
        screen, recording the decode replay): a prompt chunk of up to prefill_chunk_idle tokens in slot 0, then a
        decode step of that row with logits and a greedy one; the slot is emptied after. GPT-2 small, 2-core Xeon:
        a first 1-row greedy step took 1.64 s and a first 300-token chunk 1.19 s, then 0.018 s and 0.21 s; this
        warm-up 2.6 s."""
        n = min(self.prefill_chunk_idle, self.max_model_len - 2)
        if n < 1:
            return
        slot, one = torch.tensor([0], device=self.device), torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self._decode_parts([(torch.zeros(1, n, dtype=torch.long, device=self.device), slot, 1)])
            self._decode_parts([(one, slot, 1)])
            self._decode_greedy(one, slot)
        self.cache.reset_rows([0])

    # -- the HTTP side (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def try_submit(self, reqs: list[EngineRequest]) -> bool:
        """Queue requests (all or none); False when the queue is full."""
        need = sum(r.n for r in reqs)
        with self._lock:
            if self.waiting_count + need > self.max_waiting:
                return False
            self.waiting_count += need
        for r in reqs:
            self.inbox.put(("submit", r))
        return True

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stop = True
        self.inbox.put(("wake", None))

    @property
    def busy(self) -> bool:
        return bool(self.waiting_count or self.waiting or self.prefilling or self.running)

    # -- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox(block=not (self.waiting or self.prefilling or self.running))
            if self._stop:
                break
            self.step()

    def step(self) -> None:
        """One engine step: take in news, admit, read one prompt chunk, decode every running sequence."""
        self._drain_inbox(block=False)
        try:
            with torch.inference_mode():
                self._admit()
                gathers = self.cache.gathers
                self._forward_step()
                if self.cache.gathers != gathers:  # scattered rows were gathered: this attention wants them compacted
                    self.compact = True
        except Exception:  # a bug in the engine itself: fail what is in flight, keep serving
            log.exception("engine step failed; failing the requests in flight")
            for seq in list(self.prefilling) + list(self.running):
                self._fail(seq.req, 500, "The server failed while running this request; it has been logged.")
        self._report_gauges()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                payload.remaining = payload.n
                self.waiting.append(payload)
            elif kind == "abort":
                self._abort(payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: str) -> None:
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._unqueue(req.n)
        for seq in list(self.prefilling) + list(self.running) + self.siblings.get(request_id, []):
            if seq.req.request_id == request_id:
                self._release(seq)

    def _unqueue(self, n: int) -> None:
        with self._lock:
            self.waiting_count -= n

    # -- admission and prefix reuse ---------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.free) >= self.waiting[0].n:
            req = self.waiting.popleft()
            self._unqueue(req.n)
            if self.metrics:
                self.metrics.queue_time.observe(time.monotonic() - req.arrival)
            try:
                self._start(req)
            except Exception:
                log.exception("request %s failed at admission", req.request_id)
                self._fail(req, 500, "The server failed to start this request; it has been logged.")

    def _take_slot(self, prefer: int | None = None) -> int:
        slot = prefer if prefer in self.free else min(self.free, key=self.free.get)  # least recently freed
        del self.free[slot]
        return slot

    def _start(self, req: EngineRequest) -> None:
        prompt = req.prompt_ids
        src, reuse = None, 0
        if req.prompt_logprobs is None:  # scoring the prompt needs the logits of every position
            for slot, stored in enumerate(self.slot_tokens):
                n = _common_prefix(stored, prompt)
                if n > reuse:
                    src, reuse = slot, n
            reuse = min(reuse, len(prompt) - 1)  # the last prompt token is always computed: it gives the logits
        primary = self._take_slot(prefer=src)
        if reuse > 0:
            self.cache.copy_prefix(src, primary, reuse)  # src == primary: keep its first `reuse` positions
        else:
            self.cache.reset_rows([primary])
        self.slot_tokens[primary] = prompt[:reuse]
        seq = Sequence(req, 0, primary, self.tokenizer, self.device)
        seq.fed = reuse
        seq.cached = reuse
        seq.prompt_infos = [TokenInfo(prompt[0])] if req.prompt_logprobs is not None else None
        self.prefilling.append(seq)
        sibs = []
        for i in range(1, req.n):
            slot = self._take_slot()
            self.slot_tokens[slot] = []
            sibs.append(Sequence(req, i, slot, self.tokenizer, self.device))
        self.siblings[req.request_id] = sibs

    # -- one forward: decoding rows and prompt chunks ---------------------------------------------------
    def _forward_step(self) -> None:
        """One forward for every decoding sequence (its pending token) and this step's prompt chunks."""
        rows = [s for s in self.running if s.pending is not None]
        if rows:
            if self.compact:
                self._compact(rows)
            rows.sort(key=lambda s: s.slot)  # in slot order (0..B-1 when compacted: the cache is read as views)
        chunks = self._chunks(len(rows))  # [(sequence, its next prompt tokens)]
        parts = []
        if rows:
            ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=self.device)  # (B, 1)
            slots = torch.tensor([s.slot for s in rows], dtype=torch.long, device=self.device)  # (B,)
            parts.append((ids, slots, 1))
        for seq, chunk in chunks:
            keep = 0 if seq.req.prompt_logprobs is not None else 1  # scoring the prompt needs every position
            parts.append((torch.tensor([chunk], dtype=torch.long, device=self.device),
                          torch.tensor([seq.slot], device=self.device), keep))
        if not parts:
            return
        if rows and chunks:
            self.mixed_forwards += 1
        greedy = rows and all(s.sampler.plain and s.req.logprobs is None for s in rows)
        if greedy and not chunks:
            try:
                best, logits = self._decode_greedy(*parts[0][:2])
            except Exception as e:
                best, logits = None, e
            if best is not None:
                self.greedy_steps += 1
            self._decode_done(rows, logits[:, None] if isinstance(logits, torch.Tensor) else logits, best)
            return
        best = results = None
        if greedy:  # beside prompt chunks: the decoding rows' argmax from the head, the chunks' logits
            try:
                best, results = self._decode_parts_greedy(parts)
            except Exception:  # run again below, where a failure is kept to its own part
                best, results = None, None
            if best is not None:
                self.greedy_steps += 1
                results = [None] + results
        if results is None:
            results = self._run_parts(parts)
        for (seq, chunk), out in zip(chunks, results[1:] if rows else results):
            self._chunk_done(seq, chunk, out)
        if rows:
            self._decode_done(rows, results[0], best)

    def _run_parts(self, parts) -> list:
        """The logits of each part, or the exception that part raised: when the joint forward fails, each
        part is run alone so that a failure stays with its own requests (nothing is committed to the cache
        before a forward succeeds, so running a part again is safe)."""
        try:
            return self._decode_parts(parts)
        except Exception as e:
            if len(parts) == 1:
                return [e]
            log.warning("a step's joint forward failed; running its %d parts one by one", len(parts), exc_info=True)
        results = []
        for part in parts:
            try:
                results.append(self._decode_parts([part])[0])
            except Exception as e:
                results.append(e)
        return results

    def _chunks(self, decoding: int) -> list:
        """This step's prompt chunks, oldest request first, up to the step's token budget: large when nobody
        is decoding; while others are, PROMPT_TOKENS_PER_ROW prompt tokens per decoding row, and at least
        MIN_CHUNK for each prompt waiting to be read (at most --prefill-chunk). The first term bounds what a
        prompt adds to a running stream's inter-token time (the joint step then has about four rows of
        GEMM work per decoding row: about twice a plain step's time; a fixed 64-token chunk beside 4
        decoding streams made their inter-token p99 5.4x the p50) while reading a joined request's prompt
        fast enough that its slot does not idle for long (32 closed-loop clients, GPT-2 small, 2 cores,
        in-process, alternating: 3 per row 109.0 / 109.2 output tokens/s, 1 per row 94.5 / 102.3); the
        second keeps a queue of prompts from starving (with one token per decoding row alone: 57 tokens/s
        and a 52 s median time to first token)."""
        if decoding:
            budget = min(self.prefill_chunk, max(PROMPT_TOKENS_PER_ROW * decoding, MIN_CHUNK * len(self.prefilling)))
        else:
            budget = self.prefill_chunk_idle
        out = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            chunk = seq.req.prompt_ids[seq.fed: seq.fed + budget]
            out.append((seq, chunk))
            budget -= len(chunk)
        return out

    def _chunk_done(self, seq: Sequence, chunk: list[int], logits) -> None:
        """logits (1, T or 1, V) of a prompt chunk, or the exception its forward raised."""
        req, prompt = seq.req, seq.req.prompt_ids
        if isinstance(logits, Exception):
            self._crash(seq, logits, "reading the prompt")
            return
        try:
            self.slot_tokens[seq.slot] = prompt[: seq.fed + len(chunk)]
            if req.prompt_logprobs is not None:
                self._prompt_logprobs(seq, logits[0], chunk)
        except Exception as e:
            self._crash(seq, e, "reading the prompt")
            return
        seq.fed += len(chunk)
        if seq.fed == len(prompt):
            self._prefill_done(seq, logits[:, -1])  # (1, V)

    def _prefill_done(self, seq: Sequence, last_logits: torch.Tensor) -> None:
        req, prompt = seq.req, seq.req.prompt_ids
        self.prefilling.remove(seq)
        req.sink(PromptDone(seq.cached, seq.prompt_infos))
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(prompt))
            self.metrics.cached_tokens.inc(seq.cached)
        sibs = self.siblings.pop(req.request_id, [])
        if req.max_tokens == 0:  # echo scoring only
            for s in [seq] + sibs:
                self._finish(s, "length")
            return
        for s in sibs:  # the other choices share the prompt: copy it instead of reading it again
            self.cache.copy_prefix(seq.slot, s.slot, len(prompt))
            self.slot_tokens[s.slot] = list(prompt)
        group = [seq] + sibs
        self._sample_and_accept(group, last_logits.expand(len(group), -1))

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, chunk: list[int]) -> None:
        """logits (T, V) of a prompt chunk: position t predicts the prompt token after it."""
        start = seq.fed
        prompt = seq.req.prompt_ids
        targets = prompt[start + 1: start + len(chunk) + 1]  # the next chunk's first token too, when there is one
        lp = torch.log_softmax(logits[: len(targets)].float(), -1)  # (T', V)
        tgt = torch.tensor(targets, device=lp.device)
        chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
        top = _topk(lp, seq.req.prompt_logprobs)
        for j, t in enumerate(targets):
            seq.prompt_infos.append(TokenInfo(t, chosen[j], top[j] if top is not None else []))

    # -- decode -------------------------------------------------------------------------------------
    def _decode_done(self, rows: list[Sequence], logits, best=None) -> None:
        """logits (B, 1, V) of the decoding rows, or the exception their forward raised; or, with logits None,
        best (B,): each row's greedy token, which the head proved the argmax of finite logits."""
        if isinstance(logits, Exception):
            for s in rows:
                self._crash(s, logits, "a decode step")
            return
        for s in rows:
            self.slot_tokens[s.slot].append(s.pending)
            s.pending = None
        if best is None:
            self._sample_and_accept(rows, logits[:, -1])  # (B, V)
        else:
            self._accept_all(rows, best.tolist(), {})

    def _compact(self, rows: list[Sequence]) -> None:
        """Move the B decoding sequences into slots 0..B-1, swapping cache rows with whatever is there (a free
        slot's stored prefix, a prompt being read); only where self.compact says (attention other than the
        fused decode kernel). There, rows in scattered slots make every layer of every step gather its keys and
        values (at 32 rows of ~600 positions, GPT-2 small: ~1 GB copied a step); a swap costs two rows' worth
        once, when a sequence joins or leaves the batch."""
        B = len(rows)
        movers = [s for s in rows if s.slot >= B]
        if not movers:
            return
        owner = {s.slot: s for s in self._occupants()}
        targets = [t for t in range(B) if t not in owner or owner[t] not in rows]
        for s, t in zip(movers, targets):
            a, other = s.slot, owner.get(t)
            self.cache.swap_rows(a, t)
            self.slot_tokens[a], self.slot_tokens[t] = self.slot_tokens[t], self.slot_tokens[a]
            s.slot, owner[t] = t, s
            if other is not None:  # a sequence whose prompt is being read, or a sibling waiting for it
                other.slot, owner[a] = a, other
            else:  # a free slot: its stored prefix (and its place in the LRU order) moves along
                del owner[a]
                self.free[a] = self.free.pop(t)

    def _occupants(self) -> list[Sequence]:
        seqs = list(self.prefilling) + self.running + [s for sibs in self.siblings.values() for s in sibs]
        return [s for s in seqs if not s.done]

    def _sample_and_accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """logits (B, V) float32 -> one new token for each of `seqs`."""
        finite = (~nonfinite_rows(logits)).tolist()  # (B,) a model that produced inf/nan fails its rows only
        ok = [i for i, f in enumerate(finite) if f]
        for i, f in enumerate(finite):
            if not f:
                self._crash(seqs[i], None, "sampling", "The model produced non-finite logits for this request.")
        if not ok:
            return
        seqs = [seqs[i] for i in ok]
        logits = logits[ok] if len(ok) != len(finite) else logits
        try:
            tokens = sample_rows(logits, [s.sampler for s in seqs], [(s.req.prompt_ids, s.output) for s in seqs])
        except Exception:  # one row's sampler failed: redo row by row so the others are unaffected
            tokens = []
            for b, s in enumerate(seqs):
                try:
                    tokens.append(sample_rows(logits[b:b + 1], [s.sampler], [(s.req.prompt_ids, s.output)])[0])
                except Exception as e:
                    self._crash(s, e, "sampling")
                    tokens.append(None)
        want_lp = [b for b, s in enumerate(seqs) if s.req.logprobs is not None]
        lp_rows = {}
        if want_lp:
            lp = torch.log_softmax(logits[want_lp], -1)  # the model's raw distribution, not the sampler's
            for j, b in enumerate(want_lp):
                lp_rows[b] = lp[j]
        self._accept_all(seqs, tokens, lp_rows)

    def _accept_all(self, seqs: list[Sequence], tokens: list, lp_rows: dict) -> None:
        """Hand each sequence its new token (None: its sampler failed), with its logprob row where asked."""
        now = time.monotonic()
        for b, (s, tok) in enumerate(zip(seqs, tokens)):
            if tok is None or s.done:
                continue
            try:
                self._accept(s, tok, lp_rows.get(b), now)
            except Exception as e:
                self._crash(s, e, "detokenizing")

    def _accept(self, s: Sequence, tok: int, lp_row, now: float) -> None:
        req = s.req
        info = TokenInfo(tok, text_offset=len(s.matcher.text))
        if lp_row is not None:
            info.logprob = float(lp_row[tok])
            info.top = _topk(lp_row[None], req.logprobs)[0] if req.logprobs else []
        s.output.append(tok)
        if self.metrics:
            self.metrics.generation_tokens.inc()
            if s.last_token_at is not None:
                self.metrics.inter_token.observe(now - s.last_token_at)
        if req.first_token_at is None:
            req.first_token_at = now
            if self.metrics:
                self.metrics.ttft.observe(now - req.arrival)
        s.last_token_at = now
        finish, reason = None, None
        if tok in req.stop_token_ids:
            finish, reason = "stop", tok
        elif tok == req.eos_id and not req.ignore_eos:
            finish = "stop"
        else:
            s.matcher.feed(s.detok.add(tok))
            if s.matcher.stopped is not None:
                finish, reason = "stop", s.matcher.stopped
            elif len(s.output) >= req.max_tokens:
                finish = "length"
        if finish is not None and s.matcher.stopped is None:
            s.matcher.feed(s.detok.flush())
        text = s.matcher.release(final=finish is not None)
        req.sink(ChoiceUpdate(req.choice_offset + s.index, text, [info], finish, reason, len(s.output)))
        if finish is not None:
            self._finish(s, finish, notify=False)
        elif s not in self.running:
            self.running.append(s)
            s.pending = tok
        else:
            s.pending = tok

    # -- leaving the batch ----------------------------------------------------------------------------
    def _finish(self, s: Sequence, reason: str, notify: bool = True) -> None:
        if notify:
            s.req.sink(ChoiceUpdate(s.req.choice_offset + s.index, s.matcher.release(final=True), [], reason,
                                    None, len(s.output)))
        self._release(s)
        s.req.remaining -= 1
        if s.req.remaining == 0 and self.metrics:
            self.metrics.e2e.observe(time.monotonic() - s.req.arrival)

    def _release(self, s: Sequence) -> None:
        """Give the slot back (its contents stay, for prefix reuse) and drop the sequence from the batch."""
        if s.done:
            return
        s.done = True
        if s in self.running:
            self.running.remove(s)
        if s in self.prefilling:
            self.prefilling.remove(s)
            for sib in self.siblings.pop(s.req.request_id, []):
                self._release(sib)
        self.free[s.slot] = time.monotonic()

    def _crash(self, s: Sequence, exc, where: str, message: str | None = None) -> None:
        if s.done:  # its request has already failed through another of its sequences
            return
        if exc is not None:
            log.error("request %s failed in %s", s.req.request_id, where, exc_info=exc)
        self._fail(s.req, 500, message or f"The server failed in {where} for this request; it has been logged.")

    def _fail(self, req: EngineRequest, status: int, message: str) -> None:
        victims = [s for s in list(self.prefilling) + list(self.running) + self.siblings.get(req.request_id, [])
                   if s.req is req]
        for s in victims:
            self._release(s)
            self.cache.reset_rows([s.slot])  # its contents are suspect
            self.slot_tokens[s.slot] = []
        req.sink(Failed(status, message))

    def _report_gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.running) + len(self.prefilling))
            self.metrics.waiting.set(self.waiting_count)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b])) if a and b else 0


def _topk(lp: torch.Tensor, k: int | None):
    """lp (T, V) -> per row the k best (id, logprob), or None when k is None."""
    if k is None:
        return None
    if k == 0:
        return [[] for _ in range(lp.shape[0])]
    values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)  # (T, k)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
