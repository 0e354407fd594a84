"""``bench report``: BN vs GN vs LN from what MLflow holds (studies, confirm seeds, batch-size runs).

Reads MLflow only; the optional batch-size runs are trained by ``bench.confirm`` before the report
reads them back. Writes ``report.md`` and PNG figures to a folder and logs that folder as the
artifacts of a run (``bench.kind=report``) in the MLflow experiment ``reports``.

numbers.py: what is compared; tables.py: the markdown; figures.py: the PNGs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from .. import tracking
from ..config import RuntimeOptions
from .figures import write_figures
from .numbers import NormSummary, compare, gather, parse_norms
from .tables import markdown

REPORT_EXPERIMENT = "reports"


def build_report(norms: str | None = None, out: str | Path | None = None, tracking_uri: str | None = None, echo=print,
                 tta: str | None = None, confirm_epochs: int | None = None) -> Path:
    """Read MLflow, write ``<out>/report.md`` and figures, log them as a report run; returns the folder.
    ``tta`` and ``confirm_epochs``: see ``gather``."""
    uri = tracking.setup(tracking_uri)
    summaries = gather(norms, tta, confirm_epochs)
    comparisons = compare(summaries)
    out = Path(out or Path("reports") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    tags = {"bench.norms": ",".join(s.name for s in summaries), "bench.report_dir": str(out.resolve()), "bench.tta": tta or "as trained"}
    with tracking.run(REPORT_EXPERIMENT, f"report-{time.strftime('%Y%m%d-%H%M%S')}", "report", tags=tags) as active:
        figures, sources = write_figures(summaries, out)
        (out / "report.md").write_text(markdown(summaries, comparisons, figures, sources, active.info.run_id, uri))
        tracking.log_metrics(report_metrics(summaries))
        stored = tracking.log_folder(out)
    echo(f"report written to {out / 'report.md'} and logged to MLflow run {active.info.run_id} "
         f"(experiment '{REPORT_EXPERIMENT}', artifacts {tracking.mask_url(stored)})")
    return out


def run_report(norms: str | None = None, out: str | Path | None = None, batch_sizes: list[int] | None = None,
               opts: RuntimeOptions | None = None, console=None, tta: str | None = None, confirm_epochs: int | None = None,
               epochs: int | None = None) -> Path:
    """``bench report``: with ``batch_sizes``, first train the missing batch-size runs (``epochs`` each) of
    each norm's best configuration (the only training a report does), then read everything back from MLflow."""
    from rich.console import Console

    console = console or Console()
    opts = opts or RuntimeOptions()
    if batch_sizes:
        from ..confirm import ConfirmOptions, train_batch_sizes  # training code, only when asked to train

        tracking.setup(opts.tracking_uri)
        for norm, study, trial in parse_norms(norms):
            confirm_opts = ConfirmOptions(**asdict(opts), epochs=epochs, study=study, trial=trial)
            train_batch_sizes(norm, batch_sizes, confirm_opts, console)
    return build_report(norms, out, opts.tracking_uri, console.print, tta, confirm_epochs)


def report_metrics(summaries: list[NormSummary]) -> dict[str, float]:
    metrics = {}
    for s in summaries:
        metrics.update({f"{s.name}.best_val_acc": s.best_val_acc, f"{s.name}.test_acc_mean": s.test.mean,
                        f"{s.name}.test_acc_std": s.test.std, f"{s.name}.confirm_seeds": s.test.n})
    return metrics
