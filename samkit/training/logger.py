"""Training logs on rank 0: a progress bar, a line every ``log_every`` steps, ``metrics.jsonl`` and
TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from .config import TrainConfig


class TrainLogger:
    """Rank 0 only: a progress bar, a line every ``log_every`` steps, metrics.jsonl, TensorBoard.

    Lines can be printed from the start; files are created only by :meth:`open`, which the loop
    calls once every check of the run has passed (a refused run writes nothing).
    """

    def __init__(self, cfg: TrainConfig, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.bar: Any = None
        self.writer: Any = None
        self.jsonl: Any = None
        self.epoch = 0
        self._sums: dict[str, Any] = {}
        self._count = 0
        self._t0 = time.perf_counter()
        self._images = 0

    def open(self) -> None:
        """Create ``work_dir`` with ``metrics.jsonl`` (appended to on resume) and the TensorBoard writer."""
        if not self.enabled:
            return
        os.makedirs(self.cfg.work_dir, exist_ok=True)
        self.jsonl = open(os.path.join(self.cfg.work_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(self.cfg.work_dir, "tensorboard"))
            except ImportError:
                self.line(
                    "warning: tensorboard is not installed (pip install samkit[train]); scalars go to metrics.jsonl only"
                )

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def start_epoch(self, epoch: int, done: int, total: int) -> None:
        if not self.enabled:
            return
        self.epoch = epoch
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False
            )
        self._t0, self._images = time.perf_counter(), 0

    def step(self, step: int, in_epoch: int, lr: float, losses: dict[str, torch.Tensor], batch: int) -> None:
        if not self.enabled:
            return
        for key in ("loss", "focal", "dice", "iou"):  # tensors: no device sync until a log line
            self._sums[key] = self._sums.get(key, 0.0) + losses[key].detach().float()
        self._count += 1
        self._images += batch
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every:
            return
        elapsed = time.perf_counter() - self._t0
        record = {k: float(v) / self._count for k, v in self._sums.items()}
        record.update(step=step, epoch=self.epoch + 1, lr=lr, images_per_s=self._images / max(elapsed, 1e-9))
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}"
            )
        else:
            self.line(
                f"epoch {self.epoch + 1} step {step}: loss {record['loss']:.4f} (focal {record['focal']:.4f}, "
                f"dice {record['dice']:.4f}, iou {record['iou']:.4f}) lr {lr:.3g} {record['images_per_s']:.2f} img/s"
            )
        self._write(record, "train")
        self._sums, self._count = {}, 0
        self._t0, self._images = time.perf_counter(), 0

    def eval(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        self.line(f"eval after epoch {epoch}: {shown}")
        self._write({**metrics, "step": step, "epoch": epoch}, "eval")

    def _write(self, record: dict[str, Any], kind: str) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
