"""
Speed figures for the README, each a ratio measured side by side in one run on one machine:
a warm-up, then repetitions interleaved between the variants, medians.

    python bench.py                    # CPU: the cpu preset's model (~10 min on 2 idle cores)
    python bench.py --no-compile       # without the torch.compile figures (compiling is slow)
    python bench.py --preset tiny      # smoke run (tests/test_bench.py)
    python bench.py --prefs runs/cpu/data/roleplay/prefs.jsonl   # episodes from real data

peak         the best matmul FLOP/s of this device in float32 and in bf16: the ceiling each
             dtype's utilisation figures below are measured against.
fspo step    one training step (policy forward+backward, reference forward, IPO loss, clip,
             AdamW) on the same episodes: data.pack_batch's layout (causal head, masked
             rejected tail) in float32 and in the dtype model.amp_dtype('auto') picks, and
             compiled, against the previous layout (one full (B, 1, T, T) mask, float32, eager;
             pack_full_mask below). `speedup` is the step as the preset runs it (auto dtype,
             compiled if the preset sets compile: the gpu preset) against that baseline.
fspo memory  the peak memory such a step adds on top of model, reference, optimizer state
             and batch (CPU: resident memory of a fresh process; CUDA: allocated memory).
generate     greedy tokens/s with GPT.generate's KV cache vs re-running the whole prefix, and
             generation under bf16 autocast vs float32 (on CPU the cached keys stay float32:
             model.attend) with how many rows keep the same greedy tokens.
attention    the bf16 step with SDPA run in float32 (model.attend, CPU) against SDPA in bf16.
logps        summed log-probs of one batch under bf16 autocast vs float32, and old vs new layout.
data         the time pack_batch takes to build a batch (mask included) against a step.
group        SFT steps, then FSPO steps, over one pool of 16 batches, as drawn and grouped
             by length (--group): the same episodes, less padding.
batch        fspo steps on one-shot episodes at batch B and 2B: the episodes per second.
jobs         CPU: fspo steps per second of two processes side by side, each on half the
             threads (fspo.py --jobs 2), against one process on all of them; at N shots
             and at 1 (rows as short as the annotated presets' tally episodes).
sdpa, mfu    which SDPA kernel each layout runs; on CUDA the step's share of the GPU's
             bf16 peak from its datasheet, eager and --compile.
Nothing here asserts a speed: the figures are for reading. On a shared machine, check the
load average on the first line before trusting them.
"""
import argparse
import multiprocessing as mp
import os
import random
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn import functional as F

import data
import fspo
import model as M
from model import GPT, GPTConfig

# Per preset, besides its model sizes: repetitions and the generation run (batch 16). The
# uncached baseline re-runs a 200..456 token prefix 256 times, a minute on 2 CPU cores: on
# CPU it runs once. Where bf16 is emulated (cpu_bf16_faster() False) the bf16 figures run on
# fewer tokens (bf16_gen_tokens, and the step on bf16_rows episodes), once. jobs_steps: the
# steps each process of the jobs figure times.
RUNS = {"tiny": dict(reps=2, gen_prompt=48, gen_tokens=32, naive_gen_reps=2, bf16_gen_tokens=16,
                     bf16_rows=2, jobs_steps=3),
        "cpu": dict(reps=3, gen_prompt=200, gen_tokens=256, naive_gen_reps=1, bf16_gen_tokens=16,
                    bf16_rows=1, jobs_steps=20),
        "gpu": dict(reps=10, gen_prompt=400, gen_tokens=256, naive_gen_reps=3, bf16_gen_tokens=256,
                    bf16_rows=32, jobs_steps=20)}
GEN_BATCH = 16
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}  # dense; 1st match

WORDS = ("the a your my it this that with for and but or so then just really always never often "
         "start try keep make take use practice plan learn avoid check find join share enjoy "
         "slow quick simple careful patient steady honest clear short small big good great "
         "people friends beginners time habit skill tools notes goal week day step mistake "
         "because when while after before every each more less most first last next").split()
