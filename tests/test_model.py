"""
Each piece of model.py against an independent reference: a hand-written attention, brute
force loops over prefixes, the same tokens run without packing, hand-counted parameters.

    python -m pytest -q tests/test_model.py
"""
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model as M  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def tiny_model(seed=0, std=0.5, **overrides):
    # Weights much larger than GPT-2's 0.02 spread the logits, so greedy choices are not
    # near-ties and a wrong position or mask changes the output.
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32),
                       **overrides})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


# ---------------------------------------------------------------------------- attention

def complex_rotate(x, pos, base=10000.0):
    # rotary embedding as complex multiplication: pair (x_i, x_{i+hs/2}) is x_i + j x_{i+hs/2},
    # turned by e^{j pos theta_i}, theta_i = base^(-2i/hs); x (..., T, hs), pos (T,)
    hs = x.size(-1)
    theta = torch.tensor([base ** (-2 * i / hs) for i in range(hs // 2)], dtype=torch.float64)
    z = torch.complex(x[..., :hs // 2].double(), x[..., hs // 2:].double())
    z = z * torch.polar(torch.ones(len(pos), hs // 2, dtype=torch.float64),
                        pos.double()[:, None] * theta)  # (T, hs/2)
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def manual_attention(attn, x, mask):
    # masked softmax attention written out, positions 0..T-1; mask (B, 1, T, T) bool,
    # True = may attend
    B, T, C = x.shape
    hs = C // attn.n_head
    q, k, v = (t.view(B, T, attn.n_head, hs).transpose(1, 2) for t in attn.c_attn(x).split(C, 2))
    q, k = complex_rotate(q, torch.arange(T)), complex_rotate(k, torch.arange(T))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


@torch.no_grad()
def test_sdpa_matches_manual_attention():
    model = tiny_model()
    attn = model.blocks[0].attn
    B, T = 3, 10
    x = torch.randn(B, T, 32)
    rope = (model.cos[None, None, :T], model.sin[None, None, :T])  # positions 0..T-1
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    torch.testing.assert_close(attn(x, rope), manual_attention(attn, x, causal), atol=1e-5, rtol=1e-5)
    custom = torch.rand(B, 1, T, T) < 0.4
    custom |= torch.eye(T, dtype=torch.bool)  # every query keeps at least itself
    torch.testing.assert_close(attn(x, rope, custom), manual_attention(attn, x, custom),
                               atol=1e-5, rtol=1e-5)
    only_self = torch.eye(T, dtype=torch.bool).expand(B, 1, T, T)
    y = attn(x, rope, only_self)
    assert not y.isnan().any()
    torch.testing.assert_close(y, manual_attention(attn, x, only_self), atol=1e-5, rtol=1e-5)
    # a mask of the last 4 queries only: the 6 before them attend causally
    tail = custom[:, :, 6:]
    full = torch.cat([causal[:, :, :6], tail], dim=2)  # (B, 1, T, T)
    torch.testing.assert_close(attn(x, rope, tail), manual_attention(attn, x, full),
                               atol=1e-5, rtol=1e-5)


def test_attend_runs_cpu_bf16_attention_in_float32():
    # model.attend under CPU bf16 autocast: the result is the float64 attention of the bf16
    # inputs rounded once to bf16 (a bf16 softmax would round inside), and gradients flow back
    torch.manual_seed(0)
    B, nh, T, hs = 2, 2, 64, 16
    q, k, v = (torch.randn(B, nh, T, hs).bfloat16().requires_grad_() for _ in range(3))
    keep = torch.rand(B, 1, 8, T) < 0.5
    keep[..., -8:] |= torch.eye(8, dtype=torch.bool)  # the last 8 queries keep themselves
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))  # as GPT.hidden builds it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal = M.attend(q, k, v, is_causal=True)
        tail = M.attend(q[:, :, -8:], k, v, attn_mask=additive)
    att = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    want = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ v.double()
    want_tail = att[:, :, -8:].masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()
    for got, ref in ((causal, want), (tail, want_tail)):
        assert got.dtype == torch.bfloat16
        ulp = ref.abs().clamp_min(2 ** -8) * 2 ** -7  # bf16 keeps 8 significant bits
        assert ((got.double() - ref).abs() <= ulp).all()
    (causal.float().sum() + tail.float().sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.isfinite().all()
               for t in (q, k, v))


@torch.no_grad()
def test_rotary_matches_complex_rotation_and_sees_only_offsets():
    x = torch.randn(2, 3, 7, 16)  # (B, nh, T, hs)
    pos = torch.tensor([0, 1, 2, 5, 40, 63, 9])
    cos, sin = M.rotary_tables(64, 16)
    torch.testing.assert_close(M.rotate(x, cos[pos], sin[pos]), complex_rotate(x, pos),
                               atol=1e-5, rtol=1e-5)
    # q at m and k at n score the same as q at m+s and k at n+s
    q, k = torch.randn(2, 16), torch.randn(2, 16)
    m, n, s = torch.tensor([9, 4]), torch.tensor([3, 4]), 30
    score = (M.rotate(q, cos[m], sin[m]) * M.rotate(k, cos[n], sin[n])).sum(-1)
    shifted = (M.rotate(q, cos[m + s], sin[m + s]) * M.rotate(k, cos[n + s], sin[n + s])).sum(-1)
    torch.testing.assert_close(score, shifted, atol=1e-5, rtol=1e-5)
    # so a whole model's output does not move when every position moves by the same amount
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(model(idx, pos=torch.arange(12) + 37)[0], model(idx)[0],
                               atol=1e-4, rtol=1e-5)
    assert not any("cos" in k or "sin" in k for k in M.model_tensors(model))  # not saved


@torch.no_grad()
def test_mask_and_positions_equal_running_segments_apart():
    # One row [ctx | a | b] where b restarts a's positions and cannot see a must compute
    # what [ctx | a] and [ctx | b] compute as plain causal sequences.
    model = tiny_model()
    ctx, a, b = (torch.randint(0, 50, (2, n)) for n in (4, 3, 5))
    idx = torch.cat([ctx, a, b], 1)  # (2, 12)
    seg = torch.tensor([0] * 4 + [1] * 3 + [2] * 5)
    pos = torch.cat([torch.arange(7), torch.arange(4, 9)]).expand(2, 12)
    q, k = seg[:, None], seg[None, :]
    mask = torch.ones(12, 12, dtype=torch.bool).tril() & ((k == 0) | (k == q))  # (12, 12)
    mask = mask.expand(2, 1, 12, 12)
    packed, _ = model(idx, pos=pos, mask=mask)
    alone_a, _ = model(torch.cat([ctx, a], 1))
    alone_b, _ = model(torch.cat([ctx, b], 1))
    # logits reach ~10 with these weights, so float32 rounding is ~1e-5 of that
    torch.testing.assert_close(packed[:, :7], alone_a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], alone_b[:, 4:], atol=1e-4, rtol=1e-5)
    # and the log-probs read through the same mask
    targets = torch.full((2, 12), -1)
    targets[:, 7:11] = b[:, 1:]
    lp = model.token_logprobs(idx, targets, pos=pos, mask=mask)
    ref = alone_b[:, 4:8].log_softmax(-1).gather(-1, b[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp[:, 7:11], ref, atol=1e-5, rtol=1e-5)


def ragged_episodes(seed, n):
    # contexts, chosen and rejected of different lengths in every row; row 0 has a one-token
    # context (no segment 0 at all) and the longest rejected
    g = torch.Generator().manual_seed(seed)
    toks = lambda lo, hi: torch.randint(0, 50, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                        generator=g).tolist()
    eps = [data.Episode(toks(1, 20), toks(1, 12), toks(1, 12)) for _ in range(n)]
    eps[0] = data.Episode(toks(1, 1), toks(1, 1), toks(14, 14))
    return eps


@pytest.mark.parametrize("multiple", [1, 8])
def test_packed_batch_equals_each_sequence_alone(multiple):
    # pack_batch's row (context, chosen, then rejected at the end under the tail mask) must
    # give each completion the log-probs, and the gradients, of running ctx + completion alone
    # as a plain causal sequence (pack_naive's rows), summed in float64 as the reference
    model = tiny_model(seed=3, std=0.2)
    for seed in range(3):
        eps = ragged_episodes(seed, 6)
        b = data.pack_batch(eps, pad_id=49, multiple=multiple)
        assert b["idx"].size(1) % multiple == 0 and b["mask"].size(2) < b["idx"].size(1)
        lp = model.token_logprobs(b["idx"], b["targets"], pos=b["pos"], mask=b["mask"])
        chosen, rejected = data.sequence_logps(lp, b["seg"])
        g_packed = torch.autograd.grad((chosen - 2 * rejected).sum(), model.parameters())
        ref = []
        for e in eps:
            for y in (e.chosen, e.rejected):
                logits, _ = model(torch.tensor([e.ctx + y]))
                lps = logits[0, len(e.ctx) - 1:-1].double().log_softmax(-1)  # predicts y
                ref.append(lps.gather(-1, torch.tensor(y)[:, None]).sum())
        ref = torch.stack(ref).view(len(eps), 2)
        g_alone = torch.autograd.grad((ref[:, 0] - 2 * ref[:, 1]).sum(), model.parameters())
        # sums of up to 14 float32 log-probs of ~-5: float32 rounding is ~1e-5 of them
        torch.testing.assert_close(chosen.double(), ref[:, 0].detach(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rejected.double(), ref[:, 1].detach(), atol=1e-4, rtol=1e-5)
        for gp, ga in zip(g_packed, g_alone):
            torch.testing.assert_close(gp, ga.float(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bf16_autocast_logps_near_float32():
    # bf16 keeps 8 significant bits, so every matmul output is off by up to 2^-9 relative;
    # with these weights the logits reach ~4, and two layers of such roundings move a
    # token's log-prob by ~0.01 nats (measured: at most 0.012). Allowed: 0.03 nats per
    # token in a sum, and 1% of the sum. A wrong mask or position under autocast moves
    # the sums by whole nats.
    model = tiny_model(seed=3, std=0.2)
    for seed in range(3):
        b = data.pack_batch(ragged_episodes(seed, 6), pad_id=49)
        args = b["idx"], b["targets"], b["pos"], b["mask"]
        fp32 = data.sequence_logps(model.token_logprobs(*args), b["seg"])
        with M.autocast("cpu", "bf16"):
            lp = model.token_logprobs(*args)
            bf16 = data.sequence_logps(lp, b["seg"])
        assert lp.dtype == torch.float32
        for s, lo, hi in zip((1, 2), bf16, fp32):
            n = ((b["seg"] == s) & (b["targets"] != -1)).sum(-1)  # (B,) tokens in each sum
            assert (lo != hi).any()  # bf16 really ran
            assert ((lo - hi).abs() <= 0.03 * n).all() and ((lo - hi).abs() <= 0.01 * hi.abs()).all()


def test_amp_dtype_follows_the_probe(monkeypatch):
    assert M.amp_dtype("cpu", "fp32") == torch.float32 and M.amp_dtype("cuda", "fp32") == torch.float32
    assert M.amp_dtype("cpu", "bf16") == torch.bfloat16 and M.amp_dtype("cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        M.amp_dtype("cpu", "fp16")
    for fast in (True, False):
        monkeypatch.setattr(M, "cpu_bf16_faster", lambda: fast)
        assert M.amp_dtype("cpu") == (torch.bfloat16 if fast else torch.float32)
    assert isinstance(M.autocast("cpu", "fp32"), nullcontext)
    assert isinstance(M.autocast("cpu", "bf16"), torch.autocast)


def test_bf16_probe_leaves_the_global_rng_alone():
    """--dtype auto times a matmul once per process; drawing its matrix from the global RNG
    made auto and fp32 runs of one seed start from different weights (measured: SFT losses
    3.9806 vs 3.9674 at step 10 of the in-context test's data)."""
    M.cpu_bf16_faster.cache_clear()
    torch.manual_seed(0)
    M.cpu_bf16_faster(n=16, reps=1)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))


# ---------------------------------------------------------------------------- log-probs

def test_token_logprobs_match_prefix_loop():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 12))
    targets = torch.randint(0, 50, (2, 12))
    targets[0, :5] = -1
    targets[1, 3:9] = -1
    lp = model.token_logprobs(idx, targets)
    assert lp.dtype == torch.float32 and lp.shape == (2, 12)
    with torch.no_grad():
        for b in range(2):
            for t in range(12):
                if targets[b, t] == -1:
                    assert lp[b, t] == 0.0
                    continue
                logits, _ = model(idx[b:b + 1, :t + 1])  # the prefix alone
                ref = logits[0, -1].double().log_softmax(-1)[targets[b, t]]
                assert abs(lp[b, t].item() - ref.item()) < 1e-5
    keep = targets != -1
    _, loss = model(idx, targets)
    torch.testing.assert_close(loss, -lp[keep].mean())
    lp.sum().backward()  # training differentiates through it
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_init_loss_near_uniform_and_scaled_init():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=256, n_layer=8, n_head=4, n_embd=64)
    model = GPT(cfg)
    idx, targets = torch.randint(0, 256, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(256)) < 0.1
    assert model.lm_head.weight is model.wte.weight
    attn_proj = model.blocks[0].attn.c_proj.weight
    assert abs(attn_proj.std().item() / (0.02 / math.sqrt(2 * 8)) - 1) < 0.1
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() / 0.02 - 1) < 0.1


def test_param_count_and_flops_by_hand():
    cfg = GPTConfig(block_size=64, vocab_size=50, n_layer=3, n_head=2, n_embd=32)
    V, L, C = 50, 3, 32
    model = GPT(cfg)
    per_layer = 3 * C * C + C * C + 2 * 4 * C * C + 2 * C  # qkv, proj, mlp, two LN weights
    n = V * C + L * per_layer + C  # tied wte/lm_head counted once, final LN; rotary has none
    assert model.num_params() == n
    assert model.flops_per_token(16) == 6 * n + 12 * L * C * 16


# ---------------------------------------------------------------------------- generation

def brute_greedy(model, prompt, n, eos_id=None):
    # no cache, no padding: rerun the whole sequence for every token
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            tok = logits[0, -1].argmax().item()
            if tok == eos_id:
                break
            out.append(tok)
            seq.append(tok)
    return out


PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35, 8], [7], [27, 18, 28, 18, 28]]


