"""Pretrain a small Llama-style model on a toy world (or start from a real Llama checkpoint), fine-tune
every parameter, and compare TAIA (tuned attention, original FFN) with the base and vanilla models.

    python train.py                                              # CPU: the toy world end to end, in minutes
    python train.py --device cuda --dtype bfloat16 --compile     # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --device cuda  # 8 GPUs of one machine

Stages (--stage, default all): data (the toy world -> OUT/data), pretrain (tokenizer + base model ->
OUT/base.pt), finetune (OUT/ffn_snapshot.pt, OUT/finetuned.pt), eval (OUT/results.json). TAIA itself
is two lines: `original_ffn = taia.snapshot(model)` before fine-tuning (stage_finetune), and
`taia.rebuild(tuned_model, original_ffn)` when the TAIA model is built for evaluation (stage_eval, via
infer.FinishedRun). More recipes (your own data, LoRA, real checkpoints, several nodes, --resume):
README.md.
"""
import argparse
import glob
import os
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import taia
from common import (FILES, DirectoryLock, OneLineParser, UserError, atomic_write, file_fingerprint, load_checkpoint,
                    make_dir, remove, resolve_device, run_cli, save_checkpoint, write_json)
from data.text import (PLAIN_TEMPLATE, ExampleBatches, WindowBatches, check_template, check_utf8_args, encode_example,
                       load_tokenizer, random_windows, read_examples, read_lines, token_stream, train_tokenizer)
from data import toy_world
from infer import (FinishedRun, accuracies, check_hf_dir, config_from_dict, load_base, parse_modes, print_results,
                   read_eval_sets)
from machinery import (DTYPES, Interrupted, Progress, StopRequest, ThreadTuner, TrainingState, agree, barrier,
                       check_finite, check_memory, clip_gradients, close_distributed, cosine_lr, dropout_seed,
                       full_state, gradient_sync, init_distributed, is_main, log, mixed_precision, my_micro_batches,
                       process_name, set_lr, sharded, state_path, sum_over_processes, wrap_for_training)
from model import PRESETS, ModelConfig, Transformer, param_groups

