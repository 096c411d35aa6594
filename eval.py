"""
Evaluation: held-out pair accuracy vs shots, win rates judged with each user's reward, the
report; and answers for one person from their own labelled pairs.

    python eval.py --base runs/annotated/roleplay-8shot/sft --ckpt runs/annotated/roleplay-8shot/fspo \
                   --ckpt runs/annotated/roleplay-8shot/pooled --data runs/annotated/data   # python fspo.py's
    python eval.py --base SFT_DIR --ckpt DIR --prefs my/prefs.jsonl --users my/users.jsonl
    python eval.py --base SFT_DIR --ckpt DIR --data D --split val   # the same report on val users, to tune
    python eval.py --ckpt RUN --data D --split val --notes   # does RUN read fspo.py --describe's notes?
    python eval.py --ckpt runs/cpu/roleplay-4shot/fspo --personalize tests/data/me.jsonl \
                   --question "How can I enjoy chess more?" [--temperature 0.8 --top-k 20]   # --preset cpu's

Owns the evaluation: pair accuracy (also the training loop's running metric), generation,
win rates, the report (report.md, metrics.json, one SVG curve per domain), personalize.
Win rate: every method writes a response (greedy, or sampled with --temperature; KV cache,
batched) for each test user and held-out question, given that user's N shots; the judge scores
it against the base model's answer to the bare question with that user's reward; ties count half.
Pair accuracy vs shots: how often beta*log(pi/pi_ref) ranks a test user's pair correctly
with 0, 1, 2, 4, 8 shots in context: the meta-learning curve. It needs only preference
rows; win rate needs users in the generator's schema. Intervals resample users.
"""
import argparse
import json
import os
import random
import sys
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

import data
import generate_synthetic as synth
import judge
from model import autocast, ckpt_dir, load_checkpoint, load_model

SHOT_CURVE = (0, 1, 2, 4, 8)
CURVE_METHODS = ("fspo", "fspo-dpo", "pooled")  # the rows of the pair-accuracy curve
LABELS = {"reference": "reference learner (judge's features)", "base": "base (SFT, no context)", "pooled": "IPO, no user context (pooled)",
          "prompted": "few-shot prompted (SFT)", "pref-ft": "few-shot Pref-FT",
          "fspo-dpo": "FSPO (DPO)", "fspo": "FSPO (IPO)", "cot-sft": "FSPO + CoT (SFT only)",
          "cot": "FSPO + user-description CoT", "oracle": "oracle description",
          "fspo-judge": "FSPO (IPO), the judge's annotations in place of the base's",
          "tally": "the judge's tally applied by rule (no model)"}


# ----------------------------------------------------------------------------------------
# Statistics

def user_groups(users):
    """-> [[item index, ...] for each user, in first-seen order]: the units a bootstrap
    resamples, since two items of one user are not independent."""
    by_user = defaultdict(list)
    for i, u in enumerate(users):
        by_user[u].append(i)
    return list(by_user.values())


def user_sums(values, users, order=None):
    """(sums, counts), each (U,) float: the items' values summed per user, and their number,
    the users in `order` (default: first seen first, user_groups' order; 0 for a user of
    `order` without items). The bootstrap below draws users, so each figure needs only these."""
    ids = {u: i for i, u in enumerate(dict.fromkeys(users) if order is None else order)}
    rows = [ids[u] for u in users]
    sums, counts = np.zeros(len(ids)), np.zeros(len(ids))
    np.add.at(sums, rows, np.asarray(values, dtype=np.float64))
    np.add.at(counts, rows, 1)
    return sums, counts


def interval(values, users, n_boot=2000, seed=0, items=False):
    """{rate, lo, hi, n}: the mean of per-item values and a 95% percentile interval from a
    bootstrap that resamples whole users (user_sums). items: also the per-item "values" and
    "users", which diff_interval compares."""
    values = [float(v) for v in values]
    if not values:
        return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    sums, counts = user_sums(values, users)  # (U,), (U,)
    pick = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    lo, hi = np.percentile(sums[pick].sum(1) / counts[pick].sum(1), [2.5, 97.5])
    out = {"rate": sums.sum() / counts.sum(), "lo": float(lo), "hi": float(hi), "n": int(counts.sum())}
    return {**out, "values": values, "users": list(users)} if items else out


def percentiles(boot):
    """(lo, hi): the 2.5% and 97.5% percentiles of bootstrap draws (n_boot,), nan where a draw
    has no figure. Up to 2.5% such draws are left out; more leave (None, None): the tail the
    interval would cut is not there."""
    if np.isnan(boot).mean() > 0.025:
        return None, None
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def diff_interval(a, b, n_boot=2000, seed=0):
    """{rate, lo, hi}: a's mean minus b's, two intervals kept with their items, and a 95%
    interval from one bootstrap over the users of either: one draw of users for both, so a
    user scored by both counts as a pair (two methods on the same items) and users of one
    alone as independent (trained vs interpolated users). A draw without one side's users has
    no difference: up to 2.5% of them are left out, more leave lo and hi None."""
    ids = sorted(set(a["users"]) | set(b["users"]))
    (sa, ca), (sb, cb) = (user_sums(x["values"], x["users"], ids) for x in (a, b))
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    with np.errstate(invalid="ignore", divide="ignore"):  # a draw without one side's users: nan
        boot = sa[pick].sum(1) / ca[pick].sum(1) - sb[pick].sum(1) / cb[pick].sum(1)
    lo, hi = percentiles(boot)
    return {"rate": float(sa.sum() / ca.sum() - sb.sum() / cb.sum()), "lo": lo, "hi": hi}


def gap_interval(model, reference, users, n_boot=2000, seed=0):
    """{rate, lo, hi, n}: the share of the reference learner's gap a model closes, (model -
    1/2) / (reference - 1/2), both mean credits over the same items, with interval()'s
    bootstrap over whole users, one draw of users for both (they are scored on the same pairs,
    so their errors move together). A resample whose reference is at or below chance has no
    gap to close: up to 2.5% of them are left out of the percentiles, more leave lo and hi
    None; rate is None where the reference itself is at or below chance."""
    (m, c), (r, _) = user_sums(model, users), user_sums(reference, users)  # (U,) each
    pick = np.random.default_rng(seed).integers(0, len(c), size=(n_boot, len(c)))
    gap = lambda m, r, c: (m / c - 0.5) / np.where(r / c > 0.5, r / c - 0.5, np.nan)
    boot = gap(m[pick].sum(1), r[pick].sum(1), c[pick].sum(1))  # (n_boot,) nan: no gap
    lo, hi = percentiles(boot)
    rate = gap(m.sum(), r.sum(), c.sum())  # None, not nan, where there is none: strict JSON
    return {"rate": None if np.isnan(rate) else float(rate), "lo": lo, "hi": hi, "n": int(c.sum())}


def win_rate(scores, base_scores, users):
    """Wins count 1, ties 1/2, with interval()'s user-level bootstrap interval."""
    return interval([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base_scores)],
                    users, items=True)


def axis_reading(axes, d, w, margins, user_ids, n_boot=500, seed=0):
    """Which style axes a model reads from the shots. Its margins (P,) are regressed, least
    squares, on each query pair's feature differences d (P, A) (chosen - rejected) and on d * w,
    w (P, A) the user's true weights: margin ~ sum_a pop_a d_a + read_a d_a w_a + c. pop_a is a
    taste the model gives every user; read_a > 0 means the margin follows this user's own
    weight on axis a, which only the shots reveal. -> {axis: {differs, pop, read, lo, hi}},
    lo/hi a 95% interval of read from a bootstrap that resamples users."""
    d, w = np.asarray(d, dtype=np.float64), np.asarray(w, dtype=np.float64)
    x = np.concatenate([d, d * w, np.ones((len(d), 1))], 1)  # (P, 2A + 1)
    y = np.asarray(margins, dtype=np.float64)  # (P,)
    fit = lambda idx: np.linalg.lstsq(x[idx], y[idx], rcond=None)[0]
    coef = fit(np.arange(len(y)))
    groups, rng = user_groups(user_ids), np.random.default_rng(seed)
    boot = np.array([fit(np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))]))
                     for _ in range(n_boot)])  # (n_boot, 2A + 1)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    n = len(axes)
    return {a: {"differs": float(np.mean(d[:, i] != 0)), "pop": float(coef[i]), "read": float(coef[n + i]),
                "lo": float(lo[n + i]), "hi": float(hi[n + i])} for i, a in enumerate(axes)}


def line_agreement_of(writer, episodes, k):
    """judge.line_agreement of the lines a tally writer wrote for the first k shots of these
    episodes (each shot once): an axis its lines miss is one FSPO's tally cannot carry."""
    shots = {line_cue(s): s for s_k, _ in episodes for s in s_k[:k]}
    lines = [writer.lines.get(t) for t in shots]
    return {"shots": len(shots), "written": sum(line is not None for line in lines),
            "axes": judge.line_agreement(writer.tally_domain, list(shots.values()), lines)}


def axis_reading_of(domain, episodes, margins, users):
    """axis_reading on held-out episodes: the judge's features, the users' true weights."""
    axes = judge.JUDGES[domain].axes
    d = [judge.pair_diff(domain, q.prompt, q.chosen, q.rejected)[:len(axes)] for _, q in episodes]
    w = [[users[q.user_id]["traits"].get(a, 0.0) for a in axes] for _, q in episodes]
    return axis_reading(axes, d, w, margins, [q.user_id for _, q in episodes])


