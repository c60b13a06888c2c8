"""What each table of README.md and docs/*.md says, computed from the points in docs/*.json (tools/report.py
writes them between their markers). TABLES maps a marker's NAME to the function that returns its markdown.
Statistics as experiments/stats.py computes them: mean ± sample std over seeds, and for "A − B" the per-seed
paired difference with its 95% t interval and the seeds where A is ahead. Torch-free: it reads JSON only.
"""
import ast
import json
import re
import statistics
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))
import fair_tables  # noqa: E402 (fair.json's tables: experiments/fair.py prints the same ones)
import real_model_tables  # noqa: E402 (real_model.json's tables: experiments/real_model.py prints the same ones)
from common import UserError  # noqa: E402
from stats import DataError, detectable, mean_std, paired, table  # noqa: E402

DOCS = REPO / "docs"


def read_from(docs: Path):
    """Read the points from this docs/ folder from now on (another checkout's: report.py --repo)."""
    global DOCS
    DOCS = docs
    about.cache_clear()


# --- reading the points -------------------------------------------------------------------------------------

@cache
def about(name: str) -> dict:
    """docs/NAME.json whole: its points and what the experiment wrote beside them (fair.py: cpu_capability)."""
    with open(DOCS / f"{name}.json") as f:
        document = json.load(f)
    if not (isinstance(document, dict) and isinstance(document.get("points"), list)):
        raise DataError(f"docs/{name}.json: not an experiment's JSON (no list of points)")
    return document


def kernels(name: str) -> str:
    """The CPU kernels ATen ran docs/NAME.json's runs with, as fair.py records them."""
    if "cpu_capability" not in about(name):
        raise DataError(f"docs/{name}.json does not say which CPU kernels its runs used (cpu_capability)")
    return about(name)["cpu_capability"]


def points(name: str) -> tuple:
    return tuple(about(name)["points"])


def settings(name: str) -> list[str]:
    """The settings of docs/NAME.json in the order the experiment wrote them."""
    return list(dict.fromkeys(p["setting"] for p in points(name)))


def scores(name: str, setting: str, mode: str, test_set: str = "ood_test") -> list[float]:
    """Answer match % of `mode` on `test_set` at `setting`, one per seed, in seed order."""
    found = sorted((p["seed"], p["answer_match"]) for p in points(name)
                   if p["setting"] == setting and p["mode"] == mode and p["set"] == test_set)
    if not found:
        raise UserError(f"docs/{name}.json has no point for {setting!r}, {mode}, {test_set}")
    return [value for _, value in found]


def mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f}"


# --- baselines.json: full fine-tuning's learning-rate sweep, L2 and EWC -------------------------------------

# method: (the settings it chooses among, the mode it answers in). vanilla, TAIA, TAIF and LoRACL are four
# inferences of the same fine-tunes, so they share the learning-rate sweep; L2 and EWC sweep their weight.
METHODS = {"vanilla": ("lr", "vanilla"), "TAIA": ("lr", "taia"), "TAIF": ("lr", "taif"), "LoRACL": ("lr", "loracl"),
           "L2": ("L2", "vanilla"), "EWC": ("EWC", "vanilla")}
DEFAULT_LR = "lr 0.0007 (default)"
SETS = ("ood_test", "knowledge", "ft_only_facts")


def sweep(kind: str) -> list[str]:
    """baselines.json's settings of one sweep ("lr", "L2" or "EWC"), by value."""
    return sorted((s for s in settings("baselines") if s.split()[0] == kind), key=lambda s: float(s.split()[1]))


def chosen(method: str) -> str:
    """The method's setting with the best mean answer match on ood_val: its own best, never the test's."""
    kind, mode = METHODS[method]
    return max(sweep(kind), key=lambda s: statistics.mean(scores("baselines", s, mode, "ood_val")))


def at_default(method: str) -> str:
    """The method's setting at train.py's default learning rate (L2 and EWC: at their chosen weight)."""
    return DEFAULT_LR if METHODS[method][0] == "lr" else chosen(method)


def lr(setting: str) -> str:
    return f"lr {float(setting.split()[1]):.0e}".replace("e-0", "e-")


