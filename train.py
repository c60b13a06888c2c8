"""Pretrain a small Llama-style model on a toy world (or start from a real Llama checkpoint), fine-tune it,
and compare TAIA with its rivals.

The default run does every stage on a CPU in minutes:
    python train.py                       # data -> tokenizer -> pretrain -> snapshot -> fine-tune -> eval
    python train.py --seeds 5             # the same for seeds 0..4, then mean +/- std over seeds
    python train.py --stage finetune --lora_rank 16     # reuse out/base.pt, fine-tune with LoRA
    python train.py --train_scope attn    # TOA (train only attention); ffn gives TOF
    python train.py --finetune_set id     # the in-distribution control
A real Llama-family checkpoint (a Hugging Face directory with config.json, safetensors, tokenizer.model):
    python train.py --init_from TinyLlama-1.1B --finetune mine.jsonl --eval test.jsonl --lora_rank 16 \\
        --finetune_lr 2e-4 --finetune_batch 16 --micro_batch 4 --device cuda --dtype bfloat16

Launching:
    CPU, one process:          python train.py ...
    CPU, 2 processes (gloo):   torchrun --standalone --nproc_per_node=2 train.py ...
    one GPU:                   python train.py --device cuda --dtype bfloat16 --compile ...
    one node, 8 GPUs (NCCL):   torchrun --standalone --nproc_per_node=8 train.py --device cuda ...
    2 nodes, 8 GPUs each:      torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
                                   --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --device cuda ...
Under torchrun every process builds the same global batch and takes its own share of it, so a run gives
the same result (within float rounding) on any number of processes; only rank 0 writes files and prints.

Stages (--stage, default all): data (write the toy world to OUT/data), pretrain (tokenizer + base
model -> OUT/base.pt; skipped with --init_from), finetune (OUT/ffn_snapshot.pt, OUT/finetuned.pt), eval
(OUT/results.json). Each stage alone reuses what the previous one left in --out_dir.
Your own data: --pretrain_text FILE.txt (one document per line), --finetune FILE.jsonl and
--eval FILE.jsonl ({"prompt", "response"} per line; repeat --eval for several sets).

Interrupted runs: training saves OUT/<stage>_state.pt every --save_interval steps and on Ctrl-C (or
SIGTERM); the same command with --resume continues from it and ends exactly where an uninterrupted run
would (on CPU, bit for bit).
"""
import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import taia
from data.text import (PLAIN_TEMPLATE, DataError, check_template, encode_example, example_batch, load_tokenizer,
                       random_windows, read_examples, read_lines, token_stream, train_tokenizer)
from data.toy_world import generate as generate_toy_world
from infer import (FILES, OneLineParser, Weights, check_device, check_tokenizer, config_from_dict, evaluate,
                   format_table, hf_tokenizer_path, load_checkpoint, load_hf_base, model_from_state, parse_modes,
                   run_cli, write_json)
from model import PRESETS, ModelConfig, Transformer