# ----------------------------------------------------------------------------------------
# The evaluation set: fixed (user, query, shots) triples from held-out rows

def eval_set(held_rows, n_shots, n_users, n_questions, seed):
    """For each held-out user (up to n_users), up to n_questions queries, each with N shots
    drawn from that user's other rows. Deterministic in seed."""
    rng = random.Random(seed)
    items = []
    uids = sorted(held_rows)
    rng.shuffle(uids)  # a cap must not cut whole groups (ids are ordered by group)
    for uid in uids[:n_users]:
        rows = list(held_rows[uid])
        if len(rows) < n_shots + 1:
            continue
        rng.shuffle(rows)
        for q in rows[:n_questions]:
            others = [r for r in rows if r is not q]
            items.append((uid, q, rng.sample(others, n_shots)))
    return items


def prompt_ids(name, item, users, tok, limit):
    """Token ids of method `name`'s test-time prompt and its completion header: the tokens
    training saw (data.prompt_tokens, data.completion_tokens), cut to fit in `limit`."""
    uid, q, shots = item
    head = tok.encode(data.header(name))
    return data.prompt_tokens(tok, name, shots, q.prompt, limit - len(head), users[uid])[0] + head


ANNOTATION_TOKENS = 48  # a written line stops at its newline or here


def write_lines(writer, tok, texts, args):
    """The writer's greedy continuation of each text, up to its first newline; None where the
    text leaves no room in the writer's block to write."""
    ids = [tok.encode(t) for t in texts]
    fits = [i for i, x in enumerate(ids) if len(x) + ANNOTATION_TOKENS <= writer.config.block_size]
    out = [None] * len(texts)
    for s in range(0, len(fits), args.gen_batch):
        rows = fits[s:s + args.gen_batch]
        with autocast(args.device, args.dtype):
            new = writer.generate([ids[i] for i in rows], ANNOTATION_TOKENS, temperature=0.0, eos_id=tok.eot_id)
        for i, line in zip(rows, new):
            out[i] = tok.decode(line).split("\n")[0]
    return out


@torch.no_grad()
def written_prompts(writer, tok, items, rooms, args):
    """Context ids of each (shots, question) of items, annotated by `writer`, a model trained
    with --annotate: it reads the shots one by one and writes each one's contrast after it,
    then their tally as the user description, the lines the judge wrote in training. As in
    data.prompt_tokens, the oldest shot is dropped (and the lines written anew) until the
    prompt fits in its room."""
    writer.eval()
    first, out = [0] * len(items), [None] * len(items)
    todo = list(range(len(items)))
    while todo:
        shots = {i: items[i][0][first[i]:] for i in todo}
        lines = {i: [] for i in todo}
        for j in range(max(len(v) for v in shots.values()) + 1):  # shot j's contrast; j = N: the tally
            rows = [i for i in todo if 0 < len(shots[i]) >= j and None not in lines[i]]
            texts = [data.format_shots(shots[i][:j], lines[i]) +
                     (data.format_shot(j + 1, shots[i][j]) + data.SHOT_HEADER if j < len(shots[i])
                      else data.DESCRIPTION_HEADER) for i in rows]
            for i, line in zip(rows, write_lines(writer, tok, texts, args)):
                lines[i].append(line)
        for i in todo:
            contrasts, tally = (lines[i][:-1], lines[i][-1]) if shots[i] else (None, None)
            if None in lines[i]:  # no room left to write a line: one shot fewer
                first[i] += 1
                continue
            ids = tok.encode(data.format_prompt(shots[i], items[i][1], tally, contrasts))
            if len(ids) <= rooms[i]:
                out[i] = ids
            elif not shots[i]:
                raise ValueError(f"the bare question does not fit in {rooms[i]} tokens: {items[i][1][:60]!r}")
            first[i] += 1
        todo = [i for i in todo if out[i] is None]
    return out


def line_cue(shot):
    """The text a shot's contrast line is written after under --annotate tally: the shot alone."""
    return data.format_shot(1, shot) + data.SHOT_HEADER


@torch.no_grad()
def tally_prompts(lines_of, tok, items, rooms, domain, cache=None):
    """Context ids of each (shots, question) of items for a policy trained with --annotate
    tally: each shot's contrast line (lines_of(shots) -> a line or None per shot, the writer
    seeing each shot alone) is read back (judge.parse_line) and counted into the tally
    (data.tally_prompt), as the judge's contrasts are counted in training. No shots: the bare
    question. cache: {line_cue(shot): line}, kept across calls (the curve's k shots reuse the
    lines of fewer)."""
    cache = {} if cache is None else cache
    todo = {line_cue(s): s for shots, _ in items for s in shots if line_cue(s) not in cache}
    todo = dict(sorted(todo.items()))
    cache.update(zip(todo, lines_of(list(todo.values()))))
    out = []
    for (shots, question), room in zip(items, rooms):
        counts = judge.line_counts(domain, [judge.parse_line(domain, cache[line_cue(s)] or "") for s in shots])
        out.append(data.tally_prompt(tok, counts, domain, question, room) if shots else
                   data.prompt_tokens(tok, "fspo", [], question, room)[0])
    return out


@dataclass
class Writer:
    """The base model that writes the annotations of a policy trained with --annotate, and
    what that policy reads: the shots with their lines and tally (written_prompts), or, with
    tally_domain set (--annotate tally), the counted tally alone (tally_prompts)."""
    model: torch.nn.Module
    tally_domain: str | None = None
    lines: dict = field(default_factory=dict)  # tally_prompts' cache

    def prompts(self, tok, items, rooms, args):
        if not self.tally_domain:
            return written_prompts(self.model, tok, items, rooms, args)
        self.model.eval()
        return tally_prompts(lambda shots: self.write(tok, shots, args), tok, items, rooms,
                             self.tally_domain, self.lines)

    def write(self, tok, shots, args):
        """Each shot's contrast line, written greedily with that shot alone before it."""
        return write_lines(self.model, tok, [line_cue(s) for s in shots], args)


READ_FIT_SHOTS = 300  # training shots a Reader fits its thresholds on


@torch.no_grad()
def shot_readings(policy, tok, domain, shots, args, method="fspo"):
    """(shots, axes) float: how a policy trained with --annotate tally reads each shot, axis by
    axis: its log-prob margin, log pi(chosen) - log pi(rejected), under a one-term tally naming
    the axis's + side, minus that under one naming its - side. Large and positive: the shot's
    chosen answer leans to the + side, as far as the policy can tell. The reference's margins
    would enter this difference only through how the SFT, which never read a tally, reacts to
    one: scoring them too doubled the reading's cost for 0.1 points of agreement with the
    judge (92.3 against 92.2% of 600 val shots' axes, EXPERIMENTS.md, "Twenty minutes"). A
    cot policy (method) is scored on completions as it writes them: the one-term tally as its
    description, then the answer (the same description before both answers: only the
    answers' log-probs differ). An elix
    level is read as its margin under "Level: teenager." (the tally's and the oracle's words)
    less the mean of that margin over the levels: high for the levels nearer the chosen
    answer's, low for those nearer the rejected's (Reader names one each way)."""
    j = judge.JUDGES[domain]
    if not shots:
        return torch.zeros(0, len(j.tally_axes))
    # a level has no opposite term to read it against, so the mean over the levels stands in
    levels = j.tally_axes[len(j.axes):]
    descs = [judge.count_line(domain, {a: v}) for a in j.axes for v in (1, -1)]
    descs += [judge.count_line(domain, {lv: 1}) for lv in levels]
    cot = data.method(method).cot
    eps = []
    for s, desc in [(s, desc) for s in shots for desc in descs]:
        c, r = (data.completion_tokens(tok, method, data.cot_text(desc, t) if cot else t)
                for t in (s.chosen, s.rejected))  # what a cot policy writes before its answer
        room = policy.config.block_size - max(len(c), len(r)) - 1
        eps.append(data.Episode(data.tally_context(tok, desc, s.prompt, room), c, r))
    multiple = 8 if str(args.device).startswith("cuda") else 1  # aligned masks, as EpisodeStream's
    batches = (data.to_device(data.pack_batch(eps[i:i + args.gen_batch], tok.eot_id, multiple), args.device)
               for i in range(0, len(eps), args.gen_batch))
    m = pair_margins(policy.token_logprobs, None, batches, autocast(args.device, args.dtype))
    m = m.view(len(shots), len(descs))
    style, lv = m[:, :2 * len(j.axes)].view(len(shots), -1, 2), m[:, 2 * len(j.axes):]
    return torch.cat([style[..., 0] - style[..., 1], lv - lv.mean(1, keepdim=True)], 1)


def named(readings, taus):
    """sign(reading), 0 where |reading| <= its axis's threshold: the side each axis is named by."""
    return np.where(np.abs(readings) > taus, np.sign(readings), 0).astype(int)


def fit_thresholds(readings, truth):
    """Per axis, the dead zone t that makes named() agree best with the judge's signs (truth,
    {-1, 0, 1}), t among 0 (every nonzero reading names the axis), the 5%..95% quantiles of
    |reading| and infinity (the axis is never named). readings, truth: (shots, axes)."""
    taus = []
    for x, y in zip(readings.T, truth.T):
        grid = [0.0, *np.quantile(np.abs(x), np.linspace(0.05, 0.95, 19)), np.inf]
        hits = [np.mean(named(x, t) == y) for t in grid]
        taus.append(float(grid[int(np.argmax(hits))]))
    return np.array(taus)


