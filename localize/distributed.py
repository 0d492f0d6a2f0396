"""The corpus over a Ray cluster: actors each hold the model once (one per GPU on a cluster, or
`workers` CPU actors on one machine) and run `process_prompt`, the same unit of work as the local
loop. Results stream back to the driver as they finish and go into the same resumable JSONL; a
prompt whose actor dies is retried on a fresh actor. Each record depends only on the prompt, the
model and the settings, so the merged plan is the local run's (up to decisions within float noise
of a threshold, which every record lists). The corpus pruning's UNet passes can run on such
actors too (`RayPruning`), its walk staying on the driver.

Ray is an optional extra (`pip install nemo-surgery[ray]`). The model folder must be readable at
the same path on every node; the calibration travels with the actors.
"""

from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..corpus import Prompt
from ..errors import NemoError
from .runner import Engine, process_prompt
from .search import Checker, Neurons, Unit

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
        self.checker: Checker | None = None
        self.search = ExitStack()

    def run(self, prompt: Prompt) -> dict:
        return process_prompt(self.engine, prompt, True)

    def hold_units(self, units: list[Unit], groups: list[list[int]], consistency: bool) -> None:
        """A corpus pruning's (prompt, seed) units, sent once, for `group_scores`; the scorer is in
        its search mode until the next call (head states kept from pass to pass meanwhile)."""
        self.search.close()
        self.checker = Checker(self.engine.scorer, units, groups, consistency, early_exit=False)
        self.search.enter_context(self.engine.scorer.searching())

    def group_scores(self, sets: list[Neurons], gids: list[list[int]]) -> list[list[float]]:
        assert self.checker is not None, "hold_units first"
        return self.checker.group_scores(sets, gids)


def share(k: int, actors: int, candidates: int) -> list[slice]:
    """Which of each candidate's groups actor `k` of `actors` scores in a pass: candidate j's m-th
    group goes to actor (m + j) mod `actors`. An early-exit walk's first stages are one group
    each, which would otherwise all go to the first actor."""
    return [slice((k - j) % actors, None, actors) for j in range(candidates)]


