"""``bench speed``: the harness's training and evaluation throughput against the seed notebooks' pipeline.

Two contenders run in one process, interleaved (A B A B ...) so that drift of a shared machine hits
both alike:

- baseline: what the seed notebooks did. A ``Dataset`` that turns each uint8 image into a PIL image
  and applies torchvision's per-image transforms, a ``DataLoader`` with worker processes, the seed
  model with ``nn.Dropout``, eager fp32 NCHW, plain SGD with Nesterov momentum.
- bench: the harness's own path with its defaults: ``resolve_runtime`` on the default ``TrainConfig``,
  ``create_model``, ``create_optimizer`` and ``train_one_epoch`` itself.

Throughput is the median images/s of the repeats (min-max as spread). Effective GFLOP/s are the
FLOPs of one forward+backward step (``torch.utils.flop_counter``) times steps/s, set against this
machine's fp32 and bf16 ``torch.mm`` peaks measured in the same run. ``--ablate`` measures each
optimisation on its own against the seed's fp32 eager NCHW step on the harness's batched data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NORMS, TrainConfig
from .data import CIFAR10, MEAN, STD, Split, eval_batches
from .errors import ConfigError
from .models import Dropout, count_params, create_model
from .runtime import Runtime, default_device, resolve_runtime, setup_threads
from .train import create_optimizer, create_scheduler, predict, train_one_epoch

Runner = Callable[[int], int]  # run(images) trains or evaluates on that many images, returns the count


@dataclass
class SpeedOptions:
    norm: str = "bn"
    preset: str | None = None  # default: seed_gn for the seed LayerNorm, else seed_bn
    steps: int = 50  # training steps per repeat, at --batch-size
    repeats: int = 5
    batch_size: int = 128
    threads: int | None = None  # default: the cores this process may use
    workers: int = 2  # the seed notebooks' DataLoader workers
    eval_images: int = 10_000
    warmup_steps: int = 3  # untimed steps per contender: allocator, oneDNN primitives, compilation
    ablate: bool = False
    knobs: tuple[str, ...] = ()  # limit --ablate to these knobs; empty = all
    profile: bool = False
    seed: int = 0

    @property
    def model_preset(self) -> str:
        return self.preset or ("seed_gn" if self.norm == "lnchw" else "seed_bn")


def validate(opts: SpeedOptions, data: CIFAR10) -> None:
    checks = [
        ("--norm", opts.norm in NORMS, f"must be one of {', '.join(NORMS)}"),
        ("--steps", opts.steps >= 1, "must be >= 1"),
        ("--repeats", opts.repeats >= 1, "must be >= 1"),
        ("--batch-size", opts.batch_size >= 1, "must be >= 1"),
        ("--threads", opts.threads is None or opts.threads >= 1, "must be >= 1"),
        ("--workers", opts.workers >= 0, "must be >= 0"),
        ("--eval-images", 1 <= opts.eval_images <= len(data.test), f"must be in [1, {len(data.test)}]"),
        ("--steps x --batch-size", train_images(opts) <= len(data.train), f"must be <= {len(data.train)} training images"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{flag} {rule}")
    unknown = set(opts.knobs) - set(TRAIN_KNOBS) - set(EVAL_KNOBS)
    if unknown:
        raise ConfigError(f"unknown knob {sorted(unknown)[0]!r}; choose from {', '.join(dict.fromkeys([*TRAIN_KNOBS, *EVAL_KNOBS]))}")


def train_images(opts: SpeedOptions) -> int:
    return opts.steps * opts.batch_size


# ---------------------------------------------------------------- the seed notebooks' pipeline


class SeedStyleCIFAR10(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: an HWC uint8 array to a PIL image, then the transform."""

    def __init__(self, split: Split, transform):
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def seed_transform(train: bool):
    from torchvision import transforms as T

    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*augment, T.ToTensor(), T.Normalize(MEAN, STD)])


def seed_loader(split: Split, batch_size: int, workers: int, train: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        SeedStyleCIFAR10(split, seed_transform(train)), batch_size=batch_size, shuffle=train,
        num_workers=workers, generator=torch.Generator().manual_seed(seed),
    )


def bench_model(preset: str, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(preset=preset, norm=norm)


def seed_model(preset: str, norm: str, seed: int = 0) -> nn.Module:
    """The seed notebook's model: the harness's topology, same weights, with torch's own ``nn.Dropout``."""
    model = bench_model(preset, norm, seed)
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, nn.Dropout(child.p))
    return model


