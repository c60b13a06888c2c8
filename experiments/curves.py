"""The paper's curves at toy scale: how TAIA's lead over vanilla fine-tuning moves with what the data is.

    python experiments/curves.py ood_share --json docs/ood_share.json --png docs/ood_share.png
    python experiments/curves.py ood_added --json docs/ood_added.json --png docs/ood_added.png
    python experiments/curves.py data_scale --json docs/data_scale.json --png docs/data_scale.png

- ood_share (the paper's Fig. 1): a fine-tuning set of a fixed 240 examples, a growing share of them
  out-of-distribution (the new format on domain Q) and the rest in-distribution: the new format on domain P,
  about other entities and about the test's own entities, half of each one's attributes (toy world knob
  id_set=near; the test asks the other half). x = the OOD share, 0 to 1.
- ood_added (the paper's Fig. 1, variant c): the first 60 of those ID examples, and k x 60 OOD examples added,
  k = 0 ... 4 (the fine-tuning set grows from 60 to 300 examples). x = k.
- data_scale (the paper's data-scale table): the OOD set cut to its first N examples, N = 30 ... 360, always
  200 steps of 32 examples (so the smaller sets are seen more often). x = N.
For every seed, from its base (the default world's, pretrained once and shared with the other experiments in
--root: neither knob changes the pretraining text), each point is a train.py fine-tune, full and LoRA
(runs.KINDS), evaluated as base, vanilla, TAIA and TAIF. Prints ood_test (and knowledge, the retention set) as
mean ± std over seeds with the per-seed paired TAIA − vanilla; --png draws one panel per kind.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (KINDS, MODES, band, bases, figures, finetunes, mean_std, paired, parse_arguments,  # noqa: E402
                  points, scores, write_points)

from common import run_cli  # noqa: E402

COLORS = {"base": "gray", "vanilla": "tab:red", "taia": "tab:blue", "taif": "tab:green"}
# name: (the x values, the x axis's words, the train.py flags of the point at x)
CURVES = {
    "ood_share": ((0.0, 0.25, 0.5, 0.75, 1.0), "share of OOD examples in 240 fine-tuning examples",
                  lambda x: ["--toy_world", f"id_set=near,finetune_size=240,ood_share={x}", "--finetune_set", "mixed"]),
    "ood_added": ((0, 1, 2, 3, 4), "OOD examples added to 60 ID examples, in multiples of 60",
                  lambda k: ["--toy_world", f"id_set=near,finetune_size={60 * (1 + k)},ood_share={k / (1 + k)}",
                             "--finetune_set", "mixed"]),
    "data_scale": ((30, 60, 120, 240, 360), "OOD fine-tuning examples (200 steps of 32)",
                   lambda x: ["--toy_world", f"finetune_size={x}"]),
}


def main(argv=None):
    args = parse_arguments("experiments/curves.py", __doc__, argv, seeds=3, more=[
        ("curve", {"choices": sorted(CURVES), "help": "which curve"})])
    xs, xlabel, flags_at = CURVES[args.curve]
    bases(args)
    runs = finetunes(args, {(kind, x): (f"{args.curve}_{x}_{kind.lower()}", [*recipe, *flags_at(x)])
                            for kind, recipe in KINDS.items() for x in xs})
    write_points(args.json, points({f"{kind}, {args.curve} {x}": rs for (kind, x), rs in runs.items()}))

    def values(kind, x, mode, name="ood_test"):
        return scores(runs[kind, x], mode, name)

    print(f"{args.curve}: answer match %, mean ± std over {args.seeds} seeds; last column: TAIA − vanilla on "
          "ood_test per seed (seeds TAIA ahead)")
    for kind in KINDS:
        print(f"\n{kind} fine-tuning\n| {args.curve} | {' | '.join(MODES)} | knowledge: vanilla | knowledge: TAIA | "
              "TAIA − vanilla |\n|---|" + "---|" * (len(MODES) + 3))
        for x in xs:
            cells = [mean_std(values(kind, x, mode)) for mode in MODES]
            cells += [mean_std(values(kind, x, mode, "knowledge")) for mode in ("vanilla", "taia")]
            print(f"| {x} | {' | '.join(cells)} | {paired(values(kind, x, 'taia'), values(kind, x, 'vanilla'))} |")
    if args.png:
        def panel(kind):
            def draw(ax):
                for mode in MODES:
                    band(ax, xs, [values(kind, x, mode) for x in xs], mode, COLORS[mode],
                         ":" if mode in ("base", "taif") else "-")
            mean_gap = [statistics.mean(values(kind, x, "taia")) - statistics.mean(values(kind, x, "vanilla"))
                        for x in (xs[0], xs[-1])]
            return f"{kind} fine-tuning (TAIA − vanilla {mean_gap[0]:+.0f} → {mean_gap[1]:+.0f})", draw
        figures(args.png, xs, xlabel, "answer match %, ood_test", [panel(kind) for kind in KINDS])


if __name__ == "__main__":
    run_cli(main)
