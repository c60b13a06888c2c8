"""TAIA: Train All parameters, Infer with Attention only (Jiang et al., NeurIPS 2024, arXiv 2405.20192).

Fine-tune every parameter as usual; at inference keep the fine-tuned attention and put the original
feed-forward (FFN) weights back. The paper finds the attention updates carry what transfers to the
downstream task, while the FFN updates overwrite knowledge the pretrained model stored there.

Everything here is a function over parameter names and tensors: it works on any `nn.Module` or state
dict whose names say which block part a tensor is in. Every name it relies on is written in one of
these places, to adapt when porting to a model whose names differ:
- `GROUP_TABLE` below: which modules hold attention, FFN, norm, embedding and head tensors, for our
  model and the common Hugging Face families (Llama, Mistral, Qwen2/3, Gemma2, Phi-3, OLMo2, GPT-NeoX,
  GPT-2); `group_of` reads it;
- LoRA: adapters are the parameters `lora_A` / `lora_B` of a `LoRALinear` that keeps the wrapped
  layer's `weight` (and `bias`), so a merged state dict has the plain model's names.

Full fine-tuning:             LoRA on every linear layer of the blocks:
    base = snapshot(model)        add_lora(model, rank=16, alpha=32)   # paper default
    ...fine-tune model...         ...fine-tune (only adapters train)...
    rebuild(model, base)          state = merge_lora(model, "taia")    # FFN adapters dropped

TAIA is one corner of a space: `interpolate(base, tuned, {"attention": 1, "ffn": 0.5})` puts every
group (or every layer of attention / FFN) anywhere between its base and tuned value; base, vanilla,
TAIA and TAIF are its corners (`mode_weights`).
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Which group a tensor belongs to, read from the module that holds it: a tensor is '<path>.<module>.weight'
# (or '.bias': a projection's bias belongs to its projection's group). Projections are named with the
# block part that holds them ('mlp.c_proj'), because GPT-2 calls both of its output projections 'c_proj';
# fused projections belong to the group they fuse. To port TAIA to a new family, add its module names to
# this table; a tensor it does not name is an error, never a silent default.
GROUP_TABLE = {
    "attention": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",                  # ours (model.py)
                  "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",  # HF Llama etc.
                  "self_attn.qkv_proj",                                 # Phi-3: q, k, v fused
                  "attention.query_key_value", "attention.dense",       # GPT-NeoX, Pythia
                  "attn.c_attn", "attn.c_proj"),                        # GPT-2 (c_attn: q, k, v fused)
    "ffn": ("ffn.gate_proj", "ffn.up_proj", "ffn.down_proj",            # ours
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",            # HF Llama etc.
            "mlp.gate_up_proj",                                         # Phi-3: gate and up fused
            "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",                   # GPT-NeoX, Pythia
            "mlp.c_fc", "mlp.c_proj"),                                  # GPT-2
    "norm": ("attn_norm", "ffn_norm", "norm",                           # ours; 'norm' is HF Llama's final norm too
             "input_layernorm", "post_attention_layernorm",             # HF Llama etc., GPT-NeoX
             "pre_feedforward_layernorm", "post_feedforward_layernorm", # Gemma2, OLMo2
             "q_norm", "k_norm",                                        # Qwen3, OLMo2: inside attention, still norms
             "final_layer_norm",                                        # GPT-NeoX
             "ln_1", "ln_2", "ln_f"),                                   # GPT-2
    "embedding": ("embed", "embed_tokens", "embed_in",                  # ours, HF Llama etc., GPT-NeoX
                  "wte", "wpe"),                                        # GPT-2: tokens, positions
    "head": ("lm_head", "embed_out"),                                   # GPT-NeoX's older files: embed_out
}
# "HF Llama etc." are the Hugging Face families whose blocks are named like Llama's: Llama, Mistral,
# Qwen2 (its q/k/v biases: attention), Qwen3, Gemma2, OLMo2 and Phi-3 (o_proj, down_proj).
GROUPS = tuple(GROUP_TABLE)


def module_groups(table: dict) -> dict:
    """{module name: group} from GROUP_TABLE; a module listed under two groups is refused."""
    groups = {}
    for group, modules in table.items():
        for module in modules:
            assert groups.setdefault(module, group) == group, f"{module} is in two groups of GROUP_TABLE"
    return groups


GROUP_OF_MODULE = module_groups(GROUP_TABLE)


def group_or_none(name: str) -> str | None:
    """The group GROUP_TABLE gives a tensor, or None. Only weights and biases have one: LoRA adapters
    ('...up_proj.lora_A') are not FFN weights. A block part with its projection ('mlp.c_proj') is
    looked up before the module alone ('ln_1')."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    return GROUP_OF_MODULE.get(".".join(parts[-3:-1])) or GROUP_OF_MODULE.get(parts[-2])