TOY_EVAL_SETS = ["ood_test", "knowledge", "ft_only_facts", "ood_val"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    a("--finetune_set", default="ood", choices=["ood", "id"],
      help="toy world: out-of-distribution fine-tuning data (default) or the in-distribution control")
    a("--eval", action="append", default=[], metavar="FILE.jsonl", help="evaluation set (repeatable)")
    a("--template", default=PLAIN_TEMPLATE,
      help='how a prompt is shown to the model in fine-tuning, evaluation and infer.py, e.g. '
           '"### Instruction:\\n{prompt}\\n\\n### Response:\\n" (default: the prompt verbatim)')
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
    a("--lora_rank", type=int, default=0, help="LoRA on all 7 linear layers of every block (0: full fine-tuning)")
    a("--lora_alpha", type=float, default=32.0)
    a("--lora_dropout", type=float, default=0.05)
    # machinery
    a("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    a("--dtype", default="auto", choices=["auto", *DTYPES],
      help="autocast precision; weights stay float32 (auto: bfloat16 on GPU, float32 on CPU; float16 adds a "
           "gradient scaler and needs a GPU)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--resume", action="store_true", help="continue from OUT/<stage>_state.pt; skip stages already finished")
    a("--save_interval", type=int, default=200, help="save a resumable checkpoint every N steps (0: only on Ctrl-C)")
    a("--log_interval", type=int, default=100)
    a("--peak_tflops", type=float, help="the GPU's peak TFLOP/s for MFU (default: looked up by device name)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(args.device)
    except DataError as e:
        p.error(str(e))
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        p.error("--dtype float16 needs --device cuda (on CPU use bfloat16 or float32)")
    for name in ("seeds", "pretrain_steps", "finetune_steps", "batch_tokens", "micro_batch", "finetune_batch",
                 "seq_len", "vocab_size", "log_interval", "dim", "n_layers", "hidden_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.lora_rank < 0 or not 0 <= args.lora_dropout < 1 or args.pretrain_lr <= 0 or args.finetune_lr <= 0:
        p.error("--lora_rank must be >= 0, --lora_dropout in [0, 1), learning rates > 0")
    if args.save_interval < 0 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        p.error("--save_interval must be >= 0 and --peak_tflops > 0")
    if args.lora_rank and args.train_scope != "all":
        p.error("--lora_rank puts adapters on every linear layer; combine it only with --train_scope all")
    args.template = args.template.replace("\\n", "\n")  # "\n" typed in a shell means a newline
    try:
        check_template(args.template)
    except DataError as e:
        p.error(f"--template: {e}")
    if args.init_from and (args.pretrain_text or args.stage == "pretrain"):
        p.error("--init_from replaces pretraining: drop --pretrain_text / --stage pretrain")
    return args


# ---- several processes (torchrun) ---------------------------------------------------------------

def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world_size > 1:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def is_main(args) -> bool:
    return args.rank == 0


def barrier(args):
    if args.world_size > 1:
        dist.barrier()


def log(args, *text):
    if is_main(args):
        tqdm.write(" ".join(map(str, text)))


# ---- batches: the same global batch on every process; each process takes its share ----------------

class WindowBatches:
    """Pretraining: random windows of the packed token stream."""

    def __init__(self, stream: torch.Tensor, n_windows: int, seq_len: int, seed: int):
        self.stream, self.n_windows, self.seq_len = stream, n_windows, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self):
        return random_windows(self.stream, self.n_windows, self.seq_len, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])


class ExampleBatches:
    """Fine-tuning: shuffled epochs of examples, padded to the longest in the batch (targets -100 on
    padding and prompts)."""

    def __init__(self, encoded: list, batch_size: int, pad_id: int, seed: int):
        self.encoded, self.batch_size, self.pad_id = encoded, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order = []  # example indices still to come in this epoch

    def next(self):
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.encoded), generator=self.generator).tolist()
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return example_batch([self.encoded[i] for i in batch], pad_id=self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])


def my_micro_batches(inputs, targets, micro_batch: int, rank: int, world_size: int) -> list:
    """Split a global batch into micro-batches of at most micro_batch rows, the same number for every
    process, and return this process's; trailing columns with nothing to predict are cut off."""
    n_chunks = world_size * math.ceil(math.ceil(len(inputs) / micro_batch) / world_size)
    if len(inputs) < n_chunks:  # a process would get an empty micro-batch, and DDP's gradient sync would fail
        raise DataError(f"a batch of {len(inputs)} sequences does not fill {n_chunks} micro-batches over {world_size} "
                        "processes: raise --finetune_batch / --batch_tokens or --micro_batch")
    chunks = list(zip(inputs.tensor_split(n_chunks), targets.tensor_split(n_chunks)))[rank::world_size]
    mine = []
    for x, y in chunks:
        predicted = (y != -100).any(0).nonzero()
        width = int(predicted[-1]) + 1 if len(predicted) else 1
        mine.append((x[:, :width], y[:, :width]))
    return mine


