"""The paper's baselines at toy scale (its Table 2): L2 and EWC toward the base, LoRACL, against TAIA.

    python experiments/baselines.py --seeds 5 --json docs/baselines.json

For every seed, from its base (pretrained once, shared with the other experiments in --root):
- a plain full fine-tune, evaluated as base, vanilla, TAIA and loracl (for each prompt, base or vanilla,
  whichever has the lower loss on the prompt: infer.SELECTING);
- fine-tunes with `train.py --l2_weight W` and with `--ewc_weight W` (Fisher information on the
  pretraining text) for each W of a sweep, evaluated as vanilla: the penalty is the method.
Each penalty's W is the one with the best mean answer match on ood_val over the seeds (never the test
set). Prints that sweep, then every method on ood_test, knowledge and ft_only_facts (mean ± std over
seeds) with TAIA's paired lead over each.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import add_arguments, bases, check_arguments, finetune, mean_std, paired, run_all, write_points  # noqa: E402

from common import OneLineParser, UserError, run_cli  # noqa: E402

WEIGHTS = (0.01, 0.1, 1.0, 10.0)  # the sweep of --l2_weight and --ewc_weight
SETS = ("ood_test", "knowledge", "ft_only_facts")
PENALTIES = {"L2": "--l2_weight", "EWC": "--ewc_weight"}


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: give numbers separated by commas") from None
    if not all(0 < w < float("inf") for w in weights):
        raise UserError(f"--weights {text!r}: every weight must be a finite number > 0")
    return weights


def answer(result: dict, name: str, mode: str) -> float:
    return 100 * result["results"][name][mode]


def main(argv=None):
    p = OneLineParser(prog="experiments/baselines.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, seeds=5)
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS),
                   help="the sweep of --l2_weight and --ewc_weight, comma-separated (default: %(default)s)")
    args = p.parse_args(argv)
    check_arguments(args)
    weights = parse_weights(args.weights)
    seeds = range(args.seeds)
    bases(args)
    plain = [(finetune, args, s, "vanilla", []) for s in seeds]
    swept = [(finetune, args, s, f"{kind.lower()}_{w:g}", [flag, w]) for kind, flag in PENALTIES.items()
             for w in weights for s in seeds]
    results = run_all(args, plain + swept)
    vanilla_runs, results = results[:args.seeds], results[args.seeds:]
    sweep = {(kind, w): [results.pop(0) for _ in seeds] for kind in PENALTIES for w in weights}

    points = [{"seed": s, "setting": "vanilla", "mode": mode, "set": name, "answer_match": answer(r, name, mode)}
              for s, r in zip(seeds, vanilla_runs) for name in r["results"] for mode in r["results"][name]]
    points += [{"seed": s, "setting": f"{kind} {w:g}", "mode": "vanilla", "set": name,
                "answer_match": answer(r, name, "vanilla")}
               for (kind, w), runs in sweep.items() for s, r in zip(seeds, runs) for name in r["results"]]
    write_points(args.json, points)

    print("ood_val (where the weights are chosen), answer match %, mean ± std over seeds")
    print(f"{'weight':<8}" + "".join(f"{kind:>16}" for kind in PENALTIES))
    for w in weights:
        print(f"{w:<8g}" + "".join(f"{mean_std([answer(r, 'ood_val', 'vanilla') for r in sweep[kind, w]]):>16}"
                                   for kind in PENALTIES))
    chosen = {kind: max(weights, key=lambda w: statistics.mean(answer(r, "ood_val", "vanilla") for r in sweep[kind, w]))
              for kind in PENALTIES}
    methods = {"base": (vanilla_runs, "base"), "vanilla": (vanilla_runs, "vanilla"),
               **{f"{kind} ({chosen[kind]:g})": (sweep[kind, chosen[kind]], "vanilla") for kind in PENALTIES},
               "LoRACL": (vanilla_runs, "loracl"), "TAIA": (vanilla_runs, "taia")}
    print(f"\nanswer match %, mean ± std over {args.seeds} seeds; last column: TAIA − method on ood_test "
          "(seeds TAIA ahead)")
    print(f"| method | {' | '.join(SETS)} | TAIA − method |")
    print("|---|" + "---|" * (len(SETS) + 1))
    taia = [answer(r, "ood_test", "taia") for r in vanilla_runs]
    for method, (runs, mode) in methods.items():
        cells = [mean_std([answer(r, name, mode) for r in runs]) for name in SETS]
        lead = paired(taia, [answer(r, "ood_test", mode) for r in runs]) if method != "TAIA" else "-"
        print(f"| {method} | {' | '.join(cells)} | {lead} |")
    print("\nper seed, ood_test: " + "; ".join(
        f"{method} " + " ".join(f"{answer(r, 'ood_test', mode):.1f}" for r in runs) for method, (runs, mode) in methods.items()))


if __name__ == "__main__":
    run_cli(main)
