"""The toy world's knobs (data/toy.py KNOBS, train.py --toy_world) and the experiments built on them:
curves.py (OOD share, data scale), lora_rank.py and worlds.py."""
import hashlib
import json
import re
import sys
from pathlib import Path

from data.text import read_examples, read_lines
from data.toy import (DOMAINS, KNOBS, NEW_FORMATS, QA_PROMPT, STATEMENTS, fine_tuning_sizes, generate,
                             make_world, with_defaults)
from helpers import ROOT, TINY, TINY_RUN, assert_one_line_error, run, run_here
from test_safety_fewshot import DEFAULT_WORLD_0, entity

sys.path.insert(0, str(ROOT / "experiments"))
from curves import CURVES  # noqa: E402
from worlds import ONE_AT_A_TIME  # noqa: E402


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def test_every_knob_at_its_default_is_the_default_world_and_fine_tuning_knobs_keep_pretraining(tmp_path):
    defaults = {name: default for name, (default, _, _) in KNOBS.items()}
    written = generate(str(tmp_path / "defaults"), seed=0, knobs=defaults)
    assert {name: sha(path) for name, path in written.items()} == DEFAULT_WORLD_0
    moved = generate(str(tmp_path / "moved"), seed=0, knobs={"new_format": "what", "ft_attributes": 2,
                                                              "id_set": "near", "finetune_size": 50, "ood_share": 0.5})
    assert sha(moved["pretrain"]) == DEFAULT_WORLD_0["pretrain"]  # one base serves every value of these
    assert sha(moved["knowledge"]) == DEFAULT_WORLD_0["knowledge"]
    assert len(read_examples(moved["finetune_mixed"])) == 50


def test_ood_share_mixes_nested_sets_and_near_id_data_is_held_out_from_the_test(tmp_path):
    facts, split, _ = make_world(3)
    mixed = {}
    for share in (0.0, 0.25, 1.0):
        paths = generate(str(tmp_path / str(share)), seed=3, knobs={"id_set": "near", "finetune_size": 240,
                                                                     "ood_share": share})
        mixed[share] = read_examples(paths["finetune_mixed"])
        ood = [r for r in mixed[share] if entity(r["prompt"]) in facts["Q"]]
        assert len(mixed[share]) == 240 and len(ood) == round(share * 240)
    prompts = {share: {r["prompt"] for r in rows} for share, rows in mixed.items()}
    ood_part = {p for p in prompts[0.25] if p in prompts[1.0]}
    assert len(ood_part) == 60 and prompts[0.25] - ood_part <= prompts[0.0]  # nested as the share grows
    id_set, test = (read_examples(paths[name]) for name in ("finetune_id", "ood_test"))
    assert not {r["prompt"] for r in id_set} & {r["prompt"] for r in test}
    for e in split["P_test"]:  # half of each test entity's attributes in the ID set, the other half tested
        assert sum(entity(r["prompt"]) == e for r in id_set) == sum(entity(r["prompt"]) == e for r in test) == 2
    assert all(r["response"] == facts["P"][entity(r["prompt"])][r["prompt"].split()[1]] for r in id_set + test)
    # The negative control keeps the new facts the OOD set states, all of them in the mixed set at share 1.
    rows = read_examples(tmp_path / "1.0" / "ft_only_facts.jsonl")
    assert rows and {r["prompt"] for r in rows} <= prompts[1.0]
    # The sizes the up-front check counts are those generate() writes.
    for knobs in ({}, {"id_set": "near"}, {"entities": 45, "ft_attributes": 2}, {"entities": 60, "finetune_size": 70,
                                                                                    "id_set": "near"}):
        written = generate(str(tmp_path / "sizes"), seed=1, knobs=knobs)
        assert fine_tuning_sizes(with_defaults(knobs)) == tuple(len(read_examples(written[f"finetune_{name}"]))
                                                                for name in ("ood", "id"))


