"""bench report's verdict on the gated shape's 50-epoch finals, whose runs sit in two MLflow stores (a
machine change lost the first store). Reads each final's test accuracy from gated_50ep_finals.json beside
it and applies the report's own comparison (bench.report.numbers.compare: Welch, or a single run against
the other norm's seeds; Holm over the pairs) and prints its statement.

    python docs/convnext_norms/gated_50ep_verdict.py
"""

import json
from pathlib import Path
from types import SimpleNamespace

from bench import stats
from bench.report.numbers import compare
from bench.report.tables import statement

finals = json.loads(Path(__file__).with_name("gated_50ep_finals.json").read_text())["finals"]
by_norm: dict[str, list[float]] = {}
for final in finals:
    by_norm.setdefault(final["study"], []).append(final["test_acc"])
summaries = [SimpleNamespace(name=name, test_values=values, test=stats.summarize(values)) for name, values in by_norm.items()]
for s in summaries:
    spread = f" ± {100 * s.test.std:.2f}" if s.test.n > 1 else ""
    print(f"{s.name}: {', '.join(f'{100 * v:.2f}%' for v in s.test_values)} -> {100 * s.test.mean:.2f}%{spread} (n={s.test.n})")
print()
print("\n".join(statement(compare(summaries))))
