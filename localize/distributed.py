"""The corpus over a Ray cluster: actors each hold the model once (one per GPU on a cluster, or
`workers` CPU actors on one machine) and run `process_prompt`, the same unit of work as the local
loop. Results stream back to the driver as they finish and go into the same resumable JSONL; a
prompt whose actor dies is retried on a fresh actor. Each record depends only on the prompt, the
model and the settings, so the merged plan is the local run's (up to decisions within float noise
of a threshold, which every record lists).

Ray is an optional extra (`pip install nemo-surgery[ray]`). The model folder must be readable at
the same path on every node; the calibration travels with the actors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..corpus import Prompt
from ..errors import NemoError
from .runner import Engine, process_prompt

MAX_TRIES = 3


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local cluster; else ray.init(address=...)
    workers: int | None = None  # actors; default: GPUs of the cluster, else 2 CPU actors
    threads: int = 1  # torch threads per CPU actor


class _Worker:
    def __init__(self, model: str, runtime, score, search, calibration, threads: int, cache_dir: str | None):
        import torch

        from ..engine import make_scorer, open_model
        from ..model import select_layers

        torch.set_num_threads(threads)
        m = open_model(Path(model), runtime)
        # The driver's backend; its cached ONNX graph is reused where the cache folder is shared.
        scorer = make_scorer(m, runtime, score, Path(cache_dir) if cache_dir else None)
        self.engine = Engine(m, scorer, calibration, select_layers(m.value_layers, search.layers), search)

    def run(self, prompt: Prompt) -> dict:
        return process_prompt(self.engine, prompt, True)


def ray_stream(engine: Engine, model_path: Path, settings: RaySettings,
               log: Callable[[str], None] = lambda s: None,
               model_config: Path | None = None,
               cache_dir: Path | None = None) -> Callable[[Iterable[Prompt]], Iterator[dict]]:
    """A `worker` for `run_corpus`: yields one record per prompt, in completion order.
    `model_config`: a single-file model's configs folder, as the driver loaded it; `cache_dir`:
    the driver's cache (the ONNX search graph)."""
    try:
        import ray
    except ImportError:
        raise NemoError("--ray needs Ray: pip install 'nemo-surgery[ray]'") from None
    from ..engine import Runtime

    def stream(prompts: Iterable[Prompt]) -> Iterator[dict]:
        todo = deque((p, 0) for p in prompts)
        if not todo:
            return
        started = not ray.is_initialized()
        if started:
            if settings.address:
                ray.init(address=settings.address, log_to_driver=False)
            else:
                ray.init(num_cpus=settings.workers or 2, include_dashboard=False, log_to_driver=False)
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = gpus > 0 and engine.model.device.type == "cuda"
            n = settings.workers or (gpus if use_gpu else 2)
            rt = Runtime(device="cuda" if use_gpu else "cpu", precision=engine.scorer.settings.precision,
                         batch_size=engine.scorer.batch_size, allow_pickle=False,
                         model_config=Path(model_config).resolve() if model_config else None,
                         backend=engine.scorer.settings.backend if not use_gpu else "torch")
            actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)(_Worker)
            args = (str(Path(model_path).resolve()), rt, engine.scorer.settings, engine.search, engine.calibration,
                    settings.threads, str(Path(cache_dir).resolve()) if cache_dir else None)
            actors = [actor_cls.remote(*args) for _ in range(min(n, len(todo)))]
            log(f"ray: {len(actors)} {'GPU' if use_gpu else 'CPU'} actor(s) on {ray.cluster_resources()}")
            idle = list(actors)
            running: dict = {}
            while todo or running:
                while todo and idle:
                    actor = idle.pop()
                    prompt, tries = todo.popleft()
                    running[actor.run.remote(prompt)] = (actor, prompt, tries)
                done, _ = ray.wait(list(running), num_returns=1)
                actor, prompt, tries = running.pop(done[0])
                try:
                    rec = ray.get(done[0])
                except ray.exceptions.RayActorError:
                    if tries + 1 >= MAX_TRIES:
                        raise NemoError(f"prompt {prompt.id}: its Ray worker died {MAX_TRIES} times") from None
                    log(f"ray: worker died on prompt {prompt.id}; retrying on a new worker")
                    todo.appendleft((prompt, tries + 1))
                    idle.append(actor_cls.remote(*args))
                    continue
                idle.append(actor)
                yield rec
        finally:
            if started:
                ray.shutdown()

    return stream
