"""What a training run does besides training (after MONAI's handlers and nnU-Net's trainer hooks):
the CSV log, TensorBoard, the progress bar, the best checkpoint, the time budget and a graceful
stop on Ctrl-C. Each is a :class:`Callback` of :class:`~lmnet.engine.train.Trainer`; pass your own
in ``Trainer(cfg, callbacks=[...])`` to add to them.

Events, in order: ``on_fit_start`` (everything built, the state of a resumed run loaded),
``on_epoch_start``, ``on_step_end`` after every optimiser step (a callback may set
``trainer.stop_reason`` to end the run after this step, which is saved), ``on_epoch_end`` with the
epoch's log row and validation metrics, ``on_checkpoint`` after ``checkpoint_last.pt`` is
written, ``on_fit_end`` (always, also after an error).
"""
from __future__ import annotations

import csv
import logging
import signal
import threading
import time
from typing import Any

from tqdm import tqdm

from lmnet._files import atomic_link, atomic_path
from lmnet.runtime import steady_signal_stack

#: :class:`lmnet.engine.train.Trainer`, which imports this module (so it is not imported here).
Trainer = Any

__all__ = ["Callback", "CsvLog", "TensorBoardLog", "ProgressBar", "BestCheckpoint", "TimeBudget",
           "GracefulStop", "LOG_FIELDS", "default_callbacks"]

log = logging.getLogger(__name__)

#: Columns of ``log.csv``, one row per finished epoch.
LOG_FIELDS = ("epoch", "train_size", "train_loss", "val_paper_mdice", "val_fg_dice", "val_fg_iou", "lr",
              "epoch_seconds", "images_per_second", "steps")


class Callback:
    """Does nothing at every event; override the ones you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any], val: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, state: dict[str, Any], improved: bool) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


class CsvLog(Callback):
    """``log.csv``: a header for a new run; a resumed run keeps the rows up to its checkpoint."""

    def on_fit_start(self, trainer: Trainer) -> None:
        path = trainer.folder.log
        if not trainer.resumed or not path.exists():
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerow(LOG_FIELDS)
            return
        with path.open(newline="") as fh:  # rows of epochs after the checkpoint would be stale
            rows = list(csv.DictReader(fh))
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:  # whole or not at all
            w = csv.DictWriter(fh, LOG_FIELDS)
            w.writeheader()
            w.writerows(r for r in rows if int(r["epoch"]) < trainer.start_epoch + 1)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any], val: dict[str, Any]) -> None:
        with trainer.folder.log.open("a", newline="") as fh:
            csv.DictWriter(fh, LOG_FIELDS).writerow(row)


class TensorBoardLog(Callback):
    """The log row's numbers as TensorBoard scalars in ``tb/``."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.folder.tensorboard), purge_step=trainer.start_epoch)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any], val: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "epoch":
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar(Callback):
    """A tqdm bar per epoch (loss, images per second) and a line per finished epoch."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        cfg = trainer.cfg
        self.bar = tqdm(desc=f"epoch {epoch + 1}/{cfg.epochs} @{cfg.train_size(epoch)}px",
                        unit="batch", dynamic_ncols=True, initial=trainer.steps,
                        total=trainer.steps_in_epoch)

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        self.bar.update()
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{trainer.images_per_second:.1f}")
        note = trainer.threads_note
        if note:
            tqdm.write(note)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any], val: dict[str, Any]) -> None:
        self._close()
        done = row["epoch"] - trainer.start_epoch
        remaining = (time.perf_counter() - trainer.started) / done * (trainer.cfg.epochs - row["epoch"])
        tqdm.write(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  val mDice(paper) "
                   f"{val['paper_mdice']:.4f}  val Dice(fg) {val['fg_dice_mean']:.4f}  "
                   f"{row['epoch_seconds']:.0f} s  ({row['images_per_second']:.2f} img/s)  "
                   f"run ETA {remaining / 60:.1f} min")

    def on_fit_end(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BestCheckpoint(Callback):
    """``checkpoint_best.pt``: the checkpoint of the epoch with the best validation score. It is
    the ``checkpoint_last.pt`` just written (``state``), so it becomes a hard link to that file
    instead of a second copy (LM-Net's checkpoint with its optimiser state: 48 MB); where the file
    system has none, ``state`` is written again."""

    def on_checkpoint(self, trainer: Trainer, state: dict[str, Any], improved: bool) -> None:
        if improved and not atomic_link(trainer.folder.last, trainer.folder.best):
            trainer.save_state(state, trainer.folder.best)


class TimeBudget(Callback):
    """Ends the run after the step during which ``minutes`` of wall-clock have passed."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        if trainer.stop_reason is None and time.perf_counter() - trainer.started > self.minutes * 60:
            trainer.stop_reason = f"time budget of {self.minutes} min reached"


class GracefulStop(Callback):
    """The first Ctrl-C (or SIGTERM, or SIGHUP: a closed terminal, a job killed at the end of a
    session) ends the run after the current step, which is saved; a second one interrupts at once.
    A signal the process ignores (SIGHUP under ``nohup``) stays ignored."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        steady_signal_stack()  # where the handlers run: never a stack a library has freed
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        for sig in self._previous:  # a second signal acts as it would without us
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after this step to save it (Ctrl-C again to stop at once, "
                    "losing the current epoch's progress)", what)

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        if self.requested and trainer.stop_reason is None:
            trainer.stop_reason = "interrupted"

    def on_fit_end(self, trainer: Trainer) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def default_callbacks(trainer: Trainer, progress: bool) -> list[Callback]:
    """What ``lmnet train`` runs with: on the main process the logs, the best checkpoint and (with
    ``progress``) the bar; the time budget where the config sets one; the graceful stop in a
    single process."""
    cbs: list[Callback] = []
    if trainer.ctx.is_main:
        cbs += [CsvLog(), TensorBoardLog(), BestCheckpoint()]
        if progress:
            cbs.append(ProgressBar())
    if trainer.cfg.time_budget:
        cbs.append(TimeBudget(trainer.cfg.time_budget))
    if trainer.ctx.is_main and trainer.ctx.world == 1:
        cbs.append(GracefulStop())
    return cbs
