"""Talk to, or evaluate, any TAIA mode of a model fine-tuned by train.py.

    python infer.py --mode taia --prompt "Instruction: city for Kalo? Response:"
    python infer.py --modes base,vanilla,taia,taif --eval out/data/ood_test.jsonl

Modes (see taia.py): base (pretrained weights), vanilla (all fine-tuning updates), taia (tuned
attention, original FFN: rebuilt from the FFN snapshot), taif (tuned FFN, original attention), and for
the provenance ablation only-<group> (only that group tuned, the rest base; groups: attention, ffn,
norm, embedding, head).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, fields

import torch

import taia
from data.text import (PLAIN_TEMPLATE, DataError, apply_template, encode_example, example_batch, load_tokenizer,
                       read_examples)
from model import ModelConfig, Transformer

FILES = {"base": "base.pt", "tuned": "finetuned.pt", "snapshot": "ffn_snapshot.pt", "tokenizer": "tokenizer.model"}


def load_checkpoint(path: str, keys=("model", "config")) -> dict:
    """A dict holding at least `keys`. weights_only=True: a file can never run code when loaded."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated file, a pickle that would run code, not a checkpoint at all
        raise DataError(f"cannot load {path}: not a checkpoint of plain tensors (refused or corrupt)") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise DataError(f"{path} is not a checkpoint of this project (expected the keys {', '.join(keys)})")
    return ckpt


def config_from_dict(d) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    if not isinstance(d, dict) or set(d) - known:
        raise DataError(f"checkpoint config has unknown fields: {sorted(set(d) - known) if isinstance(d, dict) else d}")
    return ModelConfig(**d)


def check_tokenizer(sp, cfg: ModelConfig):
    if sp.vocab_size() != cfg.vocab_size:
        raise DataError(f"tokenizer has {sp.vocab_size()} pieces, the model {cfg.vocab_size}: they do not belong together")


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DataError(f"--device must be cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA GPU is available here")
    return device


def hf_tokenizer_path(hf_dir: str) -> str:
    path = os.path.join(hf_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise DataError(f"{hf_dir} has no tokenizer.model: --init_from needs the sentencepiece tokenizer that "
                        "Llama-2 and TinyLlama ship (a tokenizer.json alone, as Llama-3 ships, is not supported)")
    return path


def load_hf_base(hf_dir: str) -> tuple[ModelConfig, dict]:
    """Config and float32 weights of a Hugging Face Llama directory, with errors that name what is missing."""
    if not os.path.isdir(hf_dir):
        raise DataError(f"--init_from {hf_dir}: no such directory")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise DataError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    if not any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        raise DataError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json): only safetensors "
                        "checkpoints are read")
    hf_tokenizer_path(hf_dir)  # fail before loading gigabytes
    try:
        model = Transformer.from_pretrained(hf_dir)
    except (ValueError, KeyError, json.JSONDecodeError) as e:  # another architecture, a broken config
        raise DataError(f"{hf_dir}: {e}") from None
    return model.cfg, model.state_dict()


def model_from_state(cfg: ModelConfig, state: dict, device="cpu") -> Transformer:
    model = Transformer(cfg)
    taia.check_same_layout(model.state_dict(), state, "the model", "checkpoint")  # exact names and shapes
    model.load_state_dict(state)
    return model.to(device).eval()


