"""Pretrain a small Llama-style model on a toy world, fine-tune it, and compare TAIA with its rivals.

The default run does every stage on a CPU in minutes:
    python train.py                       # data -> tokenizer -> pretrain -> snapshot -> fine-tune -> eval
    python train.py --seeds 5             # the same for seeds 0..4, then mean +/- std over seeds
    python train.py --stage finetune --lora_rank 16     # reuse out/base.pt, fine-tune with LoRA
    python train.py --train_scope attn    # TOA (train only attention); ffn gives TOF
    python train.py --finetune_set id     # the in-distribution control
On one GPU: python train.py --device cuda

Stages (--stage, default all): data (write the toy world to OUT/data), pretrain (tokenizer + base
model -> OUT/base.pt), finetune (OUT/ffn_snapshot.pt, then OUT/finetuned.pt), eval (OUT/results.json).
Each stage alone reuses what the previous one left in --out_dir.
Your own data: --pretrain_text FILE.txt (one document per line), --finetune FILE.jsonl and
--eval FILE.jsonl ({"prompt", "response"} per line; repeat --eval for several sets).
"""
import argparse
import json
import math
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import taia
from data.text import (DataError, encode_example, example_batch, load_tokenizer, random_windows, read_examples,
                       read_lines, token_stream, train_tokenizer)
from data.toy_world import generate as generate_toy_world
from infer import (FILES, OneLineParser, Weights, check_device, check_tokenizer, config_from_dict, evaluate,
                   format_table, load_checkpoint, model_from_state, parse_modes, run_cli, write_json)
from model import PRESETS, ModelConfig, Transformer

