"""A progress bar over the cases of a folder inference, on a terminal only (a log file would fill with
carriage-return lines)."""

from __future__ import annotations

from collections import Counter

from ignite.engine import Engine, Events
from tqdm.auto import tqdm

from ..engine.runtime import on_terminal


class CaseProgress:
    """Handler: a ``tqdm`` bar counting finished cases, with the count of each status, when stderr is a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.bar, self.counts = enabled, None, Counter()

    def attach(self, engine: Engine) -> None:
        if not (self.enabled and on_terminal()):
            return
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def open(self, engine: Engine) -> None:
        self.counts = Counter()
        self.bar = tqdm(total=len(engine.data_loader.dataset), desc="inference", unit="case")

    def update(self, engine: Engine) -> None:
        rows = engine.state.output["rows"]
        self.counts.update(finished.row["status"] for finished in rows)
        self.bar.update(len(rows))
        self.bar.set_postfix(self.counts, refresh=False)

    def close(self, engine: Engine) -> None:
        self.bar.close()
