"""--threads auto: on the CPU, train with whichever thread count is fastest now (only among counts that give
bit-identical gradients, so the choice changes the speed, never the numbers). The loop calls it in one line.
"""
import os
import time

import torch
import torch.nn.functional as F

from machinery import log, mixed_precision, my_micro_batches


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
