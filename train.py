"""Pretrain a small Llama-style model on a toy world (or start from a real checkpoint), fine-tune every
parameter, and compare TAIA (tuned attention, original FFN) with the base and vanilla models.

    python train.py                                              # CPU: the toy world end to end, in minutes
    python train.py --device cuda --dtype bfloat16 --compile     # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --device cuda  # 8 GPUs of one machine

Stages (--stage, default all): data (the toy world -> OUT/data), pretrain (tokenizer + base model ->
OUT/base.pt), finetune (OUT/ffn_snapshot.pt, OUT/finetuned.pt), eval (OUT/results.json). TAIA itself
is two lines: `original_ffn = taia.snapshot(model)` before fine-tuning (stage_finetune), and
`taia.rebuild(tuned_model, original_ffn)` when the TAIA model is built for evaluation (infer.FinishedRun).
Experiments add options through the Extension seam below (experiments/lab.py); this file never names them.
"""
import argparse
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F

import taia
from checkpoints import base_files, check_pretrained, config_from_dict, load_base, pretrained_template
from common import FILES, OneLineParser, UserError, file_fingerprint, load_checkpoint, make_dir, run_cli, write_json
from data import toy
from data.text import (PLAIN_TEMPLATE, ExampleBatches, WindowBatches, check_template, check_utf8_args, encode_example,
                       load_tokenizer, read_examples, read_lines, token_stream, train_tokenizer)
from infer import FinishedRun, evaluate, parse_modes, print_results, read_eval_sets
import machinery
from machinery import (Interrupted, Progress, StopRequest, all_reduce_loss_and_stop, barrier, check_finite,
                       clip_gradients, close_distributed, cosine_lr, dropout_seed, full_state, gradient_sync,
                       init_distributed, is_main, log, mixed_precision, my_micro_batches, process_name, set_lr,
                       sum_over_processes, wrap_for_training)
from machinery import rundir
from machinery.memory import check_memory
from machinery.threads import ThreadTuner
from model import PRESETS, ModelConfig, Transformer, param_groups

# ---- the seam: how an experiment plugs in --------------------------------------------------------------

class Extension:
    """What an experiment may change, at named points only; each hook's default changes nothing. Pass instances
    to main(argv, extensions); experiments/lab.py holds the project's own (baselines, scopes, toy options)."""
    extra_copies = 0  # float32 copies of the trained weights it keeps (for the up-front memory check)

    def add_arguments(self, parser): ...                # its flags
    def check(self, args, error): ...                   # refuse a bad combination: error("one line")
    def check_inputs(self, args, cfg): ...              # read its own files now, not after minutes of training
    def world(self, args) -> dict: return {}            # the toy world's options (data.toy's keyword arguments)
    def trains(self, args): return None                 # which parameters fine-tuning trains: a test on a name
    def settings(self, args, out_dir) -> dict: return {}  # what it adds to fine-tuning's recorded settings
    def start_finetune(self, model, args, sp, out_dir, seed): ...  # once, before the first update
    def on_gradients(self): ...                         # every step: gradients summed, before clipping
    def modes(self) -> dict: return {}                  # evaluation modes: {name: function(run, examples, device)}


# ---- arguments ------------------------------------------------------------------------------------

