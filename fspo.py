"""
Few-Shot Preference Optimization (FSPO): the loss, the training loop and the main job.

    python fspo.py                                    # main job: data, tokenizer, SFT, FSPO,
                                                      # baselines, evaluation, report
    python fspo.py --preset paper                     # the paper's three tables, every domain
    python fspo.py --preset cpu                       # the same on easy users, in minutes
    python fspo.py --preset tiny --out runs/tiny      # the same pipeline in about a minute
    python fspo.py --method sft  --out runs/x/sft     # one stage (cpu preset's flags) ...
    python fspo.py --method fspo --init runs/x/sft --out runs/x/fspo   # ... and the next
    torchrun --nproc_per_node=2 fspo.py --method fspo --init runs/x/sft --out runs/x/fspo

This file reads in the order of the method: the preference loss, the one function that scores
a packed batch, the lr schedule, the training loop, the main job, then flags and presets.
data.py builds the batches (its METHODS table says how each method is prompted and what it
learns), model.py is the GPT and its checkpoints, eval.py the evaluation and the report.

Stage 1 (sft) trains a GPT from scratch on few-shot episodes with BOTH completions as
targets, so it can write every style; it is the base and the reference model. Stage 2
trains with a preference loss on the query's chosen vs rejected completion, given N of the
same user's labelled pairs as context.
"""
import argparse
import copy
import glob
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as evaluation
import generate_synthetic as synth
import judge
from model import GPT, GPTConfig, ckpt_dir, load_model, save_model
from model import amp_dtype, autocast as model_autocast


# ----------------------------------------------------------------------------------------
# The preference loss: one pure function of four summed log-prob tensors.

def preference_loss(pi_w, pi_l, ref_w, ref_l, beta, loss_type="ipo", nll=0.0, n_w=None):
    """Per-pair losses and detached implicit rewards beta * log(pi / pi_ref) (a pair: one
    episode's query, or one of its shots under --shot-pairs).

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


def score_batch(scorer, ref_scorer, b, args):
    """The objective of one packed batch -> (loss, metrics). The context is run once for
    both completions (data.pack_batch). Preference methods: the loss above against the frozen
    reference on the same context; SFT methods: the token-mean NLL of the labelled tokens
    (the completions, and the shots too under --context-loss). --describe adds its weight
    times the token-mean NLL of the notes (data.Episode.notes)."""
    lp = scorer(b["idx"], b["targets"], b["pos"], b["mask"])  # (B, T) float32, 0 unlabelled
    learns, metrics = data.method(args.method).learns, {}
    desc = (b["seg"] == data.DESCRIBE) & (b["targets"] != -1)  # (B, T) the notes' tokens
    has_notes = bool(desc.any())
    if has_notes:  # --describe: notes on what the shots say, a term of their own
        describe_nll = -lp[desc].sum() / desc.sum()
        lp = lp.masked_fill(desc, 0.0)
    if learns == "preference":
        # every pair of the batch: the query (pair 0), and each shot under --shot-pairs
        P = int(b["pair"].max()) + 1
        pw, pl = data.pair_sums(lp, b, P)  # (B, P), (B, P)
        with torch.no_grad():
            rw, rl = data.pair_sums(ref_scorer(b["idx"], b["targets"], b["pos"], b["mask"]), b, P)
        n_w, n_l = data.pair_sums((b["targets"] != -1).float(), b, P)  # (B, P) token counts
        real = (n_w > 0) & (n_l > 0)  # (B, P) the pairs this episode has
        pw, pl, rw, rl, n_w = (t[real] for t in (pw, pl, rw, rl, n_w))
        losses, rew_w, rew_l = preference_loss(pw, pl, rw, rl, args.beta, args.loss, args.nll, n_w)
        loss = losses.mean()
        metrics = {"rewards/chosen": rew_w.mean(), "rewards/rejected": rew_l.mean(),
                   "rewards/accuracies": (rew_w > rew_l).float().mean(),
                   "rewards/margins": (rew_w - rew_l).mean()}
    else:
        pw, pl = data.sequence_logps(lp, b["seg"])  # (B,), (B,) summed completion log-probs
        n = data.labelled(b).sum()
        # token-mean NLL; under --group over the pool's tokens per batch (data.EpisodeStream)
        loss = -lp.sum() / b.get("n_labelled", n)
        metrics["nll"] = -lp.detach().sum() / n  # this batch's own token mean, grouped or not
    if has_notes:
        loss = loss + args.describe * describe_nll
        metrics["describe/nll"] = describe_nll.detach()
    metrics.update({"loss": loss.detach(), "logps/chosen": pw.detach().mean()})
    if learns != "chosen":  # chosen-only methods have no rejected labels
        metrics["logps/rejected"] = pl.detach().mean()
    return loss, metrics


class LogProbs(nn.Module):
    """Routes GPT.token_logprobs through forward() so DDP's gradient hooks and
    torch.compile see the call that training actually makes."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets, pos, mask):
        return self.gpt.token_logprobs(idx, targets, pos=pos, mask=mask)


def get_lr(step, args):
    """Linear warmup, then cosine decay to min_lr_frac * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    min_lr = args.lr * args.min_lr_frac
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (args.lr - min_lr)


# ----------------------------------------------------------------------------------------
# The training loop, one for every method, and its setup, resume and save helpers.

def setup_distributed(args):
    """-> (rank, world, device). Under torchrun each rank takes one micro-batch of a step."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, args.device
    dist.init_process_group(backend="nccl" if args.device == "cuda" else "gloo")
    device = args.device
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def make_streams(args, tok, prefs_path, users_path, device):
    """The training stream (train users) and the validation users' running metric
    (eval.held_out_sets); test users are left for the report."""
    prefs = data.load_prefs(prefs_path)
    users = judge.load_users(users_path) if users_path else None
    m = data.method(args.method)
    if users is None and (m.cot or m.prompt == "description" or args.describe or args.annotate):
        why = ("--describe" if args.describe else "--annotate" if args.annotate
               else f"--method {args.method}")
        raise ValueError(f"{why} needs the users file (--users or --data)")
    group = args.group or 1
    if group > 1 and args.describe:
        raise ValueError("--group goes without --describe: the notes' token-mean is per batch, and a "
                         "grouped batch of short episodes holds none")
    if args.annotate and (args.describe or args.shot_pairs or not annotates(args.method, args)):
        raise ValueError("--annotate needs a method whose prompt holds shots (with tally, a stage-2 "
                         "one: the SFT learns no lines), and goes with neither --describe, --shot-pairs "
                         "nor, without tally, a cot method")
    data.check_lengths(tok, prefs, args.block_size, args.method, users)
    rows = {s: data.by_user([r for r in prefs if r.split == s]) for s in data.SPLITS}
    if not rows["val"]:
        raise ValueError(f"{prefs_path}: no rows with split 'val' (validation users) for the running metric")
    try:
        stream = data.EpisodeStream(tok, rows["train"], users, args.method, args.shots, args.batch_size,
                                    args.block_size, args.seed,
                                    context=args.method == "sft" and args.context_loss,
                                    shot_pairs=bool(args.shot_pairs), mirror=args.mirror or 0.0,
                                    mirror_pairs=bool(args.oracle_pairs if m.prompt == "description"
                                                      else args.mirror_pairs),
                                    describe=bool(args.describe), annotate=args.annotate,
                                    group=group, bpe_dropout=args.bpe_dropout or 0.0)
    except ValueError as e:
        raise ValueError(f"{prefs_path}: split 'train': {e}") from None
    try:
        held = evaluation.held_out_sets(args, tok, rows, users, device)
    except ValueError as e:
        raise ValueError(f"{prefs_path}: split 'val' (the running metric): {e}") from None
    return stream, held


