"""
Tests for data.py's byte-pair tokenizer, each against an independent reference (a slow BPE
trainer that recounts every pair, a merge-list encoder, random Unicode round trips).

    python -m pytest -q tests/test_tokenizer.py
"""
import os
import random
import sys
from collections import Counter

import pytest
import regex

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data
from data import Pref, Tokenizer, format_prompt, train_bpe


# -----------------------------------------------------------------------------
# references

def templated_corpus(seed, n_chars):
    """Synthetic-style text: a few templates filled from a Zipf-weighted made-up lexicon."""
    r = random.Random(seed)
    lexicon = ["".join(r.choices("etaoinshrdlcumwfgyp", k=r.randint(2, 9))) for _ in range(400)]
    weights = [1 / (i + 1) for i in range(len(lexicon))]
    templates = ["The {} was {} because the {} {} every {}.", "Explain {} to a {}: it is like {} and {}{}.",
                 "I think {} {}, {}! {} {} Score: 7/10.", "Q: why does {} {} the {}?\nA: {} {}."]
    texts, size = [], 0
    while size < n_chars:
        t = r.choice(templates).format(*r.choices(lexicon, weights, k=5))
        texts.append(t)
        size += len(t)
    return texts

def random_unicode(r, n):
    ranges = [(0x20, 0x7E), (0x0A, 0x0A), (0xA0, 0x24F), (0x300, 0x36F),   # latin, combining marks
              (0x391, 0x3C9), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),  # cjk, emoji
              (0x200D, 0x200D), (0xFE0F, 0xFE0F), (0x2000, 0x200B)]      # zwj, variation sel, spaces
    out = []
    for _ in range(n):
        lo, hi = r.choice(ranges)
        out.append(chr(r.randint(lo, hi)))
    return "".join(out)

def naive_bpe(texts, vocab_size):
    """Slow reference trainer: recount every pair every step; returns (ranks, segmentation)."""
    words = Counter(w for t in texts for w in regex.findall(data.PAT_STR, t))
    segs = {w: [bytes([b]) for b in w.encode()] for w in words}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size - 1:
        counts = Counter()
        for w, n in words.items():
            for p in zip(segs[w], segs[w][1:]):
                counts[p] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        ranks.setdefault(best[0] + best[1], len(ranks))
        for w, s in segs.items():
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            segs[w] = out
    return ranks, segs

def merge_list_encode(ranks, text):
    """Reference encoder: pre-tokenize, then apply the learned merges in rank order."""
    merges = sorted((r, b) for b, r in ranks.items() if r >= 256)
    ids = []
    for w in regex.findall(data.PAT_STR, text):
        wb = w.encode()
        s = [bytes([b]) for b in wb]
        for _, tok in merges:
            if len(s) == 1:
                break
            if tok not in wb:
                continue
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] + s[j + 1] == tok:
                    out.append(tok)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            s = out
        ids += [ranks[b] for b in s]
    return ids

@pytest.fixture(scope="module")
def corpus():
    return templated_corpus(0, 200_000)

@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer(train_bpe(corpus, 1024))


# -----------------------------------------------------------------------------
# tokenizer

def test_roundtrip_random_unicode(tok):
    r = random.Random(0)
    for n in [0, 1, 2, 5, 30, 200]:
        for _ in range(40):
            s = random_unicode(r, n)
            assert tok.decode(tok.encode(s)) == s
    s = "e\u0301 👩‍👩‍👧 ❤️ 🇫🇷 <|endoftext|> tab\tnl\n\n  x"
    ids = tok.encode(s)
    assert tok.eot_id not in ids                         # special text stays ordinary text
    assert tok.decode(ids) == s

def test_training_matches_naive_trainer():
    texts = templated_corpus(1, 20_000)
    ranks = train_bpe(texts, 500)
    ref, segs = naive_bpe(texts, 500)
    assert ranks == ref
    t = Tokenizer(ranks)
    # tiktoken reproduces the merges: every training word encodes to its learned split
    for w, s in segs.items():
        assert t.encode(w) == [ranks[b] for b in s], w

