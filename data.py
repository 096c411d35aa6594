"""
Everything from preference rows to scored batches: the tokenizer, the rows, the method table,
the few-shot prompt (one function for training and evaluation), episodes, the episode stream,
shared-context packing with named segments, and summed sequence log-probs.

    python data.py --prefs data/roleplay/prefs.jsonl --vocab-size 4096 --out data/tokenizer.bpe
    python data.py --prefs data/elix/prefs.jsonl --tokenizer data/tokenizer.bpe --n-shots 4

The first trains the byte-level BPE tokenizer on the training rows and saves its ranks;
the second prints one encoded episode and how often shots had to be dropped to fit.
"""
import base64
import hashlib
import heapq
import itertools
import json
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterable

import regex
import tiktoken
import torch

import judge

# -----------------------------------------------------------------------------
# tokenizer: byte-level BPE trained on our own corpus, served by tiktoken

EOT = "<|endoftext|>"
# GPT-2's pre-tokenization pattern as tiktoken writes it; training must split text exactly
# the way tiktoken will, or the learned merges would not be the ones applied at encode time
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
WORDS = regex.compile(PAT_STR)

def train_bpe(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Mergeable ranks: the 256 bytes, then merges in the order learned.
    vocab_size counts the EOT token too (n_vocab == vocab_size when training does not stop
    early; it stops when no pair occurs twice). Ties in pair count go to the smaller byte
    pair, so the same corpus always gives the same ranks."""
    # templated text repeats a lot: count unique texts, then unique pre-tokens
    words = Counter()
    for text, n in Counter(texts).items():
        for w in WORDS.findall(text):
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

    def dropped(self, word: str, p: float, rng: random.Random) -> list[int]:
        """BPE-dropout (Provilkov et al., 2020) of one pre-tokenized word: the merges applied as
        tiktoken applies them, the lowest rank first, but each possible merge skipped with
        probability p at every step (p = 0: encode's tokens). A word then also appears in the
        smaller pieces that a word training never saw is written in."""
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while len(parts) > 1:
            merges = [(self.ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            merges = [m for m in merges if m[0] is not None and rng.random() >= p]
            if not merges:
                break
            i = min(merges)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[t] for t in parts]

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

class DroppedMerges:
    """The tokenizer of one training episode under --bpe-dropout: each word of its texts as
    Tokenizer.dropped writes it, the same way every time within the episode (so a shot encoded
    again finds the tokens the context holds), a new draw in the next episode. Why: a word that
    training holds as one token is, in a held-out text, a run of pieces no training text
    contains, whose embeddings never learned anything (ELIX's held-out concepts)."""

    def __init__(self, tok: Tokenizer, p: float, rng: random.Random):
        self.tok, self.p, self.rng, self.words = tok, p, rng, {}
        self.eot_id = tok.eot_id

    def encode(self, s: str) -> list[int]:
        out = []
        for w in WORDS.findall(s):
            if w not in self.words:
                self.words[w] = self.tok.dropped(w, self.p, self.rng)
            out += self.words[w]
        return out

def file_sha256(path) -> str:
    """A file's fingerprint: a stage records those of its inputs and refuses changed ones."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def check_tokenizer(meta, tok, tok_path, where):
    """Refuse a checkpoint trained with another vocabulary: its token ids mean other text."""
    if meta.get("tokenizer_sha256") != tok.sha256:
        raise ValueError(f"{where} was trained with tokenizer {meta.get('tokenizer')} "
                         f"(sha256 {str(meta.get('tokenizer_sha256'))[:12]}), not {tok_path} "
                         f"(sha256 {tok.sha256[:12]})")

def train_tokenizer(sources, vocab_size, path):
    """BPE on the training rows of each (prefs.jsonl, users.jsonl or None) source plus the
    users' trait summaries (the text the cot method writes): no held-out text shapes it."""
    t0, prefs, summaries = time.time(), [], []
    for prefs_path, users_path in sources:
        prefs += [r for r in load_prefs(prefs_path) if r.split == "train"]
        if users_path and os.path.exists(users_path):
            summaries += [COT_HEADER + judge.trait_summary(u) for u in judge.load_users(users_path).values()
                          if u.get("split") == "train"]
    tok = Tokenizer(train_bpe(itertools.chain(corpus_texts(prefs), summaries), vocab_size))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    print(f"[tokenizer] {tok.n_vocab} tokens from {len(prefs)} rows in {time.time() - t0:.1f}s")
    return tok

def ensure_tokenizer(sources, vocab_size, path, trained_with=lambda path: []):
    """The tokenizer at `path`, trained on the training rows of `sources` ((prefs, users)
    pairs); retrained when those files or the vocabulary size changed since (path.json
    records them), so a tokenizer from a failed run on other data is never reused. Never
    over one that checkpoints were trained with (trained_with(path) lists them): without it
    their token ids would mean nothing."""
    stamp = {"vocab_size": vocab_size, "data": [file_sha256(p)[:16] for p, _ in sources]}
    try:
        with open(path + ".json") as f:
            fresh = json.load(f) == stamp and os.path.exists(path)
    except (OSError, ValueError):
        fresh = False
    if not fresh and os.path.exists(path) and (used := trained_with(path)):
        named = ", ".join(used[:3]) + ", ..." * (len(used) > 3)
        raise ValueError(f"{path} was trained on other data or another vocabulary size, and {len(used)} "
                         f"checkpoint(s) were trained with it ({named}): write to another directory, "
                         f"or delete them and it")
    if not fresh:
        if os.path.exists(path + ".json"):  # a crash before the new stamp must not pass for fresh
            os.remove(path + ".json")
        train_tokenizer(sources, vocab_size, path)
        atomic_write(path + ".json", json.dumps(stamp) + "\n")
    return Tokenizer.load(path)

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
    where: str = ""         # file:line, for errors about the row

SPLITS = ("train", "val", "test")  # val: running metric and tuning; test: the report, read once

def user_split(user_id) -> str:
    """The split of a user whose rows name none: by a hash of the id alone, so every run and
    every row of the user agree. 80% train, 10% val, 10% test."""
    h = int(hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:8], 16) / 16 ** 8
    return "train" if h < 0.8 else "val" if h < 0.9 else "test"

def parse_row(line, where, default_user=None) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row.setdefault("tags", {})
    if default_user is not None:
        row.setdefault("user_id", default_user)
    for k in ("user_id", "prompt", "chosen", "rejected", "split"):
        if k == "split" and k not in row:
            row[k] = user_split(row["user_id"])
        if k not in row:
            raise ValueError(f"{where}: field '{k}' is missing")
        if not isinstance(row[k], str) or not row[k]:
            raise ValueError(f"{where}: field '{k}' must be a non-empty string, got {row[k]!r:.40}")
        try:
            row[k].encode("utf-8")
        except UnicodeEncodeError:  # JSON may escape half a surrogate pair
            raise ValueError(f"{where}: field '{k}' holds a lone surrogate, not text") from None
    if row["split"] not in SPLITS:
        raise ValueError(f"{where}: field 'split' is {row['split']!r}, not one of {', '.join(SPLITS)}")
    if row["chosen"] == row["rejected"]:
        raise ValueError(f"{where}: field 'rejected' equals 'chosen': the pair prefers nothing")
    if not isinstance(row["tags"], dict):
        raise ValueError(f"{where}: field 'tags' must be an object, got {row['tags']!r:.40}")
    return row

def load_prefs(path, default_user=None) -> list[Pref]:
    """JSONL rows {user_id, prompt, chosen, rejected[, split, tags]}; blank lines skipped. A
    row without a split gets its user's (user_split); default_user fills a missing user_id
    (one person's pairs). Bad input raises a ValueError naming
    file:line and field before anything is trained or written."""
    prefs, first = [], {}  # first: user_id -> (split, where) of the user's first row
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            row = parse_row(line, where, default_user)
            split, seen = first.setdefault(row["user_id"], (row["split"], where))
            if row["split"] != split:
                raise ValueError(f"{where}: field 'split': user {row['user_id']!r} is {row['split']!r} "
                                 f"here but {split!r} at {seen}; a user belongs to one split")
            prefs.append(Pref(row["user_id"], row["prompt"], row["chosen"], row["rejected"],
                              row["split"], row["tags"], where))
    return prefs

def write_splits(prefs_path, out):
    """Print and record (out/splits.json) how many users and rows each split holds."""
    rows = load_prefs(prefs_path)
    counts = {s: {"users": len({r.user_id for r in rows if r.split == s}),
                  "rows": sum(r.split == s for r in rows)} for s in SPLITS}
    total = sum(c["users"] for c in counts.values())
    print(f"[splits] {prefs_path}: " + ", ".join(
        f"{s} {c['users']} users ({100 * c['users'] / total:.0f}%), {c['rows']} rows" for s, c in counts.items()))
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "splits.json"), json.dumps(counts, indent=1) + "\n")

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
# methods: how each one is prompted and what it learns (one row each; eval-only rows have
# no stage). "-dpo" names (fspo-dpo) are the same row trained with the DPO loss.

