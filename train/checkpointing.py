"""Training checkpoints with orbax: the train state (params, optimizer state, step), the data iterator position and
the run's configs, saved together every N steps (asynchronously), the last K kept.

Orbax writes each step into a temporary directory and renames it when complete, so a process killed during a
save leaves the previous checkpoint as the latest loadable one; the unfinished directory is removed when the
next run opens the checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from train.data import DataState
from train.step import TrainState


class Checkpointer:
    """An orbax CheckpointManager over `directory` with items state / data / meta."""

    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
                                               create=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data: DataState, meta: dict[str, Any], force: bool = False) -> bool:
        """Start saving (returns at once when asynchronous) if `step` is on the save interval or `force`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data._asdict()),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, DataState, dict]:
        """The state (placed with the shardings in `abstract_state`), data position and meta of `step` (default:
        the latest complete checkpoint)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 data=ocp.args.JsonRestore(),
                                                                 meta=ocp.args.JsonRestore()))
        return TrainState(*out["state"]), DataState(**out["data"]), out["meta"]

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
