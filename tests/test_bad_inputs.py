"""Bad input that ended in a traceback, a hang or silence (issue 11), through the real programs: one line
on stderr and exit status 2, by class: text UTF-8 cannot encode, files that are not regular files or are
shaped oddly, numbers out of range, sizes this machine's memory cannot hold."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import sentencepiece as spm

from helpers import TINY_RUN, assert_one_line_error, run, run_here, write

TINY = TINY_RUN
NOT_UTF8 = os.fsdecode(b"caf\xe9")  # how Python hands a program the bytes of a Latin-1 "café" in its argv
HUGE = 10 ** 30


def assert_errors(cases, cwd, processes=None) -> list[str]:
    """Every (program, args, expected) case is a one-line error; returns the lines. The cases at the indices
    `processes` (all when None) run as processes of their own, two at a time (each spends most of its seconds
    importing torch); the others as programs in this process (helpers.run_here)."""
    own = [i for i in range(len(cases)) if processes is None or i in processes]
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(own, pool.map(lambda i: run(cases[i][0], *cases[i][1], cwd=cwd, timeout=120), own)))
    results = [done[i] if i in done else run_here(program, *args, cwd=cwd)
               for i, (program, args, _) in enumerate(cases)]
    for (_, _, expected), result in zip(cases, results):
        assert_one_line_error(result, expected)
    return [result.stderr.strip() for result in results]


def test_text_that_utf8_cannot_encode_is_one_line(trained, tmp_path):
    surrogate = write(tmp_path / "surrogate.jsonl", '{"prompt": "a", "response": "b"}\n'
                                                   '{"prompt": "\\ud800", "response": "x"}\n')  # json.loads takes it
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    latin1_text = tmp_path / "latin1.txt"
    latin1_text.write_bytes(b"The city of Kalo is Paris.\n" * 50 + b"caf\xe9\n")
    infer, train = ["--out_dir", trained], ["--out_dir", tmp_path / "out", *TINY]
    assert_errors([
        ("infer.py", [*infer, "--eval", surrogate], 'surrogate.jsonl:2: "prompt" is not valid UTF-8 text (a lone '
                                                    'surrogate U+D800)'),
        ("train.py", [*train, "--finetune", surrogate], 'surrogate.jsonl:2: "prompt" is not valid UTF-8'),
        ("infer.py", [*infer, "--eval", latin1], "latin1.jsonl:2 is not valid UTF-8 text (the byte 0xe9)"),
        ("train.py", [*train, "--pretrain_text", latin1_text], "latin1.txt:51 is not valid UTF-8 text (the byte 0xe9)"),
        # Bytes on the command line that are not UTF-8: text, and paths (sentencepiece cannot open them).
        ("infer.py", [*infer, "--prompt", NOT_UTF8], "--prompt is not valid UTF-8 text (the byte 0xe9)"),
        ("train.py", [*train, "--template", NOT_UTF8 + " {prompt}"], "--template is not valid UTF-8"),
        ("train.py", ["--out_dir", tmp_path / NOT_UTF8, *TINY], "--out_dir is not valid UTF-8"),
        ("infer.py", ["--out_dir", tmp_path / NOT_UTF8, "--prompt", "hi"], "--out_dir is not valid UTF-8"),
        ("train.py", [*train, "--eval", tmp_path / (NOT_UTF8 + ".jsonl")], "--eval is not valid UTF-8"),
    ], tmp_path, processes={0, 5})  # a file's bytes and the command line's through the real programs
    assert not (tmp_path / "out").exists() and not (tmp_path / NOT_UTF8).exists()


def test_json_nested_too_deeply_is_one_line(trained, tmp_path):
    arrays = write(tmp_path / "arrays.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    objects = write(tmp_path / "objects.jsonl", '{"prompt": "a", "response": "b"}\n' + '{"a": ' * 100_000 + "\n")
    assert_errors([
        ("infer.py", ["--out_dir", trained, "--eval", arrays], "arrays.jsonl:1: JSON nested too deeply"),
        ("train.py", ["--out_dir", tmp_path / "out", *TINY, "--finetune", objects], "objects.jsonl:2: JSON nested"),
    ], tmp_path)


def test_a_named_pipe_or_a_folder_is_refused_not_waited_on(trained, tmp_path):
    """Opening a FIFO for reading blocks until something writes to it: these runs hung."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    train = ["--out_dir", tmp_path / "out", *TINY]
    refused = "not a regular file"
    assert_errors([
        ("infer.py", ["--out_dir", trained, "--eval", fifo], refused),
        ("infer.py", ["--out_dir", trained, "--modes", "auto", "--dev", fifo, "--prompt", "hi"], refused),
        ("train.py", [*train, "--finetune", fifo], refused),
        ("train.py", [*train, "--pretrain_text", fifo], refused),
        ("train.py", [*train, "--eval", tmp_path], refused),
    ], tmp_path)