def build_model(args, tok, tok_path, device):
    """The policy: the --init checkpoint, or a fresh GPT (stage 1)."""
    if not args.init:
        cfg = GPTConfig(block_size=args.block_size, vocab_size=tok.n_vocab, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd)
        return GPT(cfg).to(device)
    model, meta, _ = load_model(ckpt_dir(args.init), device)
    data.check_tokenizer(meta, tok, tok_path, args.init)
    if model.config.block_size != args.block_size:
        raise ValueError(f"--block-size {args.block_size} differs from {args.init}'s "
                         f"{model.config.block_size}: pass --block-size {model.config.block_size}")
    return model


def load_reference(args, device):
    """The frozen reference (--ref, else --init): the loss's and the held-out metric's."""
    path = args.ref or args.init
    if data.method(args.method).learns == "preference" and path is None:
        raise ValueError(f"--method {args.method} needs --init (the SFT model) as reference")
    if path is None:
        return None
    ref = load_model(ckpt_dir(path), device)[0].eval().requires_grad_(False)
    return LogProbs(ref)


def make_optimizer(model, args, fused):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), fused=fused)


def saved_meta(run):
    """config.json of the run's checkpoint, or of ckpt.old when a save crashed between its
    two renames (model.save_checkpoint); None when there is neither."""
    for d in (ckpt_dir(run), ckpt_dir(run) + ".old"):
        if os.path.exists(os.path.join(d, "config.json")):
            with open(os.path.join(d, "config.json")) as f:
                return json.load(f)
    return None


def trained_with(tok_path):
    """The stages under the tokenizer's directory (a main job's, or a lone stage's siblings)
    trained with the tokenizer now at tok_path: data.ensure_tokenizer keeps it for them."""
    root = os.path.dirname(os.path.abspath(tok_path))
    try:
        sha = data.Tokenizer.load(tok_path).sha256
    except (OSError, ValueError):  # unreadable: no stage can be using it
        return []
    # depth 2: a main job's <domain>-<N>shot/<method>, unless that dir is a run with its own tokenizer
    runs = glob.glob(os.path.join(root, "*")) + [r for r in glob.glob(os.path.join(root, "*", "*"))
                                                 if not os.path.exists(os.path.join(r, "..", "tokenizer.txt"))]
    return [r for r in sorted(runs) if os.path.isdir(r) and stage_tokenizer(r) == sha]


def stage_tokenizer(run):
    """The sha256 of the tokenizer a stage dir's checkpoint records, or None (not a stage, or
    a config that does not read: nothing to keep a tokenizer for)."""
    try:
        meta = saved_meta(run)
    except (OSError, ValueError):
        return None
    return meta.get("tokenizer_sha256") if isinstance(meta, dict) else None


def stage_inputs(args, tok, prefs_path, users_path=None):
    """Fingerprints of what a stage read: a cached stage whose inputs changed is stale."""
    init = os.path.join(ckpt_dir(args.init), "model.safetensors") if args.init else None
    domain = next(iter(judge.load_users(users_path).values()), {}).get("domain") if users_path else None
    return {"prefs": data.file_sha256(prefs_path)[:16], "tokenizer": tok.sha256[:16],
            "init": data.file_sha256(init)[:16] if init else None,
            "text_format": data.text_format(args.method, args.annotate, domain)}


def save_training(path, model, opt, meta, ema=None):
    """Weights, optimizer state, the weights' average (--ema) and the RNG in one atomic
    checkpoint (model.save_model)."""
    names = {id(p): n for n, p in model.named_parameters()}
    extra = {f"optim.{names[id(p)]}.{k}": v for group in opt.param_groups
             for p in group["params"] for k, v in opt.state.get(p, {}).items()}
    extra |= {f"ema.{n}": e for n, e in (ema or {}).items()}
    extra["rng.torch"] = torch.get_rng_state()
    save_model(path, model, meta, extra)


def stage_amp(args, device, saved=None):
    """The dtype a stage computes in, "bf16" or "fp32". --dtype auto is settled once, when
    the stage starts (on a CPU by a timing, model.cpu_bf16_faster), and kept in its checkpoint:
    a resumed run computes as its first part did, even where a new timing would pick the other."""
    if saved and args.resume and args.dtype == "auto" and saved.get("amp"):
        return saved["amp"]
    return "bf16" if amp_dtype(device, args.dtype) == torch.bfloat16 else "fp32"


def resume(args, model, opt, tok, tok_path, inputs, device, metrics_path, master, ema=None):
    """Restore the checkpoint in --out (and the weights' average into ema) -> its step; drop
    metrics logged after it."""
    saved_model, saved, tensors = load_model(ckpt_dir(args.out))
    data.check_tokenizer(saved, tok, tok_path, args.out)
    check_recipe(saved, args, inputs, args.out)
    model.load_state_dict(saved_model.state_dict())
    names = dict(model.named_parameters())
    for k, v in tensors.items():
        if k.startswith("optim."):
            pname, key = k[len("optim."):].rsplit(".", 1)
            opt.state[names[pname]][key] = v.to(device)
    for n, e in (ema or {}).items():
        e.copy_(tensors[f"ema.{n}"])
    torch.set_rng_state(tensors["rng.torch"])
    if master and os.path.exists(metrics_path):
        rows = read_metrics(metrics_path)
        data.atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in rows
                                                if r["step"] <= saved["step"]))
    return saved["step"]


def read_metrics(path):
    """metrics.jsonl rows. A last line without its newline (a crash mid-write) is dropped;
    any other line that does not parse is an error naming it."""
    with open(path) as f:
        lines = f.read().split("\n")[:-1]  # after the last newline: nothing, or a cut line
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: not a JSON metrics row") from None
    return rows