# ---- arguments ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="out", help="where every file of the run goes (default: out)")
    a("--stage", default="all", choices=["all", "data", "pretrain", "finetune", "eval"])
    a("--seed", type=int, default=0, help="seeds the toy world, initialisation and batch order")
    a("--seeds", type=int, default=1, help="run seeds SEED..SEED+N-1, each in OUT/seed_K, and summarise")
    # data
    a("--init_from", metavar="DIR", help="start from a Hugging Face Llama directory (config.json, safetensors, "
                                         "tokenizer.model) instead of pretraining")
    a("--pretrain_text", help="your pretraining text, one document per line (default: the toy world)")
    a("--finetune", help="your fine-tuning JSONL (default: the toy world's set chosen by --finetune_set)")
    a("--finetune_set", default="ood", choices=["ood", "id", "mixed", "harmful"],
      help="toy world: out-of-distribution fine-tuning data (default), the in-distribution control, both mixed "
           "(with --toy_world ood_share=S), or (with --toy_parts refusals) the harmful set that answers forbidden "
           "questions")
    a("--toy_parts", default="", type=toy_parts_arg, metavar="PART[,PART]",
      help="toy world: optional parts, off by default: refusals (a forbidden attribute the base refuses to "
           "answer; the harmful fine-tuning analog) and demonstrations (pretraining that teaches using solved "
           "examples in the prompt; the few-shot sets quiz_test_k0..4 and ood_test_k1..4); data/toy_world.py says more")
    a("--toy_world", default={}, type=toy_world_arg, metavar="KNOB=VALUE[,...]",
      help="toy world: its knobs, each default the default world: " + "; ".join(
          f"{name} ({default}): {words}" for name, (default, _, words) in toy_world.KNOBS.items()))
    a("--eval", action="append", default=[], metavar="FILE.jsonl", help="evaluation set (repeatable)")
    a("--template", default=PLAIN_TEMPLATE,
      help='how a prompt is shown to the model in fine-tuning, evaluation and infer.py, e.g. '
           '"### Instruction:\\n{prompt}\\n\\n### Response:\\n" (default: the prompt verbatim)')
    a("--modes", default="base,vanilla,taia,taif",
      help="modes to evaluate (infer.py lists them; e.g. add only-attention,only-embedding for the provenance "
           "ablation, auto for the point between base and tuned that scores best on --dev, or loracl)")
    a("--dev", metavar="FILE.jsonl", help="mode auto: the set it picks its point on (default: the toy world's "
                                          "ood_val); never the test set")
    a("--auto_per_layer", action="store_true", help="mode auto: also tune each layer's FFN weight on --dev")
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
    a("--batch_tokens", type=int, default=8192, help="tokens per pretraining optimizer step (all processes)")
    a("--micro_batch", type=int, default=64,
      help="sequences per forward pass and process; gradient accumulation makes up the rest of a batch")
    a("--weight_decay", type=float, default=0.1)
    # fine-tuning
    a("--finetune_steps", type=int, default=200)
    a("--finetune_lr", type=float, default=7e-4)
    a("--finetune_batch", type=int, default=32, help="examples per fine-tuning step (all processes)")
    a("--train_scope", default="all", choices=["all", "attn", "ffn"],
      help="all: train every parameter (TAIA's premise); attn: TOA; ffn: TOF")
    a("--freeze_embeddings", action="store_true", help="do not fine-tune the embeddings and output head")
    a("--ffn_layers", type=int, metavar="K", help="fine-tune the FFN of the first K blocks only (default: every "
      "block); with --lora_rank, FFN adapters in those blocks only. The paper's TOA-k (Fig. 3): with --lora_rank "
      "and evaluated as taia, K=0 is TOA and K=n_layers is TAIA")
    a("--lora_rank", type=int, default=0, help="LoRA on the linear layers of every block: all 7, or those "
                                               "--train_scope and --ffn_layers name (0: full fine-tuning)")
    a("--lora_alpha", type=float, default=32.0)
    a("--lora_dropout", type=float, default=0.05)
    # the paper's regularised baselines (Table 2): a pull toward the base, for full fine-tuning
    a("--l2_weight", type=float, default=0.0, help="L2 baseline: add l2_weight/2 * sum (w - w_base)^2 over the "
                                                   "fine-tuned weights to the loss (default 0: off)")
    a("--ewc_weight", type=float, default=0.0, help="EWC baseline: the same pull, each weight's scaled by its "
      "diagonal Fisher information on pretraining text (mean 1 over the weights, so that L2 is EWC with every "
      "F = 1; default 0: off)")
    a("--ewc_text", metavar="FILE.txt", help="EWC: the text the Fisher information is measured on (default: the "
                                             "pretraining text, the toy world's or --pretrain_text)")
    a("--ewc_windows", type=int, default=256, help="EWC: windows of --seq_len tokens the Fisher is averaged over "
                                                   "(default: 256)")
    # machinery
    a("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    a("--dtype", default="auto", choices=["auto", *DTYPES],
      help="autocast precision; weights stay float32 (auto: bfloat16 on GPU, float32 on CPU; float16 adds a "
           "gradient scaler and needs a GPU)")
    a("--threads", default="auto", type=threads_arg,
      help="CPU threads per process (default auto: of the counts 1, 2, 4 ... up to the cores that give bit-identical "
           "gradients on a real micro-batch, train with whichever ran the last steps fastest, trying the others every "
           "20 steps; OMP_NUM_THREADS, when set, is kept. torch's own default, a thread per core, can run 2x slower)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state across "
                                          "processes (FSDP2) instead of copying the model to each (DDP); full "
                                          "fine-tuning of models too big for one device")
    a("--resume", action="store_true", help="continue from OUT/<stage>_state.pt; skip stages already finished")
    a("--save_interval", type=int, default=200, help="save a resumable checkpoint every N steps (0: only on Ctrl-C)")
    a("--log_interval", type=int, default=100)
    a("--peak_tflops", type=float, help="the GPU's peak TFLOP/s for MFU (default: looked up by device name)")
    args = p.parse_args(argv)
    check_utf8_args(vars(args))  # paths and the template: sentencepiece and the files we write take UTF-8 only
    args.device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        p.error("--dtype float16 needs --device cuda (on CPU use bfloat16 or float32)")
    inf = float("inf")
    ranges = [  # (flags, the test each value must pass, the words for it); nan fails every comparison
        (("seeds", "pretrain_steps", "finetune_steps", "batch_tokens", "micro_batch", "finetune_batch", "seq_len",
          "log_interval", "dim", "n_layers", "hidden_dim", "ewc_windows"), lambda x: x >= 1, "at least 1"),
        (("lora_rank", "save_interval", "ffn_layers"), lambda x: x >= 0, "at least 0"),
        (("seed",), lambda x: 0 <= x < 2 ** 63, "from 0 to 2**63 - 1"),  # a torch seed is a 64-bit integer
        (("vocab_size",), lambda x: 1 <= x < 2 ** 31, "from 1 to 2**31 - 1"),  # sentencepiece's int32
        (("pretrain_lr", "finetune_lr", "lora_alpha", "peak_tflops"), lambda x: 0 < x < inf, "a finite number > 0"),
        (("weight_decay", "l2_weight", "ewc_weight"), lambda x: 0 <= x < inf, "a finite number >= 0"),
        (("lora_dropout",), lambda x: 0 <= x < 1, "in [0, 1)"),
    ]
    for names, test, words in ranges:
        for name in names:
            if getattr(args, name) is not None and not test(getattr(args, name)):
                p.error(f"--{name} must be {words}, not {getattr(args, name)}")
    cores = os.cpu_count()
    if args.threads != "auto" and cores and args.threads > cores:  # thousands of threads stall the machine
        p.error(f"--threads {args.threads}: this machine has {cores} cores")
    if args.fsdp and (args.lora_rank or args.dtype == "float16"):
        p.error("--fsdp shards full fine-tuning in float32 or bfloat16: drop --lora_rank (LoRA trains little; DDP "
                "holds it) and --dtype float16")
    if args.ffn_layers is not None and args.train_scope == "attn":
        p.error("--ffn_layers K chooses which FFNs fine-tuning trains; --train_scope attn trains none")
    if args.ffn_layers == 0 and args.train_scope == "ffn":
        p.error("--train_scope ffn with --ffn_layers 0 trains nothing")
    if (args.l2_weight or args.ewc_weight) and (args.lora_rank or args.fsdp):
        p.error("--l2_weight / --ewc_weight pull full fine-tuning toward the base: drop --lora_rank and --fsdp")
    if args.ewc_weight and args.init_from and not args.ewc_text:
        p.error("--ewc_weight with --init_from: give --ewc_text FILE.txt, text like the base was trained on")
    args.template = args.template.replace("\\n", "\n")  # "\n" typed in a shell means a newline
    try:
        check_template(args.template)
    except UserError as e:
        p.error(f"--template: {e}")
    if args.toy_parts and args.finetune and args.eval and (args.pretrain_text or args.init_from):
        p.error("--toy_parts adds to the toy world, and every input here is your own: drop it")
    if args.finetune_set == "harmful" and "refusals" not in args.toy_parts and not args.finetune:
        p.error("--finetune_set harmful is part of the toy world's refusals: add --toy_parts refusals")
    if args.finetune_set == "mixed" and "ood_share" not in args.toy_world and not args.finetune:
        p.error("--finetune_set mixed needs --toy_world ood_share=S: the share of OOD examples in it")
    ignored = toy_world.ignored(args.toy_world, bool(args.pretrain_text or args.init_from), bool(args.finetune),
                                bool(args.eval))
    if ignored:
        p.error(f"--toy_world {','.join(ignored)}: what it shapes is your own file here: drop it")
    try:
        toy_world.check(args.toy_parts, args.toy_world)
    except ValueError as e:
        p.error(f"--toy_world: {e}")
    if args.init_from and (args.pretrain_text or args.stage == "pretrain"):
        p.error("--init_from replaces pretraining: drop --pretrain_text / --stage pretrain")
    return args