class Weights:
    """The three files fine-tuning leaves in out_dir: base, tuned, and the FFN snapshot. A fine-tune of a
    Hugging Face model reads its base from that directory instead of base.pt (init_from: where it is now)."""

    def __init__(self, out_dir: str, init_from: str | None = None):
        tuned = load_checkpoint(os.path.join(out_dir, FILES["tuned"]), keys=("model", "config", "base_ffn"))
        init_from = init_from or tuned.get("init_from")
        if init_from:
            cfg, state = load_hf_base(init_from)
            base = {"model": state, "config": asdict(cfg)}
        else:
            base = load_checkpoint(os.path.join(out_dir, FILES["base"]))
        self.snapshot = load_checkpoint(os.path.join(out_dir, FILES["snapshot"]), keys=("ffn",))["ffn"]
        if base["config"] != tuned["config"]:
            raise DataError(f"{FILES['tuned']} in {out_dir} and its base {init_from or FILES['base']} are different "
                            "models")
        self.cfg = config_from_dict(base["config"])
        self.base, self.tuned = base["model"], tuned["model"]
        # The three files must belong together: the snapshot and the fine-tune name the same base FFN.
        base_ffn = {k: v for k, v in self.base.items() if taia.is_ffn(k)}
        if not (taia.fingerprint(self.snapshot) == tuned["base_ffn"] == taia.fingerprint(base_ffn)):
            raise DataError(f"{out_dir}: {FILES['snapshot']}, {FILES['tuned']} and {init_from or FILES['base']} do "
                            "not come from one run (the FFN fingerprints differ)")
        self.seed = base.get("seed")
        self.meta = {"pretrain": base.get("pretrain"), "finetune": tuned.get("finetune")}
        # Prompts are wrapped in the template the model was fine-tuned with.
        self.template = (tuned.get("finetune") or {}).get("template") or PLAIN_TEMPLATE

    def build(self, mode: str, device="cpu") -> Transformer:
        if mode == "taia":  # the method as deployed: tuned model, original FFN put back
            return taia.rebuild(model_from_state(self.cfg, self.tuned, device), self.snapshot)
        if mode.startswith("only-"):
            return model_from_state(self.cfg, taia.mix(self.base, self.tuned, {mode[5:]}), device)
        return model_from_state(self.cfg, taia.combine(self.base, self.tuned, mode), device)


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    known = set(taia.MODES) | {"only-" + g for g in taia.GROUPS}
    bad = [m for m in modes if m not in known]
    if bad or not modes:
        raise DataError(f"unknown mode {bad[0] if bad else text!r}: choose from {', '.join(sorted(known))}")
    return modes


def word_end_table(sp) -> torch.Tensor:
    """For every piece id: does it end the word before it? (EOS, a piece that starts a new word with
    sentencepiece's "▁" marker, or punctuation.)"""
    table = torch.zeros(sp.vocab_size(), dtype=torch.bool)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        table[i] = i == sp.eos_id() or piece.startswith("▁") or (piece.isascii() and not piece.isalnum()
                                                                 and not sp.is_byte(i) and not sp.is_control(i))
    return table


def score(model: Transformer, examples: list[dict], sp, template: str = PLAIN_TEMPLATE,
          batch_size: int = 128) -> dict:
    """{"exact", "answer"}: the share of examples right under each metric (see count_correct)."""
    counts = count_correct(model, examples, sp, template, batch_size)
    return {metric: n / len(examples) for metric, n in counts.items()}


@torch.no_grad()
def count_correct(model: Transformer, examples: list[dict], sp, template: str = PLAIN_TEMPLATE,
                  batch_size: int = 128) -> dict:
    """How many examples' greedy continuations are right, in two senses:
    - "exact": exactly the response, then EOS (the model answers and stops);
    - "answer": starts with the response as whole words (answer extraction, as the paper's evaluations
      read an answer out of a longer output; "Paris is the city..." counts, "Parisian" does not).
    Computed in one teacher-forced pass: greedy decoding reproduces the reference if and only if every
    reference token is the argmax given the reference tokens before it."""
    device = next(model.parameters()).device
    ends_word = word_end_table(sp).to(device)
    encoded = sorted((encode_example(e, sp, template) for e in examples), key=lambda pair: len(pair[0]))
    exact = answer = 0
    for ids, _ in encoded:
        if len(ids) - 1 > model.cfg.max_seq_len:
            raise DataError(f"an example of {len(ids) - 1} tokens exceeds max_seq_len {model.cfg.max_seq_len}")
    for i in range(0, len(encoded), batch_size):
        inputs, targets = example_batch(encoded[i:i + batch_size], pad_id=sp.eos_id())
        inputs, targets = inputs.to(device), targets.to(device)
        predicted = model(inputs).argmax(-1)
        is_eos = targets == sp.eos_id()  # the position right after the response
        hit = (predicted == targets) | (targets == -100)
        exact += int(hit.all(dim=1).sum())
        response_ok = (hit | is_eos).all(dim=1)
        stops_word = (ends_word[predicted] | ~is_eos).all(dim=1)
        answer += int((response_ok & stops_word).sum())
    return {"exact": exact, "answer": answer}


