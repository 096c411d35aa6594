"""The reference few-shot learner in judge.py, against brute-force minimisation and toy users:

    python -m pytest -q tests/test_judge.py
"""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import generate_synthetic as gs
import judge


def lbfgs_minimum(d, l2):
    """The same objective minimised by torch's L-BFGS in float64 (an independent optimiser)."""
    x = torch.tensor(d, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).sum() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy()


@pytest.mark.parametrize("n, dim, l2", [(8, 8, 1.0), (30, 5, 0.1), (3, 13, 3.0), (200, 8, 0.01)])
def test_fit_logreg_matches_lbfgs(n, dim, l2):
    rng = np.random.default_rng(n)
    true = rng.normal(size=dim)
    d = rng.choice([-2.0, 0.0, 2.0], size=(n, dim))
    d[rng.random(n) < 1 / (1 + np.exp(d @ true))] *= -1  # Bradley-Terry labels: some pairs disagree
    w = judge.fit_logreg(d, l2)
    assert np.allclose(w, lbfgs_minimum(d, l2), atol=1e-6)
    assert np.allclose(judge.fit_logreg(-d, l2), -w)  # flipping every pair flips the learner


def test_fit_logreg_one_dimension_against_a_grid():
    d = np.array([[1.0], [2.0], [-0.5], [1.5], [-1.0]])
    grid = np.linspace(-5, 5, 200_001)
    loss = np.logaddexp(0, -np.outer(grid, d[:, 0])).sum(1) + 0.5 * 0.3 * grid ** 2
    assert judge.fit_logreg(d, 0.3)[0] == pytest.approx(grid[loss.argmin()], abs=1e-4)


def test_fit_logreg_separable_stays_finite_and_separates():
    d = np.array([[2.0, 0.0, 2.0], [2.0, -2.0, 0.0], [0.0, 2.0, 2.0]])  # w = (1, 0, 1) separates
    norms = []
    for l2 in (1.0, 0.1, 0.01, 0.001):
        w = judge.fit_logreg(d, l2)
        assert np.all(np.isfinite(w)) and np.all(d @ w > 0)
        grad = l2 * w - d.T @ (1 / (1 + np.exp(d @ w)))
        assert np.abs(grad).max() < 1e-8
        norms.append(np.linalg.norm(w))
    assert norms == sorted(norms)  # weaker regularisation, larger weights


@pytest.mark.parametrize("domain", ("roleplay", "elix", "reviews"))
def test_pair_diff_carries_the_personal_reward(domain):
    """For two well-formed answers to the same question, each user's reward difference is linear
    in pair_diff: sum of trait weights times the axes (elix: LEVEL_W on the user's own level)."""
    dom, rng = gs.DOMAINS[domain], random.Random(0)
    items = dom.items_for(0)
    for _ in range(300):
        qid, prompt, meta = rng.choice(items)
        a, b = (dom.render(meta, qid, dom.random_style(rng), rng.randrange(gs.N_VIEWS), rng.randrange(3))
                for _ in range(2))
        traits = {ax: rng.choice((-1, 1)) * rng.uniform(0.5, 3) for ax in rng.sample(dom.axes, 2)}
        user = {"domain": domain, "traits": traits, "group": rng.choice(judge.EX_LEVELS)}
        w = [traits.get(ax, 0.0) for ax in dom.axes]
        if domain == "elix":
            w += [judge.LEVEL_W * (lv == user["group"]) for lv in judge.EX_LEVELS]
        want = judge.score(user, prompt, a) - judge.score(user, prompt, b)
        assert np.dot(w, judge.pair_diff(domain, prompt, a, b)) == pytest.approx(want, abs=1e-9)


def rp_pair(rng, chosen_style, flip):
    """A roleplay pair: chosen in chosen_style, rejected with the axes in `flip` reversed."""
    dom = gs.DOMAINS["roleplay"]
    qid, prompt, meta = rng.choice(dom.items_for(0))
    b = dict(chosen_style, **{ax: -chosen_style[ax] for ax in flip})
    view, writer = rng.randrange(gs.N_VIEWS), rng.randrange(3)
    return SimpleNamespace(prompt=prompt, chosen=dom.render(meta, qid, chosen_style, view, writer),
                           rejected=dom.render(meta, qid, b, view, writer))


