"""TAIA for a checkpoint you already have, in Hugging Face format: the model people fine-tuned with
some other tool, turned into its TAIA version (tuned attention, original FFN) as a new directory that
transformers (or any tool that reads Hugging Face directories) loads as usual.

    python taia_hf.py full BASE_DIR TUNED_DIR OUT_DIR      # a full fine-tune of BASE_DIR
    python taia_hf.py lora BASE_DIR ADAPTER_DIR OUT_DIR    # a PEFT LoRA adapter of BASE_DIR

`full` takes every tensor from TUNED_DIR except the FFN's, which come from BASE_DIR; `lora` merges the
deltas of the attention projections into BASE_DIR's weights and drops every other delta (FFN, head), the
authors' q/k/v/o route (PEFT is not needed). `--mode` picks another mode of taia.py, `--weights` any point
between base and tuned. Which tensor is attention, FFN, norm, embedding or head is taia.GROUP_TABLE's
answer, by module name.

Only safetensors are read. The output is written tensor by tensor, in the base's shards and with each
shard's header copied from the base (names, dtypes, shapes and byte offsets are the same; only the
bytes of the tensors differ), so memory holds about two tensors at a time, never two models.
Everything is checked before anything is written (but a result that overflows to inf, found as it is
written), and the directory appears only once it is complete.
"""
import argparse
import json
import math
import os
import re
import shutil
import struct
from collections import Counter
from contextlib import contextmanager

import torch

import taia
from checkpoints.hf import HF_INDEX, CheckpointError, Safetensors, hf_weights, read_hf_json
from common import OneLineParser, UserError, inside, make_dir, run_cli

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Files of a model directory that hold weights (an adapter's too): never copied to the output, whose
# weights are its own; nor an adapter's config, which would make transformers read the output as an adapter.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


# ---- reading: a directory's safetensors, lazily (common.Safetensors) --------------------------------

@contextmanager
def reading(what: str):
    """common.py's CheckpointError (a file missing, cut short, not safetensors or not floating point; JSON
    that is not an object) as a UserError that names the input."""
    try:
        yield
    except CheckpointError as e:
        raise UserError(f"{what}: {e}") from None


def read_json(path: str, what: str) -> dict:
    with reading(what):
        return read_hf_json(path)


def open_model_dir(path: str, what: str) -> tuple[dict, Safetensors]:
    """config.json and the weights of a Hugging Face model directory: model.safetensors, or the shards
    model.safetensors.index.json names (common.hf_weights), every tensor's group known."""
    if not os.path.isdir(path):
        raise UserError(f"{what} {path}: no such directory")
    config = read_json(os.path.join(path, "config.json"), f"{what} {path}")
    with reading(f"{what} {path}"):
        weights = hf_weights(path)
    for name in weights.layout:
        check_placed(name, what)
    return config, weights


def check_placed(name: str, what: str) -> str:
    """taia.group_of, with a tensor the table does not place as the user's one-line error naming the file."""
    try:
        return taia.group_of(name)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


# ---- writing: the base's shards, one tensor at a time -------------------------------------------------

def write_like(out_dir: str, base: Safetensors, tensor_for):
    """Write every shard of `base` again under out_dir, with `tensor_for(name)` as each tensor's value.
    The header (names, dtypes, shapes, byte offsets, metadata) is the base shard's own, copied byte for
    byte; then each tensor's bytes, in the order of its offsets, one tensor in memory at a time. The
    base's shard index, if it has one, is copied: it still names the right shard for every tensor."""
    if os.path.isfile(os.path.join(base.folder, HF_INDEX)):
        shutil.copy2(os.path.join(base.folder, HF_INDEX), os.path.join(out_dir, HF_INDEX))
    for file in base.files:
        with open(os.path.join(base.folder, file), "rb") as f:  # a name of the base's index, read only
            header_bytes = f.read(8)
            header_bytes += f.read(struct.unpack("<Q", header_bytes)[0])
        header = json.loads(header_bytes[8:])
        names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        with open(inside(out_dir, file), "wb") as out:
            out.write(header_bytes)
            for name in names:
                tensor = tensor_for(name).contiguous()
                start, end = header[name]["data_offsets"]
                assert out.tell() == len(header_bytes) + start and tensor.nbytes == end - start, name
                assert tuple(tensor.shape) == tuple(header[name]["shape"]), name
                out.write(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy


def copy_other_files(src: str, out_dir: str):
    """config.json, the tokenizer's files, generation_config.json ...: every file but weights."""
    for file in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, file)) and not file.endswith(WEIGHT_SUFFIXES) and \
                file not in (HF_INDEX, ADAPTER_CONFIG):
            shutil.copy2(os.path.join(src, file), os.path.join(out_dir, file))


