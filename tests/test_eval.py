"""Evaluation statistics against hand-built cases: python -m pytest -q tests/test_eval.py"""
import itertools
import math
from argparse import Namespace

import numpy as np
import pytest
import torch

import eval as evaluation
import data
from data import Pref, Tokenizer, by_user
from model import GPT, GPTConfig


def test_win_rate_hand_built_with_ties():
    ours = [3.0, 1.0, 2.0, 5.0, 0.5]
    base = [1.0, 1.0, 4.0, 2.0, 0.5]  # win, tie, loss, win, tie
    wr = evaluation.win_rate(ours, base, ["a", "b", "c", "d", "e"])
    assert wr["n"] == 5 and wr["rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    ties = evaluation.win_rate([1.0] * 4, [1.0] * 4, ["a", "a", "b", "b"])
    assert (ties["rate"], ties["lo"], ties["hi"]) == (0.5, 0.5, 0.5)


def test_interval_with_one_item_per_user_is_the_binomial_one():
    # 70 wins out of 100 users: close to the textbook p +- 1.96 sqrt(p (1 - p) / n)
    wr = evaluation.win_rate([1.0] * 70 + [0.0] * 30, [0.5] * 100, list(range(100)))
    half = 1.96 * math.sqrt(0.7 * 0.3 / 100)
    assert wr["rate"] == 0.7 and abs(wr["lo"] - (0.7 - half)) < 0.015 and abs(wr["hi"] - (0.7 + half)) < 0.015


def test_interval_resamples_users_not_items():
    """Exact reference: with 3 users, the 27 equally likely resamples of users give the
    bootstrap distribution of the pooled mean; its 2.5% / 97.5% quantiles are the interval.
    Treating the 7 items as independent would give a much narrower one."""
    values = [1, 1, 1, 0] + [0, 0] + [1]
    users = ["a"] * 4 + ["b"] * 2 + ["c"]
    per = {"a": (3, 4), "b": (0, 2), "c": (1, 1)}
    means = sorted(sum(per[u][0] for u in pick) / sum(per[u][1] for u in pick)
                   for pick in itertools.product("abc", repeat=3))
    got = evaluation.interval(values, users, n_boot=20000)
    assert got["rate"] == pytest.approx(4 / 7) and got["n"] == 7
    assert got["lo"] == pytest.approx(np.quantile(means, 0.025, method="inverted_cdf"), abs=0.02)
    assert got["hi"] == pytest.approx(np.quantile(means, 0.975, method="inverted_cdf"), abs=0.02)
    two = evaluation.interval([1] * 10 + [0] * 10, ["a"] * 10 + ["b"] * 10)
    assert (two["lo"], two["hi"]) == (0.0, 1.0)  # two users: all of one, or all of the other


def test_gap_interval_resamples_users_for_model_and_reference_together():
    """Exact reference: with 3 users the 27 equally likely resamples give the bootstrap
    distribution of (model - 1/2) / (reference - 1/2), both means over the same resampled
    users; resampling the two apart would give another one. A reference at chance has no gap."""
    model = [1, 1, 0, 0] + [1, 0] + [1]
    ref = [1, 1, 1, 0] + [1, 1] + [1]
    users = ["a"] * 4 + ["b"] * 2 + ["c"]
    per = {u: [(model[i], ref[i]) for i in range(7) if users[i] == u] for u in "abc"}
    gaps = []
    for pick in itertools.product("abc", repeat=3):
        pairs = [p for u in pick for p in per[u]]
        m, r = (sum(p[j] for p in pairs) / len(pairs) for j in (0, 1))
        gaps.append((m - 0.5) / (r - 0.5))
    got = evaluation.gap_interval(model, ref, users, n_boot=20000)
    assert got["rate"] == pytest.approx((4 / 7 - 0.5) / (6 / 7 - 0.5)) and got["n"] == 7
    assert got["lo"] == pytest.approx(np.quantile(gaps, 0.025, method="inverted_cdf"), abs=0.02)
    assert got["hi"] == pytest.approx(np.quantile(gaps, 0.975, method="inverted_cdf"), abs=0.02)
    assert evaluation.gap_cell(got) == f"{100 * got['rate']:.0f}% [{100 * got['lo']:.0f}, {100 * got['hi']:.0f}]"
    chance = evaluation.gap_interval([1, 0], [1, 0], ["a", "b"])
    assert chance["rate"] is None and evaluation.gap_cell(chance) == "-"
    # a reference at chance in 1 resample of 27 (user c alone), over 2.5%: no interval
    rare = evaluation.gap_interval(model, ref[:6] + [0], users, n_boot=20000)
    assert rare["rate"] == pytest.approx((4 / 7 - 0.5) / (5 / 7 - 0.5)) and rare["lo"] is None
    assert evaluation.gap_cell(rare) == f"{100 * rare['rate']:.0f}%"


def test_gap_interval_leaves_out_the_few_resamples_with_no_gap():
    """5 users, user e's one pair missed by the reference: the 21 resamples of 3,125 that draw
    e four or five times have the reference at or below chance (0.7%), no gap; the interval
    is the quantiles of the 3,104 others."""
    per = {"a": [(1, 1), (1, 1), (0, 1)], "b": [(1, 1), (0, 1), (0, 1)], "c": [(0, 1), (1, 1), (1, 1)],
           "d": [(1, 1), (1, 1), (1, 1)], "e": [(0, 0)]}
    users = [u for u in per for _ in per[u]]
    model, ref = ([p[j] for u in per for p in per[u]] for j in (0, 1))
    gaps = []
    for pick in itertools.product(per, repeat=5):
        pairs = [p for u in pick for p in per[u]]
        m, r = (sum(p[j] for p in pairs) / len(pairs) for j in (0, 1))
        if r > 0.5:
            gaps.append((m - 0.5) / (r - 0.5))
    assert len(gaps) == 3104
    got = evaluation.gap_interval(model, ref, users, n_boot=40000)
    assert got["lo"] == pytest.approx(np.quantile(gaps, 0.025, method="inverted_cdf"), abs=0.03)
    assert got["hi"] == pytest.approx(np.quantile(gaps, 0.975, method="inverted_cdf"), abs=0.03)


def logp(model, ctx, y):
    """Summed log-prob of y after ctx, the sequence run alone (brute force)."""
    with torch.no_grad():
        lp = model(torch.tensor([ctx + y]))[0][0].double().log_softmax(-1)
    return sum(lp[len(ctx) - 1 + t, y[t]].item() for t in range(len(y)))


def brute_margin(policy, ref, tok, ctx, q):
    """The pair's margin log(pi/ref)(y_w) - log(pi/ref)(y_l) after the context ids ctx (ref
    None: the raw log-prob margin)."""
    y_w, y_l = (tok.encode(f"## Preferred Response\n{y}") + [tok.eot_id] for y in (q.chosen, q.rejected))
    ref_margin = 0.0 if ref is None else logp(ref, ctx, y_w) - logp(ref, ctx, y_l)
    return logp(policy, ctx, y_w) - logp(policy, ctx, y_l) - ref_margin


def plain_prompt(shots, q):
    """The FSPO prompt of a query after its shots, written out by hand (the paper's markdown),
    as byte ids."""
    text = "".join(f"# Example {i}\n## Question\n{s.prompt}\n## Preferred Response\n{s.chosen}\n"
                   f"## Dispreferred Response\n{s.rejected}\n" for i, s in enumerate(shots, 1))
    return list(f"{text}# Task\nGiven the examples above, generate a preferred response to the "
                f"following question.\n## Question\n{q.prompt}\n".encode())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_pair_accuracy_counts_against_brute_force(k):
    """Curve hits over the held-out stream equal a loop that writes each episode's prompt by
    hand (the paper's markdown), encodes it byte by byte and scores chosen and rejected as
    two plain sequences; curve_episodes picks how many pairs."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})  # one token per byte
    rows = [Pref(f"u{u}", f"q{i}?", f"yes {u}{i}", f"no {i}{u}", "test")
            for u in range(12) for i in range(3)]
    torch.manual_seed(0)
    policy, ref = (GPT(GPTConfig(block_size=512, vocab_size=tok.n_vocab, n_layer=1, n_head=2,
                                 n_embd=16)).eval() for _ in range(2))
    args = Namespace(batch_size=2, seed=0, curve_episodes=0, curve_epochs=1, dtype="fp32")
    hits, eps = evaluation.curve_hits(policy.token_logprobs, ref.token_logprobs, tok, by_user(rows),
                                       k, 2, args, 512, "cpu")
    assert len(hits) == len(eps) == 12  # 12 users x 1 episode of 2 shots + a query

    stream = data.EpisodeStream(tok, by_user(rows), None, "fspo", 2, 2, 256, 17)

    def brute(first_batch):  # the hits of one epoch's 12 episodes, each prompt written by hand
        stream.batch(first_batch)  # draws the epoch's episodes: which rows are shots is the stream's choice
        want = []
        for shots, q in stream.episodes[:12]:
            ctx = plain_prompt(shots[:k], q)
            y_w, y_l = (list(f"## Preferred Response\n{y}".encode()) + [tok.eot_id] for y in (q.chosen, q.rejected))
            want.append(logp(policy, ctx, y_w) - logp(ref, ctx, y_w) > logp(policy, ctx, y_l) - logp(ref, ctx, y_l))
        return want, list(stream.episodes[:12])

    want, drawn = brute(0)
    assert [q for _, q in eps] == [q for _, q in drawn]  # the episodes scored are the ones brute-forced
    assert hits.tolist() == want and 0 < sum(want) < 12  # a mix, so a flipped sign would show
    # two epochs: the next epoch's draw, every row again among new shots
    args.curve_epochs = 2
    hits2, eps2 = evaluation.curve_hits(policy.token_logprobs, ref.token_logprobs, tok, by_user(rows),
                                        k, 2, args, 512, "cpu")
    want2, drawn2 = brute(stream.per_epoch)
    assert [q for _, q in eps2] == [q for _, q in drawn + drawn2] and hits2.tolist() == want + want2
    assert {(q.user_id, q.prompt) for _, q in drawn2} != {(q.user_id, q.prompt) for _, q in drawn}  # other queries
    args.curve_epochs = 1
    # a policy scored against itself: every margin exactly 0, a tie on every pair, chance
    same = evaluation.curve_hits(policy.token_logprobs, policy.token_logprobs, tok, by_user(rows),
                                 k, 2, args, 512, "cpu")[0]
    assert same.tolist() == [0.5] * 12
    args.curve_episodes = 3  # rounded up to whole batches, whatever curve_epochs
    args.curve_epochs = 2
    assert len(evaluation.curve_hits(policy.token_logprobs, ref.token_logprobs, tok, by_user(rows),
                                     k, 2, args, 512, "cpu")[0]) == 4


def test_elix_split_scores_each_query_with_the_users_ordinary_shots(monkeypatch):
    """by_difficulty: each held-out episode's query pair scored after its N shots, whatever their
    difficulty, the figures split by the query's tag; brute force over the same episodes. Few-shot
    prompted: the SFT's margin with the shots minus its margin without. The reference learner's
    row: its credit on the same episodes and N shots, split the same way."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    rows = [Pref(f"u{u}", f"q{i}?", f"yes {u}{i}", f"no {i}{u}", "test", {"difficulty": "easy" if i % 2 else "hard"})
            for u in range(8) for i in range(6)]
    torch.manual_seed(2)
    sft, fspo = (GPT(GPTConfig(block_size=512, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
                 for _ in range(2))
    args = Namespace(batch_size=2, seed=0, curve_episodes=0, curve_epochs=1, dtype="fp32")
    # a stand-in learner whose credit names the episode: its shots' questions and the query's
    fake = lambda domain, shots, q, w, l2: float(sum(int(s.prompt[1]) for s in shots) + int(q.prompt[1]) > 6)
    monkeypatch.setattr(evaluation.judge, "reference_pair_credit", fake)
    got = evaluation.by_difficulty({"sft": sft, "fspo": fspo}, by_user(rows), sft.token_logprobs, tok, args, "cpu", 2,
                                   reference=("roleplay", None))
    stream = data.EpisodeStream(tok, by_user(rows), None, "fspo", 2, 2, 512, args.seed + 17)
    stream.batch(0)
    hits, users = {"easy": [], "hard": []}, {"easy": [], "hard": []}
    for shots, q in stream.episodes:  # 8 users x 2 episodes of 2 shots + a query
        d = q.tags["difficulty"]
        hits[d].append(brute_margin(fspo, sft, tok, plain_prompt(shots, q), q) > 0)
        users[d].append(q.user_id)
    assert len(hits["easy"]) + len(hits["hard"]) == 16 and hits["easy"] and hits["hard"]
    for d in ("easy", "hard"):
        assert got["fspo"][d] == evaluation.interval(hits[d], users[d], items=True)
    # prompted: the SFT after the shots against the SFT after none, the same episodes
    read = {"easy": [], "hard": []}
    for shots, q in stream.episodes:
        with_shots, bare = (brute_margin(sft, None, tok, plain_prompt(s, q), q) for s in (shots, []))
        read[q.tags["difficulty"]].append(with_shots - bare > 0)
    assert 0 < sum(read["easy"] + read["hard"]) < 16  # a mix: a flipped sign would show
    for d in ("easy", "hard"):
        assert got["prompted"][d] == evaluation.interval(read[d], users[d], items=True)
    learner = {d: [fake(None, shots, q, None, None) for shots, q in stream.episodes if q.tags["difficulty"] == d]
               for d in ("easy", "hard")}
    assert 0 < sum(learner["easy"] + learner["hard"]) < 16
    for d in ("easy", "hard"):
        assert got["reference"][d] == evaluation.interval(learner[d], users[d], items=True)
    assert list(got) == ["prompted", "fspo", "reference"]
    # the point of the split: a hard query may follow easy shots (the user's ordinary ones)
    assert any(q.tags["difficulty"] == "hard" and any(s.tags["difficulty"] == "easy" for s in shots)
               for shots, q in stream.episodes)


def test_pooled_row_of_the_curve_is_scored_without_shots():
    """Pooled IPO is trained on the question alone: every column of its curve row is its
    no-shot accuracy on the same queries, while FSPO's columns (IPO and DPO) use k shots."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    rows = [Pref(f"u{u}", f"q{i}?", f"yes {u}{i}", f"no {i}{u}", "test") for u in range(12) for i in range(3)]
    torch.manual_seed(1)
    sft, fspo, dpo, pooled = (GPT(GPTConfig(block_size=512, vocab_size=tok.n_vocab, n_layer=1, n_head=2,
                                            n_embd=16)).eval() for _ in range(4))
    with torch.no_grad():  # sharper attention, so that shots in the context move the margins
        for p in [*fspo.parameters(), *dpo.parameters(), *pooled.parameters()]:
            p.mul_(4)
    args = Namespace(batch_size=2, seed=0, curve_episodes=0, curve_epochs=1, dtype="fp32", no_progress=True)
    held = by_user(rows)
    out = evaluation.curve_rows({"sft": sft, "fspo": fspo, "fspo-dpo": dpo, "pooled": pooled}, held,
                                sft.token_logprobs, tok, args, "cpu", 2, None, "curve")
    hits = lambda m, k: evaluation.curve_hits(m.token_logprobs, sft.token_logprobs, tok, held, k, 2,
                                              args, 512, "cpu")[0]
    users = [q.user_id for _, q in evaluation.curve_hits(pooled.token_logprobs, sft.token_logprobs, tok,
                                                         held, 0, 2, args, 512, "cpu")[1]]
    assert hits(pooled, 2).tolist() != hits(pooled, 0).tolist()  # shots would change its figure
    for k in (0, 1, 2):
        assert out["pooled"][k] == evaluation.interval(hits(pooled, 0).tolist(), users)
        assert out["fspo"][k] == evaluation.interval(hits(fspo, k).tolist(), users)
        assert out["fspo-dpo"][k] == evaluation.interval(hits(dpo, k).tolist(), users)  # FSPO with DPO reads shots too


def test_axis_reading_recovers_planted_coefficients():
    """Margins built from known coefficients by hand: a taste held for everyone on axes 0 and 1,
    reading the user's weight on axis 2 only; axis 3 never differs. The fit returns exactly
    those numbers, and the bootstrap over users (noise-free) collapses onto them."""
    rng = np.random.default_rng(0)
    d = rng.choice([-2.0, 0.0, 2.0], size=(60, 4))
    d[:, 3] = 0.0
    w = rng.normal(size=(60, 4))
    margins = [0.7 * a[0] - 0.3 * a[1] + 1.5 * a[2] * b[2] + 0.2 for a, b in zip(d, w)]
    got = evaluation.axis_reading(("a", "b", "c", "never"), d, w, margins, [i // 3 for i in range(60)], n_boot=50)
    assert [round(got[a]["pop"], 6) for a in "abc"] == [0.7, -0.3, 0.0]
    assert [round(got[a]["read"], 6) for a in "abc"] == [0.0, 0.0, 1.5]
    assert got["c"]["lo"] == pytest.approx(1.5) and got["c"]["hi"] == pytest.approx(1.5)
    assert got["never"]["differs"] == 0.0 and got["a"]["differs"] == pytest.approx(np.mean(d[:, 0] != 0))


def test_note_nll_splits_shot_notes_from_the_description_and_averages_per_token():
    """eval.py --notes: nats per token of the shot notes and of each row's last note (the user
    description), against each note scored alone after its context prefix."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    eps = []
    for n in (2, 3):
        e = data.Episode(tok.encode("x" * 10 * n), tok.encode("ok"), tok.encode("no"), n)
        e.notes = [(10 * j, tok.encode(f"shot {j}")) for j in range(1, n)] + [(10 * n, tok.encode("user!"))]
        eps.append(e)
    got = evaluation.note_nll(model.token_logprobs, tok, eps, batch_size=2)  # rows of 2 and 3 notes
    want = {"shot": [], "user": []}
    with torch.no_grad():
        for e in eps:
            for j, (end, ids) in enumerate(e.notes):
                lp = torch.log_softmax(model(torch.tensor([e.ctx[:end] + ids]))[0][0].double(), -1)
                key = "user" if j == len(e.notes) - 1 else "shot"
                want[key] += [-lp[end - 1 + i, t].item() for i, t in enumerate(ids)]
    for k in ("shot", "user"):
        assert got[k] == pytest.approx(sum(want[k]) / len(want[k]), rel=1e-5)


class LengthWriter:
    """A stand-in for an --annotate model: every line it writes names the length of the
    prompt it was written after, so a line written at the wrong place shows."""
    def __init__(self, tok, block_size):
        self.tok, self.config = tok, GPTConfig(block_size=block_size)

    def eval(self):
        return self

    def generate(self, prompts, max_new_tokens, temperature=0.0, eos_id=None):
        return [self.tok.encode(f"L{len(p)}\n# rest")[:max_new_tokens] for p in prompts]


def annotated_by_hand(shots, question, tok):
    """The prompt with each line written after exactly the text before it (brute force)."""
    text = ""
    for i, s in enumerate(shots, 1):
        text += (f"# Example {i}\n## Question\n{s.prompt}\n## Preferred Response\n{s.chosen}\n"
                 f"## Dispreferred Response\n{s.rejected}\n## Example Contrast\n")
        text += f"L{len(tok.encode(text))}\n"
    if shots:
        text += "# User Description\n"
        text += f"L{len(tok.encode(text))}\n"
    return text + (f"# Task\nGiven the examples above, generate a preferred response to the "
                   f"following question.\n## Question\n{question}\n")


def test_written_annotations_follow_each_shot_and_drop_the_oldest_to_fit():
    """eval.written_prompts: the writer writes each shot's line after that shot and the tally
    after all of them, as the judge's lines sit in training; a prompt over its room loses its
    oldest shot and is written anew; with no room left to write, the same."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    shots = [Pref("u", f"q{i}?", f"yes {i}", f"no {i}") for i in range(3)]
    args = Namespace(gen_batch=2, device="cpu", dtype="fp32")
    full = annotated_by_hand(shots, "why?", tok)
    items = [(shots, "why?"), (shots[:1], "how?"), ([], "what?")]
    got = evaluation.written_prompts(LengthWriter(tok, 4096), tok, items, [10_000] * 3, args)
    assert got == [tok.encode(full), tok.encode(annotated_by_hand(shots[:1], "how?", tok)),
                   tok.encode(annotated_by_hand([], "what?", tok))]
    two = annotated_by_hand(shots[1:], "why?", tok)
    assert evaluation.written_prompts(LengthWriter(tok, 4096), tok, items[:1], [len(full) - 1], args) == \
        [tok.encode(two)]
    # a writer block too short to write the third shot's line: two shots, renumbered
    third = full.rindex("## Example Contrast\n") + len("## Example Contrast\n")  # its prefix
    short = LengthWriter(tok, third - 1 + evaluation.ANNOTATION_TOKENS)
    assert evaluation.written_prompts(short, tok, items[:1], [10_000], args) == [tok.encode(two)]
    with pytest.raises(ValueError, match="does not fit"):
        evaluation.written_prompts(LengthWriter(tok, 4096), tok, [([], "what?")], [5], args)


def test_tally_prompts_count_the_lines_written_after_each_shot_alone():
    """eval.Writer.prompts, tally_prompts (--annotate tally): the writer sees each shot alone, as "Example 1",
    once however many items hold it, and its lines, read back, are counted into the tally; a
    term it does not know counts nothing; no shots: the bare question."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    said = {"q0?": "Prefers: formal, lists.", "q1?": "Prefers: formal.", "q2?": "Prefers: casual, jokes."}
    seen = []

    class LinesWriter(LengthWriter):
        def generate(self, prompts, max_new_tokens, temperature=0.0, eos_id=None):
            texts = [self.tok.decode(p) for p in prompts]
            seen.extend(texts)
            return [self.tok.encode(next(v for k, v in said.items() if k in x) + "\n# rest") for x in texts]

    shots = [Pref("u", f"q{i}?", f"yes {i}", f"no {i}") for i in range(3)]
    args = Namespace(gen_batch=2, device="cpu", dtype="fp32")
    writer = evaluation.Writer(LinesWriter(tok, 4096), "roleplay")
    got = writer.prompts(tok, [(shots, "why?"), (shots[2:], "how?"), ([], "what?")], [10_000] * 3, args)
    task = lambda q: f"# Task\n{data.INSTRUCTION}\n## Question\n{q}\n"
    # formal +1 +1 -1 = 1, lists +1: a tie, in the judge's axis order; "jokes" is no term
    assert [tok.decode(ids) for ids in got] == [
        "# User Description\nPrefers: formal, lists.\n" + task("why?"),
        "# User Description\nPrefers: casual.\n" + task("how?"), task("what?")]
    # each shot written once, alone: the second item's shot is the first's third, read from the cache
    assert sorted(seen) == sorted(data.format_shot(1, s) + "## Example Contrast\n" for s in shots)


def test_fit_thresholds_picks_the_dead_zone_that_matches_the_judge():
    """Three axes, each with one dead zone that agrees with the judge on every shot (checked by
    hand): readings whose true sign is 0 within 0.3 of 0 and the others beyond 1; every sign
    true, the smallest reading 0.01 (no dead zone at all); the judge never separating the
    answers (the axis never named)."""
    x = np.array([[2.0, 0.01, 0.4], [-1.2, -0.5, -2.0], [0.1, 2.0, 0.3], [-0.3, -1.0, 2.5], [1.1, 0.2, -0.2]])
    truth = np.array([[1, 1, 0], [-1, -1, 0], [0, 1, 0], [0, -1, 0], [1, 1, 0]])
    taus = evaluation.fit_thresholds(x, truth)
    assert (evaluation.named(x, taus) == truth).all()
    assert 0.3 <= taus[0] < 1.1 and taus[1] == 0.0 and taus[2] == np.inf


def test_a_reader_counts_what_the_policy_reads_off_each_shot():
    """eval.Reader: each shot read under two one-term tallies per axis by the policy's own
    log-prob margins (the prompts written out by hand, each pair scored alone), the axes whose
    reading clears the fitted threshold named in the shot's line, and the lines counted into
    the tally."""
    import judge
    tok, rows, users, policy, _, args = judge_curve_setup(3)
    args.gen_batch = 5
    axes = judge.JUDGES["roleplay"].axes
    with torch.no_grad():  # readings of order 1 rather than 1e-3: thresholds well clear of float noise
        for p in policy.parameters():
            p.mul_(4)

    def by_hand(s):
        one = lambda a, v: tok.encode(f"# User Description\n{judge.count_line('roleplay', {a: v})}\n"
                                      f"# Task\n{data.INSTRUCTION}\n## Question\n{s.prompt}\n")
        return np.array([brute_margin(policy, None, tok, one(a, 1), s) - brute_margin(policy, None, tok, one(a, -1), s)
                         for a in axes])

    got = evaluation.shot_readings(policy, tok, "roleplay", rows[:2], args).numpy()
    assert np.allclose(got, [by_hand(s) for s in rows[:2]], atol=1e-3)
    reader = evaluation.Reader(policy, "roleplay", fit_rows=rows[2:])
    prompts = reader.prompts(tok, [(rows[:2], "why?")], [10_000], args)
    truth = np.array([[judge.shot_counts("roleplay", [s]).get(a, 0) for a in axes] for s in rows[2:]])
    taus = evaluation.fit_thresholds(np.array([by_hand(s) for s in rows[2:]]), truth)
    assert np.allclose(reader.taus, taus, atol=1e-3)
    said = [{a: int(np.sign(v)) for a, v, t in zip(axes, by_hand(s), taus) if abs(v) > t} for s in rows[:2]]
    assert any(said)  # some axis named: a reader that ignored its readings would say nothing
    assert tok.decode(prompts[0]) == (f"# User Description\n{judge.count_line('roleplay', judge.summed(said))}\n"
                                      f"# Task\n{data.INSTRUCTION}\n## Question\nwhy?\n")
    # a cot policy is read on its own completions: the one-term tally as its description, then the answer
    def cot_by_hand(s):
        def margin(a, v):
            ctx = tok.encode(f"# User Description\n{judge.count_line('roleplay', {a: v})}\n"
                             f"# Task\n{data.INSTRUCTION}\n## Question\n{s.prompt}\n")
            y_w, y_l = (tok.encode(f"## User Description\n{judge.count_line('roleplay', {a: v})}\n"
                                   f"## Preferred Response\n{y}") + [tok.eot_id] for y in (s.chosen, s.rejected))
            return logp(policy, ctx, y_w) - logp(policy, ctx, y_l)
        return np.array([margin(a, 1) - margin(a, -1) for a in axes])

    got = evaluation.shot_readings(policy, tok, "roleplay", rows[:2], args, method="cot").numpy()
    want = [cot_by_hand(s) for s in rows[:2]]
    assert np.allclose(got, want, atol=1e-3) and not np.allclose(want, [by_hand(s) for s in rows[:2]], atol=1e-2)


def test_a_reader_reads_an_elix_level_under_each_level_line():
    """ELIX: a level has no opposite term, so the reader scores a shot under "Level: L." for
    each level and reads level L as that margin minus the mean over the levels (written out
    by hand, each pair scored alone); the style axes as on roleplay. The lines the reader
    writes are counted with each shot's levels as votes (judge.line_counts)."""
    import judge
    tok, _, _, policy, _, args = judge_curve_setup(1)
    args.gen_batch = 4
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(4)
    kid, pro = "Imagine gravity, a giant toy.", "Gravity denotes coupling, formally."
    shots = [Pref("u", "explain gravity", kid, pro, "train"), Pref("u", "explain gravity", pro, kid, "train")]
    ctx = lambda line, s: tok.encode(f"# User Description\n{line}\n# Task\n{data.INSTRUCTION}\n## Question\n{s.prompt}\n")

    def by_hand(s):
        style = [brute_margin(policy, None, tok, ctx(f"Prefers: {plus}.", s), s)
                 - brute_margin(policy, None, tok, ctx(f"Prefers: {minus}.", s), s)
                 for plus, minus in (("examples", "abstract"), ("detailed", "brief"))]
        level = np.array([brute_margin(policy, None, tok, ctx(f"Level: {lv}.", s), s) for lv in judge.EX_LEVELS])
        return np.concatenate([style, level - level.mean()])

    got = evaluation.shot_readings(policy, tok, "elix", shots, args).numpy()
    assert got.shape == (2, 7) and np.allclose(got, [by_hand(s) for s in shots], atol=1e-3)
    assert np.abs(got[:, 2:]).max() > 1e-2  # the level lines move the margins: not a vacuous match
    # the reader names one level each way, the highest read and the lowest, as the judge's
    # contrast does (every nonzero reading named here: thresholds 0)
    reader = evaluation.Reader(policy, "elix", taus=np.zeros(7))
    prompts = reader.prompts(tok, [(shots, "explain gravity")], [10_000], args)
    said = [{**{a: int(np.sign(v)) for a, v in zip(("example", "detail"), row[:2]) if v},
             judge.EX_LEVELS[row[2:].argmax()]: 1, judge.EX_LEVELS[row[2:].argmin()]: -1} for row in got]
    assert tok.decode(prompts[0]).startswith(f"# User Description\n{judge.count_line('elix', judge.line_counts('elix', said))}\n")


def test_one_level_each_way_keeps_the_highest_and_lowest_level_reading():
    """An elix shot's level block becomes +spread at its highest reading and -spread at its lowest,
    0 elsewhere; the style columns, and a domain with no levels, pass through."""
    x = np.array([[0.5, -1.0, 0.9, 0.2, -0.3, -0.5, -0.3],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    want = np.array([[0.5, -1.0, 1.4, 0.0, 0.0, -1.4, 0.0], [0.0] * 7])
    assert np.allclose(evaluation.one_level_each_way(x, 2), want)
    assert np.array_equal(evaluation.one_level_each_way(x[:, :2], 2), x[:, :2])


def test_annotated_curve_scores_the_written_prompts():
    """curve_margins with a writer: each episode's margin is its pair scored after the
    written prompt, the sequences run alone (brute force)."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    rows = [Pref(f"u{u}", f"q{i}?", f"yes {u}{i}", f"no {i}{u}", "test") for u in range(6) for i in range(3)]
    torch.manual_seed(0)
    policy, ref = (GPT(GPTConfig(block_size=1024, vocab_size=tok.n_vocab, n_layer=1, n_head=2,
                                 n_embd=16)).eval() for _ in range(2))
    args = Namespace(batch_size=2, seed=0, curve_episodes=0, curve_epochs=1, dtype="fp32", gen_batch=4, device="cpu")
    margins, eps = evaluation.curve_margins(policy.token_logprobs, ref.token_logprobs, tok, by_user(rows),
                                            2, 2, args, 1024, "cpu", writer=evaluation.Writer(LengthWriter(tok, 1024)))

    assert len(eps) == 6
    for m, (shots, q) in zip(margins.tolist(), eps):
        ctx = tok.encode(annotated_by_hand(shots, q.prompt, tok))
        assert abs(m - brute_margin(policy, ref, tok, ctx, q)) < 1e-3


def judge_curve_setup(n_questions):
    """Four formality users whose pairs set "Certainly" against "Hey ... Ha!" either way round,
    and a tiny random policy and reference, for the curves annotated by the judge."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    formal, casual = (lambda i: f"Certainly, fine {i}."), (lambda i: f"Hey, fine {i}. Ha!")
    rows = [Pref(f"u{u}", f"Tell me about q{i}?", *((formal(i), casual(u)) if (u + i) % 3 else
                                                    (casual(i), formal(u))), "test")
            for u in range(4) for i in range(n_questions)]
    users = {f"u{u}": {"domain": "roleplay", "traits": {"formality": 1.0}} for u in range(4)}
    torch.manual_seed(0)
    policy, ref = (GPT(GPTConfig(block_size=1024, vocab_size=tok.n_vocab, n_layer=1, n_head=2,
                                 n_embd=16)).eval() for _ in range(2))
    args = Namespace(batch_size=2, seed=0, curve_episodes=0, curve_epochs=1, dtype="fp32", device="cpu")
    return tok, rows, users, policy, ref, args


def test_judge_annotated_curve_scores_the_judges_lines_by_hand():
    """curve_margins with judge_users (the report's row of the judge's annotations): each
    margin is the pair scored after the shots, each followed by the judge's contrast, and
    their tally, the prompt written out here by hand."""
    import judge
    tok, rows, users, policy, ref, args = judge_curve_setup(3)
    margins, eps = evaluation.curve_margins(policy.token_logprobs, ref.token_logprobs, tok, by_user(rows),
                                            2, 2, args, 1024, "cpu", judge_users=users)

    lines = set()
    assert len(eps) == 4
    for m, (shots, q) in zip(margins.tolist(), eps):
        text = "".join(f"{data.format_shot(i, s)}## Example Contrast\n"
                       f"{judge.contrast_summary('roleplay', s.prompt, s.chosen, s.rejected)}\n"
                       for i, s in enumerate(shots, 1))
        tally = judge.contrast_tally("roleplay", shots)
        lines.add(tally)
        ctx = tok.encode(text + f"# User Description\n{tally}\n# Task\n{data.INSTRUCTION}\n## Question\n{q.prompt}\n")
        assert abs(m - brute_margin(policy, ref, tok, ctx, q)) < 1e-3
    assert len(lines) > 1  # the tallies differ between episodes: the lines are the shots' own


def test_judge_tally_curve_scores_the_counted_tally_by_hand():
    """curve_margins with judge_users and annotate="tally" (the report's row of the judge's
    counts for an --annotate tally FSPO): each margin is the pair scored after the counted
    tally and the question alone, the prompt written out here by hand."""
    tok, rows, users, policy, ref, args = judge_curve_setup(4)
    margins, eps = evaluation.curve_margins(policy.token_logprobs, ref.token_logprobs, tok, by_user(rows),
                                            3, 3, args, 1024, "cpu", judge_users=users, annotate="tally")
    words = {"Certainly": ("formal", "serious"), "Hey": ("casual", "humorous")}
    tallies = set()
    for m, (shots, q) in zip(margins.tolist(), eps):
        sides = [words[s.chosen.split(",")[0]] for s in shots]  # each shot leans both axes one way
        net = sum(1 if side[0] == "formal" else -1 for side in sides)
        named = ["formal", "serious"] if net > 0 else ["casual", "humorous"]
        tally = "Prefers: " + ", ".join([named[0]] * abs(net) + [named[1]] * abs(net)) + "." if net else "Prefers: nothing."
        tallies.add(tally)
        ctx = tok.encode(f"# User Description\n{tally}\n# Task\n{data.INSTRUCTION}\n## Question\n{q.prompt}\n")
        assert abs(m - brute_margin(policy, ref, tok, ctx, q)) < 1e-3
    assert len(tallies) > 1


def test_paper_tables_set_each_cell_beside_the_papers_and_check_its_orderings():
    """The paper-shaped tables: the cells are the results' figures, the paper's beside them; each
    ordering is judged by hand here: intervals apart, within them, reversed, tied."""
    iv = lambda rate, lo, hi, n=10: {"rate": rate, "lo": lo, "hi": hi, "n": n}
    role = {"oracle": iv(.9, .85, .95), "cot": iv(.7, .6, .8), "fspo": iv(.8, .75, .85), "pooled": iv(.5, .4, .6),
            "prompted": iv(.45, .4, .5), "base": iv(.5, .5, .5), "pref-ft": iv(.55, .5, .6)}
    elix = {"fspo": {"easy": iv(.7, .6, .8), "hard": iv(.6, .5, .7)}, "prompted": {"easy": iv(.5, .4, .6), "hard": iv(.6, .5, .7)},
            "reference": {"easy": iv(.9, .85, .95), "hard": iv(.95, .9, 1.)}}
    rev = lambda f: {"fspo": {"all": iv(f, f - .1, f + .1), "trained": iv(.7, .6, .8), "interpolated": iv(.8, .7, .9)},
                     "prompted": {"all": iv(.3, .2, .4)}}
    results = [{"domain": "roleplay", "shots": 8, "split": "test", "win_rate": {m: {"all": v} for m, v in role.items()}},
               {"domain": "elix", "shots": 4, "split": "test", "win_rate": {}, "pair_accuracy_by_difficulty": elix},
               {"domain": "reviews", "shots": 4, "split": "test", "win_rate": rev(.6)},
               {"domain": "reviews", "shots": 8, "split": "test", "win_rate": rev(.55)}]
    text = "\n".join(evaluation.paper_tables(results))
    assert "| FSPO (IPO) | 80.0 [75.0, 85.0] (n=10) | 82.6 |" in text
    assert "| few-shot prompted (SFT) | 50.0 [40.0, 60.0] | 60.0 [50.0, 70.0] | 92.4 / 81.4 | - |" in text
    assert "| reference learner (judge's features) | 90.0 [85.0, 95.0] | 95.0 [90.0, 100.0] | - | - |" in text
    assert "| FSPO (IPO) | 8 | 70.0 [60.0, 80.0] (n=10) | 80.0 [70.0, 90.0] (n=10) | 80.4 / 73.6 |" in text
    verdicts = dict(line.strip("| ").split(" | ")[::2] for line in text.split("orderings, here")[1].splitlines()
                    if line.startswith("| ") and not line.startswith("| ordering"))
    assert verdicts == {
        "roleplay: oracle description >= FSPO + user-description CoT": "holds, intervals apart",
        "roleplay: FSPO + user-description CoT > FSPO (IPO)": "reversed within the intervals",
        "roleplay: FSPO (IPO) > IPO, no user context (pooled)": "holds, intervals apart",
        "roleplay: IPO, no user context (pooled) > few-shot prompted (SFT)": "holds within the intervals",
        "roleplay: few-shot Pref-FT >= base": "holds within the intervals",
        "elix easy: FSPO (IPO) > few-shot prompted (SFT)": "holds within the intervals",
        "elix hard: FSPO (IPO) > few-shot prompted (SFT)": "tied",
        "elix: FSPO (IPO) easy > hard": "holds within the intervals",
        "reviews 4 shots: FSPO (IPO) > few-shot prompted (SFT)": "holds, intervals apart",
        "reviews 4 shots: FSPO (IPO) trained > interpolated users": "reversed within the intervals",
        "reviews 8 shots: FSPO (IPO) > few-shot prompted (SFT)": "holds, intervals apart",
        "reviews 8 shots: FSPO (IPO) trained > interpolated users": "reversed within the intervals",
        "reviews: FSPO (IPO) 8 shots >= 4 shots": "reversed within the intervals"}
    results[0]["win_rate"]["oracle"]["all"] = iv(.5, .45, .55)  # below cot's, apart
    assert "| roleplay: oracle description >= FSPO + user-description CoT | 50.0 vs 70.0 | reversed, intervals apart |" \
        in "\n".join(evaluation.paper_tables(results[:1]))


def test_diff_interval_resamples_the_users_of_either_side_together():
    """Exact reference: 3 users, the 27 equally likely resamples of them, each side's mean over
    the items of the users drawn (a draw with none of a side's users has no difference). Paired:
    two methods on the same items, whose difference is steadier than either; unpaired: sides of
    disjoint users, as trained vs interpolated. Verdicts: outside or within that interval."""
    def exact(a, b):
        diffs = []
        for pick in itertools.product(sorted(set(a["users"]) | set(b["users"])), repeat=3):
            drawn = [[v for u in pick for v, w in zip(x["values"], x["users"]) if w == u] for x in (a, b)]
            if all(drawn):
                diffs.append(np.mean(drawn[0]) - np.mean(drawn[1]))
        return np.quantile(diffs, [0.025, 0.975], method="inverted_cdf")
    users = ["a", "a", "b", "b", "c", "c"]
    a = evaluation.interval([1, 1, 0, 0, 1, 1], users, items=True)
    b = evaluation.interval([1, 0, 0, 0, 1, 1], users, items=True)
    d = evaluation.diff_interval(a, b, n_boot=20000)
    assert d["rate"] == pytest.approx(4 / 6 - 3 / 6)
    # [0, 0.5]; resampling the two sides apart would give [-0.5, 0.83]
    assert (d["lo"], d["hi"]) == pytest.approx(tuple(exact(a, b)), abs=0.02) == (0.0, 0.5)
    # disjoint users: in 30% of the 27 draws one side has none (more than 2.5%): no interval
    x = evaluation.interval([1, 1, 0], ["a", "a", "b"], items=True)
    y = evaluation.interval([0, 1], ["c", "c"], items=True)
    d = evaluation.diff_interval(x, y, n_boot=20000)
    assert d["rate"] == pytest.approx(2 / 3 - 1 / 2) and d["lo"] is None and d["hi"] is None
    assert evaluation.compare(x, y)[0] == "66.7 vs 50.0 (+16.7)"
    # 30 and 30 disjoint users: as resampling each side on its own (independent samples)
    rng = np.random.default_rng(1)
    xs, ys = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    x = evaluation.interval(xs, [f"x{i // 2}" for i in range(60)], items=True)
    y = evaluation.interval(ys, [f"y{i // 2}" for i in range(60)], items=True)
    px, py = xs.reshape(30, 2).mean(1), ys.reshape(30, 2).mean(1)  # per-user means, 2 items each
    draws = rng.integers(0, 30, (20000, 30))
    ref = np.quantile(px[draws].mean(1) - py[rng.integers(0, 30, (20000, 30))].mean(1), [0.025, 0.975])
    d = evaluation.diff_interval(x, y, n_boot=20000)
    assert d["rate"] == pytest.approx(xs.mean() - ys.mean()) and (d["lo"], d["hi"]) == pytest.approx(tuple(ref), abs=0.03)
    # verdicts: 40 users, each method scored on all: a clear win, a small one, a reversal
    many = [f"u{i}" for i in range(40)]
    iv = lambda wins: evaluation.interval([1] * wins + [0] * (40 - wins), many, items=True)
    assert evaluation.compare(iv(38), iv(10))[1] == "holds, outside the difference's interval (the intervals apart)"
    assert evaluation.compare(iv(22), iv(20))[1] == "holds, within the difference's interval"
    assert evaluation.compare(iv(20), iv(22), strict=False)[1] == "reversed, within the difference's interval"
    assert evaluation.compare(iv(20), iv(20))[1] == "tied"
    assert evaluation.compare(iv(22), iv(20))[0].startswith("55.0 vs 50.0 (+5.0 [")


def test_a_checkpoint_trained_on_older_texts_is_refused(tmp_path):
    """eval.load_models refuses an elix tally checkpoint saved before the tally stated its level
    (no text_format kept: format 1), naming it, and one marked format 2 (its tally said "no
    examples"); the same checkpoint marked format 4 loads; a roleplay one of format 1 is refused
    too, one of format 3 loads."""
    from model import save_model
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16))
    meta = lambda inputs: {"method": "fspo", "args": {"method": "fspo", "annotate": "tally", "shots": 4},
                           "tokenizer_sha256": tok.sha256, "inputs": inputs}
    for name, inputs in (("old", {}), ("two", {"text_format": 2}), ("new", {"text_format": 4}), ("rp", {"text_format": 3})):
        save_model(tmp_path / name / "fspo" / "ckpt", model, meta(inputs))
        save_model(tmp_path / name / "sft" / "ckpt", model, dict(meta({}), method="sft", args={"method": "sft"}))
    load = lambda name, domain: evaluation.load_models(
        {"sft": str(tmp_path / name / "sft"), "fspo": str(tmp_path / name / "fspo")}, tok, "t", "cpu", domain)
    with pytest.raises(ValueError, match=r"old/fspo was trained on texts of format 1, .* format 4"):
        load("old", "elix")
    with pytest.raises(ValueError, match=r"two/fspo was trained on texts of format 2, .* format 4"):
        load("two", "elix")
    with pytest.raises(ValueError, match=r"old/fspo was trained on texts of format 1, .* format 3"):
        load("old", "roleplay")
    assert "fspo" in load("new", "elix")[0] and "fspo" in load("rp", "roleplay")[0]


def test_eval_refuses_data_that_todays_generator_writes_otherwise(tmp_path, monkeypatch):
    """eval.py regenerates a generator folder with the settings of its stats.json and refuses it,
    naming the file, when today's judge labels it otherwise (here with ELIX's old level penalty,
    which grew with every level off); the same code passes it, and a prefs file of one's own (no
    stats.json) is taken."""
    import generate_synthetic as synth
    import judge
    synth.main(["--domain", "elix", "--out", str(tmp_path / "d"), "--scale", "tiny", "--seed", "5", "--workers", "1"])
    prefs = str(tmp_path / "d" / "elix" / "prefs.jsonl")
    evaluation.check_generated(prefs)
    own = tmp_path / "own.jsonl"
    own.write_bytes((tmp_path / "d" / "elix" / "prefs.jsonl").read_bytes())
    monkeypatch.setattr(judge, "LEVEL_FAR_W", judge.LEVEL_W)
    evaluation.check_generated(str(own))
    with pytest.raises(SystemExit, match=r"d/elix/prefs\.jsonl: not what generate_synthetic\.py"):
        evaluation.check_generated(prefs)
    with pytest.raises(SystemExit, match=r"elix/prefs\.jsonl: not what"):  # as eval.py's command line meets it
        evaluation.main(["--base", str(tmp_path / "none"), "--data", str(tmp_path / "d"), "--domain", "elix"])
    (tmp_path / "d" / "elix" / "users.jsonl").unlink()  # --users elsewhere: the pairs alone are compared
    with pytest.raises(SystemExit, match=r"elix/prefs\.jsonl: not what"):
        evaluation.check_generated(prefs)
    (tmp_path / "d" / "elix" / "stats.json").write_text('{"domain": "elix"}')  # one without its settings
    with pytest.raises(SystemExit, match=r"elix/stats\.json: not what"):
        evaluation.check_generated(prefs)


@pytest.mark.parametrize("temperature", [None, 0.9])
def test_win_rate_answers_are_greedy_or_sampled_with_each_methods_own_seed(temperature):
    """eval.win_rates: each method's answer is what GPT.generate writes for its prompt (greedy;
    or sampled at --temperature / --top-k from a generator seeded with --seed afresh for every
    method), called here directly, one prompt per batch, the longer prompt after the shorter."""
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    torch.manual_seed(0)
    models = {m: GPT(GPTConfig(block_size=256, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
              for m in ("sft", "fspo")}
    users = {f"u{u}": {"domain": "roleplay", "traits": {"formality": 1.0}} for u in range(2)}
    items = [(f"u{u}", Pref(f"u{u}", f"Tell me about q{u}?", "yes", "no", "test"),
              [Pref(f"u{u}", "Why?", "Because.", "No.", "test")]) for u in range(2)]
    args = Namespace(gen_batch=1, device="cpu", dtype="fp32", max_new_tokens=12, no_progress=True,
                     seed=5, temperature=temperature, top_k=7)
    res = {"win_rate": {}}
    evaluation.win_rates(models, ["base", "fspo"], items, users, tok, args, "roleplay", res)
    for m in ("base", "fspo"):
        model = models[data.method(m).model or m]
        prompts = [evaluation.prompt_ids(m, it, users, tok, 256 - 12) for it in items]
        g = torch.Generator().manual_seed(5)
        # eval.generate runs the prompts shortest first; with one per batch the draws follow that order
        order = sorted(range(2), key=lambda i: len(prompts[i]))
        want = {i: model.generate([prompts[i]], 12, temperature=temperature or 0.0, top_k=7, eos_id=tok.eot_id,
                                  generator=g)[0] for i in order}
        assert res["examples"][0][m] == tok.decode(want[0]).strip()  # the report keeps item 0's answers
    assert res["decoding"] == ("greedy" if not temperature else "sampled at temperature 0.9, top-k 7, seed 5")
