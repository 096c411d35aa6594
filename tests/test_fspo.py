"""FSPO training: python -m pytest -q tests/test_fspo.py

Shared-context scoring against the naive two-sequence computation, label masking, resume
after SIGKILL, and 2-process DDP gradients against one process on the same global batch."""
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
import fspo
import generate_synthetic as synth
import model as M
from model import GPT, GPTConfig, load_checkpoint, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny roleplay data and a tokenizer trained on it."""
    d = tmp_path_factory.mktemp("fspo")
    synth.main(["--domain", "roleplay", "--out", str(d / "data"), "--scale", "tiny", "--seed", "0"])
    rp = d / "data" / "roleplay"
    data.train_tokenizer([(str(rp / "prefs.jsonl"), str(rp / "users.jsonl"))], 300, str(d / "tokenizer.txt"))
    return d


def episodes(tiny, n, shots=3, seed=0):
    tok = data.Tokenizer.load(str(tiny / "tokenizer.txt"))
    rows = data.by_user(data.load_prefs(str(tiny / "data" / "roleplay" / "prefs.jsonl")))
    eps = data.make_episodes(rows, shots, random.Random(seed))[:n]
    return tok, [data.encode_episode(tok, s, q, 1024) for s, q in eps]


def test_shared_context_equals_naive(tiny):
    tok, eps = episodes(tiny, 5)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)).eval()
    scorer = fspo.LogProbs(model)
    pw, pl = data.pair_logps(scorer, data.pack_batch(eps, tok.eot_id))
    naive = data.pack_naive(eps, tok.eot_id)
    lp = scorer(naive["idx"], naive["targets"], None, None).sum(1)  # (2B,)
    # sums of ~40 float32 log-probs of ~-6: float32 rounding alone is ~1e-6 relative
    assert torch.allclose(pw, lp[:5], rtol=1e-6, atol=1e-5)
    assert torch.allclose(pl, lp[5:], rtol=1e-6, atol=1e-5)
    # and each sum is the brute-force sum over completion tokens of a plain causal pass
    e = eps[0]
    seq = torch.tensor([e.ctx + e.chosen])
    logits, _ = model(seq)
    ref = torch.log_softmax(logits[0].double(), -1)
    want = sum(ref[len(e.ctx) - 1 + i, t].item() for i, t in enumerate(e.chosen))
    assert pw[0].item() == pytest.approx(want, rel=1e-5)


def test_context_labels_never_change_the_loss(tiny):
    tok, eps = episodes(tiny, 4)
    torch.manual_seed(0)
    policy = fspo.LogProbs(GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)))
    ref = fspo.LogProbs(GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)))
    b = data.pack_batch(eps, tok.eot_id)
    ctx = b["seg"] == 0
    assert (b["targets"][ctx] == -1).all() and (b["targets"][b["seg"] == 3] == -1).all()

    def loss(batch):
        pw, pl = data.pair_logps(policy, batch)
        rw, rl = data.pair_logps(ref, batch)
        return fspo.preference_loss(pw, pl, rw, rl, 0.1)[0].mean()

    base = loss(b)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # give context positions arbitrary labels: nothing may change
        t = b["targets"].clone()
        t[ctx] = torch.randint(0, tok.n_vocab, (int(ctx.sum()),), generator=g)
        assert loss({**b, "targets": t}).item() == base.item()
    # while changing one completion label does change it
    t = b["targets"].clone()
    i = (b["seg"][0] == 1).nonzero()[0].item()
    t[0, i] = (t[0, i] + 1) % tok.n_vocab
    assert loss({**b, "targets": t}).item() != base.item()


def test_describe_adds_its_weight_times_the_notes_nll(tiny):
    """--describe w: the loss is that of the batch without notes (IPO, or SFT's token-mean NLL
    over the completions) plus w times the notes' mean NLL, computed here by hand from logits."""
    tok, eps = episodes(tiny, 3)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)
    policy, ref = fspo.LogProbs(GPT(cfg)).eval(), fspo.LogProbs(GPT(cfg)).eval()
    args = Namespace(method="fspo", beta=0.1, loss="ipo", nll=0.0, describe=3.0)
    plain = data.pack_batch(eps, tok.eot_id)
    plain_eps = [dataclasses.replace(e) for e in eps]
    for e in eps:
        e.notes = [(len(e.ctx), tok.encode(data.COT_HEADER + "Prefers: formal.") + [tok.eot_id])]
    with torch.no_grad():
        base, _ = fspo.score_batch(policy, ref, plain, args)
        got, metrics = fspo.score_batch(policy, ref, data.pack_batch(eps, tok.eot_id), args)
        nll = []
        for e in eps:
            ids = e.notes[0][1]
            logits, _ = policy.gpt(torch.tensor([e.ctx + ids]))
            lp = torch.log_softmax(logits[0].double(), -1)
            nll += [-lp[len(e.ctx) - 1 + i, t].item() for i, t in enumerate(ids)]
    want = sum(nll) / len(nll)
    assert metrics["describe/nll"].item() == pytest.approx(want, rel=1e-4)
    assert got.item() == pytest.approx(base.item() + 3.0 * want, rel=1e-4)
    # SFT: the completions' token-mean NLL is taken over the completions alone, notes apart
    sft = Namespace(**{**vars(args), "method": "sft"})
    with torch.no_grad():
        base, _ = fspo.score_batch(policy, ref, data.pack_sft(plain_eps, tok.eot_id), sft)
        got, _ = fspo.score_batch(policy, ref, data.pack_sft(eps, tok.eot_id), sft)
    assert got.item() == pytest.approx(base.item() + 3.0 * want, rel=1e-4)


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def stage_args(tiny, out, *extra):
    return ["fspo.py", "--preset", "tiny", "--data", str(tiny / "data"),
            "--tokenizer", str(tiny / "tokenizer.txt"), "--out", str(out), "--no-progress", *extra]


