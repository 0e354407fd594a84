"""``bench speed``'s output: the report's tables on a rich console, and the report as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path


def render(report: dict, console) -> None:
    m = report["machine"]
    console.print(
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}; matmul peak "
        f"fp32 {m['fp32_matmul_gflops']:,.0f} GFLOP/s, bf16 {m['bf16_matmul_gflops']:,.0f} GFLOP/s"
    )
    model, opts = report["model"], report["options"]
    console.print(
        f"{model['preset']} norm={model['norm']}, {model['params']:,} params, "
        f"{model['train_mflop_per_image']:.1f} MFLOP/image fwd+bwd; median of {opts['repeats']} interleaved repeats"
    )
    console.print(throughput_table("Training", report["train"], flops=True))
    console.print(throughput_table("Evaluation", report["eval"], flops=False))
    if "profile" in report:
        console.print(profile_table(report["profile"]))
    if "ablation" in report:
        console.print(ablation_table(report["ablation"]))


def throughput_table(title: str, figures: dict, flops: bool):
    from rich.table import Table

    legend = "\n".join(f"{name}: {figures[name]['setup']}" for name in ("baseline", "bench"))
    table = Table(title=f"{title}: bench/baseline = {figures['ratio']:.2f}x", title_justify="left", caption=legend, caption_justify="left")
    columns = ["pipeline", "images/s", "spread"] + (["GFLOP/s", "% fp32 peak", "% bf16 peak"] if flops else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for name in ("baseline", "bench"):
        row = figures[name]
        cells = [name, f"{row['images_per_s']:,.0f}", f"{row['min']:,.0f}-{row['max']:,.0f}"]
        if flops:
            cells += [f"{row['gflops']:.1f}", f"{row['pct_fp32_peak']:.1f}%", f"{row['pct_bf16_peak']:.1f}%"]
        table.add_row(*cells)
    return table


def ablation_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="One knob at a time, against the reference (same data path, interleaved)", title_justify="left")
    for col in ("phase", "what", "images/s", "spread", "speed-up", "numerics"):
        table.add_column(col, justify="right" if col in ("images/s", "spread", "speed-up") else "left")
    for row in rows:
        table.add_row(row["phase"], row["what"], f"{row['images_per_s']:,.0f}", f"{row['min']:,.0f}-{row['max']:,.0f}",
                      f"{row['speedup']:.2f}x", row["numerics"])
    return table


def profile_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="Where the bench training step spends its time (self CPU time)", title_justify="left")
    for col in ("op", "ms", "share", "calls"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for row in rows:
        table.add_row(row["op"], f"{row['self_ms']:.1f}", f"{row['share']:.1%}", str(row["calls"]))
    return table


def write_json(report: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