def test_a_document_longer_than_sentencepiece_takes_still_trains_the_tokenizer(tmp_path):
    """sentencepiece's trainer skips every line over 4192 bytes without a word; a text of such lines left
    it nothing ("[!sentences_.empty()]"). Here one line of a megabyte, and one of 10,000 three-byte
    characters without a space, teach the tokenizer their words."""
    words = ["zebra", "quokka", "narwhal", "axolotl", "pangolin"]
    long_line = " ".join(words[i * 7 % 5] for i in range(150_000))
    text = write(tmp_path / "long.txt", long_line + "\n" + "€" * 10_000 + "\n")
    out = tmp_path / "out"
    result = run_here("train.py", "--out_dir", out, *TINY, "--stage", "pretrain", "--pretrain_text", text, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert all(sp.piece_to_id("▁" + word) != sp.unk_id() for word in words)
    assert not any(sp.is_byte(i) for i in sp.encode("€€€€"))  # "€" is a piece of its own, not three bytes


def test_sampling_at_any_small_temperature_is_greedy_and_big_limits_are_cut(trained, tmp_path):
    """logits / 1e-45 overflowed to inf, and softmax made nan of it; a --top_k or --max_new_tokens beyond
    the vocabulary or the model's length is cut to it."""
    prompt = ["--out_dir", trained, "--modes", "taia", "--prompt", "the"]
    greedy = run_here("infer.py", *prompt, cwd=tmp_path)
    assert greedy.returncode == 0 and greedy.stdout.strip(), greedy.stderr
    for temperature in ("1e-45", "1e-300"):
        tiny = run_here("infer.py", *prompt, "--temperature", temperature, cwd=tmp_path)
        assert tiny.returncode == 0 and tiny.stdout == greedy.stdout, (temperature, tiny.stderr)
    big = run_here("infer.py", *prompt, "--temperature", "1", "--top_k", HUGE, "--max_new_tokens", HUGE, cwd=tmp_path)
    assert big.returncode == 0 and big.stdout.strip(), big.stderr


def test_numbers_out_of_range_are_argparse_errors(trained, tmp_path):
    """Each of these was accepted (a negative seed, decay or LoRA scale; nan or inf as a rate) or failed
    deep inside torch or sentencepiece."""
    train, infer = ["--out_dir", tmp_path / "out", *TINY], ["--out_dir", trained, "--prompt", "hi"]
    cases = [("train.py", [*train, flag, value], f"{flag} must be") for flag, value in [
        ("--seed", "-1"), ("--seed", 2 ** 64), ("--weight_decay", "-5"), ("--lora_alpha", "0"),
        ("--finetune_lr", "nan"), ("--pretrain_lr", "inf"), ("--peak_tflops", "nan"), ("--vocab_size", 2 ** 31)]]
    cases += [("train.py", [*train, "--threads", (os.cpu_count() or 1) * 1000], "cores"),
              ("infer.py", [*infer, "--seed", "-1"], "--seed must be"),
              ("infer.py", [*infer, "--temperature", "1e999"], "--temperature must be")]
    assert_errors(cases, tmp_path, processes={0, len(cases) - 1})  # (a train.py and an infer.py one)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="the memory check reads Linux's MemAvailable")
def test_a_model_or_batch_too_big_for_memory_is_refused_before_allocating(trained, tmp_path):
    """Each needs petabytes: they ended in a MemoryError traceback, or spent minutes building layers."""
    finetune_only = tmp_path / "finetune_only"  # a copy: were the check to miss, the run would overwrite it
    finetune_only.mkdir()
    for name in ("base.pt", "tokenizer.model"):
        (finetune_only / name).write_bytes((trained / name).read_bytes())
    train = ["--out_dir", tmp_path / "out", *TINY]
    cases = [("train.py", [*train, *flags], expected) for flags, expected in [
        (["--dim", 10 ** 8], "pretraining a model of dim 100000000,"),
        (["--n_layers", 10 ** 10], "n_layers 10000000000,"),
        (["--hidden_dim", 10 ** 13], "hidden_dim 10000000000000 "),
        (["--batch_tokens", 10 ** 16], "on batches of 10,000,000,000,000,000 tokens"),
        (["--lora_rank", 10 ** 13], "fine-tuning a model of dim 32, n_layers 1, hidden_dim 64 ("),
        (["--finetune_batch", 10 ** 16], "on batches of 10,000,000,000,000,000 examples"),
    ]]
    cases.append(("train.py", ["--out_dir", finetune_only, *TINY, "--stage", "finetune", "--lora_rank", 10 ** 13],
                  "with LoRA of rank 10,000,000,000,000"))
    for line in assert_errors(cases, tmp_path):
        assert "GiB of memory; this machine has" in line, line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in finetune_only.iterdir()) == ["base.pt", "tokenizer.model"]


def test_parameter_count_matches_the_model():
    """check_memory counts a model's parameters from its config; here against models it builds."""
    from model import parameter_count
    from model import ModelConfig, Transformer
    for cfg in [ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48),
                ModelConfig(dim=48, n_layers=1, n_heads=3, vocab_size=40, hidden_dim=64, tie_embeddings=True)]:
        assert parameter_count(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())
