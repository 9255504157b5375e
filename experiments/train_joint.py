"""Train GistNet and LensNet together on the same batches (SPEC §2.8.3); base model frozen.

The two objectives are summed and both nets take a step on every batch: GistNet on
substitutability, LensNet on counterfactual utilities measured with the current GistNet's
gists (see `mcjax.train.steps.JointStep`). GistNet's term is train_gist.py's: steps cycle
over the layouts of train.gist_keep_raw (+ LOD1+LOD2 when train.gist_lod2);
train.gist_dense scores every raw-tail position. Resumes from the latest checkpoint in
--workdir by default. Writes metrics.jsonl (train rows with gist/ and lens/ metrics, one
per layout; held-out eval rows: substitution ΔNLL@H beside truncation and mean pooling on
every training layout, and the lens metrics) and summary.json into --workdir.

Example:
  python experiments/train_joint.py --config smollm2_135m_cpu --workdir runs/joint \\
      --set train.steps=100
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_cli import build_parser, run  # noqa: E402


def main(argv=None) -> int:
    return run(build_parser(__doc__, gist_workdir=False, layouts=True), argv, "train_joint")


if __name__ == "__main__":
    raise SystemExit(main())