TOPICS = ("chess baking cycling gardening jazz hiking budgeting painting sailing coding poetry "
          "yoga photography climbing knitting running").split()


def synthetic_rows(n_users, per_user, seed):
    """Rows shaped like generate_synthetic.py's (questions ~9 words, answers ~15-30 words);
    speed depends only on their lengths, so nobody needs to judge them."""
    rng = random.Random(seed)

    def sentence(topic, n, end="."):
        words = rng.choices(WORDS, k=n)
        words.insert(rng.randrange(n), topic)
        return " ".join(words).capitalize() + end

    rows = []
    for u in range(n_users):
        for _ in range(per_user):
            t = rng.choice(TOPICS)
            chosen, rejected = (" ".join(sentence(t, rng.randint(5, 8))
                                         for _ in range(rng.randint(2, 4))) for _ in range(2))
            rows.append(data.Pref(f"u{u:03d}", sentence(t, 8, "?"), chosen, rejected))
    return rows


# ----------------------------------------------------------------------------------------
# the measured work

def pack_full_mask(episodes, pad_id):
    """The baseline: the layout pack_batch had before, one row per episode [ctx[:-1] | ctx[-1],
    chosen | ctx[-1], rejected | pad] under a full (B, 1, T, T) mask, so attention computes
    the whole T x T square. Same segments, positions and targets as data.pack_batch."""
    rows = []
    for e in episodes:
        c = e.ctx
        seg = [0] * (len(c) - 1) + [1] * (len(e.chosen) + 1) + [2] * (len(e.rejected) + 1)
        pos = list(range(len(c) + len(e.chosen))) + list(range(len(c) - 1, len(c) + len(e.rejected)))
        rows.append((c + e.chosen + [c[-1]] + e.rejected, seg, pos))
    B, T = len(rows), max(len(r[0]) for r in rows)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.full((B, T), 3, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, (i, s, p) in enumerate(rows):
        idx[b, :len(i)], seg[b, :len(i)], pos[b, :len(i)] = map(torch.tensor, (i, s, p))
    targets = torch.full((B, T), -1, dtype=torch.long)
    same = (seg[:, 1:] == seg[:, :-1]) & ((seg[:, :-1] == 1) | (seg[:, :-1] == 2))  # (B, T-1)
    targets[:, :-1] = torch.where(same, idx[:, 1:], -1)
    sq, sk = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
    mask = (torch.ones(T, T, dtype=torch.bool).tril() & ((sk == 0) | (sk == sq)))[:, None]
    return dict(idx=idx, targets=targets, pos=pos, mask=mask, seg=seg)  # mask (B, 1, T, T)


def build(cfg, device):
    torch.manual_seed(0)
    model, ref = GPT(cfg).to(device), GPT(cfg).to(device)
    ref.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    return model, ref, opt


def to_device(b, device):
    return {k: v.to(device) for k, v in b.items()}


def pair_logps(scorer, b):
    # summed completion log-probs (B,), (B,) of a packed batch, either layout
    return data.sequence_logps(scorer(b["idx"], b["targets"], b["pos"], b["mask"]), b["seg"])


def fspo_step(scorer, ref_scorer, model, opt, b, ctx):
    # the work of one step of fspo.train for a preference method, nothing else
    with ctx:
        pw, pl = pair_logps(scorer, b)
        with torch.no_grad():
            rw, rl = pair_logps(ref_scorer, b)
        losses, _, _ = fspo.preference_loss(pw, pl, rw, rl, beta=0.1)
    losses.mean().backward()  # outside autocast, as autocast advises
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def generate_naive(model, idx, n):
    """Greedy without a cache: each step runs the whole prefix again (projecting only the
    last position onto the vocabulary, as nanoGPT's sampler does)."""
    for _ in range(n):
        nxt = model.lm_head(model.hidden(idx)[:, -1]).argmax(-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[:, -n:].tolist()


# ----------------------------------------------------------------------------------------
# measuring

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def medians(fns, reps, device):
    """Median seconds per call of each function; repetitions alternate between them, so a
    change in machine load hits every variant alike. Callers warm up first."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(device, dtype, n, seconds=0.5):
    # FLOP/s of the best of the n x n matmuls that fit in `seconds` (at least 2, after a warm-up)
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    best, t_end = float("inf"), time.perf_counter() + seconds
    for i in range(1000):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() > t_end:
            break
    return 2 * n ** 3 / best


def rss_growth_mb(cfg, episodes, pad_id, old):
    """Run in a fresh process: how far one step's peak resident memory rises above the
    resident memory with model, reference, optimizer state and batch already allocated."""
    model, ref, opt = build(cfg, "cpu")
    for p in model.parameters():  # create AdamW's state now, so that it is in the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    b = (pack_full_mask if old else data.pack_batch)(episodes, pad_id)

    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets the peak (VmHWM) to the current resident size
    base = status_kb("VmRSS:")
    fspo_step(fspo.LogProbs(model), fspo.LogProbs(ref), model, opt, b, nullcontext())
    return (status_kb("VmHWM:") - base) / 1024


def cuda_peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def step_flops(model, b):
    """Model flops of one FSPO step on a packed batch: the policy's forward+backward
    (flops_per_token at the padded length, on real tokens, counting the vocabulary
    projection only at labelled positions, the only place it runs) plus the reference's
    forward (a third of that). The same figure for both layouts: it counts the model's
    work, not what a layout wastes."""
    cfg = model.config
    head = 6 * cfg.vocab_size * cfg.n_embd
    real, labelled = (b["seg"] != 3).sum().item(), (b["targets"] != -1).sum().item()
    return 4 / 3 * ((model.flops_per_token(b["idx"].size(1)) - head) * real + head * labelled)


def generate_flops(model, B, P, G):
    # forward flops of a cached greedy run: 2 per weight per token (the vocabulary projection
    # only where a token is sampled), plus 4 * n_layer * n_embd per token per key it attends
    cfg = model.config
    head = cfg.vocab_size * cfg.n_embd
    weights = 2 * (model.num_params() - head) * (P + G) + 2 * head * G
    attn = 4 * cfg.n_layer * cfg.n_embd * sum(range(1, P + G + 1))
    return B * (weights + attn)


def sdpa_ran(scorer, b, ctx):
    """The SDPA kernel(s) a forward of this batch dispatches to, read off the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            torch.no_grad(), ctx:
        scorer(b["idx"], b["targets"], b["pos"], b["mask"])
    pre = "aten::_scaled_dot_product_"
    return "+".join(sorted({e.key[len(pre):] for e in prof.key_averages()
                            if e.key.startswith(pre)}))


# ----------------------------------------------------------------------------------------
# the report, one section per figure

def bench_peak(m):
    n = 8192 if m.dev == "cuda" else 1024
    m.peak = {dt: matmul_peak(m.dev, getattr(torch, dt), n) for dt in ("float32", "bfloat16")}
    f32, bf16 = m.peak["float32"], m.peak["bfloat16"]
    print(f"peak matmul {n}x{n} {m.dev}: fp32 {f32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.2f} "
          f"GFLOP/s -> bf16 {bf16 / f32:.2f}x fp32; amp_dtype auto = "
          f"{str(M.amp_dtype(m.dev)).removeprefix('torch.')}", flush=True)


def share(m, flops, s, dtype):
    return (f"{flops / s / 1e9:.2f} GFLOP/s = {100 * flops / s / m.peak[str(dtype)[6:]]:.1f}% "
            f"of the {'fp32' if dtype == torch.float32 else 'bf16'} peak")


def bench_fspo(m, eps, n, args, run):
    """The step in each layout and variant; returns the new layout's batch."""
    B = len(eps)
    old, new = (to_device(f(eps, m.pad), m.dev) for f in (pack_full_mask, data.pack_batch))
    auto = M.amp_dtype(m.dev)
    fns = {"old fp32": lambda: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, old, nullcontext()),
           "new fp32": lambda: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, new, nullcontext())}
    if auto != torch.float32:
        fns["new auto"] = lambda: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, new,
                                            M.autocast(m.dev))
    if args.compile:  # as fspo.py --compile: the policy's scorer only
        compiled = torch.compile(fspo.LogProbs(m.model))
        fns["new auto compiled"] = lambda: fspo_step(compiled, m.ref_scorer, m.model, m.opt, new,
                                                     M.autocast(m.dev))
    for fn in fns.values():  # warm-up; compiles
        fn()
    t = medians(fns, m.reps, m.dev)
    flops = step_flops(m.model, new)
    (_, To), (_, Tn) = old["idx"].shape, new["idx"].shape
    TR = new["mask"].size(2)
    for k, s in t.items():
        dt = torch.float32 if k.endswith("fp32") else auto
        print(f"fspo step N={n} B={B} {m.where}, {k}: {s * 1e3:.0f} ms, {share(m, flops, s, dt)} "
              f"(rows x len: old {B}x{To}, mask {B}x{To}x{To}; new {B}x{Tn}, tail mask "
              f"{B}x{TR}x{Tn})", flush=True)
    if args.compile:
        c, e = t["new auto compiled"], t["new auto" if "new auto" in t else "new fp32"]
        print(f"compile fspo step N={n} B={B} {m.where}: eager {e * 1e3:.0f} ms, compiled "
              f"{c * 1e3:.0f} ms -> {e / c:.2f}x; this preset "
              f"{'compiles (--compile)' if m.compiles else 'runs eager'}", flush=True)
    else:
        print(f"compile fspo step N={n} B={B} {m.where}: skipped (pass --compile)")
    # the step as this preset runs it: auto dtype, compiled only if the preset sets compile
    way = "new auto compiled" if m.compiles and "new auto compiled" in t else \
        "new auto" if "new auto" in t else "new fp32"
    print(f"speedup N={n} B={B} {m.where}: the step as the preset runs it ({way}) vs the "
          f"previous layout's fp32 eager step: {t['old fp32'] * 1e3:.0f} ms -> "
          f"{t[way] * 1e3:.0f} ms -> {t['old fp32'] / t[way]:.2f}x", flush=True)
    bench_bf16_step(m, eps[:run["bf16_rows"]] if auto == torch.float32 else eps, n)
    bench_memory(m, eps, n)
    return new


