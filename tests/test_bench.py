"""tools/bench.py end to end at toy sizes: the figures it reports exist and are sane. No timing thresholds:
how fast things run belongs in the benchmark's output, not in a test."""
import json
import sys

import pytest
import torch

from tools import bench, bench_real

TINY = ["--dim", "32", "--n_layers", "1", "--n_heads", "4", "--n_kv_heads", "2", "--hidden_dim", "48",
        "--vocab_size", "40", "--batch", "2", "--seq_len", "12", "--prompt_len", "16", "--new_tokens", "6",
        "--decode_batches", "1,2", "--repeats", "2", "--warmup", "1", "--gemm_size", "64", "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()  # tools/bench.py --threads sets it for the whole process
    yield
    torch.set_num_threads(threads)


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def check_figures(results, with_hf: bool):
    cpu = results["devices"]["cpu"]
    train, decode, taia = cpu["train"], cpu["decode"], cpu["taia"]
    assert set(results["devices"]) == {"cpu"} and results["config"]["n_kv_heads"] == 2
    assert train["tokens_per_step"] == 2 * 12
    assert positive(train["gemm"]["flop_per_s"]) and positive(train["flops_per_token"])
    assert positive(train["tokens_per_s"]["ours"]) and positive(train["fraction_of_gemm"]["ours"])
    assert set(decode) == {"batch_1", "batch_2"}
    for figures in decode.values():
        assert positive(figures["tokens_per_s"]["ours_cached"]) and positive(figures["tokens_per_s"]["ours_uncached"])
        assert positive(figures["cached_over_uncached"])
        if figures["compile_error"] is None:  # the compiled decode step decodes the eager tokens, faster or not
            assert positive(figures["tokens_per_s"]["ours_compiled"]) and figures["compiled_differs_from"] is None
    assert results["cpu"] and results["cpu"].endswith("cores")
    assert all(positive(taia["ms"][k]) for k in ("plain_copy", "snapshot", "rebuild"))
    # 1 layer x (gate + up + down) of 32 x 48 float32 weights, counted from the modules themselves.
    assert taia["ffn_tensors"] == 3 and taia["snapshot_bytes"] == taia["ffn_bytes"] == 3 * 32 * 48 * 4
    peer = [train["tokens_per_s"]["hf"], train["ours_over_hf"]] + [
        x for f in decode.values() for x in (f["tokens_per_s"]["hf"], f["cached_over_hf"])]
    if with_hf:
        assert all(positive(x) for x in peer)
        assert train["loss_diff"] < 1e-4  # both models really hold the same weights
        # ...and decode the same greedy tokens (a prompt token taken for padding would show here)
        assert all(f["hf_differs_from"] is None for f in decode.values())
    else:
        assert all(x is None for x in peer) and results["transformers"] is None


def test_bench_writes_every_figure_as_json(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    returned = bench.main(TINY + ["--threads", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    check_figures(written, with_hf=True)
    assert "tokens/s" in capsys.readouterr().out


def test_bench_runs_without_transformers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    check_figures(bench.main(TINY + ["--threads", "1"]), with_hf=False)
    assert "not installed" in capsys.readouterr().out


def test_train_run_times_every_stage_of_the_real_train_py_per_contender(capsys):
    tiny_run = ("--dim 32 --n_layers 1 --hidden_dim 64 --seq_len 32 --batch_tokens 512 --micro_batch 8 "
                "--finetune_batch 8 --pretrain_steps 3 --finetune_steps 2 --modes base,taia")
    runs = bench.main(["--train_run", "auto,1", "--train_args", tiny_run])
    assert list(runs) == ["auto", "1"]
    for run in runs.values():
        assert set(run["seconds"]) == {"data", "pretrain", "finetune", "eval", "total"}
        assert all(s >= 0 for s in run["seconds"].values()) and run["same_results"]
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "train.py --threads 1" in out


@pytest.mark.parametrize("program, flags", [
    *(("bench", flags) for flags in (["--dim", "0"], ["--repeats", "x"], ["--dim", "30", "--n_heads", "4"],
                                     ["--decode_batches", "1,-8"], ["--device", "tpu"], ["--train_run", "3x"])),
    *(("bench_real", flags) for flags in (["--batch", "0"], ["--repeats", "x"], ["--memory_child", "them"]))])
def test_bad_flags_give_a_one_line_error_and_exit_2(program, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        {"bench": bench, "bench_real": bench_real}[program].parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