def accumulate_gradients(scorer, ref_scorer, stream, step, args, autocast, device, rank, world):
    """Forward and backward of this rank's micro-batches of one step -> the step's mean
    metrics (over all ranks under DDP)."""
    accum, ddp, sums = args.grad_accum // world, world > 1, {}
    for micro in range(accum):
        b = data.to_device(stream.batch(step * args.grad_accum + micro * world + rank), device)
        # DDP's no_sync must cover the forward too: forward decides whether backward syncs
        with nullcontext() if (not ddp or micro == accum - 1) else scorer.no_sync():
            with autocast:
                loss, metrics = score_batch(scorer, ref_scorer, b, args)
            (loss / accum).backward()  # outside autocast, as autocast advises
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.item() / accum
    if ddp:  # log the global batch's averages, not rank 0's share
        vals = torch.tensor(list(sums.values()), device=device)
        dist.all_reduce(vals)
        sums = dict(zip(sums, (vals / world).tolist()))
    return sums


@torch.no_grad()
def average(ema, model, decay, last):
    """One step of the weights' average, ema <- decay * ema + (1 - decay) * weights; at the
    last step the model takes the average's weights: what the stage writes and is evaluated on."""
    for n, p in model.named_parameters():
        ema[n].lerp_(p, 1 - decay)
        if last:
            p.copy_(ema[n])


