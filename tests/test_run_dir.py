"""A run directory never gives a silently wrong answer: --resume checks what it skips, files are named by
content (inputs, tokenizer), one run at a time holds an out_dir, --json never overwrites what a command
reads, a Ctrl-C is never swallowed and says what is on disk, and a save that fails leaves nothing behind."""
import os
import shutil
import signal
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import common
from machinery.rundir import DirectoryLock
from helpers import TINY, TINY_RUN, assert_one_line_error, copy_of, run, run_here, start, wait_for, write


SLOW_STEPS = ["--micro_batch", "1", "--batch_tokens", "8192"]  # 256 micro-batches a step: time to send a signal


def train(out, *args):
    """train.py on OUT with the tiny run's flags, in this process (helpers.run_here)."""
    return run_here("train.py", "--out_dir", out, *TINY_RUN, *args)


def train_process(out, *args):
    """The same in a process of its own: for the directory lock, which a process holds."""
    return run("train.py", "--out_dir", out, *TINY_RUN, *args)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """The tokenizer of another run: the same number of pieces, trained on another seed's world."""
    out = tmp_path_factory.mktemp("other") / "out"
    result = train(out, "--seed", "1", "--stage", "pretrain")
    assert result.returncode == 0, result.stderr
    return out / "tokenizer.model"


def drop_last_line(path: Path):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


@pytest.mark.parametrize("change, expected", [
    (["--lora_rank", "2"], "lora_rank 0 -> 2"),  # a LoRA re-fine-tune over a finished full fine-tune
    (["--dim", "64"], "dim 32 -> 64"),
    (["--dtype", "bfloat16"], "dtype 'float32' -> 'bfloat16'"),
    ("data/finetune_ood.jsonl", "finetune_data"),  # the same path, other contents
    ("data/pretrain.txt", "pretrain_data"),
])
def test_resume_refuses_a_finished_stage_made_with_other_settings_or_inputs(trained, tmp_path, change, expected):
    out = copy_of(trained, tmp_path)
    tuned = (out / "finetuned.pt").read_bytes()
    if isinstance(change, str):
        drop_last_line(out / change)
        change = []
    result = train(out, "--resume", *change)
    assert_one_line_error(result, expected)
    assert "--resume:" in result.stderr and "made with other settings or inputs" in result.stderr
    assert (out / "finetuned.pt").read_bytes() == tuned


