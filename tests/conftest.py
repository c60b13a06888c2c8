import os
import sys

import pytest
import torch

# Tests import the top-level modules (model, taia, ...) as a reader would: from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Under pytest-xdist (-n 2: two test processes on two cores) one thread each, or the two would fight over
# the cores; alone, up to two. No result may depend on it.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished tiny toy run (helpers.TINY_RUN), built once per test process (under xdist, once per
    worker) and shared: tests only read it, and a test that runs train.py on it, or changes it, works on a
    copy (helpers.copy_of)."""
    from helpers import TINY_RUN, run
    out = tmp_path_factory.mktemp("run") / "out"
    result = run("train.py", "--out_dir", out, *TINY_RUN, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out