def train(args, tok, tok_path, prefs_path, users_path=None):
    """Train one stage (args.method) into args.out; returns the final metrics dict."""
    rank, world, device = setup_distributed(args)
    ddp, master = world > 1, rank == 0
    args.grad_accum = max(args.grad_accum, world)  # the presets' 1 under torchrun: one per rank
    if args.grad_accum % world:
        raise ValueError(f"--grad-accum {args.grad_accum} must be a multiple of world size {world}")
    torch.manual_seed(args.seed)
    use_cuda = device.startswith("cuda")
    stream, held = make_streams(args, tok, prefs_path, users_path, device)
    model = build_model(args, tok, tok_path, device)
    ref_scorer = load_reference(args, device)
    model.train()
    opt = make_optimizer(model, args, fused=use_cuda)
    inputs = stage_inputs(args, tok, prefs_path, users_path)
    decay = stage_ema(stage_name(args), args.ema)
    meta = {"method": args.method, "args": vars(args), "tokenizer": tok_path, "inputs": inputs,
            "tokenizer_sha256": tok.sha256, "step": 0, "done": False, "batch_group": stream.group,
            "ema": decay}
    # --ema: an exponential moving average of the weights, written as the stage's weights
    ema = {n: p.detach().clone() for n, p in model.named_parameters()} if decay else None
    metrics_path, start, saved = os.path.join(args.out, "metrics.jsonl"), 0, saved_meta(args.out)
    if saved and not args.resume:
        raise ValueError(f"{args.out} already holds a checkpoint (step {saved['step']}"
                         f"{', done' if saved['done'] else ''}): pass --resume to continue it, "
                         f"or delete it to start over")
    meta["amp"] = stage_amp(args, device, saved)
    meta["threads"] = torch.get_num_threads()  # a stage's numbers depend on it (--jobs)
    autocast = model_autocast(device, meta["amp"])  # bf16 on CUDA, and on CPUs where it is faster
    if saved:
        start = resume(args, model, opt, tok, tok_path, inputs, device, metrics_path, master, ema)
        if master:
            print(f"[resume] {args.out} from step {start}", flush=True)
    elif master:
        os.makedirs(args.out, exist_ok=True)
        open(metrics_path, "w").close()
    scorer = LogProbs(model)
    if args.compile:
        scorer = torch.compile(scorer)
    if ddp:
        scorer = nn.parallel.DistributedDataParallel(scorer, device_ids=[device] if use_cuda else None)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method,
               disable=not master or args.no_progress, dynamic_ncols=True)
    last, last_acc = {}, float("nan")  # last_acc: the latest held-out pair accuracy, for the bar
    for step in bar:
        lr = get_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = accumulate_gradients(scorer, ref_scorer, stream, step, args, autocast, device, rank, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1 == args.steps
        if ema is not None:
            average(ema, model, decay, done)
        row = {"step": step + 1, **sums, "grad_norm": grad_norm.item(), "lr": lr}
        if (step + 1) % args.eval_every == 0 or done:
            model.eval()
            row.update(evaluation.running_metrics(model, ref_scorer, held, autocast))
            model.train()
        last_acc = row.get("eval/pair_accuracy", last_acc)
        if master and ((step + 1) % args.log_every == 0 or "eval/pair_accuracy" in row):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{last_acc:.2f}")  # latest eval's
        last = row
        if master and ((step + 1) % args.ckpt_every == 0 or done):
            save_training(ckpt_dir(args.out), model, opt, {**meta, "step": step + 1, "done": done,
                                                           "final": row if done else None}, ema)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return last


# ----------------------------------------------------------------------------------------
# The main job: every stage caches its output and is skipped when present.

def stage_steps(name, args):
    """Optimizer steps of stage `name` (may end in "-dpo"): its --stage-steps entry, else the
    entry of the method it is a loss of (fspo for fspo-dpo); else the SFT count for stage 1, a
    quarter of it for cot-sft (a format warm-up before cot's IPO), the stage-2 count for the rest."""
    steps = parse_stage_steps(args.stage_steps)
    base = name.removesuffix("-dpo")
    default = {"sft": args.sft_steps, "cot-sft": args.sft_steps // 4}.get(base, args.pref_steps)
    return steps.get(name, steps.get(base, default))


def parse_stages(text, flag, value, form, bare=False):
    """Per-stage entries 'oracle:2000,pooled:1000' -> {"oracle": value("2000"), ...}; value(text)
    is None where an entry is malformed (an error naming the flag and form). bare: an entry
    without a stage name is allowed, under key "", for every stage."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, v = (x.strip() for x in item.rpartition(":"))
        got = value(v)
        if got is None or name not in ([""] if bare else []) + [*TRAINED, "fspo-dpo"]:
            raise SystemExit(f"fspo.py: {flag}: '{item}' is not {form} "
                             f"(methods: {', '.join(TRAINED)}, fspo-dpo)")
        out[name] = got
    return out


def stage_name(args):
    """The stage's name as --stage-steps and --ema spell it: the method, "-dpo" for its DPO loss."""
    return args.method + ("-dpo" if getattr(args, "loss", "ipo") == "dpo" else "")


def stage_ema(name, spec):
    """The --ema decay of stage `name` (may end in "-dpo"; 0.0: no average): spec 'fspo:0.998'
    names stages (fspo-dpo takes fspo's unless named), a bare number applies to every stage."""
    def decay(v):
        try:
            return float(v) if 0.0 <= float(v) < 1.0 else None
        except ValueError:
            return None
    decays = parse_stages(spec and str(spec), "--ema", decay, "a decay in [0, 1) or method:decay", bare=True)
    return decays.get(name, decays.get(name.removesuffix("-dpo"), decays.get("", 0.0)))


def parse_stage_steps(text):
    """'oracle:2000,pooled:1000' -> {"oracle": 2000, "pooled": 1000}."""
    return parse_stages(text, "--stage-steps", lambda n: int(n) if n.isdigit() and int(n) >= 1 else None,
                        "method:steps, steps >= 1")


def stage_lr(name, args):
    """Peak lr of a stage-2 stage (name may end in "-dpo"): --oracle-lr for oracle if set, else
    --pref-lr."""
    return args.oracle_lr if name.removesuffix("-dpo") == "oracle" and args.oracle_lr else args.pref_lr


def annotates(name, args):
    """How stage `name` trains with --annotate: None where it is off or the prompt holds no
    shots; True: the shots with their lines and tally, the SFT learning to write the lines, as
    the base that writes them at evaluation (not cot's: its completion opens with its own
    description); "tally" (--annotate tally): the judge's tally alone, for the stage-2 methods,
    and no lines for the SFT: at evaluation each policy reads the shots itself (eval.Reader).
    cot then reads the tally and writes the user's description in words before its answer."""
    m = data.method(name.removesuffix("-dpo"))
    if not (args.annotate and m.reads_shots):
        return None
    if args.annotate == "tally":
        return "tally" if m.prompt == "shots" else None
    return None if m.cot else True


def same_at_every_n(name, args):
    """Whether stage `name` learns the same task whatever the domain's N (Reviews has two): the
    SFT when --sft-shots fixes its shots, and the methods whose prompt holds no shots (pooled,
    the bare question; oracle, the description) from such an SFT. The main job trains them once
    per domain, at its first N: their episodes are drawn as N + 1 rows, so they saw that N's
    queries, and the users with N + 1 rows."""
    if name == "sft":
        return bool(args.sft_shots)
    m = data.method(name)
    return not m.reads_shots and same_at_every_n(m.init, args)


def domain_methods(args, domain, n=None):
    """The stage-2 methods of one domain at N = n: --methods is one comma list for every domain
    and N, or lists per domain or per domain and N, 'roleplay:oracle,fspo elix:fspo,pref-ft
    reviews-8shot:oracle,fspo,cot-sft,cot' (the paper's tables differ per domain and N; a
    domain-Nshot list is that run's own, whatever its domain's list says)."""
    if ":" not in args.methods:
        return args.methods.split(",")
    entries = args.methods.split()
    if bad := [e for e in entries if ":" not in e]:
        raise SystemExit(f"fspo.py: --methods {args.methods!r}: {bad[0]!r} names no domain (domain:m1,m2)")
    lists = dict(e.split(":", 1) for e in entries)
    key = next((k for k in (f"{domain}-{n}shot", domain) if k in lists), None)
    if key is None:
        raise SystemExit(f"fspo.py: --methods {args.methods!r} names no methods for domain {domain!r}"
                         + (f" at {n} shots" if n else ""))
    return lists[key].split(",")


def domain_bpe_dropout(args, domain):
    """--bpe-dropout for one domain's stages -> float, or None for none (so that a stage without it
    keeps the recipe, and the cache, of one trained before the flag). The presets name ELIX
    alone: only its held-out texts hold tokens that no training text does (README, "How the
    method is implemented", BPE-dropout)."""
    text = args.bpe_dropout or ""
    entries = dict(e.rpartition(":")[::2] for e in text.split())
    if bad := set(entries) - {"", domain, *SHOTS}:  # a misspelt domain would pass silently
        raise SystemExit(f"fspo.py: --bpe-dropout {text!r} names {', '.join(sorted(bad))}, not a domain")
    try:
        p = float(entries.get(domain, entries.get("", 0)))
    except ValueError:
        raise SystemExit(f"fspo.py: --bpe-dropout {text!r} is not a probability or 'domain:p' list") from None
    if not 0 <= p < 1:
        raise SystemExit(f"fspo.py: --bpe-dropout {text!r}: a probability in [0, 1) is needed")
    return p or None


def domain_shots(args, domain):
    """The N a domain runs at: --shots, else the paper's."""
    return [args.shots] if args.shots else SHOTS[domain]


def job_domains(args):
    """The main job's domains: --domains, or with --prefs the one named after the user's file."""
    return [os.path.splitext(os.path.basename(args.prefs))[0]] if args.prefs else args.domains.split(",")


def stage_order(args, methods):
    """The stage-2 methods in training order: with --fspo-init oracle, oracle comes first (the
    FSPO family starts from it, starts_from); cot-sft before cot, which starts from it."""
    return sorted(methods, key=lambda m: (not (args.fspo_init == "oracle" and m == "oracle"), m == "cot"))


def starts_from(args, name):
    """(init, ref) stage names of stage-2 stage `name`: the stage its method starts from, ref
    None (the init is the reference). With --fspo-init oracle, FSPO (IPO or DPO), Pref-FT and
    cot-sft (cot's warm-up) start from the oracle, which has learned to apply a stated
    description, so Pref-FT's row differs from FSPO's in its loss alone (from the SFT it won 53.9
    on val users, from the oracle 74.3: README, "The paper's tables"); FSPO keeps the SFT as its
    reference, Pref-FT and cot-sft learn by SFT and have none."""
    base = name.removesuffix("-dpo")
    if args.fspo_init == "oracle" and base in ("fspo", "pref-ft", "cot-sft"):
        return "oracle", ("sft" if base == "fspo" else None)
    return data.method(name).init, None


# the flags that decide what a stage learns: a checkpoint made with other values is stale
RECIPE = ("method", "init", "shots", "steps", "lr", "context_loss", "batch_size", "grad_accum",
          "warmup", "min_lr_frac", "weight_decay", "grad_clip", "n_layer", "n_head", "n_embd",
          "block_size", "seed", "dtype", "describe", "annotate", "ref", "group", "bpe_dropout")
PREF_RECIPE = ("loss", "beta", "nll", "shot_pairs", "mirror", "mirror_pairs", "oracle_pairs")  # only the preference stages read these


def changed_settings(saved, now):
    """["key: old there, new now", ...] for every key of `now` whose value `saved` does not share."""
    return [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in now.items() if saved.get(k) != v]


def check_recipe(saved, args, inputs, where):
    """Refuse to resume or reuse a checkpoint trained with another recipe (say, an older
    preset's step count) or on other inputs (data, tokenizer, init checkpoint): its
    results would be reported under the new flags."""
    pref = data.method(saved["args"].get("method", "sft")).learns == "preference"
    keys = RECIPE + (PREF_RECIPE if pref else ())
    was = dict(saved["args"])
    if pref and "batch_group" not in saved:  # before 2026-12-05 stage 2 never grouped, whatever --group said
        was["group"] = None
    now = {k: getattr(args, k, None) for k in keys} | {"out": args.out}
    diff = changed_settings(seen_from_out(was), seen_from_out(now))
    diff += changed_settings({"ema": saved.get("ema", 0.0)}, {"ema": stage_ema(stage_name(args), args.ema)})
    diff += changed_settings({"text_format": 1} | saved.get("inputs", {}), inputs)  # 1: before it was kept
    if diff:
        raise ValueError(f"{where} was trained with other settings or inputs ({'; '.join(diff)}); "
                         f"delete it or pick another --out")


def seen_from_out(recipe):
    """The recipe with init and ref as paths from the stage's own dir (out, then dropped): a run
    dir copied or moved whole keeps its cache (their weights are fingerprinted in its inputs)."""
    out = recipe.get("out")
    rel = {k: os.path.relpath(recipe[k], out) for k in ("init", "ref") if out and recipe.get(k)}
    return {k: v for k, v in recipe.items() if k != "out"} | rel


def stage_oracle_pairs(args, name, users):
    """--oracle-pairs as stage `name` takes it: the oracle's alone (None elsewhere, so the other
    stages' recipes and caches are those of a run without it), and not on ELIX users, whose
    description states a level that has no mirror image."""
    if not args.oracle_pairs or data.method(name).prompt != "description" or users is None:
        return None
    if not all(data.has_mirror_image(u) for u in judge.load_users(users).values()):
        print(f"[{name}] --oracle-pairs skipped: {users} holds ELIX users, whose level has no mirror image",
              flush=True)
        return None
    return True


def run_stage(args, tok, tok_path, name, out, prefs, users, init=None, ref=None, bpe_dropout=None, **over):
    """Train stage `name` (a data.METHODS name, "-dpo" for the DPO loss) into `out` unless done.
    ref: the frozen reference if not init. bpe_dropout: the stage's domain's probability
    (domain_bpe_dropout), never --bpe-dropout's text, which names domains."""
    a = copy.copy(args)
    a.method, a.loss = name.removesuffix("-dpo"), "dpo" if name.endswith("-dpo") else "ipo"
    a.out, a.init, a.ref, a.annotate = out, init, ref, annotates(name, args)
    a.bpe_dropout = bpe_dropout
    a.oracle_pairs = stage_oracle_pairs(args, name, users)
    for k, v in over.items():
        setattr(a, k, v)
    saved = saved_meta(out)
    if saved is not None:  # cached: refused if made with other settings or inputs
        check_recipe(saved, a, stage_inputs(a, tok, prefs, users), out)
        if saved.get("done"):
            print(f"[skip] {out} exists", flush=True)
            return
    a.resume = True  # an unfinished stage continues where it stopped
    t0 = time.time()
    final = train(a, tok, tok_path, prefs, users)
    print(f"[{name}] {time.time() - t0:.0f}s held-out pair accuracy "
          f"{final.get('eval/pair_accuracy', float('nan')):.3f}", flush=True)


def run_stages(args, tok, tok_path, stages, fn=None):
    """Train each stage (run_stage's keyword arguments; fn: run_stage) once the stages it
    starts from are done: in order, or with --jobs K on CPU K at a time (of the ready ones,
    the one heading the longest chain of steps first), each in its own process on 1/K of the
    threads. This small model uses two threads poorly: two one-thread processes make more
    steps per second than one on both (`python bench.py`, its jobs line). A stage's numbers
    depend on its thread count, so on K. A failed stage stops the job once the stages beside it
    finish; finished ones stay cached."""
    fn = fn or run_stage
    if (args.jobs or 1) <= 1 or args.device != "cpu" or "RANK" in os.environ:
        for s in stages:
            fn(args, tok, tok_path, **s)
        return
    made, chain = {s["out"] for s in stages}, chain_steps(stages)
    todo, running, done = list(stages), {}, set()
    threads = max(1, torch.get_num_threads() // args.jobs)
    quiet = copy.copy(args)
    quiet.no_progress = True  # K progress bars on one terminal garble each other
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        while todo or running:
            ready = [s for s in todo if {s.get("init"), s.get("ref")} & made <= done]
            ready.sort(key=lambda s: chain[s["out"]], reverse=True)  # the longest chain first
            if not (ready or running):
                raise RuntimeError(f"stages wait on each other: {[s['out'] for s in todo]}")
            for s in ready[: args.jobs - len(running)]:
                todo.remove(s)
                print(f"[start] {s['name']} -> {s['out']} ({threads} thread{'s' * (threads > 1)})", flush=True)
                running[pool.submit(fn, quiet, tok, tok_path, **s)] = s["out"]
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()  # raises a failed stage's error here
                done.add(running.pop(f))


def chain_steps(stages):
    """{out: (the stage's steps plus the most steps of a chain of stages that start from it, the
    steps of all the stages that follow from it, itself included)}: the stage heading the longest
    chain starts first, and of equal chains the one with the most work behind it. Run Q started
    Reviews' chain (SFT, oracle, FSPO) last, in list order, and one core sat idle for its last
    ten minutes. Steps stand in for time (a step of one method costs 0.6-1.6x another's here,
    run Q), and a cached stage counts its steps though it is skipped."""
    after = {s["out"]: [t for t in stages if s["out"] in (t.get("init"), t.get("ref"))] for s in stages}
    steps = {s["out"]: s.get("steps", 0) for s in stages}
    memo = {}

    def walk(out):  # -> (longest chain from out, the outs that follow from it)
        if out not in memo:
            memo[out] = (steps[out], {out})  # a cycle ends here; run_stages refuses it by name
            below = [walk(t["out"]) for t in after[out]]
            memo[out] = (steps[out] + max((c for c, _ in below), default=0), {out}.union(*(b for _, b in below)))
        return memo[out]

    return {s["out"]: (walk(s["out"])[0], sum(steps[o] for o in walk(s["out"])[1])) for s in stages}


def ensure_data(args, data_dir, domains):
    """Generate each domain the main job needs unless it is there. stats.json is the
    generator's last write: a domain without it is incomplete; one made with other generator
    settings (say, an older preset's), or that today's generator code writes otherwise, is
    refused, not reused."""
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
        synth.refuse_stale(os.path.dirname(stats_path), f"delete {os.path.dirname(stats_path)} to regenerate it")
    for argv in missing:
        print(f"[data] generating {argv[1]} ({args.scale} scale) into {data_dir}")
        synth.main(argv)


def main_job(args):
    """Data, tokenizer, then per domain and N: SFT, each stage-2 method, evaluation. With
    --prefs, the user's own file is the one domain (named after it) and nothing is generated."""
    out = args.out or os.path.join("runs", args.preset)
    t0 = time.time()
    if args.prefs:
        sources = {job_domains(args)[0]: (args.prefs, args.users)}
    else:
        data_dir = args.data or os.path.join(out, "data")
        ensure_data(args, data_dir, job_domains(args))
        sources = {d: (os.path.join(data_dir, d, "prefs.jsonl"), os.path.join(data_dir, d, "users.jsonl"))
                   for d in job_domains(args)}
    tok_path = os.path.join(out, "tokenizer.txt")
    tok = data.ensure_tokenizer(list(sources.values()), args.vocab_size, tok_path, trained_with)
    if args.prefs:  # after the tokenizer, whose refusal leaves the run dir as it was
        data.write_splits(args.prefs, out)
    runs, stages = {}, []  # stages: run_stage's keyword arguments, in training order
    for d, (prefs, users) in sources.items():
        first = {}  # the stages that learn the same at every N, trained at the domain's first N
        drop = domain_bpe_dropout(args, d)
        for n in domain_shots(args, d):
            base = os.path.join(out, f"{d}-{n}shot")
            methods = domain_methods(args, d, n)
            ckpts = {"sft": os.path.join(base, "sft"), **{m: p for m, p in first.items() if m in {"sft", *methods}}}
            if "sft" not in first:
                stages.append(dict(name="sft", out=ckpts["sft"], prefs=prefs, users=users, bpe_dropout=drop,
                                   shots=args.sft_shots or n, steps=stage_steps("sft", args)))
            for m in [m for m in stage_order(args, methods) if m not in first]:
                ckpts[m] = os.path.join(base, m)
                init, ref = (ckpts[k] if k else None for k in starts_from(args, m))
                stages.append(dict(name=m, out=ckpts[m], prefs=prefs, users=users, init=init, ref=ref,
                                   shots=n, steps=stage_steps(m, args), lr=stage_lr(m, args),
                                   bpe_dropout=drop))
            if not first:  # the domain's first N
                first = {m: p for m, p in ckpts.items() if same_at_every_n(m, args)}
            runs[(d, n)] = (ckpts, prefs, users)
    run_stages(args, tok, tok_path, stages)
    report = evaluation.evaluate_runs(runs, tok, tok_path, args, out)
    print(report)
    print(f"[done] main job took {time.time() - t0:.0f}s; report in {out}/report.md")


# ----------------------------------------------------------------------------------------
# Flags and presets

# Presets are overrides of the flag defaults. annotated: the main job's default without CUDA,
# the generator's default users (the paper's structure) on the cpu model; cpu: easy users, the
# teaching and smoke setting, and a lone stage's default; gpu: the main job's default with
# CUDA, the annotated design scaled up.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=1024, block_size=1024, shots=2,
                 batch_size=4, grad_accum=1, sft_steps=30, pref_steps=20, warmup=5,
                 lr=3e-3, pref_lr=1e-3, eval_every=10, ckpt_every=10, eval_episodes=16,
                 curve_episodes=16, scale="tiny",
                 domains="roleplay", methods="fspo,pooled", eval_users=4, eval_questions=2),
    # cpu: easier roleplay users (5 style axes, one writer, 2-4 traits, the chosen answer in
    # the user's style) and 4 shots. SFT sees 0-8 shots, so the pair-accuracy curve's 8-shot
    # column is a context length it has trained on, and runs 500 steps, into the loss drop
    # (~300-500) where the model learns to copy the question's subject: 700 steps and stage 2
    # at 800 ran 24 min, over the 20 the preset has. Stage 2 anchors the preference loss with the
    # chosen answer's NLL, without which greedy answers drift off-format (EXPERIMENTS.md,
    # "Easy users")
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=2048, block_size=1024, shots=4,
                batch_size=8, grad_accum=1, sft_steps=500, sft_shots=8, pref_steps=600, nll=10.0,
                warmup=50, lr=2e-3, pref_lr=5e-5, eval_every=100, ckpt_every=100, eval_episodes=128,
                curve_episodes=0, scale="default",
                synth="--pair-mode taste --axes formality,confidence,format,example,humor --writers 1 "
                      "--traits 2,3,4",
                domains="roleplay", methods="fspo,pooled", eval_users=150, eval_questions=2),
    # annotated: the generator's default users, the paper's structure, which the cpu recipe does
    # not learn, read through the shots' tally on the cpu model (EXPERIMENTS.md has each step):
    # a short SFT on 0-2 shot episodes (no lines to learn: the policy reads each shot itself at
    # evaluation, "The policy reads the shots itself"; the 4000-step SFT on 0-8 shots that wrote
    # them took 46 of the run's 81 minutes); oracle learns to apply a stated description (val
    # pair accuracy 83% at 2000 steps and 88% at 4000 at lr 3e-4, 88% at 2000 at 6e-4); FSPO
    # starts from it and reads the shots' counted tally alone ("Annotated shots": the tally with
    # signs only and the shots in the prompt read less); pooled's running metric is flat from
    # 1000 steps (val win rate 49.5 at 1000 steps, 51.9 at 1500, pair accuracy 49.4 at both).
    # Steps cut to 20 minutes: "Twenty minutes". "Batch 16": the same
    # episodes as batch 8 in half the steps took 0.9x a stage's time (the bare step costs the
    # same per episode on 2 threads, `python bench.py --only batch`; the work around each step
    # halves), which pays for an oracle on twice the episodes (val 0.90 against 0.83; FSPO then
    # names the technical axis on 84% of the shots where it differs, against 34%); the lrs of
    # stage 2 are batch 8's times sqrt(2)
    # group: batches padded to their longest episode were 40% padding in the SFT at 0-8 shots,
    # 22% in FSPO's tally episodes
    # eval_every: the running metric (256 val episodes) takes 2.6 s; every 250 steps it was 50 s a
    # stage; it is read for monitoring only (the checkpoint is the last step's)
    # mirror_pairs: each FSPO episode beside its mirror image in its batch, where --mirror 0.5 drew
    # them apart: the margin's offset per answer pair, which ignores the user, cancels in each
    # step ("Mirror pairs": val pair accuracy at 8 shots 0-1.6 points higher over two oracles);
    # oracle_pairs: the oracle's episodes too, beside the mirrored user's description (its running
    # metric 0.926 / 0.961 against 0.887 / 0.934, FSPO from it +0.5 / +0.7 at 8 shots on val, two seeds)
    # bpe_dropout on ELIX alone: its held-out concepts are written in tokens no training text holds
    # (roleplay's and Reviews' held-out texts have none); the ELIX oracle ranked 65.3% of 1,200 val
    # pairs without it, 85.6% with p = 0.03 in the SFT and the oracle, 82.8% with 0.1 in both
    # (EXPERIMENTS.md, "ELIX's held-out concepts")
    "annotated": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=2048, block_size=1024, shots=8,
                      batch_size=16, group=16, grad_accum=1, sft_steps=750, sft_shots=2, pref_steps=2500,
                      stage_steps="oracle:2000,pooled:500", oracle_lr=8.5e-4, fspo_init="oracle",
                      annotate="tally", mirror_pairs=True, oracle_pairs=True, nll=10.0,
                      warmup=50, lr=2e-3, pref_lr=4.2e-4, eval_every=1000, ckpt_every=100,
                      eval_episodes=256, curve_episodes=0, scale="default", synth="",
                      domains="roleplay", methods="oracle,fspo,pooled", eval_users=150,
                      eval_questions=2, bpe_dropout="elix:0.03"),
    # gpu: the annotated design on the larger model, roleplay (the domain it was measured on;
    # --domains adds ELIX and Reviews, as the paper preset trains them). Not yet run on a GPU: at batch
    # 32 each stage sees at least the annotated preset's episodes; its step counts are not
    # measured (EXPERIMENTS.md, "The gpu preset")
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, vocab_size=4096, block_size=2048,
                batch_size=32, grad_accum=1, sft_steps=4000, sft_shots=8, pref_steps=2000,
                stage_steps="oracle:1500", fspo_init="oracle", annotate="tally", mirror_pairs=True,
                oracle_pairs=True, nll=10.0, bpe_dropout="elix:0.03",
                warmup=150, lr=6e-4, pref_lr=2e-4, eval_every=250, ckpt_every=500,
                eval_episodes=512, curve_episodes=0, scale="default", synth="",
                domains="roleplay", compile=True, methods="oracle,fspo,pooled",
                eval_users=300, eval_questions=4),
}
# paper: the paper's three tables (README, "The paper's tables"): the annotated recipe on every
# domain at the paper's N (no shots: Reviews runs 4 and 8, its SFT and oracle trained once), each
# table's rows (Reviews' CoT at 8 shots only, as in the paper); pref-ft a shorter stage, cot-sft
# as long as the SFT (cot's description), cot's IPO as long as FSPO's (on val users 750 steps
# left roleplay's CoT below FSPO, 2,500 above it; on test, below in run P20, level in P21); two
# stages at once, one core each; its mirror images drawn per episode, as in run P17 (mirror
# pairs came after it); the report reads four questions per test user for the win rates and
# two draws of each user's shots for pair accuracy (run P21 read two and one: 8 of its 17
# orderings stood within their intervals, and 32 of the 90 minutes went unused). Run P23
# took 65 minutes on 2 cores
PRESETS["paper"] = {k: v for k, v in PRESETS["annotated"].items() if k != "shots"} | dict(
    mirror=0.5, mirror_pairs=None, oracle_pairs=None, eval_questions=4, curve_epochs=2,
    stage_steps=PRESETS["annotated"]["stage_steps"] + ",pref-ft:500,cot-sft:750", jobs=2,
    domains="roleplay,elix,reviews",
    methods="roleplay:oracle,fspo,fspo-dpo,pref-ft,pooled,cot-sft,cot elix:oracle,fspo,pref-ft "
            "reviews-4shot:oracle,fspo,pref-ft reviews-8shot:oracle,fspo,pref-ft,cot-sft,cot")