def check_out_dir(out_dir: str, inputs: list[str]):
    if any(os.path.realpath(out_dir) == os.path.realpath(p) for p in inputs):
        raise UserError(f"OUT_DIR {out_dir} is one of the input directories: choose a new folder")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"OUT_DIR {out_dir} already exists and is not empty: choose a new folder "
                        "(nothing is overwritten)")


def write_model_dir(out_dir: str, files_from: str, base: Safetensors, tensor_for):
    """The whole output directory, written in a hidden folder beside it and renamed once complete: an
    error (or a kill) midway leaves no half-written model under OUT_DIR."""
    for file in base.files:  # names from BASE_DIR's index, which OUT_DIR's repeats: they must stay inside it
        try:
            inside(out_dir, file)
        except UserError:
            raise UserError(f"BASE_DIR's {HF_INDEX} names the shard {file!r}, outside its folder: OUT_DIR, "
                            "sharded like BASE_DIR, cannot hold it (move the shard into BASE_DIR)") from None
    parent = os.path.dirname(os.path.abspath(out_dir))
    make_dir(parent)
    tmp = os.path.join(parent, f".taia_hf-{os.path.basename(os.path.abspath(out_dir))}-{os.getpid()}")
    try:
        os.mkdir(tmp)
    except OSError as e:  # FileExistsError included: a folder of that name is not ours to reuse
        raise UserError(f"cannot create the folder {tmp}: {e.strerror or e}") from None
    try:
        copy_other_files(files_from, tmp)
        write_like(tmp, base, tensor_for)
        os.rename(tmp, out_dir)  # onto an absent or empty folder: atomic
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


# ---- the modes ------------------------------------------------------------------------------------

def tied_head(config: dict, names) -> bool:
    """Whether the output head is the embedding, one tensor: config.json says so, or the files hold no head."""
    return config.get("tie_word_embeddings") is True or not any(taia.group_of(n) == "head" for n in names)


def weights_from_args(args, names, tied: bool) -> dict:
    """--weights attention=1,ffn=0.5 (groups not named stay tuned, as in taia.interpolate), else the
    point of --mode. A tied head and embedding are one tensor: one weight (taia.interpolate refuses too)."""
    if args.weights is None:
        return taia.mode_weights(args.mode, args.others)
    weights = {}
    for item in args.weights.split(","):
        group, _, value = item.partition("=")
        if group.strip() in weights:
            raise UserError(f"--weights {args.weights}: {group.strip()} is given twice")
        try:
            weights[group.strip()] = float(value)
        except ValueError:
            raise UserError(f"--weights {args.weights}: write group=number,..., e.g. attention=1,ffn=0.5") from None
    try:
        taia.check_weights(weights, names)
    except ValueError as e:
        raise UserError(f"--weights {args.weights}: {e}") from None
    if tied and weights.get("embedding", 1.0) != weights.get("head", 1.0):
        raise UserError(f"--weights {args.weights}: the output head is tied to the embedding (one tensor): "
                        "give embedding and head the same weight")
    return weights


def finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A computed tensor, refused if it overflowed (a huge --weights or lora_alpha): inf or NaN is never written."""
    if not torch.isfinite(tensor).all():
        raise UserError(f"{name}: the result is not finite (inf or NaN; a weight or lora_alpha too large?)")
    return tensor


def describe(weights: dict, names) -> str:
    """Where each group came from, e.g. 'attention (8): tuned, ffn (6): base, ...'."""
    groups = [taia.group_of(name) for name in names]
    sides = []
    for group in taia.GROUPS:
        if group in groups:
            a = weights.get(group, 1.0)
            side = "base" if a == 0 else "tuned" if a == 1 else f"base + {a:g} x (tuned - base)"
            sides.append(f"{group} ({groups.count(group)}): {side}")
    return ", ".join(sides)


# ---- full: two directories ------------------------------------------------------------------------

def full(args):
    check_out_dir(args.out_dir, [args.base_dir, args.tuned_dir])
    base_config, base = open_model_dir(args.base_dir, "BASE_DIR")
    tuned_config, tuned = open_model_dir(args.tuned_dir, "TUNED_DIR")
    if base_config.get("model_type") != tuned_config.get("model_type"):
        raise UserError(f"TUNED_DIR is a {tuned_config.get('model_type')!r} model, BASE_DIR a "
                        f"{base_config.get('model_type')!r}: not the same architecture")
    for name in sorted(set(base.layout) | set(tuned.layout)):
        if name not in tuned.layout or name not in base.layout:
            side = "TUNED_DIR" if name not in tuned.layout else "BASE_DIR"
            raise UserError(f"{name} is missing from {side}: the two directories hold different tensors")
        if base.layout[name] != tuned.layout[name]:
            raise UserError(f"{name} is {tuned.layout[name][0]} {list(tuned.layout[name][1])} in TUNED_DIR, "
                            f"{base.layout[name][0]} {list(base.layout[name][1])} in BASE_DIR")
    tied = tied_head(base_config, base.layout) or tied_head(tuned_config, tuned.layout)
    weights = weights_from_args(args, base.layout, tied)

    def tensor_for(name):
        a = taia.weight_of(weights, name)
        if a == 0 or a == 1:
            return base.tensor(name) if a == 0 else tuned.tensor(name)
        b, t = base.tensor(name), tuned.tensor(name)
        b32 = b.float()  # in float32: a bf16 difference would lose bits
        return finite((t.float() - b32).mul_(a).add_(b32).to(b.dtype), name)  # b + a * (t - b), in one new tensor

    # The config and tokenizer of the fine-tuned model: its chat template and special tokens are the
    # ones the tuned attention learned.
    write_model_dir(args.out_dir, args.tuned_dir, base, tensor_for)
    print(f"wrote {args.out_dir}: {describe(weights, base.layout)}")


# ---- lora: a base and a PEFT adapter ------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."  # PEFT's names: base_model.model.<module>.lora_A.weight / .lora_B.weight
# Variants whose merge is more than W + B A * scale, or that train more than the adapters: refused when set.
# aLoRA (alora_invocation_tokens) acts only from its invocation tokens on: PEFT refuses to merge it.
VARIANTS = ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "modules_to_save", "layer_replication",
            "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora",
            "velora_config", "monteclora_config", "kasa_config", "arrow_config", "megatron_config")
# init_lora_weights values (besides true and false) that only choose where A and B start. PiSSA, OLoRA,
# CorDA, LoftQ and LoRA-GA also move the base weight by the initial B A, which PEFT redoes on the base it
# loads the adapter onto (W + B A * scale would count that B A twice); MiCA is a variant.
PLAIN_INITS = ("gaussian", "eva", "orthogonal")
# transformers' Conv1D layers store their weight as (in, out): their delta B A is transposed. PEFT decides
# this per layer by its type, whatever fan_in_fan_out says (it saves the flag of the last layer it adapted);
# every other layer here is an nn.Linear. A family with Conv1D layers added to taia.GROUP_TABLE goes here too.
CONV1D = {"gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def names_or_regex(config: dict, key: str, what: str, required: bool = False):
    """config[key] as PEFT reads it: a list of module names or a regular expression (None if optional)."""
    value = config.get(key)
    if value is None and not required:
        return None
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise UserError(f"{what}: {key} must be a list of names or a regular expression, not {value!r}")
    for pattern in [value] if isinstance(value, str) else value if key == "layers_pattern" else []:  # regexes
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"{what}: {key} {pattern!r} is not a regular expression ({e})") from None
    return value


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json as PEFT writes it, with what this merge honours checked: a plain LoRA (r,
    lora_alpha, use_rslora, target_modules, exclude_modules, layers_to_transform); the rest refused."""
    if not os.path.isdir(adapter_dir):
        raise UserError(f"ADAPTER_DIR {adapter_dir}: no such directory")
    config = read_json(os.path.join(adapter_dir, ADAPTER_CONFIG), f"ADAPTER_DIR {adapter_dir}")
    what = f"ADAPTER_DIR: {ADAPTER_CONFIG}"
    if config.get("peft_type") != "LORA":
        raise UserError(f"{what}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (type(r) is int and r > 0 and type(alpha) in (int, float) and math.isfinite(alpha)):  # type: not bool
        raise UserError(f"{what}: r must be a positive integer and lora_alpha a finite number, not {r!r} and {alpha!r}")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        names_or_regex(config, key, what, required=key == "target_modules")
    layers = config.get("layers_to_transform")
    if not (layers is None or type(layers) is int or (type(layers) is list and all(type(i) is int for i in layers))):
        raise UserError(f"{what}: layers_to_transform must be a layer number or a list of them, not {layers!r}")
    for key in VARIANTS:
        if config.get(key):
            raise UserError(f"{what}: {key} = {config[key]!r} is not supported here (plain LoRA adapters only)")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in PLAIN_INITS):
        raise UserError(f"{what}: init_lora_weights = {init!r} is not supported here: PiSSA, OLoRA, CorDA, LoftQ and "
                        "LoRA-GA move the base weights too (plain inits only: true, false, gaussian, eva, orthogonal)")
    if config.get("bias", "none") != "none":
        raise UserError(f"{what}: bias = {config['bias']!r} (trained biases) is not supported here")
    return config