@dataclass(frozen=True)
class Method:
    prompt: str       # "shots": the user's N pairs | "some shots": 0..N, drawn per episode |
                      # "bare": the question alone | "description": the user's true description
    cot: bool         # the completion states the user description before the response
    learns: str       # "both": SFT on both completions | "chosen": SFT on the chosen one |
                      # "preference": IPO/DPO on chosen vs rejected | "": evaluation only
    model: str = ""   # evaluation-only rows answer with this checkpoint
    init: str = "sft" # the checkpoint a stage starts from, also its reference

    @property
    def reads_shots(self) -> bool:  # its prompt holds the user's pairs
        return self.prompt.endswith("shots")

METHODS = {
    "sft":      Method("some shots", False, "both"),         # stage 1: base and reference
    "base":     Method("bare", False, "", model="sft"),
    "prompted": Method("shots", False, "", model="sft"),
    "pooled":   Method("bare", False, "preference"),         # the paper's IPO baseline
    "pref-ft":  Method("shots", False, "chosen"),
    "fspo":     Method("shots", False, "preference"),
    "cot-sft":  Method("shots", True, "chosen"),             # format warm-up for cot
    "cot":      Method("shots", True, "preference", init="cot-sft"),
    "oracle":   Method("description", False, "preference"),
}

