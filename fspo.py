"""
Few-Shot Preference Optimization (FSPO), the whole method in one file.

    python fspo.py                                    # main job: data, tokenizer, SFT, FSPO,
                                                      # baselines, evaluation, table
    python fspo.py --preset tiny --out runs/tiny      # the same pipeline in about a minute
    python fspo.py --method sft  --out runs/x/sft     # one training stage ...
    python fspo.py --method fspo --init runs/x/sft --out runs/x/fspo   # ... and the next
    torchrun --nproc_per_node=2 fspo.py --method fspo --init runs/x/sft --out runs/x/fspo

Stage 1 (sft) trains a GPT from scratch on few-shot episodes with BOTH completions as
targets, so it can write every style; it is the base and the reference model. Stage 2
trains with a preference loss on the query's chosen vs rejected completion, given N of the
same user's labelled pairs as context. Methods (one flag each, same loop):
    fspo     IPO (or --loss dpo) with N shots in context
    pooled   IPO with no user context (the paper's "IPO" baseline)
    pref-ft  SFT on the preferred completion given the N shots
    cot-sft  pref-ft whose completion first states the user description
    cot      IPO on description+response completions, from cot-sft
    oracle   IPO with the true user description in the prompt instead of shots
"""
import argparse
import copy
import itertools
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import generate_synthetic as synth
from model import GPT, GPTConfig, load_checkpoint, model_tensors, save_checkpoint