def final_row(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f][-1]


def test_a_resumed_stage_keeps_the_dtype_auto_chose(tiny, monkeypatch):
    """--dtype auto is a timing on a CPU (model.cpu_bf16_faster), which a loaded machine can
    flip between two processes: the choice is made once, kept in the checkpoint, and a
    resumed run computes in it rather than mixing dtypes within one stage."""
    monkeypatch.setattr(M, "cpu_bf16_faster", lambda: True)  # this run's timing: bf16 wins
    out = tiny / "amp"
    fspo.main(stage_args(tiny, out, "--method", "sft", "--steps", "2", "--eval-every", "2")[1:])
    _, meta = load_checkpoint(str(out / "ckpt"))
    assert meta["amp"] == "bf16"
    monkeypatch.setattr(M, "cpu_bf16_faster", lambda: False)  # a later timing: fp32 wins
    args = lambda dtype, resume: Namespace(dtype=dtype, resume=resume)
    assert fspo.stage_amp(args("auto", True), "cpu", meta) == "bf16"   # resumed: as it began
    assert fspo.stage_amp(args("auto", False), "cpu", None) == "fp32"  # a new run times again
    assert fspo.stage_amp(args("fp32", True), "cpu", meta) == "fp32"   # an explicit dtype wins
    assert fspo.stage_amp(args("bf16", False), "cpu", None) == "bf16"


def test_ema_writes_the_average_of_each_steps_weights(tiny, monkeypatch):
    """--ema d: the stage writes a_T, a_t = d a_(t-1) + (1 - d) w_t from a_0 = w_0, the weights
    after each step; each w_t is read from a run of t steps (a constant lr after a one-step
    warmup makes step t the same in runs of any length). A run cut after step 2 and resumed
    writes the same average: the checkpoint carries it."""
    common = ["--dtype", "fp32", "--warmup", "1", "--min-lr-frac", "1", "--eval-every", "1000"]
    sft = lambda out, *extra: fspo.main(stage_args(tiny, tiny / out, "--method", "sft", *common, *extra)[1:])
    sft("ema_w0", "--steps", "1")
    weights = lambda out: {k: v for k, v in load_checkpoint(str(tiny / out / "ckpt"))[0].items()
                           if not k.startswith(("optim.", "rng.", "ema."))}
    for t in (1, 2, 3):
        sft(f"ema_w{t}", "--steps", str(t), "--init", str(tiny / "ema_w0"))
    w = [weights(f"ema_w{t}") for t in range(4)]
    sft("ema_avg", "--steps", "3", "--init", str(tiny / "ema_w0"), "--ema", "0.25")
    got, meta = weights("ema_avg"), load_checkpoint(str(tiny / "ema_avg" / "ckpt"))[1]
    assert meta["ema"] == 0.25 and set(got) == set(w[3])
    for k in got:
        want = w[0][k]
        for t in (1, 2, 3):
            want = 0.25 * want + 0.75 * w[t][k]
        assert torch.allclose(got[k], want, atol=1e-6), k
        assert not torch.allclose(got[k], w[3][k], atol=1e-6) or w[0][k].dim() < 2  # the average moved
    calls = []

    def stop_at_third(ema, model, decay, last, real=fspo.average):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in step 3")
        real(ema, model, decay, last)

    monkeypatch.setattr(fspo, "average", stop_at_third)
    with pytest.raises(RuntimeError):
        sft("ema_cut", "--steps", "3", "--init", str(tiny / "ema_w0"), "--ema", "0.25", "--ckpt-every", "1")
    monkeypatch.undo()
    sft("ema_cut", "--steps", "3", "--init", str(tiny / "ema_w0"), "--ema", "0.25", "--ckpt-every", "1", "--resume")
    cut = weights("ema_cut")
    assert all(torch.equal(cut[k], got[k]) for k in got)
    with pytest.raises(ValueError, match="ema"):  # a cached stage made without the average is stale
        sft("ema_w3", "--steps", "3", "--init", str(tiny / "ema_w0"), "--ema", "0.25", "--resume")


