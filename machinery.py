"""The machinery under train.py's training loop, each piece called from the loop in one line: several
processes (torchrun, DDP or FSDP2 sharding), mixed precision, resumable checkpoints, Ctrl-C, the non-finite
guard, and the log line with throughput and MFU. Read train.py first; come here for how one of these works.
"""
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
import torch.nn.functional as F
from tqdm import tqdm

import taia
from common import UserError, load_checkpoint, save_checkpoint
from model import ModelConfig, flops_per_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        shard(model, args)
    trained = torch.compile(model) if args.compile else model
    if args.world_size > 1 and not sharded(args):
        return torch.nn.parallel.DistributedDataParallel(trained)
    return trained


# ---- sharding (--fsdp): parameters, gradients and optimizer state split across processes -----------------
# (FSDP's modules are imported where they are used: 0.6 s at every start that a run without --fsdp need not pay)

def sharded(args) -> bool:
    return args.fsdp and args.world_size > 1


def shard(model, args):
    """FSDP2: every block, then the rest of the model, keeps 1/N of each parameter (and so of its gradient
    and AdamW state) per process; a block's weights are gathered just for its forward and backward. Mixed
    precision is FSDP's own: computed in --dtype, gradients reduced and weights kept in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[args.dtype], reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    log(args, f"sharded over {args.world_size} processes (FSDP2): each holds 1/{args.world_size} of every parameter")


def full_state(model, args) -> dict:
    """The model's state dict with whole tensors: under --fsdp gathered onto rank 0's CPU (the other
    processes get {}); every process must call it."""
    if not sharded(args):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
    mine = []
    for x, y in chunks:
        predicted = (y != -100).any(0).nonzero()
        width = int(predicted[-1]) + 1 if len(predicted) else 1
        mine.append((x[:, :width], y[:, :width]))
    return mine


def gradient_sync(trained, args, last: bool):
    """DDP all-reduces gradients on every backward; accumulate locally until the last micro-batch. (A
    sharded model reduce-scatters every micro-batch: accumulating locally would hold whole gradients.)"""
    return trained.no_sync() if args.world_size > 1 and not sharded(args) and not last else nullcontext()


@contextmanager
def dropout_seed(seed: int, step: int, mine: int, args):
    """Dropout (LoRA's) draws its masks from a random stream of their own for each micro-batch, seeded by the
    run's seed, the step and the micro-batch's index in the global batch (this process's micro-batch `mine`
    is number rank + mine * world_size there, as my_micro_batches deals them). The masks do not depend on which
    process runs a micro-batch, so 1 and N processes make the same updates (whenever they split the batch
    into the same micro-batches), and a resumed run needs no process's random state to draw them again.
    The stream outside is left as it was."""
    index = args.rank + mine * args.world_size
    key = hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()
    with torch.random.fork_rng(devices=[args.device] if args.device.startswith("cuda") else []):
        torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
        yield


# ---- memory: a size that cannot fit is refused before anything is allocated ------------------------

def check_memory(args, cfg: ModelConfig | None):
    """A model or batch too big for this machine is one line now, not a MemoryError (or a machine lost in
    swap) minutes later. What each training stage needs, counted from below (training_memory), against the
    memory Linux says is available; skipped where either is unknown before the run starts."""
    available = available_memory()
    if available is None or cfg is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # under torchrun, each process holds its own copy
    for stage, need, asked in training_memory(args, cfg):
        if need * processes > available:
            copies = f" for each of {processes} processes" if processes > 1 else ""
            raise UserError(f"{stage} {asked} needs at least {need / 2**30:,.1f} GiB of memory{copies}; this machine "
                            f"has {available / 2**30:,.1f} GiB available")


def shards(args) -> int:
    """How many processes share the gradients and AdamW state (--fsdp under torchrun), before it starts."""
    return int(os.environ.get("WORLD_SIZE", "1")) if args.fsdp else 1


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have without swapping (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def training_memory(args, cfg: ModelConfig) -> list[tuple[str, int, str]]:
    """(stage, bytes, what was asked) for each training stage of this run: a lower bound on the memory it
    holds at once. Weights, gradients and AdamW's two moments take 16 bytes per trained float32 parameter (4
    per frozen one); then the batch's token ids, and what one micro-batch's forward pass keeps for backward:
    per layer at least the block's inputs and its FFN activations, and the logits with their log-softmax. On
    a GPU all of that lives on the GPU, and the CPU holds only the weights, built there first."""
    n_params = parameter_count(cfg)
    on_cpu = args.device == "cpu"
    per_token = ((2 if args.dtype in ("bfloat16", "float16") else 4) * cfg.n_layers * (4 * cfg.dim + 3 * cfg.hidden_dim)
                 + 4 * 2 * cfg.vocab_size)
    model = (f"a model of dim {cfg.dim}, n_layers {cfg.n_layers}, hidden_dim {cfg.hidden_dim} "
             f"({n_params:,} parameters or more)")
    needs = []
    if args.stage in ("all", "pretrain"):
        windows = max(1, args.batch_tokens // args.seq_len)
        need = 4 * n_params + windows * (args.seq_len + 1) * 8  # the weights and the batch's token ids
        if on_cpu:
            need += 12 * n_params // shards(args) + min(args.micro_batch, windows) * args.seq_len * per_token
        needs.append(("pretraining", need, f"{model} on batches of {args.batch_tokens:,} tokens"))
    if args.stage in ("all", "finetune"):
        adapters = args.lora_rank * cfg.n_layers * (7 * cfg.dim + 2 * cfg.head_dim * (cfg.n_heads + cfg.n_kv_heads)
                                                    + 3 * cfg.hidden_dim)  # in + out of the 7 linear layers
        trained = adapters if args.lora_rank else n_params
        need = 4 * n_params + args.finetune_batch * 32  # and each example's input and target ids, 2 tokens at least
        if on_cpu:
            need += 4 * adapters + 12 * trained // shards(args) + min(args.micro_batch, args.finetune_batch) * per_token
            # the L2 / EWC baselines keep the start of every trained weight, EWC its Fisher information too
            need += 4 * trained * ((args.l2_weight > 0 or args.ewc_weight > 0) + (args.ewc_weight > 0))
        lora = f" with LoRA of rank {args.lora_rank:,} ({adapters:,} parameters)" if args.lora_rank else ""
        needs.append(("fine-tuning", need, f"{model}{lora} on batches of {args.finetune_batch:,} examples"))
    return needs


def parameter_count(cfg: ModelConfig) -> int:
    """What Transformer(cfg) holds, counted from the config (building even an empty model of 10**10 layers
    would take forever)."""
    attention = cfg.dim * cfg.head_dim * 2 * (cfg.n_heads + cfg.n_kv_heads)  # q, o and k, v
    block = attention + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim  # + gate, up, down and two norms
    return cfg.n_layers * block + cfg.dim + cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)


# ---- precision and the learning rate ---------------------------------------------------------------

def mixed_precision(args):
    """(autocast context, gradient scaler): autocast to --dtype (weights stay float32); the scaler works
    only under float16, whose narrow range needs it."""
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = DTYPES[args.dtype]
    # (under --fsdp, FSDP's own policy casts instead: see shard)
    autocast = torch.autocast(device_type, dtype) if dtype != torch.float32 and not sharded(args) else nullcontext()
    return autocast, torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


# ---- CPU threads -----------------------------------------------------------------------------------

def cores_per_process() -> int:
    """The cores this process may use: the ones it is allowed to run on, shared among torchrun's
    processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class ThreadTuner:
    """--threads auto, on CPU: use whichever thread count is fastest now, and keep checking.

    On a model this small, torch's default (a thread per core) is 1.7x faster than one thread on an idle
    2-core machine, but 2x slower or worse once another job holds a core, and slower even when idle on some
    machines whose threads wait on each other in the kernel (issue 17: 2.1 s against 1.0 s per step). No
    fixed count is right everywhere, so: first check, on one real micro-batch, which counts (1, 2, 4 ...
    up to this process's cores) give bit-identical loss and gradients, and use only those (for the toy
    model on the machines tried all do: the count changes the speed, not the numbers); then time the real steps, run the
    count with the fewest seconds per token, and every EXPLORE steps give each other count one step, to
    notice when the machine's load has changed."""
    EXPLORE = 20

    def __init__(self, model, batches, args, stage: str):
        self.seconds, self.step_started, self.tokens = {}, None, None  # seconds per token, by count
        if args.threads != "auto":
            self.counts, how = [args.threads], "--threads"
        elif args.device != "cpu" or "OMP_NUM_THREADS" in os.environ:  # (torchrun sets it, or the user did)
            self.counts = [torch.get_num_threads()]
            how = "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "torch's default"
        else:
            cores = cores_per_process()
            tried = sorted({min(2 ** i, cores) for i in range(cores.bit_length())})
            self.counts = identical_counts(model, batches, args, tried)
            how = "--threads auto: tuned while training" + "".join(
                f"; {n} would change the numbers" for n in tried if n not in self.counts)
        torch.set_num_threads(self.counts[-1])
        log(args, f"{stage}: {' or '.join(map(str, self.counts))} thread{'s' * (self.counts != [1])} per process, "
                  f"{args.world_size} process{'es' * (args.world_size > 1)} ({how})")

    def next_step(self, step: int, inputs):
        """Call at the start of every step: books the last step's time, sets the count for this one."""
        now = time.perf_counter()
        if self.step_started is not None:
            self.seconds[torch.get_num_threads()] = (now - self.step_started) / self.tokens
        self.step_started, self.tokens = now, inputs.numel()
        if len(self.counts) == 1:
            return
        untried = [n for n in self.counts if n not in self.seconds]
        if untried:
            torch.set_num_threads(untried[0])
        elif step % self.EXPLORE < len(self.counts):  # each count gets one step in turn
            torch.set_num_threads(self.counts[step % self.EXPLORE])
        else:
            torch.set_num_threads(min(self.counts, key=self.seconds.get))


