"""Train LensNet on counterfactual focus utilities (SPEC §2.8.2); base model and GistNet frozen.

GistNet comes from the latest checkpoint of --gist-workdir (a train_gist or train_joint
workdir); without it an untrained GistNet is used, and the log says so. Resumes from the
latest checkpoint in --workdir by default. Writes metrics.jsonl (train rows and held-out
eval rows: lens loss and its terms, pair accuracy, score/utility correlation, ΔNLL@H of
the compressed working contexts) and summary.json into --workdir.

Example:
  python experiments/train_lens.py --config smollm2_135m_cpu --workdir runs/lens \\
      --gist-workdir runs/gist --set train.steps=100
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_cli import build_parser, run  # noqa: E402


def main(argv=None) -> int:
    return run(build_parser(__doc__, gist_workdir=True), argv, "train_lens")


if __name__ == "__main__":
    raise SystemExit(main())
