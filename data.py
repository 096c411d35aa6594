"""
Tokenizer, preference data, FSPO episodes and batch packing.

    python data.py --prefs data/roleplay/prefs.jsonl --vocab-size 4096 --out data/tokenizer.bpe
    python data.py --prefs data/elix/prefs.jsonl --tokenizer data/tokenizer.bpe --n-shots 4

The first trains the byte-level BPE tokenizer on the preference text and saves its ranks;
the second prints one encoded episode and how often shots had to be dropped to fit.
"""
import base64
import hashlib
import heapq
import json
import os
import random
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import regex
import tiktoken
import torch

# -----------------------------------------------------------------------------
# tokenizer: byte-level BPE trained on our own corpus, served by tiktoken

EOT = "<|endoftext|>"
# GPT-2's pre-tokenization pattern as tiktoken writes it; training must split text exactly
# the way tiktoken will, or the learned merges would not be the ones applied at encode time
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

def train_bpe(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Mergeable ranks: the 256 bytes, then merges in the order learned.
    vocab_size counts the EOT token too (n_vocab == vocab_size when training does not stop
    early; it stops when no pair occurs twice). Ties in pair count go to the smaller byte
    pair, so the same corpus always gives the same ranks."""
    pat = regex.compile(PAT_STR)
    # templated text repeats a lot: count unique texts, then unique pre-tokens
    words = Counter()
    for text, n in Counter(texts).items():
        for w in pat.findall(text):
            words[w] += n
    vocab = [bytes([i]) for i in range(256)]             # token id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}
    seqs = [list(w.encode("utf-8")) for w in words]      # each unique word as token ids
    counts = list(words.values())
    pairs = Counter()                                    # (a, b) -> weighted occurrences
    where = defaultdict(set)                             # (a, b) -> indices of words with it
    for i, (s, n) in enumerate(zip(seqs, counts)):
        for p in zip(s, s[1:]):
            pairs[p] += n
            where[p].add(i)
    heap = [(-n, vocab[a], vocab[b], a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    while len(ranks) < vocab_size - 1 and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pairs.get((a, b), 0) != -neg:
            continue                                     # stale entry, count changed since
        if -neg < 2:
            break
        merged = vocab[a] + vocab[b]
        # the same bytes can be reachable by two different splits; tiktoken keys merges by
        # the resulting bytes, so both splits map to the one existing token
        new = ranks.get(merged)
        if new is None:
            new = ranks[merged] = len(vocab)
            vocab.append(merged)
        changed = set()
        for i in where.pop((a, b)):
            s, n = seqs[i], counts[i]
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            if len(out) == len(s):
                continue                                 # stale index: pair left this word
            for p in zip(s, s[1:]):
                pairs[p] -= n
                changed.add(p)
            for p in zip(out, out[1:]):
                pairs[p] += n
                where[p].add(i)
                changed.add(p)
            seqs[i] = out
        for p in changed:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], vocab[p[0]], vocab[p[1]], *p))
            else:
                del pairs[p]
    return ranks

def atomic_write(path, text):
    """Write text to path via a temp file and rename: readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

class Tokenizer:
    """tiktoken encoding of a rank table, with EOT as the one special token after it."""

    def __init__(self, ranks: dict[bytes, int], name: str = "fspo"):
        self.ranks = ranks
        self.eot_id = len(ranks)
        self.enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens={EOT: self.eot_id})
        self.n_vocab = self.enc.n_vocab
        # identifies the vocabulary, so a checkpoint can refuse a tokenizer it was not trained with
        self.sha256 = hashlib.sha256(b"".join(
            base64.b64encode(b) + b" %d\n" % r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])
        )).hexdigest()

    def encode(self, s: str) -> list[int]:
        # ordinary text only: a literal "<|endoftext|>" inside user data stays plain text
        return self.enc.encode_ordinary(s)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def save(self, path):
        # same line format as tiktoken's .tiktoken files: base64(token) rank
        atomic_write(path, "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in
                                   sorted(self.ranks.items(), key=lambda kv: kv[1])))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        ranks = {}
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    tok, r = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(r)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line ({e})") from None
        if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([i]) not in ranks for i in range(256)):
            raise ValueError(f"{path}: ranks are not 0..n-1 covering all 256 bytes")
        return cls(ranks)