@dataclass
class Reader(Writer):
    """For a policy trained with --annotate tally whose base learned no lines: the policy (model;
    a Writer's model is the base) reads each shot itself (shot_readings), and the axes whose
    reading clears its threshold make the shot's line, the thresholds fitted once on
    READ_FIT_SHOTS training shots against the judge's contrasts (training data, as the judge's
    tallies FSPO trained on)."""
    fit_rows: list = field(default_factory=list)
    taus: np.ndarray | None = None
    method: str = "fspo"  # the policy's: cot's completions open with a description

    def write(self, tok, shots, args):
        axes = judge.JUDGES[self.tally_domain].tally_axes
        if not shots:
            return []
        if self.taus is None:
            if not self.fit_rows:
                raise ValueError("a Reader fits its thresholds on training rows: none were given")
            fit = random.Random(0).sample(self.fit_rows, min(READ_FIT_SHOTS, len(self.fit_rows)))
            truth = np.array([[judge.shot_signs(self.tally_domain, s).get(a, 0) for a in axes] for s in fit])
            self.taus = fit_thresholds(self.read(tok, fit, args), truth)
        said = named(self.read(tok, shots, args), self.taus)
        return [judge.contrast_line(self.tally_domain, {a: int(v) for a, v in zip(axes, row) if v})
                for row in said]

    def read(self, tok, shots, args):
        x = shot_readings(self.model, tok, self.tally_domain, shots, args, self.method).numpy()
        return one_level_each_way(x, len(judge.JUDGES[self.tally_domain].axes))


def one_level_each_way(readings, n_style):
    """(shots, axes) readings with an elix shot's level block (the columns past n_style) put the
    way the judge's contrast has it: the block's spread (highest - lowest) at the level read
    highest, minus it at the level read lowest, 0 at the others. The margins under the Level
    lines follow where between the two answers a user would sit, a vote per level; thresholded
    level by level they would name several levels each way, which counted as votes misplace the
    levels in between. Roleplay and reviews have no block: returned as they are."""
    lv = readings[:, n_style:]
    if lv.shape[1] == 0:
        return readings
    out, rows, spread = np.zeros_like(lv), np.arange(len(lv)), lv.max(1) - lv.min(1)
    out[rows, lv.argmax(1)] = spread
    out[rows, lv.argmin(1)] = -spread
    return np.concatenate([readings[:, :n_style], out], 1)


def split_response(method, text):
    """(description or None, response) from generated completion text."""
    if not data.method(method).cot:
        return None, text.strip()
    desc, sep, resp = text.partition(data.COMPLETION_HEADER)
    return desc.strip(), resp.strip() if sep else ""


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, batch_size, desc=None, temperature=0.0,
             top_k=None, generator=None, amp=nullcontext()):
    """Completions of token-id prompts (greedy by default), batched by similar length."""
    outs = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        rows = order[s:s + batch_size]
        with amp:
            new = model.generate([prompts[i] for i in rows], max_new_tokens, temperature=temperature,
                                 top_k=top_k, eos_id=tok.eot_id, generator=generator)
        for i, ids in zip(rows, new):
            outs[i] = tok.decode(ids)
    return outs


# ----------------------------------------------------------------------------------------
# Pair accuracy vs number of shots

@torch.no_grad()
def pair_margins(policy, ref, batches, amp=nullcontext()):
    """-> (pairs,) float: the implicit reward's margin, log(pi/ref)(y_w) - log(pi/ref)(y_l), in
    nats. policy, ref: per-token log-prob functions (GPT.token_logprobs); ref None compares raw
    log-probs (stage 1 has no reference; a Reader reads the policy's own margins)."""
    margins = []
    for b in batches:
        with amp:
            pw, pl = data.pair_logps(policy, b)
            if ref is not None:
                rw, rl = data.pair_logps(ref, b)
                pw, pl = pw - rw, pl - rl
        margins.append((pw - pl).float().cpu())
    return torch.cat(margins)


