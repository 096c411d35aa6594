"""Synthetic users for FSPO (roleplay, elix, reviews): personas, questions, answers and labels.

    python generate_synthetic.py --domain all --out data/synth --seed 0
    python generate_synthetic.py --domain all --out data/synth_full --seed 0 --scale full
    python generate_synthetic.py --domain roleplay --out /tmp/ablate --no-views --writers 1 --no-refine
    python generate_synthetic.py --domain roleplay --out /tmp/easy --pair-mode taste \
        --axes formality,confidence,format,example,humor --writers 1   # the cpu preset's users
    python generate_synthetic.py --domain roleplay --out /tmp/mix --taste-frac 0.5  # half the train users easy

The paper writes personas, questions and answers with LLMs and labels pairs with an LLM judge.
Here answers come from short templates whose style is carried by a few salient marker phrases, and
judge.py reads style, level, sentiment and relevance back from the text, so the same judge labels
this data and scores model outputs at evaluation. Labels are Bradley-Terry draws,
p(a over b) = sigmoid((r_u(a) - r_u(b)) / temperature). The paper's structure devices: each pair is
labelled twice and dropped when the draws disagree (--no-consistency turns this off), and a pair
the persona cannot decide adds a trait to the persona and its description, after which all its
pairs are relabelled (--no-refine). Its diversity devices: several viewpoints per question
(--no-views) and several template families, "writers" (--writers K).

Roleplay users are also diverse in who they are (--no-diversity turns the first two off): each labels
at its own temperature (--temperature times 0.5-3, log-uniform: some labellers are inconsistent);
one in three is "focused", weighing its first trait 3-6 and the rest 0.5-1; and every user belongs
to a persona family (users.jsonl "family", rows' tags.family): "open" (any traits) or a type whose
members all hold a signature pair of traits (RP_FAMILIES). One family, formal-joker by default
(--holdout-family, '' for none), is left out of training: its users (5%) are all in val and test, and
no other user holds its signature, so held-out users include a combination of tastes training never
sampled. Elix and reviews users' family is their level or scorer type (reviews' interpolated types
have no training users).

Output per domain: <out>/<domain>/users.jsonl, prefs.jsonl (prompt, chosen, rejected, split, tags)
and stats.json (counts per split, label entropy, diversity). Splits: "train" users train; the held-out
users are halved into "val" (the training-time metric and any tuning) and "test" (the report), and
both see only held-out questions.
API used by training and evaluation (from judge.py): load_users(path), score(user, prompt, response),
trait_summary(user), summary_for_response(user, prompt, response), trait_recovery(user, text).
"""
import argparse
import filecmp
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
from collections import namedtuple
from functools import lru_cache

from tqdm import tqdm

import judge
from judge import EX_LEVELS, MARGIN, sign, words_of
from judge import load_users, score, summary_for_response, trait_recovery, trait_summary  # noqa: F401 (the API)

N_VIEWS = 4         # viewpoints per question when view conditioning is on
TEST_Q_FRAC = 0.18  # subjects, concepts or movies reserved for held-out users
# ELIX and Reviews hold out a fifth and a quarter of their trained users (Elix.roster, Reviews.roster;
# roleplay a tenth), since their tables compare methods a few points apart; their user counts make
# about as many train as when they held out a tenth and an eighth (495 and 355, then 495 and 352).
SCALES = {  # domain -> (users, preference rows per user)
    "tiny": {"roleplay": (60, 12), "elix": (40, 10), "reviews": (40, 10)},
    "default": {"roleplay": (1500, 27), "elix": (620, 20), "reviews": (588, 24)},
    "full": {"roleplay": (1500, 440), "elix": (620, 420), "reviews": (588, 420)},
}
NAMES = ("Ava Ben Chloe Dev Elena Farid Grace Hiro Ines Jamal Kira Leo Maya Nico Olga Priya Quinn "
         "Rosa Sam Tariq Uma Victor Wen Xena Yusuf Zoe Arjun Bea Carlos Dana Emil Fatima").split()


SPLITS = ("train", "val", "test")  # val: training-time metric and tuning; test: the report


