"""Surgery: execute a plan on a checkpoint, streaming, so the output differs from the input only
in the planned rows of the value layers (and a provenance record in the header metadata)."""

from .apply import FORMATS, ApplyResult, apply_plan
from .keymap import LDM_PREFIX, diffusers_to_ldm, ldm_to_diffusers

__all__ = ["FORMATS", "LDM_PREFIX", "ApplyResult", "apply_plan", "diffusers_to_ldm", "ldm_to_diffusers"]
