"""train.py with the lab's options: the experiments' baselines, scopes, toy-world options and seeds, each
plugged in through train.py's Extension seam, so that train.py itself never names them.

    python experiments/lab.py --l2_weight 0.1                  # the L2 baseline (any train.py flag works too)
    python experiments/lab.py --lora_rank 16 --ffn_layers 2    # TOA-k: FFN adapters in the first 2 blocks only
    python experiments/lab.py --seeds 5                        # 5 seeds in OUT/seed_K, and their summary

Extensions: ToyWorld (--toy_parts, --toy_world and the fine-tuning sets they add: mixed, harmful), Scope
(--train_scope, --ffn_layers: TOA, TOF, TOA-k), Anchor (--l2_weight, --ewc_*: the paper's regularised
baselines), LoRACL (mode loracl) and Seeds (--seeds).
"""
import argparse
import os
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import taia  # noqa: E402
import train  # noqa: E402
from common import UserError, file_fingerprint, run_cli, write_json  # noqa: E402
from data import toy  # noqa: E402
from data.text import random_windows, read_lines, token_stream  # noqa: E402
from infer import judge  # noqa: E402
from machinery import is_main, process_name  # noqa: E402
from machinery.rundir import DirectoryLock  # noqa: E402


class ToyWorld(train.Extension):
    """The toy world's optional parts and knobs (data/toy.py says what each does)."""

    def add_arguments(self, p):
        p.add_argument("--toy_parts", default=(), type=parts_arg, metavar="PART[,PART]",
                       help="toy world: optional parts, off by default: refusals (a forbidden attribute the base "
                            "refuses to answer; with --finetune_set harmful, the harmful fine-tuning analog) and "
                            "demonstrations (pretraining with solved examples in the prompt; the few-shot sets)")
        p.add_argument("--toy_world", default={}, type=knobs_arg, metavar="KNOB=VALUE[,...]",
                       help="toy world: its knobs, each default the default world: " + "; ".join(
                           f"{name} ({default}): {words}" for name, (default, _, words) in toy.KNOBS.items()))

    def check(self, args, error):
        if args.toy_parts and args.finetune and args.eval and (args.pretrain_text or args.init_from):
            error("--toy_parts adds to the toy world, and every input here is your own: drop it")
        if args.finetune_set == "harmful" and "refusals" not in args.toy_parts and not args.finetune:
            error("--finetune_set harmful is part of the toy world's refusals: add --toy_parts refusals")
        if args.finetune_set == "mixed" and "ood_share" not in args.toy_world and not args.finetune:
            error("--finetune_set mixed needs --toy_world ood_share=S: the share of OOD examples in it")
        ignored = toy.ignored(args.toy_world, bool(args.pretrain_text or args.init_from), bool(args.finetune),
                              bool(args.eval))
        if ignored:
            error(f"--toy_world {','.join(ignored)}: what it shapes is your own file here: drop it")
        try:
            toy.check(args.toy_parts, args.toy_world)
        except ValueError as e:
            error(f"--toy_world: {e}")

    def world(self, args) -> dict:
        return {"parts": args.toy_parts, "knobs": args.toy_world}


