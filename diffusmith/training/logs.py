"""Training logs: a CSV file always, TensorBoard event files when tensorboard is installed."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
COLUMNS = ("step", "epoch", "loss", "lr", "step_seconds")


class MetricsLog:
    """Appends one row per optimizer step to ``logs/metrics.csv`` (kept across resumes, rows after the
    resumed step are dropped so the file matches the run) and mirrors them to TensorBoard."""

    def __init__(self, folder: Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.csv"
        rows = []
        if self.path.exists() and resume_step > 0:
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            logger.info("tensorboard is not installed: logging to %s only (pip install tensorboard)", self.path)

    def log(self, step: int, epoch: int, loss: float, lr: float, step_seconds: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, epoch, f"{loss:.6g}", f"{lr:.6g}", f"{step_seconds:.4f}"])
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/step_seconds", step_seconds, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
