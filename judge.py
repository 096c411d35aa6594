"""Ground-truth judge of the synthetic users: reads style, level, sentiment and relevance from any text.

    from generate_synthetic import load_users, score      # re-exported from here
    users = load_users("data/synth/roleplay")
    score(users["rp00003"], "Is pasta worth the effort?", "Certainly. Definitely practice pasta with salt. ...")
    python judge.py data/synth/roleplay --l2 1.0   # the reference few-shot learner's accuracy by shots
    python judge.py data/synth/roleplay --axes formality,humor   # the same learner blind to other axes

The paper labels its synthetic pairs with an LLM judge; here each domain has a closed vocabulary and
the judge reads it back with word lexicons, so the same function labels the training data and scores
model outputs at evaluation. A user's reward:
    r_u(x, y) = W_REL * (relevance(x, y) * quality(y) - (1 - quality(y)))
                + sum over the user's traits of w_a * feature_a(y)
(elix adds -LEVEL_W * level_miss: the whole of LEVEL_W for an answer off the user's level, LEVEL_FAR_W
per level beyond). generate_synthetic.py writes text in this vocabulary.
"""
import argparse
import json
import os
import random
import re
from collections import defaultdict
from functools import lru_cache
from types import SimpleNamespace

import numpy as np

W_REL = 20.0       # larger than any style sum: an off-topic answer loses whatever its style
LEVEL_W = 4.0      # elix reward lost by an answer off the user's level; outweighs all secondary traits
LEVEL_FAR_W = 0.5  # and per level further off: at most one trait's weight, so two off-level answers are told
                   # apart by the user's other traits more than by their distance (the paper's hard pairs)
MARGIN = 1.0       # |r_a - r_b| below this: the persona cannot decide the pair
MAX_CHARS = 8000   # the judge reads at most this much of a response

_TOK = re.compile(r"^[ \t]*(?:[-*]|\d+[.)])[ \t]+|[a-z][a-z'-]*|[.!?]+|\n", re.M)
_SLOT = re.compile(r"\{\w+\}")


def words_of(text):
    """Lower-case words of a text or template (template slots like {s} are skipped)."""
    return re.findall(r"[a-z][a-z'-]*", _SLOT.sub(" ", text.lower()))


def scan(text):
    """-> (sentences as lists of words, number of bulleted lines). Bullets and newlines end sentences."""
    sents, cur, bullets = [], [], 0
    for t in _TOK.findall(text.lower()):
        if "a" <= t[0] <= "z":
            cur.append(t)
            continue
        if cur:
            sents.append(cur)
            cur = []
        bullets += t[-1] in " \t"
    if cur:
        sents.append(cur)
    return sents, bullets


def quality(sents, n_words, n_known):
    """1.0 for well-formed closed-vocabulary text; unknown words and repeated sentences cost."""
    if not n_words:
        return 0.0
    return (n_known / n_words) ** 2 * len(set(map(tuple, sents))) / len(sents)


def relevance(on, off, subject_hit):
    """Share of topic words that belong to the question's topic, halved without the subject."""
    return (1 + subject_hit) / 2 * on / (on + off) if on else 0.0


def last_question(prompt):
    if "## Question" in prompt:  # a full few-shot prompt: the query is its last question
        prompt = prompt.rsplit("## Question", 1)[1].split("\n#", 1)[0]
    return prompt.strip().lower()


def clean_response(response):
    response = response if isinstance(response, str) else str(response)
    return response.rsplit("## Preferred Response", 1)[-1][:MAX_CHARS]


def sign(x):
    return (x > 0) - (x < 0)


def frac(a, b):
    return (a - b) / (a + b) if a + b else 0.0


def lexicon(groups):
    """{name: "w1 w2 ..."} -> {word: name}."""
    return {w: name for name, ws in groups.items() for w in ws.split()}


class Judge:
    """Reward and trait statements shared by the domains; subclasses read features from text."""
    group_traits = ()  # traits fixed by the user's group (reviews scorer type)

    @property
    def tally_axes(self):
        """The axes a shot's contrast can name: the style axes (elix adds its levels)."""
        return self.axes

    def level_contrast(self, fc, fr):
        return {}  # only elix's answers are written at a level

    def votes(self, d):
        """A shot's contrast as it counts into the tally: as it is (elix's levels become votes)."""
        return d

    def tally_level(self, counts):
        return None  # only an elix tally states a level

    def reward(self, user, f):
        # malformed text (unknown words, repeated sentences, nothing at all) loses W_REL per unit
        # of lost quality, so no style can make it beat a well-formed answer
        r = W_REL * (f["rel"] * f["q"] - (1 - f["q"]))
        for axis, w in user["traits"].items():
            r += w * f[axis]
        return r

    def summary(self, user):
        t = user["traits"]
        items = [self.terms[a][0 if t[a] > 0 else 1] for a in self.tally_axes if t.get(a)]
        return "Prefers: " + ", ".join(items) + "." if items else ""