def parts_arg(text: str) -> tuple:
    parts = tuple(dict.fromkeys(filter(None, text.split(","))))
    unknown = [part for part in parts if part not in toy.PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: the toy world's parts are {', '.join(toy.PARTS)}")
    return tuple(part for part in toy.PARTS if part in parts)  # one order, whatever the command line's


def knobs_arg(text: str) -> dict:
    try:
        return toy.parse_knobs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Scope(train.Extension):
    """Which parameters fine-tuning trains: the paper's TOA / TOF (train only attention / FFN) and TOA-k
    (Fig. 3: the FFN of the first k blocks only; with LoRA, FFN adapters there only)."""

    def add_arguments(self, p):
        p.add_argument("--train_scope", default="all", choices=["all", "attn", "ffn"],
                       help="all: train every parameter (TAIA's premise); attn: TOA; ffn: TOF")
        p.add_argument("--ffn_layers", type=int, metavar="K", help="fine-tune the FFN of the first K blocks only "
                       "(default: every block); with --lora_rank, FFN adapters in those blocks only. The paper's "
                       "TOA-k (Fig. 3): with --lora_rank and evaluated as taia, K=0 is TOA and K=n_layers is TAIA")

    def check(self, args, error):
        if args.ffn_layers is not None and args.ffn_layers < 0:
            error(f"--ffn_layers must be at least 0, not {args.ffn_layers}")
        if args.ffn_layers is not None and args.train_scope == "attn":
            error("--ffn_layers K chooses which FFNs fine-tuning trains; --train_scope attn trains none")
        if args.ffn_layers == 0 and args.train_scope == "ffn":
            error("--train_scope ffn with --ffn_layers 0 trains nothing")

    def check_inputs(self, args, cfg):
        if cfg and args.ffn_layers is not None and args.ffn_layers > cfg.n_layers:
            raise UserError(f"--ffn_layers {args.ffn_layers} is more than the model's n_layers ({cfg.n_layers})")

    def trains(self, args):
        if args.train_scope == "all" and args.ffn_layers is None:
            return None
        scope = {"all": set(taia.GROUPS), "attn": {"attention"}, "ffn": {"ffn"}}[args.train_scope]

        def trains(name: str) -> bool:
            group = taia.group_of(name)
            if group == "ffn" and args.ffn_layers is not None:
                return taia.layer_of(name) < args.ffn_layers
            return group in scope
        return trains

    def settings(self, args, out_dir: str) -> dict:
        return {**({"train_scope": args.train_scope} if args.train_scope != "all" else {}),
                **({"ffn_layers": args.ffn_layers} if args.ffn_layers is not None else {})}


class Anchor(train.Extension):
    """The L2 and EWC baselines of the paper's Table 2: every trained weight is pulled back toward its value
    at the start of fine-tuning, by the penalty 1/2 * sum_i s_i * (w_i - w0_i)^2 with stiffness
    s = l2_weight + ewc_weight * F_i. Its gradient s * (w - w0) is added once per step, after the loss's
    gradient has been summed over micro-batches and processes (each process adds the same)."""

    def __init__(self):
        self.pulls = []

    def add_arguments(self, p):
        p.add_argument("--l2_weight", type=float, default=0.0, help="L2 baseline: add l2_weight/2 * sum (w - w_base)^2 "
                       "over the fine-tuned weights to the loss (default 0: off)")
        p.add_argument("--ewc_weight", type=float, default=0.0, help="EWC baseline: the same pull, each weight's "
                       "scaled by its diagonal Fisher information on pretraining text (mean 1 over the weights, so "
                       "that L2 is EWC with every F = 1; default 0: off)")
        p.add_argument("--ewc_text", metavar="FILE.txt", help="EWC: the text the Fisher information is measured on "
                       "(default: the pretraining text, the toy world's or --pretrain_text)")
        p.add_argument("--ewc_windows", type=int, default=256, help="EWC: windows of --seq_len tokens the Fisher is "
                       "averaged over (default: 256)")

    def check(self, args, error):
        for name in ("l2_weight", "ewc_weight"):
            if not 0 <= getattr(args, name) < float("inf"):
                error(f"--{name} must be a finite number >= 0, not {getattr(args, name)}")
        if args.ewc_windows < 1:
            error(f"--ewc_windows must be at least 1, not {args.ewc_windows}")
        if (args.l2_weight or args.ewc_weight) and (args.lora_rank or args.fsdp):
            error("--l2_weight / --ewc_weight pull full fine-tuning toward the base: drop --lora_rank and --fsdp")
        if args.ewc_weight and args.init_from and not args.ewc_text:
            error("--ewc_weight with --init_from: give --ewc_text FILE.txt, text like the base was trained on")
        # the memory check: the start of every trained weight, EWC's Fisher information too
        self.extra_copies = (args.l2_weight > 0 or args.ewc_weight > 0) + (args.ewc_weight > 0)

    def check_inputs(self, args, cfg):
        if args.ewc_text:
            read_lines(args.ewc_text)
        if cfg and args.ewc_weight and args.seq_len > cfg.max_seq_len:
            raise UserError(f"--ewc_weight measures the Fisher on windows of --seq_len {args.seq_len} tokens: more "
                            f"than the model's max_seq_len ({cfg.max_seq_len})")

    def settings(self, args, out_dir: str) -> dict:
        settings = {k: getattr(args, k) for k in ("l2_weight", "ewc_weight") if getattr(args, k)}
        if args.ewc_weight:  # the Fisher's text, by content, and how much of it
            settings.update(ewc_windows=args.ewc_windows, ewc_seq_len=args.seq_len,
                            ewc_data=file_fingerprint(ewc_text_path(args, out_dir)))
        return settings

    def start_finetune(self, model, args, sp, out_dir: str, seed: int):
        """Take the pull's start now, before any update."""
        self.pulls = []
        if not (args.l2_weight or args.ewc_weight):
            return
        fisher = fisher_diagonal(model, args, sp, ewc_text_path(args, out_dir), seed) if args.ewc_weight else {}
        self.pulls = [(p, p.detach().clone(), (args.l2_weight + args.ewc_weight * fisher[name]) if fisher
                       else args.l2_weight) for name, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def on_gradients(self):
        for p, start, s in self.pulls:
            pull = s * (p - start)
            p.grad = pull if p.grad is None else p.grad.add_(pull)


def ewc_text_path(args, out_dir: str) -> str:
    return args.ewc_text or args.pretrain_text or toy.paths(os.path.join(out_dir, "data"))["pretrain"]


def fisher_diagonal(model, args, sp, text_path: str, seed: int) -> dict:
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


class LoRACL(train.Extension):
    """Mode loracl, the paper's LoRACL baseline (Table 2): for each prompt, base or vanilla, whichever has the
    lower loss on the prompt itself (finds it more familiar)."""

    def modes(self) -> dict:
        return {"loracl": judge_loracl}


def judge_loracl(run, examples: list[dict], device="cpu") -> dict:
    judged = [judge(run.build(mode, device), examples, run.sp, run.template, prompt_loss=True)
              for mode in ("base", "vanilla")]
    return lowest_prompt_loss(judged)


def lowest_prompt_loss(judged: list[dict]) -> dict:
    """Per example, the judge() outcome of the model with the lowest prompt loss (ties: the first)."""
    pick = torch.stack([j["prompt_loss"] for j in judged]).argmin(0)  # (argmin: the first of equal minima)
    return {key: torch.stack([j[key] for j in judged]).gather(0, pick[None])[0] for key in judged[0]}


class Seeds(train.Extension):
    """--seeds N: the whole run for seeds SEED..SEED+N-1, each in OUT/seed_K, then their summary."""

    def add_arguments(self, p):
        p.add_argument("--seeds", type=int, default=1, help="run seeds SEED..SEED+N-1, each in OUT/seed_K, and "
                                                            "summarise")

    def check(self, args, error):
        if args.seeds < 1:
            error(f"--seeds must be at least 1, not {args.seeds}")


EXTENSIONS = (ToyWorld(), Scope(), Anchor(), LoRACL(), Seeds())


def summarise(reports: list[dict]) -> str:
    """Mean +/- sample std over seeds for every set and mode, and the per-seed paired difference TAIA - vanilla."""
    first = reports[0]["results"]
    modes = list(next(iter(first.values())))
    std = statistics.stdev if len(reports) > 1 else (lambda values: 0.0)
    lines = [f"{'answer match':<15}" + "".join(f"{m:>16}" for m in modes) + "   taia - vanilla (seeds ahead)"]
    for name in first:
        row = f"{name:<15}"
        for mode in modes:
            values = [100 * r["results"][name][mode] for r in reports]
            row += f"{statistics.mean(values):9.1f} +/- {std(values):4.1f}"
        if "taia" in modes and "vanilla" in modes:
            diffs = [100 * (r["results"][name]["taia"] - r["results"][name]["vanilla"]) for r in reports]
            row += f"   {statistics.mean(diffs):+5.1f} +/- {std(diffs):4.1f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = train.parse_args(argv, EXTENSIONS)
    if args.seeds == 1:
        return train.main(argv, EXTENSIONS)
    main_process = os.environ.get("RANK", "0") == "0"  # (under torchrun, rank 0 holds the lock and speaks)
    with DirectoryLock(args.out_dir) if main_process else nullcontext():
        reports = []
        for seed in range(args.seed, args.seed + args.seeds):
            if main_process:
                print(f"=== seed {seed} ===", flush=True)
            out = os.path.join(args.out_dir, f"seed_{seed}")
            reports.append(train.main([*argv, "--out_dir", out, "--seed", str(seed), "--seeds", "1"], EXTENSIONS))
        if all(reports) and main_process:
            summary = summarise(reports)
            print(summary)
            write_json(os.path.join(args.out_dir, "summary.json"), {"reports": reports, "summary": summary})


if __name__ == "__main__":
    run_cli(main, who=process_name())
