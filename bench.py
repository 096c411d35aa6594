"""
Speed figures for the README, each a ratio measured side by side in one run on one machine:
a warm-up, then repetitions interleaved between the variants, medians.

    python bench.py                    # CPU: the cpu preset's model, fp32 (~3 min on 2 cores)
    python bench.py --compile          # GPU: the gpu preset's model in bf16, MFU also compiled
    python bench.py --preset tiny      # smoke run in seconds (tests/test_bench.py)
    python bench.py --prefs runs/cpu/data/roleplay/prefs.jsonl   # episodes from real data

fspo step    one training step (policy forward+backward, reference forward, IPO loss, clip,
             AdamW) with shared-context scoring (data.pack_batch: one row per episode, the
             context run once) vs naive (data.pack_naive: 2B causal rows, the context run
             twice); same model, same episodes. tok/s counts each episode's tokens once
             (context + both completions) for both, so the ratio of tok/s is the speedup.
fspo memory  the peak memory such a step adds on top of model, reference, optimizer state
             and batch (CPU: resident memory of a fresh process; CUDA: allocated memory).
generate     greedy tokens/s with GPT.generate's KV cache vs re-running the whole prefix.
data         episodes/s that data.EpisodeStream builds (encode + pack; the training loop
             builds them inline) vs episodes/s that the shared training step consumes.
sdpa, mfu    CUDA only: which SDPA kernel each layout runs, and model flops utilisation
             against the GPU's bf16 peak. On CPU these lines say skipped.
Nothing here asserts a speed: the figures are for reading. On a shared machine, check the
load average on the first line before trusting them.
"""
import argparse
import multiprocessing as mp
import os
import random
import statistics
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
import fspo
from model import GPT, GPTConfig

# Per preset, besides its model sizes: repetitions and the generation run (batch 16). The
# uncached baseline re-runs a 200..456 token prefix 256 times, a minute on 2 CPU cores: on
# CPU it runs once.
RUNS = {"tiny": dict(reps=2, gen_prompt=48, gen_tokens=32, naive_gen_reps=2),
        "cpu": dict(reps=3, gen_prompt=200, gen_tokens=256, naive_gen_reps=1),
        "gpu": dict(reps=10, gen_prompt=400, gen_tokens=256, naive_gen_reps=3)}
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

def build(cfg, device):
    torch.manual_seed(0)
    model, ref = GPT(cfg).to(device), GPT(cfg).to(device)
    ref.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    return model, ref, opt


def seq_logps(scorer, b):
    """Summed completion log-probs, chosen (B,) and rejected (B,), for either layout."""
    if b["mask"] is not None:
        return data.pair_logps(scorer, b)
    lp = scorer(b["idx"], b["targets"], None, None).sum(-1)  # (2B,) chosen rows, then rejected
    return lp.chunk(2)


def fspo_step(scorer, ref_scorer, model, opt, b, ctx):
    # the work of one step of fspo.train for a preference method, nothing else
    with ctx:
        pw, pl = seq_logps(scorer, b)
        with torch.no_grad():
            rw, rl = seq_logps(ref_scorer, b)
        losses, _, _ = fspo.preference_loss(pw, pl, rw, rl, beta=0.1)
        losses.mean().backward()
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


def rss_growth_mb(cfg, episodes, pad_id, naive):
    """Run in a fresh process: how far one step's peak resident memory rises above the
    resident memory with model, reference, optimizer state and batch already allocated."""
    model, ref, opt = build(cfg, "cpu")
    for p in model.parameters():  # create AdamW's state now, so that it is in the baseline
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    b = (data.pack_naive if naive else data.pack_batch)(episodes, pad_id)

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
    forward (a third of that)."""
    cfg = model.config
    head = 6 * cfg.vocab_size * cfg.n_embd
    real, labelled = (b["seg"] != 3).sum().item(), (b["targets"] != -1).sum().item()
    return 4 / 3 * ((model.flops_per_token(b["idx"].size(1)) - head) * real + head * labelled)


def sdpa_ran(scorer, b, ctx):
    """The SDPA kernel(s) a forward of this batch dispatches to, read off the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            torch.no_grad(), ctx:
        scorer(b["idx"], b["targets"], b["pos"], b["mask"])
    pre = "aten::_scaled_dot_product_"
    return "+".join(sorted({e.key[len(pre):] for e in prof.key_averages()
                            if e.key.startswith(pre)}))