def test_oracle_pairs_reach_the_oracle_alone(tiny, monkeypatch):
    """--oracle-pairs pairs the oracle's training stream and no other stage's, and joins the
    oracle's recipe alone, in the main job and in a lone stage alike: the other stages stay
    cached whatever it says. Not on ELIX users (a level has no mirror image). The annotated
    and gpu presets set it, the paper preset not (its run P17 was made without)."""
    tok, rp = data.Tokenizer.load(str(tiny / "tokenizer.txt")), tiny / "data" / "roleplay"
    prefs, users = str(rp / "prefs.jsonl"), str(rp / "users.jsonl")
    assert fspo.get_args(["--preset", "annotated"]).oracle_pairs and fspo.get_args(["--preset", "gpu"]).oracle_pairs
    assert fspo.get_args(["--preset", "paper"]).oracle_pairs is None
    elix = tiny / "elix_users.jsonl"
    elix.write_text(json.dumps({"user_id": "e0", "domain": "elix", "group": "expert", "traits": {}}) + "\n")
    on = fspo.get_args(["--oracle-pairs"])
    assert [fspo.stage_oracle_pairs(on, "oracle", u) for u in (users, str(elix), None)] == [True, None, None]
    assert fspo.stage_oracle_pairs(on, "fspo", users) is None
    for flags, want in ((["--oracle-pairs"], {"oracle": True, "fspo": False}),
                        (["--mirror-pairs"], {"oracle": False, "fspo": True})):
        for name in want:
            args = fspo.get_args(stage_args(tiny, tiny / "op", "--method", name, *flags)[1:])
            assert fspo.make_streams(args, tok, prefs, users, "cpu")[0].paired == want[name], (flags, name)
    seen = {}

    def recipe(a, *rest):  # run_stage's stand-in for training: the flags the stage is made with
        seen[a.method] = a.oracle_pairs
        return {}
    monkeypatch.setattr(fspo, "train", recipe)
    args = fspo.get_args(stage_args(tiny, tiny / "op", "--oracle-pairs")[1:])
    for name in ("oracle", "fspo", "pooled"):
        fspo.run_stage(args, tok, str(tiny / "tokenizer.txt"), name, str(tiny / "op" / name), prefs, users)
    assert seen == {"oracle": True, "fspo": None, "pooled": None}
    seen.clear()
    for name in ("oracle", "fspo"):  # a lone stage, under the preset that sets the flag
        fspo.main(stage_args(tiny, tiny / "op" / f"lone_{name}", "--preset", "annotated", "--method", name)[1:])
    assert seen == {"oracle": True, "fspo": None}


def test_a_stage_reads_bpe_dropout_as_its_domains_probability(tiny, monkeypatch):
    """run_stage trains with the probability it is given (the main job's domain_bpe_dropout),
    or none: never with --bpe-dropout's text, which names domains ("elix:0.03")."""
    tok, rp = data.Tokenizer.load(str(tiny / "tokenizer.txt")), tiny / "data" / "roleplay"
    got = []
    monkeypatch.setattr(fspo, "train", lambda a, *rest: got.append(a.bpe_dropout) or {})
    args = fspo.get_args(stage_args(tiny, tiny / "bd", "--bpe-dropout", "elix:0.03")[1:])
    for i, p in enumerate((None, fspo.domain_bpe_dropout(args, "elix"), fspo.domain_bpe_dropout(args, "roleplay"))):
        fspo.run_stage(args, tok, str(tiny / "tokenizer.txt"), "fspo", str(tiny / "bd" / str(i)),
                       str(rp / "prefs.jsonl"), str(rp / "users.jsonl"), **({} if i == 0 else {"bpe_dropout": p}))
    assert got == [None, 0.03, None]


def test_resume_after_sigkill_matches_uninterrupted(tiny):
    common = ["--method", "sft", "--steps", "24", "--ckpt-every", "4", "--eval-every", "8"]
    full, cut = tiny / "full", tiny / "cut"
    r = run(stage_args(tiny, full, *common))
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([sys.executable, *stage_args(tiny, cut, *common)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:  # kill it once a mid-way checkpoint exists
        try:
            with open(cut / "ckpt" / "config.json") as f:
                if 8 <= json.load(f)["step"] < 24:
                    break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open(cut / "ckpt" / "config.json") as f:
        killed_at = json.load(f)["step"]
    assert killed_at < 24, "the run finished before it could be killed"
    r = run(stage_args(tiny, cut, *common, "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = final_row(full), final_row(cut)
    assert a["step"] == b["step"] == 24
    assert a == b
    wa, _ = load_checkpoint(str(full / "ckpt"))
    wb, _ = load_checkpoint(str(cut / "ckpt"))
    assert "wte.weight" in wa and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k != "rng.torch")


def test_ddp_two_processes_same_gradients_as_one(tiny):
    """One step with AdamW: exp_avg = (1 - beta1) * grad, saved in the checkpoint, so the two
    runs' gradients can be compared exactly where they were averaged."""
    sft = tiny / "sft_for_ddp"
    r = run(stage_args(tiny, sft, "--method", "sft", "--steps", "3"))
    assert r.returncode == 0, r.stderr
    common = ["--method", "fspo", "--init", str(sft), "--steps", "1", "--grad-accum", "2",
              "--eval-every", "1000", "--grad-clip", "1e9"]
    one, two = tiny / "one", tiny / "two"
    r = run(stage_args(tiny, one, *common))
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
             *stage_args(tiny, two, *common)], env=env)
    assert r.returncode == 0, r.stderr
    ga, _ = load_checkpoint(str(one / "ckpt"))
    gb, _ = load_checkpoint(str(two / "ckpt"))
    grads = [k for k in ga if k.endswith(".exp_avg")]
    assert grads
    for k in grads:
        assert torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-7), k
    assert final_row(one)["loss"] == pytest.approx(final_row(two)["loss"], rel=1e-5)


