"""Synthetic users for FSPO (roleplay, elix, reviews) and the ground-truth judge that labels them.

    python generate_synthetic.py --domain all --out data/synth --seed 0
    python generate_synthetic.py --domain all --out data/synth_full --seed 0 --scale full
    python generate_synthetic.py --domain roleplay --out /tmp/ablate --no-views --writers 1 --no-refine

The paper writes personas, questions and answers with LLMs and labels pairs with an LLM judge.
Here answers come from short templates whose style is carried by a few salient marker phrases,
and a judge reads style, level, sentiment and relevance back from ANY text. The same judge
labels the data and scores model outputs at evaluation, so win rates are exact, not noisy.

A user's reward: r_u(x, y) = W_REL * relevance(x, y) * quality(y) + sum_a w_a * feature_a(y)
(elix adds -LEVEL_W * |level(y) - user level|). Labels are Bradley-Terry draws,
p(a over b) = sigmoid((r_a - r_b) / temperature). Structure devices (paper): each pair is
labelled twice and dropped when the draws disagree (--no-consistency turns this off), and a
pair the persona cannot decide adds a trait to the persona, after which all its pairs are
relabelled (--no-refine). Diversity devices: several viewpoints per question (--no-views) and
several template families, "writers" (--writers K).

Python API used by training and evaluation:
    load_users(path) -> {user_id: row}        score(user, prompt, response) -> float
    trait_summary(user) -> str                summary_for_response(user, prompt, response) -> str
    trait_recovery(user, text) -> float
The prompt given to score() is the question (a full few-shot prompt also works: the judge reads
the last "## Question"); a response may still carry its "## Preferred Response" header.
"""
import argparse
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from functools import lru_cache

from tqdm import tqdm

W_REL = 20.0        # larger than any style sum: an off-topic answer loses whatever its style
LEVEL_W = 4.0       # elix reward lost per level of distance; outweighs all secondary traits
MARGIN = 1.0        # |r_a - r_b| below this: the persona cannot decide the pair
N_VIEWS = 4         # viewpoints per question when view conditioning is on
MAX_CHARS = 8000    # the judge reads at most this much of a response
TEST_Q_FRAC = 0.18  # questions reserved for held-out users
SCALES = {  # domain -> (users, preference rows per user)
    "tiny": {"roleplay": (60, 12), "elix": (40, 10), "reviews": (40, 10)},
    "default": {"roleplay": (1500, 27), "elix": (550, 20), "reviews": (500, 24)},
    "full": {"roleplay": (1500, 440), "elix": (550, 420), "reviews": (500, 420)},
}
NAMES = ("Ava Ben Chloe Dev Elena Farid Grace Hiro Ines Jamal Kira Leo Maya Nico Olga Priya Quinn "
         "Rosa Sam Tariq Uma Victor Wen Xena Yusuf Zoe Arjun Bea Carlos Dana Emil Fatima").split()

# ---------------------------------------------------------------- text scanning (shared)
_TOK = re.compile(r"^[ \t]*(?:[-*]|\d+[.)])[ \t]+|[a-z][a-z'-]*|[.!?]+|\n", re.M)
_SLOT = re.compile(r"\{\w+\}")


def words_of(text):
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
    if "## Question" in prompt:  # a full few-shot prompt: the query is the last question
        prompt = prompt.rsplit("## Question", 1)[1].split("\n#", 1)[0]
    return prompt.strip().lower()


def clean_response(response):
    response = response if isinstance(response, str) else str(response)
    return response.rsplit("## Preferred Response", 1)[-1][:MAX_CHARS]


def sign(x):
    return (x > 0) - (x < 0)


def frac(a, b):
    return (a - b) / (a + b) if a + b else 0.0


def held_out_blocks(n, size, fraction, rng):
    """Indices of the blocks of `size` consecutive users that are held out (at least one)."""
    blocks = n // size
    return set(rng.sample(range(blocks), max(1, round(fraction * blocks))))


