"""A compact Llama-style decoder-only transformer.

Read top to bottom: config, RMSNorm, RoPE, KV cache, Attention, FeedForward, Block, Transformer,
sampling, weight init, and the AdamW groups and FLOP count a trainer asks a model for. Hugging Face
Llama checkpoints load into it without any permutation (common.load_hf_llama; the names differ only in
a few path components). This file knows nothing of data, training loops, checkpoints on disk or TAIA;
it only keeps the attention and feed-forward parts of every block as separate, clearly named
submodules (`blocks.N.attn.*` and `blocks.N.ffn.*`), because TAIA is about exactly that split.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    dim: int = 128  # width of the residual stream
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # < n_heads gives grouped-query attention; None means n_heads
    vocab_size: int = 512
    hidden_dim: int = 512  # width of the SwiGLU feed-forward layer
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False  # share the token embedding with the output head

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim ({self.dim}) must divide by n_heads ({self.n_heads}), "
                             f"and n_heads by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("the head dimension dim // n_heads must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS = {
    # ~1.1M parameters: small enough to pretrain on a laptop CPU in minutes.
    "toy": ModelConfig(dim=128, n_layers=4, n_heads=4, vocab_size=512, hidden_dim=512),
    # GPT-2-small's shape as a Llama, for GPU throughput checks: 134M parameters with a 32k vocabulary
    # (GPT-2's 124M ties the embedding and the head; this untied head adds 25M).
    "124m": ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048,
                        max_seq_len=1024),
    "tinyllama-1.1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
                                  hidden_dim=5632, max_seq_len=2048),
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008,
                             norm_eps=1e-5, max_seq_len=4096),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 for stability under bf16/fp16, as Llama does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float):
    """Real-valued rotary tables, (max_seq_len, head_dim) each, in the half-split layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # pair dimension i with i + head_dim/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by position. Half-split layout, as Hugging Face Llama stores
    q/k weights, so its checkpoints load without permuting rows."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of past positions for incremental decoding, preallocated for `max_len`.
    Passed into `Transformer.forward`; the model holds no decoding state of its own."""
    static = False  # see StaticKVCache

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already stored

    def update(self, layer: int, k, v):
        """Store k, v (B, kv_heads, T, head_dim) after the cached positions; return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class StaticKVCache(KVCache):
    """The same cache with shapes that never change, for a compiled decode step (as gpt-fast does):
    `pos` is a tensor, new keys are written in place at it, and attention reads the whole buffer with a
    mask over the positions not written yet. torch.compile then traces one graph for every step; the
    growing slices of KVCache would give it a new shape, and a recompile, at each token."""
    static = True

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        # One tensor per layer: the compiled step then writes into each in place. (Writing through a view
        # of one tensor for all layers made the compiler copy the whole cache at every step.)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)

    def update(self, layer: int, k, v):
        where = self.pos + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, where, k)
        self.v[layer].index_copy_(2, where, v)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads and RoPE (the TAIA 'attention' part)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)
        # Grouped-query attention: enable_gqa lets each key/value head serve n_heads // n_kv_heads query
        # heads without copying it that many times (the copy would cost a whole cache's worth per token).
        if cache is None or not cache.static and (past == 0 or T == 1):
            # a fresh sequence is plainly causal; one new token sees every key there is
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:  # new queries sit after `past` cached positions: query i sees keys 0 .. past + i
            mask = torch.arange(k.shape[2], device=x.device) <= past + torch.arange(T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The TAIA 'feed-forward' part, restored after fine-tuning."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Non-persistent: derived from the config, so never stored in (or expected from) a checkpoint.
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.compiled_step = None  # set by compile_decoding()
        init_weights(self)

    def forward(self, tokens, cache: KVCache | None = None):
        """tokens (B, T) -> logits (B, T, vocab_size), float32. With a cache, tokens continue it."""
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if not torch.is_tensor(start) and start + T > self.cfg.max_seq_len:  # (a static cache's size checks it)
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(tokens)
        positions = start + torch.arange(T, device=tokens.device)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x)).float()

    def compile_decoding(self):
        """Compile one decode step, a single new token through every layer against a StaticKVCache (one
        fixed-shape graph, as gpt-fast does): generate() then runs the prompt as usual and every new token
        through that graph, which at batch 1 saves most of the per-operator overhead that dominates it.
        The compiler runs at the first step; a machine without one fails there."""
        self.compiled_step = torch.compile(self.forward, fullgraph=True, dynamic=False)
        return self

    @torch.inference_mode()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 eos_id: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True):
        """Continue tokens (B, T); return (B, T + new) with the prompt and the continuation.
        temperature 0 is greedy. Once every row has produced eos_id, decoding stops early; rows that
        finished sooner are padded with eos_id. After compile_decoding(), the cached steps are compiled."""
        B, T = tokens.shape
        total = T + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len {self.cfg.max_seq_len}")
        compiled = use_cache and self.compiled_step is not None
        cache_type = StaticKVCache if compiled else KVCache
        cache_len = static_cache_len(total, self.cfg.max_seq_len) if compiled else total
        cache = cache_type(self.cfg, B, cache_len, tokens.device, self.embed.weight.dtype) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        out = step_input = tokens
        for i in range(max_new_tokens):
            forward = self.compiled_step if compiled and i > 0 else self  # the prompt goes through eagerly
            logits = forward(step_input, cache)[:, -1]
            nxt = sample(logits, temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            # With a cache only the newest token goes in next; without one, the whole sequence again.
            step_input = nxt[:, None] if cache is not None else out
            if eos_id is not None and bool(done.all()):
                break
        return out


def static_cache_len(total: int, max_seq_len: int) -> int:
    """Positions a compiled step's StaticKVCache holds for a request of `total` tokens: the next power of two
    (at least 64), at most max_seq_len. The step reads the whole buffer at every token, so a cache of
    max_seq_len (8,192 for SmolLM2: 360 MiB) would cost more than the weights; each size is one compiled
    graph, so rounding up keeps them few (7 sizes from 64 to 4,096, then max_seq_len)."""
    return min(max_seq_len, max(64, 1 << (total - 1).bit_length()))


def sample(logits, temperature: float, top_k: int | None, generator=None):
    """Next token per row from logits (B, vocab): argmax at temperature 0, else softmax sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # Shifted so that the largest logit is 0 (softmax is unchanged), and in float64, where a temperature
    # below float32's smallest number is not 0: however small it is, the rest go to -inf at worst, never nan.
    logits = (logits.double() - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def init_weights(model: Transformer):
    """Normal(0, 0.02) for every linear and embedding matrix; the two projections that write into the
    residual stream (attn.o_proj, ffn.down_proj) scaled by 1/sqrt(2 * n_layers), as in GPT-2, so the
    stream's variance does not grow with depth. Norm weights stay at one."""
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * model.cfg.n_layers))
        else:
            nn.init.normal_(p, 0.0, std)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups for any model: decay the 2-D weights (matrices, embeddings), never norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def matmul_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(attention, FFN) weights of one block: q, o and k, v; gate, up and down."""
    return cfg.dim * cfg.head_dim * 2 * (cfg.n_heads + cfg.n_kv_heads), 3 * cfg.dim * cfg.hidden_dim


def parameter_count(cfg: ModelConfig) -> int:
    """What Transformer(cfg) holds, counted from the config (building even an empty model of 10**10 layers
    would take forever): the blocks' matrices and two norms each, the final norm, embedding and head."""
    attention, ffn = matmul_weights(cfg)
    return cfg.n_layers * (attention + ffn + 2 * cfg.dim) + cfg.dim + cfg.vocab_size * cfg.dim * (
        1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: ModelConfig, seq_len: int, n_trained: int | None = None) -> int:
    """Training FLOPs per token, counted as in the PaLM paper (Chowdhery et al. 2022, appendix B) and
    nanoGPT's estimate_mfu: every weight of a matmul costs 2 FLOPs forward and 2 for the gradient of its
    input, and 2 more for its own gradient when it trains (`n_trained` of them; default all); attention
    scores and their weighted sum add 12 * n_layers * dim * seq_len (the full square, as PaLM counts,
    though half of it is masked). The embedding is a lookup, not a matmul; the output head counts."""
    attention, ffn = matmul_weights(cfg)
    n_matmul = cfg.n_layers * (attention + ffn) + cfg.dim * cfg.vocab_size
    n_trained = n_matmul if n_trained is None else n_trained
    return 4 * n_matmul + 2 * n_trained + 12 * cfg.n_layers * cfg.dim * seq_len
