"""Evaluation statistics against hand-built cases: python -m pytest -q tests/test_eval.py"""
import math
import random
from argparse import Namespace

import pytest
import torch

import eval as evaluation
import data
from data import Pref, Tokenizer, by_user
from model import GPT, GPTConfig


def test_win_rate_hand_built_with_ties():
    ours = [3.0, 1.0, 2.0, 5.0, 0.5]
    base = [1.0, 1.0, 4.0, 2.0, 0.5]  # win, tie, loss, win, tie
    rate, lo, hi, n = evaluation.win_rate(ours, base)
    assert n == 5
    assert rate == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    outcomes = [1, 0.5, 0, 1, 0.5]
    var = sum((o - 0.6) ** 2 for o in outcomes) / 5
    assert hi - rate == pytest.approx(1.96 * math.sqrt(var / 5))
    assert lo == pytest.approx(rate - (hi - rate))


def test_ci_matches_binomial_wald_interval():
    # 70 wins out of 100, no ties: the textbook interval p +- 1.96 sqrt(p (1 - p) / n)
    rate, lo, hi, n = evaluation.win_rate([1.0] * 70 + [0.0] * 30, [0.5] * 100)
    assert (rate, n) == (0.7, 100)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 100)
    assert lo == pytest.approx(0.7 - half) and hi == pytest.approx(0.7 + half)
    assert lo == pytest.approx(0.6102, abs=1e-4)


def test_all_ties_is_half_and_interval_clipped():
    assert evaluation.win_rate([1.0] * 4, [1.0] * 4)[:3] == (0.5, 0.5, 0.5)
    rate, lo, hi, _ = evaluation.win_rate([2.0] * 3, [1.0] * 3)
    assert (rate, lo, hi) == (1.0, 1.0, 1.0)


def test_pair_accuracy_counts_against_brute_force():
    """Pair accuracy over the held-out stream equals a loop that scores each pair's chosen
    and rejected answers as two plain sequences; curve_episodes picks how many pairs."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})  # one token per byte
    rows = [Pref(f"u{u}", f"q{i}?", f"yes {u}{i}", f"no {i}{u}", "test")
            for u in range(12) for i in range(3)]
    torch.manual_seed(0)
    policy, ref = (GPT(GPTConfig(block_size=256, vocab_size=tok.n_vocab, n_layer=1, n_head=2,
                                 n_embd=16)).eval() for _ in range(2))
    args = Namespace(batch_size=2, seed=0, curve_episodes=0)
    curve = lambda: evaluation.curve_batches(tok, by_user(rows), 1, 2, args, 256, "cpu")
    acc, n = evaluation.pair_accuracy(policy.token_logprobs, ref.token_logprobs, curve())
    stream = data.EpisodeStream(tok, by_user(rows), None, "fspo", 2, 2, 256, 17, which="both",
                                use_shots=1)
    assert n == stream.per_epoch * 2 == 12  # 12 users x 1 episode of 2 shots + a query

    def logp(model, ctx, y):  # summed log p(y | ctx), the sequence run alone, no packing
        with torch.no_grad():
            lp = model(torch.tensor([ctx + y]))[0][0].double().log_softmax(-1)  # (T, V)
        return sum(lp[len(ctx) - 1 + t, y[t]].item() for t in range(len(y)))

    stream.batch(0)  # draws the epoch's episodes
    hits = 0
    for shots, query in stream.episodes[:n]:
        e = stream.encode(shots, query, random.Random(0))  # 1 shot: no randomness used
        h_w = logp(policy, e.ctx, e.chosen) - logp(ref, e.ctx, e.chosen)
        h_l = logp(policy, e.ctx, e.rejected) - logp(ref, e.ctx, e.rejected)
        hits += h_w > h_l
    assert acc == hits / n and 0 < hits < n  # a mix, so a flipped sign would show
    args.curve_episodes = 3  # rounded up to whole batches
    assert evaluation.pair_accuracy(policy.token_logprobs, ref.token_logprobs, curve())[1] == 4
