"""The paper's baselines at toy scale (its Table 2): L2 and EWC toward the base, LoRACL, against TAIA.

    python experiments/baselines.py --seeds 5 --json docs/baselines.json

For every seed, from its base (pretrained once, shared with the other experiments in --root), full
fine-tunes by train.py:
- plain, at train.py's default learning rate and at a sweep of others (--lrs), each evaluated as vanilla,
  TAIA and loracl (for each prompt, base or vanilla, whichever has the lower loss on the prompt:
  lab.LoRACL);
- with `--l2_weight W` and with `--ewc_weight W` (Fisher information on the pretraining text) for each W
  of a sweep (--weights), at the default learning rate, evaluated as vanilla: the penalty is the method.
Every method's setting is the one with the best mean answer match on ood_val over the seeds (never the
test set). Prints the sweeps, then every method on ood_test, knowledge and ft_only_facts (mean ± std over
seeds) with TAIA's paired lead over each: once at the default learning rate, once each at its own choice.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import bases, finetune, mean_std, paired, parse_arguments, run_all, write_points  # noqa: E402

from common import UserError, run_cli  # noqa: E402

# Each method's own sweep, each value a fine-tune of every seed: the fine-tuning learning rate (beside the
# plain run at train.py's default) for vanilla, TAIA and LoRACL, which differ only in inference; the penalty's
# weight (at the default learning rate) for L2 and EWC.
LRS, WEIGHTS = (3e-4, 5e-4, 1e-3), (0.01, 0.1, 1.0, 10.0)  # the defaults of --lrs and --weights
SWEEPS = {"lr": "--finetune_lr", "L2": "--l2_weight", "EWC": "--ewc_weight"}  # each sweep's train.py flag
METHODS = {"vanilla": ("lr", "vanilla"), "TAIA": ("lr", "taia"), "LoRACL": ("lr", "loracl"),
           "L2": ("L2", "vanilla"), "EWC": ("EWC", "vanilla")}  # method: (its sweep, the mode it answers in)
SETS = ("ood_test", "knowledge", "ft_only_facts")


def parse_values(flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give numbers separated by commas") from None
    if not all(0 < v < float("inf") for v in values):
        raise UserError(f"{flag} {text!r}: every value must be a finite number > 0")
    return list(dict.fromkeys(values))  # each once: a value's runs have one folder


def answer(result: dict, name: str, mode: str) -> float:
    return 100 * result["results"][name][mode]


def main(argv=None):
    args = parse_arguments("experiments/baselines.py", __doc__, argv, more=[
        ("--lrs", {"default": ",".join(f"{v:g}" for v in LRS),
                   "help": "fine-tuning learning rates tried beside train.py's default (default: %(default)s)"}),
        ("--weights", {"default": ",".join(f"{v:g}" for v in WEIGHTS),
                       "help": "the sweep of --l2_weight and --ewc_weight, comma-separated (default: %(default)s)"})])
    weights = parse_values("--weights", args.weights)
    values = {"lr": parse_values("--lrs", args.lrs), "L2": weights, "EWC": weights}
    seeds = range(args.seeds)
    bases(args)
    # (sweep, value or None for the plain run, folder, flags), each for every seed
    settings = [("lr", None, "vanilla", [])] + [
        (kind, v, f"{kind.lower()}_{v:g}", [SWEEPS[kind], v]) for kind in SWEEPS for v in values[kind]]
    results = iter(run_all(args, [(finetune, args, s, folder, flags) for _, _, folder, flags in settings
                                  for s in seeds]))
    runs = {(kind, v): [next(results) for _ in seeds] for kind, v, _, _ in settings}
    default_lr = runs["lr", None][0]["config"]["finetune"]["finetune_lr"]

    def label(kind, v):
        return f"lr {default_lr:g} (default)" if v is None else f"{'lr' if kind == 'lr' else kind} {v:g}"

    write_points(args.json, [{"seed": s, "setting": label(kind, v), "mode": mode, "set": name,
                              "answer_match": answer(r, name, mode)}
                             for (kind, v), rs in runs.items() for s, r in zip(seeds, rs)
                             for name in r["results"] for mode in r["results"][name]])

    def scores(key, mode, name):
        return [answer(r, name, mode) for r in runs[key]]

    print(f"Each method's sweep, answer match % (mean ± std over {args.seeds} seeds): chosen on ood_val")
    print("| method | setting | ood_val | ood_test |\n|---|---|---|---|")
    chosen = {}
    for method, (kind, mode) in METHODS.items():
        keys = [key for key in runs if key[0] == kind]
        chosen[method] = max(keys, key=lambda key: statistics.mean(scores(key, mode, "ood_val")))
        for key in keys:
            mark = " (chosen)" if key == chosen[method] else ""
            print(f"| {method} | {label(*key)}{mark} | {mean_std(scores(key, mode, 'ood_val'))} | "
                  f"{mean_std(scores(key, mode, 'ood_test'))} |")
    tables = {"at train.py's default learning rate (L2 and EWC at their chosen weight)":
              {m: (chosen[m] if kind != "lr" else ("lr", None), mode) for m, (kind, mode) in METHODS.items()},
              "every method at its setting chosen on ood_val": {m: (chosen[m], mode) for m, (_, mode) in METHODS.items()}}
    for title, methods in tables.items():
        methods = {"base": (("lr", None), "base"), **methods}
        taia = scores(*methods["TAIA"], "ood_test")
        print(f"\n{title}: answer match %, mean ± std over {args.seeds} seeds; last column TAIA − method on ood_test "
              "(seeds TAIA ahead)")
        print(f"| method | setting | {' | '.join(SETS)} | TAIA − method |\n|---|---|" + "---|" * (len(SETS) + 1))
        for method, (key, mode) in methods.items():
            cells = [mean_std(scores(key, mode, name)) for name in SETS]
            lead = paired(taia, scores(key, mode, "ood_test")) if method != "TAIA" else "-"
            print(f"| {method} | {'-' if method == 'base' else label(*key)} | {' | '.join(cells)} | {lead} |")
        print("per seed, ood_test: " + "; ".join(f"{method} " + " ".join(f"{v:.1f}" for v in scores(key, mode, "ood_test"))
                                                for method, (key, mode) in methods.items()))


if __name__ == "__main__":
    run_cli(main)