def method_table(pick) -> str:
    """Every method at the setting pick(method) gives: mean ± std per set, TAIA's paired lead on ood_test."""
    taia = scores("baselines", pick("TAIA"), "taia")
    rows = [["base", "-", *(mean_std(scores("baselines", DEFAULT_LR, "base", s)) for s in SETS),
             paired(taia, scores("baselines", DEFAULT_LR, "base"))]]
    for method, (kind, mode) in METHODS.items():
        s = pick(method)
        rows.append([method, lr(s) if kind == "lr" else f"W {s.split()[1]}",
                     *(mean_std(scores("baselines", s, mode, t)) for t in SETS),
                     "-" if method == "TAIA" else paired(taia, scores("baselines", s, mode))])
    return table(["method", "setting", *SETS, "TAIA − method on ood_test [95% interval] (seeds TAIA ahead)"], rows)


def baselines_chosen() -> str:
    return method_table(chosen)


def baselines_default_lr() -> str:
    return method_table(at_default)


def baselines_per_seed() -> str:
    rows = []
    for method, (kind, mode) in METHODS.items():
        rows.append([method, *(f"{v:.1f}" for v in scores("baselines", chosen(method), mode))])
    seeds = len(rows[0]) - 1
    return table(["method (its setting chosen on ood_val)", *(f"seed {s}" for s in range(seeds))], rows)


def baselines_sweeps() -> str:
    rows = []
    for method, (kind, mode) in METHODS.items():
        values = sweep(kind)
        rows.append([method, f"{kind} " + " / ".join(v.split()[1] for v in values), *(
            " / ".join(mean(scores("baselines", v, mode, t)) for v in values) for t in ("ood_val", "ood_test")),
            lr(chosen(method)) if kind == "lr" else f"W {chosen(method).split()[1]}"])
    return table(["method", "setting", "ood_val", "ood_test", "chosen on ood_val"], rows)


def lr_sweep() -> str:
    """TAIA's lead against the fine-tuning learning rate: the finding the sweep is for."""
    rows = []
    for s in sweep("lr"):
        v = {(m, t): scores("baselines", s, m, t) for m in ("vanilla", "taia") for t in ("ood_val", "ood_test")}
        rows.append([lr(s), *(f"{mean(v['vanilla', t])} → {mean(v['taia', t])}" for t in ("ood_val", "ood_test")),
                     paired(v["taia", "ood_test"], v["vanilla", "ood_test"])])
    return table(["fine-tuning lr", "ood_val: vanilla → TAIA", "ood_test: vanilla → TAIA",
                  "TAIA − vanilla on ood_test [95% interval] (seeds ahead)"], rows)


def headline() -> str:
    """The README's table: each mode at its own best learning rate on ood_val, and all at the default rate."""
    modes = {"base": "base", "vanilla": "vanilla", "TAIA": "taia", "TAIF": "taif"}
    rows = []
    for label, pick in (("each at its own best on ood_val", chosen), ("fixed, train.py's default", at_default)):
        picked = {name: (DEFAULT_LR if name == "base" else pick(name)) for name in modes}
        rates = ", ".join(f"{name} {lr(s)[3:]}" for name, s in picked.items() if name != "base")
        for t in SETS:
            cells = {name: scores("baselines", picked[name], mode, t) for name, mode in modes.items()}
            rows.append([f"{label} ({rates})" if t == SETS[0] else "", t, *(mean_std(c) for c in cells.values()),
                         paired(cells["TAIA"], cells["vanilla"])])
    return table(["learning rate", "test set", *modes, "TAIA − vanilla [95% interval] (seeds ahead)"], rows)


def targets() -> str:
    """The default run's targets, each a paired difference at the default rate and at each mode's own best."""
    checks = [("TAIA above vanilla", "ood_test", "taia", "vanilla"), ("TAIA above base", "ood_test", "taia", "base"),
              ("TAIA above TAIF", "ood_test", "taia", "taif"),
              ("vanilla above TAIA (the negative control)", "ft_only_facts", "vanilla", "taia")]
    names = {"taia": "TAIA", "vanilla": "vanilla", "taif": "TAIF"}
    rows = []
    for claim, t, a, b in checks:
        at = [paired(*(scores("baselines", DEFAULT_LR if m == "base" else pick(names[m]), m, t) for m in (a, b)))
              for pick in (at_default, chosen)]
        rows.append([claim, t, *at])
    return table(["target", "test set", "at lr 7e-4 [95% interval] (seeds ahead)", "each at its own best lr"], rows)


