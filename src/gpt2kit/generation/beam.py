"""Beam search (and beam sampling), vectorised over the batch.

The bookkeeping follows the reference's (transformers 5) formulation so that outputs agree token for
token: each step keeps the best `max(2, 1 + n_eos) * num_beams` continuations, those that end (eos,
max_length, a stop criterion) compete for the finished slots with score sum(log p) / new_len **
length_penalty, the rest continue; `early_stopping` (True / False / "never") decides when no running beam
can still beat a finished one (Wu et al. 2016, length normalisation; the heuristics as the reference's).
"""
from __future__ import annotations

import torch

from .guards import check_finite_logits
from .outputs import GenerateBeamDecoderOnlyOutput
from . import runner as runners

NEG = -1.0e9


def _gather(t, idx):  # t: (B, K, ...), idx: (B, J) -> (B, J, ...)
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(model, plan):
    cfg = plan.cfg
    K = cfg.num_beams
    ids = plan.input_ids  # (B*K, P)
    BK, P = ids.shape
    B = BK // K
    L = plan.max_length
    device = ids.device
    eos = plan.eos
    n_eos = eos.numel() if eos is not None else 0
    keep = max(2, 1 + n_eos) * K
    top_mask = torch.arange(keep, device=device) < K  # (keep,)
    lp, early = cfg.length_penalty, cfg.early_stopping
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores_out, logits_out = [], []

    fill = -1 if eos is None else (plan.pad if plan.pad != 0 else int(eos[0]))
    run_seq = torch.full((B, K, L), fill, dtype=torch.long, device=device)
    run_seq[:, :, :P] = ids.view(B, K, P)
    seqs = run_seq.clone()
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = NEG  # all beams start identical: only the first may spread
    beam_scores = torch.full((B, K), NEG, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    run_bi = torch.full((B, K, L - P), -1, dtype=torch.long, device=device)
    beam_idx = run_bi.clone()
    offsets = torch.arange(B, device=device)[:, None] * K

    runner = runners.make_runner(model, plan)
    positions = plan.position_ids[:, -1] + 1
    logits = runner.prefill(ids, plan.attention_mask, plan.position_ids)
    cur = P
    while True:
        raw = logits.float()
        check_finite_logits(raw, cur - P + 1, model.dtype)  # the loop reads flags back every step anyway
        logp = torch.log_softmax(raw, -1)
        if plan.processors:
            logp = plan.processors(run_seq[:, :, :cur].reshape(BK, cur), logp)
        if want_logits:
            logits_out.append(raw.clone())
        if want_scores:
            scores_out.append(logp.clone())
        V = logp.shape[-1]
        total = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        if cfg.do_sample:
            pick = torch.multinomial(torch.softmax(total, -1), keep, generator=plan.generator)
            vals = total.gather(1, pick)
            vals, order = vals.sort(-1, descending=True)
            pick = pick.gather(1, order)
        else:
            vals, pick = torch.topk(total, keep)  # (B, keep)
        src = pick // V
        tok = pick % V
        cand_seq = _gather(run_seq, src)  # (B, keep, L)
        cand_seq[:, :, cur] = tok
        cand_bi = _gather(run_bi, src)
        cand_bi[:, :, cur - P] = src + offsets

        hits = torch.full((B, keep), cur + 1 >= L, dtype=torch.bool, device=device)
        if eos is not None:
            hits |= torch.isin(tok, eos)
        if plan.criteria:
            hits |= plan.criteria(cand_seq[:, :, : cur + 1].reshape(B * keep, cur + 1), None).view(B, keep)

        # the best K that did not end keep running
        live = vals + hits.float() * NEG
        nxt = torch.topk(live, K).indices
        run_seq, run_scores, run_bi = _gather(cand_seq, nxt), _gather(live, nxt), _gather(cand_bi, nxt)

        # those that ended (among the top K) compete for the finished slots
        just = hits & top_mask[None]
        fin_scores = vals / float(cur + 1 - P) ** lp
        if early is True:
            fin_scores = fin_scores + (finished.all(-1, keepdim=True)).float() * NEG
        fin_scores = fin_scores + (~improvable).float() * NEG + (~just).float() * NEG
        best = torch.topk(torch.cat((beam_scores, fin_scores), 1), K).indices
        seqs = _gather(torch.cat((seqs, cand_seq), 1), best)
        beam_scores = _gather(torch.cat((beam_scores, fin_scores), 1), best)
        beam_idx = _gather(torch.cat((beam_idx, cand_bi), 1), best)
        finished = _gather(torch.cat((finished, just), 1), best)

        cur += 1
        # can a running beam still beat the worst finished one?
        best_len = (L - P) if (early == "never" and lp > 0.0) else (cur - P)
        best_running = run_scores[:, :1] / float(best_len) ** lp
        worst = torch.where(finished, beam_scores.min(1, keepdim=True).values, torch.full_like(beam_scores, NEG))
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        go_on = bool(improvable.any()) and not (early is True and bool(finished.all())) and not bool(hits.all())
        if not go_on:
            break
        runner.reorder(run_bi[:, :, cur - 1 - P].reshape(BK))
        logits = runner.step(run_seq[:, :, cur - 1].reshape(BK), positions)
        positions = positions + 1

    n = cfg.num_return_sequences
    sequences = seqs[:, :n].reshape(B * n, L)
    final_scores = beam_scores[:, :n].reshape(B * n)
    indices = beam_idx[:, :n].reshape(B * n, L - P)
    n_new = int((indices != -1).sum(1).max())
    sequences, indices = sequences[:, : P + n_new], indices[:, :n_new]
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=final_scores if want_scores else None,
                                         scores=tuple(scores_out) if want_scores else None,
                                         logits=tuple(logits_out) if want_logits else None, beam_indices=indices,
                                         past_key_values=runner.final_cache())
