"""How far an ensemble of the gated shape's finished finals gets: a majority vote of their logged test
predictions (each final's ``predictions/test.npz``, flip + shift TTA already applied), against the 90%
target. A ceiling for distilling these models into one, and a measure of how different their errors are.

    cd <folder holding mlruns/> && python docs/convnext_norms/ensemble_vote.py > ensemble_vote.txt
"""

import itertools

import mlflow
import numpy as np

from bench import tracking
from bench.tracking.reading import load_predictions

tracking.setup("sqlite:///mlruns/mlflow.db")
client = mlflow.MlflowClient()
finals = []
for experiment in client.search_experiments(filter_string="name LIKE 'gated_%'"):
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED' and tags.`bench.kind` = 'confirm'"):
        predictions = load_predictions(run.info.run_id)
        if predictions is not None:
            finals.append((experiment.name, run.data.tags.get("bench.recipe", ""), run.info.run_id,
                           run.data.metrics["test_acc"], predictions["predicted"].astype(int), predictions["labels"].astype(int)))
labels = finals[0][5]
assert all((f[5] == labels).all() for f in finals), "the finals were tested on different test sets"


def vote(members) -> float:
    """Majority vote; a tie goes to the class of the member with the best test accuracy."""
    counts = np.zeros((len(labels), 10))
    for *_, accuracy, predicted, _ in members:
        counts[np.arange(len(labels)), predicted] += 1 + 1e-3 * accuracy
    return float((counts.argmax(1) == labels).mean())


for study, recipe, run_id, accuracy, *_ in sorted(finals):
    print(f"{study}  {run_id[:8]}  test {100 * accuracy:.2f}%  {recipe}")
print()
bn = [f for f in finals if f[0] == "gated_bn"]
print(f"vote of the {len(bn)} gated_bn finals: {100 * vote(bn):.2f}% (best single {100 * max(f[3] for f in bn):.2f}%)")
print(f"vote of all {len(finals)} gated finals (bn, gn, ln): {100 * vote(finals):.2f}%")
for k in (3, 5):
    subsets = [vote(members) for members in itertools.combinations(bn, k)]
    print(f"vote of {k} gated_bn finals, every subset: mean {100 * np.mean(subsets):.2f}%, best {100 * max(subsets):.2f}%")
right = np.stack([f[4] == labels for f in finals])
print(f"test images every final gets right: {100 * right.all(0).mean():.2f}%; that some final gets right: {100 * right.any(0).mean():.2f}%")