def test_resume_skips_a_stage_finished_with_the_same_settings(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    tuned = (out / "finetuned.pt").read_bytes()
    result = train(out, "--resume")
    assert result.returncode == 0, result.stderr
    for stage in ("pretrain", "finetune"):
        assert f"{stage}: finished already with these settings" in result.stdout
    assert (out / "finetuned.pt").read_bytes() == tuned


def test_a_stopped_stage_does_not_resume_over_a_changed_input(tmp_path):
    out = tmp_path / "out"
    proc = start("train.py", "--out_dir", out, *TINY, "--stage", "pretrain", "--pretrain_steps", "400")
    wait_for(proc, "pretrain step 3/400")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and (out / "pretrain_state.pt").exists(), stderr
    drop_last_line(out / "data/pretrain.txt")
    result = run_here("train.py", "--out_dir", out, *TINY, "--stage", "pretrain", "--pretrain_steps", "400", "--resume")
    assert_one_line_error(result, "pretrain_data")


def test_another_runs_tokenizer_is_refused_though_its_size_is_the_same(trained, other_tokenizer, tmp_path):
    out = copy_of(trained, tmp_path)
    sizes = [spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
             for path in (other_tokenizer, out / "tokenizer.model")]
    assert sizes[0] == sizes[1] and other_tokenizer.read_bytes() != (out / "tokenizer.model").read_bytes()
    shutil.copyfile(other_tokenizer, out / "tokenizer.model")
    assert_one_line_error(run_here("infer.py", "--out_dir", out, "--prompt", "the"), "is not the tokenizer")
    assert_one_line_error(train(out, "--stage", "eval"), "is not the tokenizer")
    assert_one_line_error(train(out, "--stage", "finetune"), "is not the tokenizer")


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with DirectoryLock(str(out)):  # this test process is "the other run"
        assert_one_line_error(train_process(out), f"is in use by another run (pid {os.getpid()})")
    assert {p: p.read_bytes() for p in before} == before
    assert train_process(out, "--stage", "eval").returncode == 0  # released: the next run may go on


def test_the_lock_goes_with_its_holder_even_when_it_is_killed(tmp_path):
    """flock, not a file's presence: a holder that was killed holds nothing."""
    out = tmp_path / "out"
    proc = start("train.py", "--out_dir", out, *TINY, *SLOW_STEPS, "--stage", "pretrain", "--pretrain_steps", "400")
    wait_for(proc, "pretrain step 1/400")  # (400 slow steps: it holds the lock for minutes)
    assert_one_line_error(train_process(out), f"is in use by another run (pid {proc.pid})")
    proc.kill()
    proc.wait()
    with DirectoryLock(str(out)):
        pass


def test_a_run_inside_a_several_seeds_run_is_refused_while_that_seed_trains(tmp_path):
    """lab.py --seeds holds OUT and, while a seed trains, OUT/seed_K too: a second run on OUT/seed_K is refused
    (it used to delete the seed's files under the outer run, which then died with a traceback)."""
    out = tmp_path / "out"
    proc = start("experiments/lab.py", "--out_dir", out, *TINY, *SLOW_STEPS, "--seeds", "2", "--pretrain_steps", "400")
    wait_for(proc, "pretrain step 1/400")
    assert_one_line_error(train_process(out / "seed_0"), f"is in use by another run (pid {proc.pid})")
    assert_one_line_error(run("experiments/lab.py", "--out_dir", out, "--seeds", "2"), "is in use by another run")
    proc.kill()
    proc.wait()


def test_json_never_overwrites_an_input_or_a_checkpoint(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    test_set = out / "data/ood_test.jsonl"
    elsewhere = tmp_path / "other.pt"
    torch.save({"model": {}}, elsewhere)
    for target, expected in [(out / "finetuned.pt", "one of this command's inputs"),
                             (test_set, "one of this command's inputs"),
                             (out / "tokenizer.model", "one of this command's inputs"),
                             (elsewhere, "is not an earlier result"),
                             (out / ".lock", "is not an earlier result"),  # (a pid: valid JSON, but no result)
                             (out / "data/world.json", "is not an earlier result")]:
        before = target.read_bytes()
        assert_one_line_error(run_here("infer.py", "--out_dir", out, "--eval", test_set, "--json", target), expected)
        assert target.read_bytes() == before
    earlier = write(tmp_path / "results.json", '{"results": {}}')  # an earlier result is replaced
    assert run_here("infer.py", "--out_dir", out, "--eval", test_set, "--json", earlier).returncode == 0
    assert "ood_test" in earlier.read_text()


def files_in(out: Path) -> set[str]:
    return {p.name + "/" * p.is_dir() for p in out.iterdir() if p.name != ".lock"}


def test_ctrl_c_in_the_last_step_of_a_stage_saves_it_and_stops_before_the_next(tmp_path):
    out = tmp_path / "out"
    flags = [*TINY, *SLOW_STEPS, "--pretrain_steps", "2", "--finetune_steps", "400"]
    proc = start("train.py", "--out_dir", out, *flags)
    wait_for(proc, "pretrain step 1/2")  # step 2, the stage's last, is under way: a signal lands in it or after
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert "pretrain: Ctrl-C came as the stage ended" in last, stderr
    assert last.endswith(f"{out} holds data/, base.pt, tokenizer.model")  # exactly what is there:
    assert files_in(out) == {"data/", "tokenizer.model", "base.pt"}
    torch.load(out / "base.pt", weights_only=True)
    resumed = run_here("train.py", "--out_dir", out, *flags, "--finetune_steps", "2", "--resume")  # goes on from there
    assert resumed.returncode == 0, resumed.stderr
    assert "pretrain: finished already with these settings" in resumed.stdout and (out / "results.json").exists()


def test_ctrl_c_before_anything_is_saved_says_so(trained, tmp_path):
    data = trained / "data"  # all data the user's own: the run writes nothing before base.pt
    own = ["--pretrain_text", data / "pretrain.txt", "--finetune", data / "finetune_ood.jsonl",
           "--eval", data / "ood_test.jsonl"]
    out = tmp_path / "out"
    proc = start("train.py", "--out_dir", out, *TINY, *own, *SLOW_STEPS, "--pretrain_steps", "400")
    wait_for(proc, "pretrain step 1/400")
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first one is heard (a step takes about half a second) ...
        if "stopping after this step" in line:
            break
    proc.send_signal(signal.SIGINT)  # ... and the second stops at once, without saving
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted: stopped at once; {out} holds tokenizer.model.new"
    assert files_in(out) == {"tokenizer.model.new"}  # the tokenizer waits under its own name for base.pt


def test_a_new_pretraining_removes_what_was_made_from_the_old_base(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    result = train(out, "--stage", "pretrain", "--pretrain_steps", "4")
    assert result.returncode == 0, result.stderr
    assert files_in(out) == {"data/", "base.pt", "tokenizer.model"}
    assert_one_line_error(run_here("infer.py", "--out_dir", out, "--prompt", "the"), "finetuned.pt")


def test_stage_files_go_down_in_an_order_consistent_at_every_instant(trained, tmp_path, monkeypatch):
    """Every removal and rename (each save ends in one) of two stages of a real run, in this process, in order:
    whatever instant a kill comes at, the files on disk belong together or the stage is plainly unfinished."""
    import train
    from machinery import rundir
    out, events = copy_of(trained, tmp_path), []
    rename = os.replace
    monkeypatch.setattr(rundir, "remove", lambda *paths: [events.append(("remove", os.path.basename(p))) for p in paths]
                        and common.remove(*paths))
    monkeypatch.setattr(os, "replace",
                        lambda src, dst: events.append(("write", os.path.basename(dst))) or rename(src, dst))
    run_files = lambda: [e for e in events if not e[1].endswith(".tmp")]  # (leftovers of killed saves: none here)
    train.main(["--out_dir", str(out), *map(str, TINY_RUN), "--threads", "1", "--stage", "pretrain"])
    assert run_files() == [("write", "tokenizer.model.new"),  # trained first, under a name no reader uses
                           *(("remove", f) for f in ("results.json", "auto.json", "finetuned.pt", "ffn_snapshot.pt",
                                                "base.pt", "finetune_state.pt")),
                      ("write", "tokenizer.model"), ("write", "base.pt"), ("remove", "pretrain_state.pt")]
    events.clear()
    train.main(["--out_dir", str(out), *map(str, TINY_RUN), "--threads", "1", "--stage", "finetune"])
    assert run_files() == [("remove", "results.json"), ("remove", "auto.json"), ("remove", "finetuned.pt"),
                      ("write", "ffn_snapshot.pt"), ("write", "finetuned.pt"), ("remove", "finetune_state.pt")]


def test_stale_temporary_files_are_removed_and_an_unusable_out_dir_is_refused_up_front(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    for stale in (out / "base.pt.tmp", out / "data" / "ood_test.jsonl.tmp"):
        stale.write_bytes(b"half a file")
    assert train(out, "--stage", "eval").returncode == 0
    assert not list(out.rglob("*.tmp"))
    not_a_folder = write(tmp_path / "file", "x")
    assert_one_line_error(train(not_a_folder / "out"), "cannot create the folder")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_a_failed_save_is_one_line_and_leaves_the_old_file_and_no_tmp(tmp_path):
    path = tmp_path / "base.pt"
    path.write_bytes(b"the good file")
    (tmp_path / "base.pt.tmp").symlink_to("/dev/full")  # the save's temporary file lands on a full disk
    with pytest.raises(common.UserError, match="cannot write .*base.pt: No space left on device"):
        common.save_checkpoint(str(path), {"model": torch.zeros(100_000)})
    assert path.read_bytes() == b"the good file" and not os.path.lexists(tmp_path / "base.pt.tmp")
