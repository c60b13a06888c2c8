"""TAIA on Hugging Face families other than our own model: taia.GROUP_TABLE places every tensor of tiny
random models built from transformers' own configs (no download), and taia_hf.py turns a base + full
fine-tune, or a base + PEFT LoRA adapter, into a TAIA directory that transformers loads."""
import json
import shutil

import pytest
import torch

import taia
from helpers import assert_one_line_error, needs_transformers, run, run_here, transformers

pytestmark = needs_transformers

# family -> (config class, its size arguments, the attention and FFN tensors of one block, from the
# layer's own module path): written out here, independently of taia.GROUP_TABLE.
LLAMA_LIKE = {"attention": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                            "self_attn.o_proj.weight"),
              "ffn": ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
GQA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
           eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", GQA, LLAMA_LIKE),
    "mistral": ("MistralConfig", GQA, LLAMA_LIKE),
    "qwen2": ("Qwen2Config", GQA, {"attention": LLAMA_LIKE["attention"] + ("self_attn.q_proj.bias",
                                   "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "ffn": LLAMA_LIKE["ffn"]}),
    "qwen3": ("Qwen3Config", GQA, LLAMA_LIKE),
    "gemma2": ("Gemma2Config", GQA, LLAMA_LIKE),
    "phi3": ("Phi3Config", GQA, {"attention": ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight"),
                                 "ffn": ("mlp.gate_up_proj.weight", "mlp.down_proj.weight")}),
    "olmo2": ("Olmo2Config", GQA, LLAMA_LIKE),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                       bos_token_id=1, eos_token_id=2),
                 {"attention": ("attention.query_key_value.weight", "attention.query_key_value.bias",
                                "attention.dense.weight", "attention.dense.bias"),
                  "ffn": ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                          "mlp.dense_4h_to_h.bias")}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1,
                                eos_token_id=2),
             {"attention": ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias"),
              "ffn": ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}),
}
TOKENS = torch.tensor([[1, 5, 17, 42, 99, 3, 8, 64]])


def build(family: str, seed: int = 0):
    config_class, sizes, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**sizes))
    with torch.no_grad():  # some families initialise norms to 1 and biases to 0: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def blocks(model):
    """The list of decoder blocks, where each family keeps it."""
    inner = getattr(model, "model", None) or getattr(model, "gpt_neox", None) or model.transformer
    return inner.layers if hasattr(inner, "layers") else inner.h


