"""taia_hf.py against the inputs issue 30 found it got wrong: a shard index that names files outside its
folder, PEFT adapters whose merge is more than W + B A * scale (PiSSA-style inits, aLoRA), fan_in_fan_out
decided per layer type, an adapter on the output head, adapter files beside the model, overflowing
numbers, a tied head, layers_to_transform. Each result either equals PEFT's own merge, or is one line and
exit status 2 with nothing written. Tiny random models built from transformers' configs, offline."""
import hashlib
import json
import shutil

import pytest
import torch

from helpers import assert_one_line_error, needs_transformers, run_here, transformers
from test_hf_families import FAMILIES, build_like, logits, save

pytestmark = needs_transformers


def tiny(family: str, **config):
    """A random model of the family, with every tensor distinct; `config` overrides its sizes' defaults."""
    config_class, sizes, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**{**sizes, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def trained_adapter(base, path, **lora):
    """A PEFT LoRA adapter of `base` saved in `path`, as if trained (B no longer zero)."""
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(build_like(base), peft.LoraConfig(r=4, lora_alpha=8, **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    adapted.save_pretrained(path, save_embedding_layers=False)  # LoRA matrices only, also for lm_head
    return path


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return adapter


def peft_merged(base, adapter, tmp_path, **changes):
    """PEFT's own route: reload the adapter (a copy, its config changed as given) on the base, then merge."""
    peft = pytest.importorskip("peft")
    copy = edit_config(shutil.copytree(adapter, tmp_path / f"reference_{len(list(tmp_path.iterdir()))}"), **changes)
    return peft.PeftModel.from_pretrained(build_like(base), copy).merge_and_unload().eval()


def assert_same_model(out_dir, reference, base):
    ours = logits(out_dir)
    assert (ours - logits(reference)).abs().max() <= 1e-6
    assert (ours - logits(base)).abs().max() > 1e-3  # the merged deltas did change the model


# ---- results that must equal PEFT's ----------------------------------------------------------------

def test_fan_in_fan_out_is_decided_per_layer_type_as_peft_does(tmp_path):
    """Issue 30 case 5. GPT-2's attention projections are Conv1D (stored (in, out)), its untied head a
    Linear: PEFT transposes the delta of the first only, and writes the flag of the last layer it adapted
    (the head's: false). A Llama adapter whose config says fan_in_fan_out=true: every layer is a Linear,
    PEFT transposes nothing (square q_proj and o_proj would take a transposed delta without a shape error)."""
    gpt2 = tiny("gpt2", tie_word_embeddings=False)
    save(gpt2, tmp_path / "gpt2")
    adapter = trained_adapter(gpt2, tmp_path / "gpt2_adapter", target_modules=r".*(attn\.c_proj|lm_head)",
                              fan_in_fan_out=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    result = run_here("taia_hf.py", "lora", tmp_path / "gpt2", adapter, tmp_path / "gpt2_out", "--mode", "vanilla")
    assert result.returncode == 0, result.stderr
    assert_same_model(tmp_path / "gpt2_out", peft_merged(gpt2, adapter, tmp_path), gpt2)

    llama = tiny("llama")
    save(llama, tmp_path / "llama")
    adapter = edit_config(trained_adapter(llama, tmp_path / "llama_adapter",
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          fan_in_fan_out=True)
    result = run_here("taia_hf.py", "lora", tmp_path / "llama", adapter, tmp_path / "llama_out")
    assert result.returncode == 0, result.stderr
    assert_same_model(tmp_path / "llama_out", peft_merged(llama, adapter, tmp_path), llama)


def test_head_adapter_is_merged_only_when_asked(tmp_path):
    """Issue 30 case 7. The default (mode taia) is the authors' route: only the attention deltas, here
    q_proj's, and the printed line says so; the head's delta goes in only with an explicit --weights."""
    base = tiny("llama")
    save(base, tmp_path / "base")
    adapter = trained_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    result = run_here("taia_hf.py", "lora", tmp_path / "base", adapter, tmp_path / "taia")
    assert result.returncode == 0, result.stderr
    assert "merged 2 LoRA deltas (attention: q_proj x2)" in result.stdout, result.stdout
    assert "dropped 1 (head: lm_head x1)" in result.stdout, result.stdout
    assert_same_model(tmp_path / "taia", peft_merged(base, adapter, tmp_path, target_modules=["q_proj"]), base)

    result = run_here("taia_hf.py", "lora", tmp_path / "base", adapter, tmp_path / "with_head", "--weights", "head=1")
    assert result.returncode == 0, result.stderr
    assert "(attention: q_proj x2; head: lm_head x1)" in result.stdout, result.stdout
    assert_same_model(tmp_path / "with_head", peft_merged(base, adapter, tmp_path), base)


def test_adapter_files_beside_the_model_are_not_copied_into_out(tmp_path):
    """Issue 30 case 8. An adapter saved into the base's own folder (`lora B B OUT`), or a TUNED_DIR that
    holds an adapter_config.json: OUT_DIR must not get it, or transformers reads OUT_DIR as an adapter."""
    base = tiny("llama")
    save(base, tmp_path / "base")
    trained_adapter(base, tmp_path / "base", target_modules=["q_proj", "v_proj", "up_proj"])
    result = run_here("taia_hf.py", "lora", tmp_path / "base", tmp_path / "base", tmp_path / "lora_out")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "lora_out" / "adapter_config.json").exists()
    reference = peft_merged(base, tmp_path / "base", tmp_path, target_modules=["q_proj", "v_proj"])
    assert_same_model(tmp_path / "lora_out", reference, base)  # transformers loads it as a model

    result = run_here("taia_hf.py", "full", tmp_path / "base", tmp_path / "base", tmp_path / "full_out")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "full_out" / "adapter_config.json").exists()
    assert torch.equal(logits(tmp_path / "full_out"), logits(base))


def test_layers_to_transform_is_honoured_when_the_file_agrees(tmp_path):
    """Issue 30 case 14, the good half (the bad half is a refused case below): an adapter of layer 0 only
    merges as PEFT merges it."""
    base = tiny("llama")
    save(base, tmp_path / "base")
    adapter = trained_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "o_proj"], layers_to_transform=[0])
    result = run_here("taia_hf.py", "lora", tmp_path / "base", adapter, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "merged 2 LoRA deltas (attention: o_proj x1, q_proj x1)" in result.stdout, result.stdout
    assert_same_model(tmp_path / "out", peft_merged(base, adapter, tmp_path), base)


# ---- refused: one line, exit 2, nothing written, no input touched ----------------------------------------

Q_PROJ = {f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{x}.weight": torch.full(shape, 0.1)
          for layer in (0, 1) for x, shape in (("A", (2, 32)), ("B", (32, 2)))}
LAYER_0 = {k: v for k, v in Q_PROJ.items() if ".layers.0." in k}
ADAPTER = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def write_adapter(path, config, tensors=LAYER_0):
    from safetensors.torch import save_file
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))  # float("nan") is written NaN, as Python reads it
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def shard_outside(root, name, tuned, absolute):
    """A sharded base whose index names one shard by a path outside its folder (transformers loads it)."""
    base = root / name
    save(tuned, base, max_shard_size="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (root / f"{name}_elsewhere").mkdir()
    moved = (base / shard).rename(root / f"{name}_elsewhere" / shard)
    where = str(moved) if absolute else f"../{name}_elsewhere/{shard}"
    index["weight_map"] = {k: where if v == shard else v for k, v in index["weight_map"].items()}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    return base


REFUSED = {  # case: (arguments after the command, words the error must hold)
    "1 shard outside BASE_DIR, relative": (("full", "outside_relative", "tuned_sharded"), "outside"),
    "1 shard outside BASE_DIR, absolute": (("full", "outside_absolute", "tuned_sharded"), "outside"),
    "1 shard outside BASE_DIR, lora": (("lora", "outside_relative", "adapter_plain"), "outside"),
    "4 pissa": (("lora", "base", "adapter_pissa"), "init_lora_weights = 'pissa'"),
    "4 pissa_niter": (("lora", "base", "adapter_pissa_niter_4"), "init_lora_weights = 'pissa_niter_4'"),
    "4 olora": (("lora", "base", "adapter_olora"), "init_lora_weights = 'olora'"),
    "4 corda": (("lora", "base", "adapter_corda"), "init_lora_weights = 'corda'"),
    "4 loftq": (("lora", "base", "adapter_loftq"), "init_lora_weights = 'loftq'"),
    "6 alora": (("lora", "base", "adapter_alora"), "alora_invocation_tokens"),
    "9 lora_alpha NaN": (("lora", "base", "adapter_alpha_nan"), "lora_alpha"),
    "9 lora_alpha 1e308": (("lora", "base", "adapter_alpha_huge"), "not finite"),
    "9 full --weights 1e300": (("full", "base", "tuned", "--weights", "attention=1e300"), "not finite"),
    "9 lora --weights 1e300": (("lora", "base", "adapter_plain", "--weights", "attention=1e300"), "not finite"),
    "10 tied, embedding=0,head=1": (("full", "tied", "tied_tuned", "--weights", "embedding=0,head=1"), "tied"),
    "10 tied, embedding=0": (("full", "tied", "tied_tuned", "--weights", "embedding=0"), "tied"),
    "14 layers_to_transform": (("lora", "base", "adapter_layer_0_of_2"), "layers_to_transform"),
    "14 exclude_modules": (("lora", "base", "adapter_excluded"), "exclude_modules"),
    "a group given twice": (("full", "base", "tuned", "--weights", "attention=1,attention=0"), "given twice"),
    "--mode and --weights": (("full", "base", "tuned", "--mode", "taif", "--weights", "ffn=1"), "not both"),
}
PRE_MADE_OUT = {"9 full --weights 1e300"}  # OUT_DIR exists and is empty before: it must stay so


def out_dir(root, case):
    return root / f"out_{list(REFUSED).index(case)}"


def digests(root) -> dict:
    """{input folder: {file: sha256}} for every folder under root but the outputs."""
    return {folder.name: {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(folder.rglob("*")) if p.is_file()}
            for folder in root.iterdir() if not folder.name.startswith(("out_", ".taia_hf"))}


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Every case of REFUSED run once (in this process: helpers.run_here): root, {case: the finished program},
    the input folders' files before and after."""
    root = tmp_path_factory.mktemp("refused")
    base, tied = tiny("llama"), tiny("llama", tie_word_embeddings=True)
    tuned = build_like(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save(base, root / "base")
    save(tuned, root / "tuned")
    save(tuned, root / "tuned_sharded", max_shard_size="20KB")
    save(tied, root / "tied")
    save(build_like(tied), root / "tied_tuned")
    shard_outside(root, "outside_relative", base, absolute=False)
    shard_outside(root, "outside_absolute", base, absolute=True)
    write_adapter(root / "adapter_plain", ADAPTER)
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq"):
        write_adapter(root / f"adapter_{init}", {**ADAPTER, "init_lora_weights": init})
    write_adapter(root / "adapter_alora", {**ADAPTER, "alora_invocation_tokens": [5, 6]})
    write_adapter(root / "adapter_alpha_nan", {**ADAPTER, "lora_alpha": float("nan")})
    write_adapter(root / "adapter_alpha_huge", {**ADAPTER, "lora_alpha": 1e308})
    write_adapter(root / "adapter_layer_0_of_2", {**ADAPTER, "layers_to_transform": [0]}, Q_PROJ)
    write_adapter(root / "adapter_excluded", {**ADAPTER, "exclude_modules": ["model.layers.1.self_attn.q_proj"]},
                  Q_PROJ)
    before = digests(root)
    for case in PRE_MADE_OUT:
        out_dir(root, case).mkdir()
    results = {case: run_here("taia_hf.py", command, root / a, root / b, out_dir(root, case), *flags)
               for case, ((command, a, b, *flags), _) in REFUSED.items()}
    return root, results, before, digests(root)


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_one_line_and_nothing_written(refused, case):
    root, results, before, after = refused
    assert_one_line_error(results[case], REFUSED[case][1])
    out = out_dir(root, case)
    assert (out.is_dir() and not any(out.iterdir())) if case in PRE_MADE_OUT else not out.exists()
    assert not list(root.glob(".taia_hf*"))
    _, a, b, *_ = REFUSED[case][0]
    for folder in (a, b, f"{a}_elsewhere"):  # every input file (a shard outside its folder too) as it was
        assert after.get(folder) == before.get(folder), folder
