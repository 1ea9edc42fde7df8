"""Task heads against transformers on the same random weights (heads perturbed too): outputs and losses.

Acceptance 1 of issue 4: logits, mc_logits, start/end logits and every loss within 1e-5 in float32.
"""
import pytest
import torch
import transformers

from gpt2kit import (GPT2Config, GPT2DoubleHeadsModel, GPT2ForQuestionAnswering, GPT2ForSequenceClassification,
                     GPT2ForTokenClassification)
from model_helpers import TINY, twin

ATOL = 1e-5
V = TINY["vocab_size"]


WORST = []  # the largest difference seen by the running test, printed with -s as the measured figure


@pytest.fixture(autouse=True)
def report_worst(request):
    WORST.clear()
    yield
    if WORST:
        print(f"\n{request.node.name}: max |gpt2kit - transformers| = {max(WORST):.1e} over {len(WORST)} tensors")


def close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    WORST.append((a - b).abs().max().item())
    assert torch.allclose(a, b, atol=ATOL, rtol=0), WORST[-1]


def ids(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# -- double heads ----------------------------------------------------------------------------------
SUMMARY_CONFIGS = [
    dict(summary_activation="tanh"),
    dict(summary_activation=None, summary_last_dropout=0.2),
    dict(summary_activation="gelu", summary_proj_to_labels=False),  # projects to n_embd
    dict(summary_use_proj=False),  # no projection: the summary is the hidden state itself
]


@pytest.mark.parametrize("summary_type", ["cls_index", "last", "first", "mean"])
@pytest.mark.parametrize("summary", SUMMARY_CONFIGS, ids=["tanh", "plain", "gelu-to-hidden", "no-proj"])
def test_double_heads_matches_transformers(summary_type, summary):
    hf, ours = twin(GPT2DoubleHeadsModel, transformers.GPT2DoubleHeadsModel, summary_type=summary_type, **summary)
    assert hf.config.num_labels == ours.config.num_labels == 1  # both models set it
    x = ids(2, 3, 7)  # (batch, choices, seq)
    mc_token_ids = torch.tensor([[6, 3, 0], [2, 5, 4]])
    for mc in (mc_token_ids, None):
        a, b = hf(x, mc_token_ids=mc, labels=x), ours(x, mc_token_ids=mc, labels=x)
        close(a.logits, b.logits)
        close(a.mc_logits, b.mc_logits)
        close(a.loss, b.loss)
        if a.mc_logits.dim() == 2:  # mc_loss over one score per choice (or the reference's (B, T) for last/first/mean)
            mc_labels = torch.tensor([1, 2])
            a, b = hf(x, mc_token_ids=mc, mc_labels=mc_labels), ours(x, mc_token_ids=mc, mc_labels=mc_labels)
            close(a.mc_loss, b.mc_loss)
            assert b.loss is None and b.to_tuple()[0] is b.mc_loss


def test_double_heads_mask_types_and_tuple_output():
    hf, ours = twin(GPT2DoubleHeadsModel, transformers.GPT2DoubleHeadsModel)
    x = ids(2, 2, 6)
    mask = torch.ones(2, 2, 6, dtype=torch.long)
    mask[0, 1, 4:] = 0
    tt = ids(2, 2, 6, seed=3) % 2
    kw = dict(attention_mask=mask, token_type_ids=tt, mc_token_ids=torch.tensor([[5, 3], [1, 2]]))
    a, b = hf(x, **kw), ours(x, **kw)
    close(a.logits, b.logits)
    close(a.mc_logits, b.mc_logits)
    t = ours(x, **kw, return_dict=False)
    assert torch.equal(t[0], b.logits) and torch.equal(t[1], b.mc_logits)


def test_double_heads_summary_modules_follow_config():
    cfg = GPT2Config(**TINY, summary_first_dropout=0.3, summary_last_dropout=0.2, summary_activation="tanh")
    head = GPT2DoubleHeadsModel(cfg).multiple_choice_head
    assert head.first_dropout.p == 0.3 and head.last_dropout.p == 0.2
    assert head.summary.out_features == 1 and torch.allclose(head.activation(torch.tensor([1.0])), torch.tanh(torch.tensor([1.0])))
    names = {k for k in GPT2DoubleHeadsModel(GPT2Config(**TINY)).state_dict() if not k.startswith("transformer.")}
    hf_names = {k for k in transformers.GPT2DoubleHeadsModel(transformers.GPT2Config(**TINY)).state_dict()
                if not k.startswith("transformer.")}
    assert names == hf_names


def test_double_heads_bad_input_is_explained():
    _, ours = twin(GPT2DoubleHeadsModel, transformers.GPT2DoubleHeadsModel)
    x = ids(1, 2, 5)
    with pytest.raises(ValueError, match=r"mc_token_ids must lie in \[0, 4\]"):
        ours(x, mc_token_ids=torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match="mc_token_ids must have shape"):
        ours(x, mc_token_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(NotImplementedError, match="attn"):
        GPT2DoubleHeadsModel(GPT2Config(**TINY, summary_type="attn"))
    with pytest.raises(ValueError, match="summary_activation"):
        GPT2DoubleHeadsModel(GPT2Config(**TINY, summary_activation="nope"))


# -- question answering ----------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_question_answering_matches_transformers(attn):
    hf, ours = twin(GPT2ForQuestionAnswering, transformers.GPT2ForQuestionAnswering, attn=attn)
    x = ids(3, 9)
    a, b = hf(x), ours(x)
    close(a.start_logits, b.start_logits)
    close(a.end_logits, b.end_logits)
    # inside the sequence, past its end (clamped to T and ignored), negative (clamped to 0), and (B, 1)-shaped
    for start, end in [([1, 4, 8], [2, 6, 8]), ([1, 20, 3], [9, 4, 30]), ([-3, 2, 2], [5, 5, 5])]:
        for shape in ((3,), (3, 1)):
            s, e = torch.tensor(start).view(shape), torch.tensor(end).view(shape)
            close(hf(x, start_positions=s, end_positions=e).loss, ours(x, start_positions=s, end_positions=e).loss)
    # every span outside the input: both give NaN (nothing left to average)
    s = torch.tensor([9, 12, 40])
    assert torch.isnan(hf(x, start_positions=s, end_positions=s).loss)
    assert torch.isnan(ours(x, start_positions=s, end_positions=s).loss)
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        ours(x, start_positions=s)  # the reference silently returns no loss here


# -- sequence classification -----------------------------------------------------------------------
@pytest.mark.parametrize("num_labels,labels,problem_type", [
    (1, torch.tensor([0.5]), None),  # regression inferred
    (3, torch.tensor([2]), None),  # single-label inferred from integer labels
    (3, torch.tensor([[1.0, 0.0, 1.0]]), None),  # multi-label inferred from float labels
    (3, torch.tensor([[0.1, -2.0, 0.7]]), "regression"),
    (3, torch.tensor([[1, 0, 1]]), "multi_label_classification"),
    (2, torch.tensor([1]), "single_label_classification"),
])
def test_sequence_classification_losses_match_transformers(num_labels, labels, problem_type):
    hf, ours = twin(GPT2ForSequenceClassification, transformers.GPT2ForSequenceClassification,
                    num_labels=num_labels, problem_type=problem_type)
    x = ids(1, 8)
    hf_labels = labels.float() if problem_type == "multi_label_classification" else labels  # torch's BCE wants floats
    a, b = hf(x, labels=hf_labels), ours(x, labels=labels)
    close(a.logits, b.logits)
    close(a.loss, b.loss)
    assert ours.config.problem_type == hf.config.problem_type  # inferred and stored the same way


def test_sequence_classification_pad_token_id_as_reference():
    """No attention_mask, pad_token_id set: the rightmost non-pad token, exactly as transformers."""
    hf, ours = twin(GPT2ForSequenceClassification, transformers.GPT2ForSequenceClassification,
                    num_labels=4, pad_token_id=0)
    x = ids(3, 7)
    x[x == 0] = 1
    x[0, 5:] = 0  # right padded
    x[1, :3] = 0  # left padded (no position fix-up without a mask, as the reference)
    a, b = hf(x, labels=torch.tensor([0, 3, 1])), ours(x, labels=torch.tensor([0, 3, 1]))
    close(a.logits, b.logits)
    close(a.loss, b.loss)
    # with the matching mask and right padding, positions are unchanged: identical to the reference too
    mask = (x != 0).long()
    mask[1] = 1
    close(hf(x[[0, 2]], attention_mask=mask[[0, 2]]).logits, ours(x[[0, 2]], attention_mask=mask[[0, 2]]).logits)


def test_sequence_classification_needs_a_way_to_find_the_last_token():
    _, ours = twin(GPT2ForSequenceClassification, transformers.GPT2ForSequenceClassification)
    with pytest.raises(ValueError, match="pass the attention_mask"):
        ours(ids(2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no 1"):
        ours(ids(2, 5), attention_mask=mask)
    one = ours(ids(1, 5)).logits  # batch of one without either: its last token, as the reference
    assert one.shape == (1, 2)


def test_sequence_classification_with_cache_and_embeds():
    hf, ours = twin(GPT2ForSequenceClassification, transformers.GPT2ForSequenceClassification, num_labels=3)
    x = ids(1, 6)
    emb = ours.transformer.wte(x)
    close(hf(inputs_embeds=emb).logits, ours(inputs_embeds=emb).logits)
    first = ours(x[:, :4], use_cache=True)
    step = ours(x[:, 4:], past_key_values=first.past_key_values)
    close(step.logits, hf(x).logits)


# -- token classification --------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"classifier_dropout": 0.25}, {"hidden_dropout": 0.3},
                                   {"classifier_dropout": None, "hidden_dropout": 0.0}])
def test_token_classification_matches_transformers(extra):
    hf, ours = twin(GPT2ForTokenClassification, transformers.GPT2ForTokenClassification, num_labels=5, **extra)
    assert ours.dropout.p == hf.dropout.p
    x = ids(2, 7)
    labels = ids(2, 7, seed=4) % 5
    labels[0, :2] = -100  # ignored
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    a, b = hf(x, labels=labels, attention_mask=mask), ours(x, labels=labels, attention_mask=mask)
    close(a.logits, b.logits)
    close(a.loss, b.loss)


def test_head_gradients_match_transformers():
    """Losses agree in value; their gradients reach the head and the body alike."""
    hf, ours = twin(GPT2ForTokenClassification, transformers.GPT2ForTokenClassification, num_labels=3)
    x, labels = ids(2, 5), ids(2, 5, seed=7) % 3
    hf(x, labels=labels).loss.backward()
    ours(x, labels=labels).loss.backward()
    grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, grads[name].grad)


def test_double_heads_generates_like_the_lm_head():
    """The double-heads model keeps the LM head's job: generate() and logits_to_keep work on it."""
    from gpt2kit import GPT2LMHeadModel

    hf, ours = twin(GPT2DoubleHeadsModel, transformers.GPT2DoubleHeadsModel)
    lm = GPT2LMHeadModel(ours.config).eval()
    lm.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("multiple_choice_head.")})
    x = ids(1, 5)
    assert torch.equal(ours.generate(x, max_new_tokens=4, do_sample=False), lm.generate(x, max_new_tokens=4, do_sample=False))
    full, last = ours(x[None]), ours(x[None], logits_to_keep=1)
    assert torch.allclose(last.logits, full.logits[..., -1:, :], atol=ATOL, rtol=0)  # ours against ours
    assert torch.equal(last.mc_logits, full.mc_logits)
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(x[None], labels=x[None], logits_to_keep=1)
