"""Memory: a model or batch too big for this machine is refused before anything is allocated."""
import os

from common import UserError
from model import ModelConfig, parameter_count


def check_memory(args, cfg: ModelConfig | None, extra_copies: int = 0):
    """A model or batch too big for this machine is one line now, not a MemoryError (or a machine lost in
    swap) minutes later. What each training stage needs, counted from below (training_memory), against the
    memory Linux says is available; skipped where either is unknown before the run starts."""
    available = available_memory()
    if available is None or cfg is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # under torchrun, each process holds its own copy
    for stage, need, asked in training_memory(args, cfg, extra_copies):
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


def training_memory(args, cfg: ModelConfig, extra_copies: int = 0) -> list[tuple[str, int, str]]:
    """(stage, bytes, what was asked) for each training stage of this run: a lower bound on the memory it
    holds at once. Weights, gradients and AdamW's two moments take 16 bytes per trained float32 parameter (4
    per frozen one); then the batch's token ids, and what one micro-batch's forward pass keeps for backward:
    per layer at least the block's inputs and its FFN activations, and the logits with their log-softmax;
    and extra_copies float32 copies of the trained weights that an extension keeps (the L2 baseline's start).
    On a GPU all of that lives on the GPU, and the CPU holds only the weights, built there first."""
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
            need += 4 * trained * extra_copies  # what an extension keeps per trained weight (a pull's start)
        lora = f" with LoRA of rank {args.lora_rank:,} ({adapters:,} parameters)" if args.lora_rank else ""
        needs.append(("fine-tuning", need, f"{model}{lora} on batches of {args.finetune_batch:,} examples"))
    return needs
