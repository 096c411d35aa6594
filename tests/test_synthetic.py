"""Synthetic users and their judge, against the generator's own attributes and brute-force checks:

    python -m pytest -q tests/test_synthetic.py
"""
import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict

import pytest

import generate_synthetic as gs
import judge

DOMAINS = ("roleplay", "elix", "reviews")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out, *flags, domain="all"):
    gs.main(["--domain", domain, "--out", str(out), "--scale", "tiny", "--seed", "3", *flags])
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def stats(out, domain):
    with open(os.path.join(out, domain, "stats.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return run(tmp_path_factory.mktemp("tiny"))


def read_level(f):
    return None if f["level"] is None else round(f["level"])


@pytest.mark.parametrize("domain", DOMAINS)
def test_judge_recovers_generating_attributes(domain):
    dom, rng = gs.DOMAINS[domain], random.Random(0)
    items = dom.items_for(0)
    hits, n = defaultdict(int), 1500
    for _ in range(n):
        qid, prompt, meta = rng.choice(items)
        style = dom.random_style(rng)
        f = dom.read(prompt, dom.render(meta, qid, style, rng.randrange(gs.N_VIEWS), rng.randrange(3)))
        for axis, value in style.items():
            got = read_level(f) if axis == "level" else round(f[axis])
            hits[axis] += got == value
        hits["on topic"] += f["rel"] == 1.0 and f["q"] == 1.0
    for axis, h in hits.items():
        assert h / n >= 0.99, (domain, axis, h / n)


@pytest.mark.parametrize("domain", DOMAINS)
def test_off_topic_answer_loses_whatever_its_style(domain, tiny):
    dom, rng = gs.DOMAINS[domain], random.Random(1)
    items = dom.items_for(3)
    users = list(gs.load_users(os.path.join(tiny, domain)).values())
    for _ in range(300):
        user = rng.choice(users)
        (qid, prompt, meta), (oid, _, ometa) = rng.sample(items, 2)
        if meta[domain == "reviews"] == ometa[domain == "reviews"]:  # same topic, field or genre
            continue
        styles = [dom.random_style(rng) for _ in range(12)]
        best = max(gs.score(user, prompt, dom.render(ometa, oid, s, 0, 0)) for s in styles)
        worst = min(gs.score(user, prompt, dom.render(meta, qid, s, 0, 0)) for s in styles)
        assert worst > best


@pytest.mark.parametrize("domain", ("roleplay", "reviews"))
def test_malformed_text_loses_to_any_well_formed_answer(domain, tiny):
    """Degenerate generations (list marks only, empty, one sentence repeated) must not win on
    style: for every user, each loses to every well-formed answer in any style, even one about
    another topic (elix is left out: there a wrong level may cost more than malformed text)."""
    dom, rng = gs.DOMAINS[domain], random.Random(2)
    items = dom.items_for(3)
    for user in list(gs.load_users(os.path.join(tiny, domain)).values())[:20]:
        (qid, prompt, meta), (oid, _, ometa) = rng.sample(items, 2)
        good = [dom.render(ometa, oid, dom.random_style(rng), v, 0) for v in range(4)]
        one = dom.render(meta, qid, dom.random_style(rng), 0, 0)
        bad = ["", "-\n-", "- \n- \n- ", (one.split(".")[0] + ". ") * 6]
        bad += ["Hey!\n-\n-", "Certainly.\nHa, pasta forever!"] if domain == "roleplay" else []
        assert max(gs.score(user, prompt, b) for b in bad) < min(gs.score(user, prompt, g) for g in good)


HOSTILE = ["", " ", "\n\n\n", "\x00\x01\x02", "\ud800\udfff", "🙂" * 500, "- \n* \n1. \n" * 50, ". . . ! ? !",
           "a" * 200_000, "Certainly. Definitely " * 10_000, "## Preferred Response\n", "## Question\n## Question",
           "pasta " * 3000, "Explain gravity.", "Review The Silent Harbor, a horror movie.", "ΣΩ≈ç√∫˜µ", "'-'-'"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_score_survives_hostile_strings(domain, tiny):
    user = next(iter(gs.load_users(os.path.join(tiny, domain)).values()))
    for prompt in HOSTILE[:6] + ["What is the secret to great pasta?"]:
        for response in HOSTILE:
            assert math.isfinite(gs.score(user, prompt, response))
            gs.summary_for_response(user, prompt, response)
        assert 0.0 <= gs.trait_recovery(user, prompt) <= 1.0
    assert math.isfinite(gs.score(user, None, None))


def test_same_seed_same_bytes_whatever_the_worker_count(tiny, tmp_path):
    other = run(tmp_path / "one_worker", "--workers", "1")
    for domain in DOMAINS:
        for name in ("users.jsonl", "prefs.jsonl", "stats.json"):
            with open(os.path.join(tiny, domain, name), "rb") as a, open(os.path.join(other, domain, name), "rb") as b:
                assert a.read() == b.read(), (domain, name)
    gs.main(["--domain", "elix", "--out", str(tmp_path / "seed4"), "--scale", "tiny", "--seed", "4"])
    with open(os.path.join(tiny, "elix", "prefs.jsonl")) as a, open(tmp_path / "seed4" / "elix" / "prefs.jsonl") as b:
        assert a.read() != b.read()


def test_narrowed_axes_same_bytes_whatever_the_worker_count(tmp_path):
    """--axes lives in the run's config, which the parent process reads too (diversity stats); each
    run is a fresh process so no earlier run's config is left in the module."""
    one, two = tmp_path / "w1", tmp_path / "w2"
    for out, w in ((one, "1"), (two, "2")):
        subprocess.run([sys.executable, "generate_synthetic.py", "--domain", "roleplay", "--out", str(out),
                        "--scale", "tiny", "--seed", "3", "--axes", "formality,confidence,humor", "--workers", w],
                       check=True, capture_output=True, cwd=ROOT)
    for name in ("users.jsonl", "prefs.jsonl", "stats.json"):
        assert (one / "roleplay" / name).read_bytes() == (two / "roleplay" / name).read_bytes(), name


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_do_not_leak(domain, tiny):
    """Training users and questions never reach val or test; val and test are disjoint halves of the
    held-out users and both ask only held-out questions."""
    users = gs.load_users(os.path.join(tiny, domain))
    rows = read_jsonl(os.path.join(tiny, domain, "prefs.jsonl"))
    split_of = {uid: u["split"] for uid, u in users.items()}
    assert set(split_of.values()) == set(gs.SPLITS)
    by_split = defaultdict(lambda: defaultdict(set))
    for r in rows:
        assert r["split"] == split_of[r["user_id"]]
        for key in ("user_id", "prompt"):
            by_split[r["split"]][key].add(r[key])
        by_split[r["split"]]["question_id"].add(r["tags"]["question_id"])
        by_split[r["split"]]["text"] |= {r["chosen"], r["rejected"]}
    for held in ("val", "test"):
        for key in ("user_id", "prompt", "question_id", "text"):
            assert not by_split["train"][key] & by_split[held][key], (held, key)
    assert not by_split["val"]["user_id"] & by_split["test"]["user_id"]
    per_user = defaultdict(int)
    for r in rows:
        per_user[r["user_id"]] += 1
    assert set(per_user) == set(users) and min(per_user.values()) >= 9
    counts = stats(tiny, domain)["users"]
    assert counts == {sp: sum(s == sp for s in split_of.values()) for sp in gs.SPLITS}
    assert abs(counts["val"] - counts["test"]) <= 5  # halves, up to one block of users
    if domain == "reviews":
        assert {u["split"] for u in users.values() if u["group"] == "interpolated"} == {"val", "test"}
        for held in ("val", "test"):
            assert {u["type"] for u in users.values() if u["split"] == held} == set(gs.RV_TYPES + gs.RV_INTERPOLATED)


def test_held_out_blocks_halve_into_val_and_test():
    for n, size, fraction in ((1500, 1, 0.1), (550, 5, 0.1), (40, 5, 0.1), (20, 1, 0.1)):
        held = gs.held_out_blocks(n, size, fraction, random.Random(n))
        assert held == gs.held_out_blocks(n, size, fraction, random.Random(n))  # deterministic in the seed
        assert len(held) == max(2, round(fraction * (n // size))) and set(held) <= set(range(n // size))
        assert sorted(held.values()).count("val") == len(held) // 2 and set(held.values()) == {"val", "test"}


@pytest.mark.parametrize("domain", DOMAINS)
def test_labels_agree_with_the_persona_reward(domain, tiny):
    users = gs.load_users(os.path.join(tiny, domain))
    agree = decided = 0
    for r in read_jsonl(os.path.join(tiny, domain, "prefs.jsonl")):
        u = users[r["user_id"]]
        d = gs.score(u, r["prompt"], r["chosen"]) - gs.score(u, r["prompt"], r["rejected"])
        assert abs(d) >= judge.MARGIN  # refinement drops pairs the persona cannot decide
        decided += 1
        agree += d > 0
    assert agree / decided >= 0.95
    assert stats(tiny, domain)["label_agreement"] == pytest.approx(agree / decided, abs=1e-4)


def test_elix_difficulty_tags(tiny):
    users = gs.load_users(os.path.join(tiny, "elix"))
    dom = gs.DOMAINS["elix"]
    seen = set()
    for r in read_jsonl(os.path.join(tiny, "elix", "prefs.jsonl")):
        level = judge.EX_LEVELS.index(users[r["user_id"]]["group"])
        levels = [read_level(dom.read(r["prompt"], t)) for t in (r["chosen"], r["rejected"])]
        assert levels[0] != levels[1]
        assert r["tags"]["difficulty"] == ("easy" if level in levels else "hard")
        seen.add((r["split"], r["tags"]["difficulty"]))
    assert {("test", "easy"), ("test", "hard")} <= seen


def test_refinement_lowers_label_entropy(tiny, tmp_path):
    run(tmp_path, "--no-refine", domain="roleplay")
    on, off = stats(tiny, "roleplay"), stats(tmp_path, "roleplay")
    assert on["traits_added"] > 0 and off["traits_added"] == 0
    assert on["label_entropy"] < on["label_entropy_initial"]
    assert on["label_entropy"] < off["label_entropy"] - 0.05
    for domain in DOMAINS:
        assert stats(tiny, domain)["label_entropy"] < stats(tiny, domain)["label_entropy_initial"]


def test_view_conditioning_lowers_similarity(tiny, tmp_path):
    run(tmp_path, "--no-views", domain="roleplay")
    assert stats(tiny, "roleplay")["diversity"] < stats(tmp_path, "roleplay")["diversity"]
    for domain in DOMAINS:
        ab = stats(tiny, domain)["diversity_ablation"]
        assert ab["views=1,writers=1"] < ab["views=0,writers=1"]
        assert ab["views=1,writers=3"] < ab["views=0,writers=3"] < ab["views=0,writers=1"]


def test_every_template_word_is_in_the_judge_vocabulary():
    templates = {"roleplay": sum(gs.RP_FRAMES, ()) + tuple(p for w in gs.RP_WRITERS for p in w if p),
                 "elix": sum(gs.EX_TEMPLATES, ()) + gs.EX_ANALOGY + gs.EX_EXAMPLE + gs.EX_DETAIL,
                 "reviews": gs.RV_VERDICT + gs.RV_DETAIL + gs.RV_RATING}
    for domain, texts in templates.items():
        assert set(judge.words_of(" ".join(texts))) <= gs.DOMAINS[domain].known, domain


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_text_writes_two_sentences_in_one_frame(domain, tiny):
    """Two sentences of one answer are never the same frame a word or two apart ("Its ghosts
    scenes have dull plot. Its curse scenes have dull plot."), which a small model's greedy
    answers learn to repeat rather than end; brute force over every pair of sentences."""
    def near(a, b):  # the same length, at most half the words changed
        return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= len(a) // 2
    texts = [judge.scan(t)[0] for r in read_jsonl(os.path.join(tiny, domain, "prefs.jsonl"))
             for t in (r["chosen"], r["rejected"])]  # each a list of sentences, as the judge reads them
    assert not [t for t in texts if any(near(a, b) for i, a in enumerate(t) for b in t[i + 1:])]
    assert max(map(len, texts)) >= 3  # answers of several sentences, the check's subject


def test_similarity_against_brute_force():
    texts = ["a b c", "b c d", "x y"]
    jac = [2 / 4, 0 / 5, 0 / 5]
    assert gs.similarity(texts) == pytest.approx(sum(jac) / 3)


@pytest.mark.parametrize("domain", DOMAINS)
def test_trait_summaries(domain, tiny):
    dom = gs.DOMAINS[domain]
    items = {it[1]: it for it in dom.items_for(3)}
    for user in gs.load_users(os.path.join(tiny, domain)).values():
        summary = gs.trait_summary(user)
        assert len(summary.split()) <= 20
        assert gs.trait_recovery(user, summary) == 1.0
        flipped = dict(user, traits={a: -w for a, w in user["traits"].items()})
        expected = 0.0 if domain != "elix" else 1 / (len(user["traits"]) + 1)
        assert gs.trait_recovery(user, gs.trait_summary(flipped)) == pytest.approx(expected)
        for axis, w in user["traits"].items():  # each trait is stated in the description
            assert any(p in user["description"] for p in dom.phrases[axis][w < 0])
        # a response written in exactly the user's style reads back as the user's own summary
        qid, prompt, meta = next(iter(items.values()))
        style = dict(dom.random_style(random.Random(0)), **{a: judge.sign(w) for a, w in user["traits"].items()})
        if domain == "elix":
            style["level"] = judge.EX_LEVELS.index(user["group"])
        assert gs.summary_for_response(user, prompt, dom.render(meta, qid, style, 0, 0)) == summary
        style = {a: -v if a in user["traits"] else v for a, v in style.items()}
        style["level"] = (style.get("level", 0) + 2) % 5
        assert gs.trait_recovery(user, gs.summary_for_response(user, prompt, dom.render(meta, qid, style, 0, 0))) < 1


@pytest.mark.parametrize("flags", [["--users", "5"], ["--axes", "formality,format"], ["--holdout-family", "open"], ["--pairs", "0"], ["--writers", "4"], ["--temperature", "0"],
                                   ["--temperature", "nan"], ["--domain", "poetry"], ["--scale", "huge"],
                                   ["--users", "1000000", "--pairs", "1000"], ["--pairs", "100000"],
                                   ["--seed", "x"], ["--out", "/proc/version/x"]])
def test_bad_flags_give_one_line_errors(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gs.main(["--out", str(tmp_path), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("usage:") or "error:" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_taste_pairs_show_the_users_style_in_the_chosen_answer(tmp_path):
    """--pair-mode taste: the chosen answer is written in the user's style on every trait axis
    (up to Bradley-Terry label noise), the rejected one breaks at least one trait, and no
    persona needs refinement."""
    out = run(tmp_path, "--pair-mode", "taste", domain="roleplay")
    users = gs.load_users(os.path.join(out, "roleplay"))
    rows = read_jsonl(os.path.join(out, "roleplay", "prefs.jsonl"))
    dom, match = gs.DOMAINS["roleplay"], 0
    for r in rows:
        traits = users[r["user_id"]]["traits"]
        fc, fr = dom.read(r["prompt"], r["chosen"]), dom.read(r["prompt"], r["rejected"])
        ok_c = all(judge.sign(fc[a]) == judge.sign(w) for a, w in traits.items())
        ok_r = all(judge.sign(fr[a]) == judge.sign(w) for a, w in traits.items())
        match += ok_c and not ok_r
    assert match / len(rows) >= 0.9
    assert {len(u["traits"]) for u in users.values()} <= {1, 2, 3}
    assert stats(out, "roleplay")["traits_added"] == 0


def test_taste_frac_gives_a_share_of_train_users_taste_pairs(tiny, tmp_path):
    """--taste-frac: about that share of TRAIN users gets taste pairs (the chosen answer in its
    style on every trait), and the val and test rows are byte for byte the default data's."""
    out = run(tmp_path, "--taste-frac", "0.5", domain="roleplay")
    users = gs.load_users(os.path.join(out, "roleplay"))
    taste = {u for u, x in users.items() if x.get("taste")}
    train = {u for u, x in users.items() if x["split"] == "train"}
    assert taste <= train and 0.3 < len(taste) / len(train) < 0.7
    rows = read_jsonl(os.path.join(out, "roleplay", "prefs.jsonl"))
    dom, match = gs.DOMAINS["roleplay"], []
    for r in rows:
        traits = users[r["user_id"]]["traits"]
        fc = dom.read(r["prompt"], r["chosen"])
        match.append((r["user_id"] in taste, all(judge.sign(fc[a]) == judge.sign(w) for a, w in traits.items())))
    rate = lambda t: sum(m for x, m in match if x == t) / sum(x == t for x, _ in match)
    assert rate(True) >= 0.9 and rate(False) < 0.7
    held = lambda d: [r for r in read_jsonl(os.path.join(d, "roleplay", "prefs.jsonl")) if r["split"] != "train"]
    assert held(out) == held(tiny)


def test_traits_flag_sets_how_many_traits_a_persona_starts_with(tmp_path):
    out = run(tmp_path, "--pair-mode", "taste", "--traits", "3,4", domain="roleplay")
    counts = [len(u["traits"]) for u in gs.load_users(os.path.join(out, "roleplay")).values()]
    assert set(counts) == {3, 4}
    assert stats(out, "roleplay")["config"]["traits"] == [3, 4]


def test_families_and_the_left_out_family(tiny):
    """Every user and row carries its family; the left-out family (default formal-joker) is only in
    val and test, each of its users holds its signature and no other user does."""
    users = gs.load_users(os.path.join(tiny, "roleplay"))
    left_out = gs.RP_FAMILIES["formal-joker"]
    for r in read_jsonl(os.path.join(tiny, "roleplay", "prefs.jsonl")):
        assert r["tags"]["family"] == users[r["user_id"]]["family"]
    for u in users.values():
        holds = all(judge.sign(u["traits"].get(a, 0)) == v for a, v in left_out.items())
        assert holds == (u["family"] == "formal-joker"), u
        assert all(judge.sign(u["traits"][a]) == v for a, v in gs.RP_FAMILIES[u["family"]].items())
    assert {u["split"] for u in users.values() if u["family"] == "formal-joker"} == {"val", "test"}
    assert {u["family"] for u in users.values() if u["split"] == "train"} == set(gs.RP_FAMILIES) - {"formal-joker"}
    for domain, key in (("elix", "group"), ("reviews", "type")):
        assert all(u["family"] == u[key] for u in gs.load_users(os.path.join(tiny, domain)).values())


def test_diversity_draws_labellers_and_weights(tiny, tmp_path):
    """Default: per-user temperatures in --temperature x TEMPERATURE_RANGE and focused users (one
    trait FOCUS times the weight of the rest, at most 9 in all). --no-diversity and --holdout-family ''
    give every user the same temperature, weights in 1-2, and every family a place in training."""
    users = list(gs.load_users(os.path.join(tiny, "roleplay")).values())
    lo, hi = (0.8 * t for t in gs.TEMPERATURE_RANGE)
    assert all(lo <= u["temperature"] <= hi for u in users) and len({u["temperature"] for u in users}) > 10
    focused = [u for u in users if u["focused"]]
    assert 0.15 < len(focused) / len(users) < 0.55
    for u in focused:
        w = sorted(map(abs, u["traits"].values()))
        assert w[-1] >= 3 and (len(w) == 1 or w[-2] <= 1)
    assert all(sum(map(abs, u["traits"].values())) <= 9 for u in users)
    out = run(tmp_path, "--no-diversity", "--holdout-family", "", domain="roleplay")
    plain = list(gs.load_users(os.path.join(out, "roleplay")).values())
    assert all("temperature" not in u and "focused" not in u for u in plain)
    assert all(1 <= abs(w) <= 2 for u in plain for w in u["traits"].values())
    assert {u["family"] for u in plain if u["split"] == "train"} == set(gs.RP_FAMILIES)
    assert stats(out, "roleplay")["config"]["holdout_family"] == ""


def test_easy_preset_users_still_choose_their_ideal_style(tmp_path):
    """The cpu preset's flags (with the default diversity and left-out family): the chosen answer is
    written in the user's style on every trait axis."""
    out = run(tmp_path, "--pair-mode", "taste", "--axes", "formality,confidence,format,example,humor", "--writers", "1",
              "--traits", "2,3,4", domain="roleplay")
    users = gs.load_users(os.path.join(out, "roleplay"))
    dom, rows = gs.DOMAINS["roleplay"], read_jsonl(os.path.join(out, "roleplay", "prefs.jsonl"))
    ideal = sum(all(judge.sign(dom.read(r["prompt"], r["chosen"])[a]) == judge.sign(w)
                    for a, w in users[r["user_id"]]["traits"].items()) for r in rows)
    assert ideal / len(rows) >= 0.97
