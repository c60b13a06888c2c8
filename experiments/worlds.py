"""Worlds, not a world: TAIA's lead over randomly drawn toy worlds, and which of the world's knobs it hangs on.

    python experiments/worlds.py --json docs/worlds.json --png docs/worlds.png

1. Variants. --variants worlds, each drawn at random from RANGES (data/toy.py's knobs, and fine-tuning's
   steps; variant i by random.Random("world variant i")) and run with seed i: its own base, pretrained on its own
   world under ROOT/worlds/variant_i, then the default recipe's full fine-tuning on its OOD set, evaluated as
   base, vanilla, TAIA and TAIF. The default world is not among them.
2. One knob at a time. From the default world's bases (ROOT/seed_K/base, shared with the other experiments), the
   knobs that leave pretraining as it is, each moved away from its default alone: the new format's surface
   (from far to near the pretraining question format), how many domain-Q attributes fine-tuning covers, and the
   steps of fine-tuning.
Prints both tables (TAIA − vanilla on ood_test; per-seed paired in part 2) and --png draws the variants' TAIA −
vanilla as a strip beside the default world's seeds.
"""
import argparse
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (MODES, base, bases, figure, finetune, finetunes, mean_std, paired, parse_arguments,  # noqa: E402
                  points, run_all, scores, write_points)

from common import UserError, run_cli  # noqa: E402

# What a variant is drawn from: toy world knobs, and "steps" (train.py --finetune_steps).
RANGES = {"entities": (45, 90, 135), "templates": (2, 3, 4, 5, 6), "values": (5, 10), "qa_share": (0.25, 0.5, 0.75),
          "new_format": ("give", "instruction", "question", "what"), "ft_attributes": (2, 3, 4),
          "steps": (100, 200, 400)}
# Part 2: (knob, value) moved alone, with the default world's point first.
ONE_AT_A_TIME = [("default", None), ("new_format", "give"), ("new_format", "question"), ("new_format", "what"),
                 ("ft_attributes", 1), ("ft_attributes", 2), ("steps", 100), ("steps", 400)]


def folder(name: str, value) -> str:
    """Where part 2's fine-tune of (knob, value) goes: "ood" for the default world's own (as in the other
    experiments on these bases)."""
    return "ood" if value is None else f"knob_{name}_{value}"


def draw_variant(i: int) -> dict:
    rng = random.Random(f"world variant {i}")
    return {name: rng.choice(values) for name, values in RANGES.items()}


def world_flags(knobs: dict) -> list[str]:
    """train.py's flags for these knobs ("steps" is fine-tuning's; every other a --toy_world knob)."""
    world = ",".join(f"{name}={value}" for name, value in knobs.items() if name != "steps")
    steps = ["--finetune_steps", str(knobs["steps"])] if "steps" in knobs else []
    return [*(["--toy_world", world] if world else []), *steps]


def variant_args(args, i: int) -> argparse.Namespace:
    """args for variant i: its own root, every train.py run in its world."""
    return argparse.Namespace(**{**vars(args), "root": str(Path(args.root) / "worlds" / f"variant_{i}"),
                                 "train_flags": [*args.train_flags, *world_flags(draw_variant(i))]})


def variant(args, i: int) -> dict:
    """Variant i's base (pretrained unless there) and its fine-tune: the results.json."""
    v_args = variant_args(args, i)
    base(v_args, i)
    return finetune(v_args, i, "ood", [], ",".join(MODES))


def main(argv=None):
    args = parse_arguments("experiments/worlds.py", __doc__, argv, seeds=3, more=[
        ("--variants", {"type": int, "default": 5, "help": "randomly drawn worlds (default: %(default)s)"})])
    if args.variants < 1:
        raise UserError("--variants must be at least 1")
    bases(args)
    one_at_a_time = finetunes(args, {(name, value): (folder(name, value), world_flags({name: value}) if value else [])
                                     for name, value in ONE_AT_A_TIME})
    variants = run_all(args, [(variant, args, i) for i in range(args.variants)])
    write_points(args.json, points({f"variant {i}: {draw_variant(i)}": [r] for i, r in enumerate(variants)} | {
        f"default world, {name}={value}": rs for (name, value), rs in one_at_a_time.items()}))

    def score(r, mode, name="ood_test"):
        return scores([r], mode, name)[0]

    print(f"1. {args.variants} random worlds (variant i: seed i), full fine-tuning, ood_test answer match %")
    print(f"| variant | {' | '.join(RANGES)} | base knowledge | {' | '.join(MODES)} | TAIA − vanilla |\n|---|"
          + "---|" * (len(RANGES) + len(MODES) + 2))
    gaps = []
    for i, r in enumerate(variants):
        gaps.append(score(r, "taia") - score(r, "vanilla"))
        print(f"| {i} | {' | '.join(str(v) for v in draw_variant(i).values())} | {score(r, 'base', 'knowledge'):.1f} | "
              f"{' | '.join(f'{score(r, m):.1f}' for m in MODES)} | {gaps[-1]:+.1f} |")
    print(f"TAIA − vanilla over the variants (95% interval, variants TAIA ahead): {paired(gaps, [0] * len(gaps))}")
    print(f"\n2. The default world's bases, one knob moved at a time, full fine-tuning, mean ± std over {args.seeds} "
          "seeds")
    print("| knob | value | base | vanilla | TAIA | TAIF | TAIA − vanilla |\n|---|---|---|---|---|---|---|")
    for (name, value), rs in one_at_a_time.items():
        print(f"| {name} | {'' if value is None else value} | "
              f"{' | '.join(mean_std(scores(rs, m)) for m in MODES)} | "
              f"{paired(scores(rs, 'taia'), scores(rs, 'vanilla'))} |")
    if args.png:
        default = one_at_a_time["default", None]
        draw_strip(args.png, gaps, [t - v for t, v in zip(scores(default, "taia"), scores(default, "vanilla"))])


def draw_strip(path: str, gaps: list[float], default_gaps: list[float]):
    def draw(ax):
        ax.axhline(0, color="black", linewidth=0.8)
        for x, (values, label, color) in enumerate([(default_gaps, "default world, one per seed", "tab:gray"),
                                                    (gaps, "random worlds, one each", "tab:blue")]):
            ax.scatter([x + random.Random(i).uniform(-0.12, 0.12) for i in range(len(values))], values, color=color,
                       label=label, zorder=3)
            ax.hlines(statistics.mean(values), x - 0.25, x + 0.25, color=color)
        ax.set_xticklabels(["default world", "random worlds"])
        ax.set_xlim(-0.6, 1.6)
    figure(path, range(2), "", "TAIA − vanilla, ood_test (points)", "TAIA's lead over toy worlds", draw)


if __name__ == "__main__":
    run_cli(main)
