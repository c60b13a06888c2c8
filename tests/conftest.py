import os
import sys

import torch

# Tests import the top-level modules (model, taia, ...) as a reader would: from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
