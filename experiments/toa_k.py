"""TOA-k at toy scale (the paper's Fig. 3): train attention plus the FFN of the first k blocks, infer with
attention only, for k = 0 .. n_layers.

    python experiments/toa_k.py --seeds 5 --json docs/toa_k.json --png docs/toa_k.png

For every seed, from its base (pretrained once, shared with the other experiments in --root), fine-tunes
with `train.py --ffn_layers k` for every k, each evaluated as TAIA (the FFN put back):
- LoRA (the paper's setting): adapters on the attention of every block and on the FFN of the first k;
  k = 0 is TOA, k = n_layers is TAIA;
- full fine-tuning: every parameter but the FFN of blocks k and above; k = n_layers is TAIA.
The question: does training FFN updates that inference throws away still help, more the more of them?
Prints ood_test (mean ± std over seeds, and the paired difference to k = 0) for each k; --png draws it.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402
from runs import KINDS as RECIPES  # noqa: E402
from runs import bases, figure, finetune, mean_std, paired, parse_arguments, run_all, write_points  # noqa: E402

from common import run_cli  # noqa: E402

KINDS = {"LoRA": RECIPES["LoRA"], "full": RECIPES["full"]}  # LoRA first: the figure's colours, the tables' order
SETS = ("ood_test", "knowledge", "ood_val")


def main(argv=None):
    args = parse_arguments("experiments/toa_k.py", __doc__, argv)
    n_layers = bases(args)["n_layers"]
    seeds, ks = range(args.seeds), range(n_layers + 1)
    jobs = [(finetune, args, s, f"toa{k}_{kind.lower()}", [*flags, "--ffn_layers", k], "taia,vanilla")
            for kind, flags in KINDS.items() for k in ks for s in seeds]
    results = run_all(args, jobs)
    curves = {(kind, k): [results.pop(0) for _ in seeds] for kind in KINDS for k in ks}
    points = [{"seed": s, "setting": f"{kind} ffn_layers {k}", "mode": mode, "set": name,
               "answer_match": 100 * r["results"][name][mode]}
              for (kind, k), runs in curves.items() for s, r in zip(seeds, runs) for name in r["results"]
              for mode in r["results"][name]]
    write_points(args.json, points)

    def taia(kind, k, name="ood_test"):
        return [100 * r["results"][name]["taia"] for r in curves[kind, k]]

    print(f"TOA-k, inferred as TAIA: answer match %, mean ± std over {args.seeds} seeds; "
          "last columns: ood_test minus k = 0's, per seed (seeds ahead)")
    for kind in KINDS:
        print(f"\n{kind}\n| k | {' | '.join(SETS)} | ood_test − k=0 |\n|---|" + "---|" * (len(SETS) + 1))
        for k in ks:
            lead = paired(taia(kind, k), taia(kind, 0)) if k else "-"
            print(f"| {k} | {' | '.join(mean_std(taia(kind, k, name)) for name in SETS)} | {lead} |")
    if args.png:
        draw_curves(curves, ks, args.png)


def draw_curves(curves: dict, ks, path: str):
    def draw(ax):
        for kind, color in zip(KINDS, ("tab:blue", "tab:orange")):
            for name, style in (("ood_test", "-"), ("knowledge", ":")):
                values = [[100 * r["results"][name]["taia"] for r in curves[kind, k]] for k in ks]
                mean = [statistics.mean(v) for v in values]
                std = [stats.std(v) for v in values]  # (sample std)
                ax.plot(list(ks), mean, style, marker="o", color=color, label=f"{kind}, {name}")
                if name == "ood_test":
                    ax.fill_between(list(ks), [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=color, alpha=0.15)
    figure(path, ks, "k: blocks whose FFN is trained (then reverted)", "answer match %, inferred as TAIA",
           "TOA-k: k = 0 is TOA, k = all is TAIA", draw)


if __name__ == "__main__":
    run_cli(main)