def test_cached_greedy_equals_brute_force():
    model = tiny_model()
    for p in PROMPTS:
        assert model.generate([p], 20, temperature=0) == [brute_greedy(model, p, 20)]
    # the cache filled to the last position block_size allows
    p = PROMPTS[0]
    assert model.generate([p], 64 - len(p), temperature=0) == [brute_greedy(model, p, 64 - len(p))]
    with pytest.raises(ValueError, match="block_size"):
        model.generate([p], 64 - len(p) + 1, temperature=0)
    assert model.generate(PROMPTS, 0) == [[], [], []]


def test_ragged_batch_equals_each_prompt_alone():
    model = tiny_model(seed=1)
    alone = [model.generate([p], 20, temperature=0)[0] for p in PROMPTS]
    assert model.generate(PROMPTS, 20, temperature=0) == alone
    assert alone == [brute_greedy(model, p, 20) for p in PROMPTS]
    same_len = torch.tensor([PROMPTS[0][:5], PROMPTS[2]])  # (B, T) tensor input
    assert model.generate(same_len, 10, temperature=0) == \
        [brute_greedy(model, p, 10) for p in same_len.tolist()]


def test_each_row_stops_at_eos():
    model = tiny_model(seed=2)
    full = model.generate(PROMPTS, 30, temperature=0)
    eos = full[1][3]
    expected = [f[:f.index(eos)] if eos in f else f for f in full]
    assert model.generate(PROMPTS, 30, temperature=0, eos_id=eos) == expected
    assert expected[1] == brute_greedy(model, PROMPTS[1], 30, eos_id=eos)
    # a lone row stops the loop at its eos: prefill + one step per token kept
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    assert model.generate([PROMPTS[1]], 30, temperature=0, eos_id=eos) == [expected[1]]
    assert len(calls) == 1 + len(expected[1])


