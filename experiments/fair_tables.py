"""The fair comparison's tables, from its points (experiments/fair.py writes them to docs/fair.json).

Every mode answers at its own learning rate: the rate of its sweep with the best mean answer match on ood_val over
the seeds (never ood_test; a tie goes to the lower rate), per kind of fine-tuning. fair.py prints these tables and
tools/report.py writes them into the docs, so the two never part. Plain Python, no torch, as stats.py.
"""
import statistics

from stats import DataError, mean_std, paired, table

FIXED = {"full": 7e-4, "LoRA": 2e-3}  # train.py's default rate and runs.KINDS's LoRA recipe's: the fixed column
# Each kind's methods: (the sweep whose rate it chooses, the mode it answers in). TOA and TOF are full fine-tunes
# of the attention only / the FFN only, answered as vanilla (the paper's baselines); vanilla, TAIA and TAIF are
# three inferences of the same fine-tunes.
METHODS = {"full": {"vanilla": ("full", "vanilla"), "TAIA": ("full", "taia"), "TAIF": ("full", "taif"),
                    "TOA": ("TOA", "vanilla"), "TOF": ("TOF", "vanilla")},
           "LoRA": {"vanilla": ("LoRA", "vanilla"), "TAIA": ("LoRA", "taia"), "TAIF": ("LoRA", "taif")}}
ROUNDED = ", rounded: "  # a rerun's setting is the sweep's, this, and the change (e.g. ATEN_CPU_CAPABILITY=avx2)


def setting(sweep: str, rate: float) -> str:
    return f"{sweep} lr {rate:g}"  # e.g. "full lr 0.0007", "LoRA lr 0.002", "TOA lr 0.0007"


def rate(name: str) -> float:
    return float(name.split(ROUNDED)[0].split()[2])


def scores(points, name: str, mode: str, test_set: str = "ood_test") -> list[float]:
    """Answer match % of `mode` on `test_set` at setting `name`, one per seed, in seed order."""
    found = sorted((p["seed"], p["answer_match"]) for p in points
                   if p["setting"] == name and p["mode"] == mode and p["set"] == test_set)
    if not found:
        raise DataError(f"no point for {name!r}, {mode}, {test_set}")
    return [value for _, value in found]


def sweep(points, name: str) -> list[str]:
    """The settings of one sweep ("full", "LoRA", "TOA", "TOF"), by rate; reruns left out."""
    names = {p["setting"] for p in points if p["setting"].split()[0] == name and ROUNDED not in p["setting"]}
    return sorted(names, key=rate)


def methods_in(points) -> dict:
    """METHODS, less TOA or TOF where these points hold no sweep of it (fair.py --sweeps left it out); full and
    LoRA are always run, and points without either are not fair.py's."""
    missing = [kind for kind in METHODS if not sweep(points, kind)]
    if missing:  # (fair.py always runs both)
        raise DataError(f"no points of the {' and '.join(missing)} sweep (fair.py always runs both)")
    return {kind: {m: how for m, how in methods.items() if sweep(points, how[0])} for kind, methods in METHODS.items()}


def chosen(points, sweep_name: str, mode: str) -> str:
    """The setting of the sweep where `mode` has the best mean answer match on ood_val (the lowest rate of a tie)."""
    return max(sweep(points, sweep_name), key=lambda s: statistics.mean(scores(points, s, mode, "ood_val")))


def rerun(points, name: str) -> str | None:
    """The setting of name's rerun with only the floating-point rounding changed, if there is one."""
    return next((p["setting"] for p in points if p["setting"].startswith(name + ROUNDED)), None)


def short(rate_: float) -> str:
    mantissa, exponent = f"{rate_:.1e}".split("e")  # 0.0007 -> 7e-4, 0.0015 -> 1.5e-3
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def fair_headline(points) -> str:
    """Each mode at its own best rate on ood_val beside all at the fixed rate, with TAIA's paired lead."""
    rows = []
    for kind, methods in methods_in(points).items():
        picks = {"own": {m: chosen(points, *methods[m]) for m in methods},
                 "fixed": {m: setting(methods[m][0], FIXED[kind]) for m in methods}}
        taia = {how: scores(points, picks[how]["TAIA"], "taia") for how in picks}
        for method in ("base", *methods):
            runs_of = "TAIA" if method == "base" else method  # (the base answers alike in every run of a seed)
            name, fixed = picks["own"][runs_of], picks["fixed"][runs_of]
            mode = "base" if method == "base" else methods[method][1]
            lead = {how: "-" if method == "TAIA" else paired(taia[how], scores(points, s, mode))
                    for how, s in (("own", name), ("fixed", fixed))}
            rows.append([kind if method == "base" else "", method, "-" if method == "base" else short(rate(name)),
                         *(mean_std(scores(points, name, mode, t)) for t in ("ood_val", "ood_test", "knowledge")),
                         lead["own"], mean_std(scores(points, fixed, mode)), lead["fixed"]])
    return table(["fine-tuning", "mode", "its lr (best ood_val)", "ood_val", "ood_test", "knowledge",
                  "TAIA − mode on ood_test [95% interval] (seeds TAIA ahead)",
                  f"fixed lr ({', '.join(f'{k} {short(r)}' for k, r in FIXED.items())}): ood_test",
                  "TAIA − mode at the fixed lr"], rows)


