"""Hugging Face Llama directories: config.json and safetensors weights, read lazily into model.Transformer
and written back out (save_hf). Our module names differ from Hugging Face's only in a few path
components; the tensors are identical (model.py uses the half-split RoPE layout, so q/k need no permuting).
"""
import json
import math
import os

import torch

from common import atomic_write, make_dir, write_json
from model import ModelConfig, Transformer, rope_cos_sin

HF_PARTS = {"embed": "embed_tokens", "blocks": "layers", "attn": "self_attn", "ffn": "mlp",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
OUR_PARTS = {hf: ours for ours, hf in HF_PARTS.items()}
HF_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's map of tensor name -> shard file
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes a weight may have


class CheckpointError(ValueError):
    """A Hugging Face directory that cannot be read: a broken or cut-short file, a config.json that does
    not describe the weights, another architecture. The message names the file (relative to the
    directory) and what is wrong with it."""


def hf_to_ours(name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'blocks.0.ffn.up_proj.weight'."""
    return ".".join(OUR_PARTS.get(part, part) for part in name.removeprefix("model.").split("."))


def ours_to_hf(name: str) -> str:
    hf = ".".join(HF_PARTS.get(part, part) for part in name.split("."))
    return hf if hf.startswith("lm_head.") else "model." + hf


def read_hf_json(path: str) -> dict:
    """The JSON object in path (config.json, the shard index)."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {name}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} does not hold a JSON object")
    return obj


def hf_field(hf: dict, name: str, kind: type, default):
    """hf[name] (default where it is absent or null), checked against its kind: int is a positive integer
    (64.0 or "64" is refused, not converted), float a positive finite number, bool true or false."""
    value = hf.get(name)
    if value is None:
        return default
    if kind is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, wanted = type(value) is int and value > 0, "a positive integer"  # type(): True is an int too
    else:
        ok, wanted = type(value) in (int, float) and 0 < value < math.inf, "a positive number"
    if not ok:
        raise CheckpointError(f"config.json: {name} must be {wanted}, not {value!r}")
    return value


def config_from_hf(hf: dict) -> ModelConfig:
    """Our config from a Hugging Face config.json. Every field used is checked for its type and range here,
    so that a config edited by hand or written for another model fails with the field's name, not deep
    inside the model."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"not a Llama checkpoint: model_type is {hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json: rope_parameters must be an object, not {rope!r}")
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise CheckpointError("RoPE scaling (e.g. Llama 3.1's) is not supported by this model")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("attention/MLP biases are not supported by this model")
    missing = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
               if hf.get(f) is None]
    if missing:
        raise CheckpointError(f"config.json has no {', '.join(missing)}")
    n_heads = hf_field(hf, "num_attention_heads", int, None)
    sizes = dict(dim=hf_field(hf, "hidden_size", int, None), n_layers=hf_field(hf, "num_hidden_layers", int, None),
                 n_heads=n_heads, n_kv_heads=hf_field(hf, "num_key_value_heads", int, n_heads),
                 vocab_size=hf_field(hf, "vocab_size", int, None),
                 hidden_dim=hf_field(hf, "intermediate_size", int, None),
                 norm_eps=hf_field(hf, "rms_norm_eps", float, 1e-6),
                 rope_theta=hf_field(rope, "rope_theta", float, hf_field(hf, "rope_theta", float, 10000.0)),
                 max_seq_len=hf_field(hf, "max_position_embeddings", int, 2048),
                 tie_embeddings=hf_field(hf, "tie_word_embeddings", bool, False))
    if sizes["max_seq_len"] > 2 ** 22:  # the RoPE tables alone would take gigabytes
        raise CheckpointError(f"config.json: max_position_embeddings {sizes['max_seq_len']:,} is beyond what this "
                              "loader reads (4,194,304)")
    try:
        cfg = ModelConfig(**sizes)
    except ValueError as e:  # heads that do not divide the width
        raise CheckpointError(f"config.json does not describe a valid model: {e}") from None
    if hf_field(hf, "head_dim", int, cfg.head_dim) != cfg.head_dim:
        raise CheckpointError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return cfg


class Safetensors:
    """The tensors of some safetensors files in a folder, read lazily: names, dtypes and shapes come from
    the files' headers at once, a tensor's bytes only when tensor(name) asks for them. Every problem
    with the files (missing, cut short, not safetensors, a tensor that is not floating point) is a
    CheckpointError, raised here and nowhere else."""

    def __init__(self, folder: str, files: list[str]):
        self.folder, self.files = folder, files
        self.file_of, self.layout = {}, {}  # layout: name -> (dtype, shape)
        for file in files:
            with self.open(file) as handle:
                for name in handle.keys():
                    if name in self.file_of:
                        raise CheckpointError(f"{name} is in both {self.file_of[name]} and {file}")
                    info = handle.get_slice(name)
                    dtype, shape = info.get_dtype(), tuple(info.get_shape())
                    if dtype not in FLOAT_DTYPES:  # integer weights would be quantised ones, or not weights
                        raise CheckpointError(f"{name} in {file} is {dtype}: only floating-point weights "
                                              f"({', '.join(FLOAT_DTYPES)}) are read")
                    self.file_of[name], self.layout[name] = file, (dtype, shape)

    def open(self, file: str):
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise ImportError("reading Hugging Face checkpoints needs the safetensors package: "
                              "pip install safetensors") from None
        path = os.path.join(self.folder, file)
        if not os.path.isfile(path):
            raise CheckpointError(f"{file} is missing")
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:  # cut short, zero bytes, not safetensors, unreadable
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None

    def tensor(self, name: str) -> torch.Tensor:
        # One handle per tensor: safe_open maps the whole file, and every page read through a handle
        # stays in memory while the handle (or a tensor read through it) lives; a handle of its own
        # keeps only this tensor's pages, and only until the caller drops the tensor.
        with self.open(self.file_of[name]) as handle:
            return handle.get_tensor(name)


def hf_weights(folder: str) -> Safetensors:
    """The weights of a Hugging Face directory: model.safetensors, or the shards model.safetensors.index.json
    names (whose weight map must agree with the shards' contents)."""
    if os.path.isfile(os.path.join(folder, HF_INDEX)):
        weight_map = read_hf_json(os.path.join(folder, HF_INDEX)).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{HF_INDEX} has no weight_map of tensor name -> file")
        weights = Safetensors(folder, sorted(set(weight_map.values())))
        if weights.file_of != weight_map:
            wrong = sorted(n for n in set(weight_map) | set(weights.file_of)
                           if weight_map.get(n) != weights.file_of.get(n))
            raise CheckpointError(f"{HF_INDEX} does not match its shards (e.g. {wrong[0]})")
        return weights
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return Safetensors(folder, ["model.safetensors"])
    raise CheckpointError(f"the directory has no model.safetensors (or {HF_INDEX}): only safetensors are read")


def check_hf_layout(model: Transformer, weights: Safetensors):
    """The files hold exactly the tensors the model has, each with the shape config.json gives it: checked
    on the headers, before any memory is allocated. A tied head may be stored too, if it equals the
    embedding (the one check that reads tensors): dropping a head that differs would change the model."""
    expected = {ours_to_hf(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and "lm_head.weight" not in weights.layout:
        del expected["lm_head.weight"]  # HF stores a tied head once, as the embedding
    missing, unexpected = sorted(set(expected) - set(weights.layout)), sorted(set(weights.layout) - set(expected))
    if missing or unexpected:
        untied = " (config.json: tie_word_embeddings is false)" if missing == ["lm_head.weight"] else ""
        raise CheckpointError(f"the weights do not match config.json: missing {missing[:5]}{untied}, "
                              f"unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if weights.layout[name][1] != shape:
            raise CheckpointError(f"{name} is {list(weights.layout[name][1])} in {weights.file_of[name]}, but "
                                  f"config.json makes it {list(shape)}: the config does not describe these weights")
    if model.cfg.tie_embeddings and "lm_head.weight" in weights.layout:
        head, embedding = weights.tensor("lm_head.weight"), weights.tensor("model.embed_tokens.weight")
        if head.dtype != embedding.dtype or not torch.equal(head, embedding):
            raise CheckpointError("config.json ties the output head to the embedding (tie_word_embeddings), but "
                                  "the file's lm_head.weight differs from model.embed_tokens.weight: one of the "
                                  "two would be lost")


def load_hf_llama(path: str, dtype=torch.float32, device="cpu") -> Transformer:
    """Lazily, so that memory holds the model and one tensor, never two models: everything is checked on
    the files' headers first, the parameters are then allocated once, empty, on `device`, and each
    tensor is read from its memory-mapped file and copied into its parameter, converted to `dtype`."""
    cfg = config_from_hf(read_hf_json(os.path.join(path, "config.json")))
    weights = hf_weights(path)
    with torch.device("meta"):  # the shapes, without allocating or initialising: the weights come from disk
        model = Transformer(cfg)
    check_hf_layout(model, weights)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty gave each its own tensor
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is named once, as the embedding
            param.copy_(weights.tensor(ours_to_hf(name)))
    # The rope tables were made on the meta device; rebuild them for real.
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model


def to_hf(model: Transformer) -> tuple[dict, dict]:
    """The config.json dict and the state dict (HF names) that transformers.LlamaForCausalLM loads."""
    cfg = model.cfg
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
                 "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                 "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
                 "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                 "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
                 "hidden_act": "silu", "head_dim": cfg.head_dim, "torch_dtype": str(model.embed.weight.dtype)[6:]}
    state = {ours_to_hf(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        del state["lm_head.weight"]  # safetensors stores no shared tensors; HF re-ties on load
    return hf_config, state


def save_hf(model, path: str):
    """Write a model.Transformer as a Hugging Face Llama directory (config.json + model.safetensors)
    that transformers.LlamaForCausalLM and load_hf_llama load."""
    from safetensors.torch import save_file  # an optional dependency: only this function needs it
    hf_config, state = to_hf(model)
    make_dir(path)
    with atomic_write(os.path.join(path, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_json(os.path.join(path, "config.json"), hf_config)
