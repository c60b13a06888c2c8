"""train.py --init_from on a Hugging Face Llama directory, as people point it at Llama-2 or TinyLlama:
here a tiny random LlamaForCausalLM with a sentencepiece tokenizer.model trained in the test."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from data.text import load_tokenizer, train_tokenizer
from helpers import assert_one_line_error, needs_transformers, run, run_here, transformers
from infer import FinishedRun, generate_text
from checkpoints.hf import hf_to_ours, load_hf_llama

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
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "ffn_snapshot.pt", "finetuned.pt", "results.json", "tokenizer.model"]
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
    result = run_here("infer.py", "--out_dir", out, "--eval", data["eval"], "--json", tmp_path / "infer.json",
                      "--prompt", "Where does salt go?")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "infer.json").read_text())["results"]["answer"] == report["results"]
    # infer.py wraps a prompt in the fine-tuning template, as training did.
    finished = FinishedRun(str(out))
    expected = generate_text(finished.build("taia"), finished.sp, "Where does salt go?", 32, template="Q: {prompt}\nA:")
    assert finished.template == "Q: {prompt}\nA:" and f"taia: {expected}\n" in result.stdout

    # The directory moved: infer.py says so, and --init_from points at its new place.
    moved = Path(shutil.copytree(llama_dir, tmp_path / "moved"))
    assert run_here("infer.py", "--out_dir", out, "--init_from", moved, "--prompt", "salt").returncode == 0


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "tokenizer.model").unlink(), "has no tokenizer.model"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})), "not a Llama checkpoint"),
    (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda d: shutil.rmtree(d), "no such directory"),
    # A download cut short, and an index that names a shard that is not there.
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
     "model.safetensors is not a readable safetensors file"),
    (lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))),
     "model-00001-of-00002.safetensors is missing"),
])
def test_a_directory_that_is_not_a_llama_with_a_tokenizer_gets_a_one_line_error(llama_dir, data, tmp_path, damage,
                                                                                 expected):
    broken = Path(shutil.copytree(llama_dir, tmp_path / "broken"))
    damage(broken)
    result = run_here("train.py", "--init_from", broken, "--out_dir", tmp_path / "out", "--finetune", data["finetune"],
                      "--eval", data["eval"], "--finetune_steps", "1")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out" / "finetuned.pt").exists()


def test_a_vocabulary_mismatch_between_tokenizer_and_checkpoint_is_refused(llama_dir, data, tmp_path):
    other = Path(shutil.copytree(llama_dir, tmp_path / "other"))
    train_tokenizer(TEXT * 20, str(other / "tokenizer.model"), vocab_size=300)
    result = run_here("train.py", "--init_from", other, "--out_dir", tmp_path / "out", "--finetune", data["finetune"],
                      "--eval", data["eval"])
    assert_one_line_error(result, "do not belong together")


# ---- damaged directories: one line from every program that reads them --------------------------------

def edit_config(**changes):
    def damage(d: Path):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
    return damage


def edit_weights(change):
    """Rewrite model.safetensors with change(state) (HF names)."""
    def damage(d: Path):
        from safetensors.torch import load_file, save_file
        state = load_file(d / "model.safetensors")
        save_file(change(state), d / "model.safetensors", metadata={"format": "pt"})
    return damage


def edit_bytes(change):
    def damage(d: Path):
        path = d / "model.safetensors"
        path.write_bytes(change(path.read_bytes()))
    return damage


def header_only(raw: bytes) -> bytes:
    """A valid header (8 bytes of length, then JSON) and none of the tensors' bytes after it."""
    return raw[:8 + int.from_bytes(raw[:8], "little")]


def untied_head(state: dict) -> dict:
    return {**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}