def test_new_formats_are_made_of_pretraining_words_and_pretraining_knobs_shape_the_text(tmp_path):
    default_text = Path(generate(str(tmp_path / "d"), seed=0)["pretrain"]).read_text()
    words = set(re.findall(r"[A-Za-z]+", default_text))
    for name, template in NEW_FORMATS.items():
        assert set(re.findall(r"[A-Za-z]+", template.format(a="", e=""))) <= words | {w.capitalize() for w in words}
        assert template != QA_PROMPT
        rows = read_examples(generate(str(tmp_path / name), seed=0, knobs={"new_format": name,
                                                                           "ft_attributes": 1})["finetune_ood"])
        assert {r["prompt"] for r in rows} == {template.format(a="port", e=e) for e in make_world(0)[0]["Q"]}
    paths = generate(str(tmp_path / "small"), seed=0, knobs={"entities": 45, "templates": 2, "values": 5})
    facts, _, _ = make_world(0, 45, 45, 15, values=5)
    lines = read_lines(paths["pretrain"])
    assert all(v in DOMAINS[d][a][:5] for d in facts for e in facts[d] for a, v in facts[d][e].items())
    e = next(iter(facts["P"]))
    a, v = next(iter(facts["P"][e].items()))
    assert sum(line in [t.format(a=a, e=e, v=v) for t in STATEMENTS] for line in lines) == 2
    assert len(read_examples(paths["ood_test"])) == 15 * 4


def lab_here(*args):
    """experiments/lab.py as a program in this process (helpers.run_here)."""
    return run_here("experiments/lab.py", *args)


def test_train_py_toy_world_flag(tmp_path):
    out = tmp_path / "run"
    knobs = "id_set=near,ood_share=0.5,finetune_size=40"
    result = lab_here("--out_dir", out, *TINY_RUN, "--toy_world", knobs, "--finetune_set", "mixed")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "data" / "world.json").read_text()) == {
        "seed": 0, "knobs": {"id_set": "near", "finetune_size": 40, "ood_share": 0.5}}
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["finetune"]["finetune_set"] == "mixed"
    assert len(read_examples(out / "data" / "ood_test.jsonl")) == 60  # the near world's held-out half
    # A pretraining knob makes another world: --resume refuses to replace the world the base was made from.
    world = (out / "data" / "world.json").read_text()
    assert_one_line_error(run("experiments/lab.py", "--out_dir", out, *TINY_RUN, "--resume", "--toy_world", "templates=3"),
                          "holds finetuned.pt made from it")
    assert (out / "data" / "world.json").read_text() == world  # refused before anything was rewritten
    for bad, expected in [("values=11", "values takes a whole number from 2 to 10"),
                          ("entities=30.0", "a whole number"), ("qa_share=nan", "qa_share takes a number from 0.0 to 1.0"),
                          ("new_format=poem", "new_format takes give, instruction, question, what"),
                          ("size=3", "the toy world's knobs are entities"), ("entities", "give KNOB=VALUE"),
                          ("ood_share=1,finetune_size=400", "needs 400 OOD and 0 ID examples"),
                          ("values=3,values=4", "values is given twice"),
                          ("finetune_size=3,ft_attributes=1", "ft_only_facts would hold no examples")]:
        assert_one_line_error(lab_here("--out_dir", tmp_path / "x", "--stage", "data", "--toy_world", bad), expected)
    assert_one_line_error(lab_here("--out_dir", tmp_path / "x", "--finetune_set", "mixed"), "ood_share=S")
    own = [f"--{flag}={out / 'data' / name}" for flag, name in (("pretrain_text", "pretrain.txt"),
                                                                 ("finetune", "finetune_mixed.jsonl"))]
    for flags, knob in [(own[:1], "entities=30"), (own[1:], "finetune_size=10"), (own[1:], "ood_share=0.5")]:
        assert_one_line_error(lab_here("--out_dir", tmp_path / "x", *flags, "--toy_world", knob),
                              f"--toy_world {knob.split('=')[0]}: what it shapes is your own file here")
    assert_one_line_error(lab_here("--out_dir", tmp_path / "x", "--toy_parts", "demonstrations", "--toy_world",
                              "new_format=give"), "use them without --toy_parts demonstrations")
    # --stage eval / finetune use the world's files as they are: another world's are refused, not scored.
    assert_one_line_error(lab_here("--out_dir", out, "--stage", "eval", "--toy_world", "id_set=near"),
                          'holds the toy world {"seed": 0, "knobs": {"id_set": "near", "finetune_size": 40, "ood_share": 0.5}}')


# The experiments at one seed of a tiny model, each over a few points of its grid (helpers.run_here's
# `changed`): every run is a train.py program of its own, and the whole grids are what docs/*.json hold.
CURVE_POINTS = {"ood_share": (0.0, 0.5), "data_scale": (30,)}


def tiny(root):
    return ["--seeds", "1", "--root", root, "--train_args",
            " ".join([*TINY, "--pretrain_steps", "2", "--finetune_steps", "2"])]


def curve(name: str, *args):
    return run_here("experiments/curves.py", name, *args,
                    changed={"CURVES": {**CURVES, name: (CURVE_POINTS[name], *CURVES[name][1:])}})


