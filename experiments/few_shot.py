"""Few-shot retention at toy scale (the paper's few-shot figure): after fine-tuning, do solved examples in
the prompt still help?

    python experiments/few_shot.py --json docs/few_shot.json --png docs/few_shot.png  # 3 seeds

The toy world with its `demonstrations` part (data/toy.py), pretrained 1200 steps: pretraining includes
"quiz" documents, runs of solved questions whose format and task (answer with the value, or echo the entity or
the attribute) change from document to document, so that only the solved questions say what is asked: the
base learns to use them. For every seed, the default OOD fine-tune of its base (the new instruction format on
domain Q), full and LoRA (runs.KINDS), evaluated as base, vanilla and TAIA on ood_test's questions (domain-P
facts the base knows) after k = 0 .. 4 solved questions about other entities, the same for every mode:
- quiz_test_k0 .. k4: each question in a quiz format of its own (the few-shot test; at k = 0 the task is open);
- ood_test, ood_test_k1 .. k4: in the new format fine-tuning taught.
Prints accuracy against k, each mode's gain from k = 0 to k = 4 and TAIA − vanilla at every k (per-seed
paired); --png draws the quiz format's curves.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (DEMONSTRATIONS_WORLD, KINDS, band, bases, figure, finetune, mean_std, paired,  # noqa: E402
                  parse_arguments, run_all, write_points)

from common import run_cli  # noqa: E402
from data.toy import N_DEMONSTRATIONS  # noqa: E402

MODES = ("base", "vanilla", "taia")
KS = range(N_DEMONSTRATIONS + 1)
# The test with k solved questions before each, in two formats: the quiz formats of pretraining (each question
# in one of its own, answered with the value; the figure) and the new format that fine-tuning taught.
FORMATS = {"quiz format": "quiz_test_k{k}", "new format": "ood_test_k{k}"}


def test_set(form: str, k: int) -> str:
    return "ood_test" if form == "new format" and k == 0 else FORMATS[form].format(k=k)


def main(argv=None):
    args = parse_arguments("experiments/few_shot.py", __doc__, argv, seeds=3, **DEMONSTRATIONS_WORLD)
    seeds = range(args.seeds)
    bases(args)
    folders = {kind: "ood" + ("" if kind == "full" else "_" + kind.lower()) for kind in KINDS}
    results = iter(run_all(args, [(finetune, args, s, folders[kind], recipe, ",".join(MODES))
                                  for kind, recipe in KINDS.items() for s in seeds]))
    runs = {kind: [next(results) for _ in seeds] for kind in KINDS}
    write_points(args.json, [{"seed": s, "setting": f"{kind}, {form}, {k} demonstrations", "mode": mode,
                              "set": test_set(form, k), "answer_match": 100 * r["results"][test_set(form, k)][mode]}
                             for kind, rs in runs.items() for s, r in zip(seeds, rs) for form in FORMATS
                             for k in KS for mode in MODES])

    def accuracy(kind, form, mode, k):
        return [100 * r["results"][test_set(form, k)][mode] for r in runs[kind]]

    def gain(kind, form, mode):
        return [after - before for after, before in zip(accuracy(kind, form, mode, KS[-1]),
                                                         accuracy(kind, form, mode, 0))]

    print(f"ood_test's questions with k solved questions before each, answer match %, mean ± std over {args.seeds} "
          "seeds; last column TAIA − vanilla per seed (seeds TAIA ahead)")
    zeros = [0.0] * args.seeds
    for form in FORMATS:
        for kind in KINDS:
            print(f"\n{form}, {kind} fine-tuning\n| k | {' | '.join(MODES)} | TAIA − vanilla |\n|---|"
                  + "---|" * (len(MODES) + 1))
            for k in KS:
                print(f"| {k} | {' | '.join(mean_std(accuracy(kind, form, mode, k)) for mode in MODES)} | "
                      f"{paired(accuracy(kind, form, 'taia', k), accuracy(kind, form, 'vanilla', k))} |")
            print(f"gain from k = 0 to k = {KS[-1]}, per seed (seeds that gain): "
                  + "; ".join(f"{mode} {paired(gain(kind, form, mode), zeros)}" for mode in MODES)
                  + f"; TAIA's gain − vanilla's: {paired(gain(kind, form, 'taia'), gain(kind, form, 'vanilla'))}")
    if args.png:
        def draw(ax):
            band(ax, KS, [accuracy("full", "quiz format", "base", k) for k in KS], "base", "tab:gray")
            for kind, style in zip(KINDS, ("-", "--")):
                for mode, color in (("vanilla", "tab:red"), ("taia", "tab:blue")):
                    band(ax, KS, [accuracy(kind, "quiz format", mode, k) for k in KS], f"{mode}, {kind}", color, style)
        figure(args.png, KS, "k: solved questions before each (quiz format)", "answer match %, ood_test's questions",
               "Toy few-shot: does context still help after fine-tuning?", draw)


if __name__ == "__main__":
    run_cli(main)
