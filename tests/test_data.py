"""
Tests for data.py's rows, prompts and batches, each against an independent reference
(hand-written prompts, a two-sequence layout scored by a tiny transformer); the tokenizer's
are in test_tokenizer.py.

    python -m pytest -q tests/test_data.py
"""
import json
import math
import os
import random
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data
import judge
from model import GPT, GPTConfig
from data import (COMPLETION_HEADER, COT_HEADER, Episode, Pref, Tokenizer, by_user, encode_episode,
                  format_prompt, load_prefs, make_episodes, pack_batch,
                  pack_naive, pack_sft, sequence_logps)

# -----------------------------------------------------------------------------
# helpers

def byte_tok():
    """A tokenizer with no merges: one token per UTF-8 byte, so lengths are predictable."""
    return Tokenizer({bytes([i]): i for i in range(256)})

# -----------------------------------------------------------------------------
# preference files

def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path

def row(**kw):
    return {"user_id": "u1", "prompt": "q", "chosen": "a", "rejected": "b", **kw}

def test_load_prefs_defaults(tmp_path):
    p = write_lines(tmp_path / "prefs.jsonl", [row(split="test"), "", row(split="test", tags={"question_id": 3})])
    prefs = load_prefs(p)
    assert prefs == [Pref("u1", "q", "a", "b", "test", {}, f"{p}:1"),
                     Pref("u1", "q", "a", "b", "test", {"question_id": 3}, f"{p}:3")]

def test_rows_without_split_get_their_users_split(tmp_path):
    """By a hash of the user id: the same in every run and for every row of a user, about
    80 / 10 / 10 over many users (4,000 users: each share within 2 points)."""
    ids = [f"user-{i}" for i in range(4000)]
    p = write_lines(tmp_path / "prefs.jsonl", [row(user_id=u, chosen=c) for u in ids for c in "ac"])
    prefs = load_prefs(p)
    split = {r.user_id: r.split for r in prefs}
    assert all(r.split == split[r.user_id] for r in prefs)
    assert [r.split for r in load_prefs(p)] == [r.split for r in prefs]
    share = Counter(split.values())
    for s, want in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(share[s] / len(ids) - want) < 0.02, share

@pytest.mark.parametrize("bad,lineno,msg", [
    ('{"user_id": "u1", "prompt": ', 2, "invalid JSON"),
    ({"user_id": "u1", "prompt": "q", "rejected": "b"}, 2, "field 'chosen' is missing"),
    (row(prompt=3), 2, "field 'prompt' must be a non-empty string"),
    (row(rejected=""), 2, "field 'rejected' must be a non-empty string"),
    (row(tags=[1]), 2, "field 'tags'"),
    ("[1, 2]", 2, "expected a JSON object"),
    (row(rejected="a"), 2, "field 'rejected' equals 'chosen'"),
    (row(split="TEST"), 2, "field 'split' is 'TEST', not one of train, val, test"),
    (row(split="validation"), 2, "field 'split' is 'validation'"),
    (row(split="test"), 2, "field 'split': user 'u1' is 'test' here but 'train' at .*prefs.jsonl:1"),
    ('{"user_id": "u1", "prompt": "\\ud800", "chosen": "a", "rejected": "b"}', 2, "field 'prompt' holds a lone surrogate"),
])
def test_load_prefs_errors(tmp_path, bad, lineno, msg):
    p = write_lines(tmp_path / "prefs.jsonl", [row(split="train"), bad, row(split="train")])
    with pytest.raises(ValueError, match=f"prefs.jsonl:{lineno}: {msg}"):
        load_prefs(p)

def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_bytes(json.dumps(row(split="train")).encode() + b"\n" + b'{"user_id": "u\xff"}\n')
    with pytest.raises(ValueError, match="prefs.jsonl:2: not valid UTF-8"):
        load_prefs(p)

def test_a_row_too_long_for_the_block_fails_at_load(tmp_path):
    t = byte_tok()
    p = write_lines(tmp_path / "prefs.jsonl", [row(split="train"), row(split="train", chosen="x" * 300)])
    prefs = load_prefs(p)
    data.check_lengths(t, prefs[:1], 200)
    with pytest.raises(ValueError, match="prefs.jsonl:2: the row does not fit --block-size 200"):
        data.check_lengths(t, prefs, 200)

def test_training_and_evaluation_prompt_with_the_same_tokens():
    """A BPE that merges " \n" splits "? \n" differently when the header follows in the same
    string: the test-time prompt must be the training context plus the header's tokens."""
    import eval as evaluation
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b" \n"] = 256
    t = Tokenizer(ranks)
    shots = [Pref("u", "why? ", "because. ", "no. ")]
    query = Pref("u", "how so? ", "like this.", "not so.")
    e = encode_episode(t, shots, query, 1024)
    ids = evaluation.prompt_ids("fspo", ("u", query, shots), {"u": {}}, t, 1024)
    assert ids == e.ctx + e.chosen[:len(ids) - len(e.ctx)]
    assert t.decode(ids[len(e.ctx):]) == COMPLETION_HEADER

# -----------------------------------------------------------------------------
# prompts and episodes