def sdpa_usable(cfg, b):
    """The CUDA backends that, each allowed alone, accept this layout's call in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, T = b["idx"].shape
    q = torch.randn(B, cfg.n_head, T, cfg.n_embd // cfg.n_head, device="cuda",
                    dtype=torch.bfloat16)
    ok = []
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.CUDNN_ATTENTION):
        try:
            with warnings.catch_warnings(), sdpa_kernel([be]):
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, q, q, attn_mask=b["mask"],
                                               is_causal=b["mask"] is None)
            ok.append(be.name.lower())
        except RuntimeError:
            pass
    return ",".join(ok) or "none"


# ----------------------------------------------------------------------------------------
# the report, one section per figure

def bench_fspo(m, eps, shots):
    """Shared vs naive step time and peak memory at each N; returns the shared step's
    seconds and the batches, for the data and MFU lines."""
    mem, cuda = {}, m.dev == "cuda"
    variants = [(n, naive) for n in shots for naive in (False, True)]
    if not cuda:  # every variant in its own fresh process, all before any timing
        jobs = [(m.cfg, eps[n], m.pad, naive) for n, naive in variants]
        with mp.get_context("spawn").Pool(len(jobs), maxtasksperchild=1) as pool:
            mem = dict(zip(variants, pool.starmap(rss_growth_mb, jobs)))
    step_s, batches = {}, {}
    for n in shots:
        naive = data.pack_naive(eps[n], m.pad)
        b = {"shared": data.to_device(data.pack_batch(eps[n], m.pad), m.dev),
             "naive": {k: None if v is None else v.to(m.dev) for k, v in naive.items()}}
        fns = {k: (lambda bk=bk: fspo_step(m.scorer, m.ref_scorer, m.model, m.opt, bk, m.ctx))
               for k, bk in b.items()}
        for fn in fns.values():
            fn()
        t = medians(fns, m.reps, m.dev)
        if cuda:
            mem.update({(n, k == "naive"): cuda_peak_mb(fn) for k, fn in fns.items()})
        step_s[n], batches[n] = t["shared"], b
        ctx_tok = sum(len(e.ctx) for e in eps[n])
        comp_tok = sum(len(e.chosen) + len(e.rejected) for e in eps[n])
        B = len(eps[n])
        (Bs, Ts), (Bn, Tn) = b["shared"]["idx"].shape, b["naive"]["idx"].shape
        print(f"fspo step N={n} B={B} {m.where}: shared {(ctx_tok + comp_tok) / t['shared']:.0f} "
              f"tok/s (completion {comp_tok / t['shared']:.0f} tok/s), naive "
              f"{(ctx_tok + comp_tok) / t['naive']:.0f} tok/s -> {t['naive'] / t['shared']:.2f}x "
              f"faster (rows x len: shared {Bs}x{Ts}, naive {Bn}x{Tn}; mean context "
              f"{ctx_tok / B:.0f} tok, completions {comp_tok / B:.0f} tok)", flush=True)
        what = ("peak allocated above the allocation before the step" if cuda else
                "peak RSS rise of a fresh process over model+ref+AdamW state+batch")
        ms, mn = mem[(n, False)], mem[(n, True)]
        print(f"fspo memory N={n} B={B} {m.where}: shared {ms:.0f} MB vs naive {mn:.0f} MB -> "
              f"{ms / mn:.2f}x ({what})", flush=True)
    return step_s, batches


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

    with m.ctx:
        model.generate(prompts, 2, temperature=0)
        generate_naive(model, prompts, 2)
        t = medians({"cached": cached}, m.reps, m.dev)
        t.update(medians({"naive": naive}, run["naive_gen_reps"], m.dev))
    if m.dev == "cuda":  # bf16 rounds differently in the two orders of computation
        K = 32
        same = sum(a == b for a, b in zip(model.generate(prompts, K, temperature=0),
                                          generate_naive(model, prompts, K)))
    else:
        K, same = G, sum(a == b for a, b in zip(out["cached"], out["naive"]))
    n_tok = GEN_BATCH * G
    print(f"generate B={GEN_BATCH} prompt {P} + {G} new tok, greedy, {m.where}: KV cache "
          f"{n_tok / t['cached']:.0f} tok/s, recompute prefix {n_tok / t['naive']:.0f} tok/s -> "
          f"{t['naive'] / t['cached']:.1f}x faster (recompute timed {run['naive_gen_reps']}x); "
          f"same {K} greedy tokens (fp32) in {same}/{GEN_BATCH} rows", flush=True)


def bench_data(m, users, shots, B, step_s):
    for n in shots:
        stream = data.EpisodeStream(m.tok, users, None, "fspo", n, B, m.cfg.block_size, seed=0)
        stream.batch(0)  # builds the epoch's episode list, once per epoch
        k = min(stream.per_epoch - 1, 5)
        t = []
        for i in range(1, k + 1):
            t0 = time.perf_counter()
            data.to_device(stream.batch(i), m.dev)
            sync(m.dev)
            t.append(time.perf_counter() - t0)
        s = statistics.median(t)
        print(f"data N={n} B={B} {m.where}: EpisodeStream.batch builds {B / s:.0f} episodes/s "
              f"(encode + pack + to {m.dev}, median of {k}), the shared step consumes "
              f"{B / step_s[n]:.1f} episodes/s -> loader {step_s[n] / s:.0f}x faster; built "
              f"inline in the training loop, it adds {100 * s / step_s[n]:.1f}% to a step",
              flush=True)


def bench_cuda(m, b, n, step_s, args):
    B = b["shared"]["idx"].size(0)
    if m.dev != "cuda":
        print(f"sdpa kernel: skipped (no CUDA); on {m.dev} the naive layout runs "
              f"{sdpa_ran(m.scorer, b['naive'], m.ctx)}, the shared layout "
              f"{sdpa_ran(m.scorer, b['shared'], m.ctx)}")
        print("mfu: skipped (no CUDA; MFU is measured against a GPU's bf16 peak)")
        return
    ran = {k: sdpa_ran(m.scorer, bk, m.ctx) for k, bk in b.items()}
    usable = {k: sdpa_usable(m.cfg, bk) for k, bk in b.items()}
    print(f"sdpa kernel N={n} B={B} {m.where}: naive (causal, no mask) runs {ran['naive']} "
          f"[usable alone: {usable['naive']}]; shared (bool mask) runs {ran['shared']} "
          f"[usable alone: {usable['shared']}]", flush=True)
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"mfu: skipped (no bf16 peak known for {name}; pass --peak-tflops)")
        return
    flops = step_flops(m.model, b["shared"])
    s = {"eager": step_s}
    if args.compile:
        compiled = torch.compile(fspo.LogProbs(m.model))  # as fspo.py --compile: the policy only

        def fn():
            fspo_step(compiled, m.ref_scorer, m.model, m.opt, b["shared"], m.ctx)
        for _ in range(2):  # compiles, then settles
            fn()
        s["compiled"] = medians({"c": fn}, m.reps, m.dev)["c"]
    figs = [f"{k} {100 * flops / v / (peak * 1e12):.1f}% ({flops / v / 1e12:.0f} TFLOP/s)"
            for k, v in s.items()]
    if not args.compile:
        figs.append("compiled: skipped (pass --compile)")
    print(f"mfu fspo step N={n} B={B} {m.where} on {name} (bf16 peak {peak:.0f} TFLOP/s): "
          f"{', '.join(figs)}; target 35%")


def main(argv=None):
    ap = argparse.ArgumentParser(description="speed figures: shared-context scoring, KV cache, "
                                             "data loading, MFU")
    ap.add_argument("--preset", choices=fspo.PRESETS, default=None,
                    help="model sizes (default: gpu on CUDA, else cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefs", default=None, help="prefs.jsonl to build episodes from (default: "
                    "runs/<preset>/data/roleplay/prefs.jsonl if present, else made-up rows)")
    ap.add_argument("--shots", default="4,8", help="comma list of N")
    ap.add_argument("--batch-size", type=int, default=None, help="episodes per step (preset's)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (per preset)")
    ap.add_argument("--compile", action="store_true", help="CUDA: MFU of the compiled step too")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak, when it is not in the table")
    args = ap.parse_args(argv)
    m = argparse.Namespace(dev=args.device)  # what every section uses
    cuda = m.dev == "cuda"
    preset = args.preset or ("gpu" if cuda else "cpu")
    p, run = fspo.PRESETS[preset], RUNS[preset]
    m.reps, B = args.reps or run["reps"], args.batch_size or p["batch_size"]
    m.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    m.where = f"{preset} preset, {m.dev} {'bf16' if cuda else 'fp32'}"
    shots = [int(n) for n in args.shots.split(",")]

    prefs = args.prefs or f"runs/{preset}/data/roleplay/prefs.jsonl"
    if os.path.exists(prefs):
        rows, source = [r for r in data.load_prefs(prefs) if r.split == "train"], prefs
    else:
        rows, source = synthetic_rows(64, 18, seed=0), "made-up rows (64 users x 18)"
    m.tok = data.Tokenizer(data.train_bpe(data.corpus_texts(rows[:2000]), p["vocab_size"]))
    m.pad = m.tok.eot_id
    users = data.by_user(rows)
    # the preset's model exactly, even where the tokenizer stopped short of its vocab_size
    m.cfg = GPTConfig(block_size=p["block_size"], vocab_size=max(m.tok.n_vocab, p["vocab_size"]),
                      n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"])
    eps = {n: [data.encode_episode(m.tok, s, q, m.cfg.block_size) for s, q in
               data.make_episodes(users, n, random.Random(0))[:max(B, GEN_BATCH)]] for n in shots}
    m.model, m.ref, m.opt = build(m.cfg, m.dev)
    m.scorer, m.ref_scorer = fspo.LogProbs(m.model), fspo.LogProbs(m.ref)
    machine = (torch.cuda.get_device_name() if cuda else
               f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f} "
               f"on {os.cpu_count()} cores")
    print(f"config: {preset} preset model {m.cfg.n_layer}x{m.cfg.n_embd} ({m.cfg.n_head} heads, "
          f"vocab {m.cfg.vocab_size}, {m.model.num_params() / 1e6:.2f}M params); {m.dev} "
          f"{machine}; episodes from {source}; medians of {m.reps} reps after 1 warm-up",
          flush=True)

    step_s, batches = bench_fspo(m, {n: e[:B] for n, e in eps.items()}, shots)
    bench_generate(m, eps[max(shots)], run)
    bench_data(m, users, shots, B, step_s)
    bench_cuda(m, batches[max(shots)], max(shots), step_s[max(shots)], args)


if __name__ == "__main__":
    main()
