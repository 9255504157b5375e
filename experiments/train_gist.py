"""Train GistNet on substitutability (SPEC §2.8.1) with the base model frozen.

Resumes from the latest checkpoint in --workdir by default. Writes metrics.jsonl (train
and held-out eval rows: ΔNLL@H of GistNet vs truncation and mean-pooled gists at LOD1 and
LOD1+LOD2), TensorBoard event files (tensorboard/) and summary.json into --workdir.
Steps cycle over the layouts of train.gist_keep_raw (+ LOD1+LOD2 when train.gist_lod2); train.gist_dense scores every raw-tail position.

Example:
  python experiments/train_gist.py --config smollm2_135m_cpu --workdir runs/gist \\
      --set train.steps=100
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_cli import build_parser, run  # noqa: E402


def main(argv=None) -> int:
    return run(build_parser(__doc__, lens=False, layouts=True), argv, "train_gist")


if __name__ == "__main__":
    raise SystemExit(main())