def test_reference_reads_the_one_axis_the_shots_reveal():
    """A user who only cares for humor: every shot's chosen answer jokes and its rejected one does
    not, other axes vary at random. Queries that differ on humor are ranked right; after one shot
    that differs on humor alone, a query that does not is a tie (0.5), as is any query for a zero
    population weight."""
    dom, rng = gs.DOMAINS["roleplay"], random.Random(1)
    others = [ax for ax in dom.axes if ax != "humor"]

    def any_style():  # every axis at random, whatever --axes an earlier run set
        return {ax: rng.choice((-1, 1)) for ax in dom.axes}

    def funny_pair(flip_humor):
        style = dict(any_style(), humor=1)
        return rp_pair(rng, style, (["humor"] if flip_humor else []) + rng.sample(others, 2))
    shots = [funny_pair(True) for _ in range(4)]
    zero = np.zeros(len(dom.axes))
    for _ in range(20):
        assert judge.reference_pair_credit("roleplay", shots, funny_pair(True), zero, 1.0) == 1.0
        q = funny_pair(True)
        q.chosen, q.rejected = q.rejected, q.chosen
        assert judge.reference_pair_credit("roleplay", shots, q, zero, 1.0) == 0.0
    w = judge.fit_logreg([judge.pair_diff("roleplay", s.prompt, s.chosen, s.rejected) for s in shots], 1.0)
    assert np.argmax(w) == dom.axes.index("humor")
    one = rp_pair(rng, dict(any_style(), humor=1), ["humor"])
    assert judge.reference_pair_credit("roleplay", [one], rp_pair(rng, any_style(), ["formality"]),
                                       zero, 1.0) == 0.5
    assert judge.reference_pair_credit("roleplay", [], funny_pair(True), zero, 1.0) == 0.5
    population = judge.population_weights("roleplay", shots, 1.0)
    assert np.allclose(population, w)  # pooling the same rows is the same fit
    assert judge.reference_pair_credit("roleplay", [], funny_pair(True), population, 1.0) == 1.0


def test_tally_rule_keeps_the_signs_and_drops_the_magnitudes():
    """The report's tally row: the shots' contrasts summed per axis, each named axis counted by
    its sign alone against the query's contrast. The contrasts, read off the judge by hand:
    A = {formality +2, humor -2}, B = {formality +2, humor +2}."""
    pair = lambda c, r: SimpleNamespace(prompt="Tell me about q?", chosen=c, rejected=r)
    a = pair("Certainly, fine.", "Hey, fine. Ha!")
    b = pair("Certainly, fine. Ha!", "Hey, fine.")
    casual = pair("Hey, fine.", "Certainly, fine.")             # {formality -2}
    serious = pair("Certainly, fine.", "Certainly, fine. Ha!")  # {humor -2}
    mixed = pair("Hey, fine.", "Certainly, fine. Ha!")          # {formality -2, humor -2}
    credit = lambda shots, q: judge.tally_pair_credit("roleplay", shots, q)
    assert credit([a, b], casual) == 0.0      # tally {formality +4}: sides with the rejected
    assert credit([a, b], serious) == 0.5     # humor sums to 0: not named, a tie
    assert credit([a], serious) == 1.0        # tally {formality +2, humor -2}
    # tally {formality +6, humor -2}: by counts -12 + 4 < 0, by signs -2 + 2 = 0, a tie
    assert credit([a, a, b], mixed) == 0.5
    # tally {formality +6, humor +2} against {formality -1, humor +2}: by counts -6 + 4 < 0,
    # the rejected; by signs -1 + 2 > 0, the chosen
    assert credit([a, b, b], pair("Fine. Ha!", "Certainly, fine.")) == 1.0
    assert credit([], casual) == 0.5


