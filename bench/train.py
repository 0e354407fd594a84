"""Plain training and evaluation loops. Knows neither Optuna nor MLflow: they hook in via ``on_epoch``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import interrupt
from .checkpoint import EpochCheckpoint, capture, restore
from .config import TrainConfig
from .augment import batch_mixer, shown_labels
from .data import CIFAR10, CLASSES, Split, eval_batches, normalize, train_batches
from .errors import DivergedError
from .models.stems import WHITEN_IMAGES, whitening_layers
from .runtime import Runtime, check_compiler, resolve_runtime


@dataclass
class Result:
    history: list[dict[str, float]] = field(default_factory=list)
    test_loss: float = math.nan
    test_acc: float = math.nan
    test_predictions: torch.Tensor | None = None  # predicted class per test image, for the tracked record
    recipe_ablation: dict[str, float] = field(default_factory=dict)  # test acc with EMA and/or TTA off
    seconds: float = 0.0

    @property
    def best_val_acc(self) -> float:
        return max((r["val_acc"] for r in self.history), default=math.nan)

    @property
    def mean_epoch_seconds(self) -> float:
        return sum(r["epoch_seconds"] for r in self.history) / len(self.history) if self.history else math.nan


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norm parameters (1-D tensors), as is usual for small CNNs."""
    trained = [p for p in model.parameters() if p.requires_grad]  # not the whitening stem's frozen filters
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a loop over tensors: 1.13x the seed step alone (README, Speed).
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Stepped once per batch. cosine and constant may start with ``lr_warmup_epochs`` of linear warm-up."""
    lr = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        return lr.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps)
    warmup = round(total_steps * cfg.lr_warmup_epochs / cfg.epochs)
    main = (lr.CosineAnnealingLR(optimizer, T_max=total_steps - warmup) if cfg.schedule == "cosine"
            else lr.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if not warmup:
        return main
    ramp = lr.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return lr.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def create_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights, or None when ``decay`` is 0. Buffers are
    averaged too (``use_buffers``), so BatchNorm statistics match the averaged weights."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_one_epoch(
    model: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: TrainConfig,
    rt: Runtime,
    generator: torch.Generator,
    on_step: Callable[[int, float, float], None] | None = None,
    ema: AveragedModel | None = None,
) -> tuple[float, float, dict[str, float]]:
    """One pass over ``split``; returns (mean loss, accuracy, the steps' gradient norms before
    ``cfg.grad_clip``: their largest, their mean, the fraction of steps clipped). Raises DivergedError on NaN/inf loss.
    ``ema``, if given, is updated after every optimiser step."""
    model.train()
    total_loss = torch.zeros((), device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    grad_norms = GradNorms(cfg.grad_clip, rt.device)
    seen = 0
    batches = train_batches(
        split, cfg.batch_size, generator, rt.device, cfg.crop_padding, cfg.flip, cfg.cutout, cfg.erasing,
        memory_format=rt.memory_format,
    )
    mix = batch_mixer(cfg.mixup, cfg.cutmix, len(CLASSES))
    for step, (x, y, teacher_probs) in enumerate(batches, 1):
        interrupt.check()
        x, targets = mix(x, y)  # soft targets under mixup / cutmix
        with rt.autocast:
            logits = model(x)
            if teacher_probs is None:
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
            else:
                loss = distill_loss(logits.float(), targets, teacher_probs, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.add(clip_gradients(model, cfg.grad_clip))
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == shown_labels(targets)).sum()
        seen += len(y)
        if step % 20 == 0:
            _check_finite(total_loss, step, optimizer)
            if on_step:
                on_step(seen, total_loss.item() / seen, correct.item() / seen)
    _check_finite(total_loss, step, optimizer)
    return total_loss.item() / seen, correct.item() / seen, grad_norms.summary()


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """(1 - distill) x the usual cross-entropy + distill x T^2 x KL(teacher || student), both softened by T.
    T^2 keeps the soft part's gradients at the hard part's scale whatever T (Hinton et al.)."""
    hard = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
    t = cfg.distill_temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), teacher_probs, reduction="batchmean") * t * t
    return (1 - cfg.distill) * hard + cfg.distill * soft


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients, taken before clipping them to ``max_norm`` (0 = no clipping:
    an infinite bound scales them by exactly 1)."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)


class GradNorms:
    """The gradient norms of an epoch's steps, kept on the device so no step waits for a sync."""

    def __init__(self, bound: float, device: torch.device):
        self.bound, self.steps = bound, 0
        self.largest, self.total, self.clipped = (torch.zeros((), device=device) for _ in range(3))

    def add(self, norm: torch.Tensor) -> None:
        self.largest = torch.maximum(self.largest, norm)
        self.total += norm
        if self.bound:
            self.clipped += norm > self.bound
        self.steps += 1

    def summary(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"grad_norm_max": self.largest.item(), "grad_norm_mean": self.total.item() / steps,
                "grad_clipped": self.clipped.item() / steps}


