"""--fsdp: parameters, gradients and AdamW state split across torchrun's processes (FSDP2), for full
fine-tuning of models too big for one device. The training loop never branches on it: it calls
machinery.wrap_for_training, machinery.full_state and the resumable state, which come here when sharded.
FSDP's modules are imported where they are used (0.6 s at every start that a run without --fsdp need not pay).
"""
import torch


def sharded(args) -> bool:
    return args.fsdp and args.world_size > 1


def shard(model, compute_dtype: torch.dtype, world_size: int) -> str:
    """FSDP2: every block, then the rest of the model, keeps 1/N of each parameter (and so of its gradient
    and AdamW state) per process; a block's weights are gathered just for its forward and backward. Mixed
    precision is FSDP's own: computed in compute_dtype, gradients reduced and weights kept in float32.
    Returns the line to log."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return f"sharded over {world_size} processes (FSDP2): each holds 1/{world_size} of every parameter"


def gathered_model_state(model) -> dict:
    """The state dict with whole tensors, gathered onto rank 0's CPU (the other processes get {}); every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_whole_state(model, optimizer, model_state: dict, optimizer_state: dict):
    """A resumable state of whole tensors (as saved above): each process takes its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
