"""The gated_bn training step three ways, A B C A B C on this CPU, one thread: compiled with the fused
depthwise weight gradient, compiled with oneDNN's, and eager (oneDNN's).
python docs/depthwise/step_ab.py [steps] [repeats]   (BENCH_DATA_DIR set)

The three models start from the same weights; the second and third have every DepthwiseConv2d's
fused_weight_grad off. The first takes the fused path whatever the CPU (bench itself takes it only with
AVX-512). Prints images/s of each repeat and the ratios of the medians."""

import copy
import dataclasses
import json
import statistics
import sys

import torch

from bench.config import load
from bench.data import load_cifar10
from bench.models import create_model, depthwise
from bench.models.depthwise import DepthwiseConv2d
from bench.runtime import cpu_name, resolve_runtime
from bench.speed.harness import epoch_runner
from bench.speed.measure import interleaved, warm_up
from bench.train import create_optimizer, step_model

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.set_num_threads(1)
depthwise.FUSED_WEIGHT_GRAD_WINS = True
exp = load("experiments/gated_bn.toml")
cfg = dataclasses.replace(exp.train, compile=True)
rt = resolve_runtime(cfg, exp.model.norm, torch.device("cpu"), exp.model.preset)
data = load_cifar10()
torch.manual_seed(0)
fused = create_model(**dataclasses.asdict(exp.model)).to(memory_format=rt.memory_format)
onednn = copy.deepcopy(fused)
for conv in onednn.modules():
    if isinstance(conv, DepthwiseConv2d):
        conv.fused_weight_grad = False
eager = copy.deepcopy(onednn)
runners = {name: epoch_runner(step_model(m, dataclasses.replace(cfg, compile=compiled), rt), create_optimizer(m, cfg), cfg, rt, data.train)
           for name, m, compiled in (("fused", fused, True), ("onednn", onednn, True), ("eager", eager, False))}
warm_up(runners, 3 * cfg.batch_size)
rates = interleaved(runners, steps * cfg.batch_size, repeats)
medians = {name: statistics.median(r) for name, r in rates.items()}
print(json.dumps({"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(), "runtime": rt.describe(),
                  "steps": steps, "batch_size": cfg.batch_size, "images_per_s": rates, "median": medians,
                  "fused / onednn": medians["fused"] / medians["onednn"], "onednn / eager": medians["onednn"] / medians["eager"]}, indent=1))