def _check_finite(total_loss: torch.Tensor, step: int, optimizer: torch.optim.Optimizer) -> None:
    if not torch.isfinite(total_loss):
        lr = optimizer.param_groups[0]["lr"]
        raise DivergedError(f"training loss became {total_loss.item()} by step {step} (lr {lr:.4g}); lower the learning rate")


# A run has collapsed when its validation accuracy sits at chance for COLLAPSE_EPOCHS epochs after an
# earlier epoch reached LEARNT_OVER_CHANCE x chance: the network predicts one class whatever the image,
# as when a high learning rate kills the ReLUs without any NaN. Two epochs, not one: a loss spike can recover.
COLLAPSE_EPOCHS = 2
LEARNT_OVER_CHANCE = 3.0
CHANCE_MARGIN = 1.5  # "at chance": at most 1.5 x 1/classes


def check_collapse(history: list[dict[str, float]], lr: float, classes: int = len(CLASSES)) -> None:
    """Raise DivergedError if ``history`` (per-epoch records, oldest first) ends in a collapse."""
    chance = 1 / classes
    recent, before = history[-COLLAPSE_EPOCHS:], history[:-COLLAPSE_EPOCHS]
    learnt = max((r["val_acc"] for r in before), default=0.0)
    if len(recent) == COLLAPSE_EPOCHS and learnt >= LEARNT_OVER_CHANCE * chance and all(
            r["val_acc"] <= CHANCE_MARGIN * chance for r in recent):
        raise DivergedError(f"collapsed: validation accuracy fell from {learnt:.1%} to chance ({recent[-1]['val_acc']:.1%}) "
                            f"for {COLLAPSE_EPOCHS} epochs (lr {lr:.4g}); lower the learning rate")