# ---- checkpoints that a stopped run continues from -------------------------------------------------

def save_checkpoint(path: str, obj: dict):
    """torch.save to a temporary name, then rename: an interrupted save leaves the old file intact."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and len(states.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class Interrupted(KeyboardInterrupt):
    """Training stopped on request after saving a resumable checkpoint (exit status 130)."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training: finish the current step, save, exit. A second Ctrl-C
    stops at once, without saving."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop "
              "without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---- throughput -----------------------------------------------------------------------------------

# Dense bf16/fp16 tensor-core peak TFLOP/s from the vendors' datasheets; the first name contained in
# torch.cuda.get_device_name() wins. --peak_tflops overrides.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250), ("A100", 312),
               ("L40S", 362), ("L4", 121), ("A10", 125), ("RTX 4090", 165), ("V100", 125), ("T4", 65)]


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not args.device.startswith("cuda") or args.dtype == "float32":
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def train_flops_per_token(model: Transformer, seq_len: int) -> float:
    """Matmul FLOPs per trained token: 2N forward and 2N for activation gradients over all N matmul weights,
    2N more for the trained ones' weight gradients, and causal-free attention scores 12 * layers * dim * T
    (PaLM, Chowdhery et al. 2022, appendix B)."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, taia.LoRALinear))]
    n_all = sum(m.weight.numel() for m in linears)
    n_trained = sum(m.weight.numel() for m in linears if m.weight.requires_grad)
    return 4 * n_all + 2 * n_trained + 12 * model.cfg.n_layers * model.cfg.dim * seq_len


# ---- the training loop, shared by pretraining and fine-tuning ------------------------------------

def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # decays to 10% of peak


def train_loop(model: Transformer, batches, steps: int, lr: float, weight_decay: float, args, desc: str,
               state_path: str, run_key: dict):
    """AdamW, warmup + cosine, gradient clipping at 1.0. Every step takes one global batch from `batches`;
    this process runs its share in micro-batches, and the loss is the sum over the batch's target tokens
    divided by their number, so any split over micro-batches and processes gives the same gradient.
    `run_key` names what a resumed run must share with the stopped one."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=(0.9, 0.95))
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device_type, dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)  # float16 only
    trained = torch.compile(model) if args.compile else model  # `model` stays the raw module we save
    if args.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained)
    start, saved_at, save_due = 0, None, False
    if args.resume and os.path.exists(state_path):
        state = load_checkpoint(state_path, keys=("model", "optimizer", "scaler", "step", "data", "rng", "run"))
        if state["run"] != run_key:
            differ = sorted(k for k in run_key if state["run"].get(k) != run_key[k])
            raise DataError(f"{state_path} was saved by a run with other settings ({', '.join(differ)}); "
                            "resume with the same settings, or delete it to start over")
        taia.check_same_layout(model.state_dict(), state["model"], "the model", state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the stopped run did not use float16
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])
        set_rng_states(state["rng"])
        start = saved_at = state["step"]
        log(args, f"{desc}: resuming from {state_path} at step {start}/{steps}")
    elif os.path.exists(state_path):
        log(args, f"{desc}: starting over; {state_path} is from a stopped run (--resume continues it)")

    def position() -> dict:  # where the batches and random numbers stand
        return {"data": batches.state_dict(), "rng": rng_states()}

    def save_state(step: int, at: dict):
        if is_main(args):
            save_checkpoint(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scaler": scaler.state_dict(), "step": step, **at, "run": run_key})
        barrier(args)

    peak = peak_flops(args)
    flops_per_token = None
    model.train()
    t0, tokens, losses = time.time(), 0, []
    bar = tqdm(range(start, steps), desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main(args) else True)
    with StopRequest() as stop:
        for step in bar:
            step_lr = cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            before = position() if save_due else None
            inputs, targets = batches.next()
            n_targets = int((targets != -100).sum())
            mine = my_micro_batches(inputs, targets, args.micro_batch, args.rank, args.world_size)
            if flops_per_token is None:
                flops_per_token = train_flops_per_token(model, inputs.shape[1])
            step_loss = 0.0
            for i, (x, y) in enumerate(mine):
                x, y = x.to(args.device), y.to(args.device)
                # DDP averages gradients over processes, hence the * world_size; it syncs on the last micro-batch.
                last = i == len(mine) - 1
                with trained.no_sync() if args.world_size > 1 and not last else nullcontext():
                    with autocast:
                        logits = trained(x)
                        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                                               reduction="sum") / n_targets * args.world_size
                    scaler.scale(loss).backward()
                step_loss += loss.item()
            # One all-reduce carries the loss and whether any process was asked to stop.
            shared = torch.tensor([step_loss / args.world_size, float(stop.requested)], dtype=torch.float64,
                                  device=args.device)
            if args.world_size > 1:
                dist.all_reduce(shared)
            step_loss, stop_now = shared[0].item(), shared[1].item() > 0
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            # Stop before a non-finite update reaches the weights (under float16 the scaler skips such steps).
            if not math.isfinite(step_loss) or not (scaler.is_enabled() or torch.isfinite(grad_norm)):
                kept = f"{state_path} (step {saved_at}) is the last good checkpoint" if saved_at else \
                    "no checkpoint was saved yet"
                what = f"the loss became {step_loss}" if not math.isfinite(step_loss) else "the gradient became inf/nan"
                raise DataError(f"{desc}: {what} at step {step + 1}; stopped. {kept}; lower the learning rate "
                                "(--resume may change it)")
            if save_due:  # a checkpoint is written once the next step's loss shows its weights are good
                save_state(step, before)
                saved_at, save_due = step, False
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            tokens += inputs.numel()
            bar.set_postfix(loss=f"{step_loss:.3f}")
            done = step + 1
            if done % args.log_interval == 0 or done == steps:
                elapsed = time.time() - t0
                line = (f"{desc} step {done}/{steps} loss {sum(losses) / len(losses):.4f} lr {step_lr:.2e} "
                        f"grad_norm {float(grad_norm):.3f} {1000 * elapsed / len(losses):.0f} ms/step "
                        f"{tokens / elapsed:.0f} tok/s")
                if peak:
                    line += f" MFU {100 * flops_per_token * tokens / elapsed / (peak * args.world_size):.1f}%"
                log(args, line)
                t0, tokens, losses = time.time(), 0, []
            save_due = bool(args.save_interval) and done % args.save_interval == 0 and done < steps
            if stop_now:
                save_state(done, position())
                raise Interrupted(f"{desc}: stopped at step {done}/{steps}; saved {state_path}. Run the same "
                                  "command with --resume to continue")
    model.eval()


