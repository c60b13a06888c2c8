"""What the tests share: the repository's paths, flags for a model small enough to train in seconds,
and a runner for the real programs (in a process of their own, or as one in this process)."""
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# A model of 0.06M parameters on short windows and small batches; each test adds its own step counts.
TINY = ["--dim", "32", "--n_layers", "1", "--hidden_dim", "64", "--seq_len", "32", "--batch_tokens", "512",
        "--micro_batch", "8", "--finetune_batch", "8", "--log_interval", "1"]
# A whole run of that model: pretraining and fine-tuning of two steps each.
TINY_RUN = [*TINY, "--pretrain_steps", "2", "--finetune_steps", "2"]
# One thread per program: tests run side by side on two cores, and results must not depend on it.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")

try:
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers (requirements-dev.txt)")


def command(program: str, *args, launcher=(sys.executable,)) -> list[str]:
    return [*launcher, str(ROOT / program), *map(str, args)]


def run(program: str, *args, cwd=None, launcher=(sys.executable,), timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run train.py / infer.py / tools/bench.py to the end and capture what it printed (env: in place of ENV)."""
    return subprocess.run(command(program, *args, launcher=launcher), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


# The warning filters of a fresh interpreter (no -W, no PYTHONWARNINGS), under which the programs run.
FRESH_FILTERS = [("default", None, DeprecationWarning, "__main__", 0), ("ignore", None, DeprecationWarning, None, 0),
                 ("ignore", None, PendingDeprecationWarning, None, 0), ("ignore", None, ImportWarning, None, 0),
                 ("ignore", None, ResourceWarning, None, 0)]


def run_here(program: str, *args, cwd=None, changed: dict | None = None) -> subprocess.CompletedProcess:
    """What run() returns, without the two seconds a new process spends starting Python and importing torch:
    the program's file runs in this process as __main__ (runpy), so that its last line calls main() through
    common.run_cli as it always does, under what run() gives a process (below, as_a_program). For a refusal
    or a short run whose outcome does not depend on having a process of its own; signals, torchrun, the
    directory lock, a possible hang and the real program's traceback go through run().
    changed: {name: value} of the program's module-level names for this call, e.g. an experiment's grid cut
    to a few points (the file runs as a module, the names are replaced, then its main() runs through run_cli)."""
    path = str(ROOT / program)
    status = 0
    with captured() as printed, as_a_program(path, list(map(str, args)), cwd):
        try:
            if changed:
                from common import run_cli
                main = runpy.run_path(path, run_name="__changed__")["main"]
                assert changed.keys() <= main.__globals__.keys(), changed.keys() - main.__globals__.keys()
                main.__globals__.update(changed)  # (the globals main() reads: its module's, not a copy)
                run_cli(main)
            else:
                runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                status = e.code or 0
            else:  # sys.exit("message"): printed, status 1
                print(e.code, file=sys.stderr)
                status = 1
        except Exception:  # what the interpreter does with an exception that reaches it
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess([path, *map(str, args)], status, printed["stdout"], printed["stderr"])


@contextmanager
def as_a_program(path: str, argv: list[str], cwd=None):
    """This process as run() starts a program, for the block: its command line in sys.argv (argparse names the
    program by it), its folder on sys.path, the folder cwd, ENV's variables and so one thread, a fresh
    interpreter's warning filters (pytest's own would hide a warning the program prints). Afterwards all of it,
    the random generators and the signal handlers are as they were."""
    saved = (sys.argv, sys.path[:], os.getcwd(), dict(os.environ), torch.get_num_threads(),
             {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        sys.argv = [path, *argv]
        sys.path.insert(0, os.path.dirname(path))  # as the interpreter puts a script's folder first
        os.chdir(cwd or os.getcwd())
        os.environ.update({name: ENV[name] for name in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")})
        torch.set_num_threads(int(ENV["OMP_NUM_THREADS"]))
        warnings.filters[:] = FRESH_FILTERS
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        try:
            yield
        finally:
            sys.argv, sys.path[:] = saved[0], saved[1]
            os.chdir(saved[2])
            os.environ.clear()
            os.environ.update(saved[3])
            torch.set_num_threads(saved[4])
            for s, handler in saved[5].items():
                signal.signal(s, handler)


@contextmanager
def captured():
    """Everything written to stdout and stderr inside the block, by Python or by C code at the file
    descriptors 1 and 2 (the dict is filled when the block ends)."""
    printed, streams = {}, (sys.stdout, sys.stderr)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in streams:
            stream.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        try:
            yield printed
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for name, file in (("stdout", out), ("stderr", err)):
                file.seek(0)
                printed[name] = file.read().decode()


def start(program: str, *args) -> subprocess.Popen:
    """Start a program without waiting for it (to interrupt or kill it midway)."""
    return subprocess.Popen(command(program, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def wait_for(proc: subprocess.Popen, text: str):
    """Read a started program's output until a line holds `text` (to signal it at a known point)."""
    for line in proc.stdout:
        if text in line:
            return
    pytest.fail(f"the run ended before printing {text!r}: {proc.stderr.read()}")


def assert_one_line_error(result, expected: str):
    """The user's mistake: exit status 2 and one line `error: ...` on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def copy_of(run_dir: Path, tmp_path: Path, name: str = "out") -> Path:
    """A copy of a finished run (the shared `trained` fixture, a module's base) for a test that changes it."""
    return Path(shutil.copytree(run_dir, tmp_path / name))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
