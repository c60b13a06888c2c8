"""The fair comparison (issue 29): every mode at its own best fine-tuning learning rate, over 10 seeds.

    python experiments/fair.py --json docs/fair.json     # 85 minutes on an idle 2-core AMD EPYC; resumable

For every seed's base (pretrained once, shared with the other experiments in --root), fine-tunes by train.py:
- full fine-tuning at each rate of --full_lrs, evaluated as base, vanilla, TAIA and TAIF;
- LoRA (rank 16, alpha 32 on every linear layer: runs.KINDS's recipe) at each rate of --lora_lrs, the same modes;
- TOA and TOF (full fine-tuning of the attention only / the FFN only, lab.py --train_scope attn / ffn) at each
  rate of --full_lrs, answered as vanilla: the paper's baselines.
The rates span the toy's range, each about twice the last. Full: vanilla was best at the lowest rate
docs/baselines.json tried (3e-4: 31.7 on ood_test), fell to 16.7 at train.py's default 7e-4 and to 3.7 at 1e-3;
so from 3e-5 (ten times lower, where fine-tuning should barely move the base) to 1.5e-3 (collapse). LoRA:
vanilla was best at the recipe's 2e-3 in docs/lora_rank.json and broke at 5e-3; so from 5e-4 to 8e-3. The
fixed rates (7e-4, LoRA 2e-3) are always among them: the headline puts them beside the chosen ones. With the
defaults: 10 bases (3-7 min each at one thread), 230 fine-tunes and up to 80 reruns (10-20 s each with their
evaluation), two at a time.

Each mode's rate is the one with the best mean answer match on ood_val over the seeds, per kind, never on
ood_test (fair_tables.chosen). Then each chosen fine-tune is run again from the same base with a change that
alters only floating-point rounding (--rounding): by default ATen's kernels for another CPU (ATEN_CPU_CAPABILITY:
avx2 on an AVX-512 machine, else default), which is what another machine runs. On the toy, a thread count or
MKL's instruction set changes no bit (machinery/threads.py checks the first), --micro_batch would change LoRA's
dropout masks, while the kernels change gradients and scores but draw the same dropout masks and initial
adapters. The base is not pretrained again, so this is the fine-tune's and evaluation's share of a machine's
effect only; for the whole of it, run the command with ATEN_CPU_CAPABILITY set in the environment, in another
--root, with --rounding none (docs/results.md#machine-sensitivity). Prints the tables tools/report.py writes into
the docs (fair_tables); --json writes every point and the kernels ATen ran the runs with (cpu_capability: this
command's; runs a resumed command found finished keep whatever kernels made them).
Resumable: a second run skips what is finished (runs.py) and only evaluates again.
"""
import argparse
import os
import sys
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fair_tables  # noqa: E402
from fair_tables import FIXED, ROUNDED, chosen, methods_in, setting  # noqa: E402
from runs import KINDS, bases, finetune, parse_arguments, points, run_all, write_points  # noqa: E402

from common import UserError, run_cli  # noqa: E402
from train import parse_args as parse_train_args  # noqa: E402

FULL_LRS = (3e-5, 1e-4, 2e-4, 4e-4, 7e-4, 1.5e-3)
LORA_LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
LORA = KINDS["LoRA"][:KINDS["LoRA"].index("--finetune_lr")]  # the LoRA recipe without its rate
# Each sweep: (its runs' folder prefix, train.py flags before --finetune_lr, the modes its runs are scored in)
SWEEPS = {"full": ("full", [], "base,vanilla,taia,taif"), "LoRA": ("lora", LORA, "base,vanilla,taia,taif"),
          "TOA": ("toa", ["--train_scope", "attn"], "vanilla"), "TOF": ("tof", ["--train_scope", "ffn"], "vanilla")}


def rates(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]  # (argparse words a ValueError as an invalid value)
    if not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every rate must be a finite number > 0")
    return values


def rounding(text: str) -> dict:
    """--rounding: NAME=VALUE, an environment variable for the reruns; auto (see the docstring) or none."""
    if text == "none":
        return {}
    if text == "auto":
        other = "avx2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "default"
        return {"ATEN_CPU_CAPABILITY": other}
    name, equals, value = text.partition("=")
    if not (name and equals and value):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE, auto or none")
    return {name: value}