def seed_sgd(model: nn.Module, cfg: TrainConfig, implementation: str = "for-loop") -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over all parameters, as the seeds built it; ``implementation``
    picks torch's per-tensor loop (the CPU default), ``foreach`` or ``fused`` kernels."""
    kernels = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, **kernels,
    )


def endless(loader):
    while True:
        yield from loader  # a new epoch restarts the workers, as in the seeds' epoch loop


def seed_train_runner(model: nn.Module, optimizer, loader, device: torch.device) -> Runner:
    """The seed notebooks' training loop, including their per-batch accuracy ``.item()``."""
    scheduler = constant_schedule(optimizer)
    batches = endless(loader)  # one iterator across repeats: steady state, no worker start-up per repeat

    def run(images: int) -> int:
        model.train()
        seen = correct = 0
        while seen < images:
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        return seen

    return run


def seed_eval_runner(model: nn.Module, split: Split, batch_size: int, workers: int, device: torch.device) -> Runner:
    """The seeds' test pass: a fresh DataLoader iteration per pass, ``no_grad``, fp32."""
    loader = seed_loader(split, batch_size, workers, train=False)

    def run(images: int) -> int:
        return seed_test(model, loader, device, images)[1]

    return run


def seed_test(model: nn.Module, loader, device: torch.device, images: int | None = None) -> tuple[int, int]:
    """The seeds' test loop (``no_grad``, per-batch ``.item()``): (correct, seen) over up to ``images``."""
    model.eval()
    seen = correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            seen += len(y)
            if images is not None and seen >= images:
                break
    return correct, seen


# ---------------------------------------------------------------- the harness's pipeline


def constant_schedule(optimizer):
    # A benchmark has no epoch budget to anneal over; any scheduler's step() costs the same.
    return create_scheduler(optimizer, dataclasses.replace(TrainConfig(), schedule="constant"), 0)


@contextlib.contextmanager
def thread_count(threads: int | None):
    """Run with ``threads`` CPU threads (None: leave as is), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def epoch_runner(model, optimizer, cfg: TrainConfig, rt: Runtime, split: Split, threads: int | None = None) -> Runner:
    """``train_one_epoch`` itself, on the first ``images`` images of ``split``."""
    scheduler = constant_schedule(optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)

    def run(images: int) -> int:
        with thread_count(threads):
            train_one_epoch(model, split.take(images), optimizer, scheduler, cfg, rt, generator)
        return images

    return run


def bench_config(opts: SpeedOptions) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), batch_size=opts.batch_size, seed=opts.seed)


def bench_train_runner(opts: SpeedOptions, data: CIFAR10, device: torch.device) -> tuple[Runner, Runtime, nn.Module]:
    cfg = bench_config(opts)
    rt = resolve_runtime(cfg, opts.norm, device)
    model = bench_model(opts.model_preset, opts.norm, opts.seed).to(device, memory_format=rt.memory_format)
    return epoch_runner(model, create_optimizer(model, cfg), cfg, rt, data.train), rt, model


def bench_eval_runner(model: nn.Module, split: Split, rt: Runtime) -> Runner:
    batch_size = TrainConfig().eval_batch_size

    def run(images: int) -> int:
        return len(predict(model, split.take(images), rt, batch_size))

    return run


def describe(rt: Runtime) -> str:
    precision = "fp32" if rt.dtype == torch.float32 else f"{str(rt.dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} autocast"
    layout = "channels-last" if rt.memory_format == torch.channels_last else "NCHW"
    return f"{precision} {layout}"


# ---------------------------------------------------------------- ablation: one knob at a time


@dataclass(frozen=True)
class StepSetup:
    """How a training step runs. The defaults are the seed notebook's fp32 eager NCHW step."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    sgd: str = "for-loop"
    packed_dropout: bool = False
    batch_size: int | None = None  # None: --batch-size
    compile: bool = False
    threads: int | None = None  # None: the benchmark's thread count


