"""The machinery under train.py's training loop, each piece called from the loop in one line: several
processes (torchrun, DDP), micro-batches, mixed precision, the learning rate, Ctrl-C, the non-finite guard,
and the log line with throughput and MFU. Read train.py first; come here for how one of these works. Beside
it: fsdp.py (sharding), threads.py (--threads auto), memory.py (the up-front memory check) and rundir.py (a
run's folder: lock, settings, safe saves, resumable state).
"""
import argparse
import gc
import hashlib
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import UserError, resolve_device
from machinery.fsdp import gathered_model_state, shard, sharded
from model import flops_per_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the flags of the machinery, and their checks -------------------------------------------------------

def add_arguments(p):
    """train.py's flags for where and how it runs; none of them changes what is trained."""
    a = p.add_argument
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda or mps")
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


def check_arguments(args, error):
    """Resolve --device and --dtype, and refuse values that cannot run (error: the parser's one-line exit)."""
    args.device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        error("--dtype float16 needs --device cuda (on CPU use bfloat16 or float32)")
    for name, value, ok, words in [("save_interval", args.save_interval, args.save_interval >= 0, "at least 0"),
                                   ("log_interval", args.log_interval, args.log_interval >= 1, "at least 1"),
                                   ("peak_tflops", args.peak_tflops, args.peak_tflops is None
                                    or 0 < args.peak_tflops < math.inf, "a finite number > 0")]:
        if not ok:  # (nan fails every comparison)
            error(f"--{name} must be {words}, not {value}")
    cores = os.cpu_count()
    if args.threads != "auto" and cores and args.threads > cores:  # thousands of threads stall the machine
        error(f"--threads {args.threads}: this machine has {cores} cores")
    if args.fsdp and args.dtype == "float16":
        error("--fsdp shards full fine-tuning in float32 or bfloat16: drop --dtype float16")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        error("--fsdp shards across torchrun's processes: launch with torchrun --nproc_per_node=N")


def threads_arg(text: str):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of threads (at least 1) or auto")
    return int(text)


# ---- several processes (torchrun) ---------------------------------------------------------------

def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world_size > 1:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def close_distributed(args):
    if args.world_size > 1:
        gc.collect()  # FSDP's modules sit in reference cycles: free them while their process group still exists
        dist.destroy_process_group()


def process_name() -> str:
    """How a process other than rank 0 signs its messages under torchrun ('' for rank 0 or no torchrun)."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def is_main(args) -> bool:
    return args.rank == 0


def barrier(args):
    if args.world_size > 1:
        dist.barrier()


def log(args, *text):
    if is_main(args):
        tqdm.write(" ".join(map(str, text)))


def sum_over_processes(counts: dict, args) -> dict:
    """{key: number} summed over every process (unchanged on one process)."""
    if args.world_size == 1:
        return counts
    keys = list(counts)  # every process filled the dict in the same order
    total = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=args.device)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist()))


def wrap_for_training(model, args):
    """The module the loop calls: compiled and/or DDP-wrapped, or with --fsdp sharded in place. The raw
    `model` is what gets saved, so checkpoints never carry `_orig_mod.` or `module.` prefixes."""
    if sharded(args):
        log(args, shard(model, DTYPES[args.dtype], args.world_size))
    trained = torch.compile(model) if args.compile else model
    if args.world_size > 1 and not sharded(args):
        return torch.nn.parallel.DistributedDataParallel(trained)
    return trained


def full_state(model, args) -> dict:
    """The model's state dict with whole tensors: under --fsdp gathered onto rank 0's CPU (the other
    processes get {}); every process must call it."""
    return gathered_model_state(model) if sharded(args) else model.state_dict()


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_, with the norm as a plain tensor also when the gradients are sharded (DTensors)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # (a DTensor's is)


def my_micro_batches(inputs, targets, micro_batch: int, rank: int, world_size: int) -> list:
    """Split a global batch into micro-batches of at most micro_batch rows, the same number for every
    process, and return this process's; trailing columns with nothing to predict are cut off."""
    n_chunks = world_size * math.ceil(math.ceil(len(inputs) / micro_batch) / world_size)
    if len(inputs) < n_chunks:  # a process would get an empty micro-batch, and DDP's gradient sync would fail
        raise UserError(f"a batch of {len(inputs)} sequences does not fill {n_chunks} micro-batches over {world_size} "
                        "processes: raise --finetune_batch / --batch_tokens or --micro_batch")
    chunks = list(zip(inputs.tensor_split(n_chunks), targets.tensor_split(n_chunks)))[rank::world_size]
    this_process = []
    for x, y in chunks:
        predicted = (y != -100).any(0).nonzero()
        width = int(predicted[-1]) + 1 if len(predicted) else 1
        this_process.append((x[:, :width], y[:, :width]))
    return this_process


def gradient_sync(trained, args, last: bool):
    """DDP all-reduces gradients on every backward; accumulate locally until the last micro-batch. (A
    sharded model reduce-scatters every micro-batch: accumulating locally would hold whole gradients.)"""
    return trained.no_sync() if args.world_size > 1 and not sharded(args) and not last else nullcontext()