@contextmanager
def environment(variables: dict):
    """os.environ with `variables` set for the block (the runs started inside inherit it), then as it was."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def run_settings(args, settings: dict) -> dict:
    """Every {setting name: (folder, flags, modes)} fine-tuned from every seed's base, --jobs at a time:
    {setting name: [results.json of seed 0, 1, ...]}."""
    seeds = range(args.seeds)
    results = iter(run_all(args, [(finetune, args, s, folder, flags, modes)
                                  for folder, flags, modes in settings.values() for s in seeds]))
    return {name: [next(results) for _ in seeds] for name in settings}


def main(argv=None):
    args = parse_arguments("experiments/fair.py", __doc__, argv, seeds=10, more=[
        ("--full_lrs", {"type": rates, "default": FULL_LRS, "metavar": "LR,LR,...",
                        "help": "full fine-tuning's (and TOA's, TOF's) rates (default: %s; 7e-4 is always added)"
                                % ",".join(f"{v:g}" for v in FULL_LRS)}),
        ("--lora_lrs", {"type": rates, "default": LORA_LRS, "metavar": "LR,LR,...",
                        "help": "LoRA's rates (default: %s; 2e-3 is always added)"
                                % ",".join(f"{v:g}" for v in LORA_LRS)}),
        ("--sweeps", {"default": ",".join(SWEEPS), "metavar": "NAME,...",
                      "help": f"the sweeps to run, from {', '.join(SWEEPS)} (default: all)"}),
        ("--rounding", {"type": rounding, "default": "auto", "metavar": "NAME=VALUE|auto|none",
                        "help": "the environment change of the reruns at each mode's chosen rate (default: auto, "
                                "ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine, else =default; none: no reruns)"})])
    # (the fixed column's rates are train.py's default and the LoRA recipe's: a change there must reach fair_tables)
    assert FIXED == {"full": parse_train_args([]).finetune_lr, "LoRA": float(KINDS["LoRA"][-1])}, FIXED
    lrs = {"full": args.full_lrs, "LoRA": args.lora_lrs, "TOA": args.full_lrs, "TOF": args.full_lrs}
    wanted = args.sweeps.split(",")
    if not {"full", "LoRA"} <= set(wanted) <= set(SWEEPS):
        raise UserError(f"--sweeps {args.sweeps}: full and LoRA, and any of TOA, TOF")
    bases(args)
    sweeps = {}
    for name, (prefix, flags, modes) in ((name, SWEEPS[name]) for name in wanted):
        kind = "LoRA" if name == "LoRA" else "full"
        for lr in sorted(set(lrs[name]) | {FIXED[kind]}):
            sweeps[setting(name, lr)] = (f"fair_{prefix}_lr{lr:g}", [*flags, "--finetune_lr", lr], modes)
    runs = run_settings(args, sweeps)
    found = points(runs)
    if args.rounding:
        change = ",".join(f"{k}={v}" for k, v in args.rounding.items())
        picked = dict.fromkeys(chosen(found, *method) for methods in methods_in(found).values()
                               for method in methods.values())
        folder = "_".join(f"{k}-{v}" for k, v in args.rounding.items()).lower()  # another change, other runs
        again = {name + ROUNDED + change: (f"{sweeps[name][0]}_{folder}", *sweeps[name][1:]) for name in picked}
        with environment(args.rounding):
            reruns = run_settings(args, again)
        found += points(reruns)
    # (the kernels ATen ran the runs with, the reruns' aside: ATEN_CPU_CAPABILITY set for the whole command shows here)
    write_points(args.json, found, cpu_capability=torch.backends.cpu.get_cpu_capability())
    titles = {"fair_headline": f"Each mode at its own best learning rate on ood_val, and at the fixed rate: answer "
                               f"match %, mean ± sample std over {args.seeds} seeds",
              "fair_lr": "TAIA's lead against the fine-tuning learning rate",
              "fair_rounding": "The same fine-tunes with only the floating-point rounding changed"}
    for name, make in fair_tables.TABLES.items():
        print(f"\n{titles[name]}\n{make(found)}")


if __name__ == "__main__":
    run_cli(main)