# ---------------------------------------------------------------- roleplay
# topic: subjects | plain words | technical words (parallel to the plain ones by position)
RP_TOPICS = """\
cooking: pasta bread soup curry salad dumplings | salt sauce knife oven skillet flavor spices butter | emulsion maillard umami brine roux julienne braising deglazing
gardening: tomatoes roses herbs compost lawns orchids | soil seeds sunlight shovel weeds roots pots rain | mulch nitrogen germination loam perennials pruning aeration cultivars
fitness: running squats yoga swimming cycling pushups | muscles breathing sweat stretching pace rest warmups sneakers | cadence hypertrophy aerobic intervals mobility plyometrics periodization lactate
money: budgeting saving investing taxes retirement debt | bills savings bank paycheck wallet coins spending cash | liquidity compounding dividends amortization diversification equity annuities deductions
travel: packing flights hostels roadtrips sightseeing souvenirs | suitcase tickets maps hotel luggage trains snacks views | itinerary layovers visas jetlag accommodation logistics transfers offseason
parenting: toddlers bedtime homework tantrums chores allowance | kids hugs rules naps praise routines patience playtime | bonding milestones scaffolding autonomy reinforcement boundaries temperament regulation
pets: puppies kittens aquariums parrots hamsters grooming | leash treats cage fur toys bowls walks vets | socialization enrichment husbandry dander conditioning neutering parasites substrate
music: guitar piano singing drums songwriting violin | chords tunes rhythm melody fingers lessons volume beats | arpeggios intonation syncopation timbre modulation counterpoint dynamics articulation
photography: portraits landscapes wildlife selfies sunsets macro | camera light photos shadows zoom flash angles frames | aperture exposure bokeh shutter composition histogram focal vignetting
programming: python debugging websites databases testing apis | code bugs laptop files errors screen keyboard loops | recursion refactoring latency concurrency abstraction compilers caching idempotency
repairs: plumbing drywall tiling roofing wiring caulking | tools hammer nails paint leaks pipes screws walls | grout flashing joists studs sealant primer conduit ampacity
careers: interviews resumes networking promotions negotiation freelancing | boss jobs coworkers salary office skills feedback raises | leverage competencies compensation stakeholders portfolio benchmarking upskilling mentorship
relationships: dating friendships breakups weddings anniversaries roommates | trust talks dinners flowers letters feelings texts compliments | empathy reciprocity vulnerability validation compatibility intimacy commitment communication
reading: novels poetry audiobooks libraries biographies comics | pages chapters stories authors bookmarks shelves covers characters | narrative metaphor subtext allegory syntax imagery foreshadowing protagonists
games: chess puzzles boardgames videogames crosswords sudoku | pieces dice boards moves cards levels scores teams | heuristics openings endgames probability strategy metagame combinatorics speedruns
sleep: sleep insomnia dreams mattresses snoring napping | pillows blankets bedroom darkness alarms sheets yawning quiet | circadian melatonin apnea hygiene chronotype adenosine polysomnography cortisol
studying: exams flashcards essays lectures languages math | notes textbooks pens desk grades teachers quizzes highlighters | retrieval metacognition spacing interleaving mnemonics encoding elaboration pedagogy
cars: driving parking tires engines carpools motorcycles | road wheels gas seatbelt mirrors brakes keys traffic | torque transmission alignment combustion suspension differential horsepower traction
fashion: jackets jeans suits scarves hats sweaters | colors fabric pockets sizes buttons closet shoes belts | silhouette tailoring drape textiles capsule hemline proportions layering
drinks: espresso tea smoothies cocktails lemonade kombucha | cups ice sugar fruit mugs water kettle straws | extraction infusion fermentation acidity tannins crema bitters brix
outdoors: camping hiking fishing kayaking climbing stargazing | tent boots trails campfire compass backpack lake rope | navigation hypothermia topography belaying portage switchbacks bivouac elevation
crafts: sketching watercolors pottery sculpture calligraphy origami | pencils paper brushes clay ink scissors glue canvas | glazing kiln perspective shading crosshatching gesso pigments armature
productivity: email calendars deadlines habits planners multitasking | tasks inbox reminders breaks timers folders priorities mornings | timeboxing batching prioritization pomodoro kanban triage delegation automation
shopping: groceries coupons thrift markets gifts sales | cart prices bags stores discounts aisles brands receipts | arbitrage markup elasticity inventory procurement wholesale bundling depreciation"""
# Marker words, +1 and -1 values of each axis (several writers, one word each). Opener, example
# and joke sentences are asides, not content; the order axis compares the positions of the first
# confidence adverb (the answer sentence) and the first background lead-in.
RP_MARKERS = {"formality": ("certainly greetings indeed", "hey yo cool"),
              "confidence": ("definitely always surely", "probably maybe perhaps"),
              "example": ("example instance personally", ""), "humor": ("ha pun lol", ""),
              "background": ("background context generally", "")}
RP_ASIDES = ("formality", "example", "humor")
RP_NEUTRAL = ("a about around borrow buy carefully careless changed cheap check classic clear club compare curious "
              "daily each everything experiment fans first for forever goals good grows helped hurt in intended join "
              "log loves me mixing monthly needs neighbors never new oh patient plan practice punishes review rewards "
              "rush schedule set share shared skipping start starts surprised swap taught the tips track trouble try "
              "twice watch weekly with worked your")


