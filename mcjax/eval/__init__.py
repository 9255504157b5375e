"""Checkpoint evaluation (SPEC §2.9): metrics, tasks, baseline runners, reports.

- `metrics`: correlations (Pearson, Spearman, sign agreement; degenerate input reported, not
  NaN), passkey scoring (mean ± standard error: `mcjax.statistics`).
- `tasks`: ΔNLL layouts of increasing compression, passkey cases, feed schedules, checks.
- `baselines`: ΔNLL@H of every context variant, passkey runs of every method, focus quality.
- `networks`: which GistNet / LensNet a checkpoint provides (and which stay untrained).
- `report`: results.json, report.md and the PNG plots.
- `pipeline`: `run_evaluation(EvalOptions(...))`, what `experiments/evaluate.py` runs.
"""

from mcjax.eval.metrics import (  # noqa: F401
    PASSKEY_SCORING, PasskeyScore, accuracy, correlation_summary, pearson,
    score_passkey, sign_agreement, spearman)
from mcjax.statistics import mean_stderr  # noqa: F401
from mcjax.eval.tasks import (  # noqa: F401
    EvalInputError, LayoutSpec, check_lengths, feed_schedule, nll_layouts, passkey_cases)