# --- toa_k.json and representations.json --------------------------------------------------------------------

def toa_k() -> str:
    ks = sorted({int(s.split()[-1]) for s in settings("toa_k")})
    rows = []
    for k in ks:
        row = [k]
        for kind in ("LoRA", "full"):
            at = {t: scores("toa_k", f"{kind} ffn_layers {k}", "taia", t) for t in ("ood_test", "knowledge")}
            zero = scores("toa_k", f"{kind} ffn_layers 0", "taia")
            row += [mean_std(at["ood_test"]), mean_std(at["knowledge"]), paired(at["ood_test"], zero) if k else "-"]
        rows.append(row)
    return table(["k", "LoRA: ood_test", "LoRA: knowledge", "LoRA: ood_test − k=0", "full: ood_test",
                  "full: knowledge", "full: ood_test − k=0"], rows)


def representations() -> str:
    pts = points("representations")
    models = list(dict.fromkeys(p["model"] for p in pts))

    def ratio(model, layer):
        return [100 * r for _, r in sorted((p["seed"], p["residual_ratio"]) for p in pts
                                           if p["model"] == model and p["layer"] == layer)]
    rows = []
    for layer in sorted({p["layer"] for p in pts}):
        rows.append([f"{layer}{' (embeddings)' if layer == 0 else ''}", *(mean_std(ratio(m, layer)) for m in models),
                     paired(ratio("TAIA", layer), ratio("vanilla", layer)), paired(ratio("TAIA", layer), ratio("TOA", layer))])
    return table(["layer", *models, "TAIA − vanilla", "TAIA − TOA"], rows)


# --- the curves: ood_share.json, ood_added.json, data_scale.json, lora_rank.json, worlds.json -------------------

MODES = ("base", "vanilla", "taia", "taif")
NAMES = {"base": "base", "vanilla": "vanilla", "taia": "TAIA", "taif": "TAIF"}  # how a table's header names a mode


def curve(name: str, kind: str) -> str:
    rows = []
    for setting in (s for s in settings(name) if s.startswith(kind + ",")):
        cell = {(m, t): scores(name, setting, m, t) for m in MODES for t in ("ood_test", "knowledge")}
        rows.append([setting.split()[-1], *(mean_std(cell[m, "ood_test"]) for m in MODES),
                     mean_std(cell["vanilla", "knowledge"]), mean_std(cell["taia", "knowledge"]),
                     paired(cell["taia", "ood_test"], cell["vanilla", "ood_test"])])
    return table([name, *(NAMES[m] for m in MODES), "knowledge: vanilla", "knowledge: TAIA", "TAIA − vanilla"], rows)


def curves_summary() -> str:
    """Each curve's two ends, for results.md."""
    rows = []
    for name in ("ood_share", "ood_added", "data_scale"):
        for kind in ("full", "LoRA"):
            points_of_kind = [s for s in settings(name) if s.startswith(kind + ",")]
            ends = [points_of_kind[0], points_of_kind[-1]]
            at = [{m: scores(name, s, m) for m in ("vanilla", "taia")} for s in ends]
            rows.append([f"{name} {' → '.join(s.split()[-1] for s in ends)}", kind,
                         *(" → ".join(mean(a[m]) for a in at) for m in ("vanilla", "taia")),
                         *(paired(a["taia"], a["vanilla"]) for a in at)])
    return table(["curve", "fine-tuning", "vanilla", "TAIA", "TAIA − vanilla at the first point",
                  "at the last point"], rows)