def curve_margins(policy, ref, tok, held_rows, shots, max_shots, args, block_size, device, name="fspo",
                  writer=None, judge_users=None, annotate=True):
    """-> (margins, episodes) over the first args.curve_episodes held-out episodes of an epoch
    (every held-out row once, as a shot or as a query), or with curve_episodes 0 over
    args.curve_epochs epochs (each a new draw: every row again, among other shots; a finer
    figure for tuning on val users), each with `shots` of its max_shots shots: the same queries
    at every shot count. name: the
    method whose prompt the policy is scored with (pooled's holds no shots, whatever `shots`).
    writer: the Writer that annotates the shots for a policy trained with --annotate;
    judge_users: the judge annotates them instead, as in training (these users' domain), as
    `annotate` says (True, or "tally")."""
    stream = data.EpisodeStream(tok, held_rows, judge_users, name, max_shots, args.batch_size,
                                block_size, args.seed + 17, which="both", use_shots=shots,
                                annotate=judge_users is not None and annotate)
    n_batches = (min(stream.per_epoch, -(-args.curve_episodes // args.batch_size)) if args.curve_episodes
                 else stream.per_epoch * args.curve_epochs)
    episodes = drawn_episodes(stream, n_batches)
    if writer is not None and shots:
        batches = written_batches(writer, tok, stream, episodes, shots, block_size, args, device)
    else:
        batches = (data.to_device(stream.batch(i), device) for i in range(n_batches))
    margins = pair_margins(policy, ref, batches, autocast(device, args.dtype))
    return margins, episodes


def drawn_episodes(stream, n_batches):
    """The (shots, query) episodes of the stream's first n_batches batches, epoch after epoch."""
    epochs = range(-(-n_batches // stream.per_epoch))
    eps = [e for epoch in epochs for e in stream.draw(epoch)[:stream.per_epoch * stream.per_batch]]
    return eps[:n_batches * stream.per_batch]


def written_batches(writer, tok, stream, eps, shots, block_size, args, device):
    """The batches of the stream's episodes eps with their contexts annotated by the writer."""
    pairs = [[data.completion_tokens(tok, "fspo", t) for t in (q.chosen, q.rejected)] for _, q in eps]
    rooms = [block_size - max(len(c), len(r)) - 1 for c, r in pairs]
    ctxs = writer.prompts(tok, [(s[:shots], q.prompt) for s, q in eps], rooms, args)
    coded = [data.Episode(ctx, c, r) for ctx, (c, r) in zip(ctxs, pairs)]
    return [data.to_device(data.pack_batch(coded[i:i + stream.B], tok.eot_id, stream.multiple), device)
            for i in range(0, len(coded), stream.B)]


def curve_hits(policy, ref, tok, held_rows, shots, max_shots, args, block_size, device, name="fspo",
               writer=None):
    """-> (credit, episodes): curve_margins ranked (pair_credit)."""
    margins, episodes = curve_margins(policy, ref, tok, held_rows, shots, max_shots, args, block_size,
                                      device, name, writer)
    return pair_credit(margins), episodes


def pair_credit(margins):
    """(n,) margins -> (n,) float credit: 1 where the chosen answer ranks first, 0 where the
    rejected does, 1/2 on a tie (a policy equal to its reference scores chance, not 0), as the
    reference learner and the rule are credited (judge.reference_pair_credit)."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def held_out_sets(args, tok, rows, users, device):
    """Fixed batches of val users' episodes for the running metric: {"batches": N shots each,
    "bare": the same queries with no shots (None where the method reads no shots), "left_out":
    (episodes,) bool, True for a user of a family no training user belongs to (None if none)}.
    Families with a shared taste let a model score well with no shot at all, and score below
    chance on a family whose taste is the opposite: the three figures tell that apart from reading."""
    name = "fspo" if args.method == "sft" else args.method
    # under --annotate the running metric reads the judge's annotations; eval.py, the model's own
    make = lambda k: data.EpisodeStream(tok, rows["val"], users, name, args.shots, args.batch_size,
                                        args.block_size, args.seed + 1, which="both", use_shots=k,
                                        annotate=args.annotate)
    held = make(args.shots)  # all N: under --annotate tally training draws 1..N
    n = min(held.per_epoch, max(1, args.eval_episodes // args.batch_size))
    fixed = lambda stream: [data.to_device(stream.batch(i), device) for i in range(n)]
    out = {"batches": fixed(held), "bare": None, "left_out": None}
    if data.method(name).reads_shots and args.shots:
        out["bare"] = fixed(make(0))
    if users:
        seen = judge.seen_families(users, rows["train"])
        left = [users.get(q.user_id, {}).get("family") not in seen for _, q in held.episodes[:n * args.batch_size]]
        out["left_out"] = torch.tensor(left) if any(left) else None
    return out


def running_metrics(model, ref_scorer, held, autocast):
    """Pair accuracy of beta*log(pi/ref) on the held_out_sets: at N shots (eval/pair_accuracy), on
    the left-out family's users, and with no shots on the same queries."""
    hits = pair_credit(held_margins(model, ref_scorer, held, "batches", autocast))
    row = {"eval/pair_accuracy": hits.mean().item(), "eval/episodes": len(hits)}
    if held["left_out"] is not None:
        row["eval/pair_accuracy_left_out"] = hits[held["left_out"]].mean().item()
    if held["bare"] is not None:
        bare = pair_credit(held_margins(model, ref_scorer, held, "bare", autocast))
        row["eval/pair_accuracy_0shot"] = bare.mean().item()
    return row


def held_margins(model, ref_scorer, held, key, autocast):
    """pair_margins on the fixed batches held[key]: the policy's margin minus the reference's,
    which is frozen, so scored at the first call and kept in `held` (half the metric's cost)."""
    margins = pair_margins(model.token_logprobs, None, held[key], autocast)
    if ref_scorer is None:
        return margins
    kept = held.setdefault("ref_margins", {})
    if key not in kept:
        kept[key] = pair_margins(ref_scorer, None, held[key], autocast)
    return margins - kept[key]


# ----------------------------------------------------------------------------------------
# Whole evaluation of one domain / shot count

def load_models(ckpts, tok, tok_path, device, domain=None, fit_rows=()):
    """-> ({name: GPT}, {name: NLL anchor weight}, {name: shots it was trained with},
    {name: the Writer of its annotations, for those trained with --annotate}). domain: the
    judge's, which reads back the lines of a policy trained with --annotate tally. A tally
    policy whose base learned no lines reads the shots itself (Reader, fitted on fit_rows)."""
    models, anchors, shots, annotated, tally = {}, {}, {}, [], set()
    for m, path in ckpts.items():
        models[m], meta, _ = load_model(ckpt_dir(path), device)
        data.check_tokenizer(meta, tok, tok_path, path)
        if meta["args"].get("annotate") == "tally" and domain is None:  # before the format, which needs it
            raise ValueError(f"{path} reads the shots' tally (--annotate tally), which is counted "
                             f"with the judge's terms: pass the users file (--users)")
        was = meta.get("inputs", {}).get("text_format", 1)  # 1: saved before it was kept
        now = data.text_format(meta["args"]["method"], meta["args"].get("annotate"), domain)
        if was != now:  # an elix tally without its level, say: scored on texts it never read
            raise ValueError(f"{path} was trained on texts of format {was}, and this code writes format {now} "
                             f"for its method (data.text_format): train it again")
        if data.method(meta["args"]["method"]).learns == "preference" and meta["args"].get("nll"):
            anchors[m] = meta["args"]["nll"]  # the table names a preference loss with an NLL anchor
        shots[m] = meta["args"].get("shots")
        if meta["args"].get("annotate") and data.method(m).reads_shots:
            annotated.append(m)
            if meta["args"]["annotate"] == "tally":
                tally.add(m)
    lines = "sft" in annotated  # the base learned to write each shot's contrast
    if not lines and set(annotated) - tally:
        raise ValueError(f"{ckpts[sorted(set(annotated) - tally)[0]]} reads annotated shots, which its base "
                         f"{ckpts['sft']} cannot write: pass the --annotate SFT checkpoint as --base")
    # the base writes the annotations; prompted (the base given shots) reads them as it learned
    writers = {m: Writer(models["sft"], domain if m in tally else None) if lines else
               Reader(models[m], domain, fit_rows=list(fit_rows), method=m)
               for m in annotated if m != "sft"}
    if lines:
        writers["prompted"] = Writer(models["sft"])
    return models, anchors, shots, writers


def reference_credit(domain, w_population, episodes, k):
    """The few-shot learner that reads the judge's features (judge.reference_pair_credit) on
    the same episodes and shots, per episode (ties 1/2): what the shots reveal to it, not a
    ceiling (a model can use text the features miss)."""
    return [judge.reference_pair_credit(domain, shots[:k], q, w_population, judge.L2) for shots, q in episodes]


def curve_rows(models, held_rows, ref, tok, args, device, max_shots, reference, label, keep=None,
               writers=None, users=None, gaps=None):
    """{method: {k: interval}} for FSPO (IPO and DPO) and pooled, plus the reference learner's
    row. keep, a dict, receives FSPO's (margins, episodes) at the most shots. writers: see
    load_models. users: with an annotated FSPO, also the row "fspo-judge", the same model read
    with the judge's annotations (training's), which tells what the base's writing (or the
    policy's own reading) loses, and the row "tally", the judge's tally applied by rule: what
    the annotations carry. gaps, a dict, receives {method: {k: gap_interval}} for FSPO (IPO
    and DPO) at every k >= 1 where there is a reference row."""
    out, block = {}, models["sft"].config.block_size
    credits = {}  # (row, k) -> (per-episode credit, user ids), for the gap's interval
    judged = ("fspo-judge",) if users and "fspo" in (writers or {}) else ()
    counted = bool(judged) and bool(writers["fspo"].tally_domain)  # --annotate tally
    cells = [(m, k) for m in CURVE_METHODS[:1] + judged + CURVE_METHODS[1:] if m in models or m in judged
             for k in SHOT_CURVE if k <= max_shots and (k or m not in judged)]
    for m, k in tqdm(cells, desc=label, disable=args.no_progress, leave=False):
        if m == "fspo-judge":
            margins, eps = curve_margins(models["fspo"].token_logprobs, ref, tok, held_rows, k, max_shots,
                                         args, block, device, "fspo", judge_users=users,
                                         annotate="tally" if counted else True)
            out.setdefault(m, {0: out["fspo"][0]})[k] = interval(pair_credit(margins).tolist(),
                                                                 [q.user_id for _, q in eps])
        elif k and not data.method(m).reads_shots:  # pooled: the same prompt at every k, scored once
            out[m][k] = out[m][0]
        else:  # eps: the same (shots, query) episodes at every k, the first k shots used
            margins, eps = curve_margins(models[m].token_logprobs, ref, tok, held_rows, k, max_shots,
                                         args, block, device, m, (writers or {}).get(m))
            credits[m, k] = (pair_credit(margins).tolist(), [q.user_id for _, q in eps])
            out.setdefault(m, {})[k] = interval(*credits[m, k])
        if keep is not None and m == cells[0][0] and m != "pooled" and k == cells[-1][1]:
            keep.update(shots=k, margins=margins, episodes=eps)
        if reference and m == cells[0][0]:  # every method's episodes are the same
            credits["reference", k] = (reference_credit(*reference, eps, k), [q.user_id for _, q in eps])
            out.setdefault("reference", {})[k] = interval(*credits["reference", k])
            if judged:  # what the annotations' tally tells a reader that applies it exactly
                credit = [judge.tally_pair_credit(reference[0], shots[:k], q, counted) for shots, q in eps]
                out.setdefault("tally", {})[k] = interval(credit, [q.user_id for _, q in eps])
    if gaps is not None:  # k = 0: no shots, nothing read, no gap
        for (m, k), (credit, ids) in credits.items():
            if m in ("fspo", "fspo-dpo") and k and ("reference", k) in credits:
                assert ids == credits["reference", k][1], "the gap needs the reference's episodes"
                gaps.setdefault(m, {})[k] = gap_interval(credit, credits["reference", k][0], ids)
    return out


def curve_shots(held_rows, args):
    """The largest curve shot count with a batch of episodes: the same queries at every k."""
    episodes = lambda k: sum(-(-len(v) // (k + 1)) for v in held_rows.values() if len(v) > k)
    fits = [k for k in SHOT_CURVE if k >= 1 and episodes(k) >= args.batch_size]
    if not fits:
        raise ValueError(f"pair accuracy needs {args.batch_size} episodes (one batch) of held-out users "
                         f"with at least 2 rows each (1 shot + a query): {len(held_rows)} held-out users "
                         f"give {episodes(1)}")
    return max(fits)


def shot_curve(models, prefs, users, tok, args, device, domain, n_shots, res, writers=None):
    """The meta-learning curve: implicit-reward pair accuracy as shots grow (fspo, pooled),
    beside the reference learner where the judge knows the users; the same on a family of
    users no training user belongs to, if there is one; for ELIX the paper's easy / hard
    split, a property of the query PAIR."""
    rows = [r for r in prefs if r.split == res["split"]]
    held_rows, ref = data.by_user(rows), models["sft"].token_logprobs
    reference = None
    if users:
        jdomain = users[rows[0].user_id]["domain"]
        reference = (jdomain, judge.population_weights(jdomain, [r for r in prefs if r.split == "train"], judge.L2))
    keep = {}
    res["pair_accuracy"] = curve_rows(models, held_rows, ref, tok, args, device, curve_shots(held_rows, args),
                                      reference, f"pair accuracy {domain}", keep, writers, users,
                                      gaps=res.setdefault("pair_accuracy_gap", {}))
    writer = (writers or {}).get("fspo")
    if writer is not None and writer.tally_domain and keep.get("episodes"):
        res["line_agreement"] = line_agreement_of(writer, keep["episodes"], keep["shots"])
    # which axes FSPO reads, where there are pairs enough to fit two coefficients per axis
    if reference and len(keep.get("margins", ())) >= 10 * len(judge.JUDGES[reference[0]].axes):
        res["axis_reading"] = {"shots": keep["shots"], "n": len(keep["margins"]),
                               "axes": axis_reading_of(reference[0], keep["episodes"], keep["margins"], users)}
    seen = judge.seen_families(users or {}, {r.user_id for r in prefs if r.split == "train"})
    unseen = {u: v for u, v in held_rows.items() if users and users[u].get("family") not in seen}
    if unseen:
        res["unseen_family"] = sorted({users[u]["family"] for u in unseen})
        res["pair_accuracy_unseen"] = curve_rows(models, unseen, ref, tok, args, device,
                                                 curve_shots(unseen, args), reference, "left-out family",
                                                 writers=writers, users=users,
                                                 gaps=res.setdefault("pair_accuracy_unseen_gap", {}))
    if domain == "elix":
        res["pair_accuracy_by_difficulty"] = by_difficulty(models, held_rows, ref, tok, args, device,
                                                           n_shots, writers, reference)


def by_difficulty(models, held_rows, ref, tok, args, device, n_shots, writers=None, reference=None):
    """ELIX's easy / hard split, {method: {"easy": interval, "hard": interval}}: the held-out
    episodes of n_shots shots, split by their query pair's difficulty tag. The split is a
    property of the query pair alone: the shots are the user's ordinary ones either way (a hard
    query given only hard shots would tell the user's level less, and mix the two effects).
    Few-shot prompted, the SFT that trained on no preference, is scored by the implicit reward
    of its reading: its log-probs with the shots against its own with none. With reference
    (curve_rows'), the reference learner's row on the same episodes: how hard each kind of
    pair is for a learner that reads the judge's features from the same shots."""
    out, block = {}, models["sft"].config.block_size
    for m in ["prompted"] + [m for m in ("fspo", "fspo-dpo", "pref-ft", "pooled") if m in models]:
        if m == "prompted":  # the base with the shots against itself without: what its reading moves
            sft = models["sft"].token_logprobs
            read, eps = curve_margins(sft, None, tok, held_rows, n_shots, n_shots, args, block, device, m,
                                      (writers or {}).get(m))
            bare, _ = curve_margins(sft, None, tok, held_rows, n_shots, n_shots, args, block, device, "base")
            hits = pair_credit(read - bare)
        else:
            hits, eps = curve_hits(models[m].token_logprobs, ref, tok, held_rows, n_shots, n_shots,
                                   args, block, device, m, (writers or {}).get(m))
        split_by_difficulty(out, m, hits, eps)
    if reference:  # every method's episodes are the same
        split_by_difficulty(out, "reference", reference_credit(*reference, eps, n_shots), eps)
    return out


def split_by_difficulty(out, row, credit, eps):
    """out[row] = {"easy": interval, "hard": interval} of the per-episode credit, split by
    the query pair's difficulty tag."""
    for d in ("easy", "hard"):
        idx = [i for i, (_, q) in enumerate(eps) if q.tags.get("difficulty") == d]
        if idx:
            out.setdefault(row, {})[d] = interval([float(credit[i]) for i in idx],
                                                  [eps[i][1].user_id for i in idx], items=True)


def win_rates(models, methods, items, users, tok, args, domain, res, writers=None):
    """Every method answers every item (greedy, or sampled under --temperature); the user's
    reward decides against base. writers: see load_models."""
    judges = [judge.JUDGES[users[uid]["domain"]] for uid, _, _ in items]  # as score() picks
    responses, scores, well_formed = {}, {}, {}
    for m in methods:
        model = models[data.method(m).model or m]
        limit = model.config.block_size - args.max_new_tokens
        if m in (writers or {}):
            head = tok.encode(data.header(m))
            prompts = [ids + head for ids in writers[m].prompts(tok, [(s, q.prompt) for _, q, s in items],
                                                                [limit - len(head)] * len(items), args)]
        else:
            prompts = [prompt_ids(m, it, users, tok, limit) for it in items]
        g = torch.Generator(device=args.device).manual_seed(args.seed)  # each method's own draws
        texts = generate(model, tok, prompts, args.max_new_tokens, args.gen_batch,
                         None if args.no_progress else f"answers {m}", args.temperature or 0.0,
                         args.top_k, g, autocast(args.device, args.dtype))
        responses[m] = [split_response(m, t) for t in texts]
        # read each answer once: its features give both the user's reward and its quality
        feats = [j.read(q.prompt, resp) for j, (_, q, _), (_, resp) in zip(judges, items, responses[m])]
        scores[m] = [j.reward(users[uid], f) for j, (uid, _, _), f in zip(judges, items, feats)]
        # well-formed: the judge's quality is 1.0 (known words, no repeated sentence, content)
        well_formed[m] = sum(f["q"] == 1.0 for f in feats) / len(feats)
    groups = {"all": list(range(len(items)))}
    for i, (uid, q, _) in enumerate(items):
        if domain == "reviews":
            groups.setdefault(users[uid].get("group", "?"), []).append(i)
    for m in methods:
        res["win_rate"][m] = {g: win_rate([scores[m][i] for i in idx], [scores["base"][i] for i in idx],
                                          [items[i][0] for i in idx]) for g, idx in groups.items()}
    res["well_formed"] = well_formed
    res["decoding"] = (f"sampled at temperature {args.temperature}, top-k {args.top_k}, seed {args.seed}"
                       if args.temperature else "greedy")
    for m in [m for m in methods if data.method(m).cot]:
        rec = [judge.trait_recovery(users[uid], desc or "")
               for (uid, _, _), (desc, _) in zip(items, responses[m])]
        res[f"{m}/trait_recovery"] = sum(rec) / len(rec)
    res["examples"] = [{"user": items[0][0], "question": items[0][1].prompt,
                        **{m: responses[m][0][1] for m in methods}}]


def evaluate(ckpts, prefs_path, users_path, tok, tok_path, args, device, domain, n_shots, split="test"):
    """ckpts: {method: dir} including "sft" (the base and reference). Returns a dict. split: the
    held-out users evaluated, "test" for the report, "val" while tuning."""
    prefs = data.load_prefs(prefs_path)
    held_rows = data.by_user([r for r in prefs if r.split == split])
    if not held_rows:
        raise ValueError(f"{prefs_path}: no rows with split {split!r} to evaluate on")
    users = judge.load_users(users_path) if users_path and os.path.exists(users_path) else None
    if users and (unknown := sorted(set(held_rows) - set(users))):
        raise ValueError(f"{users_path}: no user row for held-out user {unknown[0]!r}")
    jdomain = users[next(iter(held_rows))]["domain"] if users else None
    fit_rows = [r for r in prefs if r.split == "train"]  # a Reader's thresholds (load_models)
    models, anchors, trained, writers = load_models(ckpts, tok, tok_path, device, jdomain, fit_rows)
    res = {"domain": domain, "shots": n_shots, "pair_accuracy": {}, "win_rate": {}, "nll": anchors,
           "sft_shots": trained["sft"], "trained_shots": trained, "split": split,
           "annotated": sorted(writers),
           "tally_only": sorted(m for m, w in writers.items() if w.tally_domain),
           "self_read": sorted(m for m, w in writers.items() if isinstance(w, Reader))}
    try:
        shot_curve(models, prefs, users, tok, args, device, domain, n_shots, res, writers)
    except ValueError as e:
        raise ValueError(f"{prefs_path}: {e}") from None
    if users is None:
        res["no_win_rate"] = ("no win rate and no reference learner: both need a users.jsonl in the "
                              "generator's schema (a judge that can score any answer for these users); "
                              "pair accuracy needs only the preference rows")
        return res
    items = eval_set(held_rows, n_shots, args.eval_users, args.eval_questions, args.seed)
    if not items:
        raise ValueError(f"{prefs_path}: no held-out user has {n_shots + 1} rows for a win-rate item")
    methods = ["base", "prompted"] + [m for m in ckpts if m != "sft"]
    win_rates(models, methods, items, users, tok, args, domain, res, writers)
    return res


def cell(c):
    return f"{100 * c['rate']:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]"


def prompt_shots(m, r):
    """What method m's prompt held at test time: N shots, none, or the description."""
    how = data.method(m).prompt
    return {"shots": str(r["shots"]), "bare": "0", "description": "description"}[how]


def win_table(r, label):
    groups = [g for g in ("all", "trained", "interpolated") if any(g in v for v in r["win_rate"].values())]
    lines = [f"\n### {r['domain']}, {r['shots']} shots: win rate vs base (%, 95% CI over users, "
             "judge = user's reward)\n",
             "| method | shots in prompt | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for m, wr in r["win_rate"].items():
        trained = r.get("trained_shots", {}).get(m)
        note = ""
        if trained not in (None, r["shots"]):  # a shared stage (fspo.same_at_every_n) was trained at another N
            note = f" (trained with {trained})" if data.method(m).prompt == "shots" else f" (trained once, at N = {trained})"
        if m == "prompted" and r.get("sft_shots") is not None and r["sft_shots"] < r["shots"]:
            note = f" (its SFT trained with 0-{r['sft_shots']})"  # the base, past its longest context
        cells = [f"{cell(wr[g])} (n={wr[g]['n']})" if g in wr else "-" for g in groups]
        lines.append(f"| {label(m)} | {prompt_shots(m, r)}{note} | " + " | ".join(cells) + " |")
    if r.get("well_formed"):
        shares = ", ".join(f"{label(m)} {100 * v:.0f}%" for m, v in r["well_formed"].items())
        lines.append(f"\nwell-formed answers (judge quality 1.0; answers {r.get('decoding', 'greedy')}): {shares}")
    for k, v in r.items():
        if k.endswith("trait_recovery"):
            lines.append(f"\n{k.split('/')[0]}: written description recovers "
                         f"{100 * v:.1f}% of the user's true traits")
    return lines


def gap_cell(g):
    """A gap_interval as a table cell: '77% [64, 90]'; '-' where there is none (no shots, or a
    reference at chance)."""
    if g is None or g["rate"] is None:
        return "-"
    return f"{100 * g['rate']:.0f}%" + ("" if g["lo"] is None else f" [{100 * g['lo']:.0f}, {100 * g['hi']:.0f}]")


def curve_table(r, label, key="pair_accuracy", title=""):
    rows = r[key]
    ks = sorted({k for v in rows.values() for k in v})
    lines = [f"\n### {r['domain']}{title}: held-out pair accuracy of beta*log(pi/pi_ref) vs shots "
             "(%, 95% CI over users)\n",
             "| method | " + " | ".join(f"{k} shots" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m, acc in rows.items():
        lines.append(f"| {label(m)} | " + " | ".join(cell(acc[k]) for k in ks) + " |")
    gaps = r.get(f"{key}_gap", {})  # shot_curve's, beside every curve with a reference row
    for m, name in {"fspo": "FSPO", "fspo-dpo": "FSPO (DPO)"}.items():
        if m in gaps:  # how much of what the shots reveal the model uses
            lines.append(f"| {name}: gap to the reference closed, ({name} - 50) / (reference - 50) | "
                         + " | ".join(gap_cell(gaps[m].get(k)) for k in ks) + " |")
    n_pairs = next(iter(next(iter(rows.values())).values()))["n"]
    lines.append(f"\nn = {n_pairs} held-out pairs of {r['split']} users per figure, the same queries "
                 "at every shot count." + (" Pooled reads no shots (it is trained on the question "
                 "alone), so its row is one figure, measured with none." if "pooled" in rows else ""))
    if "reference" in rows:
        lines.append("The reference learner is a logistic regression on the judge's feature "
                     "differences, fitted on each user's k shots (k = 0: on the training users "
                     "pooled): what the shots reveal to a learner that knows the features. It is "
                     "not a ceiling: a model can use text the features miss." + (
                         " The gap closed has a 95% interval from the same bootstrap over users, "
                         "the model and the reference resampled together; with no shot there is "
                         "nothing read and no gap." if gaps else ""))
    n, sft = r["shots"], r.get("sft_shots") or 0
    seen = max(n, sft)
    if max(ks) > n:  # name the longest contexts each stage was trained on
        lines.append(f"\nStage 2 trained with {n} shots, SFT with 0-{sft}" + (
            f": the columns past {seen} shots are longer contexts than any training "
            f"episode." if max(ks) > seen else "."))
    return lines


def axis_table(r):
    """What FSPO reads, per style axis (axis_reading)."""
    a = r["axis_reading"]
    lines = [f"\n### {r['domain']}: what FSPO reads from {a['shots']} shots, per style axis "
             f"(n = {a['n']} held-out pairs)\n",
             "| axis | pairs where it differs | preference held for everyone | reading the user (95% CI) |",
             "|---|---|---|---|"]
    for axis, c in a["axes"].items():
        lines.append(f"| {axis} | {100 * c['differs']:.0f}% | " + (
            f"{c['pop']:+.2f} | {c['read']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] |" if c["differs"] else "- | - |"))
    lines.append("\nFSPO's margin log(pi/ref)(y_w) - log(pi/ref)(y_l), in nats, fitted by least squares on "
                 "the query's feature differences d (chosen - rejected) and on d x the user's true weight: "
                 "the first coefficient is a taste the model gives every user, the second how far the "
                 "margin follows this user's own weight on the axis, which only the shots reveal. Near 0: "
                 "the model does not read that axis.")
    return lines


def line_table(r):
    """The base's contrast lines (or the policy's readings) against the judge's, per axis (line_agreement)."""
    a, who = r["line_agreement"], "FSPO's readings of the shots" if r.get("self_read") else "the base's contrast lines"
    lines = [f"\n### {r['domain']}: {who} against the judge's, per axis "
             f"(n = {a['shots']} held-out shots, those of the curve's last column)\n",
             "| axis | shots whose answers differ on it | the line names it, the judge's sign | "
             "the other sign | of the other shots, the line names it |", "|---|---|---|---|---|"]
    pct = lambda x, n: f"{100 * x / n:.0f}%" if n else "-"
    for axis, c in a["axes"].items():
        lines.append(f"| {axis} | {c['differs']} | {pct(c['named'], c['differs'])} | "
                     f"{pct(c['flipped'], c['differs'])} | {pct(c['false'], a['shots'] - c['differs'])} |")
    lines.append(f"\nAn axis {'FSPO' if r.get('self_read') else 'the base'} does not name is missing from "
                 "the tally FSPO reads, whatever the shots show.")
    return lines


def tally_note(r):
    """The report's note on a policy that reads the shots' tally: who counted it, and how."""
    if r.get("self_read"):
        how = (f"{', '.join(r['self_read'])} read each shot itself, by its log-prob margin between the shot's "
               "two answers under a tally naming one side of one axis against one naming the other side, "
               "an axis named where the difference clears a threshold fitted on training shots against "
               "the judge's contrasts; the shots' named axes, counted, are the tally its prompt holds")
        prompted, loses = "the plain shots", "its reading"
    else:
        how = (f"the base model wrote each shot's contrast, that shot alone before it, and the lines, "
               f"counted per axis, are the tally that the prompts of {', '.join(r['tally_only'])} hold")
        prompted = "the shots with the base's lines and their tally of signs (`--annotate`), as the SFT learned"
        loses = "the base's writing"
    judged = (f"; the row of the judge's annotations scores FSPO with the judge's counts (training's), so "
              f"the gap to FSPO's row is what {loses} loses; the tally applied by rule (each axis's count "
              "times the query's contrast, summed) is what the tally tells a reader that weighs it exactly."
              if "fspo-judge" in r.get("pair_accuracy", {}) else ".")
    return (f"\nThe shots' tally (`fspo.py --annotate tally`): {how} in place of the shots (each axis "
            f"named once per shot that leaned to it, net of those leaning the other way); few-shot "
            f"prompted reads {prompted}{judged}")


# The paper's figures (v2, ../shared/fspo-notes.md): win rate vs base, %; ELIX's easy / hard and
# Reviews' trained / interpolated users as pairs
PAPER = {"roleplay": {"base": 50.0, "pooled": 72.4, "prompted": 63.2, "pref-ft": 62.8, "fspo-dpo": 81.3,
                      "fspo": 82.6, "cot": 90.3, "oracle": 90.9},
         "elix": {"prompted": (92.4, 81.4), "pref-ft": (91.2, 82.9), "fspo": (97.8, 91.8)},
         "reviews": {4: {"prompted": (66.6, 61.9), "pref-ft": (66.5, 66.1), "fspo": (78.4, 71.3)},
                     8: {"prompted": (69.1, 59.1), "pref-ft": (65.6, 70.7), "fspo": (80.4, 73.6),
                         "cot": (92.3, 84.6)}}}


def compare(a, b, strict=True):
    """(here, verdict) for the paper's order a > b (a >= b where not strict): here, the two rates
    and, where both intervals keep their items, their difference with its 95% interval
    (diff_interval), '87.8 vs 88.5 (-0.7 [-5.1, +3.6])'; verdict, 'holds' or 'reversed', each
    'outside' or 'within' the difference's interval, and whether the two intervals themselves
    are apart (a stricter test; the only one where there are no items or no interval)."""
    here = f"{100 * a['rate']:.1f} vs {100 * b['rate']:.1f}"
    d = diff_interval(a, b) if "values" in a and "values" in b else None
    if d is not None:
        ci = "" if d["lo"] is None else f" [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
        here += f" ({100 * d['rate']:+.1f}{ci})"
    sep = " (the intervals apart)" if a["lo"] > b["hi"] or b["lo"] > a["hi"] else ""
    if a["rate"] == b["rate"] and strict:
        return here, "tied"
    side = "holds" if a["rate"] >= b["rate"] else "reversed"
    if d is None or d["lo"] is None:
        return here, f"{side}, intervals apart" if sep else f"{side} within the intervals"
    outside = d["lo"] > 0 if side == "holds" else d["hi"] < 0
    return here, f"{side}, {'outside' if outside else 'within'} the difference's interval{sep}"


def roleplay_table(r, orders):
    wr = {m: v["all"] for m, v in r["win_rate"].items()}
    lines = [f"\n### Roleplay, 8 shots: win rate vs base (%, 95% CI over {r['split']} users)\n",
             "| method | here | paper |", "|---|---|---|"]
    lines += [f"| {LABELS[m]} | {cell(wr[m])} (n={wr[m]['n']}) | {p:.1f} |"
              for m, p in PAPER["roleplay"].items() if m in wr]
    chain = [m for m in ("oracle", "cot", "fspo", "pooled", "prompted") if m in wr]
    orders += [(f"roleplay: {LABELS[a]} {'>=' if a == 'oracle' else '>'} {LABELS[b]}", wr[a], wr[b], a != "oracle")
               for a, b in zip(chain, chain[1:])]
    if "pref-ft" in wr:
        orders.append(("roleplay: few-shot Pref-FT >= base", wr["pref-ft"], wr["base"], False))
    return lines


def elix_table(r, orders):
    acc, wr = r["pair_accuracy_by_difficulty"], r["win_rate"]
    lines = [f"\n### ELIX, 4 shots: held-out pair accuracy by the query pair's difficulty (%, 95% CI over "
             f"{r['split']} users; the paper's figures are win rates)\n",
             "| method | easy | hard | paper easy / hard | win rate vs base here |", "|---|---|---|---|---|"]
    lines += [f"| {LABELS[m]} | {cell(acc[m]['easy'])} | {cell(acc[m]['hard'])} | {p[0]:.1f} / {p[1]:.1f} | "
              + (cell(wr[m]["all"]) if m in wr else "-") + " |"
              for m, p in PAPER["elix"].items() if {"easy", "hard"} <= set(acc.get(m, ()))]
    if {"easy", "hard"} <= set(acc.get("reference", ())):  # how hard the data makes each kind of pair
        lines.append(f"| {LABELS['reference']} | {cell(acc['reference']['easy'])} | "
                     f"{cell(acc['reference']['hard'])} | - | - |")
    if {"easy", "hard"} <= set(acc.get("fspo", ())):
        orders += [(f"elix {d}: FSPO (IPO) > {LABELS[b]}", acc["fspo"][d], acc[b][d], True)
                   for d in ("easy", "hard") for b in ("prompted", "pref-ft") if d in acc.get(b, {})]
        orders.append(("elix: FSPO (IPO) easy > hard", acc["fspo"]["easy"], acc["fspo"]["hard"], True))
    return lines


def reviews_table(reviews, orders):
    lines = [f"\n### Reviews: win rate vs base on trained / interpolated users (%, 95% CI over "
             f"{reviews[0]['split']} users)\n",
             "| method | shots | trained | interpolated | paper trained / interpolated |", "|---|---|---|---|---|"]
    for r in reviews:
        wr, n = r["win_rate"], r["shots"]
        lines += [f"| {LABELS[m]} | {n} | " + " | ".join(
            f"{cell(wr[m][g])} (n={wr[m][g]['n']})" if g in wr[m] else "-" for g in ("trained", "interpolated"))
            + f" | {p[0]:.1f} / {p[1]:.1f} |" for m, p in PAPER["reviews"][n].items() if m in wr]
        if "fspo" in wr:
            orders += [(f"reviews {n} shots: FSPO (IPO) > {LABELS[b]}", wr["fspo"]["all"], wr[b]["all"], True)
                       for b in ("pref-ft", "prompted") if b in wr]
            if {"trained", "interpolated"} <= set(wr["fspo"]):
                orders.append((f"reviews {n} shots: FSPO (IPO) trained > interpolated users",
                               wr["fspo"]["trained"], wr["fspo"]["interpolated"], True))
    if len(reviews) == 2 and all("fspo" in r["win_rate"] for r in reviews):
        orders.append(("reviews: FSPO (IPO) 8 shots >= 4 shots", reviews[1]["win_rate"]["fspo"]["all"],
                       reviews[0]["win_rate"]["fspo"]["all"], False))
    return lines


def paper_tables(results):
    """The paper's three tables from the results that hold them, each cell beside the paper's
    figure: roleplay's win rates at 8 shots, ELIX's pair accuracy on easy and hard query pairs
    at 4, Reviews' win rates on trained and interpolated users at 4 and 8; then the orderings
    the paper reports, checked against the intervals."""
    by = {(r["domain"], r["shots"]): r for r in results}
    lines, orders = [], []
    if (r := by.get(("roleplay", 8))) and r["win_rate"]:
        lines += roleplay_table(r, orders)
    if (r := by.get(("elix", 4))) and r.get("pair_accuracy_by_difficulty"):
        lines += elix_table(r, orders)
    reviews = [by[("reviews", n)] for n in (4, 8) if by.get(("reviews", n), {}).get("win_rate")]
    if reviews:
        lines += reviews_table(reviews, orders)
    if orders:
        lines += ["\n### The paper's orderings, here\n",
                  "| ordering | here (difference, 95% CI) | verdict |", "|---|---|---|"]
        lines += ["| {} | {} | {} |".format(what, *compare(a, b, strict)) for what, a, b, strict in orders]
        lines.append("\nThe difference's interval: one bootstrap over the users of either side, the "
                     "same draw for both (a user scored by both is a pair). The intervals apart: the "
                     "two 95% intervals do not overlap, a stricter test.")
    return ["\n## The paper's tables"] + lines if lines else []


def format_tables(results):
    """Markdown tables: the paper's three where the results hold them, then each domain's own."""
    lines = paper_tables(results)
    lines += ["\n## Each domain and N"] if lines else []
    for r in results:
        def label(m):
            w = r.get("nll", {}).get(m)
            if m == "fspo-judge" and r.get("self_read"):
                return "FSPO (IPO), the judge's counts in place of its own reading"
            return (LABELS.get(m, m) + (f" + {w:g} x NLL(chosen)" if w else "")
                    + (", the shots' tally" if m in r.get("tally_only", ()) else
                       ", annotated shots" if m in r.get("annotated", ()) else ""))
        if r["win_rate"]:
            lines += win_table(r, label)
        if r.get("pair_accuracy_by_difficulty"):
            lines += [f"\n### {r['domain']}, {r['shots']} shots: held-out pair accuracy by the query "
                      "pair's difficulty, the shots the user's ordinary ones (%, 95% CI over users)\n",
                      "| method | easy | hard |", "|---|---|---|"]
            for m, acc in r["pair_accuracy_by_difficulty"].items():
                lines.append(f"| {label(m)} | " + " | ".join(
                    cell(acc[g]) if g in acc else "-" for g in ("easy", "hard")) + " |")
        if r["pair_accuracy"]:
            lines += curve_table(r, label)
        if r.get("axis_reading"):
            lines += axis_table(r)
        if r.get("line_agreement"):
            lines += line_table(r)
        if r.get("pair_accuracy_unseen"):
            lines += curve_table(r, label, "pair_accuracy_unseen", ", users of a family no training "
                                 f"user belongs to ({', '.join(r['unseen_family'])})")
        if r.get("curve_svg"):
            lines.append(f"\n![{r['domain']}: pair accuracy vs shots]({r['curve_svg']})")
        if r.get("no_win_rate"):
            lines.append(f"\n{r['domain']}: {r['no_win_rate']}.")
        if r.get("tally_only"):
            lines.append(tally_note(r))
        elif r.get("annotated"):
            lines.append(f"\nAnnotated shots (`fspo.py --annotate`): the base model wrote each shot's "
                         f"contrast and their tally into the prompts of {', '.join(r['annotated'])}"
                         + ("; the row of the judge's annotations scores FSPO with the lines training "
                            "gave it, so the gap to FSPO's row is what the base's writing loses; the "
                            "tally applied by rule (the axes it names, with their signs, summed over "
                            "the query's contrast, over all k shots) is what the tally line tells a "
                            "reader that goes by it: it keeps each axis's sign, not how often the shots "
                            "showed it."
                            if "fspo-judge" in r.get("pair_accuracy", {}) else "."))
    return "\n".join(lines)


def curve_svg(r, label):
    """The pair-accuracy-vs-shots curve as an SVG (a line per method, 95% interval bars)."""
    rows = r["pair_accuracy"]
    ks = sorted({k for v in rows.values() for k in v})
    W, H, L, B = 520, 300, 50, 40  # size and the left / bottom margins, in pixels
    x = lambda i: L + (W - L - 150) * i / max(1, len(ks) - 1)
    y = lambda a: H - B - (H - B - 20) * a  # accuracy 0..1 -> pixels, 1 at the top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>']
    for a in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{L}" x2="{W - 150}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 8}" y="{y(a) + 4:.1f}" text-anchor="end">{100 * a:.0f}</text>')
    for i, k in enumerate(ks):
        out.append(f'<text x="{x(i):.1f}" y="{H - B + 18}" text-anchor="middle">{k}</text>')
    out.append(f'<text x="{(W - 150 + L) / 2:.0f}" y="{H - 6}" text-anchor="middle">shots in context</text>'
               f'<text x="14" y="{(H - B) / 2:.0f}" transform="rotate(-90 14 {(H - B) / 2:.0f})" '
               f'text-anchor="middle">held-out pair accuracy (%)</text>')
    for j, (m, acc) in enumerate(rows.items()):
        color = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")[j % 4]
        pts = [(x(i), acc[k]) for i, k in enumerate(ks) if k in acc]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="' +
                   " ".join(f"{px:.1f},{y(a['rate']):.1f}" for px, a in pts) + '"/>')
        for px, a in pts:
            out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y(a["lo"]):.1f}" y2="{y(a["hi"]):.1f}" '
                       f'stroke="{color}"/><circle cx="{px:.1f}" cy="{y(a["rate"]):.1f}" r="3" fill="{color}"/>')
        out.append(f'<text x="{W - 140}" y="{30 + 18 * j}" fill="{color}">{label(m)[:24]}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def write_report(results, out, header):
    os.makedirs(out, exist_ok=True)
    for r in results:  # one picture per domain and N, referenced by the report
        if r["pair_accuracy"]:
            r["curve_svg"] = f"curve-{r['domain']}-{r['shots']}shot.svg"
            data.atomic_write(os.path.join(out, r["curve_svg"]), curve_svg(r, lambda m: LABELS.get(m, m)))
    body = header + "\n" + format_tables(results) + "\n"
    data.atomic_write(os.path.join(out, "report.md"), body)
    data.atomic_write(os.path.join(out, "metrics.json"), json.dumps(results, indent=1) + "\n")
    return body


def load_results(path):
    """metrics.json as write_report wrote it, read back so that format_tables takes it: JSON
    keeps dict keys as strings, and the curves' shot counts are ints again here."""
    with open(path) as f:
        return json.load(f, object_hook=lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()})


def evaluate_runs(runs, tok, tok_path, args, out):
    """Main-job entry: runs is {(domain, n_shots): ({method: ckpt dir}, prefs, users or None)}.
    One after the other on all the threads: side by side, one thread each (--jobs 2), roleplay's
    alone took 971 s in run R against 807 s for the four in turn in run Q (commit ae869ef)."""
    results = [evaluate(ckpts, prefs, users, tok, tok_path, args, args.device, d, n)
               for (d, n), (ckpts, prefs, users) in runs.items()]
    header = (f"# FSPO report ({args.preset} preset)\n\nCommand: `python fspo.py "
              f"{' '.join(sys.argv[1:])}`\n\n"
              f"Configuration: {json.dumps({k: v for k, v in vars(args).items() if v is not None})}\n")
    return write_report(results, out, header)


def personalize(args):
    """Answer for one person: the trained model reads their labelled pairs as shots; the base
    model answers the bare question beside it."""
    model, meta, _ = load_model(ckpt_dir(args.ckpt[0]), args.device)
    base = load_model(ckpt_dir(args.base or meta["args"]["init"]), args.device)[0]
    tok_path = args.tokenizer or meta["tokenizer"]
    tok = data.Tokenizer.load(tok_path)
    data.check_tokenizer(meta, tok, tok_path, args.ckpt[0])
    name = meta["method"]
    if data.method(name).prompt != "shots":
        raise SystemExit(f"{args.ckpt[0]}: a {name} model does not read pairs (personalize needs fspo, "
                         f"pref-ft or cot)")
    if meta["args"].get("annotate"):
        raise SystemExit(f"{args.ckpt[0]}: trained on annotated shots (--annotate), which need the judge "
                         f"of the generator's users; personalize takes models trained without it")
    pairs = data.load_prefs(args.personalize, default_user="me")
    if args.questions:
        with open(args.questions, encoding="utf-8") as f:
            questions = [q.strip() for q in f if q.strip()]
    else:
        questions = [args.question]
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    for who, m, shots in ((name, model, pairs), ("base", base, [])):
        head = tok.encode(data.header(who))
        limit = m.config.block_size - args.max_new_tokens - len(head)
        prompts = [data.prompt_tokens(tok, who, shots, q, limit)[0] + head for q in questions]
        texts = generate(m, tok, prompts, args.max_new_tokens, args.gen_batch, None,
                         args.temperature, args.top_k, g, autocast(args.device, args.dtype))
        for q, t in zip(questions, texts):
            desc, resp = split_response(who, t)
            who_line = f"{LABELS.get(who, who)}, reading {len(pairs)} pairs" if shots else LABELS["base"]
            print(f"Q: {q}\n[{who_line}]" + (f"\n  (user description: {desc})" if desc else "") +
                  f"\n  {resp}\n")


def note_nll(scorer, tok, episodes, batch_size):
    """{"shot": nats per token of the shot notes, "user": of the user description} over episodes."""
    sums = {"shot": [0.0, 0], "user": [0.0, 0]}
    for i in range(0, len(episodes), batch_size):
        b = data.pack_batch(episodes[i:i + batch_size], tok.eot_id)
        with torch.no_grad():
            lp = scorer(b["idx"], b["targets"], pos=b["pos"], mask=b["mask"])
        note = (b["seg"] == data.DESCRIBE) & (b["targets"] != -1)
        user = note & (b["pair"] == b["pair"].min(1, keepdim=True).values)  # each row's last note
        for k, m in (("shot", note & ~user), ("user", user)):
            sums[k][0] -= lp[m].sum().item()
            sums[k][1] += int(m.sum())
    return {k: s / max(n, 1) for k, (s, n) in sums.items()}


def notes_reading(args, prefs, users):
    """Does the model read the shots? --describe's notes scored after each held-out episode's
    own shots, and after the shots of another episode (the notes moved to the same places):
    a model that ignores the shots scores both alike."""
    model, meta, _ = load_model(ckpt_dir(args.ckpt[0]), args.device)
    model.eval()
    tok = data.Tokenizer.load(args.tokenizer or meta["tokenizer"])
    users = judge.load_users(users)
    rows = data.by_user([r for r in data.load_prefs(prefs) if r.split == args.split])
    n = args.shots or meta["args"]["shots"]
    stream = data.EpisodeStream(tok, rows, users, "fspo", n, 1, model.config.block_size, args.seed,
                                describe=True)
    eps = data.make_episodes(rows, n, random.Random(args.seed), report=False)
    eps = [stream.encode(s, q, random.Random(i)) for i, (s, q) in enumerate(eps)]
    eps = [e for e in eps if len(e.notes) == e.n_shots + 1 == n + 1]  # every note in place
    moved = [replace(e, notes=[(end, ids) for (end, _), (_, ids) in zip(e.notes, eps[i - 1].notes)])
             for i, e in enumerate(eps)]
    with autocast(args.device, args.dtype):
        own, other = (note_nll(model.token_logprobs, tok, e, args.batch_size) for e in (eps, moved))
    print(f"{args.ckpt[0]}: notes' NLL, nats per token, {len(eps)} {args.split} episodes of {n} shots, "
          f"own shots / another episode's: shot notes {own['shot']:.3f} / {other['shot']:.3f}, "
          f"user description {own['user']:.3f} / {other['user']:.3f}")


def check_generated(prefs):
    """Refuse generator output that today's generator and judge would write otherwise: the
    win rates score answers with today's judge, and old labels with it would mix two rewards.
    A file of your own (no stats.json beside it) is taken as it is."""
    folder = os.path.dirname(os.path.abspath(prefs))
    if os.path.basename(prefs) != "prefs.jsonl" or not os.path.exists(os.path.join(folder, "stats.json")):
        return
    synth.refuse_stale(folder, "generate it again")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="the SFT checkpoint (base and reference)")
    p.add_argument("--ckpt", action="append", default=[],
                   help="checkpoint to evaluate; its method is read from its config.json")
    p.add_argument("--data", default=None, help="generator output dir")
    p.add_argument("--domain", default="roleplay")
    p.add_argument("--prefs", default=None, help="prefs.jsonl (overrides --data/--domain)")
    p.add_argument("--users", default=None, help="users.jsonl; without it, no win rate")
    p.add_argument("--tokenizer", default=None, help="ranks file (default: the base's)")
    p.add_argument("--shots", type=int, default=None, help="N (default: the first --ckpt's that reads shots, else the base's)")
    p.add_argument("--out", default=None, help="where report.md and metrics.json go")
    p.add_argument("--eval-users", type=int, default=150)
    p.add_argument("--eval-questions", type=int, default=2)
    p.add_argument("--curve-episodes", type=int, default=0,
                   help="held-out episodes per pair-accuracy figure, at most an epoch's (0 = all)")
    p.add_argument("--curve-epochs", type=int, default=1,
                   help="with --curve-episodes 0: epochs of held-out episodes per figure, each "
                        "row again among other shots (finer figures for tuning on val users)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="held-out users to evaluate: test for the report, val while tuning")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="as fspo.py --dtype")
    p.add_argument("--personalize", default=None,
                   help="JSONL of one person's pairs (prompt, chosen, rejected): print the first "
                        "--ckpt's answers for them, and the base model's (--base, default its init)")
    p.add_argument("--question", default="What should a beginner know about chess?")
    p.add_argument("--questions", default=None, help="a file of questions, one per line")
    p.add_argument("--temperature", type=float, default=0.0, help="answers, win rates' and "
                   "--personalize's: 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="with --temperature: sample from the k likeliest")
    p.add_argument("--notes", action="store_true",
                   help="print how well the first --ckpt writes fspo.py --describe's notes after "
                        "each held-out episode's own shots and after another episode's")
    args = p.parse_args(argv)
    if args.personalize:
        return personalize(args)
    prefs = args.prefs or os.path.join(args.data or "data", args.domain, "prefs.jsonl")
    users = args.users or os.path.join(os.path.dirname(prefs), "users.jsonl")
    if args.notes:
        return notes_reading(args, prefs, users)
    if args.base is None:
        raise SystemExit("eval.py: --base is required (the SFT checkpoint)")
    check_generated(prefs)
    args.preset = "custom"
    _, base_meta = load_checkpoint(ckpt_dir(args.base))
    tok_path = args.tokenizer or base_meta["tokenizer"]
    tok = data.Tokenizer.load(tok_path)
    ckpts, trained = {"sft": args.base}, []
    for c in args.ckpt:
        _, meta = load_checkpoint(ckpt_dir(c))
        name = meta["method"] + ("-dpo" if meta["args"].get("loss") == "dpo" else "")
        ckpts[name] = c
        if data.method(name).prompt == "shots":
            trained.append(meta["args"]["shots"])
    # N is what the stage-2 methods were trained with (SFT saw a range of shot counts)
    n = args.shots or (trained[0] if trained else base_meta["args"]["shots"])
    res = evaluate(ckpts, prefs, users, tok, tok_path, args, args.device, args.domain, n, args.split)
    out = args.out or os.path.dirname(os.path.abspath(args.base))
    title = "# FSPO evaluation" + (" on VAL users (for tuning)" if args.split == "val" else "")
    print(write_report([res], out, f"{title}\n\nCommand: `python eval.py "
                                   f"{' '.join(argv or sys.argv[1:])}`\n"))


if __name__ == "__main__":
    main()
