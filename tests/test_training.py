"""The training loop under interruption and on several processes: Ctrl-C, SIGKILL and a non-finite loss
leave files that load, --resume ends exactly where an uninterrupted run ends, and 2 gloo processes give
the single-process result."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from helpers import ENV, TINY, TORCHRUN_2, command, copy_of, run, run_here, wait_for
from infer import FinishedRun
from helpers import start as start_program
from machinery import my_micro_batches
from machinery.threads import cores_per_process


def train(*args, launcher=(sys.executable,)):
    return run("train.py", *args, launcher=launcher)


def train_here(*args):
    """train.py as a program in this process (helpers.run_here): for the runs a test compares with or goes on
    from, which need no process of their own."""
    return run_here("train.py", *args)


def start(*args) -> subprocess.Popen:
    return start_program("train.py", *args)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), (name, (a[name] - b[name]).abs().max())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "out"
    result = train_here("--out_dir", out, *TINY, "--stage", "pretrain", "--pretrain_steps", "3")
    assert result.returncode == 0, result.stderr
    return out


def test_micro_batches_split_a_global_batch_evenly_over_processes():
    inputs = torch.arange(10 * 6).view(10, 6)
    targets = torch.full((10, 6), -100)
    targets[:, 1:3] = 1
    targets[0, 4] = 1  # only row 0 predicts column 4: its micro-batch keeps 5 columns, the others 3
    shares = [my_micro_batches(inputs, targets, micro_batch=3, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # ceil(10 / 3) = 4 micro-batches, 2 per process
    rows = sorted(int(x[i, 0]) for share in shares for x, _ in share for i in range(len(x)))
    assert rows == [6 * i for i in range(10)]  # every sequence exactly once
    assert all(len(x) <= 3 for share in shares for x, _ in share)
    widths = [x.shape[1] for share in shares for x, _ in share]
    assert sorted(widths) == [3, 3, 3, 5]


def test_ctrl_c_saves_a_resumable_checkpoint_and_resume_matches_an_uninterrupted_run(pretrained, tmp_path):
    # LoRA with dropout: the resumed run must restore the batch order and the dropout RNG as well.
    finetune = ["--stage", "finetune", *TINY, "--finetune_steps", "60", "--lora_rank", "4"]
    whole = copy_of(pretrained, tmp_path, "whole")
    assert train_here("--out_dir", whole, *finetune).returncode == 0

    stopped = copy_of(pretrained, tmp_path, "stopped")
    proc = start("--out_dir", stopped, *finetune)
    wait_for(proc, "finetune step 5/60")  # (55 steps left: the signal lands well before the end)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr.splitlines()[-1]
    state = torch.load(stopped / "finetune_state.pt", weights_only=True)
    assert 5 <= state["step"] < 60 and not (stopped / "finetuned.pt").exists()
    # Only what trains is in the state (the adapters); the frozen base is named by its fingerprint.
    assert state["model"] and all(name.endswith((".lora_A", ".lora_B")) for name in state["model"])
    assert state["run"]["base"] == torch.load(whole / "finetuned.pt", weights_only=True)["finetune"]["base"]

    result = train_here("--out_dir", stopped, *finetune, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resuming from {stopped / 'finetune_state.pt'} at step {state['step']}/60" in result.stdout
    assert_same_weights(weights(stopped / "finetuned.pt"), weights(whole / "finetuned.pt"))
    assert not (stopped / "finetune_state.pt").exists()  # done: nothing left to resume


def loads(path: Path):
    """Open a file the way the programs do; raises if it is damaged."""
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.name.startswith("tokenizer.model"):
        return spm.SentencePieceProcessor(model_file=str(path))
    return path.read_text(encoding="utf-8")


def test_sigkill_leaves_only_loadable_files_and_resume_finishes_the_run(tmp_path):
    pretrain = [*TINY, "--stage", "pretrain", "--pretrain_steps", "100", "--save_interval", "1"]
    assert train_here("--out_dir", tmp_path / "whole", *pretrain).returncode == 0

    out = tmp_path / "killed"
    proc = start("--out_dir", out, *pretrain)
    wait_for(proc, "pretrain step 20/100")
    proc.kill()
    proc.wait()
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".tmp"]  # .tmp: a save cut short
    assert out / "pretrain_state.pt" in files
    for path in files:
        loads(path)
    assert train("--out_dir", out, *pretrain, "--resume").returncode == 0
    assert_same_weights(weights(out / "base.pt"), weights(tmp_path / "whole" / "base.pt"))
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "whole" / "tokenizer.model").read_bytes()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    pretrain = [*TINY, "--stage", "pretrain", "--pretrain_steps", "60"]
    assert train_here("--out_dir", tmp_path / "whole", *pretrain).returncode == 0
    out = tmp_path / "out"
    proc = start("--out_dir", out, *pretrain)  # a good checkpoint, from Ctrl-C
    wait_for(proc, "pretrain step 3/60")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    good = (out / "pretrain_state.pt").read_bytes()
    step = torch.load(out / "pretrain_state.pt", weights_only=True)["step"]

    # Resumed with an absurd learning rate, the loss turns nan after one update: stop, keep the file.
    result = train_here("--out_dir", out, *pretrain, "--resume", "--pretrain_lr", "1e12", "--save_interval", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the loss became nan at step {step + 2}" in result.stderr
    assert f"pretrain_state.pt (step {step}) is the last good checkpoint" in result.stderr
    assert (out / "pretrain_state.pt").read_bytes() == good and not (out / "base.pt").exists()

    # With the learning rate back, the run ends exactly where an uninterrupted one does.
    assert train_here("--out_dir", out, *pretrain, "--resume").returncode == 0
    assert_same_weights(weights(out / "base.pt"), weights(tmp_path / "whole" / "base.pt"))


def test_resume_refuses_a_checkpoint_from_other_settings(pretrained, tmp_path):
    out = copy_of(pretrained, tmp_path, "out")
    finetune = ["--stage", "finetune", *TINY, "--finetune_steps", "4", "--save_interval", "2"]
    proc = start("--out_dir", out, *finetune, "--finetune_steps", "400")
    wait_for(proc, "finetune step 3/400")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    result = train_here("--out_dir", out, *finetune, "--resume")
    assert result.returncode == 2 and "finetune_steps" in result.stderr and "Traceback" not in result.stderr


def test_two_gloo_processes_give_the_single_process_result(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    # The same global batches (16 windows, 8 fine-tuning examples) in micro-batches of 2, on 1 and 2 processes.
    flags = [*TINY, "--micro_batch", "2", "--pretrain_steps", "4", "--finetune_steps", "3", "--modes", "base,taia"]
    single = train_here("--out_dir", tmp_path / "one", *flags)
    assert single.returncode == 0, single.stderr
    double = train("--out_dir", tmp_path / "two", *flags, launcher=TORCHRUN_2)
    assert double.returncode == 0, double.stderr
    for name in ("base.pt", "finetuned.pt"):
        assert_same_weights(weights(tmp_path / "two" / name), weights(tmp_path / "one" / name), atol=1e-5)
    assert len(printed_losses(single)) == 7  # printed once (rank 0), the same to 4 decimals
    assert printed_losses(double) == printed_losses(single)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["results"] == two["results"]

    # Sharded (FSDP2): the same weights and losses, and TAIA built from its files is TAIA built from one's.
    fsdp = train("--out_dir", tmp_path / "fsdp", *flags, "--fsdp", launcher=TORCHRUN_2)
    assert fsdp.returncode == 0, fsdp.stderr
    assert fsdp.stdout.count("sharded over 2 processes (FSDP2)") == 2  # pretraining and fine-tuning
    for name in ("base.pt", "finetuned.pt"):
        assert_same_weights(weights(tmp_path / "fsdp" / name), weights(tmp_path / "one" / name), atol=1e-5)
    assert printed_losses(fsdp) == printed_losses(single)
    taia_models = [FinishedRun(str(tmp_path / d)).build("taia").state_dict() for d in ("one", "fsdp")]
    assert_same_weights(*taia_models, atol=1e-5)
    # LoRA with dropout: each micro-batch draws its masks by its place in the global batch, not by process.
    lora = ["--stage", "finetune", "--lora_rank", "2", "--lora_dropout", "0.05", "--finetune_lr", "1e-2"]
    assert train_here("--out_dir", tmp_path / "one", *flags, *lora).returncode == 0
    double = train("--out_dir", tmp_path / "two", *flags, *lora, launcher=TORCHRUN_2)
    assert double.returncode == 0, double.stderr
    assert_same_weights(weights(tmp_path / "two" / "finetuned.pt"), weights(tmp_path / "one" / "finetuned.pt"),
                        atol=1e-5)
    # ... and dropout did change the updates (so the test above could have failed).
    no_dropout = copy_of(tmp_path / "one", tmp_path, "no_dropout")
    assert train_here("--out_dir", no_dropout, *flags, *lora, "--lora_dropout", "0").returncode == 0
    a, b = weights(no_dropout / "finetuned.pt"), weights(tmp_path / "one" / "finetuned.pt")
    assert max((a[k] - b[k]).abs().max() for k in a) > 1e-4


def printed_losses(result) -> list[str]:
    return [line.split(" loss ")[1].split()[0] for line in result.stdout.splitlines() if " loss " in line]


def test_a_sharded_run_stopped_on_2_processes_and_resumed_on_4_ends_where_an_uninterrupted_one_does(pretrained,
                                                                                                   tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    psutil = pytest.importorskip("psutil")
    finetune = ["--stage", "finetune", *TINY, "--micro_batch", "2", "--finetune_steps", "60", "--fsdp"]
    whole = copy_of(pretrained, tmp_path, "whole")
    assert train("--out_dir", whole, *finetune, launcher=TORCHRUN_2).returncode == 0

    stopped = copy_of(pretrained, tmp_path, "stopped")
    proc = subprocess.Popen(command("train.py", "--out_dir", stopped, *finetune, launcher=TORCHRUN_2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(proc, "finetune step 5/60")
    for worker in psutil.Process(proc.pid).children():  # Ctrl-C reaches every process of a terminal's job
        worker.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    step = torch.load(stopped / "finetune_state.pt", weights_only=True)["step"]
    assert 5 <= step < 60 and not (stopped / "finetuned.pt").exists()

    # The state holds whole tensors: the run may go on with another number of processes.
    result = train("--out_dir", stopped, *finetune, "--resume", launcher=(*TORCHRUN_2[:-1], "4"))
    assert result.returncode == 0, result.stderr
    assert f"resuming from {stopped / 'finetune_state.pt'} at step {step}/60" in result.stdout
    assert_same_weights(weights(stopped / "finetuned.pt"), weights(whole / "finetuned.pt"), atol=1e-5)


def test_compiled_training_saves_plain_parameter_names(tmp_path):
    out = tmp_path / "out"
    result = train("--out_dir", out, *TINY, "--stage", "pretrain", "--pretrain_steps", "2", "--compile")
    assert result.returncode == 0, result.stderr
    names = list(weights(out / "base.pt"))
    assert "embed.weight" in names and not any("_orig_mod" in n or n.startswith("module.") for n in names)


def test_threads_auto_tunes_the_count_and_changes_no_number(tmp_path):
    """--threads auto switches between thread counts while training; the weights must come out exactly as
    with one thread throughout (the tuner only uses counts it found to give bit-identical gradients)."""
    if cores_per_process() < 2:
        pytest.skip("one core: there is nothing to tune")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}  # auto honours OMP_NUM_THREADS when set
    flags = [*TINY, "--pretrain_steps", "30", "--finetune_steps", "25", "--modes", "base,taia"]
    auto = run("train.py", "--out_dir", tmp_path / "auto", *flags, "--threads", "auto", env=env)
    assert auto.returncode == 0, auto.stderr
    one = run("train.py", "--out_dir", tmp_path / "one", *flags, "--threads", "1", env=env)
    assert one.returncode == 0, one.stderr
    assert "pretrain: 1 thread per process, 1 process (--threads)" in one.stdout
    tuned = [line for line in auto.stdout.splitlines() if "per process" in line]
    if "would change the numbers" in tuned[0]:
        pytest.skip(f"this machine's kernels give other numbers with other thread counts: {tuned[0]}")
    assert tuned[0].startswith("pretrain: 1 or 2") and "tuned while training" in tuned[0], tuned
    used = {line.rsplit(" threads ", 1)[1] for line in auto.stdout.splitlines() if " ms/step " in line}
    assert used <= {"1", "2"} and used, auto.stdout  # the log line says which count the step ran with
    for name in ("base.pt", "finetuned.pt"):
        assert_same_weights(weights(tmp_path / "auto" / name), weights(tmp_path / "one" / name))
    assert "wall time: data" in auto.stdout and ", total " in auto.stdout