@contextmanager
def dropout_seed(seed: int, step: int, my_index: int, args):
    """Dropout (LoRA's) draws its masks from a random stream of their own for each micro-batch, seeded by the
    run's seed, the step and the micro-batch's index in the global batch (this process's micro-batch `my_index`
    is number rank + my_index * world_size there, as my_micro_batches deals them). The masks do not depend on which
    process runs a micro-batch, so 1 and N processes make the same updates (whenever they split the batch
    into the same micro-batches), and a resumed run needs no process's random state to draw them again.
    The stream outside is left as it was."""
    index = args.rank + my_index * args.world_size
    key = hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()
    with torch.random.fork_rng(devices=[args.device] if args.device.startswith("cuda") else []):
        torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
        yield


# ---- precision and the learning rate ---------------------------------------------------------------

def mixed_precision(args):
    """(autocast context, gradient scaler): autocast to --dtype (weights stay float32); the scaler works
    only under float16, whose narrow range needs it."""
    device_type = args.device.split(":")[0]  # cuda, mps or cpu
    dtype = DTYPES[args.dtype]
    # (under --fsdp, FSDP's own policy casts instead: see shard)
    autocast = torch.autocast(device_type, dtype) if dtype != torch.float32 and not sharded(args) else nullcontext()
    return autocast, torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # decays to 10% of peak


def set_lr(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---- stopping: Ctrl-C, and losses that are no longer numbers ------------------------------------------

class Interrupted(KeyboardInterrupt):
    """Training stopped on request (exit status 130); the message says what is on disk."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training or saving a stage's outputs: finish the current step (or
    the saving), save, exit. A second Ctrl-C stops at once, without saving."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step (or once the outputs being written are "
              "saved), with a checkpoint to resume from; Ctrl-C again stops at once, without saving", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def all_reduce_loss_and_stop(loss: float, stop: StopRequest, args) -> tuple[float, bool]:
    """One all-reduce carries this process's share of the loss and whether any process was asked to
    stop: every process gets the batch's loss, and they all stop at the same step."""
    shared = torch.tensor([loss / args.world_size, float(stop.requested)], dtype=torch.float64, device=args.device)
    if args.world_size > 1:
        dist.all_reduce(shared)
    return shared[0].item(), shared[1].item() > 0


def check_finite(loss: float, grad_norm, scaler, step: int, state):
    """Stop before a non-finite update reaches the weights (under float16 the scaler skips such steps).
    `state`: the stage's rundir.TrainingState, which names the last good checkpoint."""
    if math.isfinite(loss) and (scaler.is_enabled() or torch.isfinite(grad_norm)):
        return
    kept = f"{state.path} (step {state.saved_at}) is the last good checkpoint" if state.saved_at else \
        "no checkpoint was saved yet"
    what = f"the loss became {loss}" if not math.isfinite(loss) else "the gradient became inf/nan"
    raise UserError(f"{state.stage}: {what} at step {step + 1}; stopped. {kept}; lower the learning rate "
                    "(--resume may change it)")


# ---- the log line: loss, lr, gradient norm, speed, MFU ---------------------------------------------------

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


class Progress:
    """A tqdm bar, and every --log_interval steps one line: step, mean loss, lr, gradient norm, ms/step,
    tokens/s and, on a GPU, MFU (model FLOPs utilisation: flops_per_token x tokens/s over the peak)."""

    def __init__(self, model, args, stage: str, start: int, steps: int):
        self.model, self.args, self.stage, self.steps = model, args, stage, steps
        self.peak, self.flops_per_token = peak_flops(args), None
        self.bar = tqdm(range(start, steps), desc=stage, leave=False, dynamic_ncols=True,
                        disable=None if is_main(args) else True)
        self.t0, self.tokens, self.losses = time.time(), 0, []

    def __iter__(self):
        return iter(self.bar)

    def step_done(self, done: int, loss: float, lr: float, grad_norm, inputs):
        if self.flops_per_token is None:  # weights a LoRA wrapper or --train_scope froze get no gradient
            n_trained = sum(m.weight.numel() for m in self.model.modules()
                            if hasattr(m, "weight") and not isinstance(m, torch.nn.Embedding)
                            and m.weight.dim() == 2 and m.weight.requires_grad)
            self.flops_per_token = flops_per_token(self.model.cfg, inputs.shape[1], n_trained)
        self.losses.append(loss)
        self.tokens += inputs.numel()
        self.bar.set_postfix(loss=f"{loss:.3f}")
        if done % self.args.log_interval and done != self.steps:
            return
        elapsed = time.time() - self.t0
        line = (f"{self.stage} step {done}/{self.steps} loss {sum(self.losses) / len(self.losses):.4f} lr {lr:.2e} "
                f"grad_norm {float(grad_norm):.3f} {1000 * elapsed / len(self.losses):.0f} ms/step "
                f"{self.tokens / elapsed:.0f} tok/s")
        if self.args.device == "cpu":
            line += f" threads {torch.get_num_threads()}"
        if self.peak:
            achieved = self.flops_per_token * self.tokens / elapsed
            line += f" MFU {100 * achieved / (self.peak * self.args.world_size):.1f}%"
        log(self.args, line)
        self.t0, self.tokens, self.losses = time.time(), 0, []