def bench_attention(m, b, n):
    """The bf16 step with model.attend's float32 SDPA (CPU) against SDPA in bf16."""
    if m.dev != "cpu" or M.amp_dtype(m.dev) != torch.bfloat16:
        print(f"attention {m.where}: skipped (attend() casts only on a CPU that trains in bf16)")
        return
    attend = M.attend

    def step(fn):
        M.attend = fn
        try:
            fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, b, M.autocast(m.dev))
        finally:
            M.attend = attend
    # plain SDPA under autocast runs in bf16 (autocast casts q, k and v to it)
    fns = {"fp32": lambda: step(attend), "bf16": lambda: step(F.scaled_dot_product_attention)}
    for fn in fns.values():
        fn()
    t = medians(fns, m.reps, m.dev)
    print(f"attention N={n} B={b['idx'].size(0)} {m.where}: bf16 step with SDPA in bf16 "
          f"{t['bf16'] * 1e3:.0f} ms, in float32 (model.attend) {t['fp32'] * 1e3:.0f} ms -> "
          f"{t['bf16'] / t['fp32']:.2f}x", flush=True)


def bench_bf16_step(m, eps, n):
    # where bf16 is emulated a step takes minutes: timed once, on fewer episodes
    b = to_device(data.pack_batch(eps, m.pad), m.dev)
    fns = {dt: (lambda dt=dt: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, b,
                                        M.autocast(m.dev, dt))) for dt in ("fp32", "bf16")}
    fast = M.amp_dtype(m.dev) == torch.bfloat16
    for fn in fns.values():
        fn()
    t = medians(fns, m.reps if fast else 1, m.dev)
    print(f"bf16 fspo step N={n} B={len(eps)} {m.where}: fp32 {t['fp32'] * 1e3:.0f} ms, bf16 "
          f"{t['bf16'] * 1e3:.0f} ms -> bf16/fp32 step time {t['bf16'] / t['fp32']:.2f}x "
          f"({'bf16 faster' if t['bf16'] < t['fp32'] else 'bf16 slower'} here)", flush=True)