def is_ffn(name: str) -> bool:
    """The one predicate that defines 'the FFN' for TAIA: the FFN projections of every block, weights
    and biases, e.g. 'blocks.3.ffn.up_proj.weight' (ours) or 'model.layers.3.mlp.up_proj.weight'
    (Hugging Face); GROUP_TABLE["ffn"] lists them."""
    return group_or_none(name) == "ffn"


def is_attention(name: str) -> bool:
    """The attention projections of every block (q/k/v/o, or fused ones), weights and biases."""
    return group_or_none(name) == "attention"


def group_of(name: str) -> str:
    """Which of GROUPS a parameter belongs to. Unknown names are an error, never silently 'other'."""
    group = group_or_none(name)
    if group is None:
        raise ValueError(f"taia: cannot tell which group parameter {name!r} belongs to; add its module to "
                         "GROUP_TABLE")
    return group


# Which groups each mode takes from the fine-tuned model; every other group comes from the base model.
# As in the authors' code, TAIA and TAIF revert only one part of the blocks (the FFN, or the attention)
# and keep the fine-tuned norms, embeddings and output head; `others="base"` reverts those three too.
OTHERS = {"norm", "embedding", "head"}
MODE_TUNED = {"base": set(),
              "vanilla": {"attention", "ffn"} | OTHERS,
              "taia": {"attention"} | OTHERS,
              "taif": {"ffn"} | OTHERS}
MODES = tuple(MODE_TUNED)


def tuned_groups(mode: str, others: str = "tuned") -> set:
    """MODE_TUNED[mode]; with others="base", TAIA and TAIF take norms, embeddings and head from the base."""
    if mode not in MODE_TUNED:
        raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    if others not in ("tuned", "base"):
        raise ValueError(f"others must be 'tuned' or 'base', not {others!r}")
    keep = set(MODE_TUNED[mode])
    if others == "base" and mode in ("taia", "taif"):
        keep -= OTHERS
    return keep


def mode_weights(mode: str, others: str = "tuned") -> dict:
    """A named mode as a point of `interpolate`: weight 1 for the groups it tunes, 0 for the rest."""
    keep = tuned_groups(mode, others)
    return {g: 1.0 if g in keep else 0.0 for g in GROUPS}


def combine(base_state: dict, tuned_state: dict, mode: str, others: str = "tuned") -> dict:
    """The weights to infer with: 'base' (no fine-tuning), 'vanilla' (all updates), 'taia' (tuned
    attention, original FFN) or 'taif' (tuned FFN, original attention)."""
    return interpolate(base_state, tuned_state, mode_weights(mode, others))


def mix(base_state: dict, tuned_state: dict, tuned: set) -> dict:
    """A state dict with the groups in `tuned` from tuned_state and all others from base_state."""
    if not tuned <= set(GROUPS):
        raise ValueError(f"unknown groups {sorted(tuned - set(GROUPS))}: choose from {GROUPS}")
    return interpolate(base_state, tuned_state, {g: 1.0 if g in tuned else 0.0 for g in GROUPS})


# ---- Beyond on/off: any point between base and tuned, per group and per layer -----------------------

