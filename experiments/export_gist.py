"""Export a training workdir's GistNet as a params-only file + JSON card (mcjax.assets).

The file is what `--gist-params` (evaluate.py, generate.py) and the shipped-net loader
read; the card carries the checkpoint's config, step, run and which weights were written.

Example:
  python experiments/export_gist.py --workdir runs/gist_v3 --ema --dtype float16 \\
      --out mcjax/assets/gistnet_smollm2_135m.safetensors --card-json '{"command": "..."}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def main(argv=None) -> int:
    p = _cli.Parser(description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="train_gist / train_joint workdir")
    p.add_argument("--out", required=True, metavar="PARAMS.safetensors",
                   help="output file (its card is written beside it as PARAMS.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", action="store_true",
                   help="the params' moving average (a run with train.ema_decay > 0)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16"),
                   help="stored dtype (default: as trained)")
    p.add_argument("--card-json", default="{}", metavar="JSON",
                   help="extra card entries as a JSON object (command, data, figures, ...)")
    args = p.parse_args(argv)
    _cli.no_negative_ints(p, args)
    _cli.output_file(p, args.out, "--out")
    try:
        extra = json.loads(args.card_json)
    except json.JSONDecodeError as e:
        p.error(f"--card-json is not JSON: {e}")
    if not isinstance(extra, dict):
        p.error("--card-json must be a JSON object")

    from mcjax.errors import CheckpointError
    from mcjax.nets import export_gist_params

    try:
        out, card = export_gist_params(args.workdir, args.out, step=args.step, dtype=args.dtype,
                                       ema=args.ema, **extra)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
