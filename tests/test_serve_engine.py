"""The serving engine in-process, step by step: chunked prefill interleaved with decode, prefix reuse,
aborts, a failing request that leaves the others alone; and the text layer (UTF-8, stop strings)."""
import pytest
import torch

from gpt2kit import native
from gpt2kit.loading import load_model_and_tokenizer
from gpt2kit.model import linear
from gpt2kit.model.cache import StaticCache
from gpt2kit.serving.sampling import RowSampler, SamplingParams, sample_rows
from gpt2kit.serving.scheduler import ChoiceUpdate, Engine, EngineRequest, Failed, PromptDone
from gpt2kit.serving.stop import IncrementalDetokenizer, StopMatcher

EOS = 50256


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    model, tok, _ = load_model_and_tokenizer(None, "cpu", "float32")
    return model, tok


def generate_alone(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


class Client:
    def __init__(self):
        self.events = []

    def __call__(self, ev):
        self.events.append(ev)

    def tokens(self):
        return [t.id for e in self.events if isinstance(e, ChoiceUpdate) for t in e.tokens]

    def finished(self):
        return any(isinstance(e, ChoiceUpdate) and e.finish_reason for e in self.events)


def submit(engine, rid, ids, max_tokens, **kw):
    c = Client()
    kw.setdefault("params", SamplingParams(temperature=0.0))
    assert engine.try_submit([EngineRequest(rid, ids, max_tokens, sink=c, eos_id=EOS, ignore_eos=True, **kw)])
    return c


def run_until(engine, cond, limit=500):
    for _ in range(limit):
        if cond():
            return
        engine.step()
    raise AssertionError("the engine did not get there")


def test_chunked_prefill_interleaves_with_decode_and_greedy_equals_generate(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=4, max_model_len=256, prefill_chunk=16)
    a_ids = tok.encode("ROMEO:")
    a = submit(engine, "a", a_ids, 60)
    run_until(engine, lambda: len(a.tokens()) >= 1)
    b_ids = [int(i) for i in torch.randint(0, 50000, (200,), generator=torch.Generator().manual_seed(1))]
    b = submit(engine, "b", b_ids, 10)
    reads = []
    while not any(isinstance(e, PromptDone) for e in b.events):
        before = len(a.tokens())
        fed = [s.fed for s in engine.prefilling]
        engine.step()
        reads.append(([s.fed for s in engine.prefilling] or [200])[0] - (fed or [0])[0])
        assert len(a.tokens()) == before + 1, "a running stream must get a token every step while a prompt is read"
    assert len(reads) >= 200 // 16 and max(reads) <= 16
    assert engine.mixed_forwards >= len(reads)  # each chunk rode in the running stream's decode forward
    run_until(engine, lambda: a.finished() and b.finished())
    assert a.tokens() == generate_alone(model, a_ids, 60)
    assert b.tokens() == generate_alone(model, b_ids, 10)


@pytest.mark.usefixtures("native_build")
def test_greedy_steps_take_the_heads_argmax_unless_logprobs_are_asked(model_tok):
    """One or two greedy rows: the step's tokens come from the head's screened argmax (model.decode_greedy),
    never materializing logits, and equal generate's; a request asking for logprobs needs the logits."""
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=2, max_model_len=256)
    a_ids, b_ids = tok.encode("ROMEO:"), tok.encode("KING: what say")
    a, b = submit(engine, "a", a_ids, 20), submit(engine, "b", b_ids, 20)
    run_until(engine, lambda: a.finished() and b.finished())
    assert a.tokens() == generate_alone(model, a_ids, 20) and b.tokens() == generate_alone(model, b_ids, 20)
    took = engine.greedy_steps
    assert took >= 18 if native.library() is not None else took == 0  # without the kernels: the logits path
    c = submit(engine, "c", a_ids, 8, logprobs=0)
    run_until(engine, c.finished)
    assert engine.greedy_steps == took  # logprobs report the raw log-softmax: every step computed the logits
    assert c.tokens() == generate_alone(model, a_ids, 8)
    assert all(t.logprob is not None for e in c.events if isinstance(e, ChoiceUpdate) for t in e.tokens)