def fine_tune(model):
    """Stand-in for full fine-tuning: every parameter moves."""
    tuned = build_like(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tuned


def build_like(model):
    copy = transformers.AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def logits(model_or_dir):
    model = model_or_dir if isinstance(model_or_dir, torch.nn.Module) else \
        transformers.AutoModelForCausalLM.from_pretrained(model_or_dir).eval()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_has_one_group_and_each_block_its_attention_and_ffn(family):
    model = build(family)
    names = list(model.state_dict())
    groups = {name: taia.group_of(name) for name in names}  # raises for a name the table does not know
    expected = FAMILIES[family][2]
    for i, block in enumerate(blocks(model)):
        prefix = next(n for n in names if n.endswith(f".{i}.{expected['ffn'][0]}"))[:-len(expected["ffn"][0])]
        for group in ("attention", "ffn"):
            assert {n for n in names if n.startswith(prefix) and groups[n] == group} == \
                   {prefix + leaf for leaf in expected[group]}, (family, group)
    # Outside the blocks' projections: only norms, embeddings (tokens and GPT-2's positions) and a head.
    outside = {groups[n] for n in names if groups[n] not in ("attention", "ffn")}
    assert outside == {"norm", "embedding", "head"}


def test_unknown_tensor_names_are_an_error_not_a_default():
    for name in ("model.layers.0.block_sparse_moe.gate.weight", "transformer.h.0.attn.masked_bias",
                 "model.layers.0.mlp.up_proj.lora_A.weight"):
        with pytest.raises(ValueError, match="GROUP_TABLE"):
            taia.group_of(name)


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_full_writes_the_taia_model_transformers_loads(family, tmp_path):
    base = build(family)
    tuned = fine_tune(base)
    # Shard one family (a few KB per file) to check that the output is sharded like the input.
    shard = {"max_shard_size": "20KB"} if family == "llama" else {}
    save(base, tmp_path / "base", **shard)
    save(tuned, tmp_path / "tuned")
    (tmp_path / "tuned" / "tokenizer_config.json").write_text('{"note": "the tuned model\'s"}')
    result = run_here("taia_hf.py", "full", tmp_path / "base", tmp_path / "tuned", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "ffn" in result.stdout and "attention" in result.stdout

    # By hand: the tuned model with every block's FFN module put back from the base.
    by_hand = build_like(tuned)
    for block, base_block in zip(blocks(by_hand), blocks(base)):
        block.mlp.load_state_dict(base_block.mlp.state_dict())
    taia_logits = logits(tmp_path / "out")
    assert torch.equal(taia_logits, logits(by_hand))
    assert not torch.allclose(taia_logits, logits(tuned)) and not torch.allclose(taia_logits, logits(base))
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"note": "the tuned model\'s"}'
    assert [f for f in out_files if "safetensors" in f] == \
           sorted(p.name for p in (tmp_path / "base").iterdir() if "safetensors" in p.name)
    if shard:
        assert len([f for f in out_files if f.endswith(".safetensors")]) > 1


def test_full_modes_and_weights_are_taias_own(tmp_path):
    """--mode and --weights give what taia.interpolate gives on the same state dicts."""
    from safetensors.torch import load_file
    base = build("qwen2")
    tuned = fine_tune(base)
    save(base, tmp_path / "base")
    save(tuned, tmp_path / "tuned")
    base_state, tuned_state = load_file(tmp_path / "base" / "model.safetensors"), \
        load_file(tmp_path / "tuned" / "model.safetensors")
    for flags, weights in ((["--mode", "taif", "--others", "base"], taia.mode_weights("taif", "base")),
                           (["--weights", "attention=0.5,ffn=0.25"], {"attention": 0.5, "ffn": 0.25})):
        out = tmp_path / flags[1]
        result = run_here("taia_hf.py", "full", tmp_path / "base", tmp_path / "tuned", out, *flags)
        assert result.returncode == 0, result.stderr
        expected = taia.interpolate(base_state, tuned_state, weights)
        written = load_file(out / "model.safetensors")
        assert set(written) == set(expected)
        for name in expected:
            assert torch.equal(written[name], expected[name]), name


@pytest.mark.parametrize("family,rslora", [("llama", False), ("llama", True), ("qwen2", False),
                                           ("qwen2", True), ("gpt2", False)])
def test_lora_equals_peft_reloaded_with_attention_targets_and_merged(family, rslora, tmp_path):
    peft = pytest.importorskip("peft")
    base = build(family)
    save(base, tmp_path / "base")
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"] if family != "gpt2" else r".*\.attn\.(c_attn|c_proj)"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=rslora,
                             fan_in_fan_out=family == "gpt2")
    adapted = peft.get_peft_model(build_like(base), config)
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: B is no longer zero
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    adapted.save_pretrained(tmp_path / "adapter")
    result = run_here("taia_hf.py", "lora", tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert result.returncode == 0, result.stderr

    # PEFT's own route (the authors'): reload the adapter with attention targets only, then merge.
    attention_only = tmp_path / "attention_only"
    shutil.copytree(tmp_path / "adapter", attention_only)
    adapter_config = json.loads((attention_only / "adapter_config.json").read_text())
    (attention_only / "adapter_config.json").write_text(json.dumps({**adapter_config, "target_modules": attention}))
    reference = peft.PeftModel.from_pretrained(build_like(base), attention_only).merge_and_unload()
    for block, base_block in zip(blocks(reference), blocks(base)):  # the reference itself kept the base FFN
        assert all(torch.equal(a, b) for a, b in zip(block.mlp.parameters(), base_block.mlp.parameters()))
    ours = logits(tmp_path / "out")
    assert (ours - logits(reference)).abs().max() <= 1e-6
    assert (ours - logits(base)).abs().max() > 1e-3  # the attention adapters did change the model


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad")
    base = build("llama")
    save(base, path / "base")
    save(fine_tune(base), path / "tuned")
    save(build("qwen2"), path / "other")
    return path


def refused_cases(dirs, tmp_path):
    """(arguments, expected words) of bad inputs; every case writes its own OUT_DIR, tmp_path/out_<i>."""
    from safetensors.torch import load_file, save_file
    broken = shutil.copytree(dirs / "tuned", tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cases = [(("full", dirs / "base", dirs / "other"), "not the same architecture"),
             (("full", dirs / "base", broken), "not a readable safetensors file"),
             (("full", dirs / "base", no_weights), "only safetensors are read"),
             (("full", dirs / "base", dirs / "tuned", "--weights", "experts=1"), "unknown groups")]
    state = load_file(dirs / "tuned" / "model.safetensors")
    for name, changed, expected in (("shape", {**state, "model.norm.weight": torch.ones(3)}, "[3] in TUNED_DIR"),
                                    ("group", {**state, "model.layers.0.mlp.router.weight": torch.ones(3)},
                                     "cannot tell which group"),
                                    ("int32", {**state, "model.norm.weight": state["model.norm.weight"].int()},
                                     "model.norm.weight in model.safetensors is I32: only floating-point")):
        bad = shutil.copytree(dirs / "tuned", tmp_path / name)
        save_file(changed, bad / "model.safetensors", metadata={"format": "pt"})
        cases.append((("full", dirs / "base", bad), expected))
    # A download cut short, an empty file, a header without the tensors after it; JSON of the wrong shape.
    raw = (dirs / "tuned" / "model.safetensors").read_bytes()
    header_only = raw[:8 + int.from_bytes(raw[:8], "little")]
    for name, file, content, expected in (
            ("truncated", "model.safetensors", raw[:len(raw) // 2], "model.safetensors is not a readable safetensors"),
            ("empty", "model.safetensors", b"", "model.safetensors is not a readable safetensors"),
            ("header_only", "model.safetensors", header_only, "model.safetensors is not a readable safetensors"),
            ("config_list", "config.json", b"[]", "config.json does not hold a JSON object"),
            ("index_list", "model.safetensors.index.json", b"[]", "index.json does not hold a JSON object"),
            ("weight_map_list", "model.safetensors.index.json", b'{"weight_map": []}', "has no weight_map")):
        bad = shutil.copytree(dirs / "tuned", tmp_path / name)
        (bad / file).write_bytes(content)
        cases.append((("full", dirs / "base", bad), expected))

    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    a, b = (f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB")
    good = {a: torch.ones(2, 32), b: torch.ones(32, 2)}
    for i, (adapter_config, tensors, expected) in enumerate((
            ({**config, "use_dora": True}, good, "use_dora"),
            ({**config, "target_modules": ["k_proj"]}, good, "not in target_modules"),
            (config, {a: torch.ones(3, 32), b: torch.ones(32, 3)}, "do not fit r = 2"),
            (config, {**good, "base_model.model.lm_head.weight": torch.ones(100, 32)}, "not a LoRA matrix"),
            (config, {a: torch.ones(2, 32, dtype=torch.int32), b: torch.ones(32, 2)}, "lora_A.weight in "
             "adapter_model.safetensors is I32"),
            ("{not json", good, "not valid JSON"))):
        adapter = tmp_path / f"adapter_{i}"
        adapter.mkdir()
        text = adapter_config if isinstance(adapter_config, str) else json.dumps(adapter_config)
        (adapter / "adapter_config.json").write_text(text)
        save_file(tensors, adapter / "adapter_model.safetensors")
        cases.append((("lora", dirs / "base", adapter), expected))
    return cases


def test_bad_input_is_one_line_and_writes_nothing(dirs, tmp_path):
    cases = [((*args[:3], tmp_path / f"out_{i}", *args[3:]), expected)
             for i, (args, expected) in enumerate(refused_cases(dirs, tmp_path))]
    cases += [(("full", dirs / "base", dirs / "tuned", dirs / "base"), "one of the input directories"),
              (("full", dirs / "base", dirs / "tuned", dirs), "not empty")]
    # The first case through the real program; the others through its main() in this process (helpers.run_here):
    # each would be mostly the second it takes to import torch.
    for i, (args, expected) in enumerate(cases):
        assert_one_line_error(run("taia_hf.py", *args) if i == 0 else run_here("taia_hf.py", *args), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out_", ".taia_hf"))]
    assert sorted(p.name for p in dirs.iterdir()) == ["base", "other", "tuned"]