def test_deterministic_and_vocab_size(corpus):
    a = train_bpe(corpus, 700)
    b = train_bpe(iter(templated_corpus(0, 200_000)), 700)   # regenerated, fed as an iterator
    assert a == b
    assert Tokenizer(a).n_vocab == 700
    assert sorted(a.values()) == list(range(699))
    assert all(a[bytes([i])] == i for i in range(256))

def test_stops_when_no_pair_repeats():
    ranks = train_bpe(["abab", "cd"], 10_000)           # "ab" twice; then every pair once
    assert set(ranks) - {bytes([i]) for i in range(256)} == {b"ab"}
    ranks = train_bpe(["abab abab", "cd"], 10_000)      # "ab" 4x, then "abab" 2x (" abab" once)
    assert set(ranks) - {bytes([i]) for i in range(256)} == {b"ab", b"abab"}

def test_tiktoken_equals_merge_list_encoder(tok, corpus):
    r = random.Random(0)
    samples = corpus[:200] + [format_prompt([Pref("u", "Why?", "Because.", "No.")], "How so?"),
                              "unseen wordz: Zebras' 1234 don't   spaces\n\nend",
                              "naïve café — 東京 🎉🎉"] + [random_unicode(r, 40) for _ in range(20)]
    for s in samples:
        assert tok.encode(s) == merge_list_encode(tok.ranks, s), s

def test_save_load(tok, tmp_path, corpus):
    path = tmp_path / "tok.bpe"
    tok.save(path)
    assert os.listdir(tmp_path) == ["tok.bpe"]           # no temp file left behind
    tok2 = Tokenizer.load(path)
    assert tok2.ranks == tok.ranks and tok2.eot_id == tok.eot_id
    assert tok2.encode(corpus[0]) == tok.encode(corpus[0])
    (tmp_path / "bad.bpe").write_text("QUI= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.bpe:2"):
        Tokenizer.load(tmp_path / "bad.bpe")

def test_bpe_training_is_deterministic_and_fills_the_vocabulary():
    texts = templated_corpus(2, 200_000)
    ranks = train_bpe(texts, 1024)
    assert len(ranks) == 1023 and train_bpe(texts, 1024) == ranks


def test_bpe_dropout_is_encode_at_zero_and_writes_the_same_text_in_smaller_pieces(tok, corpus):
    """Tokenizer.dropped with p = 0 is tiktoken's encoding word by word; with p > 0 it decodes to
    the same text in more tokens, each piece a vocabulary entry, and at p near 1 to bytes.
    DroppedMerges writes a word the same way throughout one episode and otherwise afresh."""
    r = random.Random(0)
    texts = corpus[:200] + [random_unicode(r, 60) for _ in range(20)]
    for text in texts:
        words = data.WORDS.findall(text)
        assert [i for w in words for i in tok.dropped(w, 0.0, r)] == tok.encode(text)
        assert data.DroppedMerges(tok, 0.0, r).encode(text) == tok.encode(text)
        ids = data.DroppedMerges(tok, 0.3, random.Random(1)).encode(text)
        assert tok.decode(ids) == text and len(ids) >= len(tok.encode(text))
        assert data.DroppedMerges(tok, 0.999999, r).encode(text) == [tok.ranks[bytes([b])] for b in text.encode()]
    long_words = sorted({w for t in corpus[:200] for w in data.WORDS.findall(t) if len(tok.encode(w)) == 1
                         and len(w) > 6})
    one = data.DroppedMerges(tok, 0.3, random.Random(2))
    assert [one.encode(w) for w in long_words] == [one.encode(w) for w in long_words]  # one episode
    other = data.DroppedMerges(tok, 0.3, random.Random(3))
    split = [len(one.encode(w)) > 1 for w in long_words]
    assert 0.2 < sum(split) / len(split) < 1  # whole words come apart, not every one
    assert [one.encode(w) for w in long_words] != [other.encode(w) for w in long_words]