def test_sampling_reproducible_with_generator():
    model = tiny_model(std=0.2)

    def sample(seed, **kw):
        return model.generate(PROMPTS, 30, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(0, temperature=1.5) == sample(0, temperature=1.5)
    assert sample(0, temperature=1.5) != sample(1, temperature=1.5)
    assert sample(0, top_k=1) == model.generate(PROMPTS, 30, temperature=0)


def test_sampling_follows_tempered_top_k_softmax():
    model = tiny_model(std=0.2)
    p, n = PROMPTS[2], 4000
    with torch.no_grad():
        logits = model(torch.tensor([p]))[0][0, -1]  # (V,)
    top = logits.topk(5).indices
    expected = torch.zeros(50)
    expected[top] = (logits[top] / 0.5).softmax(-1)
    # n copies of one prompt: n draws of its first new token
    draws = model.generate([p] * n, 1, temperature=0.5, top_k=5,
                           generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=50)
    assert counts[expected == 0].sum() == 0
    assert 0.5 * (counts / n - expected).abs().sum() < 0.05  # total variation distance


# ---------------------------------------------------------------------------- checkpoints

def logits_of(model):
    idx = torch.arange(20).view(2, 10) % model.config.vocab_size
    with torch.no_grad():
        return model(idx)[0]


def test_checkpoint_round_trip_is_exact_and_tied(tmp_path):
    model = tiny_model()
    ck = tmp_path / "ck"
    M.save_model(ck, model, {"step": 7})
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no .tmp / .old left behind
    loaded, meta, _ = M.load_model(ck)
    assert meta["step"] == 7 and meta["model"] == asdict(model.config)
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert loaded.lm_head.weight is loaded.wte.weight
    assert "lm_head.weight" not in M.load_checkpoint(ck)[0]
    # overwrite with a different model plus optimizer state; load_model skips the extras
    other = tiny_model(seed=5)
    exp_avg = torch.randn(3, 4)
    M.save_checkpoint(ck, {**M.model_tensors(other), "optim.exp_avg": exp_avg},
                      {"model": asdict(other.config)})
    assert torch.equal(M.load_checkpoint(ck)[0]["optim.exp_avg"], exp_avg)
    assert torch.equal(logits_of(M.load_model(ck)[0]), logits_of(other))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_checkpoint_unwraps_compile_and_ddp(tmp_path):
    model = tiny_model()

    class DDPLike(nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    for wrapped in (torch.compile(model), DDPLike(model), torch.compile(DDPLike(model))):
        assert M.model_tensors(wrapped).keys() == M.model_tensors(model).keys()
    M.save_model(tmp_path / "ck", DDPLike(torch.compile(model)), {})
    assert torch.equal(logits_of(M.load_model(tmp_path / "ck")[0]), logits_of(model))


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "pickle"])
def test_damaged_checkpoint_raises_value_error(tmp_path, damage):
    ck = tmp_path / "ck"
    M.save_model(ck, tiny_model(), {})
    f = ck / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    elif damage == "random_bytes":
        f.write_bytes(os.urandom(5000))
    else:
        torch.save(tiny_model().state_dict(), f)
    with pytest.raises(ValueError, match="model.safetensors"):
        M.load_checkpoint(ck)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    before = tiny_model()
    M.save_model(ck, before, {"step": 1})
    after = tiny_model(seed=9)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(M, "save_file", crash)
    with pytest.raises(RuntimeError):
        M.save_model(ck, after, {"step": 2})
    monkeypatch.undo()
    loaded, meta, _ = M.load_model(ck)
    assert meta["step"] == 1 and torch.equal(logits_of(loaded), logits_of(before))

    # a crash between the two renames: ck is already ck.old, ck.tmp is not yet ck
    rename = Path.rename

    def crash_on_tmp(self, target):
        if self.name.endswith(".tmp"):
            raise RuntimeError("simulated crash between renames")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_tmp)
    with pytest.raises(RuntimeError):
        M.save_model(ck, after, {"step": 2})
    monkeypatch.undo()
    assert not ck.exists()
    loaded, meta, _ = M.load_model(ck)
    assert meta["step"] == 1 and torch.equal(logits_of(loaded), logits_of(before))

    M.save_model(ck, after, {"step": 2})  # the next save clears the debris
    loaded, meta, _ = M.load_model(ck)
    assert meta["step"] == 2 and torch.equal(logits_of(loaded), logits_of(after))
    assert sorted(os.listdir(tmp_path)) == ["ck"]