def parse_args(argv=None, extensions=()):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="out", help="where every file of the run goes (default: out)")
    a("--stage", default="all", choices=["all", "data", "pretrain", "finetune", "eval"])
    a("--seed", type=int, default=0, help="the random seed of the toy world, initialisation and batch order")
    # data
    a("--init_from", metavar="DIR|FILE.gguf", help="start from a Hugging Face Llama directory (config.json, "
      "safetensors, tokenizer.model or tokenizer.json) or a Llama GGUF file instead of pretraining")
    a("--pretrain_text", help="your pretraining text, one document per line (default: the toy world)")
    a("--finetune", help="your fine-tuning JSONL (default: the toy world's set chosen by --finetune_set)")
    a("--finetune_set", default="ood", help="toy world: ood (out-of-distribution, default) or id (the control)")
    a("--eval", action="append", default=[], metavar="FILE.jsonl", help="evaluation set (repeatable)")
    a("--template", help='how a prompt is shown in fine-tuning, evaluation and infer.py, e.g. "### Instruction:\\n'
      '{prompt}\\n\\n### Response:\\n" (default: a chat model\'s own chat template, else the prompt verbatim)')
    a("--modes", default="base,vanilla,taia,taif",
      help="modes to evaluate (infer.py lists them; e.g. add only-attention,only-embedding for the provenance "
           "ablation, or auto for the point between base and tuned that scores best on --dev)")
    a("--dev", metavar="FILE.jsonl", help="mode auto: the set it picks its point on (default: the toy's ood_val)")
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
    a("--lora_rank", type=int, default=0, help="LoRA on the 7 linear layers of every block (0: full fine-tuning)")
    a("--lora_alpha", type=float, default=32.0)
    a("--lora_dropout", type=float, default=0.05)
    machinery.add_arguments(p)  # --device, --dtype, --threads, --compile, --fsdp, --resume and the logging
    for extension in extensions:
        extension.add_arguments(p)
    args = p.parse_args(argv)
    check_utf8_args(vars(args))  # paths and the template: sentencepiece and the files we write take UTF-8 only
    if args.fsdp and args.lora_rank:
        p.error("--fsdp shards full fine-tuning: drop --lora_rank (LoRA trains little; DDP holds it)")
    machinery.check_arguments(args, p.error)
    inf = float("inf")
    ranges = [  # (flags, the test each value must pass, the words for it); nan fails every comparison
        (("pretrain_steps", "finetune_steps", "batch_tokens", "micro_batch", "finetune_batch", "seq_len",
          "dim", "n_layers", "hidden_dim"), lambda x: x >= 1, "at least 1"),
        (("lora_rank",), lambda x: x >= 0, "at least 0"),
        (("seed",), lambda x: 0 <= x < 2 ** 63, "from 0 to 2**63 - 1"),  # a torch seed is a 64-bit integer
        (("vocab_size",), lambda x: 1 <= x < 2 ** 31, "from 1 to 2**31 - 1"),  # sentencepiece's int32
        (("pretrain_lr", "finetune_lr", "lora_alpha"), lambda x: 0 < x < inf, "a finite number > 0"),
        (("weight_decay",), lambda x: 0 <= x < inf, "a finite number >= 0"),
        (("lora_dropout",), lambda x: 0 <= x < 1, "in [0, 1)"),
    ]
    for names, test, words in ranges:
        for name in names:
            if getattr(args, name) is not None and not test(getattr(args, name)):
                p.error(f"--{name} must be {words}, not {getattr(args, name)}")
    if args.auto_per_layer and "auto" not in args.modes.split(","):
        p.error("--auto_per_layer tunes mode auto: add auto to --modes")
    args.template = args.template and args.template.replace("\\n", "\n")  # "\n" typed in a shell means a newline
    try:
        check_template(PLAIN_TEMPLATE if args.template is None else args.template)
    except UserError as e:
        p.error(f"--template: {e}")
    if args.init_from and (args.pretrain_text or args.stage == "pretrain"):
        p.error("--init_from replaces pretraining: drop --pretrain_text / --stage pretrain")
    for extension in extensions:
        extension.check(args, p.error)
    args.world = {k: v for e in extensions for k, v in e.world(args).items()}  # what the toy world's options are
    args.extra_modes = {name: judge for e in extensions for name, judge in e.modes().items()}
    sets = [name.removeprefix("finetune_") for name in toy.paths("", **args.world) if name.startswith("finetune_")]
    if not args.finetune and args.finetune_set not in sets:
        p.error(f"--finetune_set {args.finetune_set}: this toy world's fine-tuning sets are {', '.join(sets)}")
    return args


def model_config(args, vocab_size: int) -> ModelConfig:
    cfg = asdict(PRESETS[args.preset])
    cfg.update({k: getattr(args, k) for k in ("dim", "n_layers", "hidden_dim") if getattr(args, k) is not None})
    cfg.update(vocab_size=vocab_size, max_seq_len=max(cfg["max_seq_len"], args.seq_len))
    try:
        return ModelConfig(**cfg)
    except ValueError as e:
        raise UserError(str(e)) from None