def fair_lr(points) -> str:
    """ood_test at every rate of the sweeps: TAIA's lead as a function of the learning rate."""
    names = [m for m in ("vanilla", "TAIA", "TAIF", "TOA", "TOF") if any(m in ms for ms in methods_in(points).values())]
    rows = []
    for kind, methods in methods_in(points).items():
        picks = {m: chosen(points, *methods[m]) for m in methods}
        for s in sweep(points, kind):
            cells = []
            for m in names:
                if m not in methods:
                    cells.append("-")
                    continue
                at = setting(methods[m][0], rate(s))
                cells.append(mean_std(scores(points, at, methods[m][1])) + (" *" if at == picks[m] else ""))
            rows.append([kind, short(rate(s)), *cells, paired(scores(points, s, "taia"), scores(points, s, "vanilla"))])
    seeds = len(scores(points, sweep(points, "full")[0], "taia"))
    return (table(["fine-tuning", "lr", *names, "TAIA − vanilla [95% interval] (seeds TAIA ahead)"], rows)
            + f"\n\nood_test, mean ± sample std over {seeds} seeds; * the rate the mode chose on ood_val.")


def compared_rows(points, again, test_set: str = "ood_test", pooled: bool = False) -> list[list]:
    """A row per kind and mode at its chosen rate: its scores in `points` against again(setting, mode, test_set),
    the same fine-tune made once more another way; how far the seeds moved, and TAIA's lead in each (pooled: and
    in both, each seed's mean of the two ways, so that a seed still counts once)."""
    rows = []
    for kind, methods in methods_in(points).items():
        picked = {m: (chosen(points, *how), how[1]) for m, how in methods.items()}
        picked = {"base": (picked["TAIA"][0], "base"), **picked}  # (the base is the same in every setting)
        first = {m: scores(points, name, mode, test_set) for m, (name, mode) in picked.items()}
        second = {m: again(name, mode, test_set) for m, (name, mode) in picked.items()}
        for method, (name, _) in picked.items():
            a, b = first[method], second[method]
            moved_by = [abs(y - x) for x, y in zip(a, b, strict=True)]
            if method == "TAIA":
                leads = ["-"] * (3 if pooled else 2)
            else:
                leads = [paired(first["TAIA"], a), paired(second["TAIA"], b)]
                if pooled:
                    leads.append(paired(seed_means(first["TAIA"], second["TAIA"]), seed_means(a, b)))
            label = method if method == "base" else f"{method} ({short(rate(name))})"
            rows.append([kind if method == "base" else "", label, mean_std(a), mean_std(b), paired(b, a),
                         f"{statistics.mean(moved_by):.1f}, {max(moved_by):.1f}", *leads])
    return rows


def seed_means(a: list[float], b: list[float]) -> list[float]:
    """Each seed's mean of two runs' scores (both in seed order)."""
    return [(x + y) / 2 for x, y in zip(a, b, strict=True)]


def fair_rounding(points) -> str:
    """Each mode at its chosen rate, as run and rerun with only the floating-point rounding changed."""
    change = next((p["setting"].split(ROUNDED)[1] for p in points if ROUNDED in p["setting"]), None)
    if change is None:
        return "No reruns with the rounding changed in this data (fair.py --rounding none)."

    def rerun_scores(name, mode, on):
        if rerun(points, name) is None:
            raise DataError(f"no rerun of {name!r} with the rounding changed ({change}): the reruns are incomplete")
        return scores(points, rerun(points, name), mode, on)
    rows = compared_rows(points, rerun_scores)
    return (table(["fine-tuning", "mode (its lr)", "ood_test as run", "rounded", "rounded − as run [95% interval] "
                   "(seeds higher)", "per seed |rounded − as run|: mean, largest", "TAIA − mode as run",
                   "TAIA − mode rounded"], rows)
            + f"\n\nrounded: the same fine-tune and evaluation from the same base with {change} (the same random "
            "draws, other floating-point rounding).")


def fair_machine(points, elsewhere, kernels: tuple[str, str], test_set: str = "ood_test") -> str:
    """Each mode at the rate it chose in `points`, against the same settings in `elsewhere`: the whole run, its
    bases' pretraining included, made again with ATen's kernels for another CPU (kernels: the two, as named)."""
    here, there = kernels
    if here == there:
        raise DataError(f"both sets of runs used the {here} kernels: nothing was changed")
    seeds = {"first": sorted({p["seed"] for p in points}), "second": sorted({p["seed"] for p in elsewhere})}
    if seeds["first"] != seeds["second"]:  # (scores pair the two runs by position in seed order)
        raise DataError(f"the two sets of runs hold other seeds: {seeds['first']} and {seeds['second']}")
    rows = compared_rows(points, lambda name, mode, on: scores(elsewhere, name, mode, on), test_set, pooled=True)
    return (table(["fine-tuning", "mode (its lr)", f"{test_set}, {here} kernels", f"{there} kernels",
                   f"{there} − {here} [95% interval] (seeds higher)", "per seed |difference|: mean, largest",
                   f"TAIA − mode, {here}", f"TAIA − mode, {there}", "TAIA − mode, both (each seed's mean)"], rows)
            + f"\n\n{there}: the same seeds, recipe and rates, every base pretrained again and every fine-tune and "
            f"evaluation made again with ATen's {there} kernels (the same random draws, other floating-point "
            "rounding from the first step of pretraining).")


TABLES = {f.__name__: f for f in (fair_headline, fair_lr, fair_rounding)}