# ---- stages -------------------------------------------------------------------------------------

def state_path(out_dir: str, stage: str) -> str:
    return os.path.join(out_dir, f"{stage}_state.pt")


def finish_stage(args, out_dir: str, stage: str):
    """The stage's outputs are on disk: its resumable state is no longer needed."""
    if is_main(args) and os.path.exists(state_path(out_dir, stage)):
        os.remove(state_path(out_dir, stage))
    barrier(args)


def toy_paths(out_dir: str) -> dict:
    data_dir = os.path.join(out_dir, "data")
    names = ["finetune_ood", "finetune_id", *TOY_EVAL_SETS]
    return {"pretrain": os.path.join(data_dir, "pretrain.txt"),
            **{n: os.path.join(data_dir, n + ".jsonl") for n in names}}


def toy_world_is_there(paths: dict, stamp: str, seed: int) -> bool:
    if not all(os.path.exists(p) for p in [*paths.values(), stamp]):
        return False
    with open(stamp) as f:
        return json.load(f).get("seed") == seed


def stage_data(args, out_dir: str, seed: int):
    needs_toy_text = not (args.pretrain_text or args.init_from)
    if not (needs_toy_text or not args.finetune or not args.eval):
        return  # every input is the user's own
    paths = toy_paths(out_dir)
    data_dir = os.path.dirname(paths["pretrain"])
    stamp = os.path.join(data_dir, "world.json")  # which seed made the files already there
    if is_main(args) and not toy_world_is_there(paths, stamp, seed):
        generate_toy_world(data_dir, seed=seed)
        write_json(stamp, {"seed": seed})
        print(f"toy world (seed {seed}) written to {data_dir}")
    barrier(args)  # every process, always: the others wait for rank 0's files


