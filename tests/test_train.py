"""Training: a short run whose loss falls (on the generated data set, and once on real CIFAR-10),
determinism, divergence, evaluate/predict, the optimiser and schedule set-up. Slices are small and
runs are one epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bench.config import TrainConfig
from bench.data import CIFAR10, Split
from bench.errors import DivergedError
from bench.models import create_model
from bench.train import (
    GradNorms,
    check_collapse,
    clip_gradients,
    create_ema,
    create_optimizer,
    create_scheduler,
    evaluate,
    fit,
    predict,
    resolve_runtime,
    shifted_copies,
)

TIMING_KEYS = {"epoch_seconds", "images_per_s", "eval_seconds"}
RECORD_KEYS = {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm_max", "grad_norm_mean", "grad_clipped"} | TIMING_KEYS


def tiny(data: CIFAR10, n_train=512, n_val=200, n_test=200) -> CIFAR10:
    return CIFAR10(data.train.take(n_train), data.val.take(n_val), data.test.take(n_test), data.source, data.digest)


def new_model(norm="bn", seed=0, preset="seed_bn", **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(preset, norm, **kwargs)


def cfg(**kwargs) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 128, "seed": 0, **kwargs})


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


# ---------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def smoke(small_cifar):
    """One epoch (63 steps) of the seed BatchNorm model on 2,000 real images, with the loss before it."""
    config = cfg(batch_size=32)
    rt = resolve_runtime(config, "bn")
    model = new_model()
    before_train = evaluate(model, small_cifar.train, rt)
    before_val = evaluate(model, small_cifar.val, rt)
    epochs = []
    result = fit(model, small_cifar, config, rt, on_epoch=lambda e, r: epochs.append((e, dict(r))))
    return {"model": model, "result": result, "rt": rt, "before_train": before_train, "before_val": before_val,
            "epochs": epochs, "config": config}


def test_one_epoch_on_real_data_lowers_the_loss(smoke, small_cifar):
    result, rt = smoke["result"], smoke["rt"]
    before_loss, before_acc = smoke["before_val"]
    assert before_loss == pytest.approx(math.log(10), abs=0.1)  # an untrained model is at chance
    assert len(result.history) == 1
    record = result.history[0]
    assert set(record) == RECORD_KEYS
    after_train, _ = evaluate(smoke["model"], small_cifar.train, rt)
    assert after_train < smoke["before_train"][0] - 0.1
    assert record["val_loss"] < before_loss - 0.1
    assert record["train_loss"] < math.log(10)  # the epoch's mean loss is already below chance
    assert record["val_acc"] > 0.15 and result.test_acc > 0.15  # chance is 0.10
    assert 0 < result.test_loss < before_loss
    assert record["images_per_s"] > 0 and record["epoch_seconds"] > 0 and result.seconds >= record["epoch_seconds"]
    assert result.best_val_acc == record["val_acc"]


def test_one_epoch_on_real_cifar10_learns(real_cifar):
    """The tests above run on the generated data set; this one on the real images, where they exist."""
    config = cfg(batch_size=32)
    rt = resolve_runtime(config, "bn")
    data = tiny(real_cifar, n_train=2000, n_val=500, n_test=1000)
    result = fit(new_model(), data, config, rt)
    assert result.history[0]["val_loss"] < math.log(10) - 0.1
    assert result.history[0]["val_acc"] > 0.15 and result.test_acc > 0.15  # chance is 0.10


def test_on_epoch_gets_every_epoch_record(smoke):
    assert smoke["epochs"] == [(1, smoke["result"].history[0])]


def test_same_seed_same_result(smoke, small_cifar):
    model = new_model()
    result = fit(model, small_cifar, smoke["config"], smoke["rt"])
    assert without_timing(result.history) == without_timing(smoke["result"].history)
    assert (result.test_loss, result.test_acc) == (smoke["result"].test_loss, smoke["result"].test_acc)
    for (name, a), (_, b) in zip(model.state_dict().items(), smoke["model"].state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_determinism_and_seed_sensitivity(small_cifar, precision):
    data = tiny(small_cifar, n_train=256)
    config = cfg(precision=precision, batch_size=64, cutout=8)
    rt = resolve_runtime(config, "gn")
    runs = []
    for i in range(2):
        model = new_model("gn")
        torch.rand(1000 * (i + 1))  # whatever ran before in the process: fit seeds its own randomness
        runs.append(fit(model, data, config, rt))
    assert without_timing(runs[0].history) == without_timing(runs[1].history)
    assert runs[0].test_acc == runs[1].test_acc and runs[0].test_loss == runs[1].test_loss
    other = fit(new_model("gn"), data, cfg(precision=precision, batch_size=64, cutout=8, seed=1), rt)
    assert other.history[0]["train_loss"] != runs[0].history[0]["train_loss"]


@pytest.mark.parametrize("overrides", [
    {"optimizer": "adamw", "lr": 0.003, "schedule": "cosine", "label_smoothing": 0.1},
    {"optimizer": "sgd", "nesterov": False, "momentum": 0.0, "schedule": "constant", "lr": 0.05, "flip": False, "crop_padding": 0},
])
def test_other_optimisers_and_schedules_train(small_cifar, overrides):
    data = tiny(small_cifar, n_train=384)
    config = cfg(batch_size=64, **overrides)
    result = fit(new_model("ln"), data, config, resolve_runtime(config, "ln"))
    record = result.history[0]
    assert math.isfinite(record["train_loss"]) and record["lr"] == pytest.approx(config.lr)
    assert 0 <= result.test_acc <= 1


def test_train_subset_limits_the_images(small_cifar):
    config = cfg(train_subset=336, batch_size=16)  # 21 steps instead of 125
    seen = []
    result = fit(new_model(), small_cifar, config, resolve_runtime(config, "bn"), on_step=lambda n, loss, acc: seen.append((n, loss, acc)))
    assert [n for n, _, _ in seen] == [20 * 16]  # the progress hook fires every 20 steps
    assert 0 < seen[0][1] < 5 and 0 <= seen[0][2] <= 1
    assert len(result.history) == 1


def test_on_epoch_can_stop_the_run(small_cifar):
    class Prune(Exception):
        pass

    def on_epoch(epoch, record):
        raise Prune(epoch)

    config = cfg(epochs=3)
    with pytest.raises(Prune) as err:
        fit(new_model(), tiny(small_cifar, n_train=128), config, resolve_runtime(config, "bn"), on_epoch=on_epoch)
    assert err.value.args == (1,)


# ---------------------------------------------------------------- divergence


def test_clip_gradients_returns_the_norm_before_clipping_and_scales_to_the_bound():
    layer = nn.Linear(4, 3)
    layer.weight.grad, layer.bias.grad = torch.full((3, 4), 3.0), torch.full((3,), 4.0)
    norm = math.sqrt(12 * 9 + 3 * 16)
    assert clip_gradients(layer, 0.0).item() == pytest.approx(norm)  # 0: measured, not clipped
    assert layer.weight.grad.eq(3.0).all() and layer.bias.grad.eq(4.0).all()
    assert clip_gradients(layer, 1.0).item() == pytest.approx(norm)
    assert torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm().item() == pytest.approx(1.0, rel=1e-4)
    assert layer.weight.grad[0, 0].item() / layer.bias.grad[0].item() == pytest.approx(3 / 4)  # same direction


def test_grad_norms_summarise_an_epochs_steps_against_the_bound():
    norms = GradNorms(2.0, torch.device("cpu"))
    for norm in (1.0, 3.0, 2.0, 6.0):
        norms.add(torch.tensor(norm))
    assert norms.summary() == {"grad_norm_max": 6.0, "grad_norm_mean": 3.0, "grad_clipped": 0.5}  # 3 and 6 exceed 2
    assert GradNorms(0.0, torch.device("cpu")).summary()["grad_clipped"] == 0.0


def test_each_epoch_records_its_largest_gradient_norm_and_grad_clip_changes_the_steps(small_cifar):
    data = tiny(small_cifar, 256, 100, 100)
    free = fit(new_model(), data, cfg(epochs=2, batch_size=64))
    clipped = fit(new_model(), data, cfg(epochs=2, batch_size=64, grad_clip=0.05))
    assert all(0 < r["grad_norm_mean"] <= r["grad_norm_max"] < math.inf for r in free.history + clipped.history)
    assert [r["grad_clipped"] for r in free.history] == [0.0, 0.0]
    assert all(0 < r["grad_clipped"] <= 1 for r in clipped.history)
    assert clipped.history[0]["train_loss"] != free.history[0]["train_loss"]


def test_huge_learning_rate_raises_diverged(small_cifar):
    config = cfg(lr=1e6, schedule="constant", batch_size=32, precision="fp32")
    with pytest.raises(DivergedError) as err:
        fit(new_model(), tiny(small_cifar, n_train=1000), config, resolve_runtime(config, "bn"))
    msg = str(err.value)
    assert "nan" in msg.lower() or "inf" in msg.lower()
    assert "lower the learning rate" in msg


def test_nan_loss_stops_the_run_early_with_a_clear_error(small_cifar):
    model = new_model()
    calls = []

    def poison(module, inputs, output):  # from the 5th training step on, the logits are NaN
        if module.training:
            calls.append(1)
            if len(calls) >= 5:
                return output * float("nan")
        return output

    model.layers[-1].register_forward_hook(poison)
    epochs = []
    config = cfg(batch_size=16, epochs=2)
    with pytest.raises(DivergedError, match="by step 20"):
        fit(model, tiny(small_cifar, n_train=1600), config, resolve_runtime(config, "bn"), on_epoch=lambda e, r: epochs.append(e))
    assert len(calls) == 20  # stopped at the first check, not after 100 steps
    assert epochs == []


def test_nan_in_the_last_steps_of_an_epoch_is_caught(small_cifar):
    model = new_model()
    steps = []

    def poison(module, inputs, output):  # only the 3rd (last) step, after any periodic check
        if module.training:
            steps.append(1)
            if len(steps) == 3:
                return output * float("inf")
        return output

    model.layers[-1].register_forward_hook(poison)
    config = cfg(batch_size=64, epochs=1)
    with pytest.raises(DivergedError, match="by step 3"):
        fit(model, tiny(small_cifar, n_train=150), config, resolve_runtime(config, "bn"))


def history(*val_accs: float) -> list[dict[str, float]]:
    return [{"val_acc": acc} for acc in val_accs]


@pytest.mark.parametrize("accs", [
    (0.1, 0.1, 0.1, 0.1),  # never learnt: a slow start, not a collapse
    (0.5, 0.1),  # one epoch at chance: a spike that may recover
    (0.5, 0.1, 0.4, 0.1),  # recovered in between
    (0.25, 0.1, 0.1),  # never clearly above chance
    (0.5, 0.16, 0.1),  # above chance in one of the last two
])
def test_no_collapse(accs):
    check_collapse(history(*accs), lr=0.1)


def test_a_collapse_to_chance_after_learning_raises():
    with pytest.raises(DivergedError, match=r"collapsed: validation accuracy fell from 80.0% to chance \(10.1%\) for 2 epochs \(lr 0.0737\); lower the learning rate"):
        check_collapse(history(0.3, 0.8, 0.4, 0.12, 0.101), lr=0.0737)


def test_a_collapsed_run_stops_two_epochs_after_collapsing(small_cifar):
    """A network that learnt, then predicts class 0 whatever the image (as a run killed by a high
    learning rate does, without a NaN), ends as diverged after two epochs at chance instead of
    training on; both epochs are seen (logged) first."""
    model = new_model()
    dead = []

    def predict_class_0(module, inputs, output):
        return output * 0 + torch.eye(10)[0] if dead else output

    model.layers[-1].register_forward_hook(predict_class_0)
    epochs = []

    def on_epoch(epoch, record):
        epochs.append((epoch, record["val_acc"]))
        if dead or record["val_acc"] > 0.3:  # dead once it has learnt: one epoch on some CPUs, a few on others
            dead.append(epoch)

    config = cfg(epochs=12, schedule="constant", lr=0.05, batch_size=32)
    with pytest.raises(DivergedError, match="collapsed"):
        fit(model, tiny(small_cifar, n_train=1000), config, resolve_runtime(config, "bn"), on_epoch=on_epoch)
    learnt = dead[0]
    assert [e for e, _ in epochs] == list(range(1, learnt + 3))
    assert epochs[learnt - 1][1] > 0.3 and all(acc < 0.15 for _, acc in epochs[learnt:])


# ---------------------------------------------------------------- evaluate and predict


def test_predict_and_evaluate(smoke, small_cifar):
    model, rt = smoke["model"], smoke["rt"]
    model.train()
    logits = predict(model, small_cifar.val, rt, batch_size=300)
    assert not model.training  # predict evaluates in eval mode
    assert logits.shape == (500, 10) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.equal(logits, predict(model, small_cifar.val, rt, batch_size=500))  # batching does not matter
    loss, acc = evaluate(model, small_cifar.val, rt, batch_size=128)
    expected_acc = (logits.argmax(1) == small_cifar.val.labels).float().mean().item()
    assert acc == pytest.approx(expected_acc)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, small_cifar.val.labels).item(), rel=1e-5)
    assert acc == pytest.approx(smoke["result"].history[0]["val_acc"])


def test_evaluate_empty_split_is_nan(smoke):
    empty = Split(torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    loss, acc = evaluate(smoke["model"], empty, smoke["rt"])
    assert math.isnan(loss) and math.isnan(acc)
    assert predict(smoke["model"], empty, smoke["rt"]).shape == (0, 10)


# ---------------------------------------------------------------- set-up pieces


def test_runtime_resolution():
    assert resolve_runtime(cfg(precision="fp32"), "bn", torch.device("cpu")).dtype == torch.float32
    assert resolve_runtime(cfg(precision="bf16"), "bn", torch.device("cpu")).dtype == torch.bfloat16
    assert resolve_runtime(cfg(channels_last="on"), "gn").memory_format == torch.channels_last
    assert resolve_runtime(cfg(channels_last="off"), "bn").memory_format == torch.contiguous_format
    # auto: GroupNorm trains NCHW in the residual family, channels-last in the ConvNeXt family
    assert resolve_runtime(cfg(), "gn", preset="resnet").memory_format == torch.contiguous_format
    assert resolve_runtime(cfg(), "gn", preset="convnext").memory_format == torch.channels_last
    assert resolve_runtime(cfg(channels_last="off"), "gn", preset="convnext").memory_format == torch.contiguous_format
    rt = resolve_runtime(cfg(precision="fp32"), "bn", torch.device("cpu"))
    assert "cpu float32" in rt.describe()


def test_no_weight_decay_on_norm_parameters():
    model = create_model("seed_bn", "bn")
    opt = create_optimizer(model, cfg(weight_decay=1e-3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 for p in decay["params"]) and len(decay["params"]) == 11
    assert len(no_decay["params"]) == 16  # weight and bias of 8 BatchNorms
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    assert isinstance(create_optimizer(model, cfg(optimizer="adamw")), torch.optim.AdamW)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules(schedule):
    config = cfg(schedule=schedule, lr=0.1)
    opt = create_optimizer(nn.Linear(2, 2), config)
    sched = create_scheduler(opt, config, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if schedule == "onecycle":
        assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1, rel=1e-3)
        assert 20 <= lrs.index(max(lrs)) <= 40 and lrs[-1] < 1e-4
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.05, rel=0.05) and lrs[-1] < 1e-3
    else:
        assert lrs == [pytest.approx(0.1)] * 100


# ---------------------------------------------------------------- recipe options: EMA and flip TTA


def test_ema_update_is_the_documented_average():
    model = nn.Linear(3, 1)
    ema = create_ema(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # the first update copies, the second averages
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, start + 1.0 + 0.1)
    assert create_ema(model, 0.0) is None


@pytest.fixture(scope="module")
def ema_runs(small_cifar):
    """The residual BN model for one epoch on 1,024 real images, with and without an EMA of its weights."""
    data = tiny(small_cifar, n_train=1024, n_val=300, n_test=300)
    runs = {}
    for decay in (0.0, 0.9):
        config = cfg(batch_size=32, ema=decay, precision="fp32")
        rt = resolve_runtime(config, "bn")
        model = new_model(preset="resnet")
        runs[decay] = (model, fit(model, data, config, rt), rt)
    return data, runs


def test_ema_changes_the_evaluated_weights_and_still_trains(ema_runs):
    data, runs = ema_runs
    (plain, plain_result, rt), (averaged, ema_result, _) = runs[0.0], runs[0.9]
    # Same training trajectory (the average does not feed back), different evaluated weights.
    assert ema_result.history[0]["train_loss"] == plain_result.history[0]["train_loss"]
    assert ema_result.history[0]["val_loss"] != plain_result.history[0]["val_loss"]
    assert ema_result.history[0]["val_loss"] < math.log(10) - 0.1
    assert ema_result.test_acc > 0.15
    # The model handed back holds the average, BatchNorm statistics included: it is what was evaluated.
    assert evaluate(averaged, data.val, rt) == pytest.approx((ema_result.history[0]["val_loss"], ema_result.history[0]["val_acc"]))
    assert evaluate(averaged, data.test, rt) == pytest.approx((ema_result.test_loss, ema_result.test_acc))
    bn_plain, bn_ema = plain.stem[1], averaged.stem[1]
    assert not torch.equal(bn_plain.running_mean, bn_ema.running_mean)
    assert not torch.equal(plain.classifier.weight, averaged.classifier.weight)


def test_recipe_ablation_reports_each_option_off_from_the_same_run(ema_runs):
    data, runs = ema_runs
    (_, plain_result, rt), (averaged, ema_result, _) = runs[0.0], runs[0.9]
    assert plain_result.recipe_ablation == {}  # nothing to ablate
    ablation = ema_result.recipe_ablation
    assert set(ablation) == {"test_acc_raw", "test_acc_raw_tta", "test_acc_ema", "test_acc_ema_tta"}
    assert ablation["test_acc_raw"] == pytest.approx(plain_result.test_acc)  # EMA never fed back into training
    assert ablation["test_acc_ema"] == pytest.approx(ema_result.test_acc)
    assert ablation["test_acc_ema_tta"] == pytest.approx(evaluate(averaged, data.test, rt, tta_flip=True)[1])


def test_tta_flip_averages_the_image_and_its_mirror():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    split = Split(images, torch.arange(40) % 10)
    mirrored = Split(images.flip(3), split.labels)
    model = new_model(preset="resnet", width1=8, width2=8, width3=8)
    rt = resolve_runtime(cfg(precision="fp32"), "bn", torch.device("cpu"))
    plain = predict(model, split, rt, batch_size=16)
    tta = predict(model, split, rt, batch_size=16, tta_flip=True)
    assert torch.allclose(tta, (plain + predict(model, mirrored, rt, batch_size=16)) / 2, atol=1e-6)
    assert not torch.allclose(tta, plain)
    loss, acc = evaluate(model, split, rt, batch_size=16, tta_flip=True)
    assert loss == pytest.approx(nn.functional.cross_entropy(tta, split.labels).item(), rel=1e-5)
    assert acc == pytest.approx((tta.argmax(1) == split.labels).float().mean().item())


def test_fit_evaluates_with_tta_flip_when_asked(small_cifar):
    data = tiny(small_cifar, n_train=640, n_val=200, n_test=200)
    config = cfg(batch_size=32, tta_flip=True, precision="fp32")
    rt = resolve_runtime(config, "bn")
    model = new_model()
    result = fit(model, data, config, rt)
    assert result.history[0]["val_loss"] == pytest.approx(evaluate(model, data.val, rt, tta_flip=True)[0])
    assert result.test_loss == pytest.approx(evaluate(model, data.test, rt, tta_flip=True)[0])
    assert result.test_loss != pytest.approx(evaluate(model, data.test, rt)[0], rel=1e-4)


def test_optimizer_steps_with_one_fused_kernel_on_cpu_and_skips_decay_on_norms():
    model = create_model("seed_bn", "bn")
    for cfg in (TrainConfig(), TrainConfig(optimizer="adamw", lr=1e-3)):
        optimizer = create_optimizer(model, cfg)
        assert optimizer.defaults["fused"] is True
        decay, no_decay = optimizer.param_groups
        assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
        assert all(p.ndim == 1 for p in no_decay["params"])


def shift_uint8(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images`` moved so that pixel (i, j) shows (i + dy, j + dx), borders reflected."""
    padded = nn.functional.pad(images.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8)
    h, w = images.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def test_shifted_copies_translate_with_reflected_borders():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    up_left, down_right = shifted_copies(x, 1)
    assert torch.equal(up_left[..., 1:, 1:], x[..., :-1, :-1]) and torch.equal(down_right[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(up_left[..., 0, 1:], x[..., 1, :-1])  # the row above the image mirrors row 1
    assert torch.equal(down_right[..., -1, :-1], x[..., -2, 1:])  # and the row below mirrors the second last


def test_tta_shift_halves_flip_tta_with_the_mean_of_two_translations():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 10
    model = new_model(preset="resnet", width1=8, width2=8, width3=8)
    rt = resolve_runtime(cfg(precision="fp32"), "bn", torch.device("cpu"))

    def flip_tta(imgs):
        return predict(model, Split(imgs, labels), rt, batch_size=16, tta_flip=True)

    expected = (flip_tta(images) + (flip_tta(shift_uint8(images, -1, -1)) + flip_tta(shift_uint8(images, 1, 1))) / 2) / 2
    shifted = predict(model, Split(images, labels), rt, batch_size=16, tta_flip=True, tta_shift=1)
    assert torch.allclose(shifted, expected, atol=1e-5)
    assert not torch.allclose(shifted, flip_tta(images), atol=1e-3)
    no_flip = predict(model, Split(images, labels), rt, batch_size=16, tta_shift=1)
    plain = lambda imgs: predict(model, Split(imgs, labels), rt, batch_size=16)  # noqa: E731
    assert torch.allclose(no_flip, (plain(images) + (plain(shift_uint8(images, -1, -1)) + plain(shift_uint8(images, 1, 1))) / 2) / 2, atol=1e-5)


def test_fit_scores_the_test_set_with_the_shift_and_ablates_it(small_cifar):
    data = tiny(small_cifar, n_train=256, n_val=100, n_test=200)
    config = cfg(batch_size=64, tta_flip=True, tta_shift=1, precision="fp32")
    rt = resolve_runtime(config, "bn")
    model = new_model()
    result = fit(model, data, config, rt)
    assert set(result.recipe_ablation) == {"test_acc_raw", "test_acc_raw_tta", "test_acc_raw_tta_shift1"}
    assert result.test_acc == result.recipe_ablation["test_acc_raw_tta_shift1"]
    assert result.test_loss == pytest.approx(evaluate(model, data.test, rt, tta_flip=True, tta_shift=1)[0])
    assert result.history[0]["val_acc"] == pytest.approx(evaluate(model, data.val, rt, tta_flip=True, tta_shift=1)[1])


@pytest.mark.parametrize("every_epoch", [True, False])
def test_tta_every_epoch_off_validates_with_the_shift_only_at_the_last_epoch(small_cifar, every_epoch):
    data = tiny(small_cifar, n_train=256, n_val=100, n_test=100)
    config = cfg(epochs=3, batch_size=64, tta_flip=True, tta_shift=1, tta_every_epoch=every_epoch, precision="fp32")
    rt = resolve_runtime(config, "bn")
    model = new_model()
    recipes = []

    def which_recipe(epoch, record):
        flip = evaluate(model, data.val, rt, tta_flip=True)[0]
        shifted = evaluate(model, data.val, rt, tta_flip=True, tta_shift=1)[0]
        assert flip != shifted  # an untrained model gives them within 1e-6 of each other: compared exactly
        recipes.append("shift" if record["val_loss"] == shifted else "flip" if record["val_loss"] == flip else "?")

    result = fit(model, data, config, rt, on_epoch=which_recipe)
    assert recipes == (["shift"] * 3 if every_epoch else ["flip", "flip", "shift"])
    assert result.test_acc == result.recipe_ablation["test_acc_raw_tta_shift1"]  # the test always takes the full recipe