def bench_memory(m, eps, n):
    B, cuda = len(eps), m.dev == "cuda"
    if cuda:
        old, new = (to_device(f(eps, m.pad), m.dev) for f in (pack_full_mask, data.pack_batch))
        ms, mo = (cuda_peak_mb(lambda b=b: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, b,
                                                     M.autocast(m.dev))) for b in (new, old))
    else:  # each in its own fresh process
        with mp.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:
            ms, mo = pool.starmap(rss_growth_mb, [(m.cfg, eps, m.pad, o) for o in (False, True)])
    what = ("peak allocated above the allocation before the step" if cuda else
            "peak RSS rise of a fresh process over model+ref+AdamW state+batch, fp32")
    print(f"fspo memory N={n} B={B} {m.where}: new layout {ms:.0f} MB vs old {mo:.0f} MB -> "
          f"{ms / mo:.2f}x ({what})", flush=True)


def bench_generate(m, eps, run):
    # prompts: the first P tokens of real few-shot prompts, all the same length (no padding)
    P = min(run["gen_prompt"], *(len(e.ctx) for e in eps[:GEN_BATCH]))
    G = run["gen_tokens"]
    prompts = torch.tensor([e.ctx[:P] for e in eps[:GEN_BATCH]], device=m.dev)  # (16, P)
    model, out = m.ref, {}

    def cached():
        out["cached"] = model.generate(prompts, G, temperature=0)

    def naive():
        out["naive"] = generate_naive(model, prompts, G)

    model.generate(prompts, 2, temperature=0)
    generate_naive(model, prompts, 2)
    t = medians({"cached": cached}, m.reps, m.dev)
    t.update(medians({"naive": naive}, run["naive_gen_reps"], m.dev))
    same = sum(a == b for a, b in zip(out["cached"], out["naive"]))
    n_tok = GEN_BATCH * G
    print(f"generate B={GEN_BATCH} prompt {P} + {G} new tok, greedy, {m.where} fp32: KV cache "
          f"{n_tok / t['cached']:.0f} tok/s ({share(m, generate_flops(model, GEN_BATCH, P, G), t['cached'], torch.float32)}), "
          f"recompute prefix {n_tok / t['naive']:.0f} tok/s -> {t['naive'] / t['cached']:.1f}x "
          f"faster (recompute timed {run['naive_gen_reps']}x); same {G} greedy tokens in "
          f"{same}/{GEN_BATCH} rows", flush=True)
    # bf16 vs fp32, both cached; where bf16 is emulated, on fewer tokens, once
    fast = M.amp_dtype(m.dev) == torch.bfloat16
    G = run["gen_tokens"] if fast else run["bf16_gen_tokens"]

    def gen(dt):
        with M.autocast(m.dev, dt):
            out[dt] = model.generate(prompts, G, temperature=0)

    fns = {dt: (lambda dt=dt: gen(dt)) for dt in ("fp32", "bf16")}
    for fn in fns.values():
        fn()
    t = medians(fns, m.reps if fast else 1, m.dev)
    same = sum(a == b for a, b in zip(out["fp32"], out["bf16"]))
    flops = generate_flops(model, GEN_BATCH, P, G)
    print(f"generate bf16 B={GEN_BATCH} prompt {P} + {G} new tok, KV cache, {m.where}: fp32 "
          f"{GEN_BATCH * G / t['fp32']:.0f} tok/s, bf16 {GEN_BATCH * G / t['bf16']:.1f} tok/s "
          f"({share(m, flops, t['bf16'], torch.bfloat16)}) -> bf16 {t['fp32'] / t['bf16']:.2f}x "
          f"fp32; same {G} greedy tokens in {same}/{GEN_BATCH} rows", flush=True)


