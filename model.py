"""
A GPT-style decoder written from scratch, a key/value-cached sampler, and atomic
safetensors checkpoints. Reads top to bottom: config, attention, MLP, block, GPT,
generation, checkpoints.

    python -m pytest -q tests/test_model.py    # every piece against a brute-force reference
"""
import functools
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (positions the rotary tables cover)
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers


class KVCache:
    """Keys and values of every layer during generation, preallocated to the final length
    so each step writes in place instead of concatenating."""

    def __init__(self, n_layer, length):
        self.length, self.t = length, 0  # t: positions filled so far
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):
        # k, v (B, nh, T, hs) of the new positions -> all keys, values so far (B, nh, t+T, hs)
        if self.k[layer] is None:  # allocated on first use with k's and v's dtypes (CPU bf16: keys float32)
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.length, hs)
            self.v[layer] = v.new_zeros(B, nh, self.length, hs)
        t1 = self.t + k.size(2)
        self.k[layer][:, :, self.t:t1] = k
        self.v[layer][:, :, self.t:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


def rotary_tables(n_pos, head_size, base=10000.0):
    # -> cos, sin (n_pos, head_size/2): angle pos * base^(-2i/head_size) for pair i
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angle = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq  # (n_pos, hs/2)
    return angle.cos(), angle.sin()


def rotate(x, cos, sin):
    # Rotary position embedding (RoFormer, Su et al. 2021): rotate each pair (x_i, x_{i+hs/2})
    # by its position's angle. A query at m and a key at n then score q.k through angles of
    # m - n alone, so attention sees only relative offsets: shifting every position by the
    # same amount changes nothing, and no position has a parameter that training may miss.
    # x (B, nh, T, hs); cos, sin (B or 1, 1, T, hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


HALF = (torch.bfloat16, torch.float16)


def attend(q, k, v, **kw):
    # F.scaled_dot_product_attention, in float32 on CPU: there the bf16 kernels ran forward
    # plus backward 1.4-3.7x slower than float32 at this project's head size 32, and the
    # annotated FSPO step took 117 ms against 93 (bench.py, "attention"). Autocast would cast
    # the inputs back.
    # GPT.hidden rotates q and k in float32 there already; the result goes back to v's dtype.
    if q.device.type != "cpu" or not any(t.dtype in HALF for t in (q, k, v)):
        return F.scaled_dot_product_attention(q, k, v, **kw)  # float32 and float64 as they are
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(v.dtype)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, *rope), rotate(k, *rope)  # the cache keeps keys already rotated
        if cache is not None:  # generation always passes a mask: the queries are the last T keys
            k, v = cache.update(self.layer, k, v)  # (B, nh, t+T, hs)
        p = self.dropout if self.training else 0.0
        if mask is None:  # plain causal: SDPA skips the keys above the diagonal
            ys = [attend(q, k, v, is_causal=True, dropout_p=p)]
        else:
            # mask (B, 1, TR, Tk), True = may attend, covers the last TR queries; the T-TR
            # before them attend causally among themselves (data.pack_batch puts the context
            # and chosen there, and rejected behind them). Two calls: the causal one skips
            # its upper triangle, the masked one is TR rows long instead of T.
            H = T - mask.size(-2)
            ys = [attend(q[:, :, H:], k, v, attn_mask=mask, dropout_p=p)]
            if H:
                ys.insert(0, attend(q[:, :, :H], k[:, :, :H], v[:, :, :H], is_causal=True, dropout_p=p))
        # (B, nh, T, hs) in parts along T -> (B, T, C), joined and laid out in one copy
        y = torch.cat([t.transpose(1, 2) for t in ys], dim=1).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: each sublayer reads a normalised copy and adds its output to the stream."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied: one matrix embeds tokens and scores them
        # computed, not learned, so kept out of the state dict and the checkpoints
        cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: the residual projections are scaled down so the residual stream's variance
        # does not grow with depth (each block adds two of them)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, pos=None, mask=None, cache=None):
        # idx (B, T) -> final hidden states (B, T, C), before the vocabulary projection
        if pos is None:
            assert idx.size(1) <= self.config.block_size, "sequence longer than block_size"
            pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.drop(self.wte(idx))  # (B, T, C)
        dev = x.device.type  # the dtype attention runs in (attend): q and k are rotated in it
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        dt = torch.float32 if dev == "cpu" and dt in HALF else dt
        pos = pos if pos.dim() == 2 else pos[None]  # (B or 1, T)
        rope = (self.cos[pos][:, None].to(dt), self.sin[pos][:, None].to(dt))  # (B|1, 1, T, hs/2)
        if mask is not None and mask.dtype == torch.bool:
            # SDPA would convert a bool mask to an additive one in every layer (and autograd
            # would keep each copy): convert once. It is (B, 1, TR, T), TR the masked tail.
            mask = torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill_(~mask, -math.inf)
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.t += idx.size(1)
        return self.ln_f(x)

    def forward(self, idx, targets=None, pos=None, mask=None):
        # idx (B, T); pos (B, T) absolute positions; mask (B, 1, TR, T) bool, True = may
        # attend, for the last TR queries (the first T-TR attend causally)
        logits = self.lm_head(self.hidden(idx, pos, mask))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def token_logprobs(self, idx, targets, pos=None, mask=None):
        # (B, T) float32 log p(targets[b, t] | what position t sees), 0.0 where targets == -1
        x = self.hidden(idx, pos, mask)  # (B, T, C)
        keep = targets != -1  # (B, T)
        # most positions are context: project only the N labelled ones onto the vocabulary
        logits = self.lm_head(x[keep]).float()  # (N, V)
        lp = -F.cross_entropy(logits, targets[keep], reduction="none")  # (N,) float32 log-softmax
        return torch.zeros(targets.shape, device=x.device).masked_scatter(keep, lp)

    def num_params(self):
        # parameters() yields the tied matrix once (buffers such as the rotary tables are not
        # parameters). Every weight is a matmul: the token table is also the lm_head.
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        # forward + backward training flops per token at sequence length T (PaLM appendix B,
        # as in nanoGPT's MFU): 6 per weight, plus attention scores and their weighted sum
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, eos_id=None,
                 generator=None):
        """Continue each prompt (list of token lists, or a (B, T) tensor) by up to
        max_new_tokens; temperature 0 is greedy. A row stops at eos_id, which is not
        returned. Returns the new tokens of each row."""
        prompts = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
        B, P = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate: longest prompt ({P}) + max_new_tokens "
                             f"({max_new_tokens}) exceeds block_size ({self.config.block_size})")
        device = self.lm_head.weight.device
        # Left-pad to a common length so every row's next token sits in the last column. Each
        # row counts positions from its own first token and never attends to padding, so it
        # computes what it would alone.
        n_pad = torch.tensor([P - len(p) for p in prompts], device=device)[:, None]  # (B, 1)
        idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # (B, P)
        t = torch.arange(P + max_new_tokens, device=device)  # slots of the whole run
        pos = (t - n_pad).clamp(min=0)  # (B, P+N)
        real = t >= n_pad  # (B, P+N) key is a token, not padding
        causal = t[:P, None] >= t[None, :P]  # (P, P)
        # a padding query sees itself, so its softmax has a key and nothing becomes NaN
        mask = causal & (real[:, None, :P] | torch.eye(P, dtype=torch.bool, device=device))
        cache = KVCache(self.config.n_layer, P + max_new_tokens)
        x = self.hidden(idx, pos[:, :P], mask[:, None], cache)  # (B, P, C)
        out, done = [[] for _ in range(B)], [False] * B
        for step in range(max_new_tokens):
            logits = self.lm_head(x[:, -1]).float()  # (B, V)
            nxt = self._sample(logits, temperature, top_k, generator)  # (B,)
            for b, tok in enumerate(nxt.tolist()):
                if not done[b] and tok == eos_id:
                    done[b] = True
                elif not done[b]:
                    out[b].append(tok)
            if all(done) or step == max_new_tokens - 1:  # the last token is never fed back
                break
            s = P + step  # the slot of the token just sampled
            x = self.hidden(nxt[:, None], pos[:, s:s + 1], real[:, None, None, :s + 1], cache)
        return out

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        # logits (B, V) float32 -> next token ids (B,)
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------
# mixed precision: bf16 autocast where it is fast