NOT_SAFETENSORS = "model.safetensors is not a readable safetensors file"
DOES_NOT_DESCRIBE = "the config does not describe these weights"
DAMAGED = {  # name: (damage, expected words)
    "truncated": (edit_bytes(lambda raw: raw[:len(raw) // 2]), NOT_SAFETENSORS),  # a download cut short
    "zero bytes": (edit_bytes(lambda raw: b""), NOT_SAFETENSORS),
    "random bytes": (edit_bytes(lambda raw: bytes(range(256)) * 8), NOT_SAFETENSORS),
    "header only": (edit_bytes(header_only), NOT_SAFETENSORS),
    "hidden_size": (edit_config(hidden_size=48, head_dim=12), "model.embed_tokens.weight is [320, 32] in "
                    "model.safetensors, but config.json makes it [320, 48]: " + DOES_NOT_DESCRIBE),
    "intermediate_size": (edit_config(intermediate_size=65), "gate_proj.weight is [64, 32]"),
    "vocab_size": (edit_config(vocab_size=321), "makes it [321, 32]: " + DOES_NOT_DESCRIBE),
    "one tensor's shape": (edit_weights(lambda s: {**s, "model.norm.weight": torch.ones(33)}),
                           "model.norm.weight is [33] in model.safetensors, but config.json makes it [32]"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json does not hold a JSON object"),
    "index a list": (lambda d: (d / "model.safetensors.index.json").write_text("[]"),
                     "model.safetensors.index.json does not hold a JSON object"),
    "weight_map a list": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": []}'),
                          "has no weight_map of tensor name -> file"),
    "no heads": (edit_config(num_attention_heads=0), "num_attention_heads must be a positive integer, not 0"),
    "a string": (edit_config(hidden_size="32"), "hidden_size must be a positive integer, not '32'"),
    "negative": (edit_config(max_position_embeddings=-1), "max_position_embeddings must be a positive integer, not -1"),
    "a float": (edit_config(num_hidden_layers=2.0), "num_hidden_layers must be a positive integer, not 2.0"),
    "a bool": (edit_config(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    "int32 weights": (edit_weights(lambda s: {**s, "model.norm.weight": s["model.norm.weight"].to(torch.int32)}),
                      "model.norm.weight in model.safetensors is I32: only floating-point weights"),
    "tied, but a different head": (lambda d: (edit_weights(untied_head)(d), edit_config(tie_word_embeddings=True)(d)),
                                   "lm_head.weight differs from model.embed_tokens.weight"),
}


@pytest.fixture(scope="module")
def damaged(llama_dir, tmp_path_factory) -> dict:
    """{name: (a damaged copy of llama_dir, expected words)} for every case of DAMAGED."""
    root = tmp_path_factory.mktemp("damaged")
    cases = {}
    for i, (name, (damage, expected)) in enumerate(DAMAGED.items()):
        broken = Path(shutil.copytree(llama_dir, root / str(i)))
        damage(broken)
        cases[name] = broken, expected
    return cases


def assert_each_one_line(commands: dict):
    """Run {case: (program, *args)} and check each ends in one line: the first case through the real program,
    the others through its main() in this process (helpers.run_here), without a second of torch import each."""
    for i, (case, (args, expected)) in enumerate(commands.items()):
        result = run(*args) if i == 0 else run_here(*args)
        try:
            assert_one_line_error(result, expected)
        except AssertionError as e:
            raise AssertionError(f"case {case!r}: {e}") from None


def test_a_damaged_directory_is_one_line_for_train(damaged, data, tmp_path):
    assert_each_one_line({case: (("train.py", "--init_from", broken, "--out_dir", tmp_path / str(i),
                                  "--finetune", data["finetune"], "--eval", data["eval"], "--finetune_steps", "1"),
                                 expected)
                          for i, (case, (broken, expected)) in enumerate(damaged.items())})
    assert not list(tmp_path.glob("*/finetuned.pt"))


def test_a_damaged_directory_is_one_line_for_infer(llama_dir, damaged, data, tmp_path):
    out = tmp_path / "out"
    result = run_here("train.py", "--init_from", llama_dir, "--out_dir", out, "--finetune", data["finetune"],
                      "--eval", data["eval"], "--finetune_steps", "1", "--modes", "taia")
    assert result.returncode == 0, result.stderr
    assert_each_one_line({case: (("infer.py", "--out_dir", out, "--init_from", broken, "--prompt", "salt"), expected)
                          for case, (broken, expected) in damaged.items()})


def test_a_tied_head_stored_beside_its_embedding_is_accepted_if_equal(llama_dir, tmp_path):
    tied = Path(shutil.copytree(llama_dir, tmp_path / "tied"))
    edit_weights(lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"].clone()})(tied)
    edit_config(tie_word_embeddings=True)(tied)
    model = load_hf_llama(str(tied))
    from safetensors.torch import load_file
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, load_file(tied / "model.safetensors")["model.embed_tokens.weight"])


def test_bf16_weights_load_converted_into_a_model_of_its_own(tmp_path):
    """The lazy loader copies each tensor into a parameter it allocated: float32 values exactly the file's
    bf16 ones, in memory of the model's own (writing to it leaves the file as it was)."""
    from checkpoints.hf import save_hf
    from model import ModelConfig, Transformer
    from safetensors.torch import load_file
    torch.manual_seed(0)
    bf16 = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64,
                                   max_seq_len=16)).to(torch.bfloat16)
    save_hf(bf16, str(tmp_path))
    model = load_hf_llama(str(tmp_path))
    on_disk = {hf_to_ours(k): v.clone() for k, v in load_file(tmp_path / "model.safetensors").items()}
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: torch.float32 for k in on_disk}
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in on_disk.items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    again = load_hf_llama(str(tmp_path)).state_dict()
    assert all(torch.equal(again[k], v.float()) for k, v in on_disk.items())


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="the memory check reads Linux's MemAvailable")
def test_a_base_too_big_for_memory_is_refused_from_its_config_before_its_weights_are_read(llama_dir, data, tmp_path):
    huge = Path(shutil.copytree(llama_dir, tmp_path / "huge"))
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "intermediate_size": 10 ** 9}))
    result = run("train.py", "--init_from", huge, "--out_dir", tmp_path / "out", "--finetune", data["finetune"],
                 "--eval", data["eval"], "--finetune_steps", "1")
    assert_one_line_error(result, "GiB of memory; this machine has")
    assert "hidden_dim 1000000000" in result.stderr