def bench_logps(m, eps):
    # one batch scored four ways: the layouts must agree to float32 rounding, bf16 to its own
    old, new = (to_device(f(eps, m.pad), m.dev) for f in (pack_full_mask, data.pack_batch))
    with torch.no_grad():
        lo, ln = (torch.cat(pair_logps(m.ref_scorer, b)) for b in (old, new))
        with M.autocast(m.dev, "bf16"):
            lb = torch.cat(pair_logps(m.ref_scorer, new))
    print(f"logps B={len(eps)} {m.where}: old vs new layout max |diff| "
          f"{(lo - ln).abs().max().item():.2e} nats; bf16 autocast vs fp32 max |diff| "
          f"{(lb - ln).abs().max().item():.3f} nats (mean |sum| {ln.abs().mean().item():.1f}, "
          f"{len(ln)} sums)", flush=True)


def bench_data(m, eps, n, step_s):
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        to_device(data.pack_batch(eps, m.pad), m.dev)
        sync(m.dev)
        t.append(time.perf_counter() - t0)
    s = statistics.median(t)
    print(f"data N={n} B={len(eps)} {m.where}: pack_batch + to {m.dev} {s * 1e3:.1f} ms per batch "
          f"(mask included, median of 5) = {100 * s / step_s:.1f}% of a step", flush=True)


