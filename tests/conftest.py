import os
import sys
from pathlib import Path

import torch

# Test helpers (tiny.py, reference_nemo.py) import by name; the package itself comes from the
# installed wheel or editable install, never from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("NEMO_TEST_THREADS", "2")))