def test_counted_tally_names_each_axis_once_per_shot_and_reads_back():
    """--annotate tally: each shot counts +1 or -1 on an axis its answers differ on, whatever
    the magnitude; the line names an axis as often as its net count, strongest first; a line
    read back gives each named axis's sign. The contrasts as read by hand in the test above."""
    pair = lambda c, r: SimpleNamespace(prompt="Tell me about q?", chosen=c, rejected=r)
    a = pair("Certainly, fine.", "Hey, fine. Ha!")              # {formality +2, humor -2}
    b = pair("Certainly, fine. Ha!", "Hey, fine.")              # {formality +2, humor +2}
    half = pair("Fine. Ha!", "Certainly, fine.")                # {formality -1, humor +2}
    named = lambda shots: {x: v for x, v in judge.shot_counts("roleplay", shots).items() if v}
    assert named([a, b, b]) == {"formality": 3, "humor": 1}
    assert named([a, a, b, half]) == {"formality": 2}  # humor: -1 -1 +1 +1
    assert judge.count_line("roleplay", {"formality": 3, "humor": 1}) == \
        "Prefers: formal, formal, formal, humorous."
    assert judge.count_line("roleplay", {"humor": -2, "formality": 2, "format": 0}) == \
        "Prefers: formal, formal, serious, serious."
    assert judge.count_line("roleplay", {"humor": 0}) == "Prefers: nothing."
    assert judge.parse_line("roleplay", "Prefers: casual, humorous, abstract, bogus.") == \
        {"formality": -1, "humor": 1, "example": -1}
    assert judge.parse_line("roleplay", "Prefers: nothing.") == {} == judge.parse_line("roleplay", "")
    # by counts {formality +3, humor +1} against half's {formality -1, humor +2}: -3 + 2 < 0
    assert judge.tally_pair_credit("roleplay", [a, b, b], half, counted=True) == 0.0
    assert judge.tally_pair_credit("roleplay", [a, b, b], half) == 1.0  # by signs: -1 + 2 > 0


def test_elix_contrast_names_the_levels_the_answers_are_written_at():
    """ELIX: a shot's contrast also names the level its chosen answer is written at (+1) and the
    rejected's (-1), each the mean of its level words rounded (levels 0..4 by hand from
    EX_LEVEL_WORDS); the counted tally and its line carry them, and read back."""
    pair = lambda c, r: SimpleNamespace(prompt="explain gravity", chosen=c, rejected=r)
    kid = "Imagine gravity, a giant toy."                # imagine, giant, toy: 0, 0, 0 -> child
    pro = "Gravity denotes coupling, formally."          # 4, 4, 4 -> expert
    teen = "Imagine gravity denotes a toy coupling."     # 0, 4, 0, 4: mean 2 -> teenager
    plain = "Gravity pulls."                             # no level word: no level read
    contrast = lambda c, r: judge.contrast("elix", "explain gravity", c, r)
    assert contrast(kid, pro) == {"example": 0, "detail": 0, "child": 1, "expert": -1}
    assert contrast(teen, kid) == {"example": 0, "detail": 0, "teenager": 1, "child": -1}
    assert contrast(kid, kid) == contrast(kid, plain) == {"example": 0, "detail": 0}
    # counted, each shot votes for the levels nearer its chosen answer's than its rejected's:
    # kid over pro (0 over 4): child +1, preteen +1, teenager 0, young adult -1, expert -1;
    # teen over pro (2 over 4): +1, +1, +1, 0, -1; kid over teen (0 over 2): +1, 0, -1, -1, -1
    counts = judge.shot_counts("elix", [pair(kid, pro), pair(teen, pro), pair(kid, teen)])
    assert {a: v for a, v in counts.items() if v} == {"child": 3, "preteen": 2, "young adult": -2, "expert": -3}
    assert judge.count_line("elix", counts) == "Level: child."  # the oracle's words for a level
    assert judge.count_line("elix", {"preteen": 1, "teenager": 1, "detail": -2}) == \
        "Level: teenager. Prefers: brief, brief."  # a tie: the middle of the tied (of two, the upper)
    assert judge.count_line("elix", {"detail": 1}) == "Prefers: detailed."
    # a line naming one level alone: every other level is farther from it
    assert judge.line_counts("elix", [{"expert": 1}]) == \
        {"child": -1, "preteen": -1, "teenager": -1, "young adult": -1, "expert": 0}
    # the rule: the level first, then the style counts. The shot: kid over a detailed pro
    # (Level: child, detail -1); the query: a detailed teen over pro, nearer child but detailed
    detailed = lambda t: t + " Also plus top."
    assert judge.contrast("elix", "explain gravity", kid, detailed(pro))["detail"] == -2
    assert judge.tally_pair_credit("elix", [pair(kid, detailed(pro))], pair(detailed(teen), pro), counted=True) == 1.0
    assert judge.tally_pair_credit("elix", [pair(kid, detailed(kid))], pair(detailed(kid), kid), counted=True) == 0.0
    assert judge.tally_pair_credit("elix", [pair(kid, pro)], pair(pro, teen), counted=True) == 0.0
    assert judge.tally_pair_credit("elix", [pair(kid, kid)], pair(pro, teen), counted=True) == 0.5
    assert judge.contrast_line("elix", contrast(teen, kid)) == "Prefers: not child, teenager."  # axis order
    assert judge.parse_line("elix", "Prefers: young adult, not child, examples.") == \
        {"young adult": 1, "child": -1, "example": 1}
    assert judge.JUDGES["roleplay"].tally_axes == judge.JUDGES["roleplay"].axes  # levels are elix's