def method(name) -> Method:
    return METHODS[name.removesuffix("-dpo")]

# -----------------------------------------------------------------------------
# the prompt: N shots of one user, then the question

COMPLETION_HEADER = "## Preferred Response\n"
COT_HEADER = "## User Description\n"
DESCRIPTION_HEADER = "# User Description\n"  # the oracle's, or --annotate's tally
SHOT_HEADER = "## Example Contrast\n"  # --describe's note, or --annotate's line, after each shot
INSTRUCTION = "Given the examples above, generate a preferred response to the following question."

def format_shot(i, s: Pref) -> str:
    return (f"# Example {i}\n## Question\n{s.prompt}\n## Preferred Response\n{s.chosen}\n"
            f"## Dispreferred Response\n{s.rejected}\n")

def format_shots(shots: list[Pref], contrasts: list[str] | None = None) -> str:
    """contrasts (--annotate): a line after each shot, how its two answers differ."""
    if contrasts is None:
        return "".join(format_shot(i, s) for i, s in enumerate(shots, 1))
    return "".join(f"{format_shot(i, s)}{SHOT_HEADER}{c}\n" for i, (s, c) in enumerate(zip(shots, contrasts), 1))

def format_prompt(shots: list[Pref], question: str, description: str | None = None,
                  contrasts: list[str] | None = None) -> str:
    parts = [format_shots(shots, contrasts)]
    if description is not None:
        parts.append(f"{DESCRIPTION_HEADER}{description}\n")
    parts.append(f"# Task\n{INSTRUCTION}\n## Question\n{question}\n")
    return "".join(parts)

def annotations(domain, shots) -> tuple[list[str], str]:
    """--annotate's lines for these shots, from the judge: each shot's contrast, and their tally
    as the user description. A function of the shots alone, not of the user's true traits."""
    ds = [judge.contrast(domain, s.prompt, s.chosen, s.rejected) for s in shots]  # each shot read once
    return [judge.contrast_line(domain, d) for d in ds], judge.contrast_line(domain, judge.summed(ds))

def prompt_tokens(tok, name, shots, question, room, user=None, annotate=False) -> tuple[list[int], int]:
    """Token ids of method `name`'s prompt and the shots kept. Training and evaluation both
    call this, so a model is tested on exactly the tokens it was trained on. Whole shots are
    dropped, oldest first, until the prompt fits in `room` tokens; the question is never cut.
    annotate: each kept shot followed by its contrast, then their tally (annotations);
    "tally": the shots' counted tally alone in the description slot, no shot (tally_prompt)."""
    shots = shots if method(name).reads_shots else []
    if annotate == "tally" and shots:
        return tally_prompt(tok, judge.shot_counts(user["domain"], shots), user["domain"], question, room), len(shots)
    oracle = judge.trait_summary(user) if method(name).prompt == "description" else None
    for first in range(len(shots) + 1):
        description, contrasts = oracle, None
        if annotate and shots[first:]:
            contrasts, description = annotations(user["domain"], shots[first:])
        ids = tok.encode(format_prompt(shots[first:], question, description, contrasts))
        if len(ids) <= room:
            return ids, len(shots) - first
    raise ValueError(f"the bare question does not fit in {room} tokens ({len(ids)}): {question[:60]!r}")

