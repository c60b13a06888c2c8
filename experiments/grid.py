"""The space between base and tuned: score a grid of (attention weight, FFN weight) on JSONL sets.

    python experiments/grid.py --out_dir out --eval out/data/ood_test.jsonl --eval out/data/knowledge.jsonl \
        --png docs/grid.png

Every point is taia.interpolate(base, tuned, {"attention": a, "ffn": f}): each group at a fraction of
its fine-tuning update, norms, embeddings and head tuned as in TAIA, built from the run's tensors in
memory (no file is read twice). (1, 0) is TAIA, (1, 1) vanilla, (0, 1) TAIF; (0, 0) is near the base
but keeps the tuned norms, embeddings and head. Prints one table per set (answer match, %); with
matplotlib installed (an optional extra: pip install matplotlib) --png also draws them as heatmaps.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from common import OneLineParser, UserError, atomic_write, resolve_device, run_cli  # noqa: E402
from infer import GRID, FinishedRun, read_eval_sets  # noqa: E402


def table(grid: dict, name: str) -> str:
    lines = [f"{name}: answer match %, rows attention weight, columns FFN weight",
             "attn \\ ffn" + "".join(f"{f:>8}" for f in GRID)]
    for a in GRID:
        lines.append(f"{a:>10}" + "".join(f"{100 * grid[a, f]['answer']:8.1f}" for f in GRID))
    return "\n".join(lines)


def heatmaps(grids: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(grids), figsize=(4.8 * len(grids), 4.2), squeeze=False)
    corners = {(1.0, 0.0): "TAIA", (1.0, 1.0): "vanilla", (0.0, 1.0): "TAIF"}
    for ax, (name, grid) in zip(axes[0], grids.items()):
        values = [[100 * grid[a, f]["answer"] for f in GRID] for a in GRID]
        image = ax.imshow(values, origin="lower", cmap="viridis", vmin=0, vmax=100)
        for i, a in enumerate(GRID):
            for j, f in enumerate(GRID):
                label = f"{values[i][j]:.0f}" + (f"\n{corners[a, f]}" if (a, f) in corners else "")
                ax.text(j, i, label, ha="center", va="center", fontsize=8,
                        color="black" if values[i][j] > 60 else "white")
        ax.set_xticks(range(len(GRID)), [f"{f:g}" for f in GRID])
        ax.set_yticks(range(len(GRID)), [f"{a:g}" for a in GRID])
        ax.set_xlabel("FFN weight (0 = original FFN)")
        if ax is axes[0][0]:
            ax.set_ylabel("attention weight (0 = original attention)")
        ax.set_title(f"{name}: answer match %")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def main(argv=None):
    p = OneLineParser(prog="experiments/grid.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="a finished run of train.py (default: out)")
    p.add_argument("--eval", action="append", required=True, metavar="FILE.jsonl", help="a set to score (repeatable)")
    p.add_argument("--png", metavar="FILE.png", help="also draw the tables as heatmaps (needs matplotlib)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda (default: auto)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--png needs matplotlib (pip install matplotlib); without --png the tables still print")
    run = FinishedRun(args.out_dir)
    grids = {}
    for name, examples in read_eval_sets(args.eval).items():
        started = time.time()
        grids[name] = run.score_grid(examples, device)
        print(table(grids[name], name))
        print(f"({len(GRID) ** 2} points x {len(examples)} examples in {time.time() - started:.1f} s)\n")
    if args.png:
        heatmaps(grids, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    run_cli(main)