def test_the_curve_experiment_reports_what_train_py_wrote(tmp_path):
    root = tmp_path / "root"
    result = curve("ood_share", *tiny(root), "--json", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((root / "seed_0" / "ood_share_0.5_full" / "results.json").read_text())
    mixed = read_examples(root / "seed_0" / "ood_share_0.5_full" / "data" / "finetune_mixed.jsonl")
    assert len(mixed) == 240 and written["config"]["finetune"]["finetune_set"] == "mixed"
    row = "| 0.5 | " + " | ".join(f"{100 * written['results']['ood_test'][m]:5.1f} ±  0.0"
                                  for m in ("base", "vanilla", "taia", "taif")) + " |"
    assert row in result.stdout.split("LoRA fine-tuning")[0]
    points = json.loads((tmp_path / "c.json").read_text())["points"]
    assert {p["setting"] for p in points} == {f"{kind}, ood_share {x}" for kind in ("full", "LoRA")
                                              for x in CURVE_POINTS["ood_share"]}
    scale = curve("data_scale", *tiny(root))  # on the same base
    assert scale.returncode == 0, scale.stderr
    assert len(read_examples(root / "seed_0" / "data_scale_30_lora" / "data" / "finetune_ood.jsonl")) == 30


def test_the_lora_rank_experiment_reports_what_train_py_wrote(tmp_path):
    lora = run_here("experiments/lora_rank.py", *tiny(tmp_path / "root"), changed={"RANKS": (1,), "LRS": ("5e-3",)})
    assert lora.returncode == 0, lora.stderr
    config = json.loads((tmp_path / "root" / "seed_0" / "lora_r1_a2_lr5e-3_200steps" / "results.json").read_text())
    assert {k: config["config"]["finetune"][k] for k in ("lora_rank", "lora_alpha", "finetune_lr")} == \
        {"lora_rank": 1, "lora_alpha": 2.0, "finetune_lr": 5e-3}
    assert lora.stdout.count("(chosen on ood_val)") == 1
    chosen = re.search(r"\| 1 \| (\d+) \| 5e-3 \| 200 \(chosen on ood_val\) \|", lora.stdout)
    for steps in (100, 400):  # the chosen setting, run again at other lengths
        assert (tmp_path / "root" / "seed_0" / f"lora_r1_a{chosen.group(1)}_lr5e-3_{steps}steps" / "results.json").exists()


def test_the_worlds_experiment_reports_what_train_py_wrote(tmp_path):
    root = tmp_path / "root"
    worlds = run_here("experiments/worlds.py", *tiny(root), "--variants", "1", changed={"ONE_AT_A_TIME": ONE_AT_A_TIME[:2]})
    assert worlds.returncode == 0, worlds.stderr
    variant = root / "worlds" / "variant_0" / "seed_0" / "ood"
    stamp = json.loads((variant / "data" / "world.json").read_text())
    assert stamp["seed"] == 0 and stamp["knobs"]["templates"] == 2  # variant 0's draw
    result = json.loads((variant / "results.json").read_text())["results"]["ood_test"]
    assert f"{100 * result['taia'] - 100 * result['vanilla']:+.1f} |" in worlds.stdout.split("2. The default")[0]
    moved = json.loads((root / "seed_0" / "knob_new_format_give" / "data" / "world.json").read_text())
    assert moved["knobs"] == {"new_format": "give"} and "| new_format | give |" in worlds.stdout


def test_the_experiments_refuse_flags_that_are_theirs_or_unknown(tmp_path):
    assert_one_line_error(run("experiments/curves.py", "ood_share", "--train_args=--toy_world=values=5"),
                          "the experiment chooses its world")
    # --train_args is read as lab.py reads it: an abbreviation is refused, not slipped past the guard, and the
    # stages are the experiment's own (a --stage data re-run would report stale results).
    assert_one_line_error(run_here("experiments/curves.py", "ood_share", "--train_args", "--toy_w values=5"),
                          "unrecognized arguments: --toy_w")
    assert_one_line_error(run_here("experiments/curves.py", "ood_share", "--train_args", "--stage data"),
                          "--stage and --resume are the experiment's own")
    assert_one_line_error(run_here("experiments/curves.py", "ood_share", "--roo", tmp_path), "unrecognized arguments")
    # --json is checked before any run: a folder, or a file in a missing folder, would be found only at the end.
    for target in (tmp_path, tmp_path / "missing" / "points.json"):
        assert_one_line_error(run_here("experiments/curves.py", "ood_share", "--root", tmp_path / "r", "--json",
                                       target), "a file in an existing folder")
    assert_one_line_error(run_here("experiments/curves.py", "sizes"), "invalid choice")
