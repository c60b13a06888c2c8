"""What the experiments share: each seed's base pretrained once, fine-tunes of it, and the statistics.

Every model here is made by the real train.py, run as a program: `train.py --stage pretrain` writes
ROOT/seed_K/base once per seed, and each fine-tune is a copy of that folder that `train.py --resume`
fine-tunes with its own flags and evaluates (it skips the finished pretraining, and a fine-tune already
made with the same flags and files, so a second run of an experiment only evaluates again). Nothing here
trains or scores a model itself; the experiments read the results.json files train.py writes.
"""
import argparse
import filecmp
import json
import shlex
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import lab  # noqa: E402 (experiments/ is on sys.path when an experiment runs)
import stats  # noqa: E402
from stats import mean_std, paired  # noqa: E402,F401 (the experiments' tables take them from here)
from train import parse_args as parse_train_args  # noqa: E402
from common import FILES, OneLineParser, UserError, atomic_write, load_checkpoint, write_json  # noqa: E402

BASE_FILES = ("data", FILES["base"], FILES["tokenizer"])  # what a fine-tune copies from its seed's base
# The toy worlds of the safety and few-shot experiments: the default world with one optional part each
# (data/toy.py). Their bases differ from the default world's, so each has its own root.
REFUSALS_WORLD = {"root": "out/experiments_refusals", "world": ("--toy_parts", "refusals")}
# (The world with quiz documents needs longer pretraining: at 400 steps its base knows half the ordinary facts
# and gains less from solved examples; at 1200 it knows them all and gains twice as much.)
DEMONSTRATIONS_WORLD = {"root": "out/experiments_demonstrations",
                        "world": ("--toy_parts", "demonstrations", "--pretrain_steps", "1200")}
MODES = ("base", "vanilla", "taia", "taif")  # what the experiments score, in their tables' order
# Full fine-tuning (train.py's default recipe) and LoRA on every linear layer (the README's LoRA recipe).
KINDS = {"full": [], "LoRA": ["--lora_rank", "16", "--lora_alpha", "32", "--finetune_lr", "2e-3"]}


def parse_arguments(prog: str, doc: str, argv=None, more=(), root: str = "out/experiments", world=(),
                    seeds: int = 5) -> argparse.Namespace:
    """The flags every experiment takes, and `more` ((flag, add_argument's keywords) of its own), checked.
    `world`: train.py flags of the toy world every run of this experiment uses (its bases are pretrained on
    it, so they live under their own default `root`)."""
    p = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, root, seeds)
    for flag, options in more:
        p.add_argument(flag, **options)
    args = p.parse_args(argv)
    check_arguments(args)
    args.train_flags = [*world, *args.train_flags]
    return args


def add_arguments(p: argparse.ArgumentParser, root: str, seeds: int):
    p.add_argument("--root", default=root, help="where the runs go; the experiments on the same world share its "
                   f"bases (default: {root})")
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds 0..N-1 (default: {seeds})")
    p.add_argument("--jobs", type=int, default=2, help="train.py runs side by side, one thread each (default: 2, "
                   "for a 2-core machine; 1 runs one at a time with --threads auto)")
    p.add_argument("--train_args", default="", metavar="FLAGS", help='more flags for every train.py run, e.g. '
                   '"--pretrain_steps 800" (runs made with other flags are refused: give those another --root)')
    p.add_argument("--json", metavar="FILE", help="write every point (seed, setting, mode, set, accuracy) here")
    p.add_argument("--png", metavar="FILE.png", help="also draw the figure (needs matplotlib)")


def check_arguments(args):
    if args.seeds < 1 or args.jobs < 1:
        raise UserError("--seeds and --jobs must be at least 1")
    try:
        args.train_flags = shlex.split(args.train_args)
    except ValueError as e:
        raise UserError(f"--train_args {args.train_args!r}: {e}") from None
    # Read as lab.py reads them (not as text, which an abbreviation or --flag=value would slip past).
    given, default = (vars(parse_train_args(flags, lab.EXTENSIONS)) for flags in (args.train_flags, []))
    changed = {name for name in given if given[name] != default[name]}
    if changed & {"seed", "out_dir", "seeds"}:
        raise UserError("--train_args: every run's --seed and --out_dir are the experiment's own")
    if changed & {"stage", "resume"}:
        raise UserError("--train_args: --stage and --resume are the experiment's own: it runs every stage itself")
    own = sorted(changed & {"toy_parts", "toy_world", "finetune", "finetune_set", "eval", "modes"})
    if own:
        raise UserError(f"--train_args: {', '.join('--' + name for name in own)}: the experiment chooses its world, "
                        "data, sets and modes")
    try:  # made now, and written to, so that a root that cannot be is one line before anything runs
        Path(args.root).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.root).close()
    except OSError as e:
        raise UserError(f"--root {args.root}: cannot make the folder or write in it ({e.strerror or e})") from None
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        raise UserError(f"--json {args.json}: a file in an existing folder, please (checked now, not after the runs)")
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--png needs matplotlib (pip install matplotlib); without --png the table still "
                            "prints") from None


