"""bench report's verdict on the gated shape's 50-epoch finals, whose runs sit in two MLflow stores (a
machine change lost the first store). Reads each final's test accuracy from gated_50ep_finals.json beside
it and applies the report's own comparison (bench.report.numbers.compare: Welch, or a single run against
the other group's seeds; Holm over the pairs) and prints its statement.

    python docs/convnext_norms/gated_50ep_verdict.py            # the norms, finals of the shared recipe
    python docs/convnext_norms/gated_50ep_verdict.py gated_bn   # one study's recipes against each other

A final with a "recipe" field (its --set overrides beyond the shared recipe, e.g. grad_clip=2) joins only
the second comparison.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from bench import stats
from bench.report.numbers import compare
from bench.report.tables import statement


def groups(finals: list[dict], study: str | None) -> dict[str, list[float]]:
    by_name: dict[str, list[float]] = {}
    for final in finals:
        if study is None and "recipe" not in final:
            by_name.setdefault(final["study"], []).append(final["test_acc"])
        elif final["study"] == study:
            by_name.setdefault(f"{study} {final.get('recipe', 'shared recipe')}", []).append(final["test_acc"])
    return by_name


finals = json.loads(Path(__file__).with_name("gated_50ep_finals.json").read_text())["finals"]
by_name = groups(finals, sys.argv[1] if len(sys.argv) > 1 else None)
summaries = [SimpleNamespace(name=name, test_values=values, test=stats.summarize(values)) for name, values in by_name.items()]
for s in summaries:
    spread = f" ± {100 * s.test.std:.2f}" if s.test.n > 1 else ""
    print(f"{s.name}: {', '.join(f'{100 * v:.2f}%' for v in s.test_values)} -> {100 * s.test.mean:.2f}%{spread} (n={s.test.n})")
print()
print("\n".join(statement(compare(summaries))))
