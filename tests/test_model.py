"""model.py against Hugging Face's LlamaForCausalLM (built from a tiny config, no download) and
against straightforward reference implementations."""
import json

import pytest
import torch

from checkpoints.hf import hf_to_ours, load_hf_llama, ours_to_hf, save_hf
from helpers import needs_transformers, transformers
from model import (KVCache, ModelConfig, StaticKVCache, Transformer, apply_rope, flops_per_token, param_groups,
                   static_cache_len)


def tiny_hf(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=101, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rms_norm_eps=1e-6)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so a mixed-up norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


@needs_transformers
@pytest.mark.parametrize("tie", [False, True])
def test_from_pretrained_matches_hf_logits_and_greedy_tokens(tmp_path, tie):
    hf = tiny_hf(tie)
    hf.save_pretrained(tmp_path)
    ours = load_hf_llama(str(tmp_path)).eval()
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.tie_embeddings == tie
    tokens = torch.randint(0, 101, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-4
    prompt = tokens[:1, :6]
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), expected)


@needs_transformers
@pytest.mark.parametrize("tie", [False, True])
def test_save_hf_loads_in_transformers(tmp_path, tie):
    torch.manual_seed(2)
    ours = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=77, hidden_dim=96,
                                   max_seq_len=32, tie_embeddings=tie)).eval()
    save_hf(ours, str(tmp_path))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = torch.randint(0, 77, (2, 15))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4
    assert not list(tmp_path.glob("*.tmp"))


@needs_transformers
def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf(tie=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf_llama(str(tmp_path))
    tokens = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-4


def test_from_pretrained_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a Llama"):
        load_hf_llama(str(tmp_path))


def test_hf_name_mapping_round_trips():
    ours = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=10, hidden_dim=64))
    for name in ours.state_dict():
        assert hf_to_ours(ours_to_hf(name)) == name
    assert ours_to_hf("blocks.1.ffn.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert ours_to_hf("norm.weight") == "model.norm.weight"


def test_rope_matches_pairwise_rotation_reference():
    """Half-split RoPE == rotating each pair (x[i], x[i + d/2]) by angle pos * theta^(-2i/d)."""
    torch.manual_seed(0)
    d, T, theta = 8, 5, 10000.0
    cfg = ModelConfig(dim=d, n_layers=1, n_heads=1, vocab_size=4, hidden_dim=8, max_seq_len=T, rope_theta=theta)
    model = Transformer(cfg)
    x = torch.randn(1, 1, T, d)
    got = apply_rope(x, model.rope_cos, model.rope_sin)
    want = torch.empty_like(x)
    for pos in range(T):
        for i in range(d // 2):
            angle = torch.tensor(pos * theta ** (-2 * i / d))
            a, b = x[0, 0, pos, i], x[0, 0, pos, i + d // 2]
            want[0, 0, pos, i] = a * angle.cos() - b * angle.sin()
            want[0, 0, pos, i + d // 2] = a * angle.sin() + b * angle.cos()
    assert torch.allclose(got, want, atol=1e-6)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64, max_seq_len=48)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def test_kv_cache_logits_match_full_recomputation():
    model = small_model()
    tokens = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, 2, 20)
        chunks = [model(tokens[:, :7], cache), model(tokens[:, 7:8], cache), model(tokens[:, 8:20], cache)]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_a_static_cache_gives_the_tokens_of_the_growing_one():
    """StaticKVCache (fixed shapes, a position tensor, masked attention over the whole buffer) is what the
    compiled decode step runs on; run eagerly through it, it must decode exactly as KVCache does."""
    model = small_model(seed=4)
    prompt = torch.randint(0, 50, (3, 6))
    growing = model.generate(prompt, max_new_tokens=25, eos_id=7)
    model.compiled_step = model.forward  # the static-cache path, without the compiler
    assert torch.equal(model.generate(prompt, max_new_tokens=25, eos_id=7), growing)
    cache = StaticKVCache(model.cfg, 3, model.cfg.max_seq_len)
    with torch.no_grad():
        chunks = [model(prompt[:, :4], cache), model(prompt[:, 4:5], cache), model(prompt[:, 5:], cache)]
        assert torch.allclose(torch.cat(chunks, dim=1), model(prompt), atol=1e-5)
    assert int(cache.pos) == 6


def test_compiled_decoding_gives_the_eager_tokens():
    model = small_model(seed=5)
    prompts = [torch.randint(0, 50, (1, n)) for n in (5, 9)]  # two lengths: one graph serves both
    eager = [model.generate(p, max_new_tokens=20) for p in prompts]
    model.compile_decoding()
    try:
        compiled = [model.generate(p, max_new_tokens=20) for p in prompts]
    except torch._dynamo.exc.BackendCompilerFailed as e:
        pytest.skip(f"torch.compile cannot build kernels here: {e.inner_exception}")
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_a_compiled_step_s_cache_holds_the_request_not_max_seq_len(monkeypatch):
    """The static cache is read whole at every token: sized to max_seq_len (SmolLM2's 8,192) it cost more than
    the weights. It holds the request rounded up to a power of two (few compiled graphs), within max_seq_len."""
    assert [static_cache_len(n, 8192) for n in (1, 64, 65, 96, 129, 8000)] == [64, 64, 128, 128, 256, 8192]
    assert static_cache_len(100, 120) == 120
    model = small_model(seed=6, max_seq_len=200)
    model.compiled_step = model.forward  # the static-cache path, without the compiler
    sizes, original = [], StaticKVCache.__init__
    monkeypatch.setattr(StaticKVCache, "__init__", lambda self, cfg, b, max_len, *rest:
                        sizes.append(max_len) or original(self, cfg, b, max_len, *rest))
    prompt = torch.randint(0, 50, (2, 60))
    assert torch.equal(model.generate(prompt, max_new_tokens=10), model.generate(prompt, 10, use_cache=False))
    assert sizes == [128]


def test_cached_and_uncached_generation_give_identical_tokens():
    model = small_model(seed=3)
    prompt = torch.randint(0, 50, (4, 5))
    cached = model.generate(prompt, max_new_tokens=30)
    uncached = model.generate(prompt, max_new_tokens=30, use_cache=False)
    assert cached.shape == (4, 35) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    sampled = [model.generate(prompt, 30, temperature=1.0, top_k=10, use_cache=c,
                              generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = small_model()
    prompt = torch.randint(0, 50, (2, 4))
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = small_model()
    prompt = torch.randint(0, 50, (3, 4))
    free = model.generate(prompt, 10)
    eos = int(free[0, 6])  # the token row 0 produces third: make it the end of sequence
    out = model.generate(prompt, 10, eos_id=eos)
    row0 = out[0, 4:]
    first = int((row0 == eos).nonzero()[0])
    assert torch.equal(row0[:first], free[0, 4:4 + first]) and (row0[first:] == eos).all()


def test_generate_refuses_overlong_sequences():
    model = small_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=7)


def test_weight_decay_groups_split_matrices_from_norms():
    model = small_model()
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_flops_per_token_counts_every_matmul_weight_of_the_model():
    """The formula counts weights from the config; check it against the modules themselves."""
    model = small_model()
    cfg, seq_len = model.cfg, 48
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention_scores = 12 * cfg.n_layers * cfg.dim * seq_len
    assert flops_per_token(cfg, seq_len) == 6 * matmul + attention_scores
    assert flops_per_token(cfg, seq_len, n_trained=0) == 4 * matmul + attention_scores
