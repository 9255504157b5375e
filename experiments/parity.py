"""Parity of mcjax's decoder with transformers' torch model, per architecture (SPEC §2.1).

For every tiny random config of `mcjax.config.tiny_architectures()` (Llama, Llama 3.x /
linear / yarn RoPE scaling, Llama biases, Qwen2, Qwen3, Mistral with a sliding window):
the max |logit difference| from token ids, and from embeddings with explicit positions and
a validity mask; with --reader, the same on the packaged reader's converted directory
(`make setup MODEL=qwen2.5-coder-0.5b`). fp32 throughout. Prints a Markdown table; --out
writes JSON.

Example:
  python experiments/parity.py --reader --out results/architecture_parity/parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def main(argv=None) -> int:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", action="store_true",
                        help="also the converted packaged reader qwen2.5-coder-0.5b")
    parser.add_argument("--out", help="JSON output file")
    args = parser.parse_args(argv)
    _cli.no_negative_ints(parser, args)
    if args.out:
        _cli.output_file(parser, args.out, "--out")
    if args.out:
        try:
            open(args.out, "a").close()
        except OSError as e:
            parser.error(f"--out {args.out}: {e}")

    import numpy as np

    from mcjax.base import model as base
    from mcjax.base import parity
    from mcjax.base.loading import load_config, load_params
    from mcjax.config import tiny_architectures

    rows = []
    for name, config in tiny_architectures().items():
        with tempfile.TemporaryDirectory() as d:
            hf = parity.torch_reference(config, d)
            assert load_config(d) == config
            params = load_params(d, config)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, config.vocab_size, (2, 23))
        ref = parity.torch_logits(hf, tokens)
        by_ids = np.abs(np.asarray(base.forward(params, config, tokens=tokens)) - ref).max()
        positions = np.cumsum(rng.integers(1, 60, (2, 23)), axis=1)
        mask = np.ones((2, 23), bool)
        mask[1, [3, 4, 11]] = False
        ours = np.asarray(base.forward(params, config, embeds=base.embed_tokens(params, tokens),
                                       positions=positions, mask=mask))
        ref = parity.torch_logits(hf, tokens, positions, mask)
        by_embeds = np.abs(ours[mask] - ref[mask]).max()
        rows.append({"model": name, "tokens": 23, "max_abs_logit_diff_ids": float(by_ids),
                     "max_abs_logit_diff_embeds_positions_mask": float(by_embeds),
                     "logit_scale": float(np.abs(ref).max())})
    if args.reader:
        import torch
        from transformers import Qwen2ForCausalLM

        from mcjax.base.loading import load_base_model

        reader = load_base_model("qwen2.5-coder-0.5b", progress=False)
        hf = Qwen2ForCausalLM.from_pretrained(str(reader.path), dtype=torch.float32,
                                              attn_implementation="eager").eval()
        text = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                "        a, b = b, a + b\n    return a\n\nThe capital of France is Paris, "
                "and the capital of Italy is") * 3
        tokens = reader.encode(text)[None]
        ours = np.asarray(base.forward(reader.params, reader.config, tokens=tokens))
        ref = parity.torch_logits(hf, tokens)
        rows.append({"model": "qwen2.5-coder-0.5b (converted reader)",
                     "tokens": int(tokens.shape[1]),
                     "max_abs_logit_diff_ids": float(np.abs(ours - ref).max()),
                     "max_abs_logit_diff_embeds_positions_mask": None,
                     "logit_scale": float(np.abs(ref).max()),
                     "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean())})
    print("| model | tokens | max abs logit diff (ids) | (embeds, positions, mask) | max abs logit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        emb = r["max_abs_logit_diff_embeds_positions_mask"]
        print(f"| {r['model']} | {r['tokens']} | {r['max_abs_logit_diff_ids']:.2e} | "
              f"{'—' if emb is None else f'{emb:.2e}'} | {r['logit_scale']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "command": " ".join(sys.argv)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
