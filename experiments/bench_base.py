"""base: prefill and KV-cache decode throughput of our base model vs transformers' (torch).

Both run the same converted SmolLM2 weights in fp32 on the same machine in the same
process; timings alternate ours/theirs per iteration so background load hits both alike.
Prefill = one forward over T tokens producing logits for every position (HF:
`use_cache=False`). Decode = greedy steps with a KV cache after a prompt (ours: the jitted
`lax.while_loop` sampler; theirs: a loop of single-token forwards with `past_key_values`,
the leanest HF path). Compile times are ours (lower + compile, no execution).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers attention implementation for the reference")


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from mcjax.base import model as base
    from mcjax.base.generate import GreedySampler
    from mcjax.base.loading import load_base_model
    from mcjax.benchmarking import block, median, time_compile

    torch.set_num_threads(os.cpu_count() or 1)
    ours = load_base_model(args.model, with_tokenizer=False)
    cfg, params = ours.config, ours.params
    theirs = AutoModelForCausalLM.from_pretrained(
        str(ours.path), dtype=torch.float32, attn_implementation=args.attn).eval()
    rng = np.random.default_rng(0)
    result: dict = {
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "model": args.model, "dtype": cfg.dtype, "reference": f"transformers {args.attn}",
        "prefill": {}, "compile_s": {},
    }

    for T in args.prefill_lengths:
        tokens = rng.integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        tok_j = jnp.asarray(tokens)
        positions = jnp.arange(T, dtype=jnp.int32)[None]
        mask = jnp.ones((1, T), bool)
        result["compile_s"][f"forward_{T}"] = time_compile(
            base._forward, params, cfg, tok_j, None, positions, mask, False)
        ours_fn = lambda: base._forward(params, cfg, tok_j, None, positions, mask, False)  # noqa: E731
        tok_t = torch.from_numpy(tokens.astype(np.int64))

        def theirs_fn():
            with torch.inference_mode():
                return theirs(tok_t, use_cache=False).logits

        block(ours_fn()), theirs_fn()  # warm-up (compile / allocator)
        t_ours, t_theirs = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter(); block(ours_fn()); t_ours.append(time.perf_counter() - t0)  # noqa: E702
            t0 = time.perf_counter(); theirs_fn(); t_theirs.append(time.perf_counter() - t0)  # noqa: E702
        ours_tps, theirs_tps = T / median(t_ours), T / median(t_theirs)
        result["prefill"][str(T)] = {
            "ours_tokens_per_s": ours_tps, "reference_tokens_per_s": theirs_tps,
            "ratio_ours_over_reference": ours_tps / theirs_tps,
            "ours_s": median(t_ours), "reference_s": median(t_theirs)}

    # ---- KV-cache decode
    P, N = args.decode_prompt, args.decode_tokens
    prompt = rng.integers(0, cfg.vocab_size, (1, P)).astype(np.int32)
    sampler = GreedySampler(cfg, max_new_tokens=N + 1, max_prompt_len=P)
    prompt_j, lengths = sampler._prepare(prompt, None)
    state0 = sampler._start(params, prompt_j, lengths)
    result["compile_s"]["decode_loop"] = time_compile(
        GreedySampler._advance, sampler, params, state0, jnp.int32(N + 1))

    def ours_decode():
        state = block(sampler._start(params, prompt_j, lengths))  # prefill: not timed
        t0 = time.perf_counter()
        out = block(sampler._advance(params, state, jnp.int32(N + 1)))
        assert int(out.step) == N + 1
        return time.perf_counter() - t0

    prompt_t = torch.from_numpy(prompt.astype(np.int64))

    def theirs_decode():
        with torch.inference_mode():
            out = theirs(prompt_t, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(N):
                out = theirs(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0

    ours_decode(), theirs_decode()  # warm-up
    d_ours, d_theirs = [], []
    for _ in range(args.iters):
        d_ours.append(ours_decode())
        d_theirs.append(theirs_decode())
    ours_tps, theirs_tps = N / median(d_ours), N / median(d_theirs)
    result["decode"] = {
        "prompt_tokens": P, "new_tokens": N,
        "ours_tokens_per_s": ours_tps, "reference_tokens_per_s": theirs_tps,
        "ratio_ours_over_reference": ours_tps / theirs_tps}
    result["goal_met"] = bool(all(v["ratio_ours_over_reference"] >= 1.0
                                  for v in result["prefill"].values())
                              and result["decode"]["ratio_ours_over_reference"] >= 1.0)
    return result


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    add_args(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
