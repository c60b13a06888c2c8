"""What the tests share: the repository's paths, flags for a model small enough to train in seconds,
and a runner for the real programs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