def curves_targets() -> str:
    """docs/curves.md's targets, each judged by a rule on the JSON (the page says why each was set)."""
    def along(name, kind, mode):  # {x: mode's ood_test scores per seed} along one curve
        return {s.split()[-1]: scores(name, s, mode) for s in settings(name) if s.startswith(kind + ",")}

    def ahead(name, kind):  # {x: (TAIA's scores, vanilla's)}
        return {x: (t, along(name, kind, "vanilla")[x]) for x, t in along(name, kind, "taia").items()}

    def at_each(values: dict) -> str:
        return ", ".join(f"{x}: {mean(v) if isinstance(v, list) else paired(*v)}" for x, v in values.items())

    def gap(pair) -> float:
        return statistics.mean(pair[0]) - statistics.mean(pair[1])

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"
    vanilla, taia, base = (list(along("ood_share", "full", m).values()) for m in ("vanilla", "taia", "base"))
    rows = [["OOD share, full: vanilla falls at every step of the share",
             verdict(all(statistics.mean(a) > statistics.mean(b) for a, b in zip(vanilla, vanilla[1:]))),
             "vanilla " + at_each(along("ood_share", "full", "vanilla"))],
            ["OOD share, full: TAIA above the base at every share", verdict(all(map(detectable, taia, base))),
             "TAIA − base " + at_each(dict(zip(along("ood_share", "full", "taia"), zip(taia, base))))]]
    for kind in ("full", "LoRA"):
        share = list(ahead("ood_share", kind).values())
        rows.append([f"OOD share, {kind}: TAIA − vanilla grows (in the mean) at every step of the share",
                     verdict(all(gap(a) < gap(b) for a, b in zip(share, share[1:]))), at_each(ahead("ood_share", kind))])
    for kind in ("full", "LoRA"):
        scale = ahead("data_scale", kind)
        ends = {x: scale[x] for x in (min(scale, key=float), max(scale, key=float))}
        smallest, largest = ends.values()
        rows.append([f"data scale, {kind}: TAIA − vanilla smaller (in the mean) at the largest size than at the "
                     "smallest", verdict(gap(largest) < gap(smallest)), at_each(ends)])
    variants = [s for s in settings("worlds") if s.startswith("variant")]
    world = {m: [scores("worlds", s, m)[0] for s in variants] for m in ("taia", "vanilla", "base")}
    below = sum(t < b for t, b in zip(world["taia"], world["base"]))
    rows.append([f"{len(variants)} random worlds (target >= 5): TAIA ahead of vanilla",
                 verdict(len(variants) >= 5 and detectable(world["taia"], world["vanilla"])),
                 f"{paired(world['taia'], world['vanilla'])}; TAIA below the base in {below} of {len(variants)}"])
    v, t = lora_best("vanilla", settings("lora_rank")), lora_best("taia", settings("lora_rank"))
    lora = (scores("lora_rank", t, "taia"), scores("lora_rank", v, "vanilla"))
    rows.append(["LoRA, each mode at its own best setting on ood_val: TAIA ahead of vanilla", verdict(detectable(*lora)),
                 paired(*lora)])
    return table(["target", "verdict (above, ahead: the 95% interval excludes zero)", "measured (ood_test; TAIA − vanilla: "
                  "mean [95% interval] (seeds ahead))"], rows)


def lora_key(setting: str) -> tuple:
    return tuple(re.fullmatch(r"LoRA r=(\d+) alpha=(\d+) lr=(\S+) steps=(\d+)", setting).groups())


def lora_rank() -> str:
    grid = [s for s in settings("lora_rank") if lora_key(s)[3] == "200"]
    best = max(grid, key=lambda s: statistics.mean(scores("lora_rank", s, "taia", "ood_val"))
               - statistics.mean(scores("lora_rank", s, "vanilla", "ood_val")))
    rows = []
    for s in settings("lora_rank"):
        r, alpha, rate, steps = lora_key(s)
        val = paired(scores("lora_rank", s, "taia", "ood_val"), scores("lora_rank", s, "vanilla", "ood_val"))
        rows.append([r, alpha, rate, steps + (" (largest gap on ood_val)" if s == best else ""), val,
                     *(mean_std(scores("lora_rank", s, m)) for m in MODES[1:]),
                     paired(scores("lora_rank", s, "taia"), scores("lora_rank", s, "vanilla"))])
    return table(["rank", "alpha", "lr", "steps", "ood_val: TAIA − vanilla", "ood_test: vanilla", "TAIA", "TAIF",
                  "TAIA − vanilla"], rows)


def lora_best(mode: str, among: list[str]) -> str:
    """Of these lora_rank.json settings, the one where `mode` scores best on ood_val."""
    return max(among, key=lambda s: statistics.mean(scores("lora_rank", s, mode, "ood_val")))


