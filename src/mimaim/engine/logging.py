"""Metrics: a CSV file, TensorBoard events, and console messages (rank 0 only). A column that first appears
later (the online probe's, or a resumed run that turns it on) widens the CSV header; with a ``flops`` column the
``online_*`` scalars are also written against training FLOPs (TensorBoard ``online_vs_flops/``)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path


class MetricsLogger:
    """Appends rows to ``metrics.csv`` and scalars to TensorBoard; a no-op off rank 0."""

    def __init__(self, run_dir: Path | None, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self._csv = self._tb = None
        self._fields: list[str] | None = None
        if not self.enabled:
            return
        self.path = Path(run_dir) / "metrics.csv"
        if self.path.exists():
            with open(self.path) as f:
                header = f.readline().strip()
            self._fields = header.split(",") if header else None
        self._csv = open(self.path, "a", newline="")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception as err:  # noqa: BLE001 - TensorBoard is optional at run time
            print(f"TensorBoard logging is off ({err})", file=sys.stderr)

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **row}
        if self._fields is None:
            self._fields = list(row)
            csv.writer(self._csv).writerow(self._fields)
        elif set(row) - set(self._fields):
            self._widen([k for k in row if k not in self._fields])
        values = [row.get(k, "") for k in self._fields]
        csv.writer(self._csv).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])
        self._csv.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"pretrain/{key}", value, step)
                if key.startswith("online_") and isinstance(row.get("flops"), (int, float)):
                    self._tb.add_scalar(f"online_vs_flops/{key}", value, int(row["flops"]))

    def _widen(self, new: list[str]) -> None:
        """Rewrite ``metrics.csv`` with ``new`` columns appended to the header (empty in the rows before)."""
        self._csv.close()
        with open(self.path) as f:
            rows = list(csv.reader(f))[1:]
        self._fields = self._fields + new
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([self._fields] + [r + [""] * (len(self._fields) - len(r)) for r in rows if r])
        self._csv = open(self.path, "a", newline="")

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled or not self.path.exists():
            return
        self._csv.close()
        with open(self.path) as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        self._csv = open(self.path, "a", newline="")

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))
