"""Console output shared by the commands: durations, the per-epoch progress bar, rich tables.

Imports rich only, so readers of MLflow (``bench report``) print without the training stack.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], left: Sequence[str] = (), **options) -> Table:
    """A rich table whose columns are right-aligned (numbers) except those named in ``left``;
    ``options`` go to ``rich.table.Table`` (caption, title_justify ...)."""
    out = Table(title=title, **options)
    for col in columns:
        out.add_column(col, justify="left" if col in left else "right")
    for cells in rows:
        out.add_row(*cells)
    return out


def clipped(record: dict[str, float]) -> str:
    """`` (12% clipped)`` when ``grad_clip`` bound some of the epoch's steps (``<1%`` for a few spikes), else nothing."""
    share = record.get("grad_clipped", 0.0)
    return f" ({share:.0%} clipped)" if share >= 0.01 else " (<1% clipped)" if share else ""


@contextlib.contextmanager
def epoch_progress(console: Console | None, epochs: int, images_per_epoch: int, label: str = "", first_epoch: int = 1):
    """A rich progress bar per epoch with live loss/accuracy; yields (on_step, on_epoch) hooks.
    ``first_epoch`` > 1 for a resumed run: the estimate counts only the epochs trained here."""
    if console is None:
        yield None, lambda epoch, record: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        state = {"task": progress.add_task(f"{label}epoch {first_epoch}/{epochs}", total=images_per_epoch, stats="")}
        start = time.perf_counter()

        def on_step(seen: int, loss: float, acc: float) -> None:
            progress.update(state["task"], completed=seen, stats=f"loss {loss:.3f} acc {acc:.3f}")

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            console.print(
                f"{label}epoch {epoch:>3}/{epochs}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.4f}"
                f"  val loss {record['val_loss']:.3f} acc {record['val_acc']:.4f}  lr {record['lr']:.3g}"
                f"  grad norm {record['grad_norm_max']:.3g}{clipped(record)}  {record['epoch_seconds']:.1f}s {record['images_per_s']:,.0f} img/s"
                + (f"  eta {duration((time.perf_counter() - start) / (epoch - first_epoch + 1) * (epochs - epoch))}" if epoch < epochs else "")
            )
            progress.reset(state["task"], description=f"{label}epoch {epoch + 1}/{epochs}", stats="")

        yield on_step, on_epoch