def lora_own_best() -> str:
    """Vanilla and TAIA each at its own best LoRA setting on ood_val: the fair comparison."""
    def name(s):
        return "r {}, alpha {}, lr {}, {} steps".format(*lora_key(s))
    grid = [s for s in settings("lora_rank") if lora_key(s)[3] == "200"]
    groups = [("every setting", settings("lora_rank"))] + [
        (f"rank {r}, 200 steps", [s for s in grid if lora_key(s)[0] == r]) for r in dict.fromkeys(lora_key(s)[0] for s in grid)]
    rows = []
    for label, among in groups:
        v, t = lora_best("vanilla", among), lora_best("taia", among)
        rows.append([label, f"{mean_std(scores('lora_rank', v, 'vanilla'))} ({name(v)})",
                     f"{mean_std(scores('lora_rank', t, 'taia'))} ({name(t)})",
                     paired(scores("lora_rank", t, "taia"), scores("lora_rank", v, "vanilla"))])
    return table(["chosen among", "vanilla on ood_test (its setting)", "TAIA on ood_test (its setting)",
                  "TAIA − vanilla"], rows)


def lora() -> str:
    """results.md's LoRA recipe (r 16, alpha 32, lr 2e-3, 200 steps), from lora_rank.json."""
    s = "LoRA r=16 alpha=32 lr=2e-3 steps=200"
    rows = [[t, *(mean_std(scores("lora_rank", s, m, t)) for m in MODES),
             paired(scores("lora_rank", s, "taia", t), scores("lora_rank", s, "vanilla", t))] for t in SETS]
    return table(["test set", "base", "vanilla (all adapters)", "TAIA (attention adapters)", "TAIF (FFN adapters)",
                  "TAIA − vanilla"], rows)


def worlds_variants() -> str:
    variants = [s for s in settings("worlds") if s.startswith("variant")]
    knobs = [ast.literal_eval(s.split(": ", 1)[1]) for s in variants]
    rows, gaps = [], []
    for s, world in zip(variants, knobs):
        at = {m: scores("worlds", s, m)[0] for m in MODES}
        gaps.append([at["taia"], at["vanilla"]])
        rows.append([s.split(":")[0].split()[1], *world.values(), mean(scores("worlds", s, "base", "knowledge")),
                     *(f"{at[m]:.1f}" for m in MODES), f"{at['taia'] - at['vanilla']:+.1f}",
                     f"{at['taia'] - at['base']:+.1f}"])
    below = sum(t < at for t, at in ((scores("worlds", s, "taia")[0], scores("worlds", s, "base")[0]) for s in variants))
    taia, vanilla = zip(*gaps)
    return (table(["variant", *knobs[0], "base knowledge", *(NAMES[m] for m in MODES), "TAIA − vanilla",
                   "TAIA − base"], rows)
            + f"\n\nTAIA − vanilla over the variants: {paired(list(taia), list(vanilla))}; TAIA below the base in "
            f"{below} of {len(variants)}.")


def worlds_knobs() -> str:
    rows = []
    for s in (s for s in settings("worlds") if s.startswith("default world")):
        knob, value = s.split(", ", 1)[1].split("=")
        rows.append([knob, "" if value == "None" else value, *(mean_std(scores("worlds", s, m)) for m in MODES),
                     paired(scores("worlds", s, "taia"), scores("worlds", s, "vanilla"))])
    return table(["knob", "value", *(NAMES[m] for m in MODES), "TAIA − vanilla"], rows)


# --- harmful.json and few_shot.json -------------------------------------------------------------------------

def attack(setting: str, mode: str, test_set: str = "forbidden_test") -> list[float]:
    """Attack success: the share of forbidden questions answered instead of refused."""
    return [100 - v for v in scores("harmful", setting, mode, test_set)]


def attacks(kind: str) -> list[str]:
    return [s for s in settings("harmful") if s.startswith(f"{kind}, harmful")]


def attackers_choice(kind: str) -> str:
    """The attacker's step count: the best vanilla attack success on forbidden_val (ties: the fewest steps)."""
    return max(attacks(kind), key=lambda s: statistics.mean(attack(s, "vanilla", "forbidden_val")))


def harmful_settings() -> list[str]:
    chosen_ = [attackers_choice(kind) for kind in ("full", "LoRA")]
    return list(dict.fromkeys([*chosen_, "LoRA, harmful, 1 step", "full, benign", "LoRA, benign"]))