class Domain:
    """Shared persona, labelling and summary logic; subclasses supply text and features."""
    group_traits = ()   # traits fixed by the user's group that refinement never adds
    weight_range = (1.0, 2.0)

    def reward(self, user, f):
        r = W_REL * f["rel"] * f["q"]
        for axis, w in user["traits"].items():
            r += w * f[axis]
        return r

    def add_trait(self, user, axis, s, rng, lo=None, hi=None):
        lo, hi = (lo, hi) if lo is not None else self.weight_range
        user["traits"][axis] = round(s * rng.uniform(lo, hi), 2)
        phrases = self.phrases[axis][0 if s > 0 else 1]
        user["description"] += " " + rng.choice(phrases)

    def summary(self, user):
        t = user["traits"]
        items = [self.terms[a][0 if t[a] > 0 else 1] for a in self.axes if t.get(a)]
        return "Prefers: " + ", ".join(items) + "." if items else ""

    def items_for(self, seed):
        return self.items

    def split_key(self, item):
        return item[2][1]  # roleplay subject, elix concept

    def view(self, rng, cfg):
        return rng.randrange(N_VIEWS) if cfg.views else 0

    def random_style(self, rng):
        return {a: rng.choice(self.values[a]) for a in self.axes}


# ---------------------------------------------------------------- roleplay
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
# Writers: opener formal/casual, confident/hedged adverb, background and example lead-ins,
# joke, bullet (None: numbered list).
RP_WRITERS = (
    ("Certainly.", "Hey!", "Definitely", "Probably", "Background:", "For example,",
     "Ha, {s} forever!", "- "),
    ("Greetings.", "Yo!", "Always", "Maybe", "Context:", "For instance,", "(Pun intended.)", "* "),
    ("Indeed.", "Oh, cool!", "Surely", "Perhaps", "Generally,", "Personally,",
     "Lol, classic {s}.", None),
)
RP_MARKERS = {"formality": ("certainly greetings indeed", "hey yo cool"),
              "confidence": ("definitely always surely", "probably maybe perhaps"),
              "example": ("example instance personally", ""), "humor": ("ha pun lol", ""),
              "order": ("background context generally", "")}