def model_config(args, vocab_size: int) -> ModelConfig:
    cfg = asdict(PRESETS[args.preset])
    cfg.update({k: getattr(args, k) for k in ("dim", "n_layers", "hidden_dim") if getattr(args, k) is not None})
    cfg["vocab_size"] = vocab_size
    cfg["max_seq_len"] = max(cfg["max_seq_len"], args.seq_len)
    return ModelConfig(**cfg)


def resume_key(settings: dict, **more) -> dict:
    """What a resumed run must share with the stopped one: everything but the learning rate, which may be
    lowered after a non-finite loss."""
    return {**{k: v for k, v in settings.items() if not k.endswith("_lr")}, **more}


PRETRAIN_KEYS = ("pretrain_text", "pretrain_steps", "pretrain_lr", "batch_tokens", "seq_len", "weight_decay",
                 "vocab_size")


def stage_pretrain(args, out_dir: str, seed: int):
    model_config(args, args.vocab_size)  # a bad size fails here, before anything is written
    lines = read_lines(args.pretrain_text or toy_paths(out_dir)["pretrain"])
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
        raise DataError(f"pretraining text has {len(stream)} tokens: fewer than one window of {args.seq_len}")
    torch.manual_seed(seed)
    cfg = model_config(args, sp.vocab_size())
    model = Transformer(cfg).to(args.device)
    log(args, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg}")
    n_windows = max(1, args.batch_tokens // args.seq_len)
    settings = {k: getattr(args, k) for k in PRETRAIN_KEYS}
    train_loop(model, WindowBatches(stream, n_windows, args.seq_len, seed), args.pretrain_steps, args.pretrain_lr,
               args.weight_decay, args, "pretrain", state_path(out_dir, "pretrain"),
               resume_key(settings, seed=seed, config=asdict(cfg)))
    if is_main(args):
        save_checkpoint(os.path.join(out_dir, FILES["base"]),
                        {"model": model.state_dict(), "config": asdict(cfg), "seed": seed, "pretrain": settings})
        os.replace(tokenizer_path + ".new", tokenizer_path)
    finish_stage(args, out_dir, "pretrain")


def finetune_examples(args, out_dir: str):
    return read_examples(args.finetune or toy_paths(out_dir)["finetune_" + args.finetune_set])


FINETUNE_KEYS = ("init_from", "finetune", "finetune_set", "template", "finetune_steps", "finetune_lr",
                 "finetune_batch", "train_scope", "freeze_embeddings", "lora_rank", "lora_alpha", "lora_dropout")


def load_base(args, out_dir: str):
    """The pretrained model fine-tuning starts from, and its tokenizer's path."""
    if args.init_from:
        cfg, state = load_hf_base(args.init_from)
        return cfg, state, hf_tokenizer_path(args.init_from)
    base = load_checkpoint(os.path.join(out_dir, FILES["base"]))
    return config_from_dict(base["config"]), base["model"], os.path.join(out_dir, FILES["tokenizer"])


def stage_finetune(args, out_dir: str, seed: int):
    cfg, base_state, tokenizer_path = load_base(args, out_dir)
    model = model_from_state(cfg, base_state, args.device)
    del base_state
    sp = load_tokenizer(tokenizer_path)
    check_tokenizer(sp, cfg)
    encoded = [encode_example(e, sp, args.template) for e in finetune_examples(args, out_dir)]
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
    settings = {k: getattr(args, k) for k in FINETUNE_KEYS}
    if settings["init_from"]:
        settings["init_from"] = os.path.abspath(args.init_from)
    base_ffn = taia.fingerprint(original_ffn)  # which base this fine-tune starts from
    batches = ExampleBatches(encoded, args.finetune_batch, sp.eos_id(), seed + 1)
    train_loop(model, batches, args.finetune_steps, args.finetune_lr, 0.0, args, "finetune",
               state_path(out_dir, "finetune"), resume_key(settings, seed=seed, base_ffn=base_ffn))
    # Under LoRA, save the fully merged weights: infer.py derives every mode from base + tuned, and for
    # LoRA combine(base, merged, "taia") equals merging only the attention adapters (tests/test_taia.py).
    tuned = taia.merge_lora(model, "vanilla") if args.lora_rank else model.state_dict()
    if is_main(args):
        save_checkpoint(os.path.join(out_dir, FILES["snapshot"]), {"ffn": original_ffn})
        save_checkpoint(os.path.join(out_dir, FILES["tuned"]),
                        {"model": {k: v.detach().cpu() for k, v in tuned.items()}, "config": asdict(cfg),
                         "base_ffn": base_ffn, "finetune": settings, "init_from": settings["init_from"]})
        if args.init_from:  # infer.py finds every file it needs in out_dir; the base stays in DIR
            shutil.copyfile(tokenizer_path, os.path.join(out_dir, FILES["tokenizer"]) + ".tmp")
            os.replace(os.path.join(out_dir, FILES["tokenizer"]) + ".tmp", os.path.join(out_dir, FILES["tokenizer"]))
    finish_stage(args, out_dir, "finetune")


def eval_sets(args, out_dir: str) -> dict:
    if args.eval:
        return {os.path.splitext(os.path.basename(f))[0]: read_examples(f) for f in args.eval}
    paths = toy_paths(out_dir)
    return {name: read_examples(paths[name]) for name in TOY_EVAL_SETS}


def stage_eval(args, out_dir: str, started: float) -> dict:
    sp = load_tokenizer(os.path.join(out_dir, FILES["tokenizer"]))
    weights = Weights(out_dir, args.init_from)
    check_tokenizer(sp, weights.cfg)
    modes = parse_modes(args.modes)
    # Each process scores its share of every set; the counts are summed over processes.
    results = evaluate(weights, modes, eval_sets(args, out_dir), sp, args.device, args.rank, args.world_size)
    report = {"results": results["answer"], "exact_match": results["exact"], "seed": weights.seed,
              "seconds": round(time.time() - started, 1), "config": {"model": asdict(weights.cfg), **weights.meta}}
    if is_main(args):
        print(format_table(results["answer"], modes, "answer match"))
        print(format_table(results["exact"], modes, "exact match"))
        write_json(os.path.join(out_dir, "results.json"), report)
    return report


def finished(args, out_dir: str, stage: str, output: str) -> bool:
    """With --resume, a training stage whose output is there and that left no state is done already."""
    path = os.path.join(out_dir, output)
    if args.resume and os.path.exists(path) and not os.path.exists(state_path(out_dir, stage)):
        log(args, f"{stage}: finished already ({path}); skipped")
        return True
    return False


def run(args, out_dir: str, seed: int) -> dict | None:
    """The stages --stage asks for, in order; returns the eval report when eval ran."""
    started = time.time()
    if is_main(args):
        os.makedirs(out_dir, exist_ok=True)
    barrier(args)
    if args.stage in ("all", "data", "pretrain"):
        stage_data(args, out_dir, seed)  # skipped when the files are already there
    if args.stage in ("all", "pretrain") and not args.init_from and not finished(args, out_dir, "pretrain",
                                                                                  FILES["base"]):
        stage_pretrain(args, out_dir, seed)
    if args.stage in ("all", "finetune") and not finished(args, out_dir, "finetune", FILES["tuned"]):
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
    init_distributed(args)
    try:
        if args.seeds == 1:
            run(args, args.out_dir, args.seed)
            barrier(args)
            return
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
        if args.world_size > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