def harmful() -> str:
    rows = []
    for s in harmful_settings():
        for mode in MODES[1:]:
            rows.append([s if mode == "vanilla" else "", NAMES[mode], mean_std(attack(s, mode)),
                         mean_std(scores("harmful", s, mode, "secret_test")),
                         mean_std(scores("harmful", s, mode, "knowledge"))])
    return table(["fine-tuning", "mode", "attack success", "leaked", "helpfulness"], rows)


def harmful_summary() -> str:
    rows = []
    for s in harmful_settings():
        a = {m: attack(s, m) for m in ("vanilla", "taia")}
        h = {m: scores("harmful", s, m, "knowledge") for m in ("vanilla", "taia")}
        rows.append([s + (" (the attacker's choice)" if s in map(attackers_choice, ("full", "LoRA")) else ""),
                     f"{mean(a['vanilla'])} → {mean(a['taia'])}", paired(a["taia"], a["vanilla"]),
                     f"{mean(h['vanilla'])} → {mean(h['taia'])}", paired(h["taia"], h["vanilla"])])
    return table(["fine-tuning", "attack success: vanilla → TAIA", "TAIA − vanilla (seeds TAIA higher)",
                  "helpfulness: vanilla → TAIA", "TAIA − vanilla"], rows)


def harmful_steps() -> str:
    full, lora_ = attacks("full"), attacks("LoRA")
    rows = [[f.split()[2], *(mean_std(attack(s, m)) for s in (f, g) for m in MODES[1:])] for f, g in zip(full, lora_)]
    return table(["steps", *(f"{kind}: {m}" for kind in ("full", "LoRA") for m in ("vanilla", "TAIA", "TAIF"))], rows)


def quiz(kind: str, mode: str, k: int) -> list[float]:
    return scores("few_shot", f"{kind}, quiz format, {k} demonstrations", mode, f"quiz_test_k{k}")


def gain(kind: str, mode: str) -> list[float]:
    return [b - a for a, b in zip(quiz(kind, mode, 0), quiz(kind, mode, 4))]


def few_shot() -> str:
    rows = [[name, *(mean_std(quiz(kind, mode, k)) for k in (0, 1, 4)), mean_std(gain(kind, mode))]
            for name, kind, mode in (("base", "full", "base"), ("vanilla, full", "full", "vanilla"),
                                     ("TAIA, full", "full", "taia"), ("vanilla, LoRA", "LoRA", "vanilla"),
                                     ("TAIA, LoRA", "LoRA", "taia"))]
    return table(["quiz format", "k = 0", "k = 1", "k = 4", "gain 0 → 4"], rows)


def few_shot_paired() -> str:
    rows = [[kind, *(paired(quiz(kind, "taia", k), quiz(kind, "vanilla", k)) for k in (0, 4)),
             paired(gain(kind, "taia"), gain(kind, "vanilla"))] for kind in ("full", "LoRA")]
    return table(["fine-tuning", "TAIA − vanilla at k = 0", "at k = 4", "TAIA's gain − vanilla's"], rows)


TABLES = {f.__name__: f for f in (
    headline, targets, lr_sweep, baselines_chosen, baselines_default_lr, baselines_per_seed, baselines_sweeps,
    toa_k, representations, curves_summary, curves_targets, lora_rank, lora_own_best, lora, worlds_variants, worlds_knobs,
    harmful, harmful_summary, harmful_steps, few_shot, few_shot_paired)}
TABLES |= {f"{name}_{kind.lower()}": (lambda name=name, kind=kind: curve(name, kind))
           for name in ("ood_share", "ood_added", "data_scale") for kind in ("full", "LoRA")}
TABLES |= {name: (lambda make=make: make(points("fair"))) for name, make in fair_tables.TABLES.items()}
TABLES |= {f"fair_machine_{test_set}": (lambda test_set=test_set: fair_tables.fair_machine(
    points("fair"), points("fair_machine"), (kernels("fair"), kernels("fair_machine")), test_set))
    for test_set in ("ood_test", "knowledge")}
TABLES["fair_machine_lr"] = lambda: fair_tables.fair_lr(points("fair_machine"))  # its own sweep, its own choices
TABLES |= {name: (lambda name=name: real_model_tables.tables(list(points("real_model")))[name])
           for name in real_model_tables.NAMES}