@functools.cache
def cpu_bf16_faster(n=256, reps=3):
    """Whether a bf16 matmul beats a float32 one on this CPU, timed once per process (~0.1 s
    where bf16 is emulated). Measured, not read off CPU flags: without native bf16 units
    (AVX512-BF16, AMX) a bf16 matmul can be ~100x slower than float32."""
    def best(dtype):
        # its own generator: the probe must not move the global RNG that seeds the model's init
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
        a @ a  # warm-up: the first call picks and prepares a kernel
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.bfloat16) < best(torch.float32)


def amp_dtype(device, dtype="auto"):
    """The dtype matmuls run in: 'fp32', 'bf16', or 'auto' = bf16 on CUDA, bf16 on CPU only
    where cpu_bf16_faster() says so, float32 otherwise."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"dtype {dtype!r}: auto, bf16 or fp32")
    kind = torch.device(device).type
    bf16 = dtype == "bf16" or (dtype == "auto" and (kind == "cuda" or
                                                    (kind == "cpu" and cpu_bf16_faster())))
    return torch.bfloat16 if bf16 else torch.float32


def autocast(device, dtype="auto"):
    """The context a forward runs under: bf16 autocast, or nothing for float32. Weights and
    optimizer state stay float32; log-softmax and summed log-probs stay float32 in it
    (GPT.token_logprobs, data.sequence_logps)."""
    if amp_dtype(device, dtype) == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------
# checkpoints: a directory with model.safetensors (tensors) + config.json (meta)

def unwrap(model):
    """The plain GPT inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while not isinstance(model, GPT):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def model_tensors(model):
    # safetensors stores no aliases: keep the tied matrix once, as wte
    state = unwrap(model).state_dict()
    del state["lm_head.weight"]
    return state


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # directories too: makes their renames durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, tensors, meta):
    """Write `path/` atomically: build `path.tmp/` fully, then swap it in. A crash at any
    point leaves `path` or `path.old` a complete checkpoint."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    for f in ("model.safetensors", "config.json", ""):
        _fsync(tmp / f)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path):
    """-> (tensors, meta). Never unpickles. Falls back to `path.old` when a save crashed
    between its two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        path = old
    f = path / "model.safetensors"
    try:
        tensors = load_file(f)
    except SafetensorError as e:
        raise ValueError(f"{f}: not a complete safetensors file ({e})") from None
    try:
        meta = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    return tensors, meta


