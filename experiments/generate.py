"""Stream a greedy generation from the frozen base model.

Until the MegaContext runtime lands this is the project's main job (`make run`): it loads
the embedded SmolLM2-135M-Instruct (converted from the shipped GGUF on first use) or any
local Llama-family HF directory, and streams the greedy continuation of a prompt.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="shipped model name or local HF directory (default: %(default)s)")
    parser.add_argument("--prompt", default="The capital of France is",
                        help="text to continue (default: %(default)r)")
    parser.add_argument("--prompt-file", help="read the prompt from this file instead")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template as a user turn")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=4, help="tokens decoded per streamed chunk")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        parser.error("--max-new-tokens must be > 0")

    from mcjax.base.generate import GreedySampler
    from mcjax.base.loading import load_base_model

    prompt = open(args.prompt_file).read() if args.prompt_file else args.prompt
    if not prompt:
        parser.error("the prompt is empty")
    model = load_base_model(args.model)
    if args.chat:
        ids = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = model.encode(prompt)
    if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
        print(f"note: {len(ids)} prompt tokens + {args.max_new_tokens} new exceed the model's "
              f"trained context of {model.config.max_position_embeddings}", file=sys.stderr)
    sampler = GreedySampler(model.config, max_new_tokens=args.max_new_tokens,
                            max_prompt_len=len(ids), eos_id=model.config.eos_token_id)
    print(f"[{model.path.name}: {len(ids)} prompt tokens, greedy]", file=sys.stderr)
    sys.stdout.write(prompt if not args.chat else "")
    t0, n = time.perf_counter(), 0
    shown = ""
    generated: list[int] = []
    for chunk in sampler.stream(model.params, ids, chunk=args.chunk):
        generated.extend(int(t) for t in chunk)
        n += len(chunk)
        # Decode the whole continuation so multi-byte characters split across chunks print once.
        text = model.decode([t for t in generated if t != model.config.eos_token_id])
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f}s incl. compile]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