def tally_prompt(tok, counts, domain, question, room) -> list[int]:
    """--annotate tally: the prompt of a policy that reads the shots through their tally alone,
    judge.count_line(counts) in the description slot (where the oracle reads the user's), then
    the question. Counts come from the judge in training; at evaluation from the policy's own
    reading of each shot (eval.Reader), or from the base's lines if it learned them."""
    return tally_context(tok, judge.count_line(domain, counts), question, room)

def tally_context(tok, line, question, room) -> list[int]:
    """A tally line in the description slot, then the question."""
    ids = tok.encode(format_prompt([], question, line))
    if len(ids) > room:
        raise ValueError(f"the tally and question do not fit in {room} tokens ({len(ids)}): {question[:60]!r}")
    return ids

def text_format(name, annotate, domain) -> int:
    """The version of the texts a stage of method `name` trains on, kept with its checkpoint so
    that one trained on older texts is refused (fspo.check_recipe, eval.load_models), where a
    prompt or completion names the judge's terms (a description, a tally, annotation lines):
    roleplay 3 (the example axis says "abstract", not "no examples", since 2026-12-05); elix and
    reviews 4 (example "abstract", rating "unrated", not "no examples", "no ratings", since
    2026-12-06; 2 before, for an elix tally, which states a level, and cot). 1 elsewhere, as
    every checkpoint from before the version was kept."""
    m = method(name)
    if m.prompt == "description" or m.cot or (annotate and m.reads_shots):
        return {"roleplay": 3, "elix": 4, "reviews": 4}.get(domain, 1)
    return 1

def header(name) -> str:
    """The completion's first line: the model is prompted with it at test time."""
    return COT_HEADER if method(name).cot else COMPLETION_HEADER

def completion_tokens(tok, name, text) -> list[int]:
    # header and text encoded apart: evaluation prompts with exactly these header tokens
    return tok.encode(header(name)) + tok.encode(text) + [tok.eot_id]

def cot_text(description, response):
    """The cot completion after its header: the user description, then the response."""
    return f"{description}\n{COMPLETION_HEADER}{response}"

# -----------------------------------------------------------------------------
# episodes: a user's shots and one query pair, encoded, and a stream of packed batches

def make_episodes(prefs_by_user, n_shots, rng: random.Random, report=True):
    """Per user: shuffle the rows, cut into chunks of n_shots+1 (last = query). A short tail
    chunk is topped up with rows from earlier chunks so every row is used. Users with fewer
    than n_shots+1 rows are skipped (reported). Episodes come back shuffled."""
    k, episodes, skipped = n_shots + 1, [], 0
    for rows in prefs_by_user.values():
        if len(rows) < k:
            skipped += 1
            continue
        order = rows[:]
        rng.shuffle(order)
        for i in range(0, len(order), k):
            chunk = order[i:i + k]
            if len(chunk) < k:                           # i >= k here, so no row repeats
                chunk = order[:k - len(chunk)] + chunk
            episodes.append((chunk[:-1], chunk[-1]))
    if skipped and report:
        print(f"make_episodes: skipped {skipped} of {len(prefs_by_user)} users "
              f"with fewer than {k} pairs")
    rng.shuffle(episodes)
    return episodes

@dataclass
class Episode:
    ctx: list[int]
    chosen: list[int]       # COMPLETION_HEADER + chosen text + [eot]
    rejected: list[int]
    n_shots: int = 0        # shots that fit (fewer than given when old ones were dropped)
    # --shot-pairs: each shot as a pair too, [(start, end, rejected text ids)]: ctx[start:end]
    # is the shot's chosen text in its "Preferred Response" slot, scored against the rejected
    # text in the same slot, both seeing only the shots before it
    shot_pairs: list = field(default_factory=list)
    # --describe: [(end, ids)], notes written as if after ctx[:end], each a tail piece: after
    # every shot, how its chosen answer differs from its rejected one; after the whole context,
    # the user's true description. An auxiliary loss that spells out what the shots reveal
    notes: list = field(default_factory=list)

