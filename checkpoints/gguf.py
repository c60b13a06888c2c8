"""GGUF files (llama.cpp's format, the one Ollama and LM Studio keep models in) as a base model.

A Llama's metadata becomes our ModelConfig; its tensors are dequantized to float32 by the gguf package
(llama.cpp's own Python reader); the rows of q_proj and k_proj, which llama.cpp's converter reorders for
its interleaved rotary layout, are put back in the half-split order model.py uses; and the tokenizer is
rebuilt from the file's own vocabulary, merges and special ids, its chat template read from the
metadata. Everything is checked on the header before a weight is read: the architecture, every tensor's
name, shape and type, that the file holds every byte its header promises, the tokenizer's size.

    python -m checkpoints.gguf MODEL.gguf OUT_DIR    # the same model as a Hugging Face directory
"""
import functools
import os

import numpy as np
import torch

from checkpoints.hf import CheckpointError
from data.tokenizer import HFTokenizer, byte_level_bpe, pre_tokenizer
from model import ModelConfig, Transformer, rope_cos_sin

# The weight types read (each tested against transformers' own dequantization, tests/test_gguf.py). The
# gguf package knows more (IQ*, TQ*, ...); a file using one is refused by name rather than trusted untested.
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Our names -> llama.cpp's: 'blocks.3.attn.q_proj.weight' is 'blk.3.attn_q.weight'.
GGUF_NAMES = {"embed": "token_embd", "norm": "output_norm", "lm_head": "output"}
GGUF_BLOCK_NAMES = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
                    "attn.o_proj": "attn_output", "ffn.gate_proj": "ffn_gate", "ffn.up_proj": "ffn_up",
                    "ffn.down_proj": "ffn_down", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def ours_to_gguf(name: str) -> str:
    module, _, kind = name.rpartition(".")  # kind: weight
    if module.startswith("blocks."):
        _, layer, part = module.split(".", 2)
        return f"blk.{layer}.{GGUF_BLOCK_NAMES[part]}.{kind}"
    return f"{GGUF_NAMES[module]}.{kind}"


def is_gguf(path: str) -> bool:
    """A file whose first four bytes are GGUF's magic (a directory is a Hugging Face checkpoint)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---- reading the file ---------------------------------------------------------------------------------

def reader_class():
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None

    class CheckedReader(GGUFReader):
        """gguf's reader, which slices every field and tensor out of the memory-mapped file through _get,
        with that one method redone: a slice past the end is reported as a file cut short (not as a numpy
        shape error), and slices are taken from a plain ndarray view of the map (numpy's memmap class
        costs microseconds a slice, and a 50,000-token vocabulary is 250,000 slices: SmolLM2's header
        parses in 1.5 s, not 5.3). A tensor type gguf does not know is named with its tensor."""

        def _get(self, offset, dtype, count=1, override_order=None):
            data = self.__dict__.get("plain")
            if data is None:
                data = self.plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            if end > len(data):
                raise CheckpointError(f"the file ends at byte {len(data):,}, but its header puts data up to byte "
                                      f"{end:,}: it is cut short (an interrupted download?)")
            values = data[offset:end].view(dtype=dtype)[:count]  # (as GGUFReader._get does)
            return values.view(values.dtype.newbyteorder(override_order or self.byte_order))

        def _build_tensors(self, start_offs, fields):
            for info in fields:  # GGUF's tensor info: name length, name, n_dims, dims, type, offset
                if int(info.parts[4][0]) not in known_types:
                    raise CheckpointError(f"{bytes(info.parts[1]).decode(errors='replace')} has weight type "
                                          f"{int(info.parts[4][0])}, which the gguf package does not know (a newer "
                                          "llama.cpp's? pip install -U gguf)")
            super()._build_tensors(start_offs, fields)

    known_types = {int(kind) for kind in GGMLQuantizationType}

    return CheckedReader


@functools.lru_cache(maxsize=1)
def read(path: str, size: int, mtime_ns: int):
    """The parsed header of path (metadata and tensor views of the memory-mapped file). Parsing a real
    file's 50,000-token vocabulary takes seconds, and a run asks several times (its checks, its
    template, its weights): cached by path, size and modification time."""
    if size == 0:
        raise CheckpointError("the file is empty")
    try:
        return reader_class()(path)
    except CheckpointError:  # (a ValueError too: the two CheckedReader words for a failure)
        raise
    except ValueError as e:  # gguf's own checks: magic, version, a field type it does not know
        raise CheckpointError(f"not a GGUF file this reader can read: {e}") from None
    except KeyError as e:  # a field or tensor listed twice
        raise CheckpointError(f"not a valid GGUF file: {e}") from None


def open_gguf(path: str):
    try:
        stat = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot read it: {e.strerror or e}") from None
    return read(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def field(reader, key: str, default=None):
    """A metadata value (a str, number, bool or list), or default when the file does not have it."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def number(reader, key: str, kind: type, default=None):
    """A metadata number, checked: an int a positive integer, a float a positive finite number."""
    value = field(reader, key, default)
    if value is None:
        raise CheckpointError(f"its metadata has no {key}")
    ok = (type(value) is int and value > 0) if kind is int else (type(value) in (int, float) and 0 < value < np.inf)
    if not ok:
        raise CheckpointError(f"{key} must be a positive {'integer' if kind is int else 'number'}, not {value!r}")
    return value


