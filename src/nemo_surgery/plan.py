"""The surgery plan: which rows of which value layers to zero, and where that decision came from.

Declarative on purpose (like a mergekit config): localization writes it, surgery executes it,
and a person or auditor can read it. Format `nemo-surgery-plan`, version 1:

    {"format": "nemo-surgery-plan", "version": 1,
     "layers": {"<module path>": [sorted neuron indices]},
     "counts": {"<module path>": {"<neuron>": prompts needing it}},
     "model": {"fingerprint": ..., "value_digest": ..., "shapes": {"<module path>": [out, in]}},
     "corpus": {"sha256": ..., "prompts": N, "memorized": M},
     "settings": {...}, "tool": {"name": "nemo-surgery", "version": ..., "libraries": {...}},
                        # + "localization_libraries" where the results were found on other ones
     "check": {...}}     # optional: mitigation figures measured when the plan was made
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NemoError
from .files import canonical_json, sha256_bytes, write_json_atomic
from .provenance import tool_record

PLAN_FORMAT = "nemo-surgery-plan"
PLAN_VERSION = 1


@dataclass
class Plan:
    layers: dict[str, list[int]]
    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, Any] = field(default_factory=tool_record)
    check: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One order for every plan, as plan.json stores it, so that a plan made in this run and the
        # same plan read back are equal in every respect (iteration order included).
        self.layers = {k: sorted(v) for k, v in sorted(self.layers.items())}

    @property
    def n_neurons(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "layers": {k: sorted(v) for k, v in sorted(self.layers.items()) if v},
            "counts": {k: {str(n): c for n, c in sorted(v.items())} for k, v in sorted(self.counts.items()) if v},
            "model": self.model,
            "corpus": self.corpus,
            "settings": self.settings,
            "tool": self.tool,
            "check": self.check,
        }

    def sha256(self) -> str:
        return sha256_bytes(canonical_json(self.to_dict()).encode())

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise NemoError(f"{where}: not a nemo-surgery plan (top level is not a JSON object)")
        if d.get("format") != PLAN_FORMAT:
            raise NemoError(f"{where}: not a nemo-surgery plan (format is {d.get('format')!r}, "
                            f"expected {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise NemoError(f"{where}: plan version {d.get('version')!r} is not supported "
                            f"(this tool reads version {PLAN_VERSION})")
        layers_raw = d.get("layers")
        if not isinstance(layers_raw, dict):
            raise NemoError(f"{where}: 'layers' must be an object of module path -> neuron list")
        layers: dict[str, list[int]] = {}
        for name, rows in layers_raw.items():
            if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool)
                                                     for r in rows):
                raise NemoError(f"{where}: layers[{name!r}] must be a list of integers")
            if any(r < 0 for r in rows):
                raise NemoError(f"{where}: layers[{name!r}] has a negative neuron index")
            if len(set(rows)) != len(rows):
                raise NemoError(f"{where}: layers[{name!r}] lists a neuron twice")
            layers[name] = sorted(rows)
        counts: dict[str, dict[int, int]] = {}
        counts_raw = d.get("counts", {})
        if not isinstance(counts_raw, dict):
            raise NemoError(f"{where}: 'counts' must be an object")
        for name, per in counts_raw.items():
            if not isinstance(per, dict):
                raise NemoError(f"{where}: counts[{name!r}] must be an object")
            try:
                counts[name] = {int(k): int(v) for k, v in per.items()}
            except (TypeError, ValueError, OverflowError):
                raise NemoError(f"{where}: counts[{name!r}] must map neuron indices to integers") from None
        sections = {}
        for key in ("model", "corpus", "settings", "tool", "check"):
            val = d.get(key, {})
            if not isinstance(val, dict):
                raise NemoError(f"{where}: '{key}' must be an object")
            sections[key] = val
        return cls(layers=layers, counts=counts, **sections)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NemoError(f"{path}: plan file not found") from None
        except UnicodeDecodeError as e:
            raise NemoError(f"{path}: plan is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise NemoError(f"{path}: cannot read plan ({e.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise NemoError(f"{path}: plan is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise NemoError(f"{path}: plan is not valid JSON (nested too deeply)") from None
        return cls.from_dict(data, where=str(path))

    def check_against(self, shapes: dict[str, tuple[int, int]], where: str = "plan",
                      fingerprint: str | None = None) -> None:
        """Refuse a plan made for another model: unknown layer, neuron out of range, or a
        fingerprint that differs from the model's."""
        want = self.model.get("fingerprint")
        if fingerprint is not None and want and want != fingerprint:
            raise NemoError(f"{where}: plan was made for model {want[:12]}, this model is "
                            f"{fingerprint[:12]} (use the plan made for this checkpoint)")
        for name, rows in self.layers.items():
            if name not in shapes:
                raise NemoError(f"{where}: unknown layer {name!r} (not a value layer of this model)")
            out = shapes[name][0]
            bad = [r for r in rows if r >= out]
            if bad:
                raise NemoError(f"{where}: neuron {bad[0]} out of range for {name} ({out} neurons)")
            want_shape = self.model.get("shapes", {}).get(name)
            if want_shape is not None and list(want_shape) != list(shapes[name]):
                raise NemoError(f"{where}: layer {name} has shape {list(shapes[name])} here, "
                                f"plan expects {list(want_shape)}")
