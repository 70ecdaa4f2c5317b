"""Optional TensorBoard scalars beside the JSON-lines log (only where tensorboard is importable)."""

from __future__ import annotations

import os


class TensorBoardLog:
    """Writes each log record's numbers as TensorBoard scalars at the record's step.

    Does nothing (``enabled`` is False) when ``torch.utils.tensorboard`` cannot be imported
    because the optional ``tensorboard`` package is absent.

    Args:
        folder: the event-file folder (e.g. ``out_dir/tensorboard``).
    """

    def __init__(self, folder: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(folder))

    @property
    def enabled(self) -> bool:
        """Whether events are written."""
        return self.writer is not None

    def add(self, record: dict) -> None:
        """Add the numeric fields of a JSON-lines record (``step`` is the x axis)."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