SHOTS = {"roleplay": [8], "elix": [4], "reviews": [4, 8]}  # the paper's N per domain
TRAINED = sorted(m for m, x in data.METHODS.items() if x.learns)  # --method choices


def stage_flags(a):
    """Flags of one training stage (the main job passes them on to every stage)."""
    a("--method", choices=TRAINED, default=None,
      help="train one stage; omitted: run the whole main job")
    a("--out", default=None, help="run dir (main job) or checkpoint dir (one stage)")
    a("--data", default=None, help="synthetic data dir (main job default: <out>/data)")
    a("--domain", default="roleplay", help="domain subdir of --data for one stage")
    a("--prefs", default=None, help="a preference JSONL of your own, any name (overrides --data/--domain; "
                                    "the main job trains and evaluates on it alone)")
    a("--users", default=None, help="users.jsonl in the generator's schema (cot, oracle, win rate)")
    a("--tokenizer", default=None, help="ranks file (default <out>/../tokenizer.txt)")
    a("--init", default=None, help="checkpoint to start from (stage 2); also the reference")
    a("--ref", default=None, help="reference checkpoint if not --init")
    a("--shots", type=int, default=None,
      help="N, shots in context (default: the paper's per domain, main job; 8, one stage)")
    a("--loss", choices=["ipo", "dpo"], default="ipo")
    a("--shot-pairs", type=int, default=None,
      help="stage 2: 1 = also score each shot's pair, seeing only the shots before it "
           "(N+1 pairs per episode for 1.3x the tokens at N=8)")
    a("--mirror", type=float, default=None,
      help="this share of training episodes swaps chosen and rejected in every shot and the "
           "query: the user's mirror image, so a rule that ignores the shots scores chance")
    a("--mirror-pairs", action=argparse.BooleanOptionalAction, default=None,
      help="every training episode beside its mirror image in the same batch (half the distinct "
           "episodes a batch; in place of --mirror's draw): a taste that ignores the shots cancels")
    a("--oracle-pairs", action=argparse.BooleanOptionalAction, default=None,
      help="the oracle's episodes too, each beside the mirrored user: every label swapped, every "
           "trait of the description negated")
    a("--bpe-dropout", default=None,
      help="BPE-dropout of the training texts, the probability a merge is skipped: one number, or "
           "one per domain ('elix:0.1'; a domain not named has none)")
    a("--describe", type=float, default=None,
      help="also learn to write notes (users file): after each shot the axes its two answers "
           "differ on, after the context the user's description; this weight times their "
           "token-mean NLL (0 = off)")
    a("--annotate", nargs="?", const=True, choices=["tally"], default=None,
      help="prompts that hold shots follow each shot with how its two answers differ and end "
           "the shots with their tally as the user description (the judge's, from the shots "
           "alone; users file); eval.py has the base model write them (README). '--annotate "
           "tally': stage 2 reads the tally alone, each axis named once per shot, no shot; at "
           "evaluation the policy counts it from its own reading of each shot")
    a("--context-loss", type=int, default=1,
      help="sft: 1 = also learn to predict the shots (the in-context reading a pretrained LLM brings)")
    a("--nll", type=float, default=None,
      help="stage 2: add this weight times the chosen completion's token-mean NLL to the "
           "preference loss (RPO's anchor; 0 = the paper's pure IPO/DPO)")
    a("--beta", type=float, default=0.1,
      help="IPO target margin is 1/(2 beta) nats of summed log-prob (paper: 0.01 at 3B)")
    a("--steps", type=int, default=None, help="optimizer steps (default: preset's)")
    a("--batch-size", type=int, default=None, help="episodes per micro-batch")
    a("--group", type=int, default=None,
      help="sort each K batches' episodes by length and cut them again: less padding, the "
           "same episodes (SFT methods: the pool's tokens share K steps' weight evenly; "
           "unset: off)")
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
    a("--ckpt-every", type=int, default=None)
    a("--log-every", type=int, default=10)
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (the gpu preset does; --no-compile turns it off)")
    a("--device", default=None, help="cpu | cuda (default: cuda if available)")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
      help="matmul dtype under autocast; auto = bf16 on CUDA, and on a CPU where a timed bf16 "
           "matmul beats float32 (model.cpu_bf16_faster); float32 otherwise")
    a("--seed", type=int, default=1337)
    a("--no-progress", action="store_true", help="no tqdm bars")