def test_more_greedy_rows_and_mixed_steps_take_the_heads_argmax(model_tok):
    """Six greedy rows, joined by prompts while they decode: where the CPU has bf16 products, every step's
    decoding rows (alone, or beside prompt chunks: decode_parts_greedy) get their tokens from the head's bf16
    screen, and each completion equals generate's for it alone."""
    from gpt2kit.model import onednn

    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=6, max_model_len=256)
    g = torch.Generator().manual_seed(11)
    prompts = [[int(i) for i in torch.randint(0, 50000, (n,), generator=g)] for n in (4, 40, 9, 70, 15, 30)]
    done, bests = engine._decode_done, []
    engine._decode_done = lambda rows, logits, best=None: (bests.append((len(rows), best is not None)),
                                                           done(rows, logits, best))
    clients = [submit(engine, f"r{i}", p, 16) for i, p in enumerate(prompts[:3])]
    run_until(engine, lambda: all(len(c.tokens()) >= 3 for c in clients))
    clients += [submit(engine, f"r{i}", p, 16) for i, p in enumerate(prompts[3:], 3)]  # read beside the decoding
    mixed = engine.mixed_forwards
    run_until(engine, lambda: all(c.finished() for c in clients))
    assert engine.mixed_forwards > mixed
    for c, p in zip(clients, prompts):
        assert c.tokens() == generate_alone(model, p, 16)
    if native.library() is not None and onednn.bf16_native():
        assert all(argmax for _, argmax in bests)  # every decoding step took the head's argmax
        assert any(n >= 3 for n, _ in bests) and model.lm_head._screen16 is not None  # the bf16 screen at 3+ rows
        assert engine.greedy_steps == len(bests)
    else:
        assert model.lm_head._screen16 is None