# tiktoken fetches GPT-2's files from these URLs (tiktoken_ext/openai_public.py) and caches
# them under sha1(url); we only ever read that cache, since this project runs offline
GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def get_tokenizer(path=None, kind="fspo") -> Tokenizer:
    if kind == "fspo":
        if path is None:
            raise ValueError("kind='fspo' needs the path of a ranks file (python data.py --out ...)")
        return Tokenizer.load(path)
    if kind != "gpt2":
        raise ValueError(f"unknown tokenizer kind {kind!r} (fspo or gpt2)")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    for url, sha in GPT2_FILES.items():
        p = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        # a missing or corrupt cache file would make tiktoken download it: refuse instead
        if not cache or not os.path.exists(p) or _sha256(p) != sha:
            raise RuntimeError(
                f"the gpt2 tokenizer is not in tiktoken's cache ({cache or 'caching disabled'}) "
                f"and there is no network here; use kind='fspo', or copy a populated "
                f"data-gym-cache and point TIKTOKEN_CACHE_DIR at it")
    enc = tiktoken.get_encoding("gpt2")
    return Tokenizer(enc._mergeable_ranks, name="gpt2")  # same pat_str, EOT id 50256

# -----------------------------------------------------------------------------
# preference data

@dataclass
class Pref:
    user_id: str
    prompt: str
    chosen: str
    rejected: str
    split: str = "train"
    tags: dict = field(default_factory=dict)

def load_prefs(path) -> list[Pref]:
    """JSONL rows {user_id, prompt, chosen, rejected[, split, tags]}; blank lines skipped."""
    prefs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            row.setdefault("split", "train")
            row.setdefault("tags", {})
            for k in ("user_id", "prompt", "chosen", "rejected", "split"):
                if k not in row:
                    raise ValueError(f"{where}: field '{k}' is missing")
                if not isinstance(row[k], str) or not row[k]:
                    raise ValueError(f"{where}: field '{k}' must be a non-empty string, got {row[k]!r:.40}")
            if not isinstance(row["tags"], dict):
                raise ValueError(f"{where}: field 'tags' must be an object, got {row['tags']!r:.40}")
            prefs.append(Pref(row["user_id"], row["prompt"], row["chosen"], row["rejected"],
                              row["split"], row["tags"]))
    return prefs

def by_user(prefs) -> dict[str, list[Pref]]:
    users = defaultdict(list)
    for p in prefs:
        users[p.user_id].append(p)
    return dict(users)

def corpus_texts(prefs) -> Iterable[str]:
    """Tokenizer training text: each pair laid out as a one-shot prompt, so the markdown
    headers and the instruction line are learned along with the responses."""
    for p in prefs:
        yield format_prompt([p], p.prompt) + COMPLETION_HEADER + p.chosen

# -----------------------------------------------------------------------------
# episodes: N shots of one user, then a query pair of the same user

COMPLETION_HEADER = "## Preferred Response\n"
INSTRUCTION = "Given the examples above, generate a preferred response to the following question."

def format_prompt(shots: list[Pref], question: str, description: str | None = None) -> str:
    parts = [f"# Example {i}\n## Question\n{s.prompt}\n## Preferred Response\n{s.chosen}\n"
             f"## Dispreferred Response\n{s.rejected}\n" for i, s in enumerate(shots, 1)]
    if description is not None:
        parts.append(f"# User Description\n{description}\n")
    parts.append(f"# Task\n{INSTRUCTION}\n## Question\n{question}\n")
    return "".join(parts)