def train(args, out_dir: Path, seed: int, *flags) -> None:
    """One run of train.py, its output kept in OUT_DIR.log. A mistake train.py reports (exit status 2) is
    this program's one-line error; anything else that fails is a bug, with train.py's traceback."""
    threads = ["--threads", "1"] if args.jobs > 1 else []
    command = [sys.executable, str(REPO / "experiments" / "lab.py"), "--out_dir", str(out_dir), "--seed", str(seed),
               *threads, *args.train_flags, *map(str, flags)]
    result = subprocess.run(command, capture_output=True, text=True)
    with open(out_dir.parent / f"{out_dir.name}.log", "a") as log:  # every run of it, in order
        log.write(" ".join(command) + "\n" + result.stdout + result.stderr)
    if result.returncode == 2:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"train.py refused {out_dir} (see {out_dir}.log): {last}")
    if result.returncode in (130, -signal.SIGINT):  # Ctrl-C reached the run too: it saved what it could
        raise KeyboardInterrupt(f"{out_dir} stopped; run the same command again to go on from what is saved")
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed for {out_dir} with exit status {result.returncode}:\n{result.stderr}")


def base(args, seed: int) -> Path:
    """ROOT/seed_K/base: the toy world and the pretrained base of seed K (pretrained unless there already)."""
    out = Path(args.root) / f"seed_{seed}" / "base"
    out.parent.mkdir(parents=True, exist_ok=True)
    train(args, out, seed, "--stage", "pretrain", "--resume")
    return out


def finetune(args, seed: int, name: str, flags: list, modes: str = "base,vanilla,taia,taif,loracl") -> dict:
    """ROOT/seed_K/NAME: seed K's base fine-tuned with `flags` and evaluated in `modes` on the toy world's
    sets; returns its results.json. A folder whose base is not the seed's current one starts afresh."""
    base_dir = Path(args.root) / f"seed_{seed}" / "base"
    out = base_dir.parent / name
    if not (out / FILES["base"]).exists() or not filecmp.cmp(base_dir / FILES["base"], out / FILES["base"], False):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for item in BASE_FILES:
            copy = shutil.copytree if (base_dir / item).is_dir() else shutil.copyfile
            copy(base_dir / item, out / item)
    train(args, out, seed, "--resume", "--modes", modes, *flags)
    with open(out / FILES["results"]) as f:
        return json.load(f)


def run_all(args, jobs: list[tuple]) -> list:
    """Each (function, *arguments) of jobs, --jobs at a time; their results in order. The first failure
    cancels the jobs not yet started."""
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(fn, *fn_args) for fn, *fn_args in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def finetunes(args, settings: dict, modes=MODES) -> dict:
    """Every setting of {key: (folder, train.py flags)} fine-tuned from every seed's base and evaluated in
    `modes`, --jobs at a time: {key: [results.json of seed 0, 1, ...]}."""
    seeds = range(args.seeds)
    results = iter(run_all(args, [(finetune, args, s, folder, flags, ",".join(modes))
                                  for folder, flags in settings.values() for s in seeds]))
    return {key: [next(results) for _ in seeds] for key in settings}


def scores(results: list[dict], mode: str, name: str = "ood_test") -> list[float]:
    """Answer match % of `mode` on set `name`, one per seed's results.json."""
    return [100 * r["results"][name][mode] for r in results]


def bases(args) -> dict:
    """Every seed's base, pretrained where it is not there yet; returns the model's config (seed 0's)."""
    run_all(args, [(base, args, seed) for seed in range(args.seeds)])
    return load_checkpoint(str(Path(args.root) / "seed_0" / "base" / FILES["base"]), keys=("config",))["config"]


def points(runs: dict) -> list[dict]:
    """Every point of {setting: [results.json of each seed]}: seed, setting, mode, set, answer match %."""
    return [{"seed": r["seed"], "setting": setting, "mode": mode, "set": name,
             "answer_match": 100 * r["results"][name][mode]}
            for setting, results in runs.items() for r in results
            for name in r["results"] for mode in r["results"][name]]


def write_points(path: str | None, points: list[dict], **about):
    """{"points": points, **about} to path (about: what the points need to be read right, e.g. the CPU's kernels)."""
    if path:
        write_json(path, {"points": points, **about})
        print(f"wrote {path}")


def band(ax, xs, per_x: list[list[float]], label: str, color: str, style: str = "-"):
    """One line of a figure: the mean over seeds at every x, with a band of ± one (sample) std."""
    mean = [statistics.mean(v) for v in per_x]
    std = [stats.std(v) for v in per_x]
    ax.plot(list(xs), mean, style, marker="o", color=color, label=label)
    ax.fill_between(list(xs), [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], color=color,
                    alpha=0.15)


def figure(path: str, xs, xlabel: str, ylabel: str, title: str, draw):
    """One plot, written to path as PNG: draw(ax) draws the lines, this the rest (needs matplotlib)."""
    figures(path, xs, xlabel, ylabel, [(title, draw)])


def figures(path: str, xs, xlabel: str, ylabel: str, panels: list[tuple]):
    """Plots side by side, one per (title, draw) of panels, sharing the y axis, written to path as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (title, draw) in zip(axes[0], panels):
        ax.set_xticks(list(xs))  # before draw(ax), which may label them
        draw(ax)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
