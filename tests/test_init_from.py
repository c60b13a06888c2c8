"""train.py --init_from on a Hugging Face Llama directory, as people point it at Llama-2 or TinyLlama:
here a tiny random LlamaForCausalLM with a sentencepiece tokenizer.model trained in the test."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from data.text import load_tokenizer, train_tokenizer
from helpers import assert_one_line_error, needs_transformers, run, transformers
from infer import FinishedRun, generate_text
from model import hf_to_ours

pytestmark = needs_transformers  # every test here builds its checkpoint with transformers
TEXT = ["the river city of Alder sits on the Kell", "Alder trades salt and copper with the hill towns",
        "the hill towns of Brena speak an old tongue", "copper from Brena goes down the Kell to Alder"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """config.json + model.safetensors from transformers, and a tokenizer.model whose ids match the vocab."""
    path = tmp_path_factory.mktemp("tiny-llama")
    train_tokenizer(TEXT * 20, str(path / "tokenizer.model"), vocab_size=320)
    vocab = load_tokenizer(str(path / "tokenizer.model")).vocab_size()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Where does {a} go?", "response": b} for a, b in
            (("copper", "to Alder"), ("salt", "to Brena"), ("the Kell", "past Alder"))]
    return {"finetune": write_jsonl(path / "ft.jsonl", rows * 4),
            "eval": write_jsonl(path / "ev.jsonl", [{"instruction": "Where does copper go?", "output": "to Alder"}])}


def test_finetune_a_hugging_face_llama_directory_and_evaluate_it_with_infer(llama_dir, data, tmp_path):
    out = tmp_path / "out"
    result = run("train.py", "--init_from", llama_dir, "--out_dir", out, "--finetune", data["finetune"],
                 "--eval", data["eval"], "--finetune_steps", "3", "--finetune_batch", "4", "--micro_batch", "2",
                 "--log_interval", "1", "--template", "Q: {prompt}\\nA:")
    assert result.returncode == 0, result.stderr
    assert "finetune step 3/3" in result.stdout
    # The base stays in the Hugging Face directory: no copy of it, no toy world, no pretraining.
    assert sorted(p.name for p in out.iterdir()) == ["ffn_snapshot.pt", "finetuned.pt", "results.json",
                                                     "tokenizer.model"]
    tuned = torch.load(out / "finetuned.pt", weights_only=True)
    assert tuned["init_from"] == str(llama_dir) and tuned["finetune"]["template"] == "Q: {prompt}\nA:"
    # The snapshot is exactly the checkpoint's MLP weights, and fine-tuning changed them.
    from safetensors.torch import load_file
    hf = {hf_to_ours(k): v for k, v in load_file(llama_dir / "model.safetensors").items()}
    snapshot = torch.load(out / "ffn_snapshot.pt", weights_only=True)["ffn"]
    assert set(snapshot) == {k for k in hf if ".ffn." in k}
    assert all(torch.equal(snapshot[k], hf[k]) for k in snapshot)
    assert any(not torch.equal(tuned["model"][k], hf[k]) for k in snapshot)

    report = json.loads((out / "results.json").read_text())
    result = run("infer.py", "--out_dir", out, "--eval", data["eval"], "--json", tmp_path / "infer.json",
                 "--prompt", "Where does salt go?")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "infer.json").read_text())["results"]["answer"] == report["results"]
    # infer.py wraps a prompt in the fine-tuning template, as training did.
    finished = FinishedRun(str(out))
    expected = generate_text(finished.build("taia"), finished.sp, "Where does salt go?", 32, template="Q: {prompt}\nA:")
    assert finished.template == "Q: {prompt}\nA:" and f"taia: {expected}\n" in result.stdout

    # The directory moved: infer.py says so, and --init_from points at its new place.
    moved = Path(shutil.copytree(llama_dir, tmp_path / "moved"))
    assert run("infer.py", "--out_dir", out, "--init_from", moved, "--prompt", "salt").returncode == 0


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "tokenizer.model").unlink(), "has no tokenizer.model"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})), "not a Llama checkpoint"),
    (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda d: shutil.rmtree(d), "no such directory"),
    # A download cut short, and an index that names a shard that is not there.
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]), "broken"),
    (lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))), "No such file"),
])
def test_a_directory_that_is_not_a_llama_with_a_tokenizer_gets_a_one_line_error(llama_dir, data, tmp_path, damage,
                                                                                 expected):
    broken = Path(shutil.copytree(llama_dir, tmp_path / "broken"))
    damage(broken)
    result = run("train.py", "--init_from", broken, "--out_dir", tmp_path / "out", "--finetune", data["finetune"],
                 "--eval", data["eval"], "--finetune_steps", "1")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out" / "finetuned.pt").exists()


def test_a_vocabulary_mismatch_between_tokenizer_and_checkpoint_is_refused(llama_dir, data, tmp_path):
    other = Path(shutil.copytree(llama_dir, tmp_path / "other"))
    train_tokenizer(TEXT * 20, str(other / "tokenizer.model"), vocab_size=300)
    result = run("train.py", "--init_from", other, "--out_dir", tmp_path / "out", "--finetune", data["finetune"],
                 "--eval", data["eval"])
    assert_one_line_error(result, "do not belong together")
