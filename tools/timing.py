"""What both benchmarks (tools/bench.py, tools/bench_real.py) share: timing contenders fairly, the pieces
they race (the optimizer and step train.py uses, a compiled copy for decoding), and the report's format.

Fair timing: each contender is warmed up, then the contenders take turns (A B C, C B A, ...) so that a
change in machine load hits all of them alike, and every figure is the median over --repeats. Calls
shorter than MIN_SAMPLE_S are timed in batches, as timeit does.
"""
import argparse
import copy
import math
import os
import platform
import statistics
import time

import torch

from common import write_json
from infer import compile_decoding
from model import param_groups

MIN_SAMPLE_S = 0.02  # a timed sample shorter than this is mostly timer and scheduler noise
NOT_INSTALLED = "not installed"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def timed(fn, calls: int, device: str) -> float:
    """Seconds for `calls` calls of fn, waiting for the GPU to finish its queued work on both ends."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def race(contenders: dict, args, device: str) -> dict:
    """Median seconds per call of each contender (a dict name -> function of no arguments). After
    warm-up they take turns, the order reversed every round, so none always runs right after another."""
    calls = {}
    for name, fn in contenders.items():
        for _ in range(args.warmup):
            seconds = timed(fn, 1, device)
        calls[name] = max(1, math.ceil(MIN_SAMPLE_S / seconds))  # from the last, warm, call
    samples = {name: [] for name in contenders}
    order = list(contenders)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            samples[name].append(timed(contenders[name], calls[name], device) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def ratio(a, b):
    return None if a is None or b is None else a / b


# ---- the pieces both race ------------------------------------------------------------------------------

def import_transformers():
    """transformers, or None when it is not installed (it is a development dependency only)."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()  # no generation-config chatter in the table
    transformers.logging.disable_progress_bar()  # nor a "Loading weights" bar per model
    return transformers


def adamw(model):
    """The optimizer train.py uses (decay the matrices, not the norms), built the same way for both models."""
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))


def training_step(forward, loss_of, optimizer):
    def step():
        loss_of(forward()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def compiled_copy(ours):
    """A second model with the same weights and its decode step compiled, as infer.py --compile does,
    or (None, why) where torch.compile cannot build kernels here."""
    compiled = copy.deepcopy(ours)
    failed = compile_decoding(compiled)
    return (None, failed) if failed else (compiled, None)


def first_difference(a, b, prompt_len: int):
    """Index of the first decoded token (0 = the first after the prompt) where any row of a and b
    differs, or None if they are equal."""
    differs = (a != b).any(dim=0)[prompt_len:].nonzero()
    return int(differs[0]) if len(differs) else None


# ---- report -------------------------------------------------------------------------------------------

def fmt(value, spec: str = ",.0f", suffix: str = "") -> str:
    return NOT_INSTALLED if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[list[str]]) -> str:
    """Rows of cells, the first column left-aligned and the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def cpu_model() -> str:
    """The CPU's name as the kernel reports it (every timing is a property of one machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def publish(results: dict, text: str, json_path: str | None) -> dict:
    """Print the report; with --json, every figure to that file too. Returns the figures."""
    print(text)
    if json_path:
        write_json(json_path, results)
    return results
