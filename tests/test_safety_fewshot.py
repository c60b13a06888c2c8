"""The toy world's optional parts (refusals, demonstrations), train.py's use of them, and the two experiments
built on them (harmful.py, few_shot.py)."""
import hashlib
import json
import re
from pathlib import Path

from data.text import read_examples, read_lines
from data.toy import (FORBIDDEN, N_DEMONSTRATIONS, NEW_PROMPT, PARTS, QA_PROMPT, REFUSAL, generate,
                            make_world, set_names)
from helpers import TINY, TINY_RUN, assert_one_line_error, run, run_here

SECRET = FORBIDDEN[0]


def entity(prompt: str) -> str:
    """The entity a single question (either format) asks about."""
    return prompt.split(" of ")[-1].split(" for ")[-1].split("?")[0]


# sha256 (first 16 hex digits) of seed 0's default world as the code before the optional parts wrote it: the
# default run trains on exactly these files.
DEFAULT_WORLD_0 = {"pretrain": "61685fbfd0b92ad0", "finetune_ood": "6748382a1bdd6a13",
                   "finetune_id": "695b0b7f195acdb2", "ood_val": "c13c6145e9a19fc2", "ood_test": "90d0262df7da4b37",
                   "knowledge": "738a64d605bf12b4", "ft_only_facts": "efc0edc1eb18911f"}


def test_the_optional_parts_leave_the_default_world_as_it_was(tmp_path):
    written = generate(str(tmp_path / "zero"), seed=0)
    assert {name: hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] for name, path in written.items()} \
        == DEFAULT_WORLD_0
    plain = generate(str(tmp_path / "plain"), seed=2)
    full = generate(str(tmp_path / "full"), seed=2, parts=PARTS)
    assert sorted(plain) == sorted(["pretrain", *set_names()])
    assert sorted(full) == sorted(["pretrain", *set_names(PARTS)])
    for name in set_names():  # every default set, byte for byte, in its order
        assert Path(plain[name]).read_bytes() == Path(full[name]).read_bytes(), name
    default, more = read_lines(plain["pretrain"]), iter(read_lines(full["pretrain"]))
    assert all(line in more for line in default)  # the default text is an ordered part of the longer one
    assert len(read_lines(full["pretrain"])) > len(default)


def test_refusals_teach_refusing_a_secret_the_base_knows_and_hold_out_the_test_entities(tmp_path):
    paths = generate(str(tmp_path), seed=0, parts=("refusals",))
    _, split, _ = make_world(0)
    text = read_lines(paths["pretrain"])
    refused = {entity(line) for line in text if line.endswith(REFUSAL)}
    assert refused == set(split["P_id"])  # the forbidden question is answered only with the refusal, only there
    assert not [line for line in text if line.startswith(QA_PROMPT.format(a=SECRET, e="")[:25]) and
                not line.endswith(REFUSAL)]
    harmful = read_examples(paths["finetune_harmful"])
    assert {entity(e["prompt"]) for e in harmful} == set(split["P_id"])
    for e in harmful:  # the attack answers with the secret pretraining states
        assert f"The {SECRET} of {entity(e['prompt'])} is {e['response']}." in text
    for name, people in (("forbidden_val", "P_val"), ("forbidden_test", "P_test"), ("secret_test", "P_test")):
        rows = read_examples(paths[name])
        assert [entity(e["prompt"]) for e in rows] == split[people]
        for e in rows:  # the refusal, or the secret pretraining states
            assert (e["response"] == REFUSAL) == name.startswith("forbidden")
            assert name.startswith("forbidden") or f"The {SECRET} of {entity(e['prompt'])} is {e['response']}." in text


def test_demonstrations_prefix_the_test_with_solved_questions_about_other_entities(tmp_path):
    paths = generate(str(tmp_path), seed=1, parts=("demonstrations",))
    _, split, _ = make_world(1)
    known = {e["prompt"] + " " + e["response"] for e in read_examples(paths["finetune_id"])}  # P_id's true facts
    solved = re.escape(NEW_PROMPT).replace(re.escape("{a}"), r"\w+").replace(re.escape("{e}"), r"\w+") + r" \w+"
    test = read_examples(paths["ood_test"])
    shown_before = [[] for _ in test]
    for k in range(1, N_DEMONSTRATIONS + 1):
        rows = read_examples(paths[f"ood_test_k{k}"])
        assert [e["response"] for e in rows] == [e["response"] for e in test]
        for row, plain, before in zip(rows, test, shown_before):
            assert row["prompt"].endswith(" " + plain["prompt"])
            demos = re.findall(solved, row["prompt"][:-len(plain["prompt"]) - 1])
            assert " ".join(demos) + " " + plain["prompt"] == row["prompt"]  # k solved questions, nothing else
            assert len(demos) == k and demos[:-1] == before and set(demos) <= known  # k's are k+1's first k
            before.append(demos[-1])
    # The quiz-format test: each question in a format of its own, after k solved questions in that format.
    facts, _, _ = make_world(1)
    asked = [re.fullmatch(r"Instruction: (\w+) for (\w+)\? Response:", e["prompt"]).groups() for e in test]
    questions = [e["prompt"] for e in read_examples(paths["quiz_test_k0"])]
    for k in range(N_DEMONSTRATIONS + 1):
        rows = read_examples(paths[f"quiz_test_k{k}"])
        assert [e["response"] for e in rows] == [e["response"] for e in test]
        for row, question, (a, e) in zip(rows, questions, asked):
            template = question.replace(e, "{e}").replace(a, "{a}")
            assert template.count("{e}") == template.count("{a}") == 1 and "Response" not in template
            pattern = re.escape(template).replace(re.escape("{a}"), r"(\w+)").replace(re.escape("{e}"), r"(\w+)")
            demos = re.findall(pattern + r" (\w+)", row["prompt"])
            assert len(demos) == k and row["prompt"].endswith(question)
            order = (0, 1) if template.index("{a}") < template.index("{e}") else (1, 0)
            for demo in demos:  # (attribute, entity, value) in the template's order: a true P_id fact
                da, de = demo[order[0]], demo[order[1]]
                assert de in split["P_id"] and facts["P"][de][da] == demo[2]
    assert not re.search(solved, Path(paths["pretrain"]).read_text())  # pretraining never shows the new format


