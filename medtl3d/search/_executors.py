"""Where trials run: in this process (``local``, the default) or as Ray tasks (``ray``).

Both take a list of :class:`TrialSpec` and call ``on_result`` with each finished record, in the driver process, as
soon as it finishes: the driver alone appends to the results store. With Ray each trial is a task with its own CPU
/ GPU request; ``address`` joins a running cluster (``ray.init(address=...)``), otherwise a local Ray instance is
started with ``num_cpus``. Ray is optional (``pip install medtl3d[distributed]``).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from ..errors import SearchError
from ._trial import TrialSpec, run_trial

EXECUTORS = ("local", "ray")


@runtime_checkable
class Executor(Protocol):
    """What runs trials: ``map`` calls ``on_result`` with each finished trial's record, in this process; ``name``
    goes into the report. A bundle's ``search#executor`` / ``study#executor`` may be any such component."""

    name: str

    def map(self, specs: Sequence[TrialSpec], on_result: Callable[[dict], None]) -> None: ...


class TrialError(SearchError):
    """A trial that failed; names the trial and keeps the original error's message."""


def _failure(spec: TrialSpec, where: str, error: BaseException) -> TrialError:
    """Name the trial, the root cause (MONAI wraps errors raised inside config expressions) and the trial's log."""
    while error.__cause__ is not None:
        error = error.__cause__
    log = f"{spec.ids['output_dir']}/trial.log"
    return TrialError(f"trial {spec.key} failed{where}: {type(error).__name__}: {error} (its log: {log})")


class LocalExecutor:
    """Trials one after another in this process."""

    name = "local"

    def map(self, specs: Sequence[TrialSpec], on_result: Callable[[dict], None]) -> None:
        for spec in specs:
            try:
                record = run_trial(spec)
            except Exception as err:  # a config-id SystemExit passes through with its own one-line message
                raise _failure(spec, "", err) from err
            on_result(record)


class RayExecutor:
    """Each trial a Ray task (``num_cpus`` = the trial's threads, at least one per process; ``num_gpus`` =
    ``gpus_per_trial``)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, gpus_per_trial: float = 0) -> None:
        try:
            import ray
        except ImportError:
            raise SearchError("executor 'ray' needs Ray: pip install 'medtl3d[distributed]'") from None
        self.ray = ray
        self.gpus_per_trial = float(gpus_per_trial)
        if not ray.is_initialized():
            options = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
            ray.init(**options, log_to_driver=False, configure_logging=False)

    def map(self, specs: Sequence[TrialSpec], on_result: Callable[[dict], None]) -> None:
        ray = self.ray
        pending = {}
        for spec in specs:
            cpus = max(spec.threads or 1, spec.processes)
            task = ray.remote(num_cpus=cpus, num_gpus=self.gpus_per_trial, max_retries=0)(run_trial)
            pending[task.remote(spec)] = spec
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            try:
                on_result(ray.get(done[0]))
            except ray.exceptions.RayTaskError as err:
                for ref in pending:
                    ray.cancel(ref)
                raise _failure(spec, " in a Ray worker", err.cause if getattr(err, "cause", None) else err) from None


def make_executor(name: str | Executor, *, address: str | None = None, num_cpus: int | None = None,
                  gpus_per_trial: float = 0) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``, with Ray's options); an executor object is returned
    as it is (a bundle builds it as a component)."""
    if isinstance(name, Executor):
        return name
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus, gpus_per_trial=gpus_per_trial)
    raise SearchError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