def test_format_prompt_two_shots():
    shots = [Pref("u", "What is rain?", "Water falling.", "A mood."),
             Pref("u", "Why sleep?", "To rest.", "No reason.")]
    expected = ("# Example 1\n## Question\nWhat is rain?\n## Preferred Response\nWater falling.\n"
                "## Dispreferred Response\nA mood.\n"
                "# Example 2\n## Question\nWhy sleep?\n## Preferred Response\nTo rest.\n"
                "## Dispreferred Response\nNo reason.\n"
                "# Task\nGiven the examples above, generate a preferred response to the following question.\n"
                "## Question\nWhat is snow?\n")
    assert format_prompt(shots, "What is snow?") == expected
    assert format_prompt([], "Hi?", description="Likes brevity.") == (
        "# User Description\nLikes brevity.\n# Task\nGiven the examples above, generate a "
        "preferred response to the following question.\n## Question\nHi?\n")
    assert COMPLETION_HEADER == "## Preferred Response\n"

def make_prefs(sizes):
    return [Pref(f"u{u}", f"q{u}-{i}", f"c{u}-{i}", f"r{u}-{i}")
            for u, n in enumerate(sizes) for i in range(n)]

def test_make_episodes(capsys):
    prefs = make_prefs([11, 5, 2, 9, 4])
    users = by_user(prefs)
    eps = make_episodes(users, 4, random.Random(0))
    assert "skipped 2 of 5 users" in capsys.readouterr().out   # the users with 2 and 4 rows
    used = set()
    for shots, query in eps:
        assert len(shots) == 4 and query not in shots
        assert len({p.prompt for p in shots + [query]}) == 5    # no row twice in an episode
        assert {p.user_id for p in shots} == {query.user_id}
        used |= {p.prompt for p in shots + [query]}
    assert used == {p.prompt for p in prefs if p.user_id in ("u0", "u1", "u3")}
    assert len(eps) == 3 + 1 + 2                                # ceil(n / 5) per kept user
    # determinism by seed
    key = lambda eps: [([p.prompt for p in s], q.prompt) for s, q in eps]
    assert key(make_episodes(users, 4, random.Random(0))) == key(eps)
    assert key(make_episodes(users, 4, random.Random(1))) != key(eps)

def test_encode_episode_drops_oldest_shots():
    t = byte_tok()
    shots = [Pref("u", f"question {i}", f"good {i}", f"bad {i}") for i in range(3)]
    query = Pref("u", "the query", "the chosen answer", "no")
    chosen = list((COMPLETION_HEADER + query.chosen).encode()) + [t.eot_id]
    rejected = list((COMPLETION_HEADER + query.rejected).encode()) + [t.eot_id]
    full = len(format_prompt(shots, query.prompt).encode())
    e = encode_episode(t, shots, query, max_len=full + len(chosen) + 1)
    assert (e.n_shots, e.chosen, e.rejected) == (3, chosen, rejected)
    e = encode_episode(t, shots, query, max_len=full + len(chosen))        # one token short
    assert t.decode(e.ctx) == format_prompt(shots[1:], query.prompt)       # oldest shot gone
    assert (e.n_shots, e.chosen, e.rejected) == (2, chosen, rejected)
    bare = len(format_prompt([], query.prompt).encode())
    e = encode_episode(t, shots, query, max_len=bare + len(chosen) + 1)
    assert t.decode(e.ctx) == format_prompt([], query.prompt) and e.chosen == chosen
    with pytest.raises(ValueError, match="even with no shots"):
        encode_episode(t, shots, query, max_len=bare + len(chosen))

def test_methods_prompt_and_complete_as_the_table_says():
    t = byte_tok()
    shots = [Pref("u", f"question {i}", f"good {i}", f"bad {i}") for i in range(3)]
    query = Pref("u", "What is the secret to great chess?", "Certainly. plan chess.", "Hey! plan chess.")
    user = {"user_id": "u", "domain": "roleplay", "traits": {"formality": 1.5}, "group": "g"}
    desc = judge.trait_summary(user)
    e = encode_episode(t, shots, query, 10_000, name="oracle", user=user)
    assert t.decode(e.ctx) == format_prompt([], query.prompt, desc) and e.n_shots == 0
    assert t.decode(encode_episode(t, shots, query, 10_000, name="pooled").ctx) == \
        format_prompt([], query.prompt)
    e = encode_episode(t, shots, query, 10_000, name="cot", user=user)
    assert t.decode(e.ctx) == format_prompt(shots, query.prompt)
    assert t.decode(e.chosen[:-1]) == f"{COT_HEADER}{desc}\n{COMPLETION_HEADER}{query.chosen}"
    assert t.decode(e.rejected[:-1]) == f"{COT_HEADER}{desc}\n{COMPLETION_HEADER}{query.rejected}"

# -----------------------------------------------------------------------------
# packing