def shifted_copies(x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` translated by (-shift, -shift) and (+shift, +shift) pixels, borders reflected."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    return padded[..., :h, :w], padded[..., 2 * shift :, 2 * shift :]


def tta_logits(model: nn.Module, x: torch.Tensor, flip: bool = False, shift: int = 0) -> torch.Tensor:
    """Logits of ``x``; with ``flip``, averaged with its mirror; with ``shift``, half of that and half
    the mean over two translated copies (each mirrored too if ``flip``), as airbench weighs them."""
    logits = model(x).float()
    if flip:
        logits = (logits + model(x.flip(3)).float()) / 2
    if shift:
        moved = [tta_logits(model, view, flip) for view in shifted_copies(x, shift)]
        logits = (logits + (moved[0] + moved[1]) / 2) / 2
    return logits


@torch.inference_mode()
def predict(model: nn.Module, split: Split, rt: Runtime, batch_size: int = 256, tta_flip: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """Logits (float32, on CPU) for every image of ``split``, under the test-time augmentation of ``tta_logits``."""
    model.eval()
    out = []
    for x, _ in eval_batches(split, batch_size, rt.device, memory_format=rt.memory_format):
        with rt.autocast:
            out.append(tta_logits(model, x, tta_flip, tta_shift).cpu())
    return torch.cat(out) if out else torch.empty(0, 10)


def evaluate(model: nn.Module, split: Split, rt: Runtime, batch_size: int = 256, tta_flip: bool = False, tta_shift: int = 0) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on ``split``; NaN for an empty split."""
    return score(predict(model, split, rt, batch_size, tta_flip, tta_shift), split.labels)


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``logits`` against ``labels``; NaN for no images."""
    if len(labels) == 0:
        return math.nan, math.nan
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def tta_suffix(flip: bool, shift: int) -> str:
    return ("_tta" if flip else "") + (f"_shift{shift}" if shift else "")


def test_logits_by_recipe(model: nn.Module, ema: AveragedModel | None, split: Split, rt: Runtime, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Logits of the raw and (if kept) averaged weights, each without TTA, with flip-TTA and (if
    asked) with the shift, keyed e.g. raw, raw_tta, raw_tta_shift1, ema, ema_tta. Both act only at
    evaluation, so one trained run gives an exact ablation of each; without either there is nothing
    to ablate and only the plain pass is made."""
    models = {"raw": model, **({"ema": ema.module} if ema is not None else {})}
    recipes = [(False, 0)]
    if ema is not None or cfg.tta_flip:
        recipes.append((True, 0))
    if cfg.tta_shift:
        recipes.append((cfg.tta_flip, cfg.tta_shift))
    return {name + tta_suffix(flip, shift): predict(m, split, rt, cfg.eval_batch_size, flip, shift)
            for name, m in models.items() for flip, shift in recipes}


def validation_shift(cfg: TrainConfig, epoch: int) -> int:
    """The shift TTA of epoch ``epoch``'s validation. With ``tta_every_epoch`` off, earlier epochs (all
    a pruner sees) validate with the flip alone, and the last one with the recipe the test uses."""
    return cfg.tta_shift if cfg.tta_every_epoch or epoch == cfg.epochs else 0


EpochCallback = Callable[[int, dict[str, float]], Any]


def step_model(model: nn.Module, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """What the training step calls: ``model``, or with ``cfg.compile`` its ``torch.compile`` (same
    parameters, so the optimiser, EMA and checkpoints keep using ``model``). Evaluation stays eager:
    it runs in eval mode and other batch sizes, each one more compilation."""
    if not cfg.compile:
        return model
    check_compiler(rt.device)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on every CPU-only build
    return torch.compile(model, dynamic=False)  # two static graphs: the full batch and the last one


def fit(
    model: nn.Module,
    data: CIFAR10,
    cfg: TrainConfig,
    rt: Runtime | None = None,
    on_epoch: EpochCallback | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    checkpoint: EpochCheckpoint | None = None,
) -> Result:
    """Train ``model`` for ``cfg.epochs``, evaluating on the validation split each epoch and on the
    test split at the end. ``on_epoch(epoch, record)`` may raise to stop early (pruning). A NaN loss
    or a collapse to chance (``check_collapse``, after ``on_epoch`` logs the epoch) raises DivergedError.

    With ``checkpoint``, the state is saved after each epoch (after ``on_epoch``), and a run whose
    checkpoint holds a saved state continues after its last epoch instead of starting over.

    With ``cfg.ema`` every evaluation uses the weight average, and ``model`` ends holding it, so
    what the caller saves, logs and predicts with is what was evaluated."""
    rt = rt or resolve_runtime(cfg, norm="bn")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_split = data.train.take(cfg.train_subset) if cfg.train_subset else data.train
    model.to(rt.device, memory_format=rt.memory_format)
    for layer in whitening_layers(model):  # fitted to this run's training images before the first step
        layer.fit(normalize(train_split.images[:WHITEN_IMAGES].to(rt.device)))
    optimizer = create_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    scheduler = create_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    ema = create_ema(model, cfg.ema)
    eval_model = ema.module if ema is not None else model
    stepped = step_model(model, cfg, rt)
    result = Result()
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **({"ema": ema} if ema is not None else {})}
    done, seconds_before = 0, 0.0
    if checkpoint is not None and (state := checkpoint.load()) is not None:
        done, result.history, seconds_before = restore(state, parts, generator)
    start = time.perf_counter() - seconds_before
    for epoch in range(done + 1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc, grad_norms = train_one_epoch(stepped, train_split, optimizer, scheduler, cfg, rt, generator, on_step, ema)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        val_loss, val_acc = evaluate(eval_model, data.val, rt, cfg.eval_batch_size, cfg.tta_flip, validation_shift(cfg, epoch))
        record = {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            **grad_norms,
            "epoch_seconds": seconds,
            "images_per_s": len(train_split) / seconds,
            "eval_seconds": time.perf_counter() - t1,
        }
        result.history.append(record)
        if on_epoch:
            on_epoch(epoch, record)
        check_collapse(result.history, lr)
        if checkpoint is not None:
            checkpoint.save(capture(epoch, parts, generator, result.history, time.perf_counter() - start))
    logits = test_logits_by_recipe(model, ema, data.test, rt, cfg)
    if len(logits) > 1:
        result.recipe_ablation = {f"test_acc_{name}": score(out, data.test.labels)[1] for name, out in logits.items()}
    test_logits = logits[("ema" if ema is not None else "raw") + tta_suffix(cfg.tta_flip, cfg.tta_shift)]  # what the config asks for
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    result.test_loss, result.test_acc = score(test_logits, data.test.labels)
    result.test_predictions = test_logits.argmax(1)
    result.seconds = time.perf_counter() - start
    return result