def named(module: str, names: list) -> bool:
    return module in names or any(module.endswith("." + n) for n in names)


def left_out(module: str, config: dict) -> str | None:
    """None if PEFT, loading the adapter, puts a LoRA layer on `module` (peft's check_target_module_exists),
    else why not. A string is a regular expression the whole name must match; a list names modules by their
    last names ('q_proj' is 'model.layers.0.self_attn.q_proj'), and layers_to_transform keeps those in the
    listed blocks (the number after layers_pattern, else the first number in the name)."""
    exclude, target, layers = config.get("exclude_modules"), config["target_modules"], config.get("layers_to_transform")
    if exclude and (re.fullmatch(exclude, module) if isinstance(exclude, str) else named(module, exclude)):
        return f"excluded by exclude_modules {exclude!r}"
    if isinstance(target, str):
        if target.lower() == "all-linear":  # every linear layer but the output head
            return None if taia.group_of(module + ".weight") != "head" else "the head, not in 'all-linear'"
        return None if re.fullmatch(target, module) else f"not in target_modules {target!r}"
    if module in target:  # named in full: layers_to_transform does not apply
        return None
    if not named(module, target):
        return f"not in target_modules {target!r}"
    if layers is None or layers == []:
        return None
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    block = next((int(m["idx"]) for m in (re.match(regex, module) for regex in regexes) if m), None)
    return None if block in ([layers] if type(layers) is int else layers) else f"outside layers_to_transform {layers!r}"


def read_adapters(adapter_dir: str, config: dict, base: Safetensors, model_type) -> tuple[Safetensors, dict, set]:
    """{base weight name: module name in the adapter file} for every adapted layer, checked against the
    adapter config and the base's shapes; and the weights whose delta is transposed (Conv1D's)."""
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        raise UserError(f"ADAPTER_DIR {adapter_dir} has no {ADAPTER_WEIGHTS}: only safetensors are read")
    with reading(f"ADAPTER_DIR {adapter_dir}"):
        adapter = Safetensors(adapter_dir, [ADAPTER_WEIGHTS])
    modules, transposed = {}, set()
    for name in adapter.layout:
        match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_[AB]\.weight", name)
        if match is None:
            raise UserError(f"ADAPTER_DIR: {name} is not a LoRA matrix (base_model.model.<module>.lora_A.weight)")
        modules[match.group(1) + ".weight"] = match.group(1)
    r = config["r"]
    for weight, module in modules.items():
        a_name, b_name = (f"{PEFT_PREFIX}{module}.lora_{x}.weight" for x in "AB")
        if a_name not in adapter.layout or b_name not in adapter.layout:
            raise UserError(f"ADAPTER_DIR: {module} has lora_A or lora_B but not both")
        if weight not in base.layout:
            raise UserError(f"ADAPTER_DIR: the adapted layer {module} has no weight {weight} in BASE_DIR")
        check_placed(weight, "ADAPTER_DIR")
        why = left_out(module, config)
        if why:  # PEFT would ignore these matrices: the file and its config disagree
            raise UserError(f"ADAPTER_DIR: {module} has an adapter but is {why} (PEFT would not load it)")
        conv1d = ".".join(module.split(".")[-2:]) in CONV1D.get(model_type, ())
        (_, a_shape), (_, b_shape), (_, w_shape) = adapter.layout[a_name], adapter.layout[b_name], base.layout[weight]
        out_in = w_shape[::-1] if conv1d else w_shape
        if len(w_shape) != 2 or a_shape != (r, out_in[1]) or b_shape != (out_in[0], r):
            raise UserError(f"ADAPTER_DIR: {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not fit "
                            f"r = {r} and the base weight {list(w_shape)}{' (Conv1D: in, out)' if conv1d else ''}")
        if conv1d:
            transposed.add(weight)
    return adapter, modules, transposed