class TinyLM(nn.Module):
    """Minimal causal transformer with learned positions and an explicit boolean mask."""

    def __init__(self, vocab=20, n_embd=32, n_head=4, n_layer=2, block=64):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(n_embd), qkv=nn.Linear(n_embd, 3 * n_embd), proj=nn.Linear(n_embd, n_embd),
            ln2=nn.LayerNorm(n_embd), fc=nn.Linear(n_embd, 4 * n_embd), out=nn.Linear(4 * n_embd, n_embd),
        )) for _ in range(n_layer))
        self.ln_f, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab)

    def forward(self, idx, pos=None, mask=None):
        B, T = idx.shape
        pos = torch.arange(T).expand(B, T) if pos is None else pos
        mask = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else full_mask(mask)
        x = self.wte(idx) + self.wpe(pos)                                    # (B, T, C)
        for l in self.layers:
            q, k, v = l.qkv(l.ln1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))          # (B, nh, T, T)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + l.proj((att @ v).transpose(1, 2).reshape(B, T, -1))
            x = x + l.out(F.gelu(l.fc(l.ln2(x))))
        return self.head(self.ln_f(x))                                      # (B, T, V)

def full_mask(mask):
    """pack_batch's (B, 1, TR, T) mask of the last TR (tail) queries, under plain causal rows
    for the first T - TR (head) queries -> the whole (B, 1, T, T) mask."""
    B, _, TR, T = mask.shape
    head = torch.ones(T, T, dtype=torch.bool).tril()[:T - TR]             # (T-TR, T)
    return torch.cat([head.expand(B, 1, T - TR, T), mask], dim=2)

def token_logprobs(model, idx, targets, pos=None, mask=None):
    lp = F.log_softmax(model(idx, pos, mask), -1)                           # (B, T, V)
    lp = lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets != -1, lp, 0.0)                              # (B, T)

def random_episodes(r, n, vocab=20):
    toks = lambda lo, hi: [r.randrange(vocab - 1) for _ in range(r.randint(lo, hi))]
    eps = [Episode(toks(1, 20), toks(1, 12), toks(1, 12)) for _ in range(n)]
    eps[0] = Episode(toks(1, 1), toks(1, 1), toks(5, 5))                   # one-token ctx and chosen
    return eps

def test_pack_batch_labels_and_mask():
    eps = random_episodes(random.Random(0), 6)
    b = pack_batch(eps, pad_id=19)
    mask = full_mask(b["mask"])
    for i, e in enumerate(eps):
        labelled = b["targets"][i] != -1
        assert b["targets"][i][labelled].tolist() == e.chosen + e.rejected
        assert labelled.sum() == len(e.chosen) + len(e.rejected)
        seg = b["seg"][i]
        assert not labelled[(seg == 0) | (seg == 3)].any()             # never on context or pads
        # rejected never sees chosen; every query sees at least itself
        assert not mask[i, 0][seg == 2][:, seg == 1].any()
        assert mask[i, 0].diagonal().all()
        pos = b["pos"][i]
        Lc = len(e.ctx)
        assert pos[seg == 1].tolist() == list(range(Lc - 1, Lc + len(e.chosen)))
        assert pos[seg == 2].tolist() == list(range(Lc - 1, Lc + len(e.rejected)))
    # the context carries no labels: changing it leaves every labelled target as it was
    other = [Episode([(t + 7) % 19 for t in e.ctx], e.chosen, e.rejected) for e in eps]
    b2 = pack_batch(other, pad_id=19)
    assert torch.equal(b2["targets"], b["targets"])
    sft = pack_sft(eps, 49, which="chosen")
    assert sft["targets"][sft["seg"] == 2].eq(-1).all()
    assert torch.equal(sft["targets"][sft["seg"] == 1], b["targets"][b["seg"] == 1])

def test_shot_pairs_logps_equal_brute_force():
    """--shot-pairs: pair 0 is the query, pair k the k-th shot's chosen text in its slot against
    its rejected text in the same slot; each sum must equal the log-prob of that text after
    exactly the context before the slot, run alone with plain causal attention."""
    t = byte_tok()
    torch.manual_seed(0)
    model = TinyLM(vocab=257, block=512).eval()
    eps = []
    for u in range(3):  # 1, 2 and 3 shots in one batch
        shots = [Pref("u", f"q{u}{i}?", "yes " * (i + 1), f"no {u}{i}") for i in range(u + 1)]
        e = encode_episode(t, shots, Pref("u", "the query?", "ok", "not ok"), 10_000, shot_pairs=True)
        assert [t.decode(e.ctx[s:end]) for s, end, _ in e.shot_pairs] == [s.chosen for s in shots]
        eps.append(e)
    b = pack_batch(eps, pad_id=256)
    with torch.no_grad():
        lp = token_logprobs(model, b["idx"], b["targets"], b["pos"], b["mask"])
        got = data.pair_sums(lp, b, 5)
        for r, e in enumerate(eps):
            pairs = [(len(e.ctx), e.chosen, e.rejected)] + [(s, e.ctx[s:end], rej) for s, end, rej in e.shot_pairs]
            for k, (s, *texts) in enumerate(pairs):
                for side, y in enumerate(texts):
                    seq = e.ctx[:s] + y
                    targets = torch.tensor([[-1] * (s - 1) + y + [-1]])
                    want = token_logprobs(model, torch.tensor([seq]), targets).sum()
                    assert abs(got[side][r, k] - want) < 1e-4 * abs(want)
            assert (got[0][r, len(pairs):] == 0).all() and (got[1][r, len(pairs):] == 0).all()
    # without shot_pairs nothing changes: one pair, the query, summed exactly as before
    plain = pack_batch([encode_episode(t, shots, Pref("u", "q?", "a", "b"), 10_000)], pad_id=256)
    assert plain["pair"].max() == 0
    lp = token_logprobs(model, plain["idx"], plain["targets"], plain["pos"], plain["mask"]).detach()
    assert all(torch.equal(a[:, 0], b) for a, b in zip(data.pair_sums(lp, plain, 1),
                                                         sequence_logps(lp, plain["seg"])))

