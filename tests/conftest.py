import os
import sys

import pytest
import torch

# Tests import the top-level modules (model, taia, ...) as a reader would: from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny toy run (helpers.TINY_RUN), one per test module: tests that change it work on a copy."""
    from helpers import TINY_RUN, run
    out = tmp_path_factory.mktemp("run") / "out"
    result = run("train.py", "--out_dir", out, *TINY_RUN, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out