def deltas(modules: dict, weights: dict, merged: bool) -> tuple[int, str]:
    """How many deltas are merged (or dropped), and which: 'attention: q_proj x2; head: lm_head x1'."""
    counts = Counter()
    for name in modules:
        a = taia.weight_of(weights, name)
        if (a != 0) == merged:
            counts[taia.group_of(name) + (f" at {a:g}" if a not in (0, 1) else ""), name.split(".")[-2]] += 1
    by_group = {}
    for (group, layer), n in sorted(counts.items()):
        by_group.setdefault(group, []).append(f"{layer} x{n}")
    return sum(counts.values()), "; ".join(f"{g}: {', '.join(layers)}" for g, layers in by_group.items()) or "none"


def lora(args):
    check_out_dir(args.out_dir, [args.base_dir, args.adapter_dir])
    base_config, base = open_model_dir(args.base_dir, "BASE_DIR")
    config = read_adapter_config(args.adapter_dir)
    adapter, modules, transposed = read_adapters(args.adapter_dir, config, base, base_config.get("model_type"))
    weights = weights_from_args(args, base.layout, tied_head(base_config, base.layout))
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r  # rsLoRA: alpha / sqrt(r)

    def tensor_for(name):
        w = base.tensor(name)
        a = taia.weight_of(weights, name)
        if name not in modules or a == 0:
            return w
        lora_a, lora_b = (adapter.tensor(f"{PEFT_PREFIX}{modules[name]}.lora_{x}.weight").float() for x in "AB")
        delta = (lora_b @ lora_a) * scale  # as PEFT merges: W + B A * scale
        delta = delta.T if name in transposed else delta  # a Conv1D weight is (in, out)
        return finite(delta.mul_(a).add_(w.float()).to(w.dtype), name)  # w + a * delta, in the delta's memory

    write_model_dir(args.out_dir, args.base_dir, base, tensor_for)
    (n_merged, merged), (n_dropped, dropped) = deltas(modules, weights, True), deltas(modules, weights, False)
    print(f"wrote {args.out_dir}: merged {n_merged} LoRA deltas ({merged}), dropped {n_dropped} ({dropped}), "
          f"scale {scale:g}")


def main():
    p = OneLineParser(description="\n\n".join(__doc__.split("\n\n")[:2]), prog="taia_hf.py",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="{full,lora}", parser_class=OneLineParser)
    full_p = commands.add_parser("full", help="BASE_DIR + a fully fine-tuned TUNED_DIR -> OUT_DIR")
    full_p.add_argument("base_dir", metavar="BASE_DIR", help="the pretrained model (a Hugging Face directory)")
    full_p.add_argument("tuned_dir", metavar="TUNED_DIR", help="the same architecture after full fine-tuning; "
                        "OUT_DIR gets its config and tokenizer files")
    lora_p = commands.add_parser("lora", help="BASE_DIR + a PEFT LoRA ADAPTER_DIR -> OUT_DIR")
    lora_p.add_argument("base_dir", metavar="BASE_DIR", help="the model the adapter was trained on; OUT_DIR gets "
                        "its config and tokenizer files")
    lora_p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="adapter_config.json + adapter_model.safetensors")
    for sub in (full_p, lora_p):
        sub.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder for the result")
        sub.add_argument("--mode", choices=taia.MODES, help="which groups come from the "
                         "fine-tune (default: taia, all but the FFN; with lora: the attention deltas only, the "
                         "authors' q/k/v/o route; --weights ffn=0 merges every delta but the FFN's)")
        sub.add_argument("--weights", metavar="GROUP=A,...", help="instead of --mode, any point between base "
                         "and tuned per group, e.g. attention=1,ffn=0.5 (groups not named stay tuned)")
    full_p.add_argument("--others", default="tuned", choices=("tuned", "base"), help="with --mode taia or taif: "
                        "norms, embeddings and head from the fine-tune (default, as the authors) or the base")
    lora_p.set_defaults(others="base")  # a mode merges only the deltas of its groups: taia, attention's
    args = p.parse_args()
    if args.weights is not None and args.mode is not None:  # one would be dropped without a word
        p.error("give --mode or --weights, not both (--weights is any point; --mode one of its corners)")
    args.mode = args.mode or "taia"
    full(args) if args.command == "full" else lora(args)


if __name__ == "__main__":
    run_cli(main)
