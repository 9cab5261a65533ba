"""Per-(seed, rank, epoch) data seeds: any epoch replays identically, so a resumed run continues bit-exactly."""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.data.utils import set_rnd

from .._blocks import _rank_and_world


class EpochSeeds:
    """At each epoch start, reseed ``loader``'s generator (which seeds its workers) and, without workers, the
    dataset's random transforms, from (``seed``, rank, epoch): the ranks of a distributed run draw different
    augmentations and no epoch depends on how earlier ones consumed a shared generator. The loader must have its
    own ``generator`` (:func:`medtl3d.engine.train_loader`'s)."""

    def __init__(self, loader, seed: int = 0) -> None:
        self.loader, self.seed = loader, seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        rank = _rank_and_world()[0]
        epoch_seed = (self.seed * 1_000_003 + rank * 10_007 + engine.state.epoch) % (2**31 - 1)
        self.loader.generator.manual_seed(epoch_seed)
        if self.loader.num_workers == 0:  # workers are seeded from the generator by MONAI's worker_init_fn
            set_rnd(self.loader.dataset, epoch_seed)