def evaluate(weights: Weights, modes: list[str], eval_sets: dict, sp, device="cpu", rank=0, world_size=1) -> dict:
    """{metric: {set name: {mode: accuracy}}} for both metrics of `score`, every mode, every set. Under
    torch.distributed each of world_size processes scores every world_size-th example and the counts are summed."""
    results = {"answer": {name: {} for name in eval_sets}, "exact": {name: {} for name in eval_sets}}
    for mode in modes:
        model = weights.build(mode, device)
        for name, examples in eval_sets.items():
            counts = count_correct(model, examples[rank::world_size], sp, weights.template)
            total = torch.tensor([counts["exact"], counts["answer"]], dtype=torch.float64, device=device)
            if world_size > 1:
                torch.distributed.all_reduce(total)
            results["exact"][name][mode], results["answer"][name][mode] = (total / len(examples)).tolist()
    return results


def format_table(results: dict, modes: list[str], title: str) -> str:
    """One row per evaluation set, one column per mode, accuracies in percent."""
    width = max(len(name) for name in [*results, title]) + 2
    cols = [max(9, len(m)) + 2 for m in modes]
    lines = [f"{title:<{width}}" + "".join(f"{m:>{c}}" for m, c in zip(modes, cols))]
    for name, row in results.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * row[m]:>{c - 1}.1f}%" for m, c in zip(modes, cols)))
    return "\n".join(lines)


def generate_text(model: Transformer, sp, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0, template: str = PLAIN_TEMPLATE) -> str:
    ids = [sp.bos_id()] + sp.encode(apply_template(template, prompt))
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    if max_new_tokens <= 0:
        raise DataError(f"the prompt ({len(ids)} tokens) leaves no room within max_seq_len {model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, sp.eos_id(),
                         torch.Generator(device).manual_seed(seed))
    new = [t for t in out[0, len(ids):].tolist() if t != sp.eos_id()]
    return sp.decode(new)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="where train.py left base.pt, finetuned.pt, "
                   "ffn_snapshot.pt and tokenizer.model (default: out)")
    p.add_argument("--init_from", metavar="DIR", help="the Hugging Face directory a --init_from fine-tune "
                   "started from, when it has moved since training")
    p.add_argument("--mode", default="taia", help="the mode to generate with (default: taia)")
    p.add_argument("--modes", default=None, help="comma-separated modes to evaluate side by side with --eval "
                   "(default: base,vanilla,taia,taif)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to continue (wrapped in the fine-tuning "
                   "--template, if any); repeat for several")
    p.add_argument("--eval", action="append", default=[], metavar="FILE.jsonl",
                   help='print exact-match accuracy on {"prompt", "response"} lines; repeat for several files')
    p.add_argument("--json", metavar="FILE", help="also write the --eval results to FILE as JSON")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling when --temperature > 0")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = p.parse_args(argv)
    if not args.prompt and not args.eval:
        p.error("give --prompt TEXT or --eval FILE.jsonl")
    if not 0 <= args.temperature < float("inf") or args.max_new_tokens < 1 or (args.top_k is not None and args.top_k < 1):
        p.error("--temperature must be >= 0, --max_new_tokens and --top_k >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    modes = parse_modes(args.modes or "base,vanilla,taia,taif")
    parse_modes(args.mode)
    check_device(args.device)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise DataError(f"--json {args.json}: its folder does not exist")
    sp = load_tokenizer(os.path.join(args.out_dir, FILES["tokenizer"]))
    weights = Weights(args.out_dir, args.init_from)
    check_tokenizer(sp, weights.cfg)
    if args.eval:
        sets = {os.path.splitext(os.path.basename(f))[0]: read_examples(f) for f in args.eval}
        results = evaluate(weights, modes, sets, sp, args.device)
        print(format_table(results["answer"], modes, "answer match"))
        print(format_table(results["exact"], modes, "exact match"))
        if args.json:
            write_json(args.json, {"results": results})  # {"answer"|"exact": {set: {mode: accuracy}}}
    if args.prompt:
        model = weights.build(args.mode, args.device)
        for prompt in args.prompt:
            print(generate_text(model, sp, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                weights.template))


def write_json(path: str, obj):
    """Write to a temporary name, then rename: never a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def run_cli(main_fn):
    """Bad input of any kind: one line on stderr and exit status 2, never a traceback. Ctrl-C: exit
    status 130, with train.py's word on what it saved. Under torchrun, ranks other than 0 say who they are."""
    rank = os.environ.get("RANK", "0")
    who = "" if rank == "0" else f"[rank {rank}] "
    try:
        main_fn()
    except (DataError, ValueError, OSError) as e:
        print(f"{who}error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if not who:
            print(f"interrupted: {str(e) or 'nothing was saved'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
