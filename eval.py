"""
Evaluate FSPO checkpoints on held-out users with the ground-truth judge.

    python eval.py --base runs/cpu/roleplay-8shot/sft --ckpt runs/cpu/roleplay-8shot/fspo \
                   --ckpt runs/cpu/roleplay-8shot/pooled --data runs/cpu/data --domain roleplay
    python eval.py --base SFT_DIR --ckpt DIR --prefs my/prefs.jsonl --users my/users.jsonl

Win rate: every method writes a response (greedy, KV cache, batched) for each held-out user
and held-out question, given that user's N shots; the judge scores it against the base
model's answer to the bare question with that user's reward; ties count half.
Pair accuracy vs shots: how often beta*log(pi/pi_ref) ranks a held-out pair correctly with
0, 1, 2, 4, 8 shots in context: the meta-learning curve.
Pair accuracy needs only preference rows; win rate needs users in the generator's schema.
"""
import argparse
import json
import math
import os
import random

import torch

import data
import fspo
import generate_synthetic as synth

SHOT_CURVE = (0, 1, 2, 4, 8)
# how each method is prompted at test time: shots in context, description in the prompt
PROMPTING = {"base": "bare", "prompted": "shots", "pooled": "bare", "oracle": "description"}
LABELS = {"base": "base (SFT, no context)", "pooled": "IPO, no user context (pooled)",
          "prompted": "few-shot prompted (SFT)", "pref-ft": "few-shot Pref-FT",
          "fspo-dpo": "FSPO (DPO)", "fspo": "FSPO (IPO)", "cot-sft": "FSPO + CoT (SFT only)",
          "cot": "FSPO + user-description CoT", "oracle": "oracle description"}


# ----------------------------------------------------------------------------------------
# Statistics

def win_rate(scores, base_scores):
    """Wins count 1, ties 1/2. Returns (rate, ci_low, ci_high, n): a 95% normal interval on
    the mean outcome; with no ties it is the binomial Wald interval p +- 1.96 sqrt(p(1-p)/n)."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base_scores)]
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    p = sum(outcomes) / n
    var = sum((o - p) ** 2 for o in outcomes) / n
    half = 1.96 * math.sqrt(var / n)
    return p, max(0.0, p - half), min(1.0, p + half), n


# ----------------------------------------------------------------------------------------
# The evaluation set: fixed (user, query, shots) triples from held-out rows

def eval_set(test_rows, n_shots, n_users, n_questions, seed):
    """For each held-out user (up to n_users), up to n_questions queries, each with N shots
    drawn from that user's other rows. Deterministic in seed."""
    rng = random.Random(seed)
    items = []
    uids = sorted(test_rows)
    rng.shuffle(uids)  # a cap must not cut whole groups (ids are ordered by group)
    for uid in uids[:n_users]:
        rows = list(test_rows[uid])
        if len(rows) < n_shots + 1:
            continue
        rng.shuffle(rows)
        for q in rows[:n_questions]:
            others = [r for r in rows if r is not q]
            items.append((uid, q, rng.sample(others, n_shots)))
    return items


def prompt_ids(method, item, users, tok, limit):
    """Token ids of the method's test-time prompt, completion header included; like
    training, whole shots are dropped oldest first until the prompt fits in `limit`."""
    uid, q, shots = item
    how = PROMPTING.get(method, "shots")
    shots = shots if how == "shots" else []
    desc = synth.trait_summary(users[uid]) if how == "description" else None
    header = fspo.COT_HEADER if method.startswith("cot") else data.COMPLETION_HEADER
    for first in range(len(shots) + 1):
        ids = tok.encode(data.format_prompt(shots[first:], q.prompt, desc) + header)
        if len(ids) <= limit:
            return ids
    raise ValueError(f"the bare question of user {uid} ({len(ids)} tokens) does not fit {limit}")


def split_response(method, text):
    """(description or None, response) from generated completion text."""
    if not method.startswith("cot"):
        return None, text.strip()
    desc, sep, resp = text.partition(data.COMPLETION_HEADER)
    return desc.strip(), resp.strip() if sep else ""


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, batch_size):
    """Greedy completions of token-id prompts, batched by similar length."""
    outs = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        new = model.generate([prompts[i] for i in rows], max_new_tokens, temperature=0.0,
                             eos_id=tok.eot_id)
        for i, ids in zip(rows, new):
            outs[i] = tok.decode(ids)
    return outs