def identical_counts(model, batches, args, counts: list[int]) -> list[int]:
    """Of `counts`, the thread counts under which one forward + backward of the first micro-batch gives
    the same loss and gradients, bit for bit, as under the first."""
    saved = batches.state_dict()  # peek at the first batch without moving the stream on
    inputs, targets = batches.next()
    batches.load_state_dict(saved)
    x, y = my_micro_batches(inputs, targets, args.micro_batch, args.rank, args.world_size)[0]
    autocast, training = mixed_precision(args)[0], model.training
    model.eval()  # no dropout: the check must not draw from the random streams training uses
    results = {}
    for n in counts:
        torch.set_num_threads(n)
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
        loss.backward()
        results[n] = [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
    model.train(training)
    return [n for n in counts if all(torch.equal(a, b) for a, b in zip(results[n], results[counts[0]]))]


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


def agree(loss: float, stop: StopRequest, args) -> tuple[float, bool]:
    """One all-reduce carries this process's share of the loss and whether any process was asked to
    stop: every process gets the batch's loss, and they all stop at the same step."""
    shared = torch.tensor([loss / args.world_size, float(stop.requested)], dtype=torch.float64, device=args.device)
    if args.world_size > 1:
        dist.all_reduce(shared)
    return shared[0].item(), shared[1].item() > 0


def check_finite(loss: float, grad_norm, scaler, step: int, state: "TrainingState"):
    """Stop before a non-finite update reaches the weights (under float16 the scaler skips such steps)."""
    if math.isfinite(loss) and (scaler.is_enabled() or torch.isfinite(grad_norm)):
        return
    kept = f"{state.path} (step {state.saved_at}) is the last good checkpoint" if state.saved_at else \
        "no checkpoint was saved yet"
    what = f"the loss became {loss}" if not math.isfinite(loss) else "the gradient became inf/nan"
    raise UserError(f"{state.stage}: {what} at step {step + 1}; stopped. {kept}; lower the learning rate "
                    "(--resume may change it)")


# ---- resumable checkpoints ---------------------------------------------------------------------------

def rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and len(states.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def state_path(out_dir: str, stage: str) -> str:
    return os.path.join(out_dir, f"{stage}_state.pt")


def trained_tensors(model) -> dict:
    """The parameters training changes: all that a resumable state must hold. Under LoRA, the adapters only;
    the frozen base they sit on is named by the fingerprint in the run key instead of copied."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class TrainingState:
    """OUT/<stage>_state.pt: the trained weights, optimizer, scaler, step, the batch sampler's position and
    the RNG states, and `run_key` (what a resumed run must share with the stopped one). An interval checkpoint
    is written one step late, once the next loss has shown its weights are good."""

    def __init__(self, out_dir, stage, run_key, model, optimizer, scaler, batches, args):
        self.path, self.stage, self.run_key, self.args = state_path(out_dir, stage), stage, run_key, args
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.saved_at, self.due, self.before = None, False, None

    def resume(self, steps: int) -> int:
        """With --resume and a state on disk, load it and return its step; else 0."""
        if not os.path.exists(self.path):
            return 0
        if not self.args.resume:
            log(self.args, f"{self.stage}: starting over; {self.path} is from a stopped run (--resume continues it)")
            return 0
        state = load_checkpoint(self.path, keys=("model", "optimizer", "scaler", "step", "data", "rng", "run"))
        if state["run"] != self.run_key:
            differ = sorted(k for k in set(self.run_key) | set(state["run"])
                            if state["run"].get(k) != self.run_key.get(k))
            raise UserError(f"{self.path} was saved by a run with other settings ({', '.join(differ)}); "
                            "resume with the same settings, or delete it to start over")
        trained = trained_tensors(self.model)
        try:
            taia.check_same_layout(trained, state["model"], "the trained parameters", self.path)
        except ValueError as e:
            raise UserError(f"{e}; delete it to start over") from None
        if sharded(self.args):  # whole tensors in the file: each process takes its shards
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            with torch.no_grad():
                for name, tensor in trained.items():
                    tensor.copy_(state["model"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the stopped run did not use float16
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        set_rng_states(state["rng"])
        self.saved_at = state["step"]
        log(self.args, f"{self.stage}: resuming from {self.path} at step {self.saved_at}/{steps}")
        return self.saved_at

    def position(self) -> dict:
        """Where the batches and random numbers stand."""
        return {"data": self.batches.state_dict(), "rng": rng_states()}

    def before_batch(self):
        """Called before a step draws its batch: remember the position, if a save is due this step."""
        self.before = self.position() if self.due else None

    def save_if_due(self, step: int):
        """Called once the step's loss is known to be finite: the weights before its update are good."""
        if self.due:
            self.save(step, self.before)
            self.due = False

    def after_update(self, done: int, steps: int):
        self.due = bool(self.args.save_interval) and done % self.args.save_interval == 0 and done < steps

    def save(self, step: int, position: dict):
        if sharded(self.args):  # every process sends its shards; rank 0 writes whole tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            model = full_state(self.model, self.args)
            optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        if is_main(self.args):
            trained = trained_tensors(self.model)
            save_checkpoint(self.path, {"model": {k: v.detach() for k, v in model.items() if k in trained},
                                        "optimizer": optimizer,
                                        "scaler": self.scaler.state_dict(), "step": step, **position,
                                        "run": self.run_key})
        self.saved_at = step
        barrier(self.args)

    def stop(self, done: int, steps: int):
        """Ctrl-C: save where the run stands now, and leave with exit status 130."""
        self.save(done, self.position())
        raise Interrupted(f"{self.stage}: stopped at step {done}/{steps}; saved {self.path}. Run the same "
                          "command with --resume to continue")


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