class Roleplay(Judge):
    name = "roleplay"
    axes = ("formality", "confidence", "format", "example", "humor", "order", "technical", "length")
    # each side of an axis named by a word the other side's name does not contain: "no examples"
    # was " n", "o", " examples" to the tokenizer, and the oracle read it as "examples" (an
    # answer's example sentence moved its margin +0.63 nats under "examples", +0.56 under "no
    # examples"; under "abstract", -0.25: EXPERIMENTS.md, "The example axis's name")
    terms = {"formality": ("formal", "casual"), "confidence": ("confident", "hedged"),
             "format": ("lists", "prose"), "example": ("examples", "abstract"),
             "humor": ("humorous", "serious"), "order": ("answer first", "background first"),
             "technical": ("technical", "plain"), "length": ("detailed", "concise")}

    def __init__(self):
        self.topics, self.topic_of, self.register, self.subjects = [], {}, {}, {}
        for t, line in enumerate(RP_TOPICS.splitlines()):
            subjects, plain, tech = (part.split() for part in line.split(": ")[1].split(" | "))
            self.topics.append((subjects, plain, tech))
            self.topic_of.update({w: t for w in subjects + plain + tech})
            self.register.update({w: -1 for w in plain} | {w: 1 for w in tech})
            self.subjects.update({s: t for s in subjects})
        self.mark = {w: (a, 1 - 2 * k) for a, pair in RP_MARKERS.items()
                     for k, ws in enumerate(pair) for w in ws.split()}
        self.known = set(RP_NEUTRAL.split()) | set(self.mark) | set(self.topic_of)

    @lru_cache(maxsize=1 << 16)
    def parse_prompt(self, prompt):
        return next(((self.subjects[w], w) for w in words_of(last_question(prompt)) if w in self.subjects),
                    (None, None))

    def read(self, prompt, text):
        topic, subject = self.parse_prompt(prompt)
        sents, bullets = scan(clean_response(text))
        c = dict.fromkeys(RP_MARKERS, 0)
        first = {}  # word position of the first confidence adverb and of the first background lead-in
        n = known = on = off = tech = plain = content = subj = 0
        for sent in sents:
            aside = False
            for w in sent:
                n += 1
                known += w in self.known
                m = self.mark.get(w)
                if m:
                    c[m[0]] += m[1]
                    aside |= m[0] in RP_ASIDES
                    first.setdefault(m[0], n)
                t = self.topic_of.get(w)
                if t is not None:
                    on += t == topic
                    off += t != topic
                    r = self.register.get(w, 0)
                    tech += r > 0
                    plain += r < 0
                    subj |= w == subject
            content += not aside
        a, b = first.get("confidence"), first.get("background")
        return {"formality": sign(c["formality"]), "confidence": sign(c["confidence"]),
                "format": 1 if bullets >= 2 else -1, "example": 1 if c["example"] else -1,
                "humor": 1 if c["humor"] else -1, "order": 0 if a is None or b is None else sign(b - a),
                "technical": frac(tech, plain), "length": 1 if content > 2 else -1,
                # an answer needs one content sentence: openers, jokes and examples alone are not one
                "rel": relevance(on, off, subj), "q": quality(sents, n, known) if content else 0.0}


# ---------------------------------------------------------------- elix
# field: concepts | plain words | jargon
EX_FIELDS = """\
physics: gravity, friction, magnetism, electricity, inertia, momentum, buoyancy, air pressure, sound waves, refraction, heat transfer, static electricity, energy conservation, centripetal force, lasers, radioactivity, nuclear fission, black holes, relativity, quantum tunneling | objects speed pushes weight motion balls | vectors acceleration joules fields entropy newtons
biology: photosynthesis, cells, dna, evolution, digestion, the immune system, vaccines, bacteria, viruses, hormones, neurons, metabolism, genes, mitosis, ecosystems, pollination, the heart, breathing, sleep cycles, antibiotics | plants bodies food animals germs organs | enzymes proteins membranes receptors genomes mitochondria
economics: inflation, supply and demand, interest rates, taxes, unemployment, recessions, the stock market, banks, credit scores, compound interest, trade, tariffs, monopolies, currency exchange, insurance, minimum wage, gdp, cryptocurrency, opportunity cost, bonds | money prices shops jobs savings loans | equilibrium elasticity liquidity externalities arbitrage yields
computing: the internet, algorithms, encryption, passwords, computer memory, search engines, machine learning, cloud storage, operating systems, programming, wifi, spam filters, databases, compression, computer viruses, binary numbers, pixels, gps, blockchain, robots | computers phones messages screens data apps | protocols hashing latency bandwidth compilers heuristics
earth: earthquakes, volcanoes, weather, climate change, the water cycle, tides, seasons, rainbows, clouds, tornadoes, hurricanes, erosion, fossils, plate tectonics, glaciers, the ozone layer, lightning, ocean currents, deserts, caves | rain wind oceans mountains sun ground | convection sediment isobars subduction albedo precipitation
space: stars, planets, the moon, eclipses, comets, galaxies, the big bang, satellites, rockets, orbits, meteors, the solar system, astronauts, telescopes, exoplanets, mars, the milky way, space stations, sunspots, nebulas | sky night shine spin dust distance | luminosity redshift parallax orbital spectra accretion
chemistry: atoms, molecules, chemical reactions, acids and bases, the periodic table, rust, combustion, solutions, crystals, polymers, catalysts, batteries, soap, boiling, freezing, evaporation, isotopes, ions, plastics, alloys | stuff mixing bubbles colors liquids pieces | stoichiometry valence enthalpy oxidation covalent molarity
psychology: memory, emotions, habits, motivation, stress, dreams, learning, attention, personality, empathy, anxiety, the placebo effect, peer pressure, procrastination, confirmation bias, intuition, creativity, happiness, grief, willpower | feelings brains friends choices moods thoughts | cognition schemas amygdala dopamine conditioning neuroplasticity
civics: democracy, elections, the constitution, courts, laws, voting, juries, free speech, citizenship, the senate, political parties, lobbying, the census, federalism, treaties, human rights, city councils, referendums, impeachment, checks and balances | people leaders rules votes towns fairness | jurisdiction legislature sovereignty precedent ratification suffrage
health: vitamins, calories, allergies, fevers, blood pressure, cholesterol, hydration, posture, sunscreen, first aid, cavities, headaches, nutrition labels, fiber, caffeine, stretching, meditation, heart rate, jet lag, diabetes | meals drinks muscles doctors snacks rest | physiology glucose inflammation homeostasis electrolytes cardiovascular"""
EX_LEVELS = ("child", "preteen", "teenager", "young adult", "expert")
# Words only one level uses: its devices (exclamations, analogies to its world, hedges, jargon frames).
EX_LEVEL_WORDS = ("imagine giant makes wiggle wow magic helps grow yay guess super whee toy puppy crayon sandbox balloon cookie",
                  "basically kind pretty neat here's deal connects bicycle backpack skateboard locker sleepover trampoline",
                  "honestly shapes links talk lowkey playlist concert hoodie prom permit skatepark",
                  "refers affects practice essentially describes means drives resembles budget commute lease paycheck "
                  "spreadsheet roommate",
                  "denotes coupling formally characterized arises whereby dominates canonically modeled governing")