def running_metric_sets(tiny):
    """The tiny data's tokenizer, users, rows by split, a 2-shot fspo stage's args and its
    running metric's val sets (eval.held_out_sets)."""
    rp = tiny / "data" / "roleplay"
    tok = data.Tokenizer.load(str(tiny / "tokenizer.txt"))
    users = {u["user_id"]: u for u in map(json.loads, open(rp / "users.jsonl"))}
    rows = {s: data.by_user([r for r in data.load_prefs(str(rp / "prefs.jsonl")) if r.split == s])
            for s in data.SPLITS}
    args = fspo.get_args(["--preset", "tiny", "--method", "fspo", "--shots", "2", "--eval-episodes", "16"])
    return tok, users, rows, args, evaluation.held_out_sets(args, tok, rows, users, "cpu")


def test_running_metric_sets_same_queries_bare_and_the_left_out_family(tiny):
    """The val sets of the running metric: the bare set holds the N-shot set's query pairs token
    for token with a context of the question alone, and left_out marks exactly the episodes of
    users whose family has no training user (read from users.jsonl here)."""
    tok, users, rows, args, held = running_metric_sets(tiny)
    example = tok.encode("# Example")
    for full, bare in zip(held["batches"], held["bare"]):
        for b in range(len(full["idx"])):
            for seg in (1, 2):
                assert full["idx"][b][full["seg"][b] == seg].tolist() == bare["idx"][b][bare["seg"][b] == seg].tolist()
            ctx = bare["idx"][b][bare["seg"][b] == 0].tolist()
            assert not any(ctx[i:i + len(example)] == example for i in range(len(ctx)))
            assert (bare["seg"][b] == 0).sum() < (full["seg"][b] == 0).sum()
    families = {users[u]["family"] for u in rows["train"]}
    want = [users[u]["family"] not in families for u in sorted(rows["val"])]
    assert any(want), "the tiny data should hold left-out users"
    stream = data.EpisodeStream(tok, rows["val"], users, "fspo", 2, args.batch_size, args.block_size,
                                args.seed + 1, which="both")
    stream.batch(0)
    queries = [q.user_id for _, q in stream.episodes[:len(held["left_out"])]]
    assert held["left_out"].tolist() == [users[u]["family"] not in families for u in queries]