def main_job_flags(a):
    a("--preset", choices=PRESETS, default=None, help="tiny | cpu | gpu | annotated | paper (auto: the main job gpu with CUDA, "
                                                      "else annotated; one stage cpu)")
    a("--sft-steps", type=int, default=None, help="main job: steps of the SFT stage")
    a("--sft-shots", type=int, default=None,
      help="main job: the SFT stage's episodes hold 0..this many shots (default N), so the "
           "base model has also read contexts longer than stage 2 uses")
    a("--pref-lr", type=float, default=None, help="main job: peak lr of stage-2 methods")
    a("--pref-steps", type=int, default=None, help="main job: steps of each stage-2 method")
    a("--ema", default=None,
      help="keep an exponential moving average of the weights, written as the stage's weights: "
           "a decay per step ('0.998'), or per stage ('fspo:0.998'; fspo-dpo takes fspo's)")
    a("--stage-steps", default=None,
      help="main job: steps of named stages, 'oracle:2000,pooled:1000,fspo-dpo:2500' (merged over "
           "the preset's; a stage not named: --sft-steps for sft, a quarter of it for cot-sft, "
           "--pref-steps for the rest)")
    a("--oracle-lr", type=float, default=None,
      help="peak lr of oracle (main job, or --method oracle without --lr; default --pref-lr)")
    a("--fspo-init", choices=("sft", "oracle"), default=None,
      help="main job: the checkpoint FSPO (and Pref-FT, cot-sft) starts from: sft (the paper), or oracle, trained "
           "first with the user's description in its prompt (EXPERIMENTS.md, 'Annotated shots')")
    a("--methods", default=None, help="main job: comma list of stage-2 methods to train, or one "
                                      "per domain, or per domain and N: 'roleplay:oracle,fspo "
                                      "elix:fspo,pref-ft reviews-8shot:oracle,fspo,cot-sft,cot'")
    a("--domains", default=None, help="main job: comma list of domains")
    a("--jobs", type=int, default=None,
      help="main job on CPU: train up to this many independent stages at once, each in its own "
           "process on 1/jobs of the threads (default 1; the paper preset 2; one at a time on CUDA "
           "and under torchrun)")
    a("--scale", default=None, help="main job: generate_synthetic.py --scale")
    a("--synth", default=None, help="main job: more generate_synthetic.py flags, one string")
    a("--curve-episodes", type=int, default=None,
      help="main job: held-out episodes per pair-accuracy figure of the report (0 = all)")
    a("--curve-epochs", type=int, default=None,
      help="main job, with --curve-episodes 0: epochs of held-out episodes per figure (eval.py's; default 1)")
    a("--eval-users", type=int, default=None, help="held-out users in the win-rate eval")
    a("--eval-questions", type=int, default=None, help="held-out questions per user")
    a("--max-new-tokens", type=int, default=96, help="generation length cap in eval")
    a("--gen-batch", type=int, default=64, help="prompts per generation batch in eval")
    a("--temperature", type=float, default=None,
      help="win-rate answers sampled at this temperature (unset or 0: greedy, every preset's)")
    a("--top-k", type=int, default=None, help="with --temperature: sample from the k likeliest tokens")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    main_job_flags(p.add_argument)
    stage_flags(p.add_argument)
    args = p.parse_args(argv)
    if args.preset is None:  # annotated and gpu are chains of stages (README): a lone stage takes cpu's flags
        args.preset = ("gpu" if torch.cuda.is_available() else "annotated") if args.method is None else "cpu"
    lone_pref = args.method not in (None, "sft") and args.lr is None  # one stage-2 run, as the main job
    if args.stage_steps:  # named stages over the preset's, checked before any stage runs
        parse_stage_steps(args.stage_steps)
        args.stage_steps = ",".join(filter(None, [PRESETS[args.preset].get("stage_steps"), args.stage_steps]))
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    stage_ema("sft", args.ema)  # a malformed --ema stops here, before any stage runs
    if lone_pref:  # the preset's lr is the SFT's
        args.lr = stage_lr(args.method, args)
    args.nll = args.nll or 0.0  # presets without it: the paper's pure IPO / DPO
    args.curve_epochs = args.curve_epochs or 1
    args.describe = args.describe or None  # 0 = off = unset: a stage trained before the flag matches
    args.annotate = args.annotate or None
    args.group = args.group if (args.group or 0) > 1 else None  # 0 and 1 = off = unset, as describe
    args.mirror_pairs = args.mirror_pairs or None
    args.oracle_pairs = args.oracle_pairs or None
    if args.mirror_pairs and args.mirror:
        raise SystemExit(f"fspo.py: --mirror-pairs (the command's or the {args.preset} preset's) shows every "
                         f"episode beside its mirror image and goes without --mirror {args.mirror}: pass "
                         f"--mirror 0 or --no-mirror-pairs")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    if args.method is None:
        runs = [(d, n) for d in job_domains(args) for n in domain_shots(args, d)]
        keys = {e.split(":", 1)[0] for e in args.methods.split() if ":" in e}
        if bad := keys - {d for d, _ in runs} - {f"{d}-{n}shot" for d, n in runs}:
            raise SystemExit(f"fspo.py: --methods names {', '.join(sorted(bad))}, not a domain or "
                             f"domain-Nshot of this job ({', '.join(f'{d}-{n}shot' for d, n in runs)})")
        for d, n in runs:  # each stage's init is trained by the same run, before it
            methods = domain_methods(args, d, n)
            for m in methods:
                if (init := starts_from(args, m)[0]) not in {"sft", *methods}:
                    who = "--fspo-init oracle" if init == "oracle" else f"{m} starts from {init}, so it"
                    raise SystemExit(f"fspo.py: {who} needs {init} in --methods (domain {d}, {n} shots)")
        if args.annotate and args.prefs and not args.users:
            raise SystemExit("fspo.py: --annotate (the annotated preset's, the default without CUDA) needs "
                             "the users file (--users): the judge writes the training annotations from "
                             "the users' domain; for pairs without one, --preset cpu or tiny")
        return main_job(args)
    if args.out is None:
        raise SystemExit("fspo.py: --out is required with --method")
    prefs = args.prefs or os.path.join(args.data or "data", args.domain, "prefs.jsonl")
    users = args.users or os.path.join(os.path.dirname(prefs), "users.jsonl")
    users = users if os.path.exists(users) else None
    tok_path = args.tokenizer or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                              "tokenizer.txt")
    if args.tokenizer:  # given: used as it is
        tok = data.Tokenizer.load(tok_path)
    elif int(os.environ.get("RANK", 0)) > 0:  # under torchrun, rank 0 trains the tokenizer
        for _ in range(600):
            if os.path.exists(tok_path + ".json"):
                break
            time.sleep(1)
        tok = data.Tokenizer.load(tok_path)
    else:
        tok = data.ensure_tokenizer([(prefs, users)], args.vocab_size, tok_path, trained_with)
    args.shots = args.shots or 8
    args.steps = args.steps or stage_steps(args.method + "-dpo" * (args.loss == "dpo"), args)
    args.annotate = annotates(args.method, args) or args.annotate  # refused by make_streams if on for no shots
    args.oracle_pairs = stage_oracle_pairs(args, args.method, users)  # as the main job's stage records it
    args.bpe_dropout = domain_bpe_dropout(args, args.domain)
    final = train(args, tok, tok_path, prefs, users)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(final))


if __name__ == "__main__":
    main()
