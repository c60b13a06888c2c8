"""LoRA at the paper's rank ratio: does TAIA's lead appear when the adapters are as narrow as the paper's?

    python experiments/lora_rank.py --json docs/lora_rank.json --png docs/lora_rank.png

The paper's LoRA is r=16, alpha=32 on models 2048-4096 wide: a rank of 0.4-0.8% of the width, each update
scaled by alpha/r = 2. The toy model is 128 wide, where r=16 is 12.5%; r=1 is 0.8%. For every seed, from its
base (the default world's, shared with the other experiments in --root), LoRA on every linear layer fine-tunes
on the OOD set, evaluated as base, vanilla, TAIA and TAIF:
1. the grid: rank 1, 2, 4, 16 x alpha = 2r (the paper's scale) or 32 (the README's recipe at every rank) x
   lr 2e-3, 5e-3 (the paper's 2e-4 hardly moves a model this small: the README's LoRA runs use 2e-3), 200 steps;
2. at the setting of the grid with the largest mean TAIA − vanilla on ood_val, 100 and 400 steps too.
Everything is chosen on ood_val; ood_test is only reported. Prints both tables (per-seed paired TAIA − vanilla)
and, for every rank, its setting chosen on ood_val; --png draws vanilla and TAIA on ood_test against the rank.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import band, bases, figure, finetune, mean_std, paired, parse_arguments, points, run_all  # noqa: E402
from runs import write_points  # noqa: E402

from common import run_cli  # noqa: E402

MODES = ("base", "vanilla", "taia", "taif")
RANKS, LRS, STEPS = (1, 2, 4, 16), ("2e-3", "5e-3"), 200


def alphas(rank: int) -> list[int]:
    return sorted({2 * rank, 32})


def flags(rank, alpha, lr, steps) -> list:
    return ["--lora_rank", rank, "--lora_alpha", alpha, "--finetune_lr", lr, "--finetune_steps", steps]


def main(argv=None):
    args = parse_arguments("experiments/lora_rank.py", __doc__, argv, seeds=3)
    seeds = range(args.seeds)
    bases(args)

    def run(settings: list[tuple]) -> dict:
        results = iter(run_all(args, [(finetune, args, s, "lora_r{}_a{}_lr{}_{}steps".format(*key), flags(*key),
                                       ",".join(MODES)) for key in settings for s in seeds]))
        return {key: [next(results) for _ in seeds] for key in settings}

    def values(key, mode, name="ood_test"):
        return [100 * r["results"][name][mode] for r in runs[key]]

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
    chosen = {rank: max([key for key in runs if key[0] == rank and key[3] == STEPS], key=lambda k: gap(k, "ood_val"))
              for rank in RANKS}
    print(f"\nper rank, its {STEPS}-step setting with the largest TAIA − vanilla on ood_val:")
    for rank, key in chosen.items():
        print(f"r={rank} alpha={key[1]} lr={key[2]}: ood_test TAIA − vanilla "
              f"{paired(values(key, 'taia'), values(key, 'vanilla'))}")
    base = statistics.mean(values(best, "base"))
    if args.png:
        def draw(ax):
            for mode, color in (("vanilla", "tab:red"), ("taia", "tab:blue"), ("taif", "tab:green")):
                band(ax, range(len(RANKS)), [values(chosen[rank], mode) for rank in RANKS], mode, color,
                     ":" if mode == "taif" else "-")
            ax.axhline(base, color="gray", linestyle=":", label="base")
            ax.set_xticklabels([f"{rank}\n({100 * rank / 128:.1f}%)" for rank in RANKS])
        figure(args.png, range(len(RANKS)), "LoRA rank (% of the width 128); alpha and lr chosen on ood_val",
               "answer match %, ood_test", "LoRA rank, OOD fine-tuning", draw)


if __name__ == "__main__":
    run_cli(main)
