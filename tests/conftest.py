import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Test helpers (tiny.py, reference_nemo.py) import by name; the package itself comes from the
# installed wheel or editable install, never from the source tree.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Commands without --cache-dir keep calibrations in $NEMO_SURGERY_CACHE: never the user's own
# cache during tests, nor one an earlier test run left.
_CACHE = tempfile.mkdtemp(prefix="nemo-surgery-test-cache-")
os.environ["NEMO_SURGERY_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
torch.set_num_threads(int(os.environ.get("NEMO_TEST_THREADS", "2")))