class ShardedChecker(Checker):
    """A corpus pruning's checker whose UNet passes run on Ray actors. Each pass's groups are dealt
    out over the actors (every n-th group of each candidate to the same one, each candidate starting
    at the next actor), which score them with a local checker's own code; the walk, and so the
    logic of every decision, stays here.
    A group's value does not depend on which others share its pass (up to float noise, as between
    a local pass's two onnxruntime runs), so the decisions are the local pruning's. An actor that
    dies is replaced by a new one (`new_actor`), which takes its share of the pass again."""

    def __init__(self, local: Checker, actors: list, new_actor: Callable[[], object],
                 log: Callable[[str], None] = lambda s: None):
        import ray

        super().__init__(local.scorer, local.units, local.groups, local.consistency, local.early_exit)
        self.actors, self.new_actor, self.log = actors, new_actor, log
        self.held = ray.put(local.units)
        self._hold(actors)

    def _hold(self, actors: list) -> None:
        import ray

        try:
            ray.get([a.hold_units.remote(self.held, self.groups, self.consistency) for a in actors])
        except ray.exceptions.RayActorError:
            raise NemoError("ray: a pruning worker died while taking the corpus's units; run the same command "
                            "again to resume the pruning from its journal") from None

    def group_scores(self, sets: list[Neurons], gids: list[list[int]]) -> list[list[float]]:
        import ray

        n = len(self.actors)
        out: list[list[float]] = [[0.0] * len(g) for g in gids]
        shares = [share(k, n, len(gids)) for k in range(n)]
        parts = [[g[s] for g, s in zip(gids, shares[k])] for k in range(n)]
        todo = [k for k in range(n) if any(parts[k])]
        for tries in range(MAX_TRIES):
            calls = [(k, self.actors[k].group_scores.remote(sets, parts[k])) for k in todo]
            todo = []
            for k, ref in calls:
                try:
                    part = ray.get(ref)
                except ray.exceptions.RayActorError:
                    todo.append(k)
                    continue
                for row, vals, s in zip(out, part, shares[k]):
                    row[s] = vals
            if not todo:
                return out
            if tries + 1 < MAX_TRIES:
                self.log(f"ray: {len(todo)} pruning worker(s) died; their share of the pass goes to new ones")
                for k in todo:
                    self.actors[k] = self.new_actor()
                self._hold([self.actors[k] for k in todo])
        raise NemoError(f"ray: a pruning worker died {MAX_TRIES} times on one pass; run the same command again "
                        f"to resume the pruning from its journal")

    def max_candidates(self) -> int:
        # A pass is cut over the actors, each taking up to a batch.
        return max(1, len(self.actors) * self.scorer.batch_size // max(1, len(self.units)))


def _ray():
    try:
        import ray
    except ImportError:
        raise NemoError("--ray needs Ray: pip install 'nemo-surgery[ray]'") from None
    return ray


@contextmanager
def _cluster(engine: Engine, model_path: Path, settings: RaySettings, log: Callable[[str], None],
             model_config: Path | None, cache_dir: Path | None, purpose: str,
             wanted: int | None = None) -> Iterator[tuple[Callable[[], object], int]]:
    """Ray started (or joined) for the duration: (a function that makes one more actor, how many
    to make: the cluster's GPUs, else `settings.workers` or 2 CPU actors, at most `wanted`)."""
    ray = _ray()
    from ..engine import Runtime

    started = not ray.is_initialized()
    if started:
        if settings.address:
            ray.init(address=settings.address, log_to_driver=False)
        else:
            ray.init(num_cpus=settings.workers or 2, include_dashboard=False, log_to_driver=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 and engine.model.device.type == "cuda"
        rt = Runtime(device="cuda" if use_gpu else "cpu", precision=engine.scorer.settings.precision,
                     batch_size=engine.scorer.batch_size, allow_pickle=False,
                     model_config=Path(model_config).resolve() if model_config else None,
                     backend=engine.scorer.settings.backend if not use_gpu else "torch")
        actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)(_Worker)
        args = (str(Path(model_path).resolve()), rt, engine.scorer.settings, engine.search, engine.calibration,
                settings.threads, str(Path(cache_dir).resolve()) if cache_dir else None)
        n = settings.workers or (gpus if use_gpu else 2)
        n = n if wanted is None else min(n, wanted)
        log(f"ray: {n} {'GPU' if use_gpu else 'CPU'} actor(s) for {purpose} on {ray.cluster_resources()}")
        yield (lambda: actor_cls.remote(*args)), n
    finally:
        if started:
            ray.shutdown()


def ray_stream(engine: Engine, model_path: Path, settings: RaySettings,
               log: Callable[[str], None] = lambda s: None,
               model_config: Path | None = None,
               cache_dir: Path | None = None) -> Callable[[Iterable[Prompt]], Iterator[dict]]:
    """A `worker` for `run_corpus`: yields one record per prompt, in completion order.
    `model_config`: a single-file model's configs folder, as the driver loaded it; `cache_dir`:
    the driver's cache (the ONNX search graph)."""
    ray = _ray()

    def stream(prompts: Iterable[Prompt]) -> Iterator[dict]:
        todo = deque((p, 0) for p in prompts)
        if not todo:
            return
        with _cluster(engine, model_path, settings, log, model_config, cache_dir, "the prompts",
                      len(todo)) as (new_actor, n):
            idle = [new_actor() for _ in range(n)]
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
                    idle.append(new_actor())
                    continue
                idle.append(actor)
                yield rec

    return stream


class RayPruning:
    """`make_plan`'s `shard` over Ray: the pruning's checker becomes a `ShardedChecker` on actors
    started at the first pruning (a plan read back from a finished merge starts none) and stopped
    with this context."""

    def __init__(self, engine: Engine, model_path: Path, settings: RaySettings,
                 log: Callable[[str], None] = lambda s: None, model_config: Path | None = None,
                 cache_dir: Path | None = None):
        self.args = (engine, model_path, settings, log, model_config, cache_dir)
        self.log = log
        self.stack = ExitStack()
        self.actors: list = []
        self.new_actor: Callable[[], object] | None = None

    def __call__(self, local: Checker) -> Checker:
        if not self.actors:
            self.new_actor, n = self.stack.enter_context(_cluster(*self.args, "the pruning"))
            self.actors = [self.new_actor() for _ in range(n)]
        return ShardedChecker(local, self.actors, self.new_actor, self.log)

    def __enter__(self) -> "RayPruning":
        return self

    def __exit__(self, *exc) -> None:
        self.actors = []
        self.stack.close()


def ray_pruning(engine: Engine, model_path: Path, settings: RaySettings | None,
                log: Callable[[str], None] = lambda s: None, model_config: Path | None = None,
                cache_dir: Path | None = None) -> AbstractContextManager:
    """A context giving `make_plan`'s `shard`: a `RayPruning` with `settings`, None without."""
    if settings is None:
        return nullcontext(None)
    return RayPruning(engine, model_path, settings, log, model_config, cache_dir)