def config_from_gguf(reader) -> ModelConfig:
    """Our config from a Llama's metadata (llama.cpp's keys), refusing what model.Transformer cannot hold."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"general.architecture is {arch!r}: only Llama models (llama) are read into "
                              "model.Transformer")
    tensors = {t.name for t in reader.tensors}
    if field(reader, "llama.expert_count"):
        raise CheckpointError("a mixture of experts (llama.expert_count) is not supported by this model")
    if field(reader, "llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise CheckpointError("RoPE scaling (e.g. Llama 3.1's) is not supported by this model")
    n_heads = number(reader, "llama.attention.head_count", int)
    sizes = dict(dim=number(reader, "llama.embedding_length", int), n_layers=number(reader, "llama.block_count", int),
                 n_heads=n_heads, n_kv_heads=number(reader, "llama.attention.head_count_kv", int, n_heads),
                 hidden_dim=number(reader, "llama.feed_forward_length", int),
                 vocab_size=embedding_rows(reader),
                 norm_eps=number(reader, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
                 rope_theta=number(reader, "llama.rope.freq_base", float, 10000.0),
                 max_seq_len=number(reader, "llama.context_length", int, 2048),
                 tie_embeddings="output.weight" not in tensors)
    if sizes["max_seq_len"] > 2 ** 22:  # the RoPE tables alone would take gigabytes
        raise CheckpointError(f"llama.context_length {sizes['max_seq_len']:,} is beyond what this loader reads")
    try:
        cfg = ModelConfig(**sizes)
    except ValueError as e:  # heads that do not divide the width
        raise CheckpointError(f"its metadata does not describe a valid model: {e}") from None
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if number(reader, key, int, cfg.head_dim) != cfg.head_dim:
            raise CheckpointError(f"{key} {field(reader, key)} != embedding_length / head_count: not supported")
    return cfg


def embedding_rows(reader) -> int:
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise CheckpointError("it has no token embedding (token_embd.weight) of two dimensions")
    return int(embedding.shape[1])  # GGUF lists dimensions innermost first: (dim, vocab)


def check_tensors(reader, cfg: ModelConfig):
    """The file holds exactly the tensors the model has, each with its shape and a type read here."""
    with torch.device("meta"):
        expected = {ours_to_gguf(k): tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        del expected["output.weight"]  # llama.cpp stores a tied head once, as the embedding
    found = {t.name: t for t in reader.tensors}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"its tensors are not a Llama's of this size: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        tensor = found[name]
        if tuple(int(d) for d in reversed(tensor.shape)) != shape:
            raise CheckpointError(f"{name} is {list(reversed(tensor.shape.tolist()))}, but the metadata makes it "
                                  f"{list(shape)}: the metadata does not describe these weights")
        if tensor.tensor_type.name not in SUPPORTED:
            raise CheckpointError(f"{name} is {tensor.tensor_type.name}: the weight types read are "
                                  f"{', '.join(SUPPORTED)}")


def check_tokenizer(reader, cfg: ModelConfig):
    """A byte-level BPE vocabulary (tokenizer.ggml.model gpt2, as Llama 3 and SmolLM have) of the
    embedding's size, with BOS and EOS ids inside it."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind == "llama":
        raise CheckpointError("its tokenizer is sentencepiece's kind (tokenizer.ggml.model llama, as Llama-2 and "
                              "TinyLlama have), which is not rebuilt from GGUF here: use the model's Hugging Face "
                              "directory (with its tokenizer.model)")
    if kind != "gpt2":
        raise CheckpointError(f"tokenizer.ggml.model is {kind!r}: only byte-level BPE (gpt2) tokenizers are read")
    size = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    if size != cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {size} pieces, the model {cfg.vocab_size}: they do not belong together")
    for name in ("bos", "eos"):
        i = field(reader, f"tokenizer.ggml.{name}_token_id")
        if type(i) is not int or not 0 <= i < size:
            raise CheckpointError(f"tokenizer.ggml.{name}_token_id is {i!r}: not a token of its vocabulary")
    try:
        pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def check_gguf(path: str) -> ModelConfig:
    """Everything that can be checked before a weight is read; the model's config."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    check_tensors(reader, cfg)
    check_tokenizer(reader, cfg)
    return cfg


# ---- the weights and the tokenizer ----------------------------------------------------------------------

def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: within each head llama.cpp interleaves the two
    halves of the rotary dimensions (row 2i is HF's row i, row 2i + 1 its row i + head_dim / 2)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_tensor(tensor, cfg: ModelConfig) -> torch.Tensor:
    """One tensor as float32, in our layout."""
    from gguf.quants import dequantize
    # (F32 tensors come back as read-only views of the file: np.require copies those, and only those.)
    values = torch.from_numpy(np.require(dequantize(tensor.data, tensor.tensor_type), np.float32, "W"))
    values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if tensor.name.endswith(".attn_q.weight"):
        return unpermute(values, cfg.n_heads)
    if tensor.name.endswith(".attn_k.weight"):
        return unpermute(values, cfg.n_kv_heads)
    return values


def tokenizer_from_gguf(reader, where: str) -> HFTokenizer:
    try:
        tokenizer = byte_level_bpe(field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges", []),
                                   field(reader, "tokenizer.ggml.token_type", []),
                                   field(reader, "tokenizer.ggml.pre", "default"))
    except ValueError as e:
        raise CheckpointError(f"its tokenizer: {e}") from None
    return HFTokenizer(tokenizer, field(reader, "tokenizer.ggml.bos_token_id"),
                       field(reader, "tokenizer.ggml.eos_token_id"), field(reader, "tokenizer.chat_template"), where)


def load_gguf_model(path: str, device="cpu") -> Transformer:
    """The model, float32 on device: memory holds it and one dequantized tensor more."""
    cfg = check_gguf(path)
    tensors = {t.name: t for t in open_gguf(path).tensors}
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty gave each its own tensor
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is named once, as the embedding
            param.copy_(read_tensor(tensors[ours_to_gguf(name)], cfg))
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # made on meta above: made for real
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval()


def load_gguf_tokenizer(path: str) -> HFTokenizer:
    return tokenizer_from_gguf(open_gguf(path), path)


# ---- python -m checkpoints.gguf MODEL.gguf OUT_DIR ------------------------------------------------------

def main(argv=None):
    from checkpoints.hf import read_hf_json, save_hf
    from common import OneLineParser, UserError, write_json
    p = OneLineParser(description="Write a GGUF file's Llama as a Hugging Face directory (config.json, "
                                  "model.safetensors in float32, tokenizer.json, tokenizer_config.json) that "
                                  "transformers loads.")
    p.add_argument("gguf", help="a Llama GGUF file")
    p.add_argument("out_dir", help="a new (or empty) folder")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        raise UserError(f"{args.out_dir} exists and is not an empty folder: not overwritten")
    if not is_gguf(args.gguf):
        raise UserError(f"{args.gguf}: not a GGUF file")
    try:
        model, tokenizer = load_gguf_model(args.gguf), load_gguf_tokenizer(args.gguf)
    except CheckpointError as e:
        raise UserError(f"{args.gguf}: {e}") from None
    save_hf(model, args.out_dir)
    tokenizer.save(args.out_dir)
    config = read_hf_json(os.path.join(args.out_dir, "config.json"))
    write_json(os.path.join(args.out_dir, "config.json"),
               {**config, "bos_token_id": tokenizer.bos_id(), "eos_token_id": tokenizer.eos_id()})
    print(f"{args.gguf} -> {args.out_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    from common import run_cli
    run_cli(main)
