"""experiments/real_model.py's tables, from its points (docs/real_model.json): the experiment prints them and
tools/report.py writes them into docs/real_model.md, so the two never part. Plain Python, no torch, as stats.py.

Each fine-tuned mode answers at its own learning rate: the rate with the best mean answer match on
transfer_val over the seeds (never a test set; a tie goes to the lower rate), per kind of fine-tuning.
"""
import statistics

from stats import mean_std, paired, table

RATES = {"full": (1e-5, 3e-5, 1e-4), "LoRA": (1e-4, 3e-4, 1e-3)}  # each kind's sweep of the learning rate
MODES = ("vanilla", "taia", "taif")  # each fine-tune's; the base is scored once
REPORTED = ("transfer_test", "retention_test", "finetune_fit")


def scores(rows: list[dict], setting: str, mode: str, name: str) -> list[float]:
    """Answer match of mode on set name in setting, one per seed in seed order."""
    return [p["answer_match"] for p in sorted(rows, key=lambda p: p["seed"] or 0)
            if p["setting"] == setting and p["mode"] == mode and p["set"] == name]


def best_rates(rows: list[dict], kind: str) -> dict:
    """{mode: the rate whose mean transfer_val over seeds is highest} (ties: the lower rate)."""
    rates = RATES[kind]
    return {mode: max(rates, key=lambda lr: (statistics.mean(scores(rows, f"{kind} lr {lr:g}", mode,
                                                                     "transfer_val")), -lr))
            for mode in MODES}


def at_best(rows: list[dict], kind: str, names=REPORTED) -> tuple[dict, dict]:
    """Each mode's rate, and its scores there: ({mode: rate}, {mode: {set: [one per seed]}})."""
    best = best_rates(rows, kind)
    return best, {mode: {name: scores(rows, f"{kind} lr {best[mode]:g}", mode, name) for name in names}
                  for mode in MODES}


def base_scores(rows: list[dict]) -> dict:
    return {p["set"]: p["answer_match"] for p in rows if p["setting"] == "base"}


def chosen_table(rows: list[dict], kind: str) -> str:
    """Every mode at its own best rate (mean ± sample std over seeds), then TAIA minus vanilla and TAIF,
    paired by seed: the mean, its 95% interval and the seeds where TAIA is ahead."""
    base, (best, found) = base_scores(rows), at_best(rows, kind)
    body = [["base", "-", *(f"{base[name]:.1f}" for name in REPORTED)]]
    body += [[mode, f"{best[mode]:g}", *(mean_std(found[mode][name]) for name in REPORTED)] for mode in MODES]
    body += [[f"taia − {other}", "", *(paired(found["taia"][name], found[other][name]) for name in REPORTED)]
             for other in ("vanilla", "taif")]
    return table(["mode", "rate", *REPORTED], body)


def headline_table(rows: list[dict]) -> str:
    """The README's: both kinds, each mode at its own rate, on the two test sets, with TAIA − vanilla."""
    base, body = base_scores(rows), []
    for kind in RATES:
        best, found = at_best(rows, kind)
        label = f"{kind} ({', '.join(f'{mode} {best[mode]:g}' for mode in MODES)})"
        for i, name in enumerate(("transfer_test", "retention_test")):
            body.append([label if i == 0 else "", name, f"{base[name]:.1f}",
                         *(mean_std(found[mode][name]) for mode in MODES),
                         paired(found["taia"][name], found["vanilla"][name])])
    return table(["fine-tuning (each mode's rate)", "test set", "base", *MODES,
                     "taia − vanilla [95% interval] (seeds ahead)"], body)


def sweep_table(rows: list[dict], kind: str) -> str:
    """Every rate: each mode's mean over seeds on transfer_val (where the rates are chosen) and the test sets."""
    names = ("transfer_val", *REPORTED)
    body = [[f"{lr:g}", mode, *(f"{statistics.mean(scores(rows, f'{kind} lr {lr:g}', mode, name)):.1f}"
                                for name in names)]
            for lr in RATES[kind] for mode in MODES]
    return table(["rate", "mode", *names], body)


MAKERS = {"chosen": chosen_table, "sweep": sweep_table}
# the names of docs/real_model.md's and the README's markers
NAMES = ("real_model_headline", *(f"real_model_{what}_{kind.lower()}" for kind in RATES for what in MAKERS))


def tables(rows: list[dict]) -> dict:
    """The experiment's tables as markdown, by the names tools/report.py writes them under."""
    return {"real_model_headline": headline_table(rows),
            **{f"real_model_{what}_{kind.lower()}": make(rows, kind) for kind in RATES for what, make in MAKERS.items()}}