def bench_group(m, rows, n, B, method, K=16):
    """K steps over one pool of K batches, as the sampler draws them and grouped by length
    (fspo.py --group K): the same episodes. sft: 0..n shots each as SFT draws them; fspo: n
    plain shots each, the preference step (fspo_step). Episodes of one length pad little: the
    annotated preset's tallies of 1..n shots vary more (README, "Performance")."""
    by = data.by_user(rows)
    pools = {g: [data.EpisodeStream(m.tok, by, None, method, n, B, m.cfg.block_size, 0,
                                    context=method == "sft", group=g).batch(i) for i in range(K)]
             for g in (1, K)}
    pools = {g: [to_device(b, m.dev) for b in bs] for g, bs in pools.items()}
    args = argparse.Namespace(method="sft", describe=0.0)

    def steps(bs):
        for b in bs:
            if method == "sft":
                with M.autocast(m.dev):
                    loss, _ = fspo.score_batch(m.scorer, None, b, args)
                loss.backward()
                m.opt.step()
                m.opt.zero_grad(set_to_none=True)
            else:
                fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, b, M.autocast(m.dev))

    fns = {g: (lambda bs=bs: steps(bs)) for g, bs in pools.items()}
    for fn in fns.values():
        fn()
    t = medians(fns, m.reps, m.dev)
    tokens = {g: sum(b["idx"].numel() for b in bs) for g, bs in pools.items()}
    real = sum(int((b["seg"] != data.PAD).sum()) for b in pools[1])
    print(f"group {method} N={n} B={B} K={K} {m.where}: {K} steps as drawn {t[1]:.2f} s ({tokens[1]} "
          f"tokens, {100 * (1 - real / tokens[1]):.0f}% padding), grouped by length {t[K]:.2f} s "
          f"({tokens[K]} tokens, {100 * (1 - real / tokens[K]):.0f}% padding) -> {t[1] / t[K]:.2f}x",
          flush=True)