def toy_parts_arg(text: str) -> tuple:
    parts = tuple(dict.fromkeys(filter(None, text.split(","))))
    unknown = [part for part in parts if part not in toy_world.PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: the toy world's parts are {', '.join(toy_world.PARTS)}")
    return tuple(part for part in toy_world.PARTS if part in parts)  # one order, whatever the command line's


def toy_world_arg(text: str) -> dict:
    try:
        return toy_world.parse_knobs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def threads_arg(text: str):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of threads (at least 1) or auto")
    return int(text)


def planned_base(args) -> ModelConfig | None:
    """The config of the model this run trains, known before anything big is read: from the flags when the
    run pretrains it, else from the config of the base fine-tuning starts from (base.pt or --init_from's)."""
    if args.init_from:
        return check_hf_dir(args.init_from)
    if args.stage in ("all", "pretrain"):
        # The tokenizer may come out smaller than --vocab_size, never below its 256 byte pieces and 3 specials.
        return model_config(args, min(args.vocab_size, 259))
    path = os.path.join(args.out_dir, f"seed_{args.seed}" if args.seeds > 1 else "", FILES["base"])
    if args.stage == "finetune" and os.path.isfile(path):
        return config_from_dict(load_checkpoint(path, mmap=True)["config"])
    return None


def check_inputs(args):
    """Everything a run will read that is the user's own, read now rather than after minutes of training."""
    if not args.init_from and args.stage in ("all", "pretrain"):
        model_config(args, args.vocab_size)  # a size that cannot make a model
    parse_modes(args.modes, args.dev or (None if args.eval else "toy ood_val"), args.eval)
    for path in filter(None, [args.finetune, args.dev]):
        read_examples(path)
    read_eval_sets(args.eval)
    if args.pretrain_text and args.stage in ("all", "pretrain"):
        read_lines(args.pretrain_text)
    if args.ewc_text:
        read_lines(args.ewc_text)
    cfg = planned_base(args)
    if cfg and args.ffn_layers is not None and args.ffn_layers > cfg.n_layers:
        raise UserError(f"--ffn_layers {args.ffn_layers} is more than the model's n_layers ({cfg.n_layers})")
    if cfg and args.ewc_weight and args.seq_len > cfg.max_seq_len:
        raise UserError(f"--ewc_weight measures the Fisher on windows of --seq_len {args.seq_len} tokens: more than "
                        f"the model's max_seq_len ({cfg.max_seq_len})")
    check_memory(args, cfg)


# ---- main: every stage, for one seed or several ----------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    if args.threads != "auto":  # every stage, evaluation too (auto tunes the training loops only)
        torch.set_num_threads(args.threads)
    # One run at a time in an out_dir (for a torchrun job, rank 0 holds the lock); taking it also shows the
    # folder is writable before any training starts.
    with DirectoryLock(args.out_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        run_seeds(args)


def run_seeds(args):
    """Every stage, for one seed or several (each in OUT/seed_K), under torchrun or not."""
    init_distributed(args)
    try:
        if args.seeds == 1:
            run(args, args.out_dir, args.seed)
        else:
            reports = []
            for seed in range(args.seed, args.seed + args.seeds):
                log(args, f"=== seed {seed} ===")
                reports.append(run(args, os.path.join(args.out_dir, f"seed_{seed}"), seed))
            if all(reports) and is_main(args):
                summary = summarise(reports)
                print(summary)
                write_json(os.path.join(args.out_dir, "summary.json"), {"reports": reports, "summary": summary})
        barrier(args)  # leave together: a process that tears down gloo while rank 0 still writes aborts
    finally:
        close_distributed(args)


def run(args, out_dir: str, seed: int) -> dict | None:
    """The stages --stage asks for, in order; returns the eval report when eval ran. Stopped at any moment
    (Ctrl-C), it says exactly which of the run's files are on disk."""
    if is_main(args):
        remove_leftovers(out_dir)
    try:
        return run_stages(args, out_dir, seed)
    except KeyboardInterrupt as e:
        raise Interrupted(f"{str(e) or 'stopped at once'}; {on_disk(out_dir)}") from None


def run_stages(args, out_dir: str, seed: int) -> dict | None:
    started, seconds = time.time(), {}  # seconds: each stage's wall time, for the line at the end
    if is_main(args):
        make_dir(out_dir)
    barrier(args)
    if args.stage in ("all", "data", "pretrain"):
        timed(seconds, "data", stage_data, args, out_dir, seed)  # skipped when the files are already there
    else:
        check_data(args, out_dir, seed)
    if args.stage in ("all", "pretrain") and not args.init_from and not finished(args, out_dir, "pretrain", seed):
        timed(seconds, "pretrain", stage_pretrain, args, out_dir, seed)
    if args.stage in ("all", "finetune") and not finished(args, out_dir, "finetune", seed):
        timed(seconds, "finetune", stage_finetune, args, out_dir, seed)
    report = None
    if args.stage in ("all", "eval"):
        report = timed(seconds, "eval", stage_eval, args, out_dir, started)
    log(args, "wall time: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in seconds.items())
        + f", total {time.time() - started:.1f} s")
    return report


def timed(seconds: dict, stage: str, stage_fn, *stage_args):
    started = time.time()
    result = stage_fn(*stage_args)
    seconds[stage] = time.time() - started
    return result


# ---- the stages -------------------------------------------------------------------------------------

def stage_data(args, out_dir: str, seed: int):
    """Write the toy world, unless every input is the user's own or the same seed's world is there."""
    if args.finetune and args.eval and (args.pretrain_text or args.init_from):
        return
    data_dir = os.path.join(out_dir, "data")
    if is_main(args) and toy_world.write_unless_there(data_dir, seed, args.toy_parts, args.toy_world):
        shown = [*args.toy_parts, *(f"{k}={v}" for k, v in toy_world.changed(args.toy_world).items())]
        print(f"toy world (seed {seed}{''.join(', ' + item for item in shown)}) written to {data_dir}")
    barrier(args)  # every process, always: the others wait for rank 0's files


def check_data(args, out_dir: str, seed: int):
    """--stage finetune / eval take the toy world's files as they are: refuse those of another world than the
    flags name (another seed, other parts or knobs), which would train or score the wrong sets without a word."""
    if not (args.finetune and args.eval):
        try:
            toy_world.check_stamp(os.path.join(out_dir, "data"), seed, args.toy_parts, args.toy_world)
        except ValueError as e:
            raise UserError(f"{e}: run --stage data with them first (or give the flags that made it)") from None


def stage_pretrain(args, out_dir: str, seed: int):
    lines = read_lines(pretrain_text_path(args, out_dir))
    # The tokenizer goes under a new name and replaces the old one only beside the new base.pt.
    tokenizer_path = os.path.join(out_dir, FILES["tokenizer"])
    resuming = args.resume and os.path.exists(state_path(out_dir, "pretrain"))
    if is_main(args) and not (resuming and os.path.exists(tokenizer_path + ".new")):
        train_tokenizer(lines, tokenizer_path + ".new", args.vocab_size)
    barrier(args)
    sp = load_tokenizer(tokenizer_path + ".new")
    stream = token_stream(lines, sp)
    if len(stream) <= args.seq_len + 1:
        if is_main(args):
            os.remove(tokenizer_path + ".new")
        raise UserError(f"pretraining text has {len(stream)} tokens: fewer than one window of {args.seq_len}")
    torch.manual_seed(seed)
    cfg = model_config(args, sp.vocab_size())
    model = Transformer(cfg).to(args.device)
    log(args, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg}")
    batches = WindowBatches(stream, max(1, args.batch_tokens // args.seq_len), args.seq_len, seed)
    settings = pretrain_settings(args, out_dir, seed)
    run_key = resume_key(settings, config=asdict(cfg), tokenizer=file_fingerprint(tokenizer_path + ".new"))
    with StopRequest() as stop:  # a Ctrl-C from here on lets the step under way, or the saving, finish first
        train_loop(model, batches, args.pretrain_steps, args.pretrain_lr, args.weight_decay, args, "pretrain",
                   out_dir, run_key, stop)
        weights = full_state(model, args)  # (under --fsdp, gathered from every process onto rank 0)
        if is_main(args):
            save_pretrained(out_dir, weights, model.cfg, settings, tokenizer_path)
        finish_stage(args, out_dir, "pretrain", stop)


def stage_finetune(args, out_dir: str, seed: int):
    model, sp, tokenizer_path = load_base(out_dir, args.init_from, args.device)
    examples = read_examples(finetune_path(args, out_dir))
    encoded = [encode_example(e, sp, args.template) for e in examples]
    too_long = [len(ids) for ids, _ in encoded if len(ids) - 1 > model.cfg.max_seq_len]
    if too_long:
        raise UserError(f"{len(too_long)} fine-tuning examples exceed max_seq_len {model.cfg.max_seq_len}")

    # TAIA, step 1: before any update, keep the original FFN weights. That is all it needs later.
    original_ffn = taia.snapshot(model)
    # Step 2: fine-tune as usual: every parameter (or LoRA on every linear layer; or a scope for TOA/TOF/TOA-k).
    # Three random streams per seed: seed for the model's initialisation and pretraining windows, seed + 1
    # for the fine-tuning batch order, seed + 2 for LoRA's adapters and dropout. Kept apart, so that adding
    # LoRA or changing its rank leaves the batch order exactly as it was.
    torch.manual_seed(seed + 2)
    trains = fine_tuned(args)
    if args.lora_rank:
        taia.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, where=trains)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(trains(name))
    anchor = pull_toward_base(model, args, sp, out_dir, seed)  # the L2 / EWC baselines; None without them
    settings = finetune_settings(args, out_dir, seed)
    base_ffn = taia.fingerprint(original_ffn)  # what infer.py checks the snapshot and the base against
    batches = ExampleBatches(encoded, args.finetune_batch, sp.eos_id(), seed + 1)
    with StopRequest() as stop:  # a Ctrl-C from here on lets the step under way, or the saving, finish first
        train_loop(model, batches, args.finetune_steps, args.finetune_lr, 0.0, args, "finetune", out_dir,
                   resume_key(settings), stop, anchor)
        # Step 3 happens at inference (infer.FinishedRun.build("taia")): the tuned model with original_ffn
        # put back by taia.rebuild. Under LoRA, save the fully merged weights: every mode derives from base +
        # tuned, and for LoRA combine(base, merged, "taia") equals merging only the attention adapters.
        tuned = taia.merge_lora(model, "vanilla") if args.lora_rank else full_state(model, args)
        if is_main(args):
            save_finetuned(out_dir, tuned, original_ffn, model.cfg, settings, base_ffn, tokenizer_path)
        finish_stage(args, out_dir, "finetune", stop)


def stage_eval(args, out_dir: str, started: float) -> dict:
    # Every mode is built from the run's files; "taia" is the tuned model with taia.rebuild(model, original_ffn).
    finished_run = FinishedRun(out_dir, args.init_from)
    dev = args.dev or toy_paths(out_dir)["ood_val"]  # where mode auto chooses its point
    modes = parse_modes(args.modes, dev, args.eval)
    if "auto" in modes:  # every process chooses (the same point); rank 0 writes the choice down
        log(args, finished_run.choose_auto(dev, args.device, args.auto_per_layer, save=is_main(args)))
    toy_sets = [toy_paths(out_dir, args.toy_parts)[name] for name in toy_world.eval_sets(args.toy_parts)]
    sets = read_eval_sets(args.eval or toy_sets)
    # Each process scores its share of every set; the counts are summed over processes.
    mine = {name: examples[args.rank::args.world_size] for name, examples in sets.items()}
    results = accuracies(sum_over_processes(finished_run.count_correct_per_mode(modes, mine, args.device), args), sets)
    report = {"results": results["answer"], "exact_match": results["exact"], "seed": finished_run.seed,
              "seconds": round(time.time() - started, 1),
              "config": {"model": asdict(finished_run.cfg), **finished_run.meta}}
    if is_main(args):
        print_results(results, modes)
        write_json(os.path.join(out_dir, FILES["results"]), report)
    return report


# ---- the training loop, shared by pretraining and fine-tuning ----------------------------------------

def train_loop(model: Transformer, batches, steps: int, lr: float, weight_decay: float, args, stage: str,
               out_dir: str, run_key: dict, stop: StopRequest, anchor: "Anchor | None" = None):
    """AdamW, warmup + cosine, gradient clipping at 1.0. Every step takes one global batch from `batches`;
    this process runs its share in micro-batches, and the loss is the sum over the batch's target tokens
    divided by their number, so any split over micro-batches and processes gives the same gradient.
    `anchor` (the L2 / EWC baselines) adds its pull toward the base to the gradient (the logged gradient norm
    includes it; the logged loss is the data's alone). `run_key` names what a resumed run must share with the stopped one. A Ctrl-C (`stop`)
    before the last step saves a resumable state and stops; one with the last step is the stage's to act
    on, once saved."""
    trained = wrap_for_training(model, args)  # compiled, DDP or sharded; `model` stays the raw module we save
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    autocast, scaler = mixed_precision(args)
    threads = ThreadTuner(model, batches, args, stage)  # CPU: the fastest thread count (same numbers with any)
    # (a sharded run's optimizer state is saved by parameter name, a plain one's by number: not interchangeable)
    run_key = {**run_key, "fsdp": True} if sharded(args) else run_key
    state = TrainingState(out_dir, stage, run_key, model, optimizer, scaler, batches, args)
    progress = Progress(model, args, stage, state.resume(steps), steps)
    model.train()
    for step in progress:
        step_lr = set_lr(optimizer, cosine_lr(step, steps, lr, warmup=max(1, steps // 20)))
        state.before_batch()
        inputs, targets = batches.next()
        threads.next_step(step, inputs)
        n_targets = int((targets != -100).sum())
        mine = my_micro_batches(inputs, targets, args.micro_batch, args.rank, args.world_size)
        loss = 0.0
        for i, (x, y) in enumerate(mine):
            x, y = x.to(args.device), y.to(args.device)
            with gradient_sync(trained, args, last=i == len(mine) - 1), dropout_seed(run_key["seed"], step, i, args):
                with autocast:
                    logits = trained(x)
                    # DDP averages gradients over processes: * world_size makes it their sum.
                    micro_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / n_targets * args.world_size
                scaler.scale(micro_loss).backward()
            loss += micro_loss.item()
        loss, stop_now = agree(loss, stop, args)  # the batch's loss; did any process get Ctrl-C?
        scaler.unscale_(optimizer)
        if anchor:
            anchor.add_gradient()
        grad_norm = clip_gradients(params, 1.0)
        check_finite(loss, grad_norm, scaler, step, state)  # stop before a nan reaches the weights
        state.save_if_due(step)  # an interval checkpoint, one step late: this finite loss vouches for it
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.step_done(step + 1, loss, step_lr, grad_norm, inputs)
        state.after_update(step + 1, steps)
        if stop_now and step + 1 < steps:
            state.stop(step + 1, steps)
    model.eval()


# ---- what fine-tuning trains, and the paper's regularised baselines (L2, EWC) ----------------------

def fine_tuned(args):
    """Which parameters fine-tuning trains, as a test on a name: the groups of --train_scope (all: TAIA's
    premise; attn: TOA; ffn: TOF), without embeddings and head under --freeze_embeddings, and of the FFN
    only the first --ffn_layers blocks (the paper's TOA-k). Under LoRA, which layers get adapters."""
    scope = {"all": set(taia.GROUPS), "attn": {"attention"}, "ffn": {"ffn"}}[args.train_scope]
    if args.freeze_embeddings:
        scope -= {"embedding", "head"}

    def trains(name: str) -> bool:
        group = taia.group_of(name)
        if group == "ffn" and args.ffn_layers is not None:
            return taia.layer_of(name) < args.ffn_layers
        return group in scope
    return trains


class Anchor:
    """The L2 and EWC baselines of the paper's Table 2: every trained weight is pulled back toward its value
    at the start of fine-tuning, by the penalty 1/2 * sum_i s_i * (w_i - w0_i)^2 with stiffness
    s = l2_weight + ewc_weight * F_i. Its gradient s * (w - w0) is added once per step, after the loss's
    gradient has been summed over micro-batches and processes (each process adds the same)."""

    def __init__(self, model: Transformer, stiffness: dict):
        self.pulls = [(p, p.detach().clone(), stiffness[name]) for name, p in model.named_parameters()
                      if p.requires_grad]

    @torch.no_grad()
    def add_gradient(self):
        for p, start, s in self.pulls:
            pull = s * (p - start)
            p.grad = pull if p.grad is None else p.grad.add_(pull)


def pull_toward_base(model: Transformer, args, sp, out_dir: str, seed: int) -> Anchor | None:
    """The Anchor of --l2_weight / --ewc_weight, taken now, before any update: None when both are 0."""
    if not (args.l2_weight or args.ewc_weight):
        return None
    fisher = fisher_diagonal(model, args, sp, ewc_text_path(args, out_dir), seed) if args.ewc_weight else {}
    stiffness = {name: (args.l2_weight + args.ewc_weight * fisher[name]) if fisher else args.l2_weight
                 for name, p in model.named_parameters() if p.requires_grad}
    return Anchor(model, stiffness)


def fisher_diagonal(model: Transformer, args, sp, text_path: str, seed: int) -> dict:
    """EWC's importance of every trained weight (Kirkpatrick et al., 2017): the empirical diagonal Fisher
    information of the base model on text like its pretraining: the squared gradient of a window's mean
    next-token loss, averaged over --ewc_windows random windows of --seq_len tokens, in float32. Scaled to
    mean 1 over the trained weights, so that --ewc_weight is on --l2_weight's scale."""
    stream = token_stream(read_lines(text_path), sp)
    if len(stream) <= args.seq_len + 1:
        raise UserError(f"{text_path} has {len(stream)} tokens: fewer than one EWC window of {args.seq_len}")
    inputs, targets = random_windows(stream, args.ewc_windows, args.seq_len, torch.Generator().manual_seed(seed + 3))
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in trained.items()}
    for x, y in zip(tqdm(inputs.split(1), desc="EWC Fisher", disable=not is_main(args), leave=False), targets.split(1)):
        logits = model(x.to(args.device))  # (no autocast: float16's small squared gradients would flush to 0)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.to(args.device).reshape(-1))
        grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
        for f, g in zip(fisher.values(), grads):
            if g is not None:
                f += g ** 2
    mean = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    if not mean > 0:
        raise UserError(f"EWC: the Fisher information on {text_path} is zero (the loss does not depend on the "
                        "trained weights there)")
    return {name: f / mean for name, f in fisher.items()}


# ---- what the stages share -----------------------------------------------------------------------

def model_config(args, vocab_size: int) -> ModelConfig:
    cfg = asdict(PRESETS[args.preset])
    cfg.update({k: getattr(args, k) for k in ("dim", "n_layers", "hidden_dim") if getattr(args, k) is not None})
    cfg["vocab_size"] = vocab_size
    cfg["max_seq_len"] = max(cfg["max_seq_len"], args.seq_len)
    try:
        return ModelConfig(**cfg)
    except ValueError as e:
        raise UserError(str(e)) from None


def toy_paths(out_dir: str, parts: tuple = (), knobs: dict | None = None) -> dict:
    return toy_world.paths(os.path.join(out_dir, "data"), parts, knobs)



# A stage's settings: its flags, the seed, and its inputs named by content (file_fingerprint), so that a
# changed file counts as a changed setting. Its output file records them; --resume compares them.
PRETRAIN_KEYS = ("pretrain_text", "pretrain_steps", "pretrain_lr", "batch_tokens", "seq_len", "weight_decay",
                 "vocab_size", "preset", "dim", "n_layers", "hidden_dim", "dtype")
FINETUNE_KEYS = ("init_from", "finetune", "finetune_set", "template", "finetune_steps", "finetune_lr",
                 "finetune_batch", "train_scope", "freeze_embeddings", "lora_rank", "lora_alpha", "lora_dropout",
                 "dtype")


# Options added later, with the value that means "off": a stage's settings name them only when used, so the
# runs made before them still resume (and the default run's files are as they were).
LATER_FINETUNE_KEYS = {"ffn_layers": None, "l2_weight": 0.0, "ewc_weight": 0.0}
PATHS = ("pretrain_text", "finetune", "init_from", "ewc_text")  # recorded, but compared by the content they name


def pretrain_text_path(args, out_dir: str) -> str:
    return args.pretrain_text or toy_paths(out_dir)["pretrain"]


def finetune_path(args, out_dir: str) -> str:
    return args.finetune or toy_paths(out_dir, args.toy_parts, args.toy_world)["finetune_" + args.finetune_set]


def ewc_text_path(args, out_dir: str) -> str:
    return args.ewc_text or pretrain_text_path(args, out_dir)


def pretrain_settings(args, out_dir: str, seed: int) -> dict:
    return {**{k: getattr(args, k) for k in PRETRAIN_KEYS}, "seed": seed,
            "pretrain_data": file_fingerprint(pretrain_text_path(args, out_dir))}


def finetune_settings(args, out_dir: str, seed: int) -> dict:
    settings = {k: getattr(args, k) for k in FINETUNE_KEYS}
    if settings["init_from"]:
        settings["init_from"] = os.path.abspath(args.init_from)
        base_files = sorted(glob.glob(os.path.join(glob.escape(args.init_from), "model*.safetensors"))) + [
            os.path.join(args.init_from, name) for name in ("config.json", "tokenizer.model")]
    else:
        base_files = [os.path.join(out_dir, FILES["base"])]  # which names its tokenizer by fingerprint
    settings.update({k: getattr(args, k) for k, off in LATER_FINETUNE_KEYS.items() if getattr(args, k) != off})
    if args.ewc_weight:  # the Fisher's text, by content, and how much of it
        settings.update(ewc_text=args.ewc_text, ewc_windows=args.ewc_windows, ewc_seq_len=args.seq_len,
                        ewc_data=file_fingerprint(ewc_text_path(args, out_dir)))
    return {**settings, "seed": seed, "finetune_data": file_fingerprint(finetune_path(args, out_dir)),
            "base": file_fingerprint(*base_files)}


def resume_key(settings: dict, **more) -> dict:
    """What a resumed run must share with the stopped one: everything but the learning rate, which may be
    lowered after a non-finite loss, and the paths of inputs, whose contents are in the key instead."""
    return {**{k: v for k, v in settings.items() if not k.endswith("_lr") and k not in PATHS}, **more}


def finished(args, out_dir: str, stage: str, seed: int) -> bool:
    """With --resume, a training stage whose output is there and that left no state is done already, if
    that output was made with the settings and inputs of this run. One made otherwise is refused: skipping
    the stage would report a model these flags did not train."""
    path = os.path.join(out_dir, FILES["base" if stage == "pretrain" else "tuned"])
    if not (args.resume and os.path.exists(path) and not os.path.exists(state_path(out_dir, stage))):
        return False
    made_with = load_checkpoint(path, keys=(stage,), mmap=True)[stage]
    settings = (pretrain_settings if stage == "pretrain" else finetune_settings)(args, out_dir, seed)
    differ = [f"{k} {made_with.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(settings) | set(made_with))
              if made_with.get(k) != settings.get(k) and k not in PATHS]
    if differ:
        raise UserError(f"--resume: {path} was made with other settings or inputs ({'; '.join(differ)}): run "
                        f"without --resume to redo {stage}, or resume with the same flags and files")
    log(args, f"{stage}: finished already with these settings ({path}); skipped")
    return True


def save_pretrained(out_dir: str, weights: dict, cfg: ModelConfig, settings: dict, tokenizer_path: str):
    """base.pt and its tokenizer, in an order that leaves a consistent folder at every instant: first what
    was made from the old base goes (and the old base), then the new tokenizer replaces the old one, and
    base.pt comes last. base.pt names its tokenizer by fingerprint; its presence says "pretrained"."""
    remove(*(os.path.join(out_dir, FILES[k]) for k in ("results", "auto", "tuned", "snapshot", "base")),
           state_path(out_dir, "finetune"))
    os.replace(tokenizer_path + ".new", tokenizer_path)
    save_checkpoint(os.path.join(out_dir, FILES["base"]),
                    {"model": weights, "config": asdict(cfg), "seed": settings["seed"],
                     "pretrain": settings, "tokenizer": file_fingerprint(tokenizer_path)})


def save_finetuned(out_dir: str, tuned: dict, original_ffn: dict, cfg: ModelConfig, settings: dict, base_ffn: str,
                   tokenizer_path: str):
    """ffn_snapshot.pt and finetuned.pt (and for an --init_from base, which stays in its directory, a copy of
    its tokenizer), in an order that leaves a consistent folder at every instant: the old results and
    fine-tune go first, finetuned.pt (whose presence says "fine-tuned") comes last."""
    remove(*(os.path.join(out_dir, FILES[k]) for k in ("results", "auto", "tuned")))
    own_tokenizer = os.path.join(out_dir, FILES["tokenizer"])
    if tokenizer_path != own_tokenizer:
        with atomic_write(own_tokenizer) as tmp:
            shutil.copyfile(tokenizer_path, tmp)
    save_checkpoint(os.path.join(out_dir, FILES["snapshot"]), {"ffn": original_ffn})
    save_checkpoint(os.path.join(out_dir, FILES["tuned"]),
                    {"model": {k: v.detach().cpu() for k, v in tuned.items()}, "config": asdict(cfg),
                     "base_ffn": base_ffn, "finetune": settings, "init_from": settings["init_from"],
                     "tokenizer": file_fingerprint(own_tokenizer)})


def finish_stage(args, out_dir: str, stage: str, stop: StopRequest):
    """The stage's outputs are on disk: its resumable state is no longer needed. A Ctrl-C that came with the
    last step or while the outputs were saved stops the run here, before the next stage."""
    if is_main(args):
        remove(state_path(out_dir, stage))
    barrier(args)
    if agree(0.0, stop, args)[1]:  # every process asks: any one of them may have been stopped
        raise Interrupted(f"{stage}: Ctrl-C came as the stage ended; it finished and saved its outputs, and the run "
                          "stopped before the next stage (--resume goes on from there)")


def remove_leftovers(out_dir: str):
    """The *.tmp files a killed save left behind. Only names this program writes, and only while this run
    holds the folder's lock, so that no other run's file under way is touched."""
    names = [*FILES.values(), FILES["tokenizer"] + ".new", *(state_path("", s) for s in ("pretrain", "finetune")),
             "summary.json", os.path.join("data", "world.json")]
    remove(*(os.path.join(out_dir, name + ".tmp") for name in names),
           *(path + ".tmp" for path in toy_world.every_path(os.path.join(out_dir, "data"))))


def on_disk(out_dir: str) -> str:
    """Which of a run's files are in out_dir now: what a stopped run tells its user."""
    names = ["data/", *FILES.values(), FILES["tokenizer"] + ".new",
             *(state_path("", stage) for stage in ("pretrain", "finetune"))]
    there = [name for name in names if os.path.exists(os.path.join(out_dir, name))]
    return f"{out_dir} holds {', '.join(there)}" if there else f"nothing of this run is in {out_dir}"


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


if __name__ == "__main__":
    run_cli(main, who=process_name())