def test_describe_notes_score_each_note_after_its_context_prefix():
    """--describe: each note's log-probs equal those of ctx[:end] + note run alone; the pairs'
    sums are those of the batch without notes; the stream writes a contrast note after each
    shot (where the shot ends in ctx) and the (mirrored, under --mirror) user's traits last."""
    t = byte_tok()
    torch.manual_seed(0)
    model = TinyLM(vocab=257, block=512).eval()
    shots = [Pref("u", f"q{i}?", "yes " * (i + 1), f"no {i}") for i in range(2)]
    eps = [encode_episode(t, shots[:n], Pref("u", "the query?", "ok", "not ok"), 10_000, shot_pairs=True)
           for n in (1, 2)]
    plain = pack_batch(eps, pad_id=256)
    for e in eps:
        e.notes = [(end, t.encode(f"note {end}") + [256]) for end in (len(e.ctx) // 2, len(e.ctx))]
    b = pack_batch(eps, pad_id=256)
    with torch.no_grad():
        lp = token_logprobs(model, b["idx"], b["targets"], b["pos"], b["mask"])
        lp0 = token_logprobs(model, plain["idx"], plain["targets"], plain["pos"], plain["mask"])
        for got, want in zip(data.pair_sums(lp, b, 3), data.pair_sums(lp0, plain, 3)):
            torch.testing.assert_close(got, want)
        for r, e in enumerate(eps):
            for j, (end, ids) in enumerate(e.notes, 1):
                d = (b["seg"][r] == data.DESCRIBE) & (b["pair"][r] == -j) & (b["targets"][r] != -1)
                assert b["targets"][r][d].tolist() == ids
                seq = torch.tensor([e.ctx[:end] + ids])
                targets = torch.tensor([[-1] * (end - 1) + ids + [-1]])
                want = token_logprobs(model, seq, targets).sum()
                assert abs(lp[r][d].sum() - want) < 1e-4 * abs(want)
    users = {"u": {"domain": "roleplay", "traits": {"formality": 1.0, "humor": -2.0}}}
    rows = {"u": [Pref("u", f"Tell me about q{i}?", f"Certainly, fine {i}.", f"Hey, fine {i}. Ha!")
                  for i in range(6)]}
    for p, want in ((0.0, "Prefers: formal, serious."), (1.0, "Prefers: casual, humorous.")):
        stream = data.EpisodeStream(t, rows, users, "fspo", 2, 1, 10_000, 0, mirror=p, describe=True)
        e = stream.encode(rows["u"][:2], rows["u"][2], random.Random(0))
        shot = "Prefers: formal, serious." if p == 0 else "Prefers: casual, humorous."
        assert [t.decode(ids) for _, ids in e.notes] == \
            [data.SHOT_HEADER + shot + "<|endoftext|>"] * 2 + [COT_HEADER + want + "<|endoftext|>"]
        first = data.format_shot(1, rows["u"][0] if p == 0 else data.swapped(rows["u"][0]))
        assert [end for end, _ in e.notes] == [len(first), 2 * len(first), len(e.ctx)]
    assert not data.EpisodeStream(t, rows, users, "pooled", 2, 1, 10_000, 0, describe=True).describe
    # a block too short for both shots: the oldest is dropped, the kept one's note ends where it
    # does as Example 1, and the description, longer than the room the completions leave, is
    # left out rather than run past the block
    shot2 = data.format_shot(1, rows["u"][1])
    query = f"# Task\n{data.INSTRUCTION}\n## Question\n{rows['u'][2].prompt}\n"
    q = rows["u"][2]
    max_len = len(shot2) + len(query) + len(data.COMPLETION_HEADER) + max(len(q.chosen), len(q.rejected)) + 2
    stream = data.EpisodeStream(t, rows, users, "fspo", 2, 1, max_len, 0, describe=True)
    e = stream.encode(rows["u"][:2], rows["u"][2], random.Random(0))
    assert e.n_shots == 1 and len(e.ctx) == len(shot2) + len(query)
    assert [(end, t.decode(ids)) for end, ids in e.notes] == \
        [(len(shot2), data.SHOT_HEADER + "Prefers: formal, serious.<|endoftext|>")]
    assert all(end + len(ids) <= max_len for end, ids in stream.notes(t, rows["u"][1:2], e.ctx, users["u"], False))
    assert not data.EpisodeStream(t, rows, users, "sft", 2, 1, 10_000, 0, describe=True).encode(
        [], rows["u"][2], random.Random(0)).notes  # no shots: nothing to read, no note

def test_mirror_swaps_every_label_of_an_episode():
    """--mirror p: that share of episodes is the user's mirror image, chosen and rejected
    swapped in every shot and in the query; the rest are left as they were."""
    t = byte_tok()
    rows = {f"u{u}": [Pref(f"u{u}", f"q{u}{i}?", f"yes {u}{i}", f"no {u}{i}") for i in range(3)] for u in range(40)}
    flip = lambda p: Pref(p.user_id, p.prompt, p.rejected, p.chosen)
    shots, query = data.make_episodes(rows, 2, random.Random(0), report=False)[0]
    for p, want in ((0.0, (shots, query)), (1.0, ([flip(s) for s in shots], flip(query)))):
        stream = data.EpisodeStream(t, rows, None, "fspo", 2, 8, 10_000, 0, mirror=p)
        assert stream.encode(shots, query, random.Random(0)) == encode_episode(t, want[0], want[1], 10_000)
    half = data.EpisodeStream(t, rows, None, "fspo", 2, 8, 10_000, 0, mirror=0.5)
    r = random.Random(1)
    mirrored = sum(half.encode(shots, query, r).chosen == encode_episode(t, [], flip(query), 10_000).chosen
                   for _ in range(400))
    assert 150 < mirrored < 250
    for name in ("pooled", "oracle", "cot", "pref-ft", "sft"):  # no shots to read, or told the user
        assert data.EpisodeStream(t, rows, None, name, 2, 8, 10_000, 0, mirror=1.0).mirror == 0.0

def test_pack_sft_context_labels_every_next_token():
    """context=True: by position, the labels are exactly the naive row ctx + chosen shifted by
    one (the context predicts itself and the first completion token), and the rejected
    segment keeps its own labels."""
    eps = random_episodes(random.Random(3), 5)
    b, plain = pack_sft(eps, 49, context=True), pack_sft(eps, 49)
    for r, e in enumerate(eps):
        row = e.ctx + e.chosen
        n = len(row)
        # positions 0..n-2 hold ctx + chosen[:-1]; their labels are row[1:]
        assert b["targets"][r, :n - 1].tolist() == row[1:]
        assert b["targets"][r, n - 1] == -1  # the last chosen token predicts nothing
    two = b["seg"] == 2
    assert torch.equal(b["targets"][two], plain["targets"][two])

def test_pack_naive_labels():
    eps = random_episodes(random.Random(1), 4)
    n = pack_naive(eps, pad_id=19)
    assert n["idx"].shape[0] == 8 and n["mask"] is None and n["pos"] is None
    for i, e in enumerate(eps):
        for row, y in ((i, e.chosen), (i + len(eps), e.rejected)):
            assert n["targets"][row][n["targets"][row] != -1].tolist() == y
            L = len(e.ctx) + len(y)
            assert n["idx"][row, :L].tolist() == e.ctx + y     # target t is the token at t+1
            assert torch.equal(n["targets"][row, len(e.ctx) - 1:L - 1], n["idx"][row, len(e.ctx):L])

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_packed_logps_equal_naive(dtype, tol):
    torch.manual_seed(0)
    model = TinyLM().to(dtype).eval()
    for seed in range(3):
        eps = random_episodes(random.Random(seed), 7)
        p, n = pack_batch(eps, pad_id=19), pack_naive(eps, pad_id=19)
        with torch.no_grad():
            lp = token_logprobs(model, p["idx"], p["targets"], p["pos"], p["mask"])
            lpn = token_logprobs(model, n["idx"], n["targets"])
        chosen, rejected = sequence_logps(lp, p["seg"])       # float32 sums by design
        if dtype == torch.float64:
            chosen, rejected = (torch.where(p["seg"] == s, lp, 0.0).sum(-1) for s in (1, 2))
        ref = lpn.sum(-1)
        B = len(eps)
        torch.testing.assert_close(chosen.double(), ref[:B].double(), atol=tol, rtol=0)
        torch.testing.assert_close(rejected.double(), ref[B:].double(), atol=tol, rtol=0)

def test_annotated_prompt_is_the_judge_lines_in_the_paper_layout():
    """--annotate: after each shot the judge's contrast of its two answers, after the shots
    their tally as the user description; a pair and its mirror image cancel in the tally;
    mirrored episodes are annotated from the swapped shots; dropping the oldest shot to fit
    annotates the kept ones alone."""
    t = byte_tok()
    users = {"u": {"domain": "roleplay", "traits": {"formality": 1.0}}}
    rows = {"u": [Pref("u", f"Tell me about q{i}?", f"Certainly, fine {i}.", f"Hey, fine {i}. Ha!")
                  for i in range(6)]}
    s0, s1, q = rows["u"][0], rows["u"][1], rows["u"][2]
    line = "Prefers: formal, serious."  # "Certainly" vs "Hey", no joke vs "Ha!"
    assert judge.contrast_summary("roleplay", s0.prompt, s0.chosen, s0.rejected) == line
    assert judge.contrast_tally("roleplay", [s0, s1]) == line
    assert judge.contrast_tally("roleplay", [s0, data.swapped(s1)]) == "Prefers: nothing."
    task = f"# Task\n{data.INSTRUCTION}\n## Question\n{q.prompt}\n"
    annotated = lambda shots, lines, tally: "".join(
        f"{data.format_shot(i, s)}## Example Contrast\n{c}\n" for i, (s, c) in enumerate(zip(shots, lines), 1)
    ) + f"# User Description\n{tally}\n" + task
    for p, want in ((0.0, line), (1.0, "Prefers: casual, humorous.")):
        stream = data.EpisodeStream(t, rows, users, "fspo", 2, 1, 10_000, 0, mirror=p, annotate=True)
        e = stream.encode([s0, s1], q, random.Random(0))
        shots = [s0, s1] if p == 0 else [data.swapped(s0), data.swapped(s1)]
        assert t.decode(e.ctx) == annotated(shots, [want] * 2, want)
    room = len(annotated([s1], [line], line))
    ids, kept = data.prompt_tokens(t, "fspo", [s0, s1], q.prompt, room, users["u"], annotate=True)
    assert kept == 1 and t.decode(ids) == annotated([s1], [line], line)
    ids, kept = data.prompt_tokens(t, "fspo", [s0, s1], q.prompt, len(task), users["u"], annotate=True)
    assert kept == 0 and t.decode(ids) == task  # no shot: no annotation, no tally
    assert not data.EpisodeStream(t, rows, None, "fspo", 2, 1, 10_000, 0, annotate=True).annotate


def test_tally_only_prompt_counts_the_shots_and_training_draws_one_to_n():
    """--annotate tally: the prompt is the shots' counted tally in the description slot, then
    the question, no shot (a mirrored episode counts the swapped shots); training draws 1..N of
    the N shots per episode, so every k of the curve is a tally it has read; evaluation at k
    shots counts the first k."""
    t = byte_tok()
    users = {"u": {"domain": "roleplay", "traits": {"formality": 1.0}}}
    rows = {"u": [Pref("u", f"Tell me about q{i}?", f"Certainly, fine {i}.", f"Hey, fine {i}. Ha!")
                  for i in range(9)]}
    shots, q = rows["u"][:3], rows["u"][3]
    task = f"# Task\n{data.INSTRUCTION}\n## Question\n{q.prompt}\n"
    want = "# User Description\nPrefers: formal, formal, formal, serious, serious, serious.\n" + task
    ids, kept = data.prompt_tokens(t, "fspo", shots, q.prompt, 10_000, users["u"], annotate="tally")
    assert kept == 3 and t.decode(ids) == want
    with pytest.raises(ValueError, match="do not fit"):
        data.prompt_tokens(t, "fspo", shots, q.prompt, len(want) - 1, users["u"], annotate="tally")
    mirror = data.EpisodeStream(t, rows, users, "fspo", 3, 1, 10_000, 0, mirror=1.0, annotate="tally")
    rng = random.Random(0)
    e = mirror.encode(shots, q, rng)
    k = random.Random(0)  # the same draws: the mirror's coin, then the shot count
    k.random()
    n = k.randint(1, 3)
    assert t.decode(e.ctx) == (f"# User Description\nPrefers: {', '.join(['casual'] * n + ['humorous'] * n)}.\n"
                               f"# Task\n{data.INSTRUCTION}\n## Question\n{q.prompt}\n")
    train = data.EpisodeStream(t, rows, users, "fspo", 3, 1, 10_000, 0, annotate="tally")
    drawn = {t.decode(train.encode(shots, q, random.Random(s)).ctx).count("formal") for s in range(40)}
    assert drawn == {1, 2, 3}
    mixed = [shots[0], data.swapped(shots[1]), shots[2]]  # formal, casual, formal
    at = lambda k: data.EpisodeStream(t, rows, users, "fspo", 3, 1, 10_000, 0, use_shots=k, annotate="tally")
    assert t.decode(at(2).encode(mixed, q, random.Random(0)).ctx) == "# User Description\nPrefers: nothing.\n" + task
    assert t.decode(at(3).encode(mixed, q, random.Random(0)).ctx) == \
        "# User Description\nPrefers: formal, serious.\n" + task

def test_mirror_pairs_put_each_episode_beside_its_mirror_image():
    """--mirror-pairs: a batch holds B/2 episodes of the epoch, each beside its mirror image
    (every label swapped, the tally of the same shots, so its terms flipped), under --group too:
    a pair is never split across batches; an epoch is twice the batches. Checked against
    encode_episode on the stream's own draws, and the flag against --mirror."""
    import fspo
    t = byte_tok()
    users = {f"u{u}": {"domain": "roleplay", "traits": {"formality": 1.0}} for u in range(16)}
    rows = {u: [Pref(u, f"Tell me about {u}q{i}?" + "x" * (3 * i), f"Certainly, fine {i}.", f"Hey, fine {i}. Ha!")
                for i in range(8)] for u in users}
    make = lambda g, **kw: data.EpisodeStream(t, rows, users, "fspo", 3, 4, 10_000, 5, annotate="tally",
                                              group=g, **kw)
    plain, paired = make(1), make(1, mirror_pairs=True)
    assert paired.per_epoch == 2 * plain.per_epoch == 16
    rows_of = lambda b: [tuple(r[s != data.PAD].tolist()) for r, s in zip(b["idx"], b["seg"])]
    packed = lambda e: rows_of(paired.pack([e]))[0]  # an episode's row, its padding left out
    swap = lambda xs: [data.swapped(x) for x in xs]
    paired.draw(0)
    for i in range(paired.per_epoch):
        units = paired.encoded(i)  # batch i of epoch 0: episodes[2i:2i + 2], each with its twin
        assert len(units) == 2
        for (a, b), (shots, q) in zip(units, paired.episodes[i * 2:(i + 1) * 2]):
            k = t.decode(a.ctx).count("formal")
            assert 1 <= k <= 3 and t.decode(b.ctx).count("casual") == k
            enc = lambda s, q: encode_episode(t, s, q, 10_000, "fspo", users[q.user_id], annotate="tally")
            assert a == enc(shots[:k], q) and b == enc(swap(shots[:k]), data.swapped(q))
        assert rows_of(paired.batch(i)) == [packed(e) for u in units for e in u]
    grouped = make(3, mirror_pairs=True)
    grouped.draw(0)
    for ids in (range(0, 3), range(3, 6), range(15, 16)):  # the epoch's last pool is short
        units = [u for k in ids for u in grouped.encoded(k)]
        batches = [set(rows_of(grouped.batch(i))) for i in ids]
        for a, b in units:  # both halves of a pair in one batch, the same batch
            assert [packed(a) in x and packed(b) in x for x in batches].count(True) == 1
    with pytest.raises(ValueError, match="even batch size"):
        data.EpisodeStream(t, rows, users, "fspo", 3, 3, 10_000, 5, mirror_pairs=True)
    for name in ("pooled", "cot", "pref-ft"):  # no shots to swap, or the unmirrored user's description
        assert not data.EpisodeStream(t, rows, users, name, 3, 4, 10_000, 5, mirror_pairs=True).paired
    for argv in (["--preset", "annotated", "--mirror", "0.5"], ["--preset", "paper", "--mirror-pairs"]):
        with pytest.raises(SystemExit, match="without --mirror 0.5"):
            fspo.get_args(argv)
    assert fspo.get_args(["--preset", "annotated"]).mirror_pairs
    assert fspo.get_args(["--preset", "paper", "--mirror-pairs", "--mirror", "0"]).mirror_pairs
    assert fspo.get_args(["--preset", "annotated", "--no-mirror-pairs", "--mirror", "0.5"]).mirror == 0.5


def test_oracle_pairs_show_the_mirror_image_its_own_description():
    """--oracle-pairs: the oracle's episode beside its mirror image, the query's labels swapped
    and the description's every trait negated; refused on elix (a level has no mirror image).
    Which stages take the flag: tests/test_fspo.py."""
    t = byte_tok()
    users = {f"u{u}": {"domain": "roleplay", "traits": {"formality": 1.0, "humor": -0.5}} for u in range(4)}
    rows = {u: [Pref(u, f"Tell me about {u}q{i}?", f"Certainly, fine {i}.", f"Hey, fine {i}. Ha!")
                for i in range(4)] for u in users}
    stream = data.EpisodeStream(t, rows, users, "oracle", 3, 2, 10_000, 5, mirror_pairs=True)
    assert stream.paired and stream.per_batch == 1
    stream.draw(0)
    (a, b), = stream.encoded(0)
    _, q = stream.episodes[0]
    mirrored = dict(users[q.user_id], traits={"formality": -1.0, "humor": 0.5})
    assert a == encode_episode(t, [], q, 10_000, "oracle", users[q.user_id])
    assert b == encode_episode(t, [], data.swapped(q), 10_000, "oracle", mirrored)
    assert "Prefers: formal, serious." in t.decode(a.ctx) and "Prefers: casual, humorous." in t.decode(b.ctx)
    assert (a.chosen, a.rejected) == (b.rejected, b.chosen)
    elix = {u: dict(v, domain="elix", group="expert") for u, v in users.items()}
    with pytest.raises(ValueError, match="elix user.s level has no mirror image"):
        data.EpisodeStream(t, rows, elix, "oracle", 3, 2, 10_000, 5, mirror_pairs=True)


def test_grouped_batches_hold_the_same_episodes_less_padded():
    """--group K: the K batches of a pool hold the episodes the K ungrouped batches hold (the
    same shot counts drawn), in fewer tokens, the last pool of an epoch short when K does not
    divide it; batch i is still a pure function of (seed, i), whatever was asked before it."""
    t = byte_tok()
    rows = {f"u{u}": [Pref(f"u{u}", f"q{u}{i}?" + "x" * (7 * i), f"yes {u}{i}", f"no {u}{i}")
                      for i in range(9)] for u in range(48)}
    make = lambda g: data.EpisodeStream(t, rows, None, "sft", 8, 4, 10_000, 3, group=g)
    plain, grouped = make(1), make(5)
    assert plain.per_epoch == 12  # pools of 5, 5 and 2 batches per epoch
    rowset = lambda bs: sorted(tuple(b["idx"][r][b["seg"][r] != data.PAD].tolist())
                               for b in bs for r in range(len(b["idx"])))
    for ids in (range(0, 5), range(5, 10), range(10, 12), range(12, 17)):  # the next epoch's first
        assert rowset([grouped.batch(i) for i in ids]) == rowset([plain.batch(i) for i in ids])
        assert sum(grouped.batch(i)["idx"].numel() for i in ids) < sum(plain.batch(i)["idx"].numel() for i in ids)
    asked = make(5)
    for i in (13, 2, 11, 12, 0, 24):  # across pools and epochs, back and forth
        alone = make(5).batch(i)  # a fresh stream asked for i first
        assert all(torch.equal(v, asked.batch(i)[k]) for k, v in alone.items())


def test_grouped_sft_loss_shares_the_pool_evenly():
    """Under --group the SFT's per-batch token-mean is taken over the pool's mean tokens per
    batch, so the K steps' losses sum to K times the token-mean NLL over all the pool's
    tokens, computed here from the ungrouped batches' summed log-probs."""
    import fspo
    t = byte_tok()
    rows = {f"u{u}": [Pref(f"u{u}", f"q{u}{i}?" + "x" * (5 * i), f"yes {u}{i}", f"no {u}{i}")
                      for i in range(9)] for u in range(24)}
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=1024, vocab_size=t.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    scorer = lambda idx, tg, pos, mask: m.token_logprobs(idx, tg, pos=pos, mask=mask)
    args = SimpleNamespace(method="sft", describe=0.0)
    make = lambda g: data.EpisodeStream(t, rows, None, "sft", 8, 2, 10_000, 0, context=True, group=g)
    with torch.no_grad():
        plain = [make(1).batch(i) for i in range(3)]
        nll = -sum(float(scorer(b["idx"], b["targets"], b["pos"], b["mask"]).sum()) for b in plain)
        n = sum(int((b["targets"] != -1).sum()) for b in plain)
        grouped = sum(float(fspo.score_batch(scorer, None, make(3).batch(i), args)[0]) for i in range(3))
    assert grouped == pytest.approx(3 * nll / n, rel=1e-5)


def test_grouped_preference_batches_score_every_pair_as_ungrouped():
    """--group K on a stage-2 stream (FSPO, the query's pair after its shots): each pair's
    preference loss is the one it gets ungrouped (its row packed with other, shorter padding),
    so the K steps' mean losses sum to the K ungrouped batches' (each batch holds B episodes of one
    pair each here; with --shot-pairs the pairs per episode vary)."""
    import fspo
    t = byte_tok()
    rows = {f"u{u}": [Pref(f"u{u}", f"q{u}{i}?" + "x" * (5 * i), f"yes {u}{i}" + "y" * (u % 4), f"no {u}{i}")
                      for i in range(9)] for u in range(24)}
    torch.manual_seed(0)
    pol, ref = (GPT(GPTConfig(block_size=1024, vocab_size=t.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
                for _ in range(2))
    args = SimpleNamespace(method="fspo", describe=0.0, beta=0.1, loss="ipo", nll=1.0)
    make = lambda g: data.EpisodeStream(t, rows, None, "fspo", 2, 2, 10_000, 0, group=g)
    with torch.no_grad():
        plain, grouped = [make(1).batch(i) for i in range(3)], [make(3).batch(i) for i in range(3)]
        losses = [sum(float(fspo.score_batch(fspo.LogProbs(pol), fspo.LogProbs(ref), b, args)[0]) for b in bs)
                  for bs in (plain, grouped)]
    assert sum(b["idx"].numel() for b in grouped) < sum(b["idx"].numel() for b in plain)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_bpe_dropout_writes_each_episode_in_pieces_and_keeps_its_texts_and_slots():
    """--bpe-dropout: every batch is the plain stream's batch with the same texts (decoded) in
    more tokens, the same for the same batch index; a shot's slot (--shot-pairs) and a note's
    end (--describe) still point where the shot sits in the pieces the context holds."""
    users = {f"u{u}": {"domain": "roleplay", "traits": {"formality": 1.0}} for u in range(8)}
    rows = {u: [Pref(u, f"Tell me about thermodynamics {i}?", f"Certainly, thermodynamics explains {i}.",
                     f"Hey, thermodynamics rocks {i}. Ha!") for i in range(6)] for u in users}
    t = Tokenizer(data.train_bpe([x for rs in rows.values() for r in rs for x in (r.prompt, r.chosen, r.rejected)],
                                 400))
    make = lambda p, **kw: data.EpisodeStream(t, rows, users, "fspo", 2, 4, 10_000, 5, bpe_dropout=p, **kw)
    texts = lambda b: [t.decode(r[s != data.PAD].tolist()) for r, s in zip(b["idx"], b["seg"])]
    plain, dropped = make(0.0), make(0.2)
    more = 0
    for i in range(plain.per_epoch):
        a, b = plain.batch(i), dropped.batch(i)
        assert texts(a) == texts(b)
        assert torch.equal(b["idx"], dropped.batch(i)["idx"])  # a pure function of (seed, i)
        more += int((b["seg"] != data.PAD).sum() - (a["seg"] != data.PAD).sum())
    assert more > 0
    pairs = make(0.2, shot_pairs=True)
    for i in range(pairs.per_epoch):
        for s, q in pairs.draw(0)[i * 4:(i + 1) * 4]:
            e = pairs.encode(s, q, random.Random(i))
            assert [t.decode(e.ctx[a:end]) for a, end, _ in e.shot_pairs] == [x.chosen for x in s[-e.n_shots:]]
    notes = make(0.2, describe=True)
    e = notes.encode(rows["u0"][:2], rows["u0"][2], random.Random(0))
    assert [t.decode(e.ctx[:end]).endswith(rows["u0"][k].rejected + "\n") for k, (end, _) in enumerate(e.notes[:2])] \
        == [True, True]