def held_out_blocks(n, size, fraction, rng):
    """{block: "val" or "test"} for the blocks of `size` consecutive users that are held out: at
    least two, the first half of a random order (rounded down) validation, the rest test."""
    blocks = n // size
    held = rng.sample(range(blocks), max(2, round(fraction * blocks)))
    return {b: "val" if k < len(held) // 2 else "test" for k, b in enumerate(held)}


class Writer:
    """Persona and answer-writing logic shared by the domains (mixed into each domain's judge)."""
    weight_range = (1.0, 2.0)

    def add_trait(self, user, axis, s, rng):
        user["traits"][axis] = round(s * self.weight(user, axis, rng), 2)
        user["description"] += " " + rng.choice(self.phrases[axis][s < 0])

    def weight(self, user, axis, rng):
        return rng.uniform(*self.weights(axis))

    def weights(self, axis):
        return self.weight_range

    def items_for(self, seed):
        return self.items

    def split_key(self, item):
        return item[2][1]  # roleplay subject, elix concept

    def view(self, rng, cfg):
        return rng.randrange(N_VIEWS) if cfg.views else 0

    def random_style(self, rng):
        return {a: rng.choice(self.values[a]) for a in self.axes}

    def trait_axes(self):
        """Axes personas may care about and pairs differ on (--axes narrows roleplay's)."""
        keep = getattr(_CFG, "axes", None) if self.name == "roleplay" else None
        return [a for a in self.axes if not keep or a in keep]


# ---------------------------------------------------------------- roleplay
RP_QUESTIONS = ("What should a beginner know about {s}?", "What is the secret to great {s}?",
                "What mistakes do people make with {s}?", "How can I enjoy {s} more?",
                "Is {s} worth the effort?", "Where should I start with {s}?")
# One frame per viewpoint: answer, background, two extra sentences (long answers), example.
RP_FRAMES = (
    ("{C} practice {s} with {w0}.", "{B} {s} rewards patient {w1}.", "Start with {w2}.", "Track your {w3}.",
     "{E} daily {w4} helped."),
    ("{C} buy good {w0} for {s}.", "{B} {s} trouble starts with {w1}.", "Borrow {w2} first.", "Compare {w3} carefully.",
     "{E} cheap {w4} changed everything."),
    ("{C} never rush {w0} in {s}.", "{B} {s} punishes careless {w1}.", "Check {w2} twice.", "Watch the {w3}.",
     "{E} skipping {w4} hurt."),
    ("{C} share {s} with {w0} fans.", "{B} {s} grows with shared {w1}.", "Swap tips about {w2}.", "Join a {w3} club.",
     "{E} neighbors taught me {w4}."),
    ("{C} experiment with {w0} in {s}.", "{B} {s} loves curious {w1}.", "Try new {w2} weekly.", "Log each {w3}.",
     "{E} mixing {w4} surprised me."),
    ("{C} plan {s} around {w0}.", "{B} good {s} needs clear {w1}.", "Set goals for {w2}.", "Review {w3} monthly.",
     "{E} a {w4} schedule worked."),
)
# Writers: formal and casual opener, confident and hedged adverb, background and example lead-ins,
# joke, bullet (None: a numbered list).
RP_WRITERS = (
    ("Certainly.", "Hey!", "Definitely", "Probably", "Background:", "For example,", "Ha, {s} forever!", "- "),
    ("Greetings.", "Yo!", "Always", "Maybe", "Context:", "For instance,", "(Pun intended.)", "* "),
    ("Indeed.", "Oh, cool!", "Surely", "Perhaps", "Generally,", "Personally,", "Lol, classic {s}.", None),
)
RP_PHRASES = {  # [axis][value < 0]: a stated and an implied way to put it in a description
    "formality": (("They expect polished, formal replies.", "They write legal letters and notice sloppy wording."),
                  ("They want a casual, chatty tone.", "They text in slang and find stiff replies off-putting.")),
    "confidence": (("They want confident, decisive advice.", "They make quick decisions and hate wishy-washy answers."),
                   ("They trust cautious, hedged advice.", "They double-check everything and distrust certainty.")),
    "format": (("They like answers as bullet lists.", "They run their life on checklists."),
               ("They prefer flowing prose to lists.", "They read essays for fun and find bullet points choppy.")),
    "example": (("They want a concrete example in every answer.", "They always ask to be shown how."),
                ("They want the point without examples.", "They find anecdotes a waste of time.")),
    "humor": (("They enjoy a joke in an answer.", "They laugh easily and like playful replies."),
              ("They want answers to stay serious.", "They find jokes unprofessional.")),
    "order": (("They want the answer first and context after.", "They are always in a hurry to get the point."),
              ("They like background before the answer.", "They need to understand the why before the what.")),
    "technical": (("They like precise technical terms.", "They read trade journals and enjoy jargon."),
                  ("They want plain everyday words.", "They tune out as soon as jargon appears.")),
    "length": (("They like detailed, thorough answers.", "They want several tips, not just one."),
               ("They want short, concise answers.", "They read on their phone between meetings.")),
}
# Persona families: traits every member holds (axis: sign), persona types real users cluster into.
# Users outside the left-out family (--holdout-family) never hold its whole signature, so val and
# test meet a combination of tastes no training user has.
RP_FAMILIES = {"open": {}, "formal-joker": {"formality": 1, "humor": 1},
               "casual-expert": {"formality": -1, "technical": 1},
               "hedging-teacher": {"confidence": -1, "example": 1},
               "busy-reader": {"length": -1, "order": 1}}
OPEN_WEIGHT = 2        # "open" users (any traits) are drawn twice as often as each signature family
LEFT_OUT_FRAC = 0.05   # share of roleplay users in the left-out family, all held out
TEMPERATURE_RANGE = (0.5, 3.0)  # per-user multiplier of --temperature, log-uniform (--no-diversity: 1)
# Focused users care far more about their first trait than the rest: weights 3-6 against 0.5-1 (a
# faint trait still decides a pair alone, 2 * 0.5 >= MARGIN). Four traits sum to at most 9, so
# style never outweighs relevance (2 * 9 < W_REL). --no-diversity: nobody is focused.
FOCUSED_FRAC, FOCUS, FAINT = 1 / 3, 3.0, 0.5
RP_JOBS = ("nurse teacher electrician accountant barista farmer librarian pilot chef lawyer student "
           "firefighter pharmacist journalist plumber dentist architect welder").split()
RP_HOBBIES = ("birdwatching", "salsa dancing", "woodworking", "knitting", "trail running", "jigsaw puzzles",
              "volunteering", "vinyl collecting", "karaoke", "sailing", "podcasts", "bowling")


class Roleplay(Writer, judge.Roleplay):
    prefix = "rp"
    values = {a: (-1, 1) for a in judge.Roleplay.axes}
    phrases = RP_PHRASES
    skew = {"length": 0.6, "example": 0.4}  # P(negative value): mild population-level tastes
    # the shortest plain answer: the style of the axes a narrowed run (--axes) leaves out
    plain = {"formality": 1, "confidence": 1, "format": -1, "example": -1, "humor": -1, "order": 1,
             "technical": -1, "length": -1}

    @property
    def max_traits(self):  # --max-traits (read while labelling, when _CFG is set)
        return _CFG.max_traits

    def random_style(self, rng):
        axes = self.trait_axes()
        return {a: rng.choice(self.values[a]) if a in axes else self.plain[a] for a in self.axes}

    def families(self):
        """The families --axes allows (their signatures use only its axes)."""
        return [f for f, sig in RP_FAMILIES.items() if set(sig) <= set(self.trait_axes())]

    def add_trait(self, user, axis, s, rng):
        left_out = RP_FAMILIES.get(_CFG.holdout_family, {})
        if user["family"] != _CFG.holdout_family and left_out.get(axis) == s and \
                all(sign(user["traits"].get(a, 0)) == v for a, v in left_out.items() if a != axis):
            s = -s  # this trait would complete the left-out family's signature
        super().add_trait(user, axis, s, rng)

    def weight(self, user, axis, rng):
        w = super().weight(user, axis, rng)
        return w * (FAINT if user["traits"] else FOCUS) if user.get("focused") else w

    def __init__(self):
        super().__init__()
        self.items = [(f"rp{i:04d}", q.format(s=s), (t, s))
                      for i, (s, t, q) in enumerate((s, t, q) for s, t in self.subjects.items() for q in RP_QUESTIONS)]

    @lru_cache(maxsize=None)
    def plan(self, qid):
        """Per viewpoint: a frame and which five topic words it uses (fixed for the question)."""
        rng = random.Random(f"views/{qid}")
        return [(f, rng.sample(range(8), 5)) for f in rng.sample(range(len(RP_FRAMES)), N_VIEWS)]

    def render(self, meta, qid, st, view, writer):
        topic, s = meta
        frame, idx = self.plan(qid)[view]
        words = self.topics[topic][2 if st["technical"] > 0 else 1]
        W, F = RP_WRITERS[writer], RP_FRAMES[frame]
        fill = dict(C=W[2] if st["confidence"] > 0 else W[3], B=W[4], E=W[5], s=s,
                    **{f"w{i}": words[j] for i, j in enumerate(idx)})
        body = [F[0]] + ([F[2 + writer % 2]] if st["length"] > 0 else [])
        body = [b.format(**fill) for b in (body + [F[1]] if st["order"] > 0 else [F[1]] + body)]
        tail = ([F[4].format(**fill)] if st["example"] > 0 else []) + ([W[6].format(s=s)] if st["humor"] > 0 else [])
        opener = W[0] if st["formality"] > 0 else W[1]
        if st["format"] < 0:
            return " ".join([opener] + body + tail)
        marks = [W[7] or f"{i + 1}. " for i in range(len(body))]
        return "\n".join([opener] + [m + b for m, b in zip(marks, body)] + ([" ".join(tail)] if tail else []))

    def new_user(self, rng, uid, split, group, family):
        user = {"user_id": uid, "domain": self.name, "split": split, "group": group, "family": family,
                "traits": {}, "description": f"{rng.choice(NAMES)} is a {rng.randint(18, 75)}-year-old "
                                             f"{rng.choice(RP_JOBS)} who enjoys {rng.choice(RP_HOBBIES)}."}
        if _CFG.diversity:  # an inconsistent labeller draws its labels at its own temperature
            lo, hi = map(math.log, TEMPERATURE_RANGE)
            user["temperature"] = round(_CFG.temperature * math.exp(rng.uniform(lo, hi)), 3)
            user["focused"] = rng.random() < FOCUSED_FRAC
        if split == "train" and _CFG.taste_frac:  # its own draw: the other users stay as they were
            user["taste"] = random.Random(f"taste/{_CFG.seed}/{uid}").random() < _CFG.taste_frac
        for axis, s in RP_FAMILIES[family].items():
            self.add_trait(user, axis, s, rng)
        # --traits: how many traits a persona starts with (default 1-3, mostly 2; a family's signature at least)
        k = rng.choice(_CFG.traits) if _CFG.traits else rng.choices((1, 2, 3), weights=(35, 40, 25))[0]
        rest = [a for a in self.trait_axes() if a not in user["traits"]]
        for axis in rng.sample(rest, max(0, min(len(rest), k - len(user["traits"])))):
            self.add_trait(user, axis, -1 if rng.random() < self.skew.get(axis, 0.5) else 1, rng)
        return user

    def split_key(self, item):
        return item[0]  # held-out questions ask known subjects in ways no training row does

    def pair(self, rng, user, item, cfg):
        """A minimal pair: one viewpoint and writer, two styles that differ on --pair-axes axes
        (default two to four), so the pair's difference is all style and the label all taste."""
        qid, _, meta = item
        a = self.random_style(rng)
        axes = self.trait_axes()
        if cfg.pair_mode == "taste" or user.get("taste"):  # one answer in the user's style, the other breaks some of it
            a.update({ax: sign(w) for ax, w in user["traits"].items()})
            axes = list(user["traits"])
        b = dict(a)
        for axis in rng.sample(axes, min(len(axes), rng.choice(cfg.pair_axes))):
            b[axis] = -b[axis]
        view, writer = self.view(rng, cfg), rng.randrange(cfg.writers)
        return [self.render(meta, qid, st, view, writer) for st in (a, b)], {}

    def roster(self, n, rng):
        """Seen families' users, 10% held out; then the left-out family's users, all held out."""
        left_out = _CFG.holdout_family
        n_new = max(2, round(LEFT_OUT_FRAC * n)) if left_out else 0
        seen = [f for f in self.families() if f != left_out]
        weights = [OPEN_WEIGHT if f == "open" else 1 for f in seen]
        held = held_out_blocks(n - n_new, 1, 0.1, rng)
        return [(i, held.get(i, "train"), "persona", rng.choices(seen, weights)[0]) for i in range(n - n_new)] + \
               [(i, ("val", "test")[i % 2], "persona", left_out) for i in range(n - n_new, n)]


# ---------------------------------------------------------------- elix
EX_TEMPLATES = (  # [level][writer]
    ("Imagine {c} is a giant {k}! It makes {p1} wiggle. Wow!", "{C} is like a magic {k}. It helps {p1} grow. Yay!",
     "Guess what? {C} is a super {k} for {p1}. Whee!"),
    ("{C} is basically how {p1} works, kind of like a {k}.", "Basically, {c} is a {k} for {p1} and {p2}. Pretty neat.",
     "Here's the deal: {c} connects {p1} and {p2}, like your {k}."),
    ("Honestly, {c} is how {p1} shapes {p2}. Think of it as your {k}.",
     "Real talk: {c} links {p1} to {p2}, like a {k}.", "Lowkey, {c} is all about {p1} and {p2}, like a {k}."),
    ("{C} refers to how {p1} affects {j1}. In practice, it works like a {k}.",
     "Essentially, {c} describes {p1} and {j1}, much like a {k}.",
     "{C} means {p1} drives {j1}; day to day, it resembles a {k}."),
    ("{C} denotes the coupling of {j1} and {j2}, formally characterized via {j3}.",
     "Formally, {c} arises from {j1} under {j2}, whereby {j3} dominates.",
     "{C} is canonically modeled through {j1}, with {j2} governing {j3}."),
)
EX_ANALOGY = ("toy puppy crayon sandbox balloon cookie", "bicycle backpack skateboard locker sleepover trampoline",
              "playlist concert hoodie prom permit skatepark", "budget commute lease paycheck spreadsheet roommate", "")
EX_EXAMPLE = ("For example, think about {x}.", "For instance, look at {x}.", "Picture {x} in action.")
EX_DETAIL = ("Also, it matters for {x}.", "Plus, it shows up in {x}.", "On top of that, {x} depends on it.")
EX_BIO = ("{n} is {a} years old and loves stories with simple words.", "{n} is {a} and in middle school.",
          "{n} is a {a}-year-old high school student who hates baby talk.",
          "{n} is a {a}-year-old college graduate starting a first job.",
          "{n} is a {a}-year-old professor who wants precise, technical explanations.")
EX_AGES = ((6, 8), (10, 12), (14, 17), (19, 26), (35, 70))
EX_PHRASES = {"example": (("They learn best from a concrete example.",), ("They find examples unnecessary.",)),
              "detail": (("They like an extra detail or two.",), ("They like explanations kept brief.",))}


class Elix(Writer, judge.Elix):
    prefix = "ex"
    values = {"example": (-1, 1), "detail": (-1, 1)}
    phrases = EX_PHRASES
    max_traits = 2
    weight_range = (0.5, 0.9)  # 2 * 2 * 0.9 < LEVEL_W: missing the level outweighs all secondary traits

    def __init__(self):
        super().__init__()
        self.items = [(f"ex{i:03d}", f"Explain {c}.", (f, c)) for i, (c, f) in enumerate(self.concepts.items())]

    @lru_cache(maxsize=None)
    def plan(self, qid):
        """Per viewpoint: which plain words, jargon and analogy the answers use."""
        rng = random.Random(f"views/{qid}")
        return [(rng.sample(range(6), 4), rng.sample(range(6), 3), rng.randrange(6)) for _ in range(N_VIEWS)]

    def render(self, meta, qid, st, view, writer):
        field, c = meta
        pi, ji, ai = self.plan(qid)[view]
        (plain, jargon), lv = self.fields[field], st["level"]
        analogies = EX_ANALOGY[lv].split()
        fill = dict(c=c, C=c[0].upper() + c[1:], k=analogies[ai] if analogies else "",
                    **{f"p{i + 1}": plain[j] for i, j in enumerate(pi)},
                    **{f"j{i + 1}": jargon[j] for i, j in enumerate(ji)})
        text = EX_TEMPLATES[lv][writer].format(**fill)
        if st["example"] > 0:
            text += " " + EX_EXAMPLE[writer].format(x=fill["p3"])
        if st["detail"] > 0:
            text += " " + EX_DETAIL[writer].format(x=fill["p4"])
        return text

    def random_style(self, rng):
        return dict(super().random_style(rng), level=rng.randrange(5))

    def new_user(self, rng, uid, split, group, kind):
        lv = EX_LEVELS.index(group)
        bio = EX_BIO[lv].format(n=rng.choice(NAMES), a=rng.randint(*EX_AGES[lv]))
        user = {"user_id": uid, "domain": self.name, "split": split, "group": group, "family": group, "traits": {},
                "description": bio}
        for axis in rng.sample(self.axes, rng.choices((0, 1, 2), weights=(40, 40, 20))[0]):
            self.add_trait(user, axis, rng.choice((-1, 1)), rng)
        return user

    def pair(self, rng, user, item, cfg):
        """Two answers at different levels: easy pairs include the user's own level, hard ones do not."""
        qid, _, meta = item
        lv = EX_LEVELS.index(user["group"])
        others = [x for x in range(5) if x != lv]
        easy = rng.random() < 0.5
        levels = [lv, rng.choice(others)] if easy else rng.sample(others, 2)
        rng.shuffle(levels)
        texts = [self.render(meta, qid, dict(self.random_style(rng), level=x), self.view(rng, cfg),
                             rng.randrange(cfg.writers)) for x in levels]
        return texts, {"difficulty": "easy" if easy else "hard"}

    def roster(self, n, rng):
        held = held_out_blocks(n, 5, 0.2, rng)  # whole blocks of five, one user per level
        return [(i, held.get(i // 5, "train"), EX_LEVELS[i % 5], None) for i in range(n)]


# ---------------------------------------------------------------- reviews
RV_VERDICT = ("{T} is a {g} movie with {a} {asp}.", "I found the {asp} in {T}, a {g} film, {a}.",
              "Verdict on {T}: {a} {g} {asp}.")
RV_DETAIL = ("The {asp} around the {gw} feels {a}.", "Its {gw} scenes have {a} {asp}.",
             "Those {gw} moments bring {a} {asp}.")
RV_RATING = ("Rating: {n}/5.", "{n} stars.", "Score: {n} out of 5.")
RV_TYPES = ("positive", "negative", "concise", "verbose")
RV_INTERPOLATED = ("positive+concise", "positive+verbose", "negative+concise", "negative+verbose")
RV_OUTLETS = ("a campus paper", "a film podcast", "a movie blog", "a local radio show", "a weekly newsletter")
RV_PHRASES = {
    "sentiment": (("They reward warm, enthusiastic reviews.", "They want reviews that celebrate what works."),
                  ("They prefer harsh, critical reviews.", "They enjoy reviews that pick a film apart.")),
    "length": (("They love long, thorough reviews.", "They want every part of a film covered."),
               ("They want reviews short and punchy.", "They skim, so brevity wins.")),
    "aspect": (("They care most about the acting.",), ("They care most about the story.",)),
    "rating": (("They like a numeric rating.",), ("They dislike star ratings.",)),
}


class Reviews(Writer, judge.Reviews):
    prefix = "rv"
    values = {"sentiment": (-1, 0, 1), "length": (-1, 0, 1), "aspect": (-1, 1), "rating": (-1, 1)}
    phrases = RV_PHRASES
    max_traits = 4
    weight_range = (2.0, 3.0)  # the scorer type's traits
    side = (0.5, 0.8)  # secondary tastes that vary users within a type; 2 * 0.5 >= MARGIN decides a pair

    def items_for(self, seed):
        """Procedural movies, a title and a genre each; they depend on the seed."""
        rng = random.Random(f"{seed}/reviews/movies")
        titles = rng.sample([f"The {a} {b}" for a in judge.RV_TITLE[0] for b in judge.RV_TITLE[1]], 480)
        return [(f"rv{i:03d}", f"Review {t}, a {g} movie.", (t, g))
                for i, (t, g) in enumerate((t, rng.choice(sorted(judge.RV_GENRES))) for t in titles)]

    def split_key(self, item):
        return item[2][0]  # the movie title

    def weights(self, axis):
        return self.weight_range if axis in self.group_traits else self.side

    @lru_cache(maxsize=None)
    def plan(self, qid):
        """Per viewpoint: which genre words, aspect words and adjectives the reviews use."""
        rng = random.Random(f"views/{qid}")
        return [(rng.sample(range(6), 2), rng.sample(range(6), 3), rng.sample(range(8), 3), rng.sample(range(8), 3))
                for _ in range(N_VIEWS)]

    def render(self, meta, qid, st, view, writer):
        title, genre = meta
        gi, si, pi, ni = self.plan(qid)[view]
        s = st["sentiment"]
        pos, neg = judge.RV_TONE["positive"].split(), judge.RV_TONE["negative"].split()
        adj = [pos[p] if s > 0 else neg[q] if s < 0 else f"{pos[p]} but {neg[q]}" for p, q in zip(pi, ni)]
        asp = [judge.RV_ASPECT["acting" if st["aspect"] > 0 else "story"].split()[j] for j in si]
        gw = judge.RV_GENRES[genre].split()
        out = [RV_VERDICT[writer].format(T=title, g=genre, a=adj[0], asp=asp[0])]
        # a second detail sentence in the next writer's frame: two sentences one word apart
        # are what a small model's greedy answers repeat, in place of ending the review
        out += [RV_DETAIL[(writer + i) % len(RV_DETAIL)].format(gw=gw[gi[i]], a=adj[i + 1], asp=asp[i + 1])
                for i in range(st["length"] + 1)]
        if st["rating"] > 0:
            out.append(RV_RATING[writer].format(n=3 + s))
        return " ".join(out)

    def new_user(self, rng, uid, split, group, kind):
        user = {"user_id": uid, "domain": self.name, "split": split, "group": group, "type": kind, "family": kind,
                "traits": {}, "description": f"{rng.choice(NAMES)} reviews films for {rng.choice(RV_OUTLETS)}."}
        for t in kind.split("+"):
            self.add_trait(user, "sentiment" if t in ("positive", "negative") else "length",
                           1 if t in ("positive", "verbose") else -1, rng)
        if rng.random() < 0.5:
            self.add_trait(user, rng.choice(("aspect", "rating")), rng.choice((-1, 1)), rng)
        return user

    def pair(self, rng, user, item, cfg):
        """Two reviews of the movie with independently drawn (and different) styles."""
        qid, _, meta = item
        a = self.random_style(rng)
        b = a
        while b == a:
            b = self.random_style(rng)
        return [self.render(meta, qid, st, self.view(rng, cfg), rng.randrange(cfg.writers)) for st in (a, b)], {}

    def roster(self, n, rng):
        n_int = n // 5  # interpolated users are all held out; trained ones in blocks of four, one per type
        held = held_out_blocks(n - n_int, 4, 0.25, rng)
        return [(i, held.get(i // 4, "train"), "trained", RV_TYPES[i % 4]) for i in range(n - n_int)] + \
               [(i, ("val", "test")[i // 4 % 2], "interpolated", RV_INTERPOLATED[i % 4]) for i in range(n - n_int, n)]


DOMAINS = {d.name: d for d in (Roleplay(), Elix(), Reviews())}


# ---------------------------------------------------------------- labelling
def sigmoid(x):
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))


def entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0


# A candidate pair: two answers, what the judge reads in each, and the two uniform draws that label it.
Pair = namedtuple("Pair", "qid prompt a b fa fb tags u1 u2")


def margin(dom, user, c):
    return dom.reward(user, c.fa) - dom.reward(user, c.fb)


def label(dom, user, cands, cfg, rng):
    """Refine the persona until it decides its pairs (or reaches its trait cap), then label each pair
    twice. Returns [(pair, p(chosen), a_is_chosen)] for the kept pairs, and counters."""
    added = 0
    while True:
        deltas = [margin(dom, user, c) for c in cands]
        if not cfg.refine or len(user["traits"]) >= dom.max_traits:
            break
        # the first undecided pair that differs on an axis the persona has no opinion about yet
        new = next((axes for c, d in zip(cands, deltas) if abs(d) < MARGIN
                    for axes in [[a for a in dom.trait_axes() if a not in user["traits"] and a not in dom.group_traits
                                  and c.fa[a] != c.fb[a]]] if axes), None)
        if new is None:
            break
        dom.add_trait(user, rng.choice(new), rng.choice((-1, 1)), rng)
        added += 1
    kept, n = [], {"inconsistent": 0, "undecidable": 0, "traits_added": added}
    for c, d in zip(cands, deltas):
        p = sigmoid(d / user.get("temperature", cfg.temperature))  # Bradley-Terry: p(a preferred over b)
        first, second = c.u1 < p, c.u2 < p
        if cfg.refine and abs(d) < MARGIN:
            n["undecidable"] += 1
        elif cfg.consistency and first != second:
            n["inconsistent"] += 1
        else:
            kept.append((c, p if first else 1 - p, first))
    return kept, n


def make_user(job):
    """One user: persona, candidate pairs, labels. A pure function of (seed, domain, index), so the
    number of worker processes never changes the output."""
    name, i, split, group, kind, target = job
    dom, cfg = DOMAINS[name], _CFG
    rng = random.Random(f"{cfg.seed}/{name}/{i}")
    user = dom.new_user(rng, f"{dom.prefix}{i:05d}", split, group, kind)
    initial = dict(user, traits=dict(user["traits"]))
    pool = cfg.pools[name][split]
    order = rng.sample(pool, len(pool))  # each question once before any repeats
    cands, want = [], target + target // 4 + 2
    for _ in range(4):  # refinement drops undecidable pairs: top up until the target is met
        for _ in range(want):
            qid, prompt, _ = item = order[len(cands) % len(order)]
            (a, b), tags = dom.pair(rng, user, item, cfg)
            cands.append(Pair(qid, prompt, a, b, dom.read(prompt, a), dom.read(prompt, b), tags,
                              rng.random(), rng.random()))
        kept, n = label(dom, user, cands, cfg, rng)
        if len(kept) >= target:
            break
        want = 2 * (target - len(kept)) + 2
    kept = kept[:target]
    rows = []
    for c, p, first in kept:
        d = margin(dom, user, c)
        n["ties"] = n.get("ties", 0) + (abs(d) < MARGIN)
        n["agree"] = n.get("agree", 0) + (abs(d) >= MARGIN and (d > 0) == first)
        n["easy"] = n.get("easy", 0) + (c.tags.get("difficulty") == "easy")
        chosen, rejected = (c.a, c.b) if first else (c.b, c.a)
        rows.append(json.dumps({"user_id": user["user_id"], "prompt": c.prompt, "chosen": chosen,
                                "rejected": rejected, "split": split,
                                "tags": {"question_id": c.qid, "family": user["family"], "p_chosen": round(p, 3),
                                         **c.tags}}, sort_keys=True))
    n.update(candidates=len(cands), rows=len(rows), traits_initial=len(initial["traits"]),
             traits_final=len(user["traits"]), h_kept=sum(entropy(p) for _, p, _ in kept),
             h_initial=sum(entropy(sigmoid(margin(dom, initial, c) / user.get("temperature", cfg.temperature)))
                           for c in cands))
    sample = [(c.qid, t) for c, _, _ in kept[:2] for t in (c.a, c.b)]
    return json.dumps(user, sort_keys=True), rows, n, sample


# ---------------------------------------------------------------- diversity
def similarity(texts):
    """Mean pairwise Jaccard similarity of word sets (lower = more diverse)."""
    sets = [set(words_of(t)) for t in texts]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    return sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs) if pairs else 0.0


def mean_similarity(by_question):
    groups = [ts[:10] for ts in by_question.values() if len(ts) >= 2][:400]
    return round(sum(map(similarity, groups)) / len(groups), 4) if groups else None


def diversity_ablation(dom, items, seed, writers):
    """Similarity of 8 answers per question, for views off/on x one/all writers, same styles."""
    out = {}
    for views in (False, True):
        for k in sorted({1, writers}):
            rng = random.Random(f"{seed}/{dom.name}/diversity")
            groups = {}
            for qid, _, meta in items[:100]:
                groups[qid] = [dom.render(meta, qid, dom.random_style(rng), rng.randrange(N_VIEWS) if views else 0,
                                          rng.randrange(k)) for _ in range(8)]
            out[f"views={int(views)},writers={k}"] = mean_similarity(groups)
    return out


# ---------------------------------------------------------------- generation
_CFG = None


def _init_worker(cfg):
    global _CFG
    _CFG = cfg


def write_atomic(path, lines):
    with open(path + ".tmp", "w") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(path + ".tmp", path)


def generate(name, cfg, out_dir):
    """Generate one domain into out_dir/<name>/ and return its stats."""
    _init_worker(cfg)  # this process reads the config too: diversity_ablation draws styles with it
    dom = DOMAINS[name]
    n_users, n_pairs = cfg.sizes[name]
    items = dom.items_for(cfg.seed)
    rng = random.Random(f"{cfg.seed}/{name}/split")
    # held-out questions: roleplay holds out whole questions, elix and reviews whole concepts or movies
    keys = sorted({dom.split_key(it) for it in items})
    test_keys = set(rng.sample(keys, round(TEST_Q_FRAC * len(keys))))
    cfg.pools[name] = {s: [it for it in items if (dom.split_key(it) in test_keys) == (s != "train")]
                       for s in SPLITS}  # val and test users share the held-out questions
    jobs = [(name, i, split, group, kind, n_pairs) for i, split, group, kind in dom.roster(n_users, rng)]
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    users, totals, by_question = [], {}, {}
    prefs_path = os.path.join(folder, "prefs.jsonl")
    with open(prefs_path + ".tmp", "w") as f:
        if cfg.workers > 1:
            pool = multiprocessing.Pool(cfg.workers, _init_worker, (cfg,))
            results = pool.imap(make_user, jobs, chunksize=8)
        else:
            pool, results = None, map(make_user, jobs)
        for user_line, rows, n, sample in tqdm(results, total=len(jobs), desc=name, disable=None, leave=False):
            users.append((user_line, n))
            f.writelines(r + "\n" for r in rows)
            for k, v in n.items():
                totals[k] = totals.get(k, 0) + v
            for qid, text in sample:
                by_question.setdefault(qid, []).append(text)
        if pool:
            pool.close()
            pool.join()
    os.replace(prefs_path + ".tmp", prefs_path)
    write_atomic(os.path.join(folder, "users.jsonl"), [u for u, _ in users])
    rows_split = {s: sum(n["rows"] for (_, n), job in zip(users, jobs) if job[2] == s) for s in SPLITS}
    per_user = [n["rows"] for _, n in users]
    groups = {}
    for job in jobs:
        key = job[4] or job[3]
        groups.setdefault(key, dict.fromkeys(SPLITS, 0))[job[2]] += 1
    stats = {
        "domain": name, "seed": cfg.seed,
        "config": recipe(cfg, name),
        "users": {s: sum(j[2] == s for j in jobs) for s in SPLITS}, "groups": groups,
        "questions": {s: len(v) for s, v in cfg.pools[name].items()},
        "rows": rows_split, "rows_total": sum(per_user),
        "rows_per_user": {"min": min(per_user), "mean": round(sum(per_user) / len(per_user), 2), "max": max(per_user)},
        "users_short": sum(r < n_pairs for r in per_user),
        "candidates": totals["candidates"], "dropped_inconsistent": totals["inconsistent"],
        "dropped_undecidable": totals["undecidable"], "traits_added": totals["traits_added"],
        "traits_per_user": {"initial": round(totals["traits_initial"] / n_users, 3),
                            "final": round(totals["traits_final"] / n_users, 3)},
        # mean binary entropy of the label probability, in nats: over all candidate pairs with the
        # personas as first written, and over the kept pairs with the final personas
        "label_entropy_initial": round(totals["h_initial"] / totals["candidates"], 4),
        "label_entropy": round(totals["h_kept"] / max(1, sum(per_user)), 4),
        # kept rows whose label follows the sign of the final persona's reward, among decided rows
        "label_agreement": round(totals.get("agree", 0) / max(1, sum(per_user) - totals.get("ties", 0)), 4),
        "undecided_rows": totals.get("ties", 0),
        "diversity": mean_similarity(by_question),
        "diversity_ablation": diversity_ablation(dom, cfg.pools[name]["train"], cfg.seed, cfg.writers),
    }
    if name == "elix":
        stats["difficulty"] = {"easy": totals.get("easy", 0), "hard": sum(per_user) - totals.get("easy", 0)}
    write_atomic(os.path.join(folder, "stats.json"), [json.dumps(stats, indent=1, sort_keys=True)])
    return stats


def recipe(cfg, name):
    """The settings that decide a domain's data (stats.json "config"; the main job compares them)."""
    return {k: getattr(cfg, k) for k in ("scale", "temperature", "views", "writers", "refine", "consistency", "axes",
                                         "max_traits", "pair_axes", "pair_mode", "taste_frac", "traits",
                                         "diversity", "holdout_family")} \
        | {"users": cfg.sizes[name][0], "pairs_per_user": cfg.sizes[name][1]}


def refuse_stale(folder, remedy):
    """Stop, naming the file and `remedy`, if one domain's folder is not what this code writes
    with its stats.json's settings (stale_files): the main job's cache and eval.py --data."""
    if stale := stale_files(folder):
        raise SystemExit(f"{os.path.join(folder, stale[0])}: not what generate_synthetic.py and judge.py "
                         f"write today with the settings of its stats.json (their code changed since); {remedy}")


def stale_files(folder):
    """The files of one domain's folder (<out>/<domain>), of those there, that this code, run
    again with the settings its stats.json records (seconds at the default scale), writes
    otherwise: [] where the data is what the generator and judge write today. Settings alone
    miss a change to their code, and models trained on the old labels would be scored under
    the new ones."""
    with open(os.path.join(folder, "stats.json")) as f:
        stats = json.load(f)
    if not {"domain", "seed", "config"} <= set(stats):  # written before stats.json kept its settings
        return ["stats.json"]
    name = stats["domain"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_args(["--domain", name, "--out", tmp, "--seed", str(stats["seed"])])
        conf = dict(stats["config"])
        cfg.sizes = {name: (conf.pop("users"), conf.pop("pairs_per_user"))}
        vars(cfg).update(conf)
        generate(name, cfg, tmp)
        return [f for f in ("prefs.jsonl", "users.jsonl") if os.path.exists(os.path.join(folder, f))
                and not filecmp.cmp(os.path.join(tmp, name, f), os.path.join(folder, f), shallow=False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Synthetic FSPO users, preferences and judge.")
    p.add_argument("--domain", default="all", choices=("roleplay", "elix", "reviews", "all"))
    p.add_argument("--out", required=True, help="output folder; writes <out>/<domain>/{users,prefs}.jsonl, stats.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default="default", choices=tuple(SCALES), help="preset sizes per domain")
    p.add_argument("--users", type=int, help="users per domain (overrides --scale)")
    p.add_argument("--pairs", type=int, help="preference rows per user (overrides --scale)")
    p.add_argument("--temperature", type=float, default=0.8, help="Bradley-Terry label temperature")
    p.add_argument("--no-views", dest="views", action="store_false", help="one viewpoint per question")
    p.add_argument("--writers", type=int, default=3, help="template families used, 1-3")
    p.add_argument("--no-refine", dest="refine", action="store_false", help="no iterative persona refinement")
    p.add_argument("--no-consistency", dest="consistency", action="store_false", help="keep order-inconsistent labels")
    p.add_argument("--workers", type=int, default=2, help="processes; output bytes do not depend on it")
    p.add_argument("--axes", type=lambda v: v.split(","), default=None,
                   help="roleplay: comma list of the style axes personas care about and pairs differ on "
                        f"(default all: {','.join(judge.Roleplay.axes)})")
    p.add_argument("--max-traits", type=int, default=4, help="roleplay: traits a persona may end with")
    p.add_argument("--traits", type=lambda v: [int(k) for k in v.split(",")], default=None,
                   help="roleplay: initial traits per persona, drawn from this list (default 1-3, mostly 2); "
                        "a persona with one trait agrees with half of all answers on everything it cares about")
    p.add_argument("--pair-axes", type=lambda v: [int(k) for k in v.split(",")], default=[2, 2, 3, 3, 4],
                   help="roleplay: how many axes the two answers of a pair differ on, drawn from this list")
    p.add_argument("--pair-mode", choices=("random", "taste"), default="random",
                   help="roleplay: random = two random styles; taste = one answer in the user's style "
                        "and one that breaks --pair-axes of its traits (easier users)")
    p.add_argument("--taste-frac", type=float, default=0.0,
                   help="roleplay: this share of TRAIN users gets taste pairs (a curriculum device: "
                        "val and test users keep --pair-mode)")
    p.add_argument("--no-diversity", dest="diversity", action="store_false",
                   help="roleplay: every user labels at --temperature and draws trait weights from 1-2 "
                        "(default: per-user temperatures and heavy-tailed weights)")
    p.add_argument("--holdout-family", default="formal-joker", choices=("", *list(RP_FAMILIES)[1:]),
                   help="roleplay: the persona family that only val and test users belong to; '' for none")
    cfg = p.parse_args(argv)
    if cfg.users is not None and cfg.users < 20:
        p.error("--users must be at least 20 (each domain needs train and held-out users)")
    if cfg.pairs is not None and cfg.pairs < 1:
        p.error("--pairs must be at least 1")
    if not 1 <= cfg.writers <= len(RP_WRITERS):
        p.error(f"--writers must be between 1 and {len(RP_WRITERS)}")
    if not 0 < cfg.temperature < math.inf:
        p.error("--temperature must be a positive number")
    if cfg.axes and (set(cfg.axes) - set(judge.Roleplay.axes) or len(cfg.axes) < 2):
        p.error(f"--axes takes two or more of {','.join(judge.Roleplay.axes)}")
    if cfg.traits and not all(1 <= k <= len(judge.Roleplay.axes) for k in cfg.traits):
        p.error(f"--traits takes counts between 1 and {len(judge.Roleplay.axes)}")
    if not 1 <= cfg.max_traits <= len(judge.Roleplay.axes) or min(cfg.pair_axes) < 1:
        p.error("--max-traits and --pair-axes must be positive (max traits at most the axes)")
    if not 0 <= cfg.taste_frac <= 1:
        p.error("--taste-frac must be between 0 and 1")
    if cfg.workers < 1:
        p.error("--workers must be at least 1")
    if cfg.axes and not set(RP_FAMILIES.get(cfg.holdout_family, {})) <= set(cfg.axes):
        p.error(f"--holdout-family {cfg.holdout_family} needs the axes {','.join(RP_FAMILIES[cfg.holdout_family])} "
                "in --axes (or --holdout-family '')")
    names = list(DOMAINS) if cfg.domain == "all" else [cfg.domain]
    cfg.sizes = {d: (cfg.users or SCALES[cfg.scale][d][0], cfg.pairs or SCALES[cfg.scale][d][1]) for d in names}
    if max(u * k for u, k in cfg.sizes.values()) > 20_000_000:
        p.error("--users x --pairs is over 20M rows for a domain")
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {cfg.out}: {e.strerror}")
    cfg.names = names
    cfg.pools = {}  # per domain, its questions by split: generate() fills it
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    names = cfg.names
    for name in names:
        t0 = time.time()
        s = generate(name, cfg, cfg.out)
        users, rows = ("+".join(str(s[k][sp]) for sp in SPLITS) for k in ("users", "rows"))
        print(f"{name}: {users} users, {rows} rows (train+val+test) in {time.time() - t0:.1f}s | label entropy "
              f"{s['label_entropy_initial']} -> {s['label_entropy']} nats | agreement {s['label_agreement']} | "
              f"similarity {s['diversity']}")


if __name__ == "__main__":
    main()