EX_MARKERS = {"example": "example instance picture", "detail": "also plus top"}
EX_NEUTRAL = "a about action all as at day depends for from how in is it like look matters much of on real shows that " \
             "think through to under up via what with works your"


class Elix(Judge):
    name = "elix"
    axes = ("example", "detail")
    # a level is named as a term of its own: "teenager" for the side a shot's chosen answer is
    # written at, "not child" for the rejected's (level_contrast); counted into a tally, each
    # shot's levels become votes (votes) and the tally states the level they favour (tally_level);
    # example's minus side "abstract", not "no examples", for the reason Roleplay.terms gives
    terms = {"example": ("examples", "abstract"), "detail": ("detailed", "brief"),
             **{lv: (lv, f"not {lv}") for lv in EX_LEVELS}}
    tally_axes = axes + EX_LEVELS

    def level_contrast(self, fc, fr):
        # the levels the two answers are read at (their level words' mean, rounded), where they
        # differ: the user's level is what a shot of ELIX tells most, and no style axis names it
        if fc["level"] is None or fr["level"] is None or round(fc["level"]) == round(fr["level"]):
            return {}
        return {EX_LEVELS[round(fc["level"])]: 1, EX_LEVELS[round(fr["level"])]: -1}

    def votes(self, d):
        # where between a shot's two levels the user sits: level L gets +1 where the chosen
        # answer's level is nearer L than the rejected's, -1 where farther (a line naming several,
        # as a reader may write, by the signed sum of their distances)
        named = {EX_LEVELS.index(a): v for a, v in d.items() if a in EX_LEVELS and v}
        out = {a: v for a, v in d.items() if a not in EX_LEVELS}
        if named:
            out |= {lv: sign(sum(-v * abs(n - i) for n, v in named.items())) for i, lv in enumerate(EX_LEVELS)}
        return out

    def tally_level(self, counts):
        """The level the tally's votes favour most (the middle one of a tie), None without votes:
        what "Level: teenager." states, in the words of the oracle's description."""
        v = [counts.get(lv, 0) for lv in EX_LEVELS]
        if not any(v):
            return None
        best = [lv for lv, x in zip(EX_LEVELS, v) if x == max(v)]
        return best[len(best) // 2]

    def __init__(self):
        self.fields, self.topic_of, self.concepts = [], {}, {}
        for f, line in enumerate(EX_FIELDS.splitlines()):
            concepts, plain, jargon = line.split(": ")[1].split(" | ")
            self.fields.append((plain.split(), jargon.split()))
            self.topic_of.update({w: f for w in plain.split() + jargon.split()})
            self.concepts.update({c: f for c in concepts.split(", ")})
        self.level_of = {w: lv for lv, ws in enumerate(EX_LEVEL_WORDS) for w in ws.split()}
        self.mark = lexicon(EX_MARKERS)
        self.known = set().union(EX_NEUTRAL.split(), self.level_of, self.mark, self.topic_of,
                                 words_of(" ".join(self.concepts)))

    @lru_cache(maxsize=1 << 16)
    def parse_prompt(self, prompt):
        q = last_question(prompt)
        c = q[8:].rstrip(" .?!") if q.startswith("explain ") else q
        return (self.concepts[c], c) if c in self.concepts else (None, None)

    def read(self, prompt, text):
        field, concept = self.parse_prompt(prompt)
        text = clean_response(text)
        sents, _ = scan(text)
        counts, m = [0] * 5, {"example": -1, "detail": -1}
        n = known = on = off = 0
        for sent in sents:
            for w in sent:
                n += 1
                known += w in self.known
                lv = self.level_of.get(w)
                if lv is not None:
                    counts[lv] += 1
                if w in self.mark:
                    m[self.mark[w]] = 1
                t = self.topic_of.get(w)
                if t is not None:
                    on += t == field
                    off += t != field
        total = sum(counts)  # the level read is the mean level of the level words used
        level = sum(i * k for i, k in enumerate(counts)) / total if total else None
        hit = bool(concept) and concept in text.lower()
        return {"level": level, **m, "rel": relevance(on, off, hit), "q": quality(sents, n, known)}

    def reward(self, user, f):
        lv = EX_LEVELS.index(user["group"])
        return super().reward(user, f) - LEVEL_W * level_miss(f["level"], lv)

    def summary(self, user):
        return f"Level: {user['group']}. {super().summary(user)}".strip()


# ---------------------------------------------------------------- reviews
RV_GENRES = {"horror": "ghosts screams basement curse monster cellar",
             "comedy": "jokes gags punchlines slapstick banter pranks",
             "western": "cowboys saloon outlaws sheriff horses duels",
             "romance": "lovers kisses wedding heartbreak courtship candlelight",
             "thriller": "chases suspects conspiracy hostage ransom detectives",
             "sci-fi": "spaceships aliens robots lasers androids wormholes",
             "musical": "songs dancers choreography choruses ballads stage",
             "war": "soldiers battles trenches generals bombers medals"}
RV_TITLE = ("Silent Golden Broken Midnight Hidden Crimson Frozen Last Wild Electric Hollow Burning Distant Velvet Iron "
            "Paper Glass Lonely Secret Painted Restless Northern Endless Scarlet".split(),
            "Harbor Garden Kingdom Signal River Empire Station Orchard Mirror Frontier Lantern Circus Voyage Canyon "
            "Letter Island Engine Crown Forest Tower Promise Horizon Carnival Compass".split())
RV_TONE = {"positive": "gripping charming brilliant moving delightful stunning clever heartfelt",
           "negative": "dull clumsy tedious bland messy forgettable shallow sluggish"}
RV_ASPECT = {"acting": "acting cast performances lead chemistry actors", "story": "plot script ending pacing dialogue premise"}
RV_RATING = "rating stars score"
RV_NEUTRAL = "a around bring but feels film found have i in is its moments movie of on out scenes the those verdict with"


class Reviews(Judge):
    name = "reviews"
    axes = ("sentiment", "length", "aspect", "rating")
    # rating's minus side "unrated", not "no ratings": a name that does not hold the other's (Roleplay.terms)
    terms = {"sentiment": ("positive", "negative"), "length": ("verbose", "concise"),
             "aspect": ("acting", "story"), "rating": ("ratings", "unrated")}
    group_traits = ("sentiment", "length")

    def __init__(self):
        self.topic_of = {w: g for g, ws in RV_GENRES.items() for w in ws.split() + [g]}
        self.tone = {w: 1 if t == "positive" else -1 for w, t in lexicon(RV_TONE).items()}
        self.aspect = {w: 1 if a == "acting" else -1 for w, a in lexicon(RV_ASPECT).items()}
        self.known = set().union(RV_NEUTRAL.split(), RV_RATING.split(), self.topic_of, self.tone, self.aspect,
                                 words_of(" ".join(RV_TITLE[0] + RV_TITLE[1])))

    @lru_cache(maxsize=1 << 16)
    def parse_prompt(self, prompt):
        m = re.match(r"review (.+), an? (\S+) movie", last_question(prompt))
        return (m.group(2), m.group(1)) if m else (None, None)

    def read(self, prompt, text):
        genre, title = self.parse_prompt(prompt)
        text = clean_response(text)
        sents, _ = scan(text)
        rating_words = RV_RATING.split()
        n = known = on = off = pos = neg = act = story = rating = content = 0
        for sent in sents:
            rated = False  # a rating sentence is not content for the length axis
            for w in sent:
                n += 1
                known += w in self.known
                t = self.tone.get(w, 0)
                pos += t > 0
                neg += t < 0
                a = self.aspect.get(w, 0)
                act += a > 0
                story += a < 0
                rated |= w in rating_words
                g = self.topic_of.get(w)
                if g is not None:
                    on += g == genre
                    off += g != genre
            rating |= rated
            content += not rated
        hit = bool(title) and title in text.lower()
        return {"sentiment": frac(pos, neg), "length": max(-1, min(1, content - 2)), "aspect": frac(act, story),
                "rating": 1 if rating else -1, "rel": relevance(on, off, hit), "q": quality(sents, n, known)}


JUDGES = {j.name: j for j in (Roleplay(), Elix(), Reviews())}


# ---------------------------------------------------------------- API used by training and evaluation
def load_users(path):
    """users.jsonl (or its domain folder) -> {user_id: row}."""
    path = os.path.join(path, "users.jsonl") if os.path.isdir(path) else path
    users = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            for field, kind in (("user_id", str), ("domain", str), ("traits", dict)):
                if not isinstance(row, dict) or not isinstance(row.get(field), kind):
                    raise ValueError(f"{path}:{lineno}: field '{field}' missing or not a {kind.__name__}")
            if row["domain"] not in JUDGES:
                raise ValueError(f"{path}:{lineno}: field 'domain' is {row['domain']!r}, "
                                 f"not one of {sorted(JUDGES)}")
            users[row["user_id"]] = row
    return users


def score(user, prompt, response):
    """The user's reward for `response` to `prompt`, read from the text alone. Never raises on strings.
    prompt: the question (a full few-shot prompt also works: its last question is read); a response
    may keep its "## Preferred Response" header."""
    j = JUDGES[user["domain"]]
    return j.reward(user, j.read(str(prompt), response))


def trait_summary(user):
    """Short canonical statement of the user's traits, e.g. 'Prefers: formal, lists, concise.'"""
    return JUDGES[user["domain"]].summary(user)


def summary_for_response(user, prompt, response):
    """trait_summary of the persona that would prefer `response`: the user's trait axes set to the
    values the judge reads in it (an axis the text leaves undecided keeps the user's value)."""
    j = JUDGES[user["domain"]]
    f = j.read(str(prompt), response)
    traits = {a: abs(w) * (sign(f[a]) or sign(w)) for a, w in user["traits"].items()}
    group = EX_LEVELS[round(f["level"])] if j.name == "elix" and f["level"] is not None else user["group"]
    return j.summary(dict(user, traits=traits, group=group))


def contrast(domain, prompt, chosen, rejected):
    """{axis: sign(chosen) - sign(rejected)} over the axes the judge reads in both answers; on
    elix also +1 for the level the chosen answer is written at and -1 for the rejected's."""
    j = JUDGES[domain]
    fc, fr = j.read(str(prompt), chosen), j.read(str(prompt), rejected)
    d = {a: sign(fc[a]) - sign(fr[a]) for a in j.axes if fc.get(a) is not None and fr.get(a) is not None}
    return {**d, **j.level_contrast(fc, fr)}


def contrast_line(domain, d):
    """A contrast (or a sum of them) named from the side it leans to, e.g. 'Prefers: formal,
    lists.' ('Prefers: nothing.' when even). The shared statement, not a subclass's: an elix
    contrast names its levels as terms ('not child, teenager'), not the user's 'Level:' line."""
    return Judge.summary(JUDGES[domain], {"traits": d}) or "Prefers: nothing."


def contrast_summary(domain, prompt, chosen, rejected):
    """The style axes on which the judge reads `chosen` and `rejected` apart, named from the
    chosen side."""
    return contrast_line(domain, contrast(domain, prompt, chosen, rejected))


def tally(domain, shots):
    """{axis: sum of the shots' contrasts}."""
    return summed([contrast(domain, s.prompt, s.chosen, s.rejected) for s in shots])


def contrast_tally(domain, shots):
    """The shots' tally as a line: the user description a reader of these shots alone would write."""
    return contrast_line(domain, tally(domain, shots))


def tally_pair_credit(domain, shots, query, counted=False):
    """The tally of these shots (what --annotate writes after them) applied by rule, no model:
    1.0 if the axes it names, with their signs, side with query.chosen (their sum over the
    query's contrast > 0), 0.0 if with query.rejected, 0.5 on a tie. Signs are all a tally line
    keeps (contrast_line); counted: the tally of --annotate tally instead, each axis weighed by
    its count (shot_counts, count_line), and on elix the level it states first: the answer
    nearer it wins, as the level outweighs every style axis in the reward. All the shots
    count, as for reference_pair_credit, even where a prompt dropped its oldest to fit the block."""
    j, q = JUDGES[domain], contrast(domain, query.prompt, query.chosen, query.rejected)
    if not counted:
        t = {a: sign(v) for a, v in tally(domain, shots).items()}
        m = sum(t.get(a, 0) * v for a, v in q.items())
    else:
        t = shot_counts(domain, shots)
        level = j.tally_level(t)
        m = sum(t.get(a, 0) * q.get(a, 0) for a in j.axes)  # at most 2 x shots x axes
        if level:  # the nearer answer wins whatever the style counts
            m += (2 * len(j.axes) * len(shots) + 1) * j.votes(shot_signs(domain, query)).get(level, 0)
    return 1.0 if m > 0 else 0.0 if m < 0 else 0.5


def shot_counts(domain, shots):
    """{axis: shots whose chosen answer leans to the axis's first term - shots leaning to its
    second}: the tally of --annotate tally, what the shots' lines say when counted (on elix
    each shot's levels counted as votes, Elix.votes)."""
    return line_counts(domain, [shot_signs(domain, s) for s in shots])


def shot_signs(domain, shot):
    """A shot's contrast as its line says it: {axis: sign}."""
    return {a: sign(v) for a, v in contrast(domain, shot.prompt, shot.chosen, shot.rejected).items()}


def line_counts(domain, contrasts):
    """The counted tally of per-shot contrasts ({axis: sign}, as parse_line reads a line back)."""
    return summed([JUDGES[domain].votes(d) for d in contrasts])


def count_line(domain, counts):
    """Counts as a line that names each axis once per net shot, strongest first (ties in the
    judge's axis order): {humor: 3, formality: -1} -> 'Prefers: humorous, humorous, humorous,
    casual.' A reader weighs an axis by how often it is named, as it weighs a word it sees
    more often, with no numbers to learn. On elix the level the votes favour comes first, as the
    oracle's description states it: 'Level: teenager. Prefers: examples, examples.'"""
    j = JUDGES[domain]
    axes = sorted((a for a in j.axes if counts.get(a)), key=lambda a: -abs(counts[a]))
    items = [j.terms[a][counts[a] < 0] for a in axes for _ in range(abs(counts[a]))]
    level = j.tally_level(counts)
    parts = [f"Level: {level}."] if level else []
    if items:
        parts.append("Prefers: " + ", ".join(items) + ".")
    return " ".join(parts) or "Prefers: nothing."


def parse_line(domain, line):
    """contrast_line read back: {axis: +1 or -1} for each term the line names; anything else
    in it (a model's misspelling, a repeated term) is ignored."""
    j = JUDGES[domain]
    terms = {j.terms[a][i]: (a, 1 - 2 * i) for a in j.tally_axes for i in (0, 1)}
    body = line.strip().removeprefix("Prefers:").strip().removesuffix(".")
    return dict(terms[t.strip()] for t in body.split(",") if t.strip() in terms)


def line_agreement(domain, shots, lines):
    """How a writer's contrast lines (lines[i] written for shots[i]) match the judge's, per axis:
    {axis: {"differs": shots whose answers the judge reads apart on it, "named": of those, shots
    whose line names it with the judge's sign, "flipped": with the other sign, "false": shots the
    judge does not read apart on it whose line names it anyway}}. A line that was not written
    (None) names nothing."""
    out = {a: {"differs": 0, "named": 0, "flipped": 0, "false": 0} for a in JUDGES[domain].tally_axes}
    for s, line in zip(shots, lines):
        truth = contrast(domain, s.prompt, s.chosen, s.rejected)
        said = parse_line(domain, line or "")
        for a, c in out.items():
            if sign(truth.get(a, 0)):
                c["differs"] += 1
                c["named"] += said.get(a) == sign(truth[a])
                c["flipped"] += said.get(a) == -sign(truth[a])
            else:
                c["false"] += a in said
    return out


def summed(contrasts):
    """Per-axis sum of contrast dicts."""
    total = defaultdict(int)
    for d in contrasts:
        for a, v in d.items():
            total[a] += v
    return total


def trait_recovery(user, text):
    """Fraction of the user's traits (and elix level) that `text` states, without stating their opposite."""
    j = JUDGES[user["domain"]]
    items = {" ".join(s.split()) for s in re.split(r"[,.;:\n]", str(text).lower())}
    checks = [(j.terms[a][w < 0], j.terms[a][w > 0]) for a, w in user["traits"].items() if w]
    if j.name == "elix":
        checks.append((user["group"], *[lv for lv in EX_LEVELS if lv != user["group"]]))
    return sum(want in items and not items & set(others) for want, *others in checks) / max(1, len(checks))


def level_miss(level, lv):
    """How far an answer read at `level` (None: no level words) misses level lv, in LEVEL_W units:
    1 for the first level off, LEVEL_FAR_W / LEVEL_W for each one beyond."""
    d = 4.0 if level is None else abs(level - lv)
    return min(d, 1.0) + LEVEL_FAR_W / LEVEL_W * max(d - 1.0, 0.0)


# ---------------------------------------------------------------- reference few-shot learner
# The ceiling a model reading N shots could reach if it knew the judge's features: a logistic
# regression on feature differences, fitted per user on its shots (or on the training users pooled
# for zero shots). Evaluation reports it beside the models' pair accuracy.
TIE = 1e-9  # |w . d| at or below this is a tie (a weight orthogonal to the pair's difference)
L2 = 1.0    # prior precision of each weight; on roleplay val users 0.03 to 3 agree within 0.4 points
SHOTS = (0, 1, 2, 4, 8)


@lru_cache(maxsize=1 << 17)
def features(domain, prompt, response):
    """The personal part of the judge's reward as a tuple: the domain's style axes (elix adds minus
    the distance to each level), so every user's reward is w_u . features + a term all users share."""
    j = JUDGES[domain]
    f = j.read(str(prompt), response)
    x = [float(f[a]) for a in j.axes]
    if domain == "elix":  # a user at level L weighs the L-th of these by LEVEL_W
        x += [-level_miss(f["level"], lv) for lv in range(len(EX_LEVELS))]
    return tuple(x)


def pair_diff(domain, prompt, a, b, axes=None):
    """features(a) - features(b) as a float64 vector; axes: only these style axes, in this order."""
    d = np.subtract(features(domain, prompt, a), features(domain, prompt, b), dtype=np.float64)
    return d if axes is None else d[[JUDGES[domain].axes.index(x) for x in axes]]


def check_axes(domain, axes):
    """axes (a list, or None for all), or ValueError naming the first unknown one."""
    for x in axes or ():
        if x not in JUDGES[domain].axes:
            raise ValueError(f"unknown {domain} axis {x!r}; choose from {','.join(JUDGES[domain].axes)}")
    return axes


def logreg_objective(w, d, l2):
    return np.logaddexp(0.0, -(d @ w)).sum() + 0.5 * l2 * (w @ w)


def fit_logreg(diffs, l2):
    """w minimising sum_i log(1 + exp(-w . d_i)) + l2/2 |w|^2 over differences d_i labelled "first
    preferred" (l2 > 0). Symmetrised: each d_i also enters as -d_i labelled "second preferred"; with
    no intercept that copy has the same loss, so it is counted once, and the fit is order-free:
    P(a over b) = sigmoid(w . d) = 1 - P(b over a). Newton steps with backtracking in float64:
    deterministic, and convergent since the objective is strictly convex."""
    d = np.asarray(diffs, dtype=np.float64)
    w = np.zeros(d.shape[1])
    for _ in range(100):
        p = np.exp(-np.logaddexp(0.0, d @ w))  # sigmoid(-w . d_i), overflow-free
        grad = l2 * w - d.T @ p
        hess = (d.T * (p * (1 - p))) @ d + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        decrement = grad @ step  # Newton decrement squared: twice the predicted decrease
        if decrement < 1e-20:
            break
        t, j0 = 1.0, logreg_objective(w, d, l2)
        while logreg_objective(w - t * step, d, l2) > j0 - 0.25 * t * decrement and t > 1e-10:
            t /= 2
        w = w - t * step
    return w


def population_weights(domain, rows, l2, axes=None):
    """The zero-shot learner: fit_logreg on the pooled (chosen - rejected) differences of rows (the
    training users' pairs; each has .prompt .chosen .rejected)."""
    return fit_logreg([pair_diff(domain, r.prompt, r.chosen, r.rejected, axes) for r in rows], l2)


def reference_pair_credit(domain, shots, query, w_population, l2, axes=None):
    """1.0 if the learner ranks query.chosen over query.rejected, 0.0 if it ranks it lower, 0.5 on a
    tie (as a coin flip would score; one shot often says nothing about the query's axes). The learner
    is fit_logreg on the shots' (chosen - rejected) differences, or w_population without shots.
    axes: a learner that sees only these style axes (w_population fitted on the same)."""
    diff = lambda p: pair_diff(domain, p.prompt, p.chosen, p.rejected, axes)
    w = fit_logreg([diff(s) for s in shots], l2) if shots else w_population
    m = w @ diff(query)
    return 1.0 if m > TIE else 0.0 if m < -TIE else 0.5


def seen_families(users, train_ids):
    """Families of the users who train (ids from the preference rows' split): a held-out user of
    any other family belongs to a family training never saw (--holdout-family)."""
    return {users[u].get("family") for u in train_ids if u in users}


def reference_curve(folder, l2=L2, seed=0, axes=None):
    """{(split, group): {"users": n, k: mean credit}} over every held-out row as a query, with k shots
    drawn from the same user's other rows. Groups: each family, "seen" and "unseen" (families with and
    without training users) and "all". The population learner is fitted on the train split. axes:
    a learner that reads only these style axes (what reading them perfectly is worth)."""
    users = load_users(folder)
    with open(os.path.join(folder, "prefs.jsonl")) as f:
        rows = [SimpleNamespace(**json.loads(line)) for line in f if line.strip()]
    domain = next(iter(users.values()))["domain"]
    w0 = population_weights(domain, [r for r in rows if r.split == "train"], l2, check_axes(domain, axes))
    seen = seen_families(users, {r.user_id for r in rows if r.split == "train"})
    held = defaultdict(list)
    for r in rows:
        if r.split != "train":
            held[r.user_id].append(r)
    rng, credit, members = random.Random(seed), defaultdict(lambda: defaultdict(list)), defaultdict(set)
    for uid in sorted(held):
        u = users[uid]
        groups = {(u["split"], g) for g in (u.get("family"), "seen" if u.get("family") in seen else "unseen", "all")
                  if g}
        for g in groups:
            members[g].add(uid)
        for i, q in enumerate(held[uid]):
            others = held[uid][:i] + held[uid][i + 1:]
            for k in SHOTS:
                c = reference_pair_credit(domain, rng.sample(others, k), q, w0, l2, axes)
                for g in groups:
                    credit[g][k].append(c)
    return {g: {"users": len(members[g]), **{k: sum(v) / len(v) for k, v in cs.items()}}
            for g, cs in sorted(credit.items())}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="The reference learner's pair accuracy on held-out users "
                                            "(ties count half).")
    p.add_argument("folder", help="a generated domain folder: users.jsonl, prefs.jsonl")
    p.add_argument("--l2", type=float, default=L2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--axes", default=None, help="comma list: a learner that reads only these style axes")
    a = p.parse_args()
    try:
        curve = reference_curve(a.folder, a.l2, a.seed, a.axes and a.axes.split(","))
    except ValueError as e:  # an unknown --axes name: one line, no traceback
        raise SystemExit(f"judge.py: {e}")
    print(f"{'split':6} {'group':16} {'users':>5} " + " ".join(f"{f'k={k}':>6}" for k in SHOTS))
    for (split, group), r in curve.items():
        print(f"{split:6} {group:16} {r['users']:5d} " + " ".join(f"{100 * r[k]:6.1f}" for k in SHOTS))