# ----------------------------------------------------------------------------------------
# Pair accuracy vs number of shots

@torch.no_grad()
def pair_accuracy(policy, ref, tok, test_rows, shots, args, device, max_shots):
    """-> (fraction of held-out pairs whose implicit reward log(pi/ref) ranks chosen first,
    number of pairs): the first args.curve_episodes episodes of the held-out stream, 0 = all."""
    stream = fspo.EpisodeStream(tok, test_rows, None, "fspo", max_shots, args.batch_size,
                                policy.config.block_size, args.seed + 17, which="both",
                                use_shots=shots)
    pol, rf = fspo.LogProbs(policy.eval()), fspo.LogProbs(ref.eval())
    hits = n = 0
    n_batches = -(-args.curve_episodes // args.batch_size) if args.curve_episodes else stream.per_epoch
    for i in range(min(stream.per_epoch, n_batches)):
        b = fspo.to_device(stream.batch(i), device)
        pw, pl = fspo.batch_logps(pol, b)
        rw, rl = fspo.batch_logps(rf, b)
        hits += ((pw - rw) > (pl - rl)).sum().item()
        n += len(pw)
    return hits / max(n, 1), n


# ----------------------------------------------------------------------------------------
# Whole evaluation of one domain / shot count

def evaluate(ckpts, prefs_path, users_path, tok, tok_path, args, device, domain, n_shots):
    """ckpts: {method: dir} including "sft" (the base and reference). Returns a dict."""
    models, anchors, sft_shots = {}, {}, None
    for m, path in ckpts.items():
        model, meta, _ = fspo.load_gpt(path, device)
        fspo.check_tokenizer(meta, tok, tok_path, path)
        models[m] = model
        if meta["args"]["method"] in fspo.PREF_METHODS and meta["args"].get("nll"):
            anchors[m] = meta["args"]["nll"]  # the table names a preference loss with an NLL anchor
        if m == "sft":
            sft_shots = meta["args"].get("shots")
    rows = [r for r in data.load_prefs(prefs_path) if r.split == "test"]
    if not rows:
        raise ValueError(f"{prefs_path}: no rows with split 'test' to evaluate on")
    test_rows = data.by_user(rows)
    res = {"domain": domain, "shots": n_shots, "pair_accuracy": {}, "win_rate": {}, "nll": anchors,
           "sft_shots": sft_shots}

    # the meta-learning curve: implicit-reward accuracy as shots grow
    ref = models["sft"]
    # the curve's queries are the same for every k: episodes of the largest k the data allows
    max_shots = min(max(SHOT_CURVE), max(len(v) for v in test_rows.values()) - 1)
    if max_shots < 1 or sum(len(v) // (max_shots + 1) for v in test_rows.values()) < args.batch_size:
        raise ValueError(f"{prefs_path}: too few held-out rows per user for pair accuracy")
    curve = [k for k in SHOT_CURVE if k <= max_shots]
    for m in [m for m in ("fspo", "pooled") if m in models]:
        for k in curve:
            acc, res["curve_pairs"] = pair_accuracy(models[m], ref, tok, test_rows, k, args, device,
                                                    max_shots)
            res["pair_accuracy"].setdefault(m, {})[k] = acc
    if domain == "elix":  # the paper's easy / hard split is a property of the query PAIR
        for d in ("easy", "hard"):
            rows_d = data.by_user([r for r in rows if r.tags.get("difficulty") == d])
            rows_d = {u: v for u, v in rows_d.items() if len(v) > n_shots}
            for m in [m for m in ("fspo", "fspo-dpo", "pref-ft", "pooled") if m in models]:
                if rows_d:
                    res.setdefault("pair_accuracy_by_difficulty", {}).setdefault(m, {})[d] = \
                        pair_accuracy(models[m], ref, tok, rows_d, n_shots, args, device, n_shots)[0]
    users = synth.load_users(users_path) if users_path and os.path.exists(users_path) else None
    if users is None:
        return res
    unknown = sorted(set(test_rows) - set(users))
    if unknown:
        raise ValueError(f"{users_path}: no user row for held-out user {unknown[0]!r}")

    items = eval_set(test_rows, n_shots, args.eval_users, args.eval_questions, args.seed)
    if not items:
        raise ValueError(f"{prefs_path}: no held-out user has {n_shots + 1} rows for a win-rate item")
    methods = ["base", "prompted"] + [m for m in ckpts if m not in ("sft",)]
    judges = [synth.judge.JUDGES[users[uid]["domain"]] for uid, _, _ in items]  # as score() picks
    responses, scores, well_formed = {}, {}, {}
    for m in methods:
        model = models["sft" if m in ("base", "prompted") else m]
        limit = model.config.block_size - args.max_new_tokens
        texts = generate(model, tok, [prompt_ids(m, it, users, tok, limit) for it in items],
                         args.max_new_tokens, args.gen_batch)
        parsed = [split_response(m, t) for t in texts]
        responses[m] = parsed
        # read each answer once: its features give both the user's reward and its quality
        feats = [j.read(q.prompt, resp) for j, (_, q, _), (_, resp) in zip(judges, items, parsed)]
        scores[m] = [j.reward(users[uid], f) for j, (uid, _, _), f in zip(judges, items, feats)]
        # well-formed: the judge's quality is 1.0 (known words, no repeated sentence, content)
        well_formed[m] = sum(f["q"] == 1.0 for f in feats) / len(feats)
    groups = {"all": list(range(len(items)))}
    for i, (uid, q, _) in enumerate(items):
        if domain == "reviews":
            groups.setdefault(users[uid].get("group", "?"), []).append(i)
    for m in methods:
        res["win_rate"][m] = {
            g: dict(zip(("rate", "lo", "hi", "n"),
                        win_rate([scores[m][i] for i in idx], [scores["base"][i] for i in idx])))
            for g, idx in groups.items()}
    res["well_formed"] = well_formed
    for m in [m for m in methods if m.startswith("cot")]:
        rec = [synth.trait_recovery(users[uid], desc or "")
               for (uid, _, _), (desc, _) in zip(items, responses[m])]
        res[f"{m}/trait_recovery"] = sum(rec) / len(rec)
    res["examples"] = [{"user": items[0][0], "question": items[0][1].prompt,
                        **{m: responses[m][0][1] for m in methods}}]
    return res


def format_tables(results):
    """Markdown tables in the shape of the paper's."""
    lines = []
    for r in results:
        def label(m):
            w = r.get("nll", {}).get(m)
            return LABELS.get(m, m) + (f" + {w:g} x NLL(chosen)" if w else "")
        d, n = r["domain"], r["shots"]
        groups = [g for g in ("all", "trained", "interpolated")
                  if any(g in v for v in r["win_rate"].values())]
        if r["win_rate"]:
            lines += [f"\n### {d}, {n} shots: win rate vs base (%, 95% CI, judge = user's reward)\n",
                      "| method | " + " | ".join(groups) + " |",
                      "|---|" + "---|" * len(groups)]
            for m, wr in r["win_rate"].items():
                cells = [f"{100 * wr[g]['rate']:.1f} [{100 * wr[g]['lo']:.1f}, "
                         f"{100 * wr[g]['hi']:.1f}] (n={wr[g]['n']})" if g in wr else "-"
                         for g in groups]
                lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
            if r.get("well_formed"):
                lines.append("\nwell-formed answers (judge quality 1.0): " + ", ".join(
                    f"{label(m)} {100 * v:.0f}%" for m, v in r["well_formed"].items()))
            for k, v in r.items():
                if k.endswith("trait_recovery"):
                    lines.append(f"\n{k.split('/')[0]}: written description recovers "
                                 f"{100 * v:.1f}% of the user's true traits")
        if r.get("pair_accuracy_by_difficulty"):
            lines += [f"\n### {d}, {n} shots: held-out pair accuracy by query pair (%)\n",
                      "| method | easy | hard |", "|---|---|---|"]
            for m, acc in r["pair_accuracy_by_difficulty"].items():
                lines.append(f"| {label(m)} | " + " | ".join(
                    f"{100 * acc[g]:.1f}" if g in acc else "-" for g in ("easy", "hard")) + " |")
        if r["pair_accuracy"]:
            ks = sorted({k for v in r["pair_accuracy"].values() for k in v})
            lines += [f"\n### {d}: held-out pair accuracy of beta*log(pi/pi_ref) vs shots (%)\n",
                      "| method | " + " | ".join(f"{k} shots" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for m, acc in r["pair_accuracy"].items():
                lines.append(f"| {label(m)} | " +
                             " | ".join(f"{100 * acc[k]:.1f}" for k in ks) + " |")
            if r.get("curve_pairs"):
                lines.append(f"\nn = {r['curve_pairs']} held-out pairs per figure, the same queries "
                             "at every shot count.")
            if max(ks) > n:  # name the longest contexts each stage was trained on
                seen = max(n, r.get("sft_shots") or 0)
                lines.append(f"\nStage 2 trained with {n} shots, SFT with 0-{seen}" + (
                    f": the columns past {seen} shots are longer contexts than any training "
                    f"episode." if max(ks) > seen else "."))
    return "\n".join(lines)


def write_report(results, out, header):
    body = header + "\n" + format_tables(results) + "\n"
    os.makedirs(out, exist_ok=True)
    data.atomic_write(os.path.join(out, "report.md"), body)
    data.atomic_write(os.path.join(out, "metrics.json"), json.dumps(results, indent=1) + "\n")
    return body


def evaluate_runs(runs, data_dir, tok, tok_path, args, out):
    """Main-job entry: runs is {(domain, n_shots): {method: ckpt dir}}."""
    device = args.device
    results = []
    for (d, n), ckpts in runs.items():
        results.append(evaluate(ckpts, os.path.join(data_dir, d, "prefs.jsonl"),
                                os.path.join(data_dir, d, "users.jsonl"), tok, tok_path,
                                args, device, d, n))
    header = (f"# FSPO report ({args.preset} preset)\n\nCommand: `python fspo.py"
              f"{'' if args.preset in ('cpu', 'gpu') else ' --preset ' + args.preset}`\n\n"
              f"Configuration: {json.dumps({k: v for k, v in vars(args).items() if v is not None})}\n")
    return write_report(results, out, header)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the SFT checkpoint (base and reference)")
    p.add_argument("--ckpt", action="append", default=[],
                   help="checkpoint to evaluate; its method is read from its config.json")
    p.add_argument("--data", default=None, help="generator output dir")
    p.add_argument("--domain", default="roleplay")
    p.add_argument("--prefs", default=None, help="prefs.jsonl (overrides --data/--domain)")
    p.add_argument("--users", default=None, help="users.jsonl; without it, no win rate")
    p.add_argument("--tokenizer", default=None, help="ranks file (default: the base's)")
    p.add_argument("--shots", type=int, default=None, help="N (default: the base's)")
    p.add_argument("--out", default=None, help="where report.md and metrics.json go")
    p.add_argument("--eval-users", type=int, default=150)
    p.add_argument("--eval-questions", type=int, default=2)
    p.add_argument("--curve-episodes", type=int, default=0,
                   help="held-out episodes per pair-accuracy figure (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.preset = "custom"
    prefs = args.prefs or os.path.join(args.data or "data", args.domain, "prefs.jsonl")
    users = args.users or os.path.join(os.path.dirname(prefs), "users.jsonl")
    _, base_meta = fspo.load_checkpoint(fspo.ckpt_dir(args.base))
    tok_path = args.tokenizer or base_meta["tokenizer"]
    tok = data.get_tokenizer(tok_path)
    n = args.shots or base_meta["args"]["shots"]
    ckpts = {"sft": args.base}
    for c in args.ckpt:
        _, meta = fspo.load_checkpoint(fspo.ckpt_dir(c))
        name = meta["method"] + ("-dpo" if meta["args"].get("loss") == "dpo" else "")
        ckpts[name] = c
    res = evaluate(ckpts, prefs, users, tok, tok_path, args, args.device, args.domain, n)
    out = args.out or os.path.dirname(os.path.abspath(args.base))
    print(write_report([res], out, f"# FSPO evaluation\n\nCommand: `python eval.py "
                                   f"{' '.join(argv or __import__('sys').argv[1:])}`\n"))


if __name__ == "__main__":
    main()
