"""LoRA at the paper's rank ratio: does TAIA's lead appear when the adapters are as narrow as the paper's?

    python experiments/lora_rank.py --json docs/lora_rank.json --png docs/lora_rank.png

The paper's LoRA is r=16, alpha=32 on models 2048-4096 wide: a rank of 0.4-0.8% of the width, each update
scaled by alpha/r = 2. The toy model is 128 wide, where r=16 is 12.5%; r=1 is 0.8%. For every seed, from its
base (the default world's, shared with the other experiments in --root), LoRA on every linear layer fine-tunes
on the OOD set, evaluated as base, vanilla, TAIA and TAIF:
1. the grid: rank 1, 2, 4, 16 x alpha = 2r (the paper's scale) or 32 (the README's recipe at every rank) x
   lr 2e-3, 5e-3 (the paper's 2e-4 hardly moves a model this small: the README's LoRA runs use 2e-3), 200 steps;
2. at the setting of the grid with the largest mean TAIA − vanilla on ood_val, 100 and 400 steps too.
Everything is chosen on ood_val; ood_test is only reported. Prints the table (per-seed paired TAIA − vanilla), then
vanilla and TAIA each at its own best setting on ood_val (overall and per rank: a setting chosen for the gap favours
those where vanilla falls apart); --png draws the latter against the rank.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (MODES, band, bases, figure, finetunes, mean_std, paired, parse_arguments, points,  # noqa: E402
                  scores, write_points)

from common import run_cli  # noqa: E402

RANKS, LRS, STEPS = (1, 2, 4, 16), ("2e-3", "5e-3"), 200


def alphas(rank: int) -> list[int]:
    return sorted({2 * rank, 32})


def flags(rank, alpha, lr, steps) -> list:
    return ["--lora_rank", rank, "--lora_alpha", alpha, "--finetune_lr", lr, "--finetune_steps", steps]


def main(argv=None):
    args = parse_arguments("experiments/lora_rank.py", __doc__, argv, seeds=3)
    width = bases(args)["dim"]

    def run(settings: list[tuple]) -> dict:
        return finetunes(args, {key: ("lora_r{}_a{}_lr{}_{}steps".format(*key), flags(*key)) for key in settings})

    def values(key, mode, name="ood_test"):
        return scores(runs[key], mode, name)

    def gap(key, name):
        return statistics.mean(values(key, "taia", name)) - statistics.mean(values(key, "vanilla", name))

    runs = run([(rank, alpha, lr, STEPS) for rank in RANKS for alpha in alphas(rank) for lr in LRS])
    best = max(runs, key=lambda key: gap(key, "ood_val"))
    runs.update(run([(*best[:3], steps) for steps in (100, 400)]))
    write_points(args.json, points({"LoRA r={} alpha={} lr={} steps={}".format(*key): rs for key, rs in runs.items()}))

    print(f"LoRA on every linear layer, OOD fine-tuning: answer match %, mean ± std over {args.seeds} seeds; "
          "TAIA − vanilla per seed (seeds TAIA ahead)")
    print("\n| rank | alpha | lr | steps | ood_val: TAIA − vanilla | ood_test: vanilla | TAIA | TAIF | "
          "TAIA − vanilla |\n|---|---|---|---|---|---|---|---|---|")
    for key in runs:
        mark = " (chosen on ood_val)" if key == best else ""
        val = paired(values(key, "taia", "ood_val"), values(key, "vanilla", "ood_val"))
        test = [mean_std(values(key, mode)) for mode in MODES[1:]]
        print(f"| {' | '.join(map(str, key))}{mark} | {val} | {' | '.join(test)} | "
              f"{paired(values(key, 'taia'), values(key, 'vanilla'))} |")

    def own_best(mode, keys):  # of these settings, the one where `mode` scores best on ood_val
        return max(keys, key=lambda key: statistics.mean(values(key, mode, "ood_val")))

    print("\neach mode at its own best setting on ood_val (the fair comparison), ood_test: vanilla, TAIA, "
          "TAIA − vanilla per seed")
    grid = [key for key in runs if key[3] == STEPS]
    at_rank = {rank: [key for key in grid if key[0] == rank] for rank in RANKS}
    for label, keys in [("every setting", list(runs)),
                        *((f"r={rank}, {STEPS} steps", at_rank[rank]) for rank in RANKS)]:
        v, t = own_best("vanilla", keys), own_best("taia", keys)
        print(f"{label}: vanilla {mean_std(values(v, 'vanilla'))} (r {v[0]}, alpha {v[1]}, lr {v[2]}, {v[3]} steps), "
              f"TAIA {mean_std(values(t, 'taia'))} (r {t[0]}, alpha {t[1]}, lr {t[2]}, {t[3]} steps): "
              f"{paired(values(t, 'taia'), values(v, 'vanilla'))}")
    if args.png:
        base = statistics.mean(values(best, "base"))

        def draw(ax):
            for mode, color in (("vanilla", "tab:red"), ("taia", "tab:blue")):
                band(ax, range(len(RANKS)), [values(own_best(mode, at_rank[rank]), mode) for rank in RANKS], mode,
                     color)
            ax.axhline(base, color="gray", linestyle=":", label="base")
            ax.set_xticklabels([f"{rank}\n({100 * rank / width:.1f}%)" for rank in RANKS])
        figure(args.png, range(len(RANKS)), f"LoRA rank (% of the width {width}); each mode at its alpha and lr best "
               "on ood_val", "answer match %, ood_test", f"LoRA rank, OOD fine-tuning, {STEPS} steps", draw)


if __name__ == "__main__":
    run_cli(main)