def make_episodes(prefs_by_user, n_shots, rng: random.Random, repeats=1, min_shots=None,
                  report=True):
    """Per user and repeat: shuffle the rows, cut into chunks of n_shots+1 (last = query).
    A short tail chunk is topped up with rows from earlier chunks so every row is used; a
    user with k+1 rows, min_shots <= k < n_shots, gives episodes of k shots. Users with
    fewer than min_shots+1 rows are skipped (reported). Episodes come back shuffled."""
    min_shots = n_shots if min_shots is None else min_shots
    k = n_shots + 1
    episodes, skipped = [], 0
    for rows in prefs_by_user.values():
        if len(rows) < min_shots + 1:
            skipped += 1
            continue
        for _ in range(repeats):
            order = rows[:]
            rng.shuffle(order)
            for i in range(0, len(order), k):
                chunk = order[i:i + k]
                if len(chunk) < min_shots + 1:           # i >= k here, so no row repeats
                    chunk = order[:k - len(chunk)] + chunk
                episodes.append((chunk[:-1], chunk[-1]))
    if skipped and report:
        print(f"make_episodes: skipped {skipped} of {len(prefs_by_user)} users "
              f"with fewer than {min_shots + 1} pairs")
    rng.shuffle(episodes)
    return episodes

@dataclass
class Episode:
    ctx: list[int]
    chosen: list[int]       # COMPLETION_HEADER + chosen text + [eot]
    rejected: list[int]
    n_shots: int = 0        # shots that fit (fewer than given when old ones were dropped)

def encode_episode(tok, shots, query, max_len, description=None, chosen_text=None,
                   rejected_text=None) -> Episode:
    # chosen_text / rejected_text replace the whole completion (the cot method's own headers)
    chosen = tok.encode(COMPLETION_HEADER + query.chosen if chosen_text is None else chosen_text)
    rejected = tok.encode(COMPLETION_HEADER + query.rejected if rejected_text is None else rejected_text)
    chosen, rejected = chosen + [tok.eot_id], rejected + [tok.eot_id]
    room = max_len - max(len(chosen), len(rejected)) - 1
    # drop whole shots, oldest first; the query and both completions are never cut
    for first in range(len(shots) + 1):
        ctx = tok.encode(format_prompt(shots[first:], query.prompt, description))
        if len(ctx) <= room:
            return Episode(ctx, chosen, rejected, len(shots) - first)
    raise ValueError(f"episode does not fit in max_len={max_len} even with no shots: "
                     f"query prompt {len(ctx)} tokens, completions {len(chosen)}/{len(rejected)}")

# -----------------------------------------------------------------------------
# batches