def test_running_metric_scores_the_frozen_reference_once_and_matches_naive_margins(tiny):
    """running_metrics keeps the reference's margins on its fixed batches after the first call:
    each call's accuracies equal those of log(pi/ref) margins scored pair by pair on the
    unshared layout (pack_naive), also after the policy has changed."""
    tok, *_, held = running_metric_sets(tiny)
    policy, ref = (GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)).eval() for _ in "ab")
    calls = []
    ref_scorer = lambda *a: calls.append(1) or ref.token_logprobs(*a)

    def naive_accuracy(key):  # pair by pair: chosen and rejected each with its context, no sharing
        hits = []
        for b in held[key]:
            for i in range(len(b["idx"])):
                ids = lambda s: b["idx"][i][b["seg"][i] == s].tolist()  # pack_batch's segments
                ep = data.Episode(ids(0) + ids(1)[:1], ids(1)[1:], ids(2)[1:])
                nb = data.pack_naive([ep], tok.eot_id)
                lp = [m.token_logprobs(nb["idx"], nb["targets"]).sum(1) for m in (policy, ref)]
                hits.append(float((lp[0][0] - lp[1][0]) - (lp[0][1] - lp[1][1]) > 0))
        return sum(hits) / len(hits)

    for _ in range(2):
        with torch.no_grad():
            row = evaluation.running_metrics(policy, ref_scorer, held, nullcontext())
            assert row["eval/pair_accuracy"] == pytest.approx(naive_accuracy("batches"))
            assert row["eval/pair_accuracy_0shot"] == pytest.approx(naive_accuracy("bare"))
            for p in policy.parameters():  # the policy moves on; the reference does not
                p.add_(0.05 * torch.randn_like(p))
    assert len(calls) == len(held["batches"]) + len(held["bare"])  # scored once, then kept


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A plain preference file that is not called prefs.jsonl, with no users.jsonl."""
    d = tmp_path_factory.mktemp("mine")
    rng = random.Random(1)
    with open(d / "mine.jsonl", "w") as f:
        for u in range(48):
            split = "train" if u < 32 else "val" if u < 40 else "test"
            for i in range(6):
                f.write(json.dumps({"user_id": f"m{u}", "prompt": f"ask {rng.randrange(9)}?",
                                    "chosen": f"yes {i}.", "rejected": f"no {i}.", "split": split}) + "\n")
    return d


def mine_args(mine, out, *extra):
    return ["fspo.py", "--preset", "tiny", "--prefs", str(mine / "mine.jsonl"), "--out", str(out),
            "--no-progress", "--ckpt-every", "2", "--log-every", "1", *extra]


def test_any_prefs_file_trains_its_own_tokenizer_and_a_done_stage_is_not_overwritten(mine):
    r = run(mine_args(mine, mine / "sft", "--method", "sft", "--steps", "4"))
    assert r.returncode == 0, r.stderr
    tok = data.Tokenizer.load(str(mine / "tokenizer.txt"))  # <out>/../tokenizer.txt, from mine.jsonl
    assert tok.decode(tok.encode("yes 3.")) == "yes 3." and len(tok.encode("yes")) == 1
    r = run(mine_args(mine, mine / "sft", "--method", "sft", "--steps", "4"))
    assert r.returncode != 0 and "already holds a checkpoint (step 4, done)" in r.stderr
    # other pairs beside that stage, as a lone stage or as a main job into a copy of its dir: the
    # tokenizer it was trained with is kept, and the run stops before it trains
    other, before = mine / "other.jsonl", (mine / "tokenizer.txt").read_bytes()
    other.write_text((mine / "mine.jsonl").read_text().replace("yes", "quokka"))
    r = run(mine_args(mine, mine / "sft2", "--method", "sft", "--steps", "4", "--prefs", str(other)))
    assert r.returncode != 0 and "were trained with it" in r.stderr
    copy = mine / "copy"  # a main job's layout: <out>/<domain>-<N>shot/<method>
    shutil.copytree(mine / "sft", copy / "mine-4shot" / "sft")
    for f in ("tokenizer.txt", "tokenizer.txt.json"):
        shutil.copy(mine / f, copy / f)
    r = run(mine_args(mine, copy, "--prefs", str(other)))
    assert r.returncode != 0 and "were trained with it" in r.stderr and str(copy / "mine-4shot" / "sft") in r.stderr
    assert (mine / "tokenizer.txt").read_bytes() == before == (copy / "tokenizer.txt").read_bytes()
    assert not (mine / "sft2").exists() and sorted(os.listdir(copy)) == ["mine-4shot", "tokenizer.txt",
                                                                         "tokenizer.txt.json"]


def test_describe_without_a_users_file_is_refused(mine):
    r = run(mine_args(mine, mine / "described", "--method", "sft", "--steps", "2", "--describe", "1"))
    assert r.returncode != 0 and "--describe needs the users file" in r.stderr
    assert not (mine / "described").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the main job's default preset is gpu")
def test_the_default_preset_without_cuda_is_annotated_for_the_main_job_and_cpu_for_one_stage():
    args = fspo.get_args([])
    assert (args.preset, args.annotate, args.fspo_init, args.shots, args.synth) == ("annotated", "tally", "oracle", 8, "")
    # one stage alone takes the cpu preset's plain flags: annotated is a chain of stages
    args = fspo.get_args(["--method", "fspo", "--out", "x"])
    assert (args.preset, args.annotate, args.shots, args.lr) == ("cpu", None, 4, 5e-5)


def test_with_cuda_the_main_job_takes_gpu_and_a_lone_stage_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = fspo.get_args([])
    assert (args.preset, args.annotate, args.fspo_init, args.n_embd, args.device) == ("gpu", "tally", "oracle", 512, "cuda")
    args = fspo.get_args(["--method", "fspo", "--out", "x"])  # gpu too is a chain of stages
    assert (args.preset, args.annotate, args.n_embd) == ("cpu", None, 128)
    assert fspo.get_args(["--method", "fspo", "--out", "x", "--preset", "gpu"]).annotate == "tally"


def test_no_compile_overrides_the_gpu_presets_compile():
    assert fspo.get_args(["--preset", "gpu"]).compile is True
    assert fspo.get_args(["--preset", "gpu", "--no-compile"]).compile is False


def test_the_gpu_presets_chain_runs_at_tiny_shapes(tmp_path):
    """The gpu preset's recipe (the annotated design: SFT, oracle, FSPO from the
    oracle reading the tally, pooled) end to end on CPU with the model and steps shrunk: its
    flags go together. What it reaches is for a GPU to measure."""
    shrink = ["--device", "cpu", "--no-compile", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
              "--vocab-size", "1024", "--block-size", "1024", "--batch-size", "2", "--sft-steps", "4",
              "--pref-steps", "2", "--stage-steps", "oracle:2", "--scale", "tiny", "--eval-users", "4",
              "--eval-questions", "1", "--curve-episodes", "8", "--no-progress"]
    r = subprocess.run([sys.executable, "fspo.py", "--preset", "gpu", "--out", str(tmp_path / "g"), *shrink],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert (res["domain"], res["shots"], res["tally_only"]) == ("roleplay", 8, ["fspo"])
    assert set(res["win_rate"]) == {"base", "prompted", "oracle", "fspo", "pooled"}
    fspo_args = json.loads((tmp_path / "g" / "roleplay-8shot" / "fspo" / "ckpt" / "config.json").read_text())["args"]
    assert fspo_args["init"].endswith("oracle") and fspo_args["ref"].endswith("sft")


def test_annotate_without_users_and_a_warm_start_without_oracle_are_refused(mine):
    r = run(mine_args(mine, mine / "annotated", "--method", "sft", "--steps", "2", "--annotate"))
    assert r.returncode != 0 and "--annotate needs the users file" in r.stderr
    assert not (mine / "annotated").exists()
    r = run(mine_args(mine, mine / "job", "--annotate"))  # the main job, before it writes anything
    assert r.returncode != 0 and "needs the users file (--users)" in r.stderr
    # the annotated preset (the default without CUDA): pairs without users are pointed to cpu
    r = run(["fspo.py", "--preset", "annotated", "--prefs", str(mine / "mine.jsonl"), "--out", str(mine / "job")])
    assert r.returncode != 0 and "needs the users file (--users)" in r.stderr and "--preset cpu" in r.stderr
    r = run(mine_args(mine, mine / "job", "--fspo-init", "oracle", "--methods", "fspo,pooled"))
    assert r.returncode != 0 and "--fspo-init oracle needs oracle in --methods" in r.stderr
    assert not (mine / "job").exists()


def test_annotate_on_a_method_without_shots_is_refused(tiny):
    r = run(stage_args(tiny, tiny / "annotated-pooled", "--method", "pooled", "--steps", "2", "--annotate"))
    assert r.returncode != 0 and "--annotate needs a method whose prompt holds shots" in r.stderr
    assert not (tiny / "annotated-pooled").exists()


def test_annotate_tally_gives_the_sft_no_lines_and_stage_2_the_tally():
    """Under --annotate tally the policy reads the shots itself at evaluation, so the SFT has no
    lines to learn (a lone SFT asked for them is refused); under --annotate it learns them."""
    args = fspo.get_args([])  # the annotated preset
    assert [fspo.annotates(m, args) for m in ("sft", "oracle", "pooled", "fspo", "fspo-dpo", "pref-ft")] == \
        [None, None, None, "tally", "tally", "tally"]
    args.annotate = True
    assert [fspo.annotates(m, args) for m in ("sft", "pooled", "fspo")] == [True, None, True]


def test_a_lone_sft_with_annotate_tally_is_refused(tiny):
    r = run(stage_args(tiny, tiny / "tally-sft", "--method", "sft", "--steps", "2", "--annotate", "tally"))
    assert r.returncode != 0 and "the SFT learns no lines" in r.stderr
    assert not (tiny / "tally-sft").exists()


def test_a_stage_trained_on_texts_of_an_older_format_is_refused():
    """data.text_format is one of a stage's inputs: a checkpoint trained before its texts changed
    (a roleplay description or tally saying "no examples"; an elix or reviews one saying "no
    examples" or "no ratings") is refused, not reused; one whose texts name no term (the SFT,
    pooled, a stage without --annotate reading bare shots, a file of the user's own) stays
    format 1, recorded or not."""
    assert [data.text_format(m, a, d) for m, a, d in [("fspo", "tally", "elix"), ("pref-ft", "tally", "elix"),
            ("cot", "tally", "roleplay"), ("fspo", "tally", "roleplay"), ("oracle", None, "roleplay"),
            ("oracle", None, "elix"), ("fspo", "tally", "reviews"), ("cot", None, "reviews"),
            ("fspo", None, "elix"), ("pooled", None, "roleplay"), ("sft", None, "roleplay"),
            ("fspo", "tally", "mine")]] == [4, 4, 3, 3, 3, 4, 4, 4, 1, 1, 1, 1]
    args = fspo.get_args(["--method", "fspo", "--annotate", "tally"])
    recipe = {k: getattr(args, k, None) for k in fspo.RECIPE + fspo.PREF_RECIPE}
    common = {"prefs": "ab", "tokenizer": "cd", "init": None}
    for domain, fmt in (("elix", 4), ("reviews", 4), ("roleplay", 3)):
        now = dict(common, text_format=data.text_format("fspo", "tally", domain))
        fspo.check_recipe({"args": recipe, "batch_group": 1, "inputs": now}, args, now, "x")  # the same: kept
        older = {"args": recipe, "batch_group": 1, "inputs": common}  # saved before the format was kept
        with pytest.raises(ValueError, match=f"text_format: 1 there, {fmt} now"):
            fspo.check_recipe(older, args, now, "x")


def test_a_run_dir_moved_whole_keeps_its_cache():
    """init and ref are compared as paths from the stage's own dir: the same run under another
    root is kept; a stage whose init is now another stage of the run is refused, naming init."""
    args = fspo.get_args(["--method", "fspo"])
    recipe = {k: getattr(args, k, None) for k in fspo.RECIPE + fspo.PREF_RECIPE}
    inputs = {"prefs": "ab", "tokenizer": "cd", "init": "ef", "text_format": 1}
    saved = {"args": recipe | {"out": "/old/run/x-4shot/fspo", "init": "/old/run/x-4shot/oracle",
                               "ref": "/old/run/x-4shot/sft"}, "batch_group": 1, "inputs": inputs}
    args.out, args.init, args.ref = "/new/copy/x-4shot/fspo", "/new/copy/x-4shot/oracle", "/new/copy/x-4shot/sft"
    fspo.check_recipe(saved, args, inputs, "x")  # moved whole: kept
    args.init = "/new/copy/x-4shot/sft"
    with pytest.raises(ValueError, match=r"init: '\.\./oracle' there, '\.\./sft' now"):
        fspo.check_recipe(saved, args, inputs, "x")


def test_a_stage_on_a_retrained_init_is_refused(mine):
    common = ["--method", "fspo", "--steps", "2", "--init", str(mine / "init")]
    assert run(mine_args(mine, mine / "init", "--method", "sft", "--steps", "2")).returncode == 0
    r = run(mine_args(mine, mine / "pref", *common))
    assert r.returncode == 0, r.stderr
    shutil.rmtree(mine / "init")  # SFT retrained under the same path, with another seed
    assert run(mine_args(mine, mine / "init", "--method", "sft", "--steps", "2", "--seed", "5")).returncode == 0
    r = run(mine_args(mine, mine / "pref", *common, "--resume"))
    assert r.returncode != 0 and "pref was trained with other settings or inputs (init:" in r.stderr


def test_a_preference_stage_groups_and_an_ungrouped_one_is_not_resumed_as_grouped(mine):
    """--group on a stage-2 method groups its stream (the checkpoint records the grouping its
    batches had); a stage-2 checkpoint from before stage 2 grouped (no record: its batches were
    as drawn whatever --group said) is refused under --group, not resumed as if grouped."""
    common = ["--method", "fspo", "--steps", "2", "--init", str(mine / "g_init"), "--group", "4"]
    assert run(mine_args(mine, mine / "g_init", "--method", "sft", "--steps", "2")).returncode == 0
    r = run(mine_args(mine, mine / "g_pref", *common))
    assert r.returncode == 0, r.stderr
    cfg = mine / "g_pref" / "ckpt" / "config.json"
    meta = json.loads(cfg.read_text())
    assert meta["batch_group"] == 4 and meta["args"]["group"] == 4
    del meta["batch_group"]  # as an older stage-2 checkpoint was written
    meta["done"] = False
    cfg.write_text(json.dumps(meta))
    r = run(mine_args(mine, mine / "g_pref", *common, "--resume"))
    assert r.returncode != 0 and "group: None there, 4 now" in r.stderr, r.stderr[-2000:]


def test_resume_after_a_crash_between_renames_and_a_cut_metrics_line(mine, monkeypatch):
    """A save that crashed after moving ckpt to ckpt.old leaves only ckpt.old: resume from
    it, not from step 0; a metrics line cut short by the crash is dropped, not fatal."""
    full, cut = mine / "full", mine / "cut"
    common = ["--method", "sft", "--steps", "6"]
    assert run(mine_args(mine, full, *common)).returncode == 0
    swaps, rename = [], Path.rename

    def crash_at_second_swap(self, target):  # saves at steps 2, 4, 6; crash inside step 4's
        if self.name.endswith(".tmp"):
            swaps.append(self)
            if len(swaps) == 2:
                raise RuntimeError("simulated crash between the renames")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_at_second_swap)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fspo.main(mine_args(mine, cut, *common)[1:])
    monkeypatch.undo()
    assert not (cut / "ckpt").exists() and (cut / "ckpt.old").exists()
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the crash cut this line short
    r = run(mine_args(mine, cut, *common, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "from step 2" in r.stdout
    assert final_row(full) == final_row(cut)
    with open(full / "metrics.jsonl") as a, open(cut / "metrics.jsonl") as b:
        assert a.read() == b.read()


def test_unknown_model_key_in_config_json_names_file_and_key(mine):
    assert run(mine_args(mine, mine / "cfg", "--method", "sft", "--steps", "2")).returncode == 0
    cfg = mine / "cfg" / "ckpt" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["model"]["n_layers"] = 3
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"cfg/ckpt/config.json: field 'model' has unknown key 'n_layers'"):
        load_model(str(mine / "cfg" / "ckpt"))


def one_row(path):
    """A preference file of one training row, whose word "zebra" a test swaps for another."""
    path.write_text(json.dumps({"user_id": "u", "prompt": "q?", "chosen": "zebra zebra", "rejected": "b",
                                "split": "train"}) + "\n")


def test_tokenizer_is_retrained_when_its_data_changes(tmp_path):
    p = tmp_path / "prefs.jsonl"
    one_row(p)
    first = data.ensure_tokenizer([(str(p), None)], 300, str(tmp_path / "tok.txt"))
    assert data.ensure_tokenizer([(str(p), None)], 300, str(tmp_path / "tok.txt")).sha256 == first.sha256
    p.write_text(p.read_text().replace("zebra", "quokka"))
    again = data.ensure_tokenizer([(str(p), None)], 300, str(tmp_path / "tok.txt"))
    assert again.sha256 != first.sha256 and len(again.encode(" quokka")) == 1


def test_a_tokenizer_saved_without_its_stamp_is_not_taken_for_the_old_datas(tmp_path, monkeypatch):
    """A crash between the new tokenizer and its record of the data: the old data's record is
    gone, so a rerun on the old data retrains rather than take the new data's vocabulary."""
    p, tok_path = tmp_path / "prefs.jsonl", str(tmp_path / "tok.txt")
    one_row(p)
    first = data.ensure_tokenizer([(str(p), None)], 300, tok_path)
    p.write_text(p.read_text().replace("zebra", "quokka"))
    write = data.atomic_write
    def crash_at_the_stamp(path, text):
        if path.endswith(".json"):
            raise KeyboardInterrupt
        write(path, text)
    monkeypatch.setattr(data, "atomic_write", crash_at_the_stamp)
    with pytest.raises(KeyboardInterrupt):
        data.ensure_tokenizer([(str(p), None)], 300, tok_path)
    monkeypatch.undo()
    assert data.Tokenizer.load(tok_path).sha256 != first.sha256  # the new data's, saved
    p.write_text(p.read_text().replace("quokka", "zebra"))
    assert data.ensure_tokenizer([(str(p), None)], 300, tok_path).sha256 == first.sha256


def test_a_tokenizer_a_stage_was_trained_with_is_not_overwritten(tmp_path):
    """New data in a run dir whose stages used its tokenizer: refused before the file changes
    (the stage's checkpoint would lose the meaning of its token ids); one no stage used is retrained."""
    p, tok_path = tmp_path / "prefs.jsonl", str(tmp_path / "run" / "tokenizer.txt")
    one_row(p)
    ensure = lambda: data.ensure_tokenizer([(str(p), None)], 300, tok_path, fspo.trained_with)
    first = ensure()
    ckpt = tmp_path / "run" / "roleplay-8shot" / "sft" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"tokenizer_sha256": first.sha256}))
    before = Path(tok_path).read_bytes()
    assert ensure().sha256 == first.sha256  # the same data: kept, whoever uses it
    p.write_text(p.read_text().replace("zebra", "quokka"))
    with pytest.raises(ValueError, match="roleplay-8shot/sft"):
        ensure()
    assert Path(tok_path).read_bytes() == before
    # not a stage of this tokenizer: one of another vocabulary, a config that does not read, and a
    # run of its own (its own tokenizer) one level down, whatever vocabulary its stages used
    (ckpt / "config.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    (tmp_path / "run" / "junk" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "junk" / "ckpt" / "config.json").write_text("")
    sub = tmp_path / "run" / "sub"
    (sub / "sft" / "ckpt").mkdir(parents=True)
    (sub / "sft" / "ckpt" / "config.json").write_text(json.dumps({"tokenizer_sha256": first.sha256}))
    (sub / "tokenizer.txt").write_bytes(before)
    assert fspo.trained_with(tok_path) == []
    quokka = ensure()
    assert len(quokka.encode(" quokka")) == 1
    (sub / "tokenizer.txt").unlink()  # without its own, sub/sft is this run's <domain>-<N>shot/<method>
    (sub / "sft" / "ckpt" / "config.json").write_text(json.dumps({"tokenizer_sha256": quokka.sha256}))
    p.write_text(p.read_text().replace("quokka", "zebra"))
    with pytest.raises(ValueError, match="sub/sft"):
        ensure()


def test_a_lone_oracle_stage_takes_the_presets_oracle_lr():
    """--method oracle without --lr runs at the preset's oracle lr, as the main job's oracle;
    other stage-2 methods at its pref_lr; --lr and --oracle-lr override."""
    lr = lambda *a: fspo.get_args(["--preset", "annotated", *a]).lr
    p = fspo.PRESETS["annotated"]
    assert p["oracle_lr"] != p["pref_lr"]
    assert lr("--method", "oracle") == p["oracle_lr"] and lr("--method", "fspo") == p["pref_lr"]
    assert lr("--method", "oracle", "--oracle-lr", "1e-5") == 1e-5 and lr("--method", "oracle", "--lr", "2e-5") == 2e-5


def test_every_preset_setting_reaches_the_args():
    """A preset fills the flags left unset (None): a flag with a default of its own would keep
    it and drop the preset's value without a word (the paper preset's curve_epochs did)."""
    for name, preset in fspo.PRESETS.items():
        args = vars(fspo.get_args(["--preset", name]))
        for k, v in preset.items():
            assert args[k] == v, (name, k, args[k], v)
    assert fspo.get_args(["--preset", "paper"]).curve_epochs == 2 and fspo.get_args(["--preset", "cpu"]).curve_epochs == 1


def test_bpe_dropout_reaches_the_training_stream_and_not_the_running_metric(tiny):
    """A stage's --bpe-dropout writes its training batches in pieces; the val users' running
    metric is scored on the plain tokens evaluation uses."""
    tok, rp = data.Tokenizer.load(str(tiny / "tokenizer.txt")), tiny / "data" / "roleplay"
    prefs, users = str(rp / "prefs.jsonl"), str(rp / "users.jsonl")
    streams = {}
    for p in ("0", "0.3"):
        args = fspo.get_args(stage_args(tiny, tiny / "bd", "--method", "fspo", "--bpe-dropout", p)[1:])
        args.bpe_dropout = fspo.domain_bpe_dropout(args, "roleplay")
        streams[p] = fspo.make_streams(args, tok, prefs, users, "cpu")
    (plain, held0), (dropped, held1) = streams["0"], streams["0.3"]
    assert not torch.equal(plain.batch(0)["seg"], dropped.batch(0)["seg"])
    assert all(torch.equal(a["idx"], b["idx"]) for a, b in zip(held0["batches"], held1["batches"]))
    # a stage trained without it (or before the flag) is not reused under it, nor the reverse
    saved = {"args": {k: getattr(args, k, None) for k in fspo.RECIPE + fspo.PREF_RECIPE}, "batch_group": 1,
             "inputs": {"text_format": 1}}
    fspo.check_recipe(saved, args, {"text_format": 1}, "x")
    with pytest.raises(ValueError, match="bpe_dropout: None there, 0.3 now"):
        fspo.check_recipe(dict(saved, args=dict(saved["args"], bpe_dropout=None)), args, {"text_format": 1}, "x")