@dataclass(frozen=True)
class EvalSetup:
    """How an evaluation pass runs. The defaults are the seeds' test loop on the harness's data."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    batch_size: int = 128
    inference_mode: bool = False


# knob name -> (label, change to the reference setup, what it does to the numbers)
TRAIN_KNOBS = {
    "bf16": ("bf16 autocast", {"dtype": torch.bfloat16}, "bf16 matmuls/convs, fp32 weights"),
    "channels_last": ("channels-last", {"channels_last": True}, "same math, other layout"),
    "foreach": ("foreach SGD", {"sgd": "foreach"}, "same math"),
    "fused": ("fused SGD", {"sgd": "fused"}, "same math"),
    "dropout": ("packed-bytes Dropout", {"packed_dropout": True}, "other random stream, p to 1/256"),
    "batch256": ("batch 256", {"batch_size": 256}, "fewer steps: retune lr"),
    "batch512": ("batch 512", {"batch_size": 512}, "fewer steps: retune lr"),
    "compile": ("torch.compile", {"compile": True}, "same math, fused kernels"),
    "threads": ("threads", {}, "same math"),  # the thread count is filled in at run time
}
EVAL_KNOBS = {
    "inference_mode": ("inference_mode", {"inference_mode": True}, "same"),
    "eval_batch256": ("eval batch 256", {"batch_size": 256}, "same"),
    "eval_batch1000": ("eval batch 1000", {"batch_size": 1000}, "same"),
    "bf16": ("bf16 autocast", {"dtype": torch.bfloat16}, "bf16 logits: rare argmax ties"),
    "channels_last": ("channels-last", {"channels_last": True}, "same"),
}


def other_thread_count(threads: int) -> int | None:
    """The thread count the ``threads`` knob compares against: 1 when using more, else all cores."""
    other = 1 if threads > 1 else len(os.sched_getaffinity(0))
    return None if other == threads else other


def setup_train_runner(setup: StepSetup, opts: SpeedOptions, data: CIFAR10, device: torch.device) -> Runner:
    cfg = dataclasses.replace(bench_config(opts), batch_size=setup.batch_size or opts.batch_size)
    rt = Runtime(device, setup.dtype, torch.channels_last if setup.channels_last else torch.contiguous_format)
    build = bench_model if setup.packed_dropout else seed_model
    model = build(opts.model_preset, opts.norm, opts.seed).to(device, memory_format=rt.memory_format)
    optimizer = seed_sgd(model, cfg, setup.sgd)
    if setup.compile:
        model = torch.compile(model, dynamic=False)
    return epoch_runner(model, optimizer, cfg, rt, data.train, setup.threads)


def setup_eval_runner(setup: EvalSetup, opts: SpeedOptions, split: Split, device: torch.device) -> Runner:
    rt = Runtime(device, setup.dtype, torch.channels_last if setup.channels_last else torch.contiguous_format)
    model = seed_model(opts.model_preset, opts.norm, opts.seed).to(device, memory_format=rt.memory_format).eval()
    grad_mode = torch.inference_mode if setup.inference_mode else torch.no_grad

    def run(images: int) -> int:
        with grad_mode(), rt.autocast:
            for x, y in eval_batches(split.take(images), setup.batch_size, device, memory_format=rt.memory_format):
                (model(x).argmax(1) == y).sum().item()
        return images

    return run


def wanted(knob: str, opts: SpeedOptions) -> bool:
    return not opts.knobs or knob in opts.knobs


def train_ablation(opts: SpeedOptions, data: CIFAR10, device: torch.device, threads: int) -> dict[str, tuple]:
    """name -> (label, numerics, runner); the first entry is the reference."""
    variants = {"reference": ("seed step: fp32 eager NCHW, F.dropout, for-loop SGD", "", StepSetup())}
    for knob, (label, change, numerics) in TRAIN_KNOBS.items():
        if knob == "threads":
            other = other_thread_count(threads)
            if other is None:
                continue
            label, change = f"{other} thread{'s' * (other > 1)} (not {threads})", {"threads": other}
        if wanted(knob, opts):
            variants[knob] = (label, numerics, StepSetup(**change))
    return {name: (label, numerics, setup_train_runner(setup, opts, data, device)) for name, (label, numerics, setup) in variants.items()}


def eval_ablation(opts: SpeedOptions, split: Split, device: torch.device) -> dict[str, tuple]:
    variants = {"reference": ("seed test loop: fp32 NCHW, no_grad, batch 128", "", EvalSetup())}
    for knob, (label, change, numerics) in EVAL_KNOBS.items():
        if wanted(knob, opts):
            variants[knob] = (label, numerics, EvalSetup(**change))
    return {name: (label, numerics, setup_eval_runner(setup, opts, split, device)) for name, (label, numerics, setup) in variants.items()}


# ---------------------------------------------------------------- measuring


def interleaved(runners: dict[str, Runner], images: int, repeats: int) -> dict[str, list[float]]:
    """images/s of each runner per repeat, running them in turn (A B A B ...)."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            done = run(images)
            rates[name].append(done / (time.perf_counter() - start))
    return rates


def spread(rates: list[float]) -> dict[str, float | list[float]]:
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates}