def bench_batch(m, short, B):
    """The same 2B one-shot episodes (short: as short as the annotated presets' tally episodes)
    as two fspo steps of B and as one of 2B: what the bare step costs per episode at either batch
    (the annotated preset trains at batch 16; the work fspo.train does around each step, drawing
    the batch and logging, is not timed here and halves with the steps)."""
    halves = [to_device(data.pack_batch(short[i:i + B], m.pad), m.dev) for i in (0, B)]
    whole = to_device(data.pack_batch(short, m.pad), m.dev)
    step = lambda b: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, b, M.autocast(m.dev))
    fns = {"halves": lambda: [step(b) for b in halves], "whole": lambda: step(whole)}
    for fn in fns.values():
        fn()
    t = medians(fns, 5 * m.reps, m.dev)
    print(f"batch fspo step N=1 {m.where}: {2 * B} episodes as 2 steps of {B} {t['halves'] * 1e3:.0f} ms, "
          f"as 1 step of {2 * B} {t['whole'] * 1e3:.0f} ms -> {t['halves'] / t['whole']:.2f}x the "
          f"episodes per second", flush=True)


def jobs_worker(cfg, b, threads, steps, barrier, out):
    """In a fresh process: `steps` fspo steps on `threads` threads after one warm-up, started
    together with the other workers; puts the seconds they took."""
    torch.set_num_threads(threads)
    model, ref, opt = build(cfg, "cpu")
    scorer, ref_scorer = fspo.LogProbs(model), fspo.LogProbs(ref)
    step = lambda: fspo_step(scorer, ref_scorer, model, opt, b, M.autocast("cpu"))
    step()
    barrier.wait(timeout=600)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    out.put(time.perf_counter() - t0)


def bench_jobs(m, b, n, steps):
    """fspo.py --jobs 2 on CPU: two processes, each on half the threads, stepping side by side,
    against one process on all the threads; the same batch and step count per process."""
    threads = torch.get_num_threads()
    if m.dev != "cpu" or threads < 2:
        print(f"jobs: skipped ({'CPU only' if m.dev != 'cpu' else 'one thread'})")
        return
    ctx = mp.get_context("spawn")

    def run(k):  # seconds until the last of k workers is done
        barrier, out = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=jobs_worker, args=(m.cfg, b, threads // k, steps, barrier, out))
                 for _ in range(k)]
        for p in procs:
            p.start()
        try:  # a worker that died (out of memory, say) must not hang the bench
            took = max(out.get(timeout=900) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=5)
                p.kill()
        return took

    one, two = run(1), run(2)
    print(f"jobs fspo step N={n} ({steps} steps a process): 1 process x {threads} threads "
          f"{steps / one:.2f} steps/s, 2 processes x {threads // 2} {2 * steps / two:.2f} steps/s "
          f"-> {2 * one / two:.2f}x the steps per second")


def bench_cuda(m, new, old, n, args):
    ran = {k: sdpa_ran(m.scorer, b, M.autocast(m.dev)) for k, b in (("old", old), ("new", new))}
    print(f"sdpa kernel N={n} {m.where}: old layout (full mask) runs {ran['old']}; new layout "
          f"(causal head + masked tail) runs {ran['new']}", flush=True)
    if m.dev != "cuda":
        print("mfu: skipped (no CUDA; on CPU the step's share of the measured peak is above)")
        return
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"mfu: skipped (no bf16 peak known for {name}; pass --peak-tflops)")
        return
    flops = step_flops(m.model, new)
    s = {"eager": lambda: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, new, M.autocast("cuda"))}
    if args.compile:
        compiled = torch.compile(fspo.LogProbs(m.model))
        s["compiled"] = lambda: fspo_step(compiled, m.ref_scorer, m.model, m.opt, new,
                                          M.autocast("cuda"))
    for fn in s.values():
        fn()
    t = medians(s, m.reps, m.dev)
    figs = [f"{k} {100 * flops / v / (peak * 1e12):.1f}% ({flops / v / 1e12:.0f} TFLOP/s)"
            for k, v in t.items()]
    if not args.compile:
        figs.append("compiled: skipped (pass --compile)")
    print(f"mfu fspo step N={n} {m.where} on {name} (bf16 peak {peak:.0f} TFLOP/s): "
          f"{', '.join(figs)}; target 35%")