@pytest.mark.parametrize("attention", ["fused", "eager"])
def test_decoding_rows_are_read_in_place_without_copies(model_tok, attention):
    """Requests that end at different steps leave holes among the slots. The fused decode kernel reads each row
    in its own slot, so rows stay where they are (no swaps); any other attention reads the cache as views only
    for slots 0..B-1, so there the engine swaps the decoding rows into 0..B-1. Either way no layer gathers a
    copy, and each completion is still the one it gets alone."""
    model, tok = model_tok
    if attention == "fused" and not StaticCache(model.config, 1, 8).decode_kernel_fits():
        pytest.skip("no native decode kernel on this machine")
    before = model.config._attn_implementation
    if attention == "eager":
        model.set_attn_implementation("eager")
    try:
        engine = Engine(model, tok, max_num_seqs=5, max_model_len=128)
        assert engine.compact is (attention == "eager")
        g = torch.Generator().manual_seed(7)
        prompts = [[int(i) for i in torch.randint(0, 50000, (n,), generator=g)] for n in (5, 17, 9, 30, 12, 21, 7)]
        lengths = [3, 20, 6, 14, 9, 11, 4]
        calls, swaps = [], []

        def spy(run):  # whichever forward a step takes, the decoding rows it was given
            def spied(parts):
                calls.extend(rows.tolist() for ids, rows, _ in parts if ids.shape[1] == 1)
                return run(parts)
            return spied

        engine._decode_parts, engine._decode_parts_greedy = spy(engine._decode_parts), spy(engine._decode_parts_greedy)
        greedy = engine._decode_greedy
        engine._decode_greedy = lambda ids, slots: (calls.append(slots.tolist()), greedy(ids, slots))[1]
        swap = engine.cache.swap_rows
        engine.cache.swap_rows = lambda a, b: (swaps.append((a, b)), swap(a, b))
        clients = [submit(engine, f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts[:5], lengths[:5]))]
        late = []
        steps = 0
        while not all(c.finished() for c in clients + late):
            engine.step()
            steps += 1
            if steps == 8:  # two more arrive once the first have left their slots
                late = [submit(engine, f"r{i}", prompts[i], lengths[i]) for i in (5, 6)]
            assert steps < 200
        batched = [rows for rows in calls if len(rows) > 1]
        assert batched and any(len(rows) < 5 for rows in batched[len(batched) // 2:])  # holes did open up
        if attention == "eager":
            assert swaps and all(rows == list(range(len(rows))) for rows in batched)
        else:
            assert not swaps and any(rows != list(range(len(rows))) for rows in batched)  # read where they lie
        assert engine.cache.gathers == 0 and engine.compact is (attention == "eager")
        for c, p, n in zip(clients + late, prompts, lengths):
            assert c.tokens() == generate_alone(model, p, n)
    finally:
        model.set_attn_implementation(before)


@pytest.mark.parametrize("quantize,embeddings", [("int8", False), ("int4", True), ("nf4", False)])
def test_a_quantized_model_serves_what_it_generates_alone(quantize, embeddings):
    """`gpt2kit serve --quantize` (and --quantize-embeddings): the joint decode/prompt forwards run the
    quantized modules, and each completion equals that model's own generate. nf4's config asks for bfloat16
    compute, which AMX would run in bf16 from 8 rows on: the engine makes the 4-bit products float32-exact at every
    row count (batch_invariant), so a row's tokens do not depend on the rows beside it."""
    from gpt2kit.quantization.modules import Linear4bit
    from gpt2kit.quantization.replace import quantized_modules

    model, tok, _ = load_model_and_tokenizer(None, "cpu", "float32", quantize, embeddings)
    engine = Engine(model, tok, max_num_seqs=3, max_model_len=256)
    four = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert (len(four) > 0) == (quantize == "nf4")
    assert all(m.batch_invariant and m.amx_parts == 3 and m.compute_dtype is torch.bfloat16 for m in four)
    prompts = [tok.encode(t) for t in ("ROMEO:", "KING: what say you to this", "First Citizen:\nBefore we")]
    clients = [submit(engine, f"q{i}", p, 10) for i, p in enumerate(prompts[:2])]
    run_until(engine, lambda: len(clients[0].tokens()) >= 3)
    clients.append(submit(engine, "q2", prompts[2], 10))  # read while the others decode
    run_until(engine, lambda: all(c.finished() for c in clients))
    assert engine.mixed_forwards > 0
    assert len(quantized_modules(model)) >= 4 * model.config.n_layer
    if native.library() is not None:  # steps of decoding rows only are only gpt2kit's kernels: they replay
        assert engine.replay.replays > 0 and engine.replay.refused is None
    for c, p in zip(clients, prompts):
        assert c.tokens() == generate_alone(model, p, 10)

def test_prefix_reuse_counts_cached_tokens_and_changes_nothing(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=2, max_model_len=256)
    doc = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak. You are all resolved rather to die")
    first = submit(engine, "1", doc + tok.encode(" than"), 6)
    run_until(engine, first.finished)
    second = submit(engine, "2", doc + tok.encode(" or"), 6)
    run_until(engine, second.finished)
    done = next(e for e in second.events if isinstance(e, PromptDone))
    assert done.cached_tokens == len(doc)
    assert second.tokens() == generate_alone(model, doc + tok.encode(" or"), 6)
    same = submit(engine, "3", doc + tok.encode(" or"), 6)  # the whole prompt is stored: all but its last token reused
    run_until(engine, same.finished)
    assert next(e for e in same.events if isinstance(e, PromptDone)).cached_tokens == len(doc)
    assert same.tokens() == second.tokens()


def test_n_choices_share_one_prefill(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=4, max_model_len=256)
    ids = tok.encode("KING:")
    c = submit(engine, "n", ids, 8, n=3, params=SamplingParams(temperature=1.0, seed=7))
    run_until(engine, lambda: sum(1 for e in c.events if isinstance(e, ChoiceUpdate) and e.finish_reason) == 3)
    per_choice = {}
    for e in c.events:
        if isinstance(e, ChoiceUpdate):
            per_choice.setdefault(e.index, []).extend(t.id for t in e.tokens)
    assert sorted(per_choice) == [0, 1, 2] and all(len(v) == 8 for v in per_choice.values())
    # choice i draws with seed + i, whatever else runs: the same as a one-choice request seeded seed + i
    for i in range(3):
        alone = Engine(model, tok, max_num_seqs=1, max_model_len=256)
        one = submit(alone, f"s{i}", ids, 8, params=SamplingParams(temperature=1.0, seed=7 + i))
        run_until(alone, one.finished)
        assert one.tokens() == per_choice[i]


def test_abort_frees_the_slot_within_one_step(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=2, max_model_len=256)
    c = submit(engine, "gone", tok.encode("ROMEO:"), 100)
    run_until(engine, lambda: len(c.tokens()) >= 3)
    assert len(engine.free) == 1
    engine.abort("gone")
    engine.step()
    assert len(engine.free) == 2 and not engine.running


def test_a_failing_request_leaves_the_others_alone(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=3, max_model_len=256)
    decode = engine._decode_parts
    good_ids, bad_ids = tok.encode("ROMEO:"), tok.encode("KING:")
    good = submit(engine, "good", good_ids, 12)
    bad = submit(engine, "bad", bad_ids, 12)
    run_until(engine, lambda: len(good.tokens()) >= 2 and len(bad.tokens()) >= 2)
    bad_slot = next(s.slot for s in engine.running if s.req.request_id == "bad")

    def poisoned(parts):  # the model goes wrong on one row only
        out = decode(parts)
        for (ids, rows, _), logits in zip(parts, out):
            logits[(rows == bad_slot).nonzero()[:, 0]] = float("nan")
        return out

    def poisoned_greedy(ids, slots):  # a step of greedy rows: the head's screen declines non-finite logits
        return None, poisoned([(ids, slots, 1)])[0][:, -1]  # (B, V), as model.decode_greedy gives them

    greedy = engine._decode_greedy
    engine._decode_parts, engine._decode_greedy = poisoned, poisoned_greedy
    run_until(engine, lambda: good.finished() and any(isinstance(e, Failed) for e in bad.events))
    failed = next(e for e in bad.events if isinstance(e, Failed))
    assert failed.status == 500 and "non-finite" in failed.message
    assert good.tokens() == generate_alone(model, good_ids, 12)
    engine._decode_parts, engine._decode_greedy = decode, greedy
    again = submit(engine, "again", bad_ids, 5)  # the failed slot was reset and can serve again
    run_until(engine, again.finished)
    assert again.tokens() == generate_alone(model, bad_ids, 5)



def test_a_prompt_that_breaks_the_joint_forward_fails_alone(model_tok):
    """A step's decoding rows and prompt chunks run as one forward (greedy rows: their argmax from the head,
    decode_parts_greedy); when it raises, the parts are run one by one, so only the request whose part fails is
    answered with an error."""
    model, tok = model_tok
    engine = Engine(model, tok, max_num_seqs=3, max_model_len=256)
    good_ids, bad_ids = tok.encode("ROMEO:"), tok.encode("KING: what say you")
    good = submit(engine, "good", good_ids, 12)
    run_until(engine, lambda: len(good.tokens()) >= 2)
    bad = submit(engine, "bad", bad_ids, 12)
    seen = []

    def breaks_on_the_prompt(run, name):
        def forward(parts):
            seen.append((name, len(parts)))
            if any(ids.shape[1] == len(bad_ids) for ids, _, _ in parts):
                raise RuntimeError("this prompt breaks the model")
            return run(parts)
        return forward

    engine._decode_parts = breaks_on_the_prompt(engine._decode_parts, "logits")
    engine._decode_parts_greedy = breaks_on_the_prompt(engine._decode_parts_greedy, "greedy")
    run_until(engine, lambda: good.finished() and any(isinstance(e, Failed) for e in bad.events))
    # the joint greedy forward, the joint forward again, then each part alone
    assert seen[:4] == [("greedy", 2), ("logits", 2), ("logits", 1), ("logits", 1)]
    assert next(e for e in bad.events if isinstance(e, Failed)).status == 500
    assert good.tokens() == generate_alone(model, good_ids, 12)

def test_seeded_sampling_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=42)
    alone = RowSampler(params, "cpu")
    batch = [RowSampler(SamplingParams(temperature=1.0, seed=s), "cpu") for s in (1, 2)] + [RowSampler(params, "cpu")]
    for _ in range(20):
        a = sample_rows(logits[2:3], [alone], [([], [])])[0]
        b = sample_rows(logits[:3], batch, [([], [])] * 3)[2]
        assert a == b


def test_incremental_detokenizer_never_splits_a_character(model_tok):
    _, tok = model_tok
    text = "naïve café – 東京 🙂 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_matcher_holds_back_and_never_passes_a_stop():
    m = StopMatcher(["STOP", "ab"])
    released = []
    for piece in ["xx S", "T", "O", "P tail"]:
        m.feed(piece)
        released.append(m.release())
    assert released == ["xx ", "", "", ""] and m.stopped == "STOP" and m.text == "xx "
    m = StopMatcher(["STOP"])
    m.feed("xx ST")
    assert m.release() == "xx "
    m.feed("ay")
    assert m.release() == "STay" and m.stopped is None
    m = StopMatcher(["\n\n"], include_stop=True)
    m.feed("a\n")
    m.feed("\nb")
    assert m.release(final=True) == "a\n\n" and m.stopped == "\n\n"


def test_warm_up_runs_each_forward_once_and_leaves_the_cache_empty():
    """Engine.warm_up (before the server's ready line) runs a prompt chunk, a decode step and a greedy step in
    slot 0: afterwards the head's int8 screen exists (the greedy step took the head's argmax), every slot is
    empty, no prefix is taken from what warm-up wrote, and a request gets what it gets alone. A context too
    short for it is no error."""
    torch.manual_seed(0)
    model, tok, _ = load_model_and_tokenizer(None, "cpu", "float32")  # its own: the screen must not exist yet
    engine = Engine(model, tok, max_num_seqs=2, max_model_len=64)
    head = model.lm_head
    assert getattr(head, "_screen", None) is None
    engine.warm_up()
    if native.library() is not None:
        assert head._screen is not None and head.last_path == linear.ARGMAX_SCREEN
    assert engine.cache.lengths == [0, 0] and engine.slot_tokens == [[], []]
    prompt = [int(i) for i in torch.randint(0, 50000, (9,), generator=torch.Generator().manual_seed(3))]
    c = submit(engine, "r", prompt, 6)
    run_until(engine, c.finished)
    assert c.tokens() == generate_alone(model, prompt, 6)
    assert not any(isinstance(e, PromptDone) and e.cached_tokens for e in c.events)
    Engine(model, tok, max_num_seqs=1, max_model_len=2).warm_up()  # no room for a chunk and a step: nothing run