TOY_EVAL_SETS = ["ood_test", "knowledge", "ft_only_facts", "ood_val"]


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="out", help="where every file of the run goes (default: out)")
    a("--stage", default="all", choices=["all", "data", "pretrain", "finetune", "eval"])
    a("--seed", type=int, default=0, help="seeds the toy world, initialisation and batch order")
    a("--seeds", type=int, default=1, help="run seeds SEED..SEED+N-1, each in OUT/seed_K, and summarise")
    # data
    a("--pretrain_text", help="your pretraining text, one document per line (default: the toy world)")
    a("--finetune", help="your fine-tuning JSONL (default: the toy world's set chosen by --finetune_set)")
    a("--finetune_set", default="ood", choices=["ood", "id"],
      help="toy world: out-of-distribution fine-tuning data (default) or the in-distribution control")
    a("--eval", action="append", default=[], metavar="FILE.jsonl", help="evaluation set (repeatable)")
    a("--modes", default="base,vanilla,taia,taif",
      help="modes to evaluate (infer.py lists them; e.g. add only-attention,only-embedding for the provenance "
           "ablation)")
    a("--vocab_size", type=int, default=768, help="sentencepiece vocabulary trained on the pretraining text")
    # model
    a("--preset", default="toy", choices=sorted(PRESETS), help="model size (vocab_size comes from the tokenizer)")
    a("--dim", type=int, help="override the preset's width")
    a("--n_layers", type=int, help="override the preset's depth")
    a("--hidden_dim", type=int, help="override the preset's FFN width")
    a("--seq_len", type=int, default=64, help="pretraining window (default: 64)")
    # pretraining
    a("--pretrain_steps", type=int, default=400)
    a("--pretrain_lr", type=float, default=3e-3)
    a("--batch_tokens", type=int, default=8192, help="tokens per pretraining optimizer step")
    a("--micro_batch", type=int, default=64, help="sequences per forward pass; accumulation fills batch_tokens")
    a("--weight_decay", type=float, default=0.1)
    # fine-tuning
    a("--finetune_steps", type=int, default=200)
    a("--finetune_lr", type=float, default=7e-4)
    a("--finetune_batch", type=int, default=32, help="examples per fine-tuning step")
    a("--train_scope", default="all", choices=["all", "attn", "ffn"],
      help="all: train every parameter (TAIA's premise); attn: TOA; ffn: TOF")
    a("--freeze_embeddings", action="store_true", help="do not fine-tune the embeddings and output head")
    a("--lora_rank", type=int, default=0, help="LoRA on all 7 linear layers of every block (0: full fine-tuning)")
    a("--lora_alpha", type=float, default=32.0)
    a("--lora_dropout", type=float, default=0.05)
    # machinery
    a("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    a("--log_interval", type=int, default=100)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(args.device)
    except DataError as e:
        p.error(str(e))
    for name in ("seeds", "pretrain_steps", "finetune_steps", "batch_tokens", "micro_batch", "finetune_batch",
                 "seq_len", "vocab_size", "log_interval", "dim", "n_layers", "hidden_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.lora_rank < 0 or not 0 <= args.lora_dropout < 1 or args.pretrain_lr <= 0 or args.finetune_lr <= 0:
        p.error("--lora_rank must be >= 0, --lora_dropout in [0, 1), learning rates > 0")
    if args.lora_rank and args.train_scope != "all":
        p.error("--lora_rank puts adapters on every linear layer; combine it only with --train_scope all")
    return args


# ---- the training loop, shared by pretraining and fine-tuning ------------------------------------

def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # decays to 10% of peak


def train_loop(model, next_batch, steps: int, lr: float, accum: int, args, desc: str, weight_decay: float):
    """AdamW, warmup + cosine, gradient clipping at 1.0, `accum` micro-batches per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=(0.9, 0.95))
    # bf16 autocast on GPU; on CPU the context does nothing and training stays in float32.
    autocast = torch.autocast("cuda", torch.bfloat16) if args.device.startswith("cuda") else nullcontext()
    model.train()
    t0, tokens_seen, losses = time.time(), 0, []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=None)):
        step_lr = cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        step_loss = 0.0
        for _ in range(accum):
            inputs, targets = next_batch()
            inputs, targets = inputs.to(args.device), targets.to(args.device)
            with autocast:
                logits = model(inputs)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100) / accum
            loss.backward()
            step_loss += loss.item()
            tokens_seen += inputs.numel()
        if not math.isfinite(step_loss):
            raise DataError(f"{desc}: loss became {step_loss} at step {step}; lower the learning rate")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if (step + 1) % args.log_interval == 0 or step + 1 == steps:
            elapsed = time.time() - t0
            tqdm.write(f"{desc} step {step + 1}/{steps} loss {sum(losses) / len(losses):.4f} lr {step_lr:.2e} "
                       f"grad_norm {float(grad_norm):.3f} {1000 * elapsed / (step + 1):.0f} ms/step "
                       f"{tokens_seen / elapsed:.0f} tok/s")
            losses = []
    model.eval()


# ---- stages -------------------------------------------------------------------------------------

def save_checkpoint(path: str, obj: dict):
    """torch.save to a temporary name, then rename: an interrupted save leaves the old file intact."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def toy_paths(out_dir: str) -> dict:
    data_dir = os.path.join(out_dir, "data")
    names = ["finetune_ood", "finetune_id", *TOY_EVAL_SETS]
    return {"pretrain": os.path.join(data_dir, "pretrain.txt"),
            **{n: os.path.join(data_dir, n + ".jsonl") for n in names}}


def stage_data(args, out_dir: str, seed: int):
    if args.pretrain_text:
        return
    paths = toy_paths(out_dir)
    data_dir = os.path.dirname(paths["pretrain"])
    stamp = os.path.join(data_dir, "world.json")  # which seed made the files already there
    if all(os.path.exists(p) for p in paths.values()) and os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("seed") == seed:
                return
    generate_toy_world(data_dir, seed=seed)
    write_json(stamp, {"seed": seed})
    print(f"toy world (seed {seed}) written to {data_dir}")


def model_config(args, vocab_size: int) -> ModelConfig:
    cfg = asdict(PRESETS[args.preset])
    cfg.update({k: getattr(args, k) for k in ("dim", "n_layers", "hidden_dim") if getattr(args, k) is not None})
    cfg["vocab_size"] = vocab_size
    cfg["max_seq_len"] = max(cfg["max_seq_len"], args.seq_len)
    return ModelConfig(**cfg)


def stage_pretrain(args, out_dir: str, seed: int):
    model_config(args, args.vocab_size)  # a bad size fails here, before anything is written
    lines = read_lines(args.pretrain_text or toy_paths(out_dir)["pretrain"])
    # The tokenizer goes under a new name and replaces the old one only beside the new base.pt.
    tokenizer_path = os.path.join(out_dir, FILES["tokenizer"])
    train_tokenizer(lines, tokenizer_path + ".new", args.vocab_size)
    sp = load_tokenizer(tokenizer_path + ".new")
    stream = token_stream(lines, sp)
    if len(stream) <= args.seq_len + 1:
        os.remove(tokenizer_path + ".new")
        raise DataError(f"pretraining text has {len(stream)} tokens: fewer than one window of {args.seq_len}")
    torch.manual_seed(seed)
    cfg = model_config(args, sp.vocab_size())
    model = Transformer(cfg).to(args.device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg}")
    micro = min(args.micro_batch, max(1, args.batch_tokens // args.seq_len))
    accum = max(1, args.batch_tokens // (micro * args.seq_len))
    generator = torch.Generator().manual_seed(seed)
    train_loop(model, lambda: random_windows(stream, micro, args.seq_len, generator), args.pretrain_steps,
               args.pretrain_lr, accum, args, "pretrain", args.weight_decay)
    save_checkpoint(os.path.join(out_dir, FILES["base"]),
                    {"model": model.state_dict(), "config": asdict(cfg), "seed": seed,
                     "pretrain": {k: getattr(args, k) for k in ("pretrain_text", "pretrain_steps", "pretrain_lr",
                                                                "batch_tokens", "seq_len", "weight_decay",
                                                                "vocab_size")}})
    os.replace(tokenizer_path + ".new", tokenizer_path)


def finetune_examples(args, out_dir: str):
    return read_examples(args.finetune or toy_paths(out_dir)["finetune_" + args.finetune_set])


def stage_finetune(args, out_dir: str, seed: int):
    base = load_checkpoint(os.path.join(out_dir, FILES["base"]))
    cfg = config_from_dict(base["config"])
    model = model_from_state(cfg, base["model"], args.device)
    sp = load_tokenizer(os.path.join(out_dir, FILES["tokenizer"]))
    check_tokenizer(sp, cfg)
    encoded = [encode_example(e, sp) for e in finetune_examples(args, out_dir)]
    too_long = [len(ids) for ids, _ in encoded if len(ids) - 1 > cfg.max_seq_len]
    if too_long:
        raise DataError(f"{len(too_long)} fine-tuning examples exceed max_seq_len {cfg.max_seq_len}")
    # Snapshot before any update: this is all TAIA needs to rebuild the model afterwards.
    original_ffn = taia.snapshot(model)
    torch.manual_seed(seed + 2)  # LoRA's initial adapters and its dropout
    if args.lora_rank:
        taia.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout)
    else:
        scope = {"all": set(taia.GROUPS), "attn": {"attention"}, "ffn": {"ffn"}}[args.train_scope]
        if args.freeze_embeddings:
            scope -= {"embedding", "head"}
        for name, p in model.named_parameters():
            p.requires_grad_(taia.group_of(name) in scope)
    generator = torch.Generator().manual_seed(seed + 1)
    order = []

    def next_batch():  # shuffled epochs of examples, padded to the longest in the batch
        nonlocal order
        while len(order) < args.finetune_batch:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        batch, order = order[:args.finetune_batch], order[args.finetune_batch:]
        return example_batch([encoded[i] for i in batch], pad_id=sp.eos_id())

    train_loop(model, next_batch, args.finetune_steps, args.finetune_lr, 1, args, "finetune", weight_decay=0.0)
    # Under LoRA, save the fully merged weights: infer.py derives every mode from base + tuned, and for
    # LoRA combine(base, merged, "taia") equals merging only the attention adapters (tests/test_taia.py).
    tuned = taia.merge_lora(model, "vanilla") if args.lora_rank else model.state_dict()
    save_checkpoint(os.path.join(out_dir, FILES["snapshot"]), {"ffn": original_ffn})
    save_checkpoint(os.path.join(out_dir, FILES["tuned"]),
                    {"model": {k: v.detach().cpu() for k, v in tuned.items()}, "config": base["config"],
                     "base_ffn": taia.fingerprint(original_ffn),  # which base this fine-tune started from
                     "finetune": {k: getattr(args, k) for k in ("finetune", "finetune_set", "finetune_steps",
                                                                "finetune_lr", "finetune_batch", "train_scope",
                                                                "freeze_embeddings", "lora_rank", "lora_alpha")}})


def eval_sets(args, out_dir: str) -> dict:
    if args.eval:
        return {os.path.splitext(os.path.basename(f))[0]: read_examples(f) for f in args.eval}
    paths = toy_paths(out_dir)
    return {name: read_examples(paths[name]) for name in TOY_EVAL_SETS}


def stage_eval(args, out_dir: str, started: float) -> dict:
    sp = load_tokenizer(os.path.join(out_dir, FILES["tokenizer"]))
    weights = Weights(out_dir)
    check_tokenizer(sp, weights.cfg)
    modes = parse_modes(args.modes)
    results = evaluate(weights, modes, eval_sets(args, out_dir), sp, args.device)
    print(format_table(results["answer"], modes, "answer match"))
    print(format_table(results["exact"], modes, "exact match"))
    report = {"results": results["answer"], "exact_match": results["exact"], "seed": weights.seed,
              "seconds": round(time.time() - started, 1), "config": {"model": asdict(weights.cfg), **weights.meta}}
    write_json(os.path.join(out_dir, "results.json"), report)
    return report


def run(args, out_dir: str, seed: int) -> dict | None:
    """The stages --stage asks for, in order; returns the eval report when eval ran."""
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    if args.stage in ("all", "data", "pretrain"):
        stage_data(args, out_dir, seed)  # skipped when the files are already there
    if args.stage in ("all", "pretrain"):
        stage_pretrain(args, out_dir, seed)
    if args.stage in ("all", "finetune"):
        stage_finetune(args, out_dir, seed)
    if args.stage in ("all", "eval"):
        return stage_eval(args, out_dir, started)
    return None


def summarise(reports: list[dict]) -> str:
    """Mean +/- std over seeds for every set and mode, and the per-seed paired difference TAIA - vanilla."""
    first = reports[0]["results"]
    modes = list(next(iter(first.values())))
    lines = [f"{'answer match':<15}" + "".join(f"{m:>16}" for m in modes) + "   taia - vanilla (seeds ahead)"]
    for name in first:
        row = f"{name:<15}"
        for mode in modes:
            values = [100 * r["results"][name][mode] for r in reports]
            row += f"{statistics.mean(values):9.1f} +/- {statistics.pstdev(values):4.1f}"
        if "taia" in modes and "vanilla" in modes:
            diffs = [100 * (r["results"][name]["taia"] - r["results"][name]["vanilla"]) for r in reports]
            row += (f"   {statistics.mean(diffs):+5.1f} +/- {statistics.pstdev(diffs):4.1f} "
                    f"({sum(d > 0 for d in diffs)}/{len(diffs)})")
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.seeds == 1:
        run(args, args.out_dir, args.seed)
        return
    reports = []
    for seed in range(args.seed, args.seed + args.seeds):
        print(f"=== seed {seed} ===")
        reports.append(run(args, os.path.join(args.out_dir, f"seed_{seed}"), seed))
    if all(reports):
        summary = summarise(reports)
        print(summary)
        write_json(os.path.join(args.out_dir, "summary.json"), {"reports": reports, "summary": summary})


if __name__ == "__main__":
    run_cli(main)
