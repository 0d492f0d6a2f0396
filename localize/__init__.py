"""Localization: calibration, detection, the per-prompt NeMo search, the corpus runner, the merge.

Notebook use:

    from nemo_surgery.model import load_model, select_layers
    from nemo_surgery.localize import Scorer, ScoreSettings, calibrate, detect, Localizer
"""

from .calibrate import Calibration, calibrate
from .detect import Detection, detect
from .merge import MergeSettings, make_plan
from .runner import Engine, process_prompt, run_corpus
from .score import Scorer, value_activations
from .search import Localizer, PromptResult
from .settings import MsSsim, ScoreSettings, SearchSettings

__all__ = ["Calibration", "calibrate", "Detection", "detect", "MergeSettings", "make_plan", "Engine",
           "process_prompt", "run_corpus", "Scorer", "value_activations", "Localizer", "PromptResult",
           "MsSsim", "ScoreSettings", "SearchSettings"]
