"""Bad input through the real programs: one line on stderr, exit status 2, no traceback, no files left. Long
lists of refusals run each program's main() in this process (helpers.run_here), through the real program
for a case or two of each list."""
import os

import pytest
import torch

from helpers import ENV, ROOT, TINY_RUN, assert_one_line_error, copy_of, run, run_here, write

TINY = TINY_RUN


def test_infer_compile_answers_as_eager_decoding_and_falls_back_without_a_compiler(trained, tmp_path):
    prompts = ["--prompt", "the", "--prompt", "a b c d e f", "--modes", "base,taia", "--max_new_tokens", "12"]
    eager = run_here("infer.py", "--out_dir", trained, *prompts)
    assert eager.returncode == 0 and len(eager.stdout.splitlines()) == 4, eager.stderr
    compiled = run("infer.py", "--out_dir", trained, *prompts, "--compile")
    assert compiled.returncode == 0 and compiled.stdout == eager.stdout, compiled.stderr
    # No C++ compiler (and an empty kernel cache, so nothing compiled before can stand in for one).
    no_compiler = {**ENV, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    fallback = run("infer.py", "--out_dir", trained, *prompts, "--compile", env=no_compiler)
    assert fallback.returncode == 0 and fallback.stdout == eager.stdout, fallback.stderr
    assert "--compile: torch.compile failed" in fallback.stderr and "decoding without it" in fallback.stderr


def test_infer_rejects_bad_input(trained, tmp_path):
    bad_pickle = tmp_path / "evil.pt"

    class RunsCode:  # unpickling this would call os.system
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": RunsCode(), "config": {}}, bad_pickle)
    cases = [
        (["--out_dir", tmp_path / "nowhere", "--prompt", "hi"], "tokenizer not found"),
        (["--out_dir", trained, "--mode", "tiaa", "--prompt", "hi"], "unknown mode"),
        (["--out_dir", trained, "--modes", "base,,nope", "--eval", trained / "data/ood_test.jsonl"], "unknown mode"),
        (["--out_dir", trained, "--max_new_tokens", "abc", "--prompt", "hi"], "invalid int value"),
        (["--out_dir", trained, "--temperature", "nan", "--prompt", "hi"], "--temperature"),
        (["--out_dir", trained, "--device", "tpu", "--prompt", "hi"], "--device"),
        (["--out_dir", trained], "give --prompt"),
        (["--out_dir", trained, "--prompt", "word " * 600], "max_seq_len"),
        (["--out_dir", trained, "--eval", tmp_path / "missing.jsonl"], "cannot read"),
        (["--out_dir", trained, "--eval", write(tmp_path / "bad.jsonl", '{"prompt": "a", "response": "b"}\n{oops\n')],
         "bad.jsonl:2: not valid JSON"),
        (["--out_dir", trained, "--eval", write(tmp_path / "alpaca.jsonl", '{"instruction": 1, "output": "b"}\n')],
         "alpaca.jsonl:1:"),
        (["--out_dir", trained, "--eval", write(tmp_path / "empty.jsonl", "\n")], "holds no examples"),
        (["--out_dir", trained, "--eval", trained / "data/ood_test.jsonl", "--json", tmp_path / "no/dir/x.json"],
         "folder does not exist"),
        (["--out_dir", trained, "--modes", "taia,auto", "--prompt", "hi"], "give --dev"),
        (["--out_dir", trained, "--modes", "taia", "--auto_per_layer", "--prompt", "hi"], "add auto to --modes"),
        (["--out_dir", trained, "--modes", "auto", "--dev", trained / "data/ood_test.jsonl",
          "--eval", trained / "data/ood_test.jsonl"], "choosing on the test set"),
        # the same examples under another name (a copy; a hard link alike) are the test set too
        (["--out_dir", trained, "--modes", "auto", "--dev", write(tmp_path / "copy.jsonl",
          (trained / "data/ood_test.jsonl").read_text()), "--eval", trained / "data/ood_test.jsonl"],
         "choosing on the test set"),
    ]
    for args, expected in cases:
        assert_one_line_error(run_here("infer.py", *args, cwd=tmp_path), expected)
    assert_one_line_error(run("infer.py", *cases[1][0], cwd=tmp_path), cases[1][1])  # and through the real program
    # train.py's eval stage reports the toy world's sets when no --eval is given: a --dev among them is refused
    # (on a copy: were the check to miss, the eval would write into the run).
    out = copy_of(trained, tmp_path)
    assert_one_line_error(run("train.py", "--out_dir", out, *TINY, "--stage", "eval", "--modes", "auto", "--dev",
                              out / "data/ood_test.jsonl", cwd=tmp_path), "choosing on the test set")
    # A checkpoint that would run code when unpickled is refused, and the code never runs.
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    for name in ("tokenizer.model", "finetuned.pt", "ffn_snapshot.pt"):
        (evil_dir / name).write_bytes((trained / name).read_bytes())
    (evil_dir / "base.pt").write_bytes(bad_pickle.read_bytes())
    assert_one_line_error(run("infer.py", "--out_dir", evil_dir, "--prompt", "hi", cwd=tmp_path), "refused or corrupt")
    assert not (tmp_path / "pwned").exists()


def test_infer_rejects_files_that_do_not_belong_together(trained, tmp_path):
    def copy_run(name):
        target = tmp_path / name
        target.mkdir()
        for f in ("tokenizer.model", "base.pt", "finetuned.pt", "ffn_snapshot.pt"):
            (target / f).write_bytes((trained / f).read_bytes())
        return target

    other = copy_run("other_snapshot")  # a snapshot of a different base model
    snap = torch.load(other / "ffn_snapshot.pt", weights_only=True)
    snap["ffn"] = {k: v + 1 for k, v in snap["ffn"].items()}
    torch.save(snap, other / "ffn_snapshot.pt")
    assert_one_line_error(run("infer.py", "--out_dir", other, "--prompt", "hi", cwd=tmp_path), "fingerprints differ")

    truncated = copy_run("truncated")
    (truncated / "finetuned.pt").write_bytes((trained / "finetuned.pt").read_bytes()[:1000])
    assert_one_line_error(run_here("infer.py", "--out_dir", truncated, "--prompt", "hi", cwd=tmp_path), "finetuned.pt")

    tensor_only = copy_run("tensor_only")
    torch.save(torch.zeros(3), tensor_only / "base.pt")
    assert_one_line_error(run_here("infer.py", "--out_dir", tensor_only, "--prompt", "hi", cwd=tmp_path),
                          "not a checkpoint of this project")

    unknown_field = copy_run("unknown_field")
    for f in ("base.pt", "finetuned.pt"):
        ckpt = torch.load(unknown_field / f, weights_only=True)
        ckpt["config"]["n_experts"] = 8
        torch.save(ckpt, unknown_field / f)
    assert_one_line_error(run_here("infer.py", "--out_dir", unknown_field, "--prompt", "hi", cwd=tmp_path), "n_experts")


def test_train_rejects_bad_flags_and_data_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    good_jsonl = write(tmp_path / "good.jsonl", '{"prompt": "a", "response": "b"}\n')
    cases = [
        (["--seeds", "0"], "--seeds"),
        (["--stage", "foo"], "invalid choice"),
        (["--log_interval", "0"], "--log_interval"),
        (["--n_layers", "0"], "--n_layers"),
        (["--dim", "-32"], "--dim"),
        (["--lora_rank", "-1"], "--lora_rank"),
        (["--device", "tpu"], "--device"),
        (["--pretrain_text", tmp_path / "missing.txt", "--stage", "pretrain"], "cannot read"),
        (["--pretrain_text", write(tmp_path / "short.txt", "hi\n"), "--stage", "pretrain"], "fewer than one window"),
        (["--dim", "30", "--stage", "pretrain"], "must divide"),
        (["--stage", "finetune"], "checkpoint not found"),
        (["--dtype", "float8"], "invalid choice"),
        (["--dtype", "float16", "--device", "cpu"], "needs --device cuda"),
        (["--save_interval", "-1"], "--save_interval"),
        (["--peak_tflops", "0"], "--peak_tflops"),
        (["--threads", "0"], "--threads"),
        (["--threads", "many"], "--threads"),
        (["--fsdp", "--lora_rank", "4"], "--fsdp shards full fine-tuning"),
        (["--l2_weight", "-1"], "--l2_weight must be a finite number >= 0"),
        (["--ewc_weight", "inf"], "--ewc_weight must be a finite number >= 0"),
        (["--ewc_windows", "0"], "--ewc_windows"),
        (["--l2_weight", "1", "--lora_rank", "4"], "pull full fine-tuning toward the base"),
        (["--ewc_weight", "1", "--ewc_text", tmp_path / "missing.txt"], "cannot read"),
        (["--ewc_weight", "1", "--init_from", tmp_path, "--finetune", good_jsonl, "--eval", good_jsonl],
         "give --ewc_text"),
        (["--ffn_layers", "-1"], "--ffn_layers must be at least 0"),
        (["--ffn_layers", "2"], "--ffn_layers 2 is more than the model's n_layers (1)"),
        (["--ffn_layers", "1", "--train_scope", "attn"], "--train_scope attn trains none"),
        (["--ffn_layers", "0", "--train_scope", "ffn"], "trains nothing"),
        (["--init_from", tmp_path, "--stage", "pretrain"], "replaces pretraining"),
        (["--init_from", tmp_path / "nowhere", "--finetune", good_jsonl, "--eval", good_jsonl], "no such directory"),
        # Inputs that later stages read are checked before pretraining starts.
        (["--modes", "base,nope"], "unknown mode"),
        (["--modes", "taia,auto", "--eval", good_jsonl], "give --dev"),
        (["--modes", "taia,auto", "--dev", tmp_path / "no_dev.jsonl"], "cannot read"),
        (["--eval", tmp_path / "missing.jsonl"], "cannot read"),
        (["--finetune", write(tmp_path / "ft.jsonl", "{oops\n")], "ft.jsonl:1: not valid JSON"),
        (["--eval", good_jsonl, "--eval", write(tmp_path / "other" / "good.jsonl", good_jsonl.read_text())],
         "two --eval files are named good"),
        (["--fsdp"], "launch with torchrun"),
        (["--auto_per_layer"], "add auto to --modes"),
        (["--device", "mps"] if not torch.backends.mps.is_available() else ["--device", "tpu"], "--device"),
        (["--finetune_set", "mixed"], "ood_share=S"),
        (["--finetune_set", "nope"], "fine-tuning sets are ood, id"),
        (["--out_d", out], "unrecognized arguments"),  # no abbreviations: --out_d is not --out_dir
    ]
    lab_flags = {"--seeds", "--l2_weight", "--ewc_weight", "--ewc_windows", "--ewc_text", "--ffn_layers",
                 "--train_scope", "--finetune_set"}
    for args, expected in cases:
        program = "experiments/lab.py" if lab_flags & set(map(str, args)) else "train.py"
        assert_one_line_error(run_here(program, "--out_dir", out, *TINY, *args, cwd=tmp_path), expected)
    # The lab's options are the lab's: train.py itself does not take them (both through the real programs).
    assert_one_line_error(run("experiments/lab.py", "--out_dir", out, *TINY, "--seeds", "0", cwd=tmp_path), "--seeds")
    assert_one_line_error(run("train.py", "--out_dir", out, *TINY, "--l2_weight", "1", cwd=tmp_path),
                          "unrecognized arguments: --l2_weight")
    assert not out.exists() or not any(p.suffix in (".pt", ".model") for p in out.rglob("*"))


def test_train_reports_malformed_finetune_data_and_keeps_earlier_files(trained, tmp_path):
    out = copy_of(trained, tmp_path)  # (the shared run stays as it is, even should the check miss)
    before = {f: (out / f).read_bytes() for f in ("finetuned.pt", "ffn_snapshot.pt")}
    bad = write(tmp_path / "ft.jsonl", '{"prompt": "a", "response": "b"}\n[1, 2]\n')
    result = run_here("train.py", "--out_dir", out, *TINY, "--stage", "finetune", "--finetune", bad, cwd=tmp_path)
    assert_one_line_error(result, "ft.jsonl:2:")
    assert {f: (out / f).read_bytes() for f in before} == before


def test_a_bug_of_ours_is_a_traceback_and_exit_1_not_a_one_line_error(trained, tmp_path):
    """A ValueError raised by our own code (here planted inside the training loop, and inside infer.py's
    scoring) is not the user's mistake: it keeps its traceback and exits with status 1."""
    script = write(tmp_path / "planted_bug.py", f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import infer, train
from common import run_cli

def planted(*args, **kwargs):
    raise ValueError("a planted bug")

train.cosine_lr = infer.judge = planted
program, *argv = sys.argv[1:]
run_cli(lambda: (train if program == "train" else infer).main(argv))
""")
    cases = [["train", "--out_dir", tmp_path / "out", *TINY, "--stage", "pretrain"],
             ["infer", "--out_dir", trained, "--eval", trained / "data/ood_test.jsonl"]]
    for args in cases:
        result = run(str(script), *args, cwd=tmp_path)
        assert result.returncode == 1, (args[0], result.returncode, result.stderr)
        assert "Traceback" in result.stderr and "ValueError: a planted bug" in result.stderr, result.stderr
        assert "error: a planted bug" not in result.stderr


def test_grid_points_with_bad_weights_are_one_line_errors(trained):
    from common import UserError
    from infer import FinishedRun
    run = FinishedRun(str(trained))
    for weights, message in [({"ffn": [0.0, 1.0]}, "one per layer"), ({"mlp": 0.5}, "unknown groups"),
                             ({"attention": float("inf")}, "finite")]:
        with pytest.raises(UserError, match=message):
            run.build_point(weights)
    assert run.build_point({"ffn": [0.5]}).cfg.n_layers == 1  # the tiny model has one layer