# Presets are overrides of the flag defaults. cpu: the default on a 2-core machine (the
# main job must finish in 20 minutes); gpu: the reduced-scale reproduction on one GPU.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=1024, block_size=1024, shots=2,
                 batch_size=4, grad_accum=1, sft_steps=30, pref_steps=20, warmup=5,
                 lr=3e-3, pref_lr=1e-3, eval_every=10, ckpt_every=10, eval_episodes=16,
                 curve_episodes=16, scale="tiny",
                 domains="roleplay", methods="fspo,pooled", eval_users=4, eval_questions=2),
    # cpu: easier roleplay users (5 style axes, one writer, 2-4 traits, the chosen answer in
    # the user's style) and 4 shots. SFT sees 0-8 shots, so the pair-accuracy curve's 8-shot
    # column is a context length it has trained on, and runs past ~400 steps, where the model
    # learns to copy the question's subject. Stage 2 anchors the preference loss with the
    # chosen answer's NLL, without which greedy answers drift off-format (README)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=2048, block_size=1024, shots=4,
                batch_size=8, grad_accum=1, sft_steps=700, sft_shots=8, pref_steps=800, nll=10.0,
                warmup=50, lr=2e-3, pref_lr=5e-5, eval_every=100, ckpt_every=100, eval_episodes=128,
                curve_episodes=0, scale="default",
                synth="--pair-mode taste --axes formality,confidence,format,example,humor --writers 1 "
                      "--traits 2,3,4",
                domains="roleplay", methods="fspo,pooled", eval_users=150, eval_questions=2),
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, vocab_size=4096, block_size=2048,
                batch_size=32, grad_accum=1, sft_steps=4000, pref_steps=1500, warmup=150,
                lr=6e-4, pref_lr=2e-4, eval_every=250, ckpt_every=500, eval_episodes=512,
                curve_episodes=0, scale="default",
                domains="roleplay,elix,reviews", compile=True,
                methods="fspo,fspo-dpo,pooled,pref-ft,cot-sft,cot,oracle",
                eval_users=300, eval_questions=4),
}
SHOTS = {"roleplay": [8], "elix": [4], "reviews": [4, 8]}  # the paper's N per domain
PREF_METHODS = {"fspo", "pooled", "cot", "oracle"}
SFT_METHODS = {"sft", "pref-ft", "cot-sft"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default=None, help="tiny | cpu | gpu (auto: gpu if CUDA)")
    a("--method", choices=sorted(PREF_METHODS | SFT_METHODS), default=None,
      help="train one stage; omitted: run the whole main job")
    a("--out", default=None, help="run dir (main job) or checkpoint dir (one stage)")
    a("--data", default=None, help="synthetic data dir (main job default: <out>/data)")
    a("--domain", default="roleplay", help="domain subdir of --data for one stage")
    a("--prefs", default=None, help="explicit prefs.jsonl (overrides --data/--domain)")
    a("--users", default=None, help="explicit users.jsonl (cot, oracle, evaluation)")
    a("--tokenizer", default=None, help="ranks file (default <out>/../tokenizer.txt)")
    a("--init", default=None, help="checkpoint to start from (stage 2); also the reference")
    a("--ref", default=None, help="reference checkpoint if not --init")
    a("--shots", type=int, default=None,
      help="N, shots in context (default: the paper's per domain, main job; 8, one stage)")
    a("--loss", choices=["ipo", "dpo"], default="ipo")
    a("--context-loss", type=int, default=1,
      help="sft: 1 = also learn to predict the shots (the in-context reading a pretrained LLM brings)")
    a("--nll", type=float, default=None,
      help="stage 2: add this weight times the chosen completion's token-mean NLL to the "
           "preference loss (RPO's anchor; 0 = the paper's pure IPO/DPO)")
    a("--beta", type=float, default=0.1,
      help="IPO target margin is 1/(2 beta) nats of summed log-prob (paper: 0.01 at 3B)")
    a("--steps", type=int, default=None, help="optimizer steps (default: preset's)")
    a("--batch-size", type=int, default=None, help="episodes per micro-batch")
    a("--grad-accum", type=int, default=None, help="micro-batches per step, over all ranks")
    a("--lr", type=float, default=None)
    a("--min-lr-frac", type=float, default=0.1, help="cosine floor as a fraction of lr")
    a("--warmup", type=int, default=None, help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--n-layer", type=int, default=None)
    a("--n-head", type=int, default=None)
    a("--n-embd", type=int, default=None)
    a("--vocab-size", type=int, default=None, help="BPE vocabulary size to train")
    a("--block-size", type=int, default=None, help="max tokens of a packed episode")
    a("--eval-every", type=int, default=None)
    a("--eval-episodes", type=int, default=None, help="held-out episodes per evaluation")
    a("--curve-episodes", type=int, default=None,
      help="main job: held-out episodes per pair-accuracy figure of the report (0 = all)")
    a("--ckpt-every", type=int, default=None)
    a("--log-every", type=int, default=10)
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--device", default=None, help="cpu | cuda (default: cuda if available)")
    a("--sft-steps", type=int, default=None, help="main job: steps of the SFT stage")
    a("--sft-shots", type=int, default=None,
      help="main job: the SFT stage's episodes hold 0..this many shots (default N), so the "
           "base model has also read contexts longer than stage 2 uses")
    a("--pref-lr", type=float, default=None, help="main job: peak lr of stage-2 methods")
    a("--pref-steps", type=int, default=None, help="main job: steps of each stage-2 method")
    a("--methods", default=None, help="main job: comma list of stage-2 methods to train")
    a("--domains", default=None, help="main job: comma list of domains")
    a("--scale", default=None, help="main job: generate_synthetic.py --scale")
    a("--synth", default=None, help="main job: more generate_synthetic.py flags, one string")
    a("--eval-users", type=int, default=None, help="held-out users in the win-rate eval")
    a("--eval-questions", type=int, default=None, help="held-out questions per user")
    a("--max-new-tokens", type=int, default=96, help="generation length cap in eval")
    a("--gen-batch", type=int, default=64, help="prompts per generation batch in eval")
    a("--seed", type=int, default=1337)
    a("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    if args.method not in (None, "sft") and args.lr is None:  # one stage-2 run, as the main job
        args.lr = PRESETS[args.preset]["pref_lr"]
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.nll = args.nll or 0.0  # presets without it: the paper's pure IPO / DPO
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# ----------------------------------------------------------------------------------------
# The preference loss: one pure function of four summed log-prob tensors.

def preference_loss(pi_w, pi_l, ref_w, ref_l, beta, loss_type="ipo", nll=0.0, n_w=None):
    """Per-episode losses and detached implicit rewards beta * log(pi / pi_ref).

    h is the log-ratio margin [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)].
    IPO regresses h onto 1/(2 beta); DPO maximises log sigmoid(beta h). nll > 0 adds
    nll * (-pi_w / n_w), the chosen completion's token-mean NLL (n_w tokens), as RPO does:
    the margin alone can be met by pushing both answers down, and then greedy decoding
    writes what neither answer contains."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * h)
    if nll:
        losses = losses + nll * (-pi_w / n_w)
    return losses, beta * (pi_w - ref_w).detach(), beta * (pi_l - ref_l).detach()


class LogProbs(nn.Module):
    """Routes GPT.token_logprobs through forward() so DDP's gradient hooks and
    torch.compile see the call that training actually makes."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets, pos, mask):
        return self.gpt.token_logprobs(idx, targets, pos=pos, mask=mask)


def batch_logps(scorer, b):
    """Summed completion log-probs of chosen and rejected, context run once: (B,), (B,)."""
    lp = scorer(b["idx"], b["targets"], b["pos"], b["mask"])  # (B, T) float32
    return data.sequence_logps(lp, b["seg"])


# ----------------------------------------------------------------------------------------
# Episodes: a deterministic, resumable stream of packed batches.

def method_shots(method, n_shots):
    return 0 if method in ("pooled", "oracle") else n_shots


class EpisodeStream:
    """Batch i of the stream is a pure function of (seed, i): resuming at step s rebuilds
    exactly the batches an uninterrupted run would have seen."""

    def __init__(self, tok, prefs_by_user, users, method, n_shots, batch_size, max_len, seed,
                 which=None, use_shots=None, context=False):
        self.tok, self.users, self.method = tok, users, method
        # pref-ft and cot-sft learn the chosen completion only; everything else scores both
        self.which = which or ("chosen" if method in ("pref-ft", "cot-sft") else "both")
        self.n, self.B, self.max_len, self.seed = n_shots, batch_size, max_len, seed
        self.prefs_by_user, self.use_shots = prefs_by_user, use_shots
        self.context = context
        self.multiple = 8 if torch.cuda.is_available() else 1  # aligned masks for CUDA kernels
        # pooled/oracle still cut chunks of N+1 rows so every method sees the same queries
        eps = data.make_episodes(prefs_by_user, n_shots, random.Random(seed))
        self.per_epoch = len(eps) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(eps)} episodes is less than one batch of {batch_size}")
        self.epoch, self.episodes = None, None

    def encode(self, shots, query, rng):
        m, desc, chosen, rejected = self.method, None, None, None
        if m == "sft":  # the base model must also answer with fewer shots or none at all
            shots = shots[: rng.randint(0, len(shots))]
        elif self.use_shots is not None:  # evaluation at fewer shots, same queries
            shots = shots[: self.use_shots]
        else:
            shots = shots[: method_shots(m, self.n)]
        if m in ("oracle", "cot", "cot-sft"):
            user = self.users[query.user_id]
            if m == "oracle":
                desc = synth.trait_summary(user)
            else:
                chosen = cot_completion(synth.trait_summary(user), query.chosen)
                rejected = cot_completion(
                    synth.summary_for_response(user, query.prompt, query.rejected), query.rejected)
        return data.encode_episode(self.tok, shots, query, self.max_len, description=desc,
                                   chosen_text=chosen, rejected_text=rejected)

    def batch(self, i):
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self.epoch:
            rng = random.Random(self.seed * 100003 + epoch)
            self.episodes = data.make_episodes(self.prefs_by_user, self.n, rng, report=False)
            rng.shuffle(self.episodes)
            self.epoch = epoch
        rng = random.Random(self.seed * 7919 + i)
        eps = [self.encode(s, q, rng) for s, q in self.episodes[j * self.B:(j + 1) * self.B]]
        return data.pack_sft(eps, self.tok.eot_id, which=self.which, multiple=self.multiple,
                             context=self.context)


COT_HEADER = "## User Description\n"


def cot_completion(description, response):
    """The cot target: the user description first, then the response."""
    return f"{COT_HEADER}{description}\n{data.COMPLETION_HEADER}{response}"


def to_device(b, device):
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


# ----------------------------------------------------------------------------------------
# Checkpoints: model + optimizer + loop state in safetensors, the rest in JSON.

def save_training(path, model, opt, meta):
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    save_checkpoint(path, tensors, meta)


def load_weights(model, tensors):
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")


def ckpt_dir(path):
    """A stage's run dir holds metrics.jsonl and the atomically replaced checkpoint dir."""
    return os.path.join(path, "ckpt")


def has_checkpoint(path):
    return os.path.exists(os.path.join(ckpt_dir(path), "config.json"))


def load_gpt(path, device):
    tensors, meta = load_checkpoint(ckpt_dir(path))
    model = GPT(GPTConfig(**meta["model"]))
    load_weights(model, tensors)
    return model.to(device), meta, tensors


def check_tokenizer(meta, tok, tok_path, where):
    if meta.get("tokenizer_sha256") != tok.sha256:
        raise ValueError(f"{where} was trained with tokenizer {meta.get('tokenizer')} "
                         f"(sha256 {str(meta.get('tokenizer_sha256'))[:12]}), not {tok_path} "
                         f"(sha256 {tok.sha256[:12]})")


# ----------------------------------------------------------------------------------------
# Training: one loop for every method.

def get_lr(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    min_lr = args.lr * args.min_lr_frac
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (args.lr - min_lr)


@torch.no_grad()
def heldout_metrics(scorer, ref_scorer, batches, args, ctx):
    """Held-out pair accuracy: does the implicit reward log(pi/ref) rank the held-out user's
    chosen above rejected? (ref: the init model; stage 1 has none and uses raw log-probs)"""
    hits, n = 0, 0
    for b in batches:
        with ctx:
            pw, pl = batch_logps(scorer, b)
            if ref_scorer is not None:
                rw, rl = batch_logps(ref_scorer, b)
                pw, pl = pw - rw, pl - rl
        hits += (pw > pl).sum().item()
        n += len(pw)
    return {"eval/pair_accuracy": hits / n, "eval/episodes": n}


def train(args, tok, tok_path, prefs_path, users_path=None):
    """Train one stage (args.method) into args.out; returns the final metrics dict."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    device = args.device
    if ddp:
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    master = rank == 0
    if args.grad_accum < world:  # e.g. the presets' 1 under torchrun: one micro-batch per rank
        args.grad_accum = world
    if args.grad_accum % world:
        raise ValueError(f"--grad-accum {args.grad_accum} must be a multiple of world size {world}")
    accum = args.grad_accum // world
    torch.manual_seed(args.seed)
    use_cuda = device.startswith("cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    method, pref = args.method, args.method in PREF_METHODS

    # data: train users/questions for training, held-out users for the eval metric
    prefs = data.load_prefs(prefs_path)
    users = synth.load_users(users_path) if users_path else None
    if method in ("oracle", "cot", "cot-sft") and users is None:
        raise ValueError(f"--method {method} needs the users file (--users or --data)")
    train_rows = data.by_user([r for r in prefs if r.split == "train"])
    test_rows = data.by_user([r for r in prefs if r.split == "test"])
    stream = EpisodeStream(tok, train_rows, users, method, args.shots, args.batch_size,
                           args.block_size, args.seed, context=method == "sft" and args.context_loss)
    held = EpisodeStream(tok, test_rows, users, "fspo" if method == "sft" else method,
                         args.shots, args.batch_size, args.block_size, args.seed + 1, which="both")
    eval_batches = [to_device(held.batch(i), device)
                    for i in range(min(held.per_epoch, max(1, args.eval_episodes // args.batch_size)))]

    # model, reference, optimizer
    if args.init:
        model, init_meta, _ = load_gpt(args.init, device)
        check_tokenizer(init_meta, tok, tok_path, args.init)
        if model.config.block_size != args.block_size:
            raise ValueError(f"--block-size {args.block_size} differs from {args.init}'s "
                             f"{model.config.block_size}: pass --block-size {model.config.block_size}")
    else:
        cfg = GPTConfig(block_size=args.block_size, vocab_size=tok.n_vocab, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd)
        model = GPT(cfg).to(device)
    ref_scorer, ref_path = None, args.ref or args.init
    if pref and ref_path is None:
        raise ValueError(f"--method {method} needs --init (the SFT model) as reference")
    if ref_path:  # the loss's reference, and for sft methods the held-out metric's
        ref, _, _ = load_gpt(ref_path, device)
        ref.eval().requires_grad_(False)
        ref_scorer = LogProbs(ref)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=use_cuda)
    start = 0
    meta = {"model": asdict(model.config), "method": method, "args": vars(args),
            "tokenizer": tok_path, "tokenizer_sha256": tok.sha256, "step": 0, "done": False}
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if args.resume and has_checkpoint(args.out):
        tensors, saved = load_checkpoint(ckpt_dir(args.out))
        check_tokenizer(saved, tok, tok_path, args.out)
        check_recipe(saved["args"], args, args.out)
        load_weights(model, tensors)
        names = dict(model.named_parameters())
        for k, v in tensors.items():
            if k.startswith("optim."):
                pname, key = k[len("optim."):].rsplit(".", 1)
                opt.state[names[pname]][key] = v.to(device)
        torch.set_rng_state(tensors["rng.torch"])
        start = saved["step"]
        if master and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
            with open(metrics_path) as f:
                keep = [l for l in f if json.loads(l)["step"] <= start]
            with open(metrics_path, "w") as f:
                f.writelines(keep)
    elif master:
        os.makedirs(args.out, exist_ok=True)
        open(metrics_path, "w").close()

    scorer = LogProbs(model)
    if args.compile:
        scorer = torch.compile(scorer)
    if ddp:
        scorer = nn.parallel.DistributedDataParallel(scorer, device_ids=[device] if use_cuda else None)

    def log(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"{method}",
               disable=not master or args.no_progress, dynamic_ncols=True)
    last, last_acc = {}, float("nan")  # last_acc: the latest held-out pair accuracy, for the bar
    for step in bar:
        lr = get_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = {}
        for micro in range(accum):
            b = to_device(stream.batch(step * args.grad_accum + micro * world + rank), device)
            sync = nullcontext() if (not ddp or micro == accum - 1) else scorer.no_sync()
            # DDP's no_sync must cover the forward too: forward decides whether backward syncs
            with sync:
                with ctx:
                    lp = scorer(b["idx"], b["targets"], b["pos"], b["mask"])  # (B, T)
                    pw, pl = data.sequence_logps(lp, b["seg"])
                    if pref:
                        with torch.no_grad():
                            rw, rl = batch_logps(ref_scorer, b)
                        n_w = ((b["seg"] == 1) & (b["targets"] != -1)).sum(-1)  # (B,) chosen tokens
                        losses, rew_w, rew_l = preference_loss(pw, pl, rw, rl, args.beta, args.loss,
                                                               args.nll, n_w)
                        loss = losses.mean()
                        parts = {"rewards/chosen": rew_w.mean(), "rewards/rejected": rew_l.mean(),
                                 "rewards/accuracies": (rew_w > rew_l).float().mean(),
                                 "rewards/margins": (rew_w - rew_l).mean()}
                    else:  # token-mean NLL of the labelled tokens (completions, maybe context)
                        loss = -lp.sum() / (b["targets"] != -1).sum()
                        parts = {}
                (loss / accum).backward()  # outside autocast, as autocast advises
            parts.update({"loss": loss.detach(), "logps/chosen": pw.detach().mean()})
            if stream.which == "both":  # chosen-only methods have no rejected labels
                parts["logps/rejected"] = pl.detach().mean()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item() / accum
        if ddp:  # log the global batch's averages, not rank 0's share
            vals = torch.tensor(list(sums.values()), device=device)
            dist.all_reduce(vals)
            sums = dict(zip(sums, (vals / world).tolist()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, **sums, "grad_norm": grad_norm.item(), "lr": lr}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            row.update(heldout_metrics(LogProbs(model), ref_scorer, eval_batches, args, ctx))
            model.train()
        last_acc = row.get("eval/pair_accuracy", last_acc)
        if (step + 1) % args.log_every == 0 or "eval/pair_accuracy" in row:
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{last_acc:.2f}")  # latest eval's
        last = row
        done = step + 1 == args.steps
        if master and ((step + 1) % args.ckpt_every == 0 or done):
            save_training(ckpt_dir(args.out), model, opt, {**meta, "step": step + 1, "done": done,
                                                 "final": row if done else None})
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return last


# ----------------------------------------------------------------------------------------
# The main job: every stage caches its output and is skipped when present.

def stage_steps(method, args):
    """Optimizer steps of a stage: the SFT count for stage 1, a quarter of it for cot-sft
    (a format warm-up before cot's IPO), the stage-2 count for everything else."""
    return {"sft": args.sft_steps, "cot-sft": args.sft_steps // 4}.get(method, args.pref_steps)


# the flags that decide what a stage learns: a checkpoint made with other values is stale
RECIPE = ("method", "init", "shots", "steps", "lr", "context_loss", "batch_size", "grad_accum",
          "warmup", "min_lr_frac", "weight_decay", "grad_clip", "n_layer", "n_head", "n_embd",
          "block_size", "seed")
PREF_RECIPE = ("loss", "beta", "nll")  # only the preference stages read these


def changed_settings(saved, now):
    """["key: old there, new now", ...] for every key of `now` whose value `saved` does not share."""
    return [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in now.items() if saved.get(k) != v]


def check_recipe(saved_args, args, where):
    """Refuse to resume or reuse a checkpoint trained with another recipe (say, an older
    preset's step count): its results would be reported under the new flags."""
    keys = RECIPE + (PREF_RECIPE if saved_args.get("method") in PREF_METHODS else ())
    diff = changed_settings(saved_args, {k: getattr(args, k, None) for k in keys})
    if diff:
        raise ValueError(f"{where} was trained with other settings ({'; '.join(diff)}); "
                         f"delete it or pick another --out")


def stage_done(path, args):
    try:
        with open(os.path.join(ckpt_dir(path), "config.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    check_recipe(meta["args"], args, path)
    return meta.get("done", False)


def run_stage(args, tok, tok_path, method, out, prefs, users, init=None, ref=None, **over):
    a = copy.copy(args)
    a.method, a.out, a.init, a.ref = method, out, init, ref
    for k, v in over.items():
        setattr(a, k, v)
    if stage_done(out, a):
        print(f"[skip] {out} exists")
        return
    a.resume = has_checkpoint(out)
    t0 = time.time()
    final = train(a, tok, tok_path, prefs, users)
    print(f"[{method}] {time.time() - t0:.0f}s held-out pair accuracy "
          f"{final.get('eval/pair_accuracy', float('nan')):.3f}")


def train_tokenizer(dirs, vocab_size, path):
    """BPE on the training rows of the given data dirs plus the users' trait summaries (the
    text the cot method writes), so no test text shapes the vocabulary."""
    t0 = time.time()
    prefs, summaries = [], []
    for d in dirs:
        prefs += [r for r in data.load_prefs(os.path.join(d, "prefs.jsonl")) if r.split == "train"]
        users = os.path.join(d, "users.jsonl")
        if os.path.exists(users):
            summaries += [COT_HEADER + synth.trait_summary(u) for u in synth.load_users(users).values()
                          if u.get("split") == "train"]
    tok = data.Tokenizer(data.train_bpe(itertools.chain(data.corpus_texts(prefs), summaries),
                                        vocab_size))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    print(f"[tokenizer] {tok.n_vocab} tokens from {len(prefs)} rows in {time.time() - t0:.1f}s")


def ensure_data(args, data_dir, domains):
    """Generate each domain the main job needs unless it is there. stats.json is the
    generator's last write: a domain without it is incomplete; one made with other generator
    settings (say, an older preset's) is refused, not reused."""
    missing = []
    for d in domains:
        argv = ["--domain", d, "--out", data_dir, "--scale", args.scale, "--seed", str(args.seed),
                *(args.synth or "").split()]
        stats_path = os.path.join(data_dir, d, "stats.json")
        if not os.path.exists(stats_path):
            missing.append(argv)
            continue
        with open(stats_path) as f:
            stats = json.load(f)
        diff = changed_settings({**stats.get("config", {}), "seed": stats.get("seed")},
                                {**synth.recipe(synth.parse_args(argv), d), "seed": args.seed})
        if diff:
            raise SystemExit(f"{stats_path}: the data was generated with other settings "
                             f"({'; '.join(diff)}); delete {os.path.dirname(stats_path)} to regenerate it")
    for argv in missing:
        print(f"[data] generating {argv[1]} ({args.scale} scale) into {data_dir}")
        synth.main(argv)


def main_job(args):
    import eval as evaluation  # the evaluation lives in eval.py; imported late, it imports us
    out = args.out or os.path.join("runs", args.preset)
    data_dir = args.data or os.path.join(out, "data")
    domains = args.domains.split(",")
    t0 = time.time()
    ensure_data(args, data_dir, domains)
    tok_path = os.path.join(out, "tokenizer.txt")
    if not os.path.exists(tok_path):
        train_tokenizer([os.path.join(data_dir, d) for d in domains], args.vocab_size, tok_path)
    tok = data.get_tokenizer(tok_path)
    methods = args.methods.split(",")
    runs = {}
    for d in domains:
        prefs = os.path.join(data_dir, d, "prefs.jsonl")
        users = os.path.join(data_dir, d, "users.jsonl")
        for n in [args.shots] if args.shots else SHOTS[d]:
            base = os.path.join(out, f"{d}-{n}shot")
            sft = os.path.join(base, "sft")
            run_stage(args, tok, tok_path, "sft", sft, prefs, users, shots=args.sft_shots or n,
                      steps=stage_steps("sft", args))
            ckpts = {"sft": sft}
            for m in methods:
                name, loss = (m[:-4], "dpo") if m.endswith("-dpo") else (m, "ipo")
                init = ckpts["cot-sft"] if name == "cot" else sft
                ckpts[m] = os.path.join(base, m)
                run_stage(args, tok, tok_path, name, ckpts[m], prefs, users, init=init,
                          shots=n, loss=loss, steps=stage_steps(name, args), lr=args.pref_lr)
            runs[(d, n)] = ckpts
    report = evaluation.evaluate_runs(runs, data_dir, tok, tok_path, args, out)
    print(report)
    print(f"[done] main job took {time.time() - t0:.0f}s; report in {out}/report.md")


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    if args.method is None:
        return main_job(args)
    if args.out is None:
        raise SystemExit("fspo.py: --out is required with --method")
    prefs = args.prefs or os.path.join(args.data or "data", args.domain, "prefs.jsonl")
    users = args.users or os.path.join(os.path.dirname(prefs), "users.jsonl")
    users = users if os.path.exists(users) else None
    tok_path = args.tokenizer or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                              "tokenizer.txt")
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun, rank 0 trains the tokenizer
        for _ in range(600):
            if os.path.exists(tok_path):
                break
            time.sleep(1)
    if not os.path.exists(tok_path):
        train_tokenizer([os.path.dirname(prefs)], args.vocab_size, tok_path)
    args.shots = args.shots or 8
    args.steps = args.steps or stage_steps(args.method, args)
    final = train(args, data.get_tokenizer(tok_path), tok_path, prefs, users)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(final))


if __name__ == "__main__":
    main()