def pack_batch(episodes, pad_id, multiple=1) -> dict[str, torch.Tensor]:
    """One row per episode: the context once, then chosen, then rejected at the row's end.
    Row layout, segments and positions (Lc = len(ctx), H = the longest ctx + chosen):
        columns 0..H-1, the head: plain causal attention
            ctx[:-1]           seg 0   pos 0..Lc-2
            ctx[-1], chosen    seg 1   pos Lc-1, Lc, ...
            pad                seg 3   pos 0
        columns H..T-1, the tail: sees the context, and itself causally
            ctx[-1], rejected  seg 2   pos Lc-1, Lc, ...
            pad                seg 3   pos 0
    The duplicate ctx[-1] has the same position and keys as the first, so the same hidden
    state; rejected never sees chosen, so it is scored as if chosen were not there.
    mask (B, 1, T-H, T) covers the tail queries only (model.CausalSelfAttention): the head
    needs none, so attention runs causally there and skips the upper triangle."""
    heads = [e.ctx + e.chosen for e in episodes]
    tails = [e.ctx[-1:] + e.rejected for e in episodes]
    B, H = len(episodes), max(map(len, heads))
    # T rounded up to `multiple` (8 on CUDA, whose fused attention kernels want an aligned mask)
    T = -(-(H + max(map(len, tails))) // multiple) * multiple
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.full((B, T), 3, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, (e, head, tail) in enumerate(zip(episodes, heads, tails)):
        Lc, m, n = len(e.ctx), len(head), len(tail)
        idx[b, :m], idx[b, H:H + n] = torch.tensor(head), torch.tensor(tail)
        seg[b, :Lc - 1], seg[b, Lc - 1:m], seg[b, H:H + n] = 0, 1, 2
        pos[b, :m], pos[b, H:H + n] = torch.arange(m), torch.arange(Lc - 1, Lc - 1 + n)
    # targets: the next token while inside a completion segment; -1 elsewhere
    targets = torch.full((B, T), -1, dtype=torch.long)
    same = (seg[:, 1:] == seg[:, :-1]) & ((seg[:, :-1] == 1) | (seg[:, :-1] == 2))  # (B, T-1)
    targets[:, :-1] = torch.where(same, idx[:, 1:], -1)
    # tail query H+i sees the context and tail keys H..H+i (a pad query at least itself)
    key = torch.arange(T)
    causal = (key >= H) & (key <= H + torch.arange(T - H)[:, None])  # (T-H, T)
    mask = (causal | (seg[:, None, :] == 0))[:, None]  # (B, 1, T-H, T)
    return dict(idx=idx, targets=targets, pos=pos, mask=mask, seg=seg)

def pack_naive(episodes, pad_id) -> dict[str, torch.Tensor]:
    """Reference layout: rows 0..B-1 are ctx+chosen, rows B..2B-1 ctx+rejected, right-padded,
    plain causal attention (the context is run twice)."""
    seqs = [(e.ctx, e.chosen) for e in episodes] + [(e.ctx, e.rejected) for e in episodes]
    T = max(len(c) + len(y) for c, y in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for r, (c, y) in enumerate(seqs):
        idx[r, :len(c) + len(y)] = torch.tensor(c + y)
        targets[r, len(c) - 1:len(c) + len(y) - 1] = torch.tensor(y)   # predicted from the previous token
    return dict(idx=idx, targets=targets, pos=None, mask=None)

def pack_sft(episodes, pad_id, which="both", multiple=1, context=False) -> dict[str, torch.Tensor]:
    """pack_batch for supervised training: both completions carry labels, or only chosen.
    context=True also labels the context (each next token of the shots and the query)."""
    assert which in ("both", "chosen")
    batch = pack_batch(episodes, pad_id, multiple)
    seg, idx, targets = batch["seg"], batch["idx"], batch["targets"]
    if which == "chosen":
        targets[seg == 2] = -1
    if context:  # seg 0 -> seg 0 or the first (duplicated) context token of seg 1
        inside = (seg[:, :-1] == 0) & (seg[:, 1:] <= 1)
        targets[:, :-1] = torch.where(inside, idx[:, 1:], targets[:, :-1])
    return batch

def sequence_logps(token_lp, seg):
    """(B, T) token log-probs -> summed log p(chosen), log p(rejected), each (B,) float32."""
    token_lp = token_lp.float()
    return (torch.where(seg == 1, token_lp, 0.0).sum(-1),
            torch.where(seg == 2, token_lp, 0.0).sum(-1))

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    import time
    ap = argparse.ArgumentParser(description="train the BPE tokenizer, or inspect episodes")
    ap.add_argument("--prefs", nargs="+", required=True, help="prefs.jsonl file(s)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="tokens incl. EOT")
    ap.add_argument("--out", help="write the trained ranks here")
    ap.add_argument("--tokenizer", help="ranks file to inspect episodes with")
    ap.add_argument("--n-shots", type=int, default=4, help="shots per episode")
    ap.add_argument("--max-len", type=int, default=1024, help="context length (block_size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prefs = [p for path in args.prefs for p in load_prefs(path)]
    if args.out:
        t0 = time.time()
        tok = Tokenizer(train_bpe(corpus_texts(prefs), args.vocab_size))
        tok.save(args.out)
        print(f"{len(prefs)} pairs -> {tok.n_vocab} tokens in {time.time() - t0:.1f}s, saved {args.out}")
    else:
        tok = get_tokenizer(args.tokenizer)
    eps = make_episodes(by_user(prefs), args.n_shots, random.Random(args.seed))
    enc = [encode_episode(tok, s, q, args.max_len) for s, q in eps]
    lens = [len(e.ctx) + len(e.chosen) + len(e.rejected) for e in enc]
    print(f"{len(enc)} episodes, packed length mean {sum(lens) / len(lens):.0f} max {max(lens)}, "
          f"{sum(e.n_shots < args.n_shots for e in enc)} with shots dropped")
    print(tok.decode(enc[0].ctx + enc[0].chosen))