def main(argv=None):
    ap = argparse.ArgumentParser(description="speed figures: packed layout, bf16, compile, "
                                             "KV cache, MFU")
    ap.add_argument("--preset", choices=fspo.PRESETS, default=None,
                    help="model sizes (default: gpu on CUDA, else cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefs", default=None, help="prefs.jsonl to build episodes from (default: "
                    "runs/<preset>/data/roleplay/prefs.jsonl if present, else made-up rows)")
    ap.add_argument("--shots", type=int, default=8, help="N, shots per episode")
    ap.add_argument("--batch-size", type=int, default=None, help="episodes per step (preset's)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (per preset)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile figures")
    ap.add_argument("--only", choices=["batch"], default=None,
                    help="run one figure alone (after the config line)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak, when it is not in the table")
    args = ap.parse_args(argv)
    m = argparse.Namespace(dev=args.device)  # what every section uses
    cuda = m.dev == "cuda"
    preset = args.preset or ("gpu" if cuda else "cpu")
    p, run = fspo.PRESETS[preset], RUNS[preset]
    m.reps, B = args.reps or run["reps"], args.batch_size or p["batch_size"]
    m.where = f"{preset} preset, {m.dev}"
    m.compiles = bool(fspo.PRESETS[preset].get("compile"))
    n = args.shots

    prefs = args.prefs or f"runs/{preset}/data/roleplay/prefs.jsonl"
    if os.path.exists(prefs):
        rows, source = [r for r in data.load_prefs(prefs) if r.split == "train"], prefs
    else:
        rows, source = synthetic_rows(64, 18, seed=0), "made-up rows (64 users x 18)"
    m.tok = data.Tokenizer(data.train_bpe(data.corpus_texts(rows[:2000]), p["vocab_size"]))
    m.pad = m.tok.eot_id
    # the preset's model exactly, even where the tokenizer stopped short of its vocab_size
    m.cfg = GPTConfig(block_size=p["block_size"], vocab_size=max(m.tok.n_vocab, p["vocab_size"]),
                      n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"])
    eps = [data.encode_episode(m.tok, s, q, m.cfg.block_size) for s, q in
           data.make_episodes(data.by_user(rows), n, random.Random(0))[:max(B, GEN_BATCH)]]
    m.model, m.ref, m.opt = build(m.cfg, m.dev)
    m.scorer, m.ref_scorer = fspo.LogProbs(m.model), fspo.LogProbs(m.ref)
    machine = (torch.cuda.get_device_name() if cuda else
               f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f} "
               f"on {os.cpu_count()} cores")
    print(f"config: {preset} preset model {m.cfg.n_layer}x{m.cfg.n_embd} ({m.cfg.n_head} heads, "
          f"vocab {m.cfg.vocab_size}, {m.model.num_params() / 1e6:.2f}M params); {m.dev} "
          f"{machine}; episodes from {source}; medians of {m.reps} reps after 1 warm-up",
          flush=True)

    # one-shot episodes, as short as the tally episodes the annotated presets train on
    short = [data.encode_episode(m.tok, s, q, m.cfg.block_size) for s, q in
             data.make_episodes(data.by_user(rows), 1, random.Random(0))[:2 * B]]
    if args.only == "batch":
        return bench_batch(m, short, B)
    bench_peak(m)
    new = bench_fspo(m, eps[:B], n, args, run)
    bench_attention(m, new, n)
    bench_logps(m, eps[:B])
    bench_generate(m, eps, run)
    t = medians({"s": lambda: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, new,
                                        M.autocast(m.dev))}, 1, m.dev)["s"]
    bench_data(m, eps[:B], n, t)
    bench_group(m, rows, n, B, "sft")
    bench_group(m, rows, n, B, "fspo")
    bench_batch(m, short, B)
    bench_jobs(m, new, n, run["jobs_steps"])
    bench_jobs(m, to_device(data.pack_batch(short[:B], m.pad), m.dev), 1, run["jobs_steps"])  # and at N=1
    bench_cuda(m, new, to_device(pack_full_mask(eps[:B], m.pad), m.dev), n, args)


if __name__ == "__main__":
    main()
