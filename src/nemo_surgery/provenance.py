"""What produced an output: the tool's version and the versions of the libraries its figures
depend on.

Results are deterministic for a seed only on the same software: torch, onnxruntime and their
kernels fix the float noise in which some search decisions sit (docs/method.md), diffusers and
transformers the model's forward and the tokenizer. Every output a user keeps (plan, calibration,
results, verification, audit, hardening, curve, card, report) records them, so that a rerun
that differs can be told apart from one that should not.
"""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import __version__

TOOL_NAME = "nemo-surgery"
# Distribution names, in the order a reader looks for them. Ray moves no figure (its actors run the
# local code); it is listed, where installed, so that a run sharded over it records which Ray ran it.
LIBRARIES = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "numpy", "onnxruntime",
             "onnx", "onnxslim", "torchmetrics", "scikit-image", "ray")


@functools.cache
def _installed() -> tuple[tuple[str, str], ...]:
    out = [("python", platform.python_version())]
    for name in LIBRARIES:
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            pass
    return tuple(out)


def libraries() -> dict[str, str]:
    """Python and the installed version of each library in LIBRARIES (those not installed left
    out), read from package metadata once, without importing anything; a fresh dict each call,
    so that no output's record can change another's."""
    return dict(_installed())


def versions_changed(old: Any, new: Any) -> list[str]:
    """`torch 2.12.0 -> 2.13.0` for each library whose version differs between two `libraries()`
    records; [] where they agree or `old` recorded none (an output written before versions were)."""
    if not isinstance(old, dict) or not old or not isinstance(new, dict):
        return []
    return [f"{k} {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def tool_record() -> dict[str, Any]:
    """The `tool` entry of every JSON output."""
    return {"name": TOOL_NAME, "version": __version__, "libraries": libraries()}


def libraries_text(libs: Any) -> str:
    """`python 3.12.3, torch 2.13.0+cpu, ...` for a card or report; "n/a" for an output written
    before versions were recorded."""
    if not isinstance(libs, dict) or not libs:
        return "n/a"
    return ", ".join(f"{k} {v}" for k, v in libs.items())