def warm_up(runners: dict[str, Runner], images: int) -> None:
    for run in runners.values():
        run(images)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n`` x ``n`` ``torch.mm``: the machine's practical peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def flops_per_image(model: nn.Module, batch_size: int, train: bool) -> float:
    """FLOPs (2 per multiply-add) per image of one forward (+ backward when ``train``) pass, in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch_size, 3, 32, 32)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def profile_runner(run: Runner, images: int, top: int = 12) -> list[dict[str, float | str]]:
    """The ops taking the most self CPU time while ``run`` trains on ``images`` images."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(images)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ranked]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- the benchmark


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


def write_json(report: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------- output


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


# ---------------------------------------------------------------- time to accuracy


def seed_epoch(model: nn.Module, loader, optimizer, scheduler, device: torch.device) -> None:
    """One epoch of the seed notebooks' training loop."""
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()


def seed_test_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    correct, seen = seed_test(model, loader, device)
    return correct / seen


def baseline_curve(data: CIFAR10, cfg: TrainConfig, preset: str, norm: str, workers: int, device: torch.device) -> list[dict]:
    """Seed pipeline trained for ``cfg.epochs`` with the same recipe; test accuracy after every epoch."""
    model = seed_model(preset, norm, cfg.seed).to(device)
    optimizer = seed_sgd(model, cfg)
    train_loader = seed_loader(data.train, cfg.batch_size, workers, train=True, seed=cfg.seed)
    test_loader = seed_loader(data.test, 1000, workers, train=False)
    scheduler = create_scheduler(optimizer, cfg, cfg.epochs * len(train_loader))
    curve, start = [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        seed_epoch(model, train_loader, optimizer, scheduler, device)
        curve.append({"epoch": epoch, "test_acc": seed_test_accuracy(model, test_loader, device), "seconds": time.perf_counter() - start})
    return curve


def bench_curve(data: CIFAR10, cfg: TrainConfig, preset: str, norm: str, device: torch.device) -> list[dict]:
    """The harness's ``fit`` with its defaults; test accuracy after every epoch (timed, like the baseline)."""
    from .train import evaluate, fit

    rt = resolve_runtime(cfg, norm, device)
    model = bench_model(preset, norm, cfg.seed)
    curve, start = [], time.perf_counter()

    def test_each_epoch(epoch: int, record: dict) -> None:
        curve.append({"epoch": epoch, "test_acc": evaluate(model, data.test, rt, cfg.eval_batch_size)[1],
                      "seconds": time.perf_counter() - start})

    fit(model, data, cfg, rt, on_epoch=test_each_epoch)
    return curve


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["test_acc"] >= target), None)


def time_to_accuracy(data: CIFAR10, cfg: TrainConfig, target: float = 0.70, preset: str = "seed_bn", norm: str = "bn",
                     workers: int = 2, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Wall clock until test accuracy first reaches ``target``, seed pipeline vs harness, same recipe and epochs.
    The clock includes each epoch's test pass, for both."""
    device = default_device()
    setup_threads(None)
    progress(f"baseline, {cfg.epochs} epochs")
    baseline = baseline_curve(data, cfg, preset, norm, workers, device)
    progress(f"bench, {cfg.epochs} epochs")
    bench = bench_curve(data, cfg, preset, norm, device)
    result = {"target": target, "epochs": cfg.epochs, "recipe": dataclasses.asdict(cfg), "curves": {"baseline": baseline, "bench": bench}}
    for name, curve in (("baseline", baseline), ("bench", bench)):
        hit = first_reaching(curve, target)
        result[name] = {"epoch": hit and hit["epoch"], "seconds": hit and hit["seconds"], "final_test_acc": curve[-1]["test_acc"],
                        "total_seconds": curve[-1]["seconds"]}
    return result


def render_time_to_accuracy(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"time to {result['target']:.0%} test accuracy, {result['epochs']} epochs, same recipe")
    for col in ("pipeline", "reached at epoch", "wall clock", "final test acc", "total wall clock"):
        table.add_column(col, justify="right")
    for name in ("baseline", "bench"):
        r = result[name]
        reached = f"{r['seconds'] / 60:.1f} min" if r["seconds"] else "not reached"
        table.add_row(name, str(r["epoch"] or "-"), reached, f"{r['final_test_acc']:.2%}", f"{r['total_seconds'] / 60:.1f} min")
    console.print(table)
    if result["baseline"]["seconds"] and result["bench"]["seconds"]:
        console.print(f"bench reaches {result['target']:.0%} {result['baseline']['seconds'] / result['bench']['seconds']:.2f}x sooner")
