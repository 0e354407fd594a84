"""``bench speed``'s measurement: ``run_speed`` times the seed pipeline against the harness, training
and evaluation, interleaved (A B A B ...), and returns every figure as a JSON-ready dict.

Throughput is the median images/s of the repeats (min-max as spread). Effective GFLOP/s are the
FLOPs of one forward+backward step times steps/s, set against this machine's fp32 and bf16
``torch.mm`` peaks measured in the same run. ``run_ablation`` times the ``--ablate`` knobs.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable

import torch

from ..config import TrainConfig
from ..data import CIFAR10, Split
from ..models import count_params
from ..runtime import cpu_name, default_device, setup_threads
from .ablation import eval_ablation, train_ablation
from .harness import bench_config, bench_eval_runner, bench_model, bench_train_runner, describe
from .measure import flops_per_image, interleaved, matmul_gflops, profile_runner, spread, warm_up
from .options import SpeedOptions, train_images, validate
from .seed import seed_eval_runner, seed_loader, seed_model, seed_sgd, seed_train_runner


def run_speed(opts: SpeedOptions, data: CIFAR10, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Measure everything ``bench speed`` reports and return it as a JSON-ready dict."""
    validate(opts, data)
    threads = setup_threads(opts.threads)
    device = default_device()
    images, eval_split = train_images(opts), data.test.take(opts.eval_images)
    warmup_images = opts.warmup_steps * opts.batch_size

    progress("matmul peaks")
    peaks = {"fp32": matmul_gflops(torch.float32, device), "bf16": matmul_gflops(torch.bfloat16, device)}
    bench_train, rt, trained_model = bench_train_runner(opts, data, device)
    baseline_model = seed_model(opts.model_preset, opts.norm, opts.seed).to(device)
    train_runners = {
        "baseline": seed_train_runner(baseline_model, seed_sgd(baseline_model, bench_config(opts)),
                                      seed_loader(data.train, opts.batch_size, opts.workers, True, opts.seed), device),
        "bench": bench_train,
    }
    progress("training: warm-up")
    warm_up(train_runners, warmup_images)
    progress(f"training: {opts.repeats} x {opts.steps} steps each")
    train_rates = interleaved(train_runners, images, opts.repeats)

    eval_runners = {
        "baseline": seed_eval_runner(baseline_model, eval_split, opts.batch_size, opts.workers, device),
        "bench": bench_eval_runner(trained_model, eval_split, rt),
    }
    progress("evaluation")
    warm_up(eval_runners, min(opts.eval_images, 1000))
    eval_rates = interleaved(eval_runners, opts.eval_images, opts.repeats)

    flop_model = bench_model(opts.model_preset, opts.norm, opts.seed)
    train_flops = flops_per_image(flop_model, opts.batch_size, train=True)
    report = {
        "machine": machine_info(device, threads, peaks),
        "options": {**dataclasses.asdict(opts), "preset": opts.model_preset, "threads": threads, "knobs": list(opts.knobs)},
        "model": {"preset": opts.model_preset, "norm": opts.norm, "params": count_params(flop_model),
                  "train_mflop_per_image": train_flops / 1e6,
                  "eval_mflop_per_image": flops_per_image(flop_model, opts.batch_size, train=False) / 1e6},
        "train": compare(train_rates, train_flops, peaks, {
            "baseline": f"per-image PIL transforms, DataLoader workers={opts.workers}, fp32 NCHW eager, nn.Dropout, SGD",
            "bench": f"train_one_epoch: uint8 in memory, batched crop+flip, {describe(rt)}, bench Dropout, create_optimizer",
        }),
        "eval": compare(eval_rates, None, peaks, {
            "baseline": f"PIL ToTensor+Normalize, DataLoader workers={opts.workers}, batch {opts.batch_size}, no_grad fp32 NCHW",
            "bench": f"predict(): inference_mode, batch {TrainConfig().eval_batch_size}, {describe(rt)}",
        }),
    }
    if opts.profile:
        progress("profiling the bench step")
        report["profile"] = profile_runner(bench_train, images)
    if opts.ablate:
        report["ablation"] = run_ablation(opts, data, eval_split, device, threads, progress)
    return report


def machine_info(device: torch.device, threads: int, peaks: dict[str, float]) -> dict:
    return {
        "cpu": cpu_name(), "cores_usable": len(os.sched_getaffinity(0)), "threads": threads, "device": str(device),
        "torch": torch.__version__, "fp32_matmul_gflops": peaks["fp32"], "bf16_matmul_gflops": peaks["bf16"],
    }


def compare(rates: dict[str, list[float]], flops: float | None, peaks: dict[str, float], setups: dict[str, str]) -> dict:
    out: dict = {}
    for name, values in rates.items():
        out[name] = {"setup": setups[name], **spread(values)}
        if flops is not None:
            gflops = flops * out[name]["images_per_s"] / 1e9
            out[name].update(gflops=gflops, pct_fp32_peak=100 * gflops / peaks["fp32"], pct_bf16_peak=100 * gflops / peaks["bf16"])
    out["ratio"] = out["bench"]["images_per_s"] / out["baseline"]["images_per_s"]
    return out


def run_ablation(opts: SpeedOptions, data: CIFAR10, eval_split: Split, device: torch.device, threads: int, progress) -> list[dict]:
    rows = []
    for phase, variants, images in (
        ("train", lambda: train_ablation(opts, data, device, threads), train_images(opts)),
        ("eval", lambda: eval_ablation(opts, eval_split, device), opts.eval_images),
    ):
        built = variants()
        if len(built) == 1:  # --knob chose none of this phase's knobs
            continue
        runners = {name: run for name, (_, _, run) in built.items()}
        progress(f"ablation ({phase}): warm-up" + (", compiling" if "compile" in runners else ""))
        warm_up(runners, min(images, opts.warmup_steps * opts.batch_size))
        progress(f"ablation ({phase}): {len(runners)} setups x {opts.repeats} repeats")
        rates = interleaved(runners, images, opts.repeats)
        reference = statistics.median(rates["reference"])
        for name, (label, numerics, _) in built.items():
            rows.append({"phase": phase, "knob": name, "what": label, "numerics": numerics,
                         **spread(rates[name]), "speedup": statistics.median(rates[name]) / reference})
    return rows