def layer_of(name: str) -> int | None:
    """The block a parameter is in ('blocks.3.ffn.up_proj.weight' -> 3, HF's 'model.layers.3...' -> 3)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def check_weights(weights: dict, names):
    """Group names must exist, numbers be finite; a list (per layer) is for attention or ffn only and
    must hold one number per block of the model whose parameter `names` are given."""
    n_layers = 1 + max((layer_of(n) for n in names if layer_of(n) is not None), default=-1)
    unknown = set(weights) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown groups {sorted(unknown)}: choose from {', '.join(GROUPS)}")
    for group, a in weights.items():
        values = a if isinstance(a, (list, tuple)) else [a]
        if isinstance(a, (list, tuple)) and (group not in ("attention", "ffn") or len(a) != n_layers):
            raise ValueError(f"{group}: a list of weights needs one per layer ({n_layers}), for attention or ffn "
                             f"only; got {len(a)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{group}: weights must be finite numbers, not {a!r}")


def weight_of(weights: dict, name: str) -> float:
    """The weight `weights` gives a parameter: its group's number, or its layer's entry of the group's
    list. A group not named keeps its tuned value (1), as TAIA keeps the tuned norms, embeddings, head."""
    a = weights.get(group_of(name), 1.0)
    return float(a[layer_of(name)] if isinstance(a, (list, tuple)) else a)


def interpolate(base_state: dict, tuned_state: dict, weights: dict) -> dict:
    """w = base + a * (tuned - base) for every tensor, `a` its group's weight (see weight_of), e.g.
    {"attention": 1, "ffn": 0} is TAIA, {"ffn": [0, 0, 0.5, 1]} reverts the FFN of the first two layers
    and half of the third's update. a = 0 and a = 1 give the base or tuned tensor itself, shared, not
    copied (every named mode is such a point, bit for bit); a below 0 or above 1 extrapolates past the
    base or the tuned model: allowed, rarely wise. Key sets and shapes must match exactly."""
    check_same_layout(base_state, tuned_state, "base", "tuned")
    check_weights(weights, tuned_state)
    # Tied tensors (e.g. embedding = output head) are one parameter: both names need the same weight.
    by_storage = {}
    for k, v in tuned_state.items():
        by_storage.setdefault((v.data_ptr(), v.shape), set()).add(weight_of(weights, k))
    if any(len(sides) > 1 for sides in by_storage.values()):
        raise ValueError("taia: tied parameters (embedding and output head) cannot take different weights")
    mixed = {}
    for k in tuned_state:
        a, base, tuned = weight_of(weights, k), base_state[k], tuned_state[k]
        mixed[k] = base if a == 0 else tuned if a == 1 else base + a * (tuned - base)
    return mixed


# ---- Full fine-tuning: snapshot the FFN before, rebuild after --------------------------------------

def snapshot(model: nn.Module) -> dict:
    """CPU copies of exactly the FFN weights, taken before fine-tuning. Nothing else is stored:
    TAIA needs only these to rebuild (about 2/3 of a Llama block's parameters)."""
    snap = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if is_ffn(n)}
    if not snap:
        raise ValueError("taia.snapshot: the model has no parameters that is_ffn() recognises")
    return snap


def rebuild(model: nn.Module, snap: dict) -> nn.Module:
    """In place: put the snapshot's original FFN weights back; every other parameter keeps its tuned
    value. Refuses a snapshot whose names or shapes do not match this model's FFN."""
    ffn = {n: p for n, p in model.named_parameters() if is_ffn(n)}
    check_same_layout(ffn, snap, "model FFN", "snapshot")
    with torch.no_grad():
        for name, p in ffn.items():
            p.copy_(snap[name])
    return model


def fingerprint(snap: dict) -> str:
    """SHA-256 of the snapshot's names and bytes: lets a fine-tuned checkpoint name the base it came from."""
    digest = hashlib.sha256()
    for name in sorted(snap):
        tensor = snap[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_layout(a: dict, b: dict, a_name: str, b_name: str):
    if set(a) != set(b):
        raise ValueError(f"taia: {b_name} does not match {a_name}: missing {sorted(set(a) - set(b))[:3]}, "
                         f"unexpected {sorted(set(b) - set(a))[:3]}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"taia: {k} has shape {tuple(b[k].shape)} in {b_name}, {tuple(a[k].shape)} in {a_name}")


# ---- LoRA on every linear layer of the blocks (the paper's default setting) ----------------------

class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * dropout(x) A^T B^T, with W frozen and only A, B trained.
    B starts at zero, so the wrapped model starts exactly at the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # nn.Linear's names: merged state dicts keep their keys
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self):
        return (self.lora_B @ self.lora_A) * self.scale


def add_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05, where=None) -> nn.Module:
    """In place: wrap every attention and FFN linear layer in LoRA and freeze everything else
    (embeddings, norms, output head, the wrapped weights); only the adapters train. `where`, a test on a
    layer's weight name, keeps adapters off the layers it rejects: e.g. attention everywhere and the FFN
    of the first k blocks only, the paper's TOA-k (Fig. 3)."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (is_ffn(n + ".weight") or is_attention(n + ".weight"))
               and (where is None or where(n + ".weight"))]
    if not targets:
        raise ValueError("taia.add_lora: no attention or FFN linear layers found (or `where` rejected them all)")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module, mode: str = "vanilla", weights: dict | None = None) -> dict:
    """A plain state dict (the model's names without adapters) with the adapters of the groups that
    `mode` tunes merged into their weights: TAIA merges attention adapters and drops FFN adapters.
    `weights` (as for `interpolate`) scales each adapter's delta instead: W + a * B A * alpha / r.
    Under LoRA only the adapters train, so norms, embeddings and head are the base's in every mode."""
    weights = mode_weights(mode) if weights is None else weights
    check_weights(weights, model.state_dict())
    state = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith((".lora_A", ".lora_B")):
                continue
            owner_name, _, leaf = name.rpartition(".")  # 'blocks.0.attn.q_proj', 'weight'
            owner = model.get_submodule(owner_name)
            if leaf == "weight" and isinstance(owner, LoRALinear) and (a := weight_of(weights, name)) != 0:
                tensor = tensor + (a * owner.delta()).to(tensor.dtype)  # a = 1 adds the delta bit for bit
            state[name] = tensor
    return state
