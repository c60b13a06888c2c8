"""How far the hidden states are from collapsing, per layer (the paper's representation analysis): base,
vanilla, TOA and TAIA on the ood_test prompts.

    python experiments/representations.py --seeds 5 --json docs/representations.json --png docs/representations.png

For a prompt's hidden states H after a block (one row per prompt token after BOS), the measure is
||H - 1 h^T|| / ||H|| (Frobenius norms), h the mean row: the share of H left after removing the best
token-uniform rank-1 part, 1 h^T (the residual of Dong et al., 2021, "Attention is not all you need:
pure attention loses rank doubly exponentially with depth", in the Frobenius norm, where the best h is
the mean). 0 means every token has the same representation; near 1, nothing is shared. Averaged over
the prompts, for layer 0 (the embeddings) and every block.
The models: a plain full fine-tune (evaluated as base, vanilla and TAIA) and a fine-tune of the attention
only (`train.py --train_scope attn`, TOA), both from each seed's base (pretrained once, shared with the
other experiments in --root); train.py makes them, infer.FinishedRun builds the modes from their files.
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402
from runs import (bases, figure, finetune, mean_std, paired, run_all,  # noqa: E402
                  parse_arguments, write_points)

from common import UserError, run_cli  # noqa: E402
from data.text import encode_example, read_examples  # noqa: E402
from infer import FinishedRun  # noqa: E402

MODELS = {"base": ("vanilla", "base"), "vanilla": ("vanilla", "vanilla"), "TOA": ("toa", "vanilla"),
          "TAIA": ("vanilla", "taia")}  # name: (fine-tune folder, mode built from it)


def residual_ratio(h: torch.Tensor) -> float:
    """||H - 1 h^T|| / ||H|| for the rows of H (one per token), h their mean."""
    return float((h - h.mean(0)).norm() / h.norm())


@torch.no_grad()
def residual_ratios(model, prompts: list[dict], sp, template: str) -> list[float]:
    """For layer 0 (embeddings) and every block: residual_ratio of each prompt's tokens after BOS,
    averaged over the prompts (of two tokens or more: a single token is its own mean)."""
    outputs = []
    hooks = [model.embed.register_forward_hook(lambda m, i, out: outputs.append(out))]
    hooks += [block.register_forward_hook(lambda m, i, out: outputs.append(out)) for block in model.blocks]
    totals = [0.0] * (1 + len(model.blocks))
    try:
        prompts = [e for e in prompts if encode_example(e, sp, template)[1] > 2]
        if not prompts:
            raise UserError("no ood_test prompt has two tokens or more")
        for example in prompts:
            ids, start = encode_example(example, sp, template)
            outputs.clear()
            model(torch.tensor([ids[:start]]))
            for layer, out in enumerate(outputs):
                totals[layer] += residual_ratio(out[0, 1:].float())  # the prompt's tokens after BOS
    finally:
        for hook in hooks:
            hook.remove()
    return [t / len(prompts) for t in totals]


def main(argv=None):
    args = parse_arguments("experiments/representations.py", __doc__, argv)
    seeds = range(args.seeds)
    bases(args)
    run_all(args, [(finetune, args, s, name, flags) for s in seeds
                   for name, flags in (("vanilla", []), ("toa", ["--train_scope", "attn"]))])
    torch.set_num_threads(1)  # small models: one thread is the fastest, and the numbers do not depend on the machine's
    ratios = {}  # (model name, seed) -> per layer
    for s in seeds:
        runs = {folder: FinishedRun(os.path.join(args.root, f"seed_{s}", folder)) for folder in ("vanilla", "toa")}
        prompts = read_examples(os.path.join(args.root, f"seed_{s}", "base", "data", "ood_test.jsonl"))
        for name, (folder, mode) in MODELS.items():
            run = runs[folder]
            ratios[name, s] = residual_ratios(run.build(mode), prompts, run.sp, run.template)
    layers = range(len(ratios["base", 0]))
    write_points(args.json, [{"seed": s, "model": name, "layer": layer, "residual_ratio": ratios[name, s][layer]}
                             for name in MODELS for s in seeds for layer in layers])
    print(f"||H - 1 h^T|| / ||H|| on the ood_test prompts, mean ± std over {args.seeds} seeds (layer 0: embeddings)")
    print("| layer | " + " | ".join(MODELS) + " | TAIA − vanilla | TAIA − TOA |\n|---|" + "---|" * (len(MODELS) + 2))
    for layer in layers:
        column = {name: [100 * ratios[name, s][layer] for s in seeds] for name in MODELS}
        cells = [mean_std(column[name]).replace("  ", " ") for name in MODELS]
        print(f"| {layer} | {' | '.join(cells)} | {paired(column['TAIA'], column['vanilla'])} | "
              f"{paired(column['TAIA'], column['TOA'])} |")
    print("(values x 100)")
    if args.png:
        draw_ratios(ratios, seeds, layers, args.png)


def draw_ratios(ratios: dict, seeds, layers, path: str):
    def draw(ax):
        for name in MODELS:
            mean = [statistics.mean(ratios[name, s][layer] for s in seeds) for layer in layers]
            std = [stats.std([ratios[name, s][layer] for s in seeds]) for layer in layers]  # (sample std)
            ax.errorbar(list(layers), mean, yerr=std, marker="o", capsize=3, label=name)
    figure(path, layers, "layer (0: embeddings)", "||H − 1 hᵀ|| / ||H||",
           "what is left after the token-uniform part, ood_test prompts", draw)


if __name__ == "__main__":
    run_cli(main)
