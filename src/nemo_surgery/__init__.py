"""nemo-surgery: find the neurons that make a Stable Diffusion model reproduce memorized
training images (NeMo, NeurIPS 2024), zero them in the checkpoint, and ship a verified release.

Stages (each importable on its own, each a pure function of typed records):
`nemo_surgery.localize` -> `nemo_surgery.surgery` -> `nemo_surgery.export`.
"""

import os as _os

# Never reach for a hub: every model is a local folder or file (see README, "Security").
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