def base_config(args) -> ModelConfig | None:
    """The config of the model fine-tuning starts from, known before anything big is read: from the flags
    when this run pretrains it, else from base.pt's or --init_from's config."""
    if args.init_from:
        return check_pretrained(args.init_from)
    if args.stage in ("all", "pretrain"):
        # The tokenizer may come out smaller than --vocab_size, never below its 256 byte pieces and 3 specials.
        return model_config(args, min(args.vocab_size, 259))
    path = os.path.join(args.out_dir, FILES["base"])
    if args.stage == "finetune" and os.path.isfile(path):
        return config_from_dict(load_checkpoint(path, mmap=True)["config"])
    return None


def check_inputs(args, extensions):
    """Everything a run will read that is the user's own, read now rather than after minutes of training."""
    if not args.init_from and args.stage in ("all", "pretrain"):
        model_config(args, args.vocab_size)  # a size that cannot make a model
    parse_modes(args.modes, args.dev or (None if args.eval else "toy ood_val"), args.eval, args.extra_modes)
    for path in filter(None, [args.finetune, args.dev]):
        read_examples(path)
    read_eval_sets(args.eval)
    if args.pretrain_text and args.stage in ("all", "pretrain"):
        read_lines(args.pretrain_text)
    cfg = base_config(args)
    args.template = pretrained_template(args.init_from) if args.template is None else args.template
    for extension in extensions:
        extension.check_inputs(args, cfg)
    check_memory(args, cfg, sum(e.extra_copies for e in extensions))


# ---- main: the stages in order ---------------------------------------------------------------------------