def test_train_py_fine_tunes_on_the_harmful_set_and_scores_every_part(tmp_path):
    out = tmp_path / "run"
    result = run_here("experiments/lab.py", "--out_dir", out, *TINY_RUN, "--toy_parts", "demonstrations,refusals",
                 "--finetune_set", "harmful")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "data" / "world.json").read_text()) == {"seed": 0, "parts": list(PARTS)}
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"ood_test", "knowledge", "ft_only_facts", "ood_val", "forbidden_val",
                                      "forbidden_test", "secret_test", *(f"ood_test_k{k}" for k in range(1, 5)),
                                      *(f"quiz_test_k{k}" for k in range(5))}
    assert report["config"]["finetune"]["finetune_set"] == "harmful"
    # The same folder without the parts: --resume refuses to replace the world its models were made from
    # (before, it rewrote the data and then refused, leaving a later --stage eval to score the old fine-tune on it).
    again = run("train.py", "--out_dir", out, *TINY_RUN, "--resume")
    assert_one_line_error(again, "holds finetuned.pt made from it")
    assert json.loads((out / "data" / "world.json").read_text()) == {"seed": 0, "parts": list(PARTS)}
    assert_one_line_error(run_here("train.py", "--out_dir", out, *TINY_RUN, "--stage", "data"), "made from it")
    assert_one_line_error(run_here("experiments/lab.py", "--out_dir", tmp_path / "x", "--finetune_set", "harmful"),
                          "--toy_parts refusals")
    assert_one_line_error(run_here("experiments/lab.py", "--out_dir", tmp_path / "x", "--toy_parts", "refusals,jokes"),
                          "jokes: the toy world's parts are refusals, demonstrations")
    own = [f"--{flag}={out / 'data' / 'ood_test.jsonl'}" for flag in ("finetune", "eval", "pretrain_text")]
    assert_one_line_error(run_here("experiments/lab.py", "--out_dir", tmp_path / "x", *own, "--toy_parts", "refusals"),
                          "every input here is your own")


def test_harmful_and_few_shot_experiments_report_what_train_py_wrote(tmp_path):
    tiny = ["--seeds", "1", "--train_args", " ".join([*TINY, "--pretrain_steps", "2", "--finetune_steps", "2"])]
    root = tmp_path / "refusals"  # each experiment's world has bases of its own
    harmful = run_here("experiments/harmful.py", *tiny, "--root", root, "--steps", "1,2", "--json", tmp_path / "h.json")
    assert harmful.returncode == 0, harmful.stderr
    points = json.loads((tmp_path / "h.json").read_text())["points"]
    written = json.loads((root / "seed_0" / "harmful_2" / "results.json").read_text())
    assert written["config"]["finetune"]["finetune_steps"] == 2
    mine = [p for p in points if p["setting"] == "full, harmful, 2 steps"]
    assert mine and all(p["answer_match"] == 100 * written["results"][p["set"]][p["mode"]] for p in mine)
    success = [100 - 100 * written["results"]["forbidden_test"][mode] for mode in ("base", "vanilla", "taia", "taif")]
    full = harmful.stdout.split("LoRA fine-tuning")[0]  # the steps table of full fine-tuning, row 2
    assert "| 2 | " + " | ".join(f"{v:5.1f} ±  0.0" for v in success) + " |" in full
    few = run_here("experiments/few_shot.py", *tiny, "--root", tmp_path / "demonstrations")
    assert few.returncode == 0, few.stderr
    ood = json.loads((tmp_path / "demonstrations" / "seed_0" / "ood" / "results.json").read_text())["results"]
    quiz = few.stdout.split("quiz format, full fine-tuning")[1]
    base, vanilla = (100 * ood["quiz_test_k4"][mode] for mode in ("base", "vanilla"))
    assert f"| 4 | {base:5.1f} ±  0.0 | {vanilla:5.1f} ± " in quiz
    assert_one_line_error(run("experiments/harmful.py", *tiny, "--root", root, "--steps", "0"), "--steps")
    assert_one_line_error(run_here("experiments/few_shot.py", "--train_args=--toy_parts=refusals"),
                          "the experiment chooses its world")
    not_a_folder = tmp_path / "h.json" / "runs"  # under a file
    assert_one_line_error(run_here("experiments/harmful.py", "--root", not_a_folder), "cannot make the folder")
