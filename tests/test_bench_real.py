"""tools/bench_real.py end to end on a tiny random Llama written as a GGUF file (as tests/test_gguf.py writes
them): every figure it reports is there and sane. No timing thresholds: how fast things run belongs in
the benchmark's output, not in a test."""
import json

import pytest
import torch

from helpers import needs_transformers

pytestmark = needs_transformers  # its Hugging Face columns are half of what it reports
gguf = pytest.importorskip("gguf", reason="needs the gguf package (requirements.txt)")
pytest.importorskip("tokenizers", reason="needs the tokenizers package (requirements.txt)")
from test_gguf import DIM, Q, bpe, hf_llama, write_gguf  # noqa: E402,F401 (bpe and hf_llama: the fixtures)

from tools import bench_real  # noqa: E402

STEPS, BATCH, SEQ_LEN, PROMPT, NEW = 1, 2, 16, 8, 4


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()  # --threads sets it for the whole process
    yield
    torch.set_num_threads(threads)


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_bench_real_writes_every_figure_as_json(hf_llama, bpe, tmp_path, capsys):  # noqa: F811 (test_gguf's fixtures)
    model = hf_llama(tied=True)  # tied, in Q4_1, as SmolLM2's file is (its norms in F32)
    path = write_gguf(tmp_path / "tiny.gguf", model, bpe, (Q.Q4_1,))
    out = tmp_path / "bench_real.json"
    returned = bench_real.main(["--init_from", str(path), "--batch", str(BATCH), "--seq_len", str(SEQ_LEN),
                                "--prompt_len", str(PROMPT), "--new_tokens", str(NEW), "--repeats", "1",
                                "--warmup", "1", "--gemm_size", "64", "--copy_mb", "4", "--memory_steps", str(STEPS),
                                "--threads", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    n_params = sum(p.numel() for p in model.parameters())
    assert results["parameters"] == n_params and results["threads"] == 1 and results["cpu"].endswith("cores")
    assert set(results["load"]) == {"memory", "train", "decode", "end"}

    train = results["train"]
    assert train["tokens_per_step"] == BATCH * SEQ_LEN and positive(train["flops_per_token"])
    assert all(positive(train[key][name]) for key in ("tokens_per_s", "ms_per_step", "fraction_of_gemm")
               for name in ("ours", "hf"))
    assert positive(train["ours_over_hf"]) and positive(train["gemm"]["flop_per_s"])
    assert train["loss_diff"] < 1e-4  # both models hold the same (dequantized) weights
    assert set(train["parts_ms"]) >= {"head_and_loss", "adamw"} and all(map(positive, train["parts_ms"].values()))
    profile = train["profile"]
    assert set(profile["seconds"]) == {"adamw", "embedding_backward", "loss", "attention", "matmul", "other"}
    # every part of a step is there (a rule that matched nothing would read 0: the embedding is tied, so its
    # backward runs), and the parts add up to the whole
    assert all(map(positive, profile["seconds"].values()))
    assert profile["total"] == pytest.approx(sum(profile["seconds"].values()))
    assert positive(profile["matmul_fraction_of_gemm"])

    decode = results["decode"]
    names = ["ours_eager", "hf"] + ["ours_compiled"] * (decode["compile_error"] is None)
    assert all(positive(decode["tokens_per_s"][name]) and positive(decode["fraction_of_limit"][name]) for name in names)
    # ours compiled and HF decode the eager tokens
    assert decode["differs_from"] == {name: None for name in names[1:]}
    assert positive(decode["copy"]["bytes_per_s"]) and positive(decode["limit_tokens_per_s"])
    assert positive(decode["gemv"]["bytes_per_s"]) and positive(decode["gemv_limit_tokens_per_s"])
    # float32 weights, the tied embedding read once (as the head)
    assert decode["weight_bytes_per_token"] == 4 * n_params
    cache = decode["kv_cache_bytes_per_token"]  # the compiled step's static cache: the request's 12 -> 64 positions
    assert cache["ours_compiled"] / cache["ours_eager"] == 64 / (PROMPT + NEW / 2)

    memory = results["memory"]
    for name in ("ours", "hf"):
        r = memory[name]
        assert 0 < r["runtime_rss"] < r["loaded_rss"] and r["load_peak"] >= r["loaded_rss"]
        assert r["peak"] > r["runtime_rss"] and not r["peak_includes_loading"]  # (Linux resets the peak)
        assert r["peak_per_parameter"] == pytest.approx(r["peak"] / n_params)
    assert memory["head_and_loss"]["added"] > 0
    assert memory["weights_grads_adamw_bytes"] == 16 * n_params
    assert model.config.hidden_size == DIM == results["config"]["dim"]
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "bytes/parameter" in printed
