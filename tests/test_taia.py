"""TAIA parameter provenance, bit-exact: which tensor comes from the base and which from fine-tuning."""
import pytest
import torch

import taia
from model import ModelConfig, Transformer


def tiny(seed=0, tie=False):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=48,
                                   max_seq_len=32, tie_embeddings=tie))


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb_all(model):
    """Stand-in for fine-tuning: change every parameter (norms included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 + 0.01)


def test_groups_cover_every_parameter_and_is_ffn_is_exactly_gate_up_down():
    model = tiny()
    groups = {name: taia.group_of(name) for name in model.state_dict()}
    assert {n for n, g in groups.items() if g == "ffn"} == {
        f"blocks.{i}.ffn.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")}
    assert {n for n, g in groups.items() if g == "attention"} == {
        f"blocks.{i}.attn.{m}.weight" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert groups["embed.weight"] == "embedding" and groups["lm_head.weight"] == "head"
    assert groups["blocks.0.ffn_norm.weight"] == "norm" and groups["norm.weight"] == "norm"
    # Hugging Face names follow the same predicate, and adapters are not FFN weights.
    assert taia.is_ffn("model.layers.3.mlp.down_proj.weight")
    assert not taia.is_ffn("model.layers.3.post_attention_layernorm.weight")
    assert not taia.is_ffn("blocks.0.ffn.up_proj.lora_A")
    with pytest.raises(ValueError, match="cannot tell"):
        taia.group_of("blocks.0.router.weight")


def test_snapshot_holds_exactly_the_ffn_bytes_as_independent_cpu_copies():
    model = tiny()
    snap = taia.snapshot(model)
    ffn = {n: p for n, p in model.named_parameters() if taia.is_ffn(n)}
    assert set(snap) == set(ffn)
    assert sum(t.numel() * t.element_size() for t in snap.values()) == \
        sum(p.numel() * p.element_size() for p in ffn.values())
    for name, t in snap.items():
        assert t.device.type == "cpu" and torch.equal(t, ffn[name]) and t.data_ptr() != ffn[name].data_ptr()


@pytest.mark.parametrize("tie", [False, True])
def test_rebuild_restores_original_ffn_and_keeps_everything_else_tuned(tie):
    model = tiny(tie=tie)
    before = clone_state(model)
    snap = taia.snapshot(model)
    perturb_all(model)
    tuned = clone_state(model)
    taia.rebuild(model, snap)
    after = model.state_dict()
    for name in after:
        expected = before[name] if taia.is_ffn(name) else tuned[name]
        assert torch.equal(after[name], expected), name
        assert not torch.equal(before[name], tuned[name]), name  # the perturbation touched everything


def test_rebuild_refuses_mismatched_snapshots():
    model = tiny()
    snap = taia.snapshot(model)
    missing = dict(snap)
    missing.pop("blocks.0.ffn.up_proj.weight")
    with pytest.raises(ValueError, match="missing"):
        taia.rebuild(model, missing)
    with pytest.raises(ValueError, match="unexpected"):
        taia.rebuild(model, {**snap, "blocks.9.ffn.up_proj.weight": torch.zeros(1)})
    bigger = taia.snapshot(Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=40, hidden_dim=64)))
    with pytest.raises(ValueError, match="shape"):
        taia.rebuild(model, bigger)


@pytest.mark.parametrize("others", ["tuned", "base"])
def test_combine_takes_each_group_from_the_side_its_mode_says(others):
    base_model = tiny(seed=0)
    base = clone_state(base_model)
    perturb_all(base_model)
    tuned = clone_state(base_model)
    expect_tuned = {  # the table of the paper's modes, written out independently of taia.MODE_TUNED
        "base": set(),
        "vanilla": {"attention", "ffn", "norm", "embedding", "head"},
        "taia": {"attention"} | ({"norm", "embedding", "head"} if others == "tuned" else set()),
        "taif": {"ffn"} | ({"norm", "embedding", "head"} if others == "tuned" else set()),
    }
    for mode, groups in expect_tuned.items():
        mixed = taia.combine(base, tuned, mode, others=others)
        assert set(mixed) == set(base)
        for name, tensor in mixed.items():
            source = tuned if taia.group_of(name) in groups else base
            assert torch.equal(tensor, source[name]), (mode, name)


def test_combine_refuses_unknown_modes_and_mismatched_states():
    base = clone_state(tiny())
    with pytest.raises(ValueError, match="unknown mode"):
        taia.combine(base, base, "tiaa")
    with pytest.raises(ValueError, match="others"):
        taia.combine(base, base, "taia", others="some")
    with pytest.raises(ValueError, match="missing"):
        taia.combine(base, {k: v for k, v in base.items() if k != "norm.weight"}, "taia")


def test_taia_model_from_combine_equals_rebuilt_model():
    model = tiny()
    base = clone_state(model)
    snap = taia.snapshot(model)
    perturb_all(model)
    other = tiny(seed=5)
    other.load_state_dict(taia.combine(base, clone_state(model), "taia"))
    taia.rebuild(model, snap)
    tokens = torch.randint(0, 40, (2, 10))
    assert torch.equal(model(tokens), other(tokens))


def test_lora_trains_only_adapters_and_starts_at_the_base_model():
    model = tiny()
    tokens = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        before = model(tokens)
    taia.add_lora(model, rank=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # two layers, seven linear layers each, A and B
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def trained_lora_model():
    model = tiny()
    base = clone_state(model)
    taia.add_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    return model.eval(), base


def test_merging_all_lora_adapters_reproduces_the_wrapped_model():
    model, base = trained_lora_model()
    tokens = torch.randint(0, 40, (2, 10))
    merged = tiny(seed=9)
    merged.load_state_dict(taia.merge_lora(model, "vanilla"))
    with torch.no_grad():
        assert torch.allclose(merged(tokens), model(tokens), atol=1e-5)
        plain_base = tiny(seed=9)
        plain_base.load_state_dict(base)
        assert not torch.allclose(merged(tokens), plain_base(tokens), atol=1e-3)


@pytest.mark.parametrize("mode", ["base", "taia", "taif"])
def test_lora_merge_for_a_mode_equals_combine_of_the_full_merge(mode):
    model, base = trained_lora_model()
    merged_all = taia.merge_lora(model, "vanilla")
    by_mode = taia.merge_lora(model, mode)
    expected = taia.combine(base, merged_all, mode)
    assert set(by_mode) == set(expected)
    for name in expected:
        assert torch.allclose(by_mode[name], expected[name], atol=1e-6), name
    if mode == "taia":  # the FFN adapters are dropped: FFN weights are the base's, bit for bit
        assert all(torch.equal(by_mode[n], base[n]) for n in base if taia.is_ffn(n))


def test_fingerprint_names_the_exact_ffn_bytes():
    model = tiny()
    snap = taia.snapshot(model)
    same = {k: v.clone() for k, v in snap.items()}
    assert taia.fingerprint(snap) == taia.fingerprint(same)
    name = next(iter(same))
    same[name].view(-1)[0] += 1e-6  # one number changed
    assert taia.fingerprint(snap) != taia.fingerprint(same)


def test_mix_refuses_to_split_tied_embedding_and_head():
    model = tiny(tie=True)
    state = model.state_dict()
    with pytest.raises(ValueError, match="tied"):
        taia.mix(state, state, {"embedding"})
    assert set(taia.mix(state, state, {"embedding", "head"})) == set(state)


def test_lora_keeps_the_wrapped_layer_bias_and_dtype():
    layer = torch.nn.Sequential()
    layer.add_module("attn", torch.nn.Module())
    layer.attn.q_proj = torch.nn.Linear(8, 8, bias=True).to(torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    before = layer.attn.q_proj(x)
    taia.add_lora(layer, rank=2, alpha=4, dropout=0.0)
    assert layer.attn.q_proj.lora_A.dtype == torch.float64
    assert torch.equal(layer.attn.q_proj(x), before)


# ---- interpolation: any point between base and tuned ------------------------------------------------

def base_and_tuned(seed=0):
    model = tiny(seed=seed)
    base = clone_state(model)
    perturb_all(model)
    return base, clone_state(model)


def test_named_modes_are_points_of_interpolate_bit_for_bit():
    base, tuned = base_and_tuned()
    taia_point = taia.interpolate(base, tuned, {"attention": 1.0, "ffn": 0.0})  # unnamed groups stay tuned
    for mode in taia.MODES:
        combined = taia.combine(base, tuned, mode)
        point = taia.interpolate(base, tuned, taia.mode_weights(mode))
        for name in base:
            # the very tensor of one side, not a computed copy: base + 1 * (tuned - base) is not bit-exact
            assert point[name] is combined[name] and (point[name] is base[name] or point[name] is tuned[name])
    assert all(taia_point[n] is taia.combine(base, tuned, "taia")[n] for n in base)


def test_interpolation_halfway_is_the_average_and_per_layer_weights_pick_layers():
    base, tuned = base_and_tuned()
    half = taia.interpolate(base, tuned, {g: 0.5 for g in taia.GROUPS})
    for name in base:
        assert torch.allclose(half[name], (base[name] + tuned[name]) / 2, rtol=0, atol=1e-6), name
        assert not torch.equal(half[name], base[name]) and not torch.equal(half[name], tuned[name])
    layered = taia.interpolate(base, tuned, {"ffn": [0.0, 1.0], "attention": [1.0, 0.25]})
    assert torch.equal(layered["blocks.0.ffn.up_proj.weight"], base["blocks.0.ffn.up_proj.weight"])
    assert torch.equal(layered["blocks.1.ffn.up_proj.weight"], tuned["blocks.1.ffn.up_proj.weight"])
    q0, q1 = "blocks.0.attn.q_proj.weight", "blocks.1.attn.q_proj.weight"
    assert torch.equal(layered[q0], tuned[q0])
    assert torch.allclose(layered[q1], base[q1] + 0.25 * (tuned[q1] - base[q1]))
    beyond = taia.interpolate(base, tuned, {"ffn": 2.0})  # extrapolation is allowed
    up = "blocks.0.ffn.up_proj.weight"
    assert torch.allclose(beyond[up], 2 * tuned[up] - base[up], atol=1e-6)


@pytest.mark.parametrize("weights, message", [
    ({"router": 1.0}, "unknown groups"),
    ({"norm": [0.0, 1.0]}, "one per layer"),
    ({"ffn": [0.0, 1.0, 1.0]}, "one per layer"),
    ({"ffn": float("nan")}, "finite"),
    ({"attention": "half"}, "finite"),
])
def test_interpolate_refuses_bad_weights(weights, message):
    base, tuned = base_and_tuned()
    with pytest.raises(ValueError, match=message):
        taia.interpolate(base, tuned, weights)


def test_interpolate_refuses_to_split_tied_embedding_and_head():
    state = tiny(tie=True).state_dict()  # embed.weight and lm_head.weight are one tensor
    with pytest.raises(ValueError, match="tied"):
        taia.interpolate(state, state, {"embedding": 0.5, "head": 1.0})
    assert set(taia.interpolate(state, state, {"embedding": 0.5, "head": 0.5})) == set(state)


def test_lora_scaled_merge_equals_interpolating_the_full_merge():
    model, base = trained_lora_model()
    merged_all = taia.merge_lora(model, "vanilla")
    weights = {"attention": 0.3, "ffn": [0.5, -0.25]}
    scaled = taia.merge_lora(model, weights=weights)
    expected = taia.interpolate(base, merged_all, weights)
    assert set(scaled) == set(expected)
    for name in expected:
        assert torch.allclose(scaled[name], expected[name], atol=1e-6), name