def shot_spans(tok, shots, ctx):
    """[(start, end, rejected ids)] of each shot of format_prompt(shots, ...) encoded as ctx,
    found by encoding the shot's pieces; [] when the pieces do not add up to ctx (BPE merged
    across a boundary), so that episode trains on its query pair alone."""
    at, out = 0, []
    for i, s in enumerate(shots, 1):
        head = tok.encode(f"# Example {i}\n## Question\n{s.prompt}\n## Preferred Response\n")
        chosen = tok.encode(s.chosen)
        rest = tok.encode(f"\n## Dispreferred Response\n{s.rejected}\n")
        start = at + len(head)
        if ctx[at:start] != head or ctx[start:start + len(chosen)] != chosen or \
                ctx[start + len(chosen):start + len(chosen) + len(rest)] != rest:
            return []
        out.append((start, start + len(chosen), tok.encode(s.rejected)))
        at = start + len(chosen) + len(rest)
    return out

def shot_ends(tok, shots, ctx):
    """The ctx index just past each shot of format_prompt(shots, ...) encoded as ctx; [] when
    the shots' own encodings do not add up to ctx (BPE merged across a boundary)."""
    ends, at = [], 0
    for i, s in enumerate(shots, 1):
        ids = tok.encode(format_shot(i, s))
        if ctx[at:at + len(ids)] != ids:
            return []
        at += len(ids)
        ends.append(at)
    return ends

def encode_episode(tok, shots, query, max_len, name="fspo", user=None, shot_pairs=False,
                   annotate=False) -> Episode:
    """Method `name`'s prompt and both completions of the query; cot methods also need the
    user (its description opens both completions), and annotate its domain."""
    chosen, rejected = query.chosen, query.rejected
    if method(name).cot:
        # the same, true description before both answers, so the preference margin comes from
        # the answers alone (the description's log-probs cancel) and the description is learned
        # from the chosen completion (cot-sft, and the --nll anchor). The paper's first code puts
        # the description that y_l fits before y_l: here the model then ranks descriptions, not
        # answers (val win rate 48.8 against 61.1, README "The paper's tables")
        desc = judge.trait_summary(user)
        chosen, rejected = cot_text(desc, chosen), cot_text(desc, rejected)
    chosen, rejected = completion_tokens(tok, name, chosen), completion_tokens(tok, name, rejected)
    room = max_len - max(len(chosen), len(rejected)) - 1
    try:
        ctx, kept = prompt_tokens(tok, name, shots, query.prompt, room, user, annotate)
    except ValueError:
        raise ValueError(f"episode does not fit in max_len={max_len} even with no shots: "
                         f"completions {len(chosen)}/{len(rejected)} tokens") from None
    spans = shot_spans(tok, shots[len(shots) - kept:], ctx) if shot_pairs and kept else []
    return Episode(ctx, chosen, rejected, kept, spans)

def check_lengths(tok, prefs, max_len, name="fspo", users=None):
    """Fail at load, not hours into training: every row must fit the block with no shots."""
    for r in prefs:
        try:
            encode_episode(tok, [], r, max_len, name, users[r.user_id] if users else None)
        except ValueError as e:
            raise ValueError(f"{r.where}: the row does not fit --block-size {max_len} ({e})") from None

def swapped(p: Pref) -> Pref:
    """The same pair labelled the other way round."""
    return replace(p, chosen=p.rejected, rejected=p.chosen)

def has_mirror_image(user) -> bool:
    """Whether a user has a mirror image, every answer pair swapped and every trait negated: an
    ELIX user's description states a level, and a level has no opposite."""
    return user["domain"] != "elix"

