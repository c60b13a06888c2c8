"""The toy pipeline: data generation, tokenizer, exact match, and a tiny end-to-end run of the real CLI."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import UserError
from data.text import (check_template, encode_example, example_batch, load_tokenizer, read_examples, read_lines,
                       train_tokenizer)
from data.toy import generate
from helpers import ROOT, TINY, run
from infer import GRID, score


def test_toy_world_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path):
    a, b, c = (generate(str(tmp_path / name), seed=s) for name, s in (("a", 3), ("b", 3), ("c", 4)))
    for name in a:
        assert Path(a[name]).read_bytes() == Path(b[name]).read_bytes(), name
    assert Path(a["ood_test"]).read_bytes() != Path(c["ood_test"]).read_bytes()


def test_toy_world_splits_keep_test_entities_out_of_fine_tuning(tmp_path):
    paths = generate(str(tmp_path), seed=0)
    entity = lambda prompt: prompt.split(" for ")[1].split("?")[0]
    test = {entity(e["prompt"]) for e in read_examples(paths["ood_test"])}
    for name in ("finetune_ood", "finetune_id", "ood_val"):
        assert not test & {entity(e["prompt"]) for e in read_examples(paths[name])}, name
    novel = {entity(e["prompt"]) for e in read_examples(paths["ft_only_facts"])}
    pretrain = Path(paths["pretrain"]).read_text()
    assert novel and not any(name in pretrain for name in novel)  # facts that exist only in fine-tuning data
    assert all(name in pretrain for name in test)  # the test asks about knowledge pretraining gave


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    lines = read_lines(generate(str(path.parent), seed=0)["pretrain"])
    train_tokenizer(lines, str(path), 768)
    return load_tokenizer(str(path)), lines


def test_tokenizer_round_trips_the_corpus(tokenizer):
    sp, lines = tokenizer
    assert sp.vocab_size() == 768
    assert sp.decode(sp.encode(lines)) == lines
    assert sp.decode(sp.encode("Zürich ☃ unseen")) == "Zürich ☃ unseen"  # byte fallback


def test_response_only_targets(tokenizer):
    sp, _ = tokenizer
    example = {"prompt": "Question: What is the city of Kalo? Answer:", "response": "Paris"}
    ids, start = encode_example(example, sp)
    assert sp.decode(ids[:start]) == example["prompt"] and ids[-1] == sp.eos_id()
    assert ids == [sp.bos_id()] + sp.encode(example["prompt"] + " " + example["response"]) + [sp.eos_id()]
    inputs, targets = example_batch([(ids, start), ([1, 5, 6, 2], 2)], pad_id=sp.eos_id())
    assert inputs.shape == targets.shape == (2, len(ids) - 1)
    assert targets[0].tolist() == [-100] * (start - 1) + ids[start:]
    assert targets[1].tolist() == [-100, 6, 2] + [-100] * (len(ids) - 4)


class BigramModel(torch.nn.Module):
    """Hand-made 'model': always predicts NEXT[token] after token."""

    def __init__(self, next_token: dict, vocab: int):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=64, vocab_size=vocab)
        table = torch.zeros(vocab, vocab)
        for a, b in next_token.items():
            table[a, b] = 1.0
        self.table = torch.nn.Parameter(table)

    def forward(self, tokens):
        return self.table[tokens]


def test_a_template_wraps_the_prompt_and_moves_where_the_response_starts(tokenizer):
    sp, _ = tokenizer
    example = {"prompt": "city for Kalo?", "response": "Varn"}
    plain, plain_start = encode_example(example, sp)
    ids, start = encode_example(example, sp, "Instruction: {prompt} Response:")
    assert ids == [sp.bos_id()] + sp.encode("Instruction: city for Kalo? Response:") + sp.encode("Varn") + [sp.eos_id()]
    assert ids[start:] == plain[plain_start:] and start > plain_start
    with pytest.raises(UserError, match="exactly once"):
        check_template("{prompt} and {prompt}")


def test_exact_match_on_hand_made_cases(tokenizer):
    sp, _ = tokenizer
    paris, lima, eos = sp.piece_to_id("▁Paris"), sp.piece_to_id("▁Lima"), sp.eos_id()
    colon = sp.encode("Answer:")[-1]
    model = BigramModel({colon: paris, paris: eos, lima: paris}, sp.vocab_size())
    cases = [({"prompt": "Answer:", "response": "Paris"}, True),     # greedy gives Paris, then EOS
             ({"prompt": "Answer:", "response": "Lima"}, False),     # wrong answer
             ({"prompt": "Answer:", "response": "Paris Paris"}, False),  # stops too early
             ({"prompt": "Answer: Lima", "response": "Paris"}, True)]
    for example, expected in cases:
        assert score(model, [example], sp) == {"exact": float(expected), "answer": float(expected)}, example
    assert score(model, [c for c, _ in cases], sp) == {"exact": 0.5, "answer": 0.5}
    # The right answer, but the model goes on: "Paris Lima ..." is an answer match, not an exact one.
    goes_on = BigramModel({colon: paris, paris: lima}, sp.vocab_size())
    assert score(goes_on, [cases[0][0]], sp) == {"exact": 0.0, "answer": 1.0}
    # "Paris" followed by a piece that continues the word is a different word: no match at all.
    inside_word = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).isalpha() and i > 3)
    glued = BigramModel({colon: paris, paris: inside_word}, sp.vocab_size())
    assert score(glued, [cases[0][0]], sp) == {"exact": 0.0, "answer": 0.0}


def test_read_examples_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_examples(str(path))
    path.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected"):
        read_examples(str(path))
    path.write_text('{"instruction": "Add", "input": "1 1", "output": "2"}\n')
    assert read_examples(str(path)) == [{"prompt": "Add\n1 1", "response": "2"}]


def test_tiny_end_to_end_run_writes_every_file(tmp_path):
    out = tmp_path / "out"
    result = run("train.py", "--out_dir", out, *TINY, "--pretrain_steps", "3", "--finetune_steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("base.pt", "finetuned.pt", "ffn_snapshot.pt", "tokenizer.model", "results.json",
                 "data/pretrain.txt", "data/finetune_ood.jsonl", "data/ood_test.jsonl"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    report = json.loads((out / "results.json").read_text())
    assert set(report) >= {"results", "exact_match", "seed", "seconds", "config"} and report["seed"] == 0
    assert {"ood_test", "knowledge", "ft_only_facts"} <= set(report["results"])
    for row in report["results"].values():
        assert set(row) == {"base", "vanilla", "taia", "taif"}
        assert all(0.0 <= acc <= 1.0 for acc in row.values())
    assert "pretrain step 3/3" in result.stdout + result.stderr

    # infer.py rebuilds a mode from those files and evaluates several side by side.
    result = run("infer.py", "--out_dir", out, "--modes", "base,taia", "--eval", out / "data/knowledge.jsonl",
                 "--prompt", "Instruction: city for Kalo? Response:", "--json", tmp_path / "infer.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "infer.json").read_text())["results"]["answer"]["knowledge"]["taia"] == \
        report["results"]["knowledge"]["taia"]
    # With several modes, the prompt is answered by each, one line per mode.
    answers = [line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("    ")]
    assert answers == ["base", "taia"], result.stdout

    # Mode auto picks a grid point on the dev set and writes it down; the grid's TAIA corner scores as TAIA.
    result = run("infer.py", "--out_dir", out, "--modes", "taia,auto", "--dev", out / "data/ood_val.jsonl",
                 "--eval", out / "data/knowledge.jsonl", "--json", tmp_path / "auto.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    choice = json.loads((out / "auto.json").read_text())
    assert choice["weights"]["attention"] in GRID and choice["weights"]["ffn"] in GRID
    assert choice["dev"] == str(out / "data/ood_val.jsonl") and 0 <= choice["dev_answer_match"] <= 1
    # train.py's eval stage chooses on the toy world's ood_val by default, and reports auto beside the rest.
    result = run("train.py", "--out_dir", out, *TINY, "--stage", "eval", "--modes", "taia,auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert set(json.loads((out / "results.json").read_text())["results"]["ood_test"]) == {"taia", "auto"}
    assert json.loads((out / "auto.json").read_text())["dev"] == str(out / "data/ood_val.jsonl")
    result = run("experiments/grid.py", "--out_dir", out, "--eval", out / "data/knowledge.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    taia_row = result.stdout.splitlines()[2 + GRID.index(1.0)].split()
    assert float(taia_row[0]) == 1.0 and len(taia_row) == 1 + len(GRID)
    assert float(taia_row[1]) == round(100 * report["results"]["knowledge"]["taia"], 1)


def test_summary_over_seeds_gives_mean_std_and_paired_difference():
    sys.path.insert(0, str(ROOT / "experiments"))
    from lab import summarise
    reports = [{"results": {"ood_test": {"vanilla": v, "taia": t}}} for v, t in ((0.2, 0.5), (0.4, 0.3))]
    row = summarise(reports).splitlines()[1].split()
    # vanilla 30 +/- 14.1, taia 40 +/- 14.1 (sample std), differences +30 and -10: mean +10 +/- 28.3, TAIA ahead in 1 of 2
    assert row == ["ood_test", "30.0", "+/-", "14.1", "40.0", "+/-", "14.1", "+10.0", "+/-", "28.3", "(1/2)"]