def test_line_agreement_counts_named_missed_and_false_axes():
    """The report's table of the base's lines against the judge's, per axis. Contrasts read by
    hand as above: a = {formality +2, humor -2}, casual = {formality -2}."""
    pair = lambda c, r: SimpleNamespace(prompt="Tell me about q?", chosen=c, rejected=r)
    a = pair("Certainly, fine.", "Hey, fine. Ha!")
    casual = pair("Hey, fine.", "Certainly, fine.")
    lines = ["Prefers: formal, humorous.",  # formality right, humor the wrong sign
             "Prefers: casual, lists."]      # formality right, format named where alike
    got = judge.line_agreement("roleplay", [a, casual, a], lines + [None])  # None: not written
    assert got["formality"] == {"differs": 3, "named": 2, "flipped": 0, "false": 0}
    assert got["humor"] == {"differs": 2, "named": 0, "flipped": 1, "false": 0}
    assert got["format"] == {"differs": 0, "named": 0, "flipped": 0, "false": 1}
    assert got["technical"] == {"differs": 0, "named": 0, "flipped": 0, "false": 0}
    assert set(got) == set(judge.JUDGES["roleplay"].axes)


def test_reference_sees_only_the_axes_it_is_given():
    """A user who jokes: shots whose pairs differ on humor and two other axes. On a query that
    differs on humor alone, the learner given every axis but humor has nothing to go on (a tie,
    0.5), while the full learner and the humor-only one rank it right. Unknown axes are refused."""
    dom, rng = gs.DOMAINS["roleplay"], random.Random(2)
    others = [ax for ax in dom.axes if ax != "humor"]

    def style():
        return {ax: rng.choice((-1, 1)) for ax in dom.axes} | {"humor": 1}
    shots = [rp_pair(rng, style(), ["humor"] + rng.sample(others, 2)) for _ in range(6)]
    for _ in range(10):
        q = rp_pair(rng, style(), ["humor"])
        assert judge.pair_diff("roleplay", q.prompt, q.chosen, q.rejected, others).tolist() == [0.0] * 7
        assert judge.reference_pair_credit("roleplay", shots, q, None, 1.0) == 1.0
        assert judge.reference_pair_credit("roleplay", shots, q, None, 1.0, ["humor"]) == 1.0
        assert judge.reference_pair_credit("roleplay", shots, q, None, 1.0, others) == 0.5
    with pytest.raises(ValueError, match="unknown roleplay axis 'tone'"):
        judge.check_axes("roleplay", ["humor", "tone"])


def test_each_side_of_an_axis_is_named_with_words_of_its_own():
    """A reader finds a term by its tokens: a side named by the other side's words plus one
    ("no examples" holds all of "examples", and the instruction every prompt holds says
    "examples" too) is one it can hardly tell apart. ELIX's levels are the exception by design:
    "not child" is a shot's contrast only, and a tally states the level itself."""
    for domain, j in judge.JUDGES.items():
        for axis in j.axes:
            a, b = (set(t.split()) for t in j.terms[axis])
            assert not a <= b and not b <= a, (domain, axis)


def test_elix_level_miss_by_hand():
    """An answer off the user's level loses all of LEVEL_W, each level beyond only LEVEL_FAR_W: for a
    teenager (level 2), a child's answer (0) loses LEVEL_W + LEVEL_FAR_W, an answer with no level
    words counts as four levels off. The reward differences carry the same figures."""
    far = judge.LEVEL_FAR_W / judge.LEVEL_W
    for level, want in ((2, 0.0), (2.5, 0.5), (1, 1.0), (3, 1.0), (0, 1.0 + far), (4, 1.0 + far),
                        (None, 1.0 + 3 * far)):
        assert judge.level_miss(level, 2) == pytest.approx(want)
    el = judge.JUDGES["elix"]
    user = {"domain": "elix", "traits": {}, "group": "teenager"}
    f = {"rel": 1.0, "q": 1.0, **{a: 0 for a in el.axes}}
    r = {lv: el.reward(user, dict(f, level=lv)) for lv in (0, 1, 2)}
    assert r[2] - r[1] == pytest.approx(judge.LEVEL_W)
    assert r[1] - r[0] == pytest.approx(judge.LEVEL_FAR_W)