class EpisodeStream:
    """Packed batches of method `name`'s episodes. Batch i is a pure function of (seed, i):
    resuming at step s rebuilds exactly the batches an uninterrupted run would have seen."""

    def __init__(self, tok, prefs_by_user, users, name, n_shots, batch_size, max_len, seed,
                 which=None, use_shots=None, context=False, shot_pairs=False, mirror=0.0,
                 describe=False, annotate=False, group=1, mirror_pairs=False, bpe_dropout=0.0):
        self.tok, self.users, self.name, self.spec = tok, users, name, method(name)
        self.bpe_dropout = bpe_dropout  # each episode's words written in pieces (DroppedMerges)
        learns = self.spec.learns
        self.which = which or ("chosen" if learns == "chosen" else "both")  # labelled completions
        self.n, self.B, self.max_len, self.seed = n_shots, batch_size, max_len, seed
        self.prefs_by_user, self.use_shots, self.context = prefs_by_user, use_shots, context
        self.shot_pairs = shot_pairs and learns == "preference"
        # a mirror image only for methods that learn the user from the shots alone: pooled has
        # none to read, oracle and cot are given the unmirrored user's description
        mirrors = learns == "preference" and self.spec.prompt == "shots" and not self.spec.cot
        self.mirror = mirror if mirrors else 0.0
        # mirror_pairs: each episode beside its mirror image in one batch, so a taste for one
        # answer that ignores the user pulls both ways in the same step and cancels; the oracle's
        # mirror image reads the mirrored user's description, every trait negated
        described = learns == "preference" and self.spec.prompt == "description"
        self.paired = bool(mirror_pairs and (mirrors or described))
        if self.paired and batch_size % 2:
            raise ValueError(f"mirror pairs need an even batch size, not {batch_size}")
        if self.paired and described and not all(has_mirror_image(users[u]) for u in prefs_by_user):
            raise ValueError("mirror pairs for the oracle: an elix user's level has no mirror image")
        self.per_batch = batch_size // 2 if self.paired else batch_size  # distinct episodes a batch
        # notes only where users are known and the prompt holds shots to read them from
        self.describe = describe and users is not None and self.spec.reads_shots
        self.annotate = annotate if users is not None else False  # the judge's (--annotate [tally])
        self.multiple = 8 if torch.cuda.is_available() else 1  # aligned masks for CUDA kernels
        # methods without shots still cut chunks of N+1 rows so every method sees the same queries
        eps = make_episodes(prefs_by_user, n_shots, random.Random(seed), report=False)
        self.per_epoch = len(eps) // self.per_batch
        if self.per_epoch == 0:
            enough = sum(len(v) > n_shots for v in prefs_by_user.values())
            raise ValueError(
                f"{len(eps)} episodes is less than one batch of {self.per_batch}: {len(prefs_by_user)} users, "
                f"{enough} of them with the {n_shots + 1} rows an episode of {n_shots} shots + a query "
                f"needs; add users or rows, or lower --batch-size or --shots")
        self.epoch, self.episodes = None, None
        self.group, self.pool = max(1, group), (None, None)  # pool: (its key, its batches)

    def encode(self, shots, query, rng, flip=None):
        """One training episode: its mirror image drawn (--mirror) unless `flip` says, its shots
        cut as its method draws them."""
        if flip is None:
            flip = self.mirror and rng.random() < self.mirror
        user = self.users[query.user_id] if self.users else None
        if flip:  # the user's mirror image (--mirror)
            shots, query = [swapped(s) for s in shots], swapped(query)
            if self.spec.prompt == "description":  # the oracle's: the mirrored user's own
                user = dict(user, traits={a: -w for a, w in user["traits"].items()})
        if self.spec.prompt == "some shots":  # the base also answers with fewer shots
            shots = shots[: rng.randint(0, len(shots))]
        elif self.use_shots is not None:  # evaluation at fewer shots, same queries
            shots = shots[: self.use_shots]
        elif self.annotate == "tally" and shots:  # tallies of 1..N shots: the curve's every k up to N
            shots = shots[: rng.randint(1, len(shots))]
        tok = self.tok
        if self.bpe_dropout:  # this episode's pieces, drawn from its batch's rng
            tok = DroppedMerges(self.tok, self.bpe_dropout, random.Random(rng.random()))
        e = encode_episode(tok, shots, query, self.max_len, self.name, user, self.shot_pairs, self.annotate)
        if self.describe and e.n_shots:
            e.notes = self.notes(tok, shots[len(shots) - e.n_shots:], e.ctx, user, flip)
        return e

    def notes(self, tok, kept, ctx, user, flip):
        """--describe's [(end, ids)] for an episode whose context ctx holds the shots `kept`."""
        notes = [(end, SHOT_HEADER + judge.contrast_summary(user["domain"], s.prompt, s.chosen, s.rejected))
                 for s, end in zip(kept, shot_ends(tok, kept, ctx))]
        if not flip or has_mirror_image(user):  # a flipped ELIX user gets no description
            traits = {a: -w if flip else w for a, w in user["traits"].items()}
            notes.append((len(ctx), COT_HEADER + judge.trait_summary(dict(user, traits=traits))))
        notes = [(end, tok.encode(text) + [tok.eot_id]) for end, text in notes]
        # a note's last token sits at position end + len(ids) - 1: one past the block is left out
        return [(end, ids) for end, ids in notes if end + len(ids) <= self.max_len]

    def draw(self, epoch):
        """The (shots, query) episodes of an epoch, kept in self.episodes: batch j of the epoch
        holds episodes[j * per_batch:(j + 1) * per_batch]."""
        if epoch != self.epoch:
            rng = random.Random(self.seed * 100003 + epoch)
            self.episodes = make_episodes(self.prefs_by_user, self.n, rng, report=False)
            rng.shuffle(self.episodes)
            self.epoch = epoch
        return self.episodes

    def batch(self, i):
        epoch, j = divmod(i, self.per_epoch)
        self.draw(epoch)
        if self.group == 1:
            return self.pack([e for u in self.encoded(epoch * self.per_epoch + j) for e in u])
        # --group K: the K batches of a pool hold the same episodes as without grouping, sorted
        # by length and cut again, so a batch of short episodes is not padded to a long one's
        # length (the padding cost 40% of the annotated SFT's tokens, and attention grows with T)
        j0 = j - j % self.group
        if self.pool[0] != (epoch, j0):
            first = epoch * self.per_epoch + j0  # the pool's batches; an epoch's last pool may be short
            ids = range(first, first + min(self.group, self.per_epoch - j0))
            units = sorted((u for k in ids for u in self.encoded(k)),
                           key=lambda u: max((len(e.ctx) + len(e.chosen), len(e.rejected)) for e in u))
            per = self.per_batch  # units a batch: a mirror pair is never split
            batches = [self.pack([e for u in units[s:s + per] for e in u]) for s in range(0, len(units), per)]
            random.Random(self.seed * 15485863 + ids[0]).shuffle(batches)  # long and short interleaved
            # SFT's token-mean over the pool's mean tokens per batch: the pool's tokens share its
            # K steps evenly, as K ungrouped batches of the mean size would (a batch of short
            # episodes would otherwise give its few tokens a whole step)
            n = sum(int(labelled(b).sum()) for b in batches) / len(batches)
            self.pool = ((epoch, j0), [dict(b, n_labelled=torch.tensor(float(n))) for b in batches])
        return self.pool[1][j - j0]

    def encoded(self, i):
        """The units of batch i, encoded (their shot counts and mirror images drawn per i): [an
        episode] each, or under mirror pairs [an episode, its mirror image] from the same shots."""
        j = i % self.per_epoch
        rng = random.Random(self.seed * 7919 + i)
        eps = self.episodes[j * self.per_batch:(j + 1) * self.per_batch]
        if not self.paired:
            return [[self.encode(s, q, rng)] for s, q in eps]
        units = []
        for s, q in eps:
            state = rng.getstate()  # the mirror image draws the same shots
            plain = self.encode(s, q, rng, flip=False)
            rng.setstate(state)
            units.append([plain, self.encode(s, q, rng, flip=True)])
        return units

    def pack(self, eps):
        return pack_sft(eps, self.tok.eot_id, which=self.which, multiple=self.multiple,
                        context=self.context)