RP_PHRASES = {
    "formality": (("They expect polished, formal replies.", "They write legal letters all day and notice sloppy wording."),
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
RP_JOBS = ("nurse teacher electrician accountant barista farmer librarian pilot chef lawyer student "
           "firefighter pharmacist journalist plumber dentist architect welder").split()
RP_HOBBIES = ("birdwatching", "salsa dancing", "woodworking", "knitting", "trail running", "jigsaw puzzles",
              "volunteering", "vinyl collecting", "karaoke", "sailing", "podcasts", "bowling")


class Roleplay(Domain):
    name, prefix = "roleplay", "rp"
    axes = ("formality", "confidence", "format", "example", "humor", "order", "technical", "length")
    terms = {"formality": ("formal", "casual"), "confidence": ("confident", "hedged"),
             "format": ("lists", "prose"), "example": ("examples", "no examples"),
             "humor": ("humorous", "serious"), "order": ("answer first", "background first"),
             "technical": ("technical", "plain"), "length": ("detailed", "concise")}
    values = {a: (-1, 1) for a in axes}
    phrases = RP_PHRASES
    max_traits = 4
    skew = {"length": 0.6, "example": 0.4}  # P(negative value): mild population-level tastes

    def __init__(self):
        self.topics, self.topic_of, self.register, self.subjects = [], {}, {}, {}
        for t, line in enumerate(RP_TOPICS.splitlines()):
            name, rest = line.split(": ")
            subjects, plain, tech = (part.split() for part in rest.split(" | "))
            self.topics.append((name, subjects, plain, tech))
            for w in subjects + plain + tech:
                self.topic_of[w] = t
            self.register.update({w: -1 for w in plain} | {w: 1 for w in tech})
            self.subjects.update({s: t for s in subjects})
        self.items = [(f"rp{i:04d}", q.format(s=s), (self.subjects[s], s))
                      for i, (s, q) in enumerate((s, q) for s in self.subjects for q in RP_QUESTIONS)]
        self.mark = {w: (a, 1 if k == 0 else -1) for a, pair in RP_MARKERS.items()
                     for k, ws in enumerate(pair) for w in ws.split()}
        text = " ".join(sum(RP_FRAMES, ()) + tuple(p for w in RP_WRITERS for p in w if p))
        self.known = set(words_of(text)) | set(self.topic_of)

    @lru_cache(maxsize=None)
    def plan(self, qid):
        """Per viewpoint: a frame and which five topic words it uses (fixed for the question)."""
        rng = random.Random(f"views/{qid}")
        return [(f, rng.sample(range(8), 5)) for f in rng.sample(range(len(RP_FRAMES)), N_VIEWS)]

    def render(self, meta, qid, st, view, writer):
        topic, s = meta
        frame, idx = self.plan(qid)[view]
        words = self.topics[topic][3 if st["technical"] > 0 else 2]
        W, F = RP_WRITERS[writer], RP_FRAMES[frame]
        fill = dict(C=W[2] if st["confidence"] > 0 else W[3], B=W[4], E=W[5], s=s,
                    **{f"w{i}": words[j] for i, j in enumerate(idx)})
        body = [F[0]] + ([F[2], F[3]] if st["length"] > 0 else [])
        body = [b.format(**fill) for b in (body + [F[1]] if st["order"] > 0 else [F[1]] + body)]
        tail = ([F[4].format(**fill)] if st["example"] > 0 else []) + ([W[6].format(s=s)] if st["humor"] > 0 else [])
        opener = W[0] if st["formality"] > 0 else W[1]
        if st["format"] < 0:
            return " ".join([opener] + body + tail)
        marks = [W[7] or f"{i + 1}. " for i in range(len(body))]
        return "\n".join([opener] + [m + b for m, b in zip(marks, body)] + ([" ".join(tail)] if tail else []))

    @lru_cache(maxsize=1 << 16)
    def parse_prompt(self, prompt):
        q = last_question(prompt)
        return next(((self.subjects[w], w) for w in words_of(q) if w in self.subjects), (None, None))

    def read(self, prompt, text):
        topic, subject = self.parse_prompt(prompt)
        sents, bullets = scan(clean_response(text))
        c = dict.fromkeys(RP_MARKERS, 0)
        first = {}  # position of the first confident/hedged adverb and first background lead-in
        n = known = on = off = tech = plain = content = subj = 0
        for sent in sents:
            aside = False  # opener, example and joke sentences are not content
            for w in sent:
                n += 1
                known += w in self.known
                m = self.mark.get(w)
                if m:
                    c[m[0]] += m[1]
                    aside |= m[0] in ("formality", "example", "humor")
                    if m[0] in ("confidence", "order"):
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
        a, b = first.get("confidence"), first.get("order")
        return {"formality": sign(c["formality"]), "confidence": sign(c["confidence"]),
                "format": 1 if bullets >= 2 else -1, "example": 1 if c["example"] else -1,
                "humor": 1 if c["humor"] else -1, "order": 0 if a is None or b is None else sign(b - a),
                "technical": frac(tech, plain), "length": max(-1, min(1, content - 3)),
                "rel": relevance(on, off, subj), "q": quality(sents, n, known)}

    def new_user(self, rng, uid, split, group, kind):
        user = {"user_id": uid, "domain": self.name, "split": split, "group": group, "traits": {},
                "description": f"{rng.choice(NAMES)} is a {rng.randint(18, 75)}-year-old "
                               f"{rng.choice(RP_JOBS)} who enjoys {rng.choice(RP_HOBBIES)}."}
        for axis in rng.sample(self.axes, rng.choices((1, 2, 3), weights=(35, 40, 25))[0]):
            self.add_trait(user, axis, -1 if rng.random() < self.skew.get(axis, 0.5) else 1, rng)
        return user

    def pair(self, rng, user, item, cfg):
        qid, _, meta = item
        a = self.random_style(rng)
        b = dict(a)
        for axis in rng.sample(self.axes, rng.choice((2, 2, 3, 3, 4))):
            b[axis] = -b[axis]
        return [self.render(meta, qid, st, self.view(rng, cfg), rng.randrange(cfg.writers)) for st in (a, b)], {}

    def roster(self, n, rng):
        test = held_out_blocks(n, 1, 0.1, rng)
        return [(i, "test" if i in test else "train", "persona", None) for i in range(n)]


# ---------------------------------------------------------------- elix
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
EX_TEMPLATES = (  # [level][writer]
    ("Imagine {c} is a giant {k}! It makes {p1} wiggle. Wow!", "{C} is like a magic {k}. It helps {p1} grow. Yay!",
     "Guess what? {C} is a super {k} for {p1}. Whee!"),
    ("{C} is basically how {p1} works, kind of like a {k}.", "Basically, {c} is a {k} for {p1} and {p2}. Pretty neat.",
     "Here's the deal: {c} connects {p1} and {p2}, like your {k}."),
    ("Honestly, {c} is how {p1} shapes {p2}. Think of it as your {k}.",
     "Real talk: {c} links {p1} to {p2}, like a {k}.", "Lowkey, {c} is all about {p1} and {p2}, like a {k}."),
    ("{C} refers to how {p1} affects {j1}. In practice, it works like a {k}.",
     "Essentially, {c} describes {p1} and {j1}, much like a {k}.", "{C} means {p1} drives {j1}; day to day, it resembles a {k}."),
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


class Elix(Domain):
    name, prefix = "elix", "ex"
    axes = ("example", "detail")
    terms = {"example": ("examples", "no examples"), "detail": ("detailed", "brief")}
    values = {"example": (-1, 1), "detail": (-1, 1), "level": tuple(range(5))}
    phrases = EX_PHRASES
    max_traits = 2
    weight_range = (0.5, 0.9)  # below LEVEL_W / 4: the user's own level always outweighs them

    def __init__(self):
        self.fields, self.topic_of, self.concepts = [], {}, {}
        for f, line in enumerate(EX_FIELDS.splitlines()):
            _, rest = line.split(": ")
            concepts, plain, jargon = rest.split(" | ")
            self.fields.append((plain.split(), jargon.split()))
            self.topic_of.update({w: f for w in plain.split() + jargon.split()})
            self.concepts.update({c: f for c in concepts.split(", ")})
        self.items = [(f"ex{i:03d}", f"Explain {c}.", (f, c)) for i, (c, f) in enumerate(self.concepts.items())]
        extras = set(words_of(" ".join(EX_EXAMPLE + EX_DETAIL)))
        level_words = [set(words_of(" ".join(t))) | set(a.split()) for t, a in zip(EX_TEMPLATES, EX_ANALOGY)]
        stop = set("all as day from much real through under via what with".split())
        self.level_of = {w: lv for lv, ws in enumerate(level_words) for w in ws
                         if sum(w in o for o in level_words) == 1 and w not in extras | stop}
        self.mark = {w: "example" for w in ("example", "instance", "picture")} | \
                    {w: "detail" for w in ("also", "plus", "top")}
        concept_words = set(words_of(" ".join(self.concepts)))
        self.known = set().union(*level_words, extras, self.topic_of, concept_words)

    @lru_cache(maxsize=None)
    def plan(self, qid):
        rng = random.Random(f"views/{qid}")
        return [(rng.sample(range(6), 4), rng.sample(range(6), 3), rng.randrange(6)) for _ in range(N_VIEWS)]

    def render(self, meta, qid, st, view, writer):
        field, c = meta
        pi, ji, ai = self.plan(qid)[view]
        (plain, jargon), lv = self.fields[field], st["level"]
        analogies = EX_ANALOGY[lv].split()
        fill = dict(c=c, C=c[0].upper() + c[1:], k=analogies[ai] if analogies else "",
                    **{f"p{i + 1}": plain[j] for i, j in enumerate(pi)}, **{f"j{i + 1}": jargon[j] for i, j in enumerate(ji)})
        text = EX_TEMPLATES[lv][writer].format(**fill)
        if st["example"] > 0:
            text += " " + EX_EXAMPLE[writer].format(x=fill["p3"])
        if st["detail"] > 0:
            text += " " + EX_DETAIL[writer].format(x=fill["p4"])
        return text

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
        total = sum(counts)
        level = sum(i * k for i, k in enumerate(counts)) / total if total else None
        hit = bool(concept) and concept in text.lower()
        return {"level": level, **m, "rel": relevance(on, off, hit), "q": quality(sents, n, known)}

    def random_style(self, rng):
        return dict(super().random_style(rng), level=rng.randrange(5))

    def reward(self, user, f):
        lv = EX_LEVELS.index(user["group"])
        return super().reward(user, f) - LEVEL_W * (4 if f["level"] is None else abs(f["level"] - lv))

    def summary(self, user):
        return f"Level: {user['group']}. {super().summary(user)}".strip()

    def new_user(self, rng, uid, split, group, kind):
        lv = EX_LEVELS.index(group)
        bio = EX_BIO[lv].format(n=rng.choice(NAMES), a=rng.randint(*EX_AGES[lv]))
        user = {"user_id": uid, "domain": self.name, "split": split, "group": group, "traits": {}, "description": bio}
        for axis in rng.sample(self.axes, rng.choices((0, 1, 2), weights=(40, 40, 20))[0]):
            self.add_trait(user, axis, rng.choice((-1, 1)), rng)
        return user

    def pair(self, rng, user, item, cfg):
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
        test = held_out_blocks(n, 5, 0.1, rng)  # whole blocks of five, one user per level
        return [(i, "test" if i // 5 in test else "train", EX_LEVELS[i % 5], None) for i in range(n)]


# ---------------------------------------------------------------- reviews
RV_GENRES = {"horror": "ghosts screams basement curse monster cellar", "comedy": "jokes gags punchlines slapstick banter pranks",
             "western": "cowboys saloon outlaws sheriff horses duels", "romance": "lovers kisses wedding heartbreak courtship candlelight",
             "thriller": "chases suspects conspiracy hostage ransom detectives", "sci-fi": "spaceships aliens robots lasers androids wormholes",
             "musical": "songs dancers choreography choruses ballads stage", "war": "soldiers battles trenches generals bombers medals"}
RV_TITLE = ("Silent Golden Broken Midnight Hidden Crimson Frozen Last Wild Electric Hollow Burning Distant Velvet Iron "
            "Paper Glass Lonely Secret Painted Restless Northern Endless Scarlet".split(),
            "Harbor Garden Kingdom Signal River Empire Station Orchard Mirror Frontier Lantern Circus Voyage Canyon "
            "Letter Island Engine Crown Forest Tower Promise Horizon Carnival Compass".split())
RV_POS = "gripping charming brilliant moving delightful stunning clever heartfelt".split()
RV_NEG = "dull clumsy tedious bland messy forgettable shallow sluggish".split()
RV_ASPECT = ("acting cast performances lead chemistry actors".split(), "plot script ending pacing dialogue premise".split())
RV_VERDICT = ("{T} is a {g} movie with {a} {asp}.", "I found the {asp} in {T}, a {g} film, {a}.", "Verdict on {T}: {a} {g} {asp}.")
RV_DETAIL = ("The {asp} around the {gw} feels {a}.", "Its {gw} scenes have {a} {asp}.", "Those {gw} moments bring {a} {asp}.")
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


class Reviews(Domain):
    name, prefix = "reviews", "rv"
    axes = ("sentiment", "length", "aspect", "rating")
    terms = {"sentiment": ("positive", "negative"), "length": ("verbose", "concise"),
             "aspect": ("acting", "story"), "rating": ("ratings", "no ratings")}
    values = {"sentiment": (-1, 0, 1), "length": (-1, 0, 1), "aspect": (-1, 1), "rating": (-1, 1)}
    group_traits = ("sentiment", "length")  # the scorer type; refinement adds only the others
    phrases = RV_PHRASES
    max_traits = 4
    weight_range = (2.0, 3.0)
    side = (0.5, 0.8)  # secondary tastes that vary users within a type; 2 * 0.5 >= MARGIN decides a pair

    def __init__(self):
        self.topic_of = {w: g for g, ws in RV_GENRES.items() for w in ws.split() + [g]}
        self.tone = {w: 1 for w in RV_POS} | {w: -1 for w in RV_NEG}
        self.aspect = {w: 1 for w in RV_ASPECT[0]} | {w: -1 for w in RV_ASPECT[1]}
        text = " ".join(RV_VERDICT + RV_DETAIL + RV_RATING + tuple(RV_TITLE[0] + RV_TITLE[1]) + ("but",))
        self.known = set(words_of(text)) | set(self.topic_of) | set(self.tone) | set(self.aspect)

    def items_for(self, seed):
        """Procedural movies: a title and a genre each; depends on the seed."""
        rng = random.Random(f"{seed}/reviews/movies")
        titles = rng.sample([f"The {a} {b}" for a in RV_TITLE[0] for b in RV_TITLE[1]], 480)
        return [(f"rv{i:03d}", f"Review {t}, a {g} movie.", (t, g))
                for i, (t, g) in enumerate((t, rng.choice(sorted(RV_GENRES))) for t in titles)]

    def split_key(self, item):
        return item[2][0]  # the movie title

    @lru_cache(maxsize=None)
    def plan(self, qid):
        rng = random.Random(f"views/{qid}")
        return [(rng.sample(range(6), 2), rng.sample(range(6), 3), rng.sample(range(8), 3), rng.sample(range(8), 3))
                for _ in range(N_VIEWS)]

    def render(self, meta, qid, st, view, writer):
        title, genre = meta
        gi, si, pi, ni = self.plan(qid)[view]
        s = st["sentiment"]
        adj = [RV_POS[p] if s > 0 else RV_NEG[q] if s < 0 else f"{RV_POS[p]} but {RV_NEG[q]}" for p, q in zip(pi, ni)]
        asp = [RV_ASPECT[0 if st["aspect"] > 0 else 1][j] for j in si]
        gw = RV_GENRES[genre].split()
        out = [RV_VERDICT[writer].format(T=title, g=genre, a=adj[0], asp=asp[0])]
        out += [RV_DETAIL[writer].format(gw=gw[gi[i]], a=adj[i + 1], asp=asp[i + 1]) for i in range(st["length"] + 1)]
        if st["rating"] > 0:
            out.append(RV_RATING[writer].format(n=3 + s))
        return " ".join(out)

    @lru_cache(maxsize=1 << 16)
    def parse_prompt(self, prompt):
        m = re.match(r"review (.+), an? (\S+) movie", last_question(prompt))
        return (m.group(2), m.group(1)) if m else (None, None)

    def read(self, prompt, text):
        genre, title = self.parse_prompt(prompt)
        text = clean_response(text)
        sents, _ = scan(text)
        n = known = on = off = pos = neg = act = story = rating = content = 0
        for sent in sents:
            rated = False
            for w in sent:
                n += 1
                known += w in self.known
                t = self.tone.get(w, 0)
                pos += t > 0
                neg += t < 0
                a = self.aspect.get(w, 0)
                act += a > 0
                story += a < 0
                rated |= w in ("rating", "stars", "score")
                g = self.topic_of.get(w)
                if g is not None:
                    on += g == genre
                    off += g != genre
            rating |= rated
            content += not rated
        hit = bool(title) and title in text.lower()
        return {"sentiment": frac(pos, neg), "length": max(-1, min(1, content - 2)), "aspect": frac(act, story),
                "rating": 1 if rating else -1, "rel": relevance(on, off, hit), "q": quality(sents, n, known)}

    def new_user(self, rng, uid, split, group, kind):
        user = {"user_id": uid, "domain": self.name, "split": split, "group": group, "type": kind, "traits": {},
                "description": f"{rng.choice(NAMES)} reviews films for {rng.choice(RV_OUTLETS)}."}
        for t in kind.split("+"):
            self.add_trait(user, "sentiment" if t in ("positive", "negative") else "length",
                           1 if t in ("positive", "verbose") else -1, rng)
        if rng.random() < 0.5:
            self.add_trait(user, rng.choice(("aspect", "rating")), rng.choice((-1, 1)), rng, *self.side)
        return user

    def add_trait(self, user, axis, s, rng, lo=None, hi=None):
        if lo is None and axis not in self.group_traits:
            lo, hi = self.side
        super().add_trait(user, axis, s, rng, lo, hi)

    def pair(self, rng, user, item, cfg):
        qid, _, meta = item
        a = self.random_style(rng)
        b = a
        while b == a:
            b = self.random_style(rng)
        return [self.render(meta, qid, st, self.view(rng, cfg), rng.randrange(cfg.writers)) for st in (a, b)], {}

    def roster(self, n, rng):
        n_int = n // 5  # interpolated users are all held out; trained ones in blocks of four, one per type
        test = held_out_blocks(n - n_int, 4, 0.125, rng)
        return [(i, "test" if i // 4 in test else "train", "trained", RV_TYPES[i % 4]) for i in range(n - n_int)] + \
               [(i, "test", "interpolated", RV_INTERPOLATED[i % 4]) for i in range(n - n_int, n)]


DOMAINS = {d.name: d for d in (Roleplay(), Elix(), Reviews())}


# ---------------------------------------------------------------- API used by training and evaluation
def load_users(path):
    """users.jsonl (or its domain folder) -> {user_id: row}."""
    path = os.path.join(path, "users.jsonl") if os.path.isdir(path) else path
    with open(path) as f:
        return {row["user_id"]: row for row in map(json.loads, f)}


def score(user, prompt, response):
    """The user's reward for `response` to `prompt`, read from the text alone. Never raises on strings."""
    dom = DOMAINS[user["domain"]]
    return dom.reward(user, dom.read(str(prompt), response))


def trait_summary(user):
    """Short canonical statement of the user's traits, e.g. 'Prefers: formal, lists, concise.'"""
    return DOMAINS[user["domain"]].summary(user)


def summary_for_response(user, prompt, response):
    """trait_summary of the persona that would prefer `response`: the user's trait axes set to the
    values the judge reads in it (an axis the text leaves undecided keeps the user's value)."""
    dom = DOMAINS[user["domain"]]
    f = dom.read(str(prompt), response)
    traits = {a: abs(w) * (sign(f[a]) or sign(w)) for a, w in user["traits"].items()}
    group = user["group"]
    if dom.name == "elix" and f["level"] is not None:
        group = EX_LEVELS[round(f["level"])]
    return dom.summary(dict(user, traits=traits, group=group))


def trait_recovery(user, text):
    """Fraction of the user's traits (and elix level) that `text` states correctly, without the opposite."""
    dom = DOMAINS[user["domain"]]
    items = {" ".join(s.split()) for s in re.split(r"[,.;:\n]", str(text).lower())}
    checks = [(dom.terms[a][w < 0], dom.terms[a][w > 0]) for a, w in user["traits"].items() if w]
    if dom.name == "elix":
        checks.append((user["group"], *[lv for lv in EX_LEVELS if lv != user["group"]]))
    return sum(want in items and not items & set(others) for want, *others in checks) / max(1, len(checks))


# ---------------------------------------------------------------- labelling
def sigmoid(x):
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))


def entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0


def label(dom, user, cands, cfg, rng):
    """Refine the persona until it decides its pairs (or hits the trait cap), then draw labels.
    cands: [qid, prompt, text_a, text_b, feats_a, feats_b, tags, u1, u2]. Returns kept rows, counters."""
    added = 0
    while True:
        deltas = [dom.reward(user, c[4]) - dom.reward(user, c[5]) for c in cands]
        if not cfg.refine or len(user["traits"]) - len(dom.group_traits) >= dom.max_traits:
            break
        # the first undecided pair that differs on an axis the persona has no opinion about
        new = next((axes for c, d in zip(cands, deltas) if abs(d) < MARGIN
                    for axes in [[a for a in dom.axes if a not in user["traits"] and a not in dom.group_traits
                                  and c[4][a] != c[5][a]]] if axes), None)
        if new is None:
            break
        dom.add_trait(user, rng.choice(new), rng.choice((-1, 1)), rng)
        added += 1
    kept, n = [], {"inconsistent": 0, "undecidable": 0, "traits_added": added}
    for c, d in zip(cands, deltas):
        p = sigmoid(d / cfg.temperature)
        first, second = c[7] < p, c[8] < p  # True: text_a is chosen
        if cfg.refine and abs(d) < MARGIN:
            n["undecidable"] += 1
        elif cfg.consistency and first != second:
            n["inconsistent"] += 1
        else:
            kept.append((c, p if first else 1 - p, first))
    return kept, n


def make_user(job):
    """One user, its persona and labelled rows. Pure function of (seed, domain, index): worker count
    never changes the output."""
    name, i, split, group, kind, target = job
    dom, cfg = DOMAINS[name], _CFG
    rng = random.Random(f"{cfg.seed}/{name}/{i}")
    user = dom.new_user(rng, f"{dom.prefix}{i:05d}", split, group, kind)
    initial = dict(user, traits=dict(user["traits"]))
    pool = cfg.pools[name][split]
    order = rng.sample(pool, len(pool))
    cands, want = [], target + target // 4 + 2
    for _ in range(4):  # refinement drops undecidable pairs: top up until the target is met
        for _ in range(want):
            item = order[len(cands) % len(order)]
            (ta, tb), tags = dom.pair(rng, user, item, cfg)
            cands.append((item[0], item[1], ta, tb, dom.read(item[1], ta), dom.read(item[1], tb), tags,
                          rng.random(), rng.random()))
        kept, n = label(dom, user, cands, cfg, rng)
        if len(kept) >= target:
            break
        want = 2 * (target - len(kept)) + 2
    kept = kept[:target]
    rows, agree, ties = [], 0, 0
    for c, p, first in kept:
        chosen, rejected = (c[2], c[3]) if first else (c[3], c[2])
        d = dom.reward(user, c[4]) - dom.reward(user, c[5])
        ties += abs(d) < MARGIN
        agree += abs(d) >= MARGIN and (d > 0) == first
        rows.append(json.dumps({"user_id": user["user_id"], "prompt": c[1], "chosen": chosen, "rejected": rejected,
                                "split": split, "tags": {"question_id": c[0], "p_chosen": round(p, 3), **c[6]}},
                               sort_keys=True))
    h0 = sum(entropy(sigmoid((dom.reward(initial, c[4]) - dom.reward(initial, c[5])) / cfg.temperature))
             for c in cands)
    n.update(candidates=len(cands), rows=len(rows), agree=agree, ties=ties, h_initial=h0, h_kept=sum(entropy(p) for _, p, _ in kept),
             traits_initial=len(initial["traits"]), traits_final=len(user["traits"]),
             easy=sum(c[6].get("difficulty") == "easy" for c, _, _ in kept))
    sample = [(c[0], t) for c, _, _ in kept[:2] for t in c[2:4]]
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
    dom = DOMAINS[name]
    n_users, n_pairs = cfg.sizes[name]
    items = dom.items_for(cfg.seed)
    rng = random.Random(f"{cfg.seed}/{name}/split")
    # held-out questions are about held-out subjects, concepts or movies: no answer text is shared
    keys = sorted({dom.split_key(it) for it in items})
    test_keys = set(rng.sample(keys, round(TEST_Q_FRAC * len(keys))))
    cfg.pools[name] = {s: [it for it in items if (dom.split_key(it) in test_keys) == (s == "test")]
                       for s in ("train", "test")}
    jobs = [(name, i, split, group, kind, n_pairs) for i, split, group, kind in dom.roster(n_users, rng)]
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    users, totals, by_question = [], {}, {}
    prefs_path = os.path.join(folder, "prefs.jsonl")
    with open(prefs_path + ".tmp", "w") as f:
        if cfg.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(cfg.workers, _init_worker, (cfg,))
            results = pool.imap(make_user, jobs, chunksize=8)
        else:
            _init_worker(cfg)
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
    rows_split = {s: sum(n["rows"] for (_, n), job in zip(users, jobs) if job[2] == s) for s in ("train", "test")}
    per_user = [n["rows"] for _, n in users]
    groups = {}
    for job in jobs:
        key = job[4] or job[3]
        groups.setdefault(key, {"train": 0, "test": 0})[job[2]] += 1
    stats = {
        "domain": name, "seed": cfg.seed,
        "config": {k: getattr(cfg, k) for k in ("scale", "temperature", "views", "writers", "refine", "consistency")}
                  | {"users": n_users, "pairs_per_user": n_pairs},
        "users": {s: sum(j[2] == s for j in jobs) for s in ("train", "test")}, "groups": groups,
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
        "label_agreement": round(totals["agree"] / max(1, sum(per_user) - totals["ties"]), 4),
        "undecided_rows": totals["ties"],
        "diversity": mean_similarity(by_question),
        "diversity_ablation": diversity_ablation(dom, cfg.pools[name]["train"], cfg.seed, cfg.writers),
    }
    if name == "elix":
        stats["difficulty"] = {"easy": totals["easy"], "hard": sum(per_user) - totals["easy"]}
    write_atomic(os.path.join(folder, "stats.json"), [json.dumps(stats, indent=1, sort_keys=True)])
    return stats


def main(argv=None):
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
    cfg = p.parse_args(argv)
    if cfg.users is not None and cfg.users < 20:
        p.error("--users must be at least 20 (each domain needs train and held-out users)")
    if cfg.pairs is not None and not 1 <= cfg.pairs <= 100_000:
        p.error("--pairs must be between 1 and 100000")
    if cfg.users is not None and cfg.users * (cfg.pairs or 1) > 20_000_000:
        p.error("--users x --pairs is over 20M rows per domain")
    if not 1 <= cfg.writers <= len(RP_WRITERS):
        p.error(f"--writers must be between 1 and {len(RP_WRITERS)}")
    if not 0 < cfg.temperature < math.inf:
        p.error("--temperature must be a positive number")
    if cfg.workers < 1:
        p.error("--workers must be at least 1")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        p.error(f"--out {cfg.out} exists and is not a folder")
    names = list(DOMAINS) if cfg.domain == "all" else [cfg.domain]
    cfg.sizes = {d: (cfg.users or SCALES[cfg.scale][d][0], cfg.pairs or SCALES[cfg.scale][d][1]) for d in names}
    cfg.pools = {}
    for name in names:
        t0 = time.time()
        s = generate(name, cfg, cfg.out)
        print(f"{name}: {s['users']['train']}+{s['users']['test']} users, {s['rows']['train']}+{s['rows']['test']} rows "
              f"(train+test) in {time.time() - t0:.1f}s | label entropy {s['label_entropy_initial']} -> "
              f"{s['label_entropy']} nats | agreement {s['label_agreement']} | similarity {s['diversity']}")


if __name__ == "__main__":
    main()