def ckpt_dir(run):
    """A training run's dir holds metrics.jsonl and ckpt/, the atomically replaced checkpoint."""
    return os.path.join(run, "ckpt")


def save_model(path, model, meta, extra=None):
    """The weights, the model config in meta, and `extra` tensors (optimizer and RNG state
    for resuming: names that start with "optim.", "ema." or "rng.")."""
    save_checkpoint(path, {**model_tensors(model), **(extra or {})},
                    {**meta, "model": asdict(unwrap(model).config)})


def load_model(path, device="cpu"):
    """-> (GPT, meta, tensors): the one loader. Refuses a checkpoint whose weights do not
    fit the model it describes (a missing or unexpected weight)."""
    tensors, meta = load_checkpoint(path)
    known = GPTConfig.__dataclass_fields__
    if unknown := [k for k in meta.get("model", {}) if k not in known]:
        raise ValueError(f"{Path(path) / 'config.json'}: field 'model' has unknown key {unknown[0]!r} "
                         f"(known: {', '.join(known)})")
    model = GPT(GPTConfig(**meta["model"]))
    names = model_tensors(model).keys()  # lm_head is wte's Parameter: loading wte fills both
    missing = [k for k in names if k not in tensors]
    unexpected = [k for k in tensors if k not in names and not k.startswith(("optim.", "rng.", "ema."))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.load_state_dict({k: tensors[k] for k in names}, strict=False)
    return model.to(device), meta, tensors