def main(argv=None, extensions=()):
    args = parse_args(argv, extensions)
    check_inputs(args, extensions)
    if args.threads != "auto":  # every stage, evaluation too (auto tunes the training loops only)
        torch.set_num_threads(args.threads)
    # One run at a time in an out_dir (under torchrun rank 0 holds the lock); it also shows the folder is writable.
    with rundir.DirectoryLock(args.out_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        init_distributed(args)
        try:
            report = run(args, args.out_dir, args.seed, extensions)
            barrier(args)  # leave together: a process that tears down gloo while rank 0 still writes aborts
        finally:
            close_distributed(args)
    return report


def run(args, out_dir: str, seed: int, extensions=()) -> dict | None:
    """The stages --stage asks for, in order; returns the eval report when eval ran. Stopped at any moment
    (Ctrl-C), it says exactly which of the run's files are on disk."""
    if is_main(args):
        rundir.remove_leftovers(out_dir, toy.every_path(os.path.join(out_dir, "data")))
    started, seconds = time.time(), {}  # seconds: each stage's wall time, for the line at the end
    try:
        if is_main(args):
            make_dir(out_dir)
        barrier(args)
        stages = {"data": stage_data, "pretrain": stage_pretrain, "finetune": stage_finetune, "eval": stage_eval}
        wanted = {"all": list(stages), "data": ["data"], "pretrain": ["data", "pretrain"]}.get(args.stage, [args.stage])
        if "data" not in wanted and not (args.finetune and args.eval):  # a later stage takes the world as it is
            toy.check_stamp(os.path.join(out_dir, "data"), seed, **args.world)
        report = None
        for name in wanted:
            stage_started = time.time()
            result = stages[name](args, out_dir, seed, extensions)
            if result is not False:  # False: skipped (finished already, or nothing to do)
                seconds[name] = time.time() - stage_started
            report = result if name == "eval" else report
    except KeyboardInterrupt as e:
        raise Interrupted(f"{str(e) or 'stopped at once'}; {rundir.on_disk(out_dir)}") from None
    log(args, "wall time: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in seconds.items())
        + f", total {time.time() - started:.1f} s")
    return report


# ---- the stages -------------------------------------------------------------------------------------

def stage_data(args, out_dir: str, seed: int, extensions):
    """Write the toy world, unless every input is the user's own or the same seed's world is there."""
    if args.finetune and args.eval and (args.pretrain_text or args.init_from):
        return False
    data_dir = os.path.join(out_dir, "data")
    tuned = os.path.exists(os.path.join(out_dir, FILES["tuned"]))  # (a base is checked by its own settings)
    keep = tuned and (args.resume or args.stage == "data") and f"{out_dir} holds {FILES['tuned']} made from it"
    if is_main(args) and toy.write_unless_there(data_dir, seed, **args.world, keep=keep):
        print(f"toy world (seed {seed}{toy.describe(**args.world)}) written to {data_dir}")
    barrier(args)  # every process, always: the others wait for rank 0's files


def toy_path(out_dir: str, name: str, world: dict) -> str:
    return toy.paths(os.path.join(out_dir, "data"), **world)[name]


def stage_pretrain(args, out_dir: str, seed: int, extensions):
    if args.init_from:  # the base is the checkpoint's: nothing to pretrain
        return False
    text_path = args.pretrain_text or toy_path(out_dir, "pretrain", {})
    settings = rundir.pretrain_settings(args, seed, text_path)
    if rundir.finished(args, out_dir, "pretrain", settings):
        return False
    lines = read_lines(text_path)
    # The tokenizer goes under a new name and replaces the old one only beside the new base.pt.
    tokenizer_path = os.path.join(out_dir, FILES["tokenizer"])
    resuming = args.resume and os.path.exists(rundir.state_path(out_dir, "pretrain"))
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
    model = Transformer(model_config(args, sp.vocab_size())).to(args.device)
    log(args, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.cfg}")
    batches = WindowBatches(stream, max(1, args.batch_tokens // args.seq_len), args.seq_len, seed)
    run_key = rundir.resume_key(settings, config=asdict(model.cfg), tokenizer=file_fingerprint(tokenizer_path + ".new"))
    with StopRequest() as stop:  # a Ctrl-C from here on lets the step under way, or the saving, finish first
        train_loop(model, batches, args.pretrain_steps, args.pretrain_lr, args.weight_decay, args, "pretrain",
                   out_dir, run_key, stop)
        weights = full_state(model, args)  # (under --fsdp, gathered from every process onto rank 0)
        if is_main(args):
            rundir.save_pretrained(out_dir, weights, model.cfg, settings, tokenizer_path)
        rundir.finish_stage(args, out_dir, "pretrain", stop)


def stage_finetune(args, out_dir: str, seed: int, extensions):
    data_path = args.finetune or toy_path(out_dir, "finetune_" + args.finetune_set, args.world)
    if not args.init_from:  # the base must be there before anything is read (load_base reads it again)
        load_checkpoint(os.path.join(out_dir, FILES["base"]), mmap=True)
    more = {k: v for e in extensions for k, v in e.settings(args, out_dir).items()}
    settings = rundir.finetune_settings(args, seed, data_path, base_files(out_dir, args.init_from), more)
    if rundir.finished(args, out_dir, "finetune", settings):
        return False
    model, sp, _ = load_base(out_dir, args.init_from, args.device)
    encoded = [encode_example(e, sp, args.template) for e in read_examples(data_path)]
    too_long = [len(ids) for ids, _ in encoded if len(ids) - 1 > model.cfg.max_seq_len]
    if too_long:
        raise UserError(f"{len(too_long)} fine-tuning examples exceed max_seq_len {model.cfg.max_seq_len}")

    # TAIA, step 1: before any update, keep the original FFN weights. That is all it needs later.
    original_ffn = taia.snapshot(model)
    # Step 2: fine-tune as usual: every parameter (or LoRA on every linear layer). Random streams: seed for
    # initialisation and pretraining windows, seed + 1 for the fine-tuning batch order, seed + 2 for LoRA's
    # adapters and dropout; kept apart, so that adding LoRA leaves the batch order exactly as it was.
    torch.manual_seed(seed + 2)
    trains = next((t for t in (e.trains(args) for e in extensions) if t is not None), None)
    if args.lora_rank:
        taia.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, where=trains)
    elif trains:
        for name, p in model.named_parameters():
            p.requires_grad_(trains(name))
    for extension in extensions:
        extension.start_finetune(model, args, sp, out_dir, seed)
    base_ffn = taia.fingerprint(original_ffn)  # what infer.py checks the snapshot and the base against
    batches = ExampleBatches(encoded, args.finetune_batch, sp.eos_id(), seed + 1)
    with StopRequest() as stop:  # a Ctrl-C from here on lets the step under way, or the saving, finish first
        train_loop(model, batches, args.finetune_steps, args.finetune_lr, 0.0, args, "finetune", out_dir,
                   rundir.resume_key(settings), stop, extensions)
        # Step 3 happens at inference (infer.FinishedRun.build("taia")): the tuned model with original_ffn
        # put back by taia.rebuild. Under LoRA, save the fully merged weights: every mode derives from base +
        # tuned, and for LoRA combine(base, merged, "taia") equals merging only the attention adapters.
        tuned = taia.merge_lora(model, "vanilla") if args.lora_rank else full_state(model, args)
        if is_main(args):
            rundir.save_finetuned(out_dir, tuned, original_ffn, model.cfg, settings, base_ffn, sp)
        rundir.finish_stage(args, out_dir, "finetune", stop)


def stage_eval(args, out_dir: str, seed: int, extensions) -> dict:
    started = time.time()
    # Every mode is built from the run's files; "taia" is the tuned model with taia.rebuild(model, original_ffn).
    finished_run = FinishedRun(out_dir, args.init_from)
    dev = args.dev or toy_path(out_dir, "ood_val", {})  # where mode auto chooses its point
    scored = args.eval or [toy_path(out_dir, name, args.world) for name in toy.eval_sets(**args.world)]
    tests = [path for path in scored if args.eval or not path.endswith("ood_val.jsonl")]  # (the toy's val is val)
    modes = parse_modes(args.modes, dev, tests, args.extra_modes)  # never choose auto's point on a test set
    if "auto" in modes:  # every process chooses (the same point); rank 0 writes the choice down
        log(args, finished_run.choose_auto(dev, args.device, args.auto_per_layer, save=is_main(args)))
    sets = read_eval_sets(scored)
    # Each process scores its share of every set; the counts are summed over processes.
    results = evaluate(finished_run, modes, sets, args.device, args.extra_modes, args.rank, args.world_size,
                       lambda counts: sum_over_processes(counts, args))
    report = {"results": results["answer"], "exact_match": results["exact"], "seed": finished_run.seed,
              "seconds": round(time.time() - started, 1),
              "config": {"model": asdict(finished_run.cfg), **finished_run.meta}}
    if is_main(args):
        print_results(results, modes)
        write_json(os.path.join(out_dir, FILES["results"]), report)
    return report


# ---- the training loop, shared by pretraining and fine-tuning ----------------------------------------

def train_loop(model: Transformer, batches, steps: int, lr: float, weight_decay: float, args, stage: str,
               out_dir: str, run_key: dict, stop: StopRequest, extensions=()):
    """AdamW, warmup + cosine, gradient clipping at 1.0. Every step takes one global batch; this process runs
    its share in micro-batches, and the loss is the sum over the batch's target tokens divided by their
    number, so any split over micro-batches and processes gives the same gradient. A Ctrl-C (`stop`) before
    the last step saves a resumable state (`run_key`: what a resumed run must share) and stops."""
    trained = wrap_for_training(model, args)  # compiled, DDP or sharded; `model` stays the raw module we save
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    autocast, scaler = mixed_precision(args)
    threads = ThreadTuner(model, batches, args, stage)  # CPU: the fastest thread count (same numbers with any)
    state = rundir.TrainingState(out_dir, stage, run_key, model, optimizer, scaler, batches, args)
    progress = Progress(model, args, stage, state.resume(steps), steps)
    model.train()
    for step in progress:
        step_lr = set_lr(optimizer, cosine_lr(step, steps, lr, warmup=max(1, steps // 20)))
        state.before_batch()
        inputs, targets = batches.next()
        threads.next_step(step, inputs)
        n_targets = int((targets != -100).sum())
        micro_batches = my_micro_batches(inputs, targets, args.micro_batch, args.rank, args.world_size)
        loss = 0.0
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(args.device), y.to(args.device)
            last = i == len(micro_batches) - 1
            with gradient_sync(trained, args, last), dropout_seed(run_key["seed"], step, i, args):
                with autocast:
                    logits = trained(x)
                    # DDP averages gradients over processes: * world_size makes it their sum.
                    micro_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / n_targets * args.world_size
                scaler.scale(micro_loss).backward()
            loss += micro_loss.item()
        loss, stop_now = all_reduce_loss_and_stop(loss, stop, args)  # the batch's loss; did any process get Ctrl-C?
        scaler.unscale_(optimizer)
        for extension in extensions:
            extension.on_gradients()
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


if __name__ == "__main__":
    run_cli(main, who=process_name())