# -----------------------------------------------------------------------------
# batches: one packed row per episode, its parts told apart by segment ids

CONTEXT, CHOSEN, REJECTED, PAD, DESCRIBE = 0, 1, 2, 3, 4  # the segment ids of pack_batch's rows

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
    needs none, so attention runs causally there and skips the upper triangle.
    pair (B, T) says which pair a completion token belongs to: 0 is the query. Episodes with
    shot_pairs (--shot-pairs) also score shot k as pair k: its chosen text, in place in the
    head, is seg 1 (from the token before it), and its rejected text gets a tail piece that
    sees only the head columns before that token, as if it stood in the chosen's slot.
    Episodes with notes (--describe) get one more tail piece per note, seg 4, pair -1, -2, ...,
    before the query's: ctx[end-1] and the note, seeing the head columns before end-1."""
    heads = [e.ctx + e.chosen for e in episodes]
    # tail pieces per row: (head columns it sees, its tokens, its pair); the query's last
    tails = [[(s - 1, [e.ctx[s - 1]] + rej, k) for k, (s, _, rej) in enumerate(e.shot_pairs, 1)]
             + [(end - 1, [e.ctx[end - 1]] + ids, -j) for j, (end, ids) in enumerate(e.notes, 1)]
             + [(len(e.ctx) - 1, e.ctx[-1:] + e.rejected, 0)] for e in episodes]
    B, H = len(episodes), max(map(len, heads))
    # T rounded up to `multiple` (8 on CUDA, whose fused attention kernels want an aligned mask)
    T = -(-(H + max(sum(len(p) for _, p, _ in t) for t in tails)) // multiple) * multiple
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.full((B, T), PAD, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    pair = torch.zeros((B, T), dtype=torch.long)
    sees = torch.zeros((B, T), dtype=torch.long)           # tail column: head columns it sees
    first = torch.arange(T).repeat(B, 1)                   # tail column: its piece's first column
    for b, (e, head, tail) in enumerate(zip(episodes, heads, tails)):
        Lc, m = len(e.ctx), len(head)
        idx[b, :m], pos[b, :m] = torch.tensor(head), torch.arange(m)
        seg[b, :Lc - 1], seg[b, Lc - 1:m] = CONTEXT, CHOSEN
        for k, (start, end, _) in enumerate(e.shot_pairs, 1):
            seg[b, start - 1:end], pair[b, start - 1:end] = CHOSEN, k
        c = H
        for v, piece, k in tail:
            n = len(piece)
            idx[b, c:c + n], pair[b, c:c + n] = torch.tensor(piece), k
            seg[b, c:c + n] = REJECTED if k >= 0 else DESCRIBE
            pos[b, c:c + n], sees[b, c:c + n], first[b, c:c + n] = torch.arange(v, v + n), v, c
            c += n
    # targets: the next token while inside one completion (or note) of one pair; -1 elsewhere
    targets = torch.full((B, T), -1, dtype=torch.long)
    same = (seg[:, 1:] == seg[:, :-1]) & (pair[:, 1:] == pair[:, :-1]) & \
           ((seg[:, :-1] == CHOSEN) | (seg[:, :-1] == REJECTED) | (seg[:, :-1] == DESCRIBE))  # (B, T-1)
    targets[:, :-1] = torch.where(same, idx[:, 1:], -1)
    # tail query c sees the head columns its piece sees, and its piece causally up to itself
    key, col = torch.arange(T), torch.arange(H, T)[:, None]  # (T,), (T-H, 1)
    mask = (key < sees[:, H:, None]) | ((key >= first[:, H:, None]) & (key <= col))  # (B, T-H, T)
    return dict(idx=idx, targets=targets, pos=pos, mask=mask[:, None], seg=seg, pair=pair)

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

def labelled(b):
    """(B, T) True where a token is SFT's to predict: every label but --describe's notes."""
    return (b["targets"] != -1) & (b["seg"] != DESCRIBE)

def sequence_logps(token_lp, seg):
    """(B, T) token log-probs -> summed log p(chosen), log p(rejected), each (B,) float32."""
    token_lp = token_lp.float()
    return (torch.where(seg == 1, token_lp, 0.0).sum(-1),
            torch.where(seg == 2, token_lp, 0.0).sum(-1))

def pair_sums(values, b, n_pairs):
    """(B, T) per-token values -> their sums over each pair's chosen and rejected tokens,
    each (B, n_pairs) float32 (pack_batch's pair ids; the query is pair 0)."""
    values = values.float()
    # a plain sum per pair (not scatter_add, whose float atomics vary run to run on CUDA):
    # with one pair it is sequence_logps' sum exactly
    return tuple(torch.stack([torch.where((b["seg"] == s) & (b["pair"] == k), values, 0.0).sum(-1)
                              for k in range(n_pairs)], 1) for s in (CHOSEN, REJECTED))

def pair_logps(scorer, b):
    """Summed completion log-probs of chosen and rejected, the context run once: (B,), (B,).
    scorer(idx, targets, pos, mask) -> (B, T) per-token log-probs (GPT.token_logprobs)."""
    return sequence_logps(scorer(b["idx"], b["targets"], b["pos"], b["mask"]), b["seg"])

def to_device(b, device):
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="train the BPE tokenizer, or inspect episodes")
    ap.add_argument("--prefs", required=True, help="prefs.jsonl (and users.jsonl beside it, if any)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="tokens incl. EOT")
    ap.add_argument("--out", help="train on the training rows, write the ranks here")
    ap.add_argument("--tokenizer", help="ranks file to inspect episodes with")
    ap.add_argument("--n-shots", type=int, default=4, help="shots per episode")
    ap.add_argument("--max-len", type=int, default=1024, help="context length (block_size)")
    args = ap.parse_args()
    if args.out:
        users = os.path.join(os.path.dirname(args.prefs), "users.jsonl")
        tok = train_tokenizer([(args.prefs, users)], args.vocab_size, args.out)
    else:
        tok = Tokenizer.load(args.tokenizer)
    eps = make_episodes(by_user(load_prefs(args.prefs)), args.n_shots, random.Random(0))
    enc = [encode_episode(tok, s, q, args.max_len) for s, q in eps]
    lens = [len(e.ctx) + len(e.chosen) + len(e.rejected) for e in enc]
    print(f"{len(enc)} episodes, packed length mean {sum(lens) / len(lens):.0f} max {max(lens)}, "
          f"{sum(e.n_shots < args.n_shots for e in enc)} with shots dropped")
    print(tok.decode(enc[0].ctx + enc[0].chosen))
