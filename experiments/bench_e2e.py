"""e2e: decode tokens/s of a MegaContext session vs the plain base model over a w_max window.

For each history length (default 8k, 32k, 128k tokens) a `mcjax.runtime.Session` is fed that
many random tokens, warmed up, then timed generating `--decode-tokens` greedy tokens
end to end: K-token decode blocks plus one refocus per K tokens (tree ingest + GistNet,
LensNet twice, allocator, materialize, re-prefill from the first changed slot). Side by
side, interleaved in the same run: the plain base model (`GreedySampler`) decoding the same
number of tokens after a w_max-token prompt, i.e. over a w_max window with a KV cache.
ratio = session / base tokens/s (goal ≥ 0.95: < 5 % overhead); the session's cost per token
must stay flat as the history grows. XLA compilations during the timed part are counted
(goal 0). Every timed call returns host tokens, i.e. blocks on the device.

Defaults are the SPEC's (SmolLM2-135M dims, w_max 8,192, K 32); random weights cost what
real ones do (`--model smollm2-135m` loads the real ones). On a CPU the defaults shrink to
`--w-max 512 --decode-tokens 64 --iters 2` (recorded in `shrunk_for_cpu`). GistNet and
LensNet are untrained (same cost per call); an untrained LensNet's arbitrary expand/collapse
actions each force a re-prefill from their slot, so `--focus quiet` (a LensNet that never
acts) measures the runtime's floor: appends plus budget collapses only. Each history is run
under every `--kv-reuse` mode (default: exact and approx) crossed with every `--decode-focus`
setting (default: every), each with its own ratio and goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-max", type=int, default=None,
                   help="working-context budget (default: 8192, the SPEC's; 512 on a CPU)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--histories", type=int, nargs="+", default=[8192, 32768, 131072],
                   help="history lengths in tokens")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens per timed generation, a multiple of the block size (default: "
                        "128; 64 on a CPU)")
    p.add_argument("--iters", type=int, default=None, help="default: 3; 2 on a CPU")
    p.add_argument("--model", default="random",
                   help="'random' (SmolLM2-135M dims, random weights) or a loadable model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="ExperimentConfig override; repeatable")
    p.add_argument("--headroom", type=int, default=None,
                   help="Session collapse_headroom in slots (default: w_max/8; 0 = off)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="Session prefill_chunk (default: largest K*2^i <= 256 dividing w_max)")
    p.add_argument("--focus", choices=["untrained", "quiet", "retrieval", "shipped"],
                   default="untrained",
                   help="LensNet: untrained (acts arbitrarily), or quiet (head zeroed: never "
                        "asks for edits, so only appends and budget collapses happen); or "
                        "retrieval focus (training-free, query-aware; keys read per block); or "
                        "shipped: the shipped GistNet and LensNet v2 (mcjax/assets/) under "
                        "their own config (needs --model smollm2-135m)")
    p.add_argument("--text", choices=["random", "held-out"], default="random",
                   help="history tokens: uniform random ids, or the held-out corpus "
                        "(documents in a row; what a trained focus policy is meant for)")
    p.add_argument("--kv-reuse", nargs="+", choices=["exact", "approx"],
                   default=["exact", "approx"],
                   help="Session kv_reuse modes, each timed side by side with the base "
                        "(approx keeps moved KV entries: see results/kv_reuse for its cost)")
    p.add_argument("--decode-focus", nargs="+", choices=["every", "on_collapse"],
                   default=["every"],
                   help="Session decode_focus settings, each timed (crossed with --kv-reuse); "
                        "on_collapse: focus acts while decoding only when room is made "
                        "anyway (see results/decode_focus for its NLL cost)")
    p.add_argument("--batch", type=int, default=1,
                   help="streams per session (and per base decode); each stream's history "
                        "is its own slice of the text (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)




def _held_out_tokens(cfg, n: int, vocab_size: int):
    """The first `n` tokens of the held-out corpus (documents in a row), tokenized as the
    trainers and evaluation do; the base model must have their tokenizer."""
    import numpy as np

    from mcjax import data
    from mcjax.scoring import load_frozen

    frozen = load_frozen(cfg)
    corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                   separator=frozen.separator, progress=False)
    tokens = np.asarray(corpus.tokens)[:n]
    if len(tokens) < n or tokens.max() >= vocab_size:
        raise SystemExit(f"the held-out corpus has {len(tokens)} tokens (< {n}) or ids "
                         f"outside the model's vocabulary")
    return tokens


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mcjax.base import model as base
    from mcjax.base.generate import GreedySampler
    from mcjax.benchmarking import block, median, smollm2_135m_config
    from mcjax.config import (ExperimentConfig, GistConfig, LensConfig, MCConfig,
                              override)
    from mcjax.runtime import CompileCounter, Session, untrained_params

    on_cpu = jax.default_backend() == "cpu"
    # A CPU needs about a minute per w_max=8192 re-prefill: shrink what is not set.
    shrunk = [name for name in ("w_max", "decode_tokens", "iters")
              if on_cpu and getattr(args, name) is None]
    W = args.w_max or (512 if on_cpu else 8192)
    N = args.decode_tokens or (64 if on_cpu else 128)
    iters = args.iters or (2 if on_cpu else 3)
    K = args.block_size
    if N % K:
        raise SystemExit(f"--decode-tokens ({N}) must be a multiple of --block-size ({K})")
    B = args.batch
    if B < 1:
        raise SystemExit(f"--batch must be >= 1, got {B}")
    if args.model == "random":
        llama = smollm2_135m_config(args.dtype)
        params = block(jax.jit(base.init_params, static_argnums=0)(llama,
                                                                   jax.random.key(args.seed)))
    else:
        from mcjax.base.loading import load_base_model

        loaded = load_base_model(args.model, with_tokenizer=False)
        llama, params = loaded.config, loaded.params
    if args.focus == "shipped":
        from mcjax.config import get_config

        if args.model != "smollm2-135m" or K != 32:
            raise SystemExit("--focus shipped needs --model smollm2-135m and --block-size 32 "
                             "(what the shipped nets were trained for)")
        cfg = dataclasses.replace(get_config("smollm2_135m_cpu", [f"mc.w_max={W}"]),
                                  base_config=llama)
    else:
        cfg = ExperimentConfig(
            name="e2e", base=args.model, base_config=llama,
            mc=MCConfig(block_size=K, w_max=W, recent_protect=2 * K, gist_dtype=args.dtype),
            gist=GistConfig(dtype=args.dtype), lens=LensConfig(dtype=args.dtype))
    if args.overrides:
        cfg = override(cfg, args.overrides)
    gist_params = lens_params = None
    if args.focus != "shipped":
        gist_params, lens_params = untrained_params(cfg, "gist"), untrained_params(cfg, "lens")
    if args.focus == "quiet":
        lens_params = dict(lens_params, head=jax.tree.map(jnp.zeros_like, lens_params["head"]))
    rng = np.random.default_rng(args.seed)
    text = None
    if args.text == "held-out":
        text = _held_out_tokens(cfg, B * max(args.histories), llama.vocab_size)
    # One view capacity for every history: the programs compile once for the whole run.
    max_tokens = max(args.histories) + (iters + 2) * N + K

    # ---- baseline: the plain base model decoding N tokens after a w_max-token window
    sampler = GreedySampler(llama, max_new_tokens=N + 1, max_prompt_len=W)
    prompt, lengths = sampler._prepare(rng.integers(0, llama.vocab_size, (B, W)), None)

    def base_decode() -> float:
        state = block(sampler._start(params, prompt, lengths))  # prefill: not timed
        t0 = time.perf_counter()
        out = block(sampler._advance(params, state, jnp.int32(N + 1)))
        assert int(out.step) == N + 1
        return time.perf_counter() - t0

    base_decode()  # compile

    result: dict = {
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "dtype": args.dtype, "model": args.model,
        "w_max": W, "block_size": K, "decode_tokens": N, "iters": iters, "batch": B,
        "shrunk_for_cpu": shrunk,
        "max_tokens": max_tokens, "focus": args.focus,
        "gistnet_lensnet": {"untrained": "untrained (cost only)",
                            "quiet": "untrained GistNet, LensNet head zeroed (no focus actions)",
                            "retrieval": "untrained GistNet, retrieval focus (no LensNet)",
                            "shipped": "the shipped GistNet and LensNet v2 (mcjax/assets/)"
                            }[args.focus], "text": args.text,
        "collapse_headroom": None, "prefill_chunk": None,
        "kv_reuse": list(args.kv_reuse), "decode_focus": list(args.decode_focus),
        "histories": {},
    }
    # a mode is its kv_reuse setting, suffixed with a decode_focus other than the default
    modes = [(m if f == "every" else f"{m}/{f}", m, f) for m in args.kv_reuse
             for f in args.decode_focus]
    for H, (name, mode, decode_focus) in [(H, m) for H in args.histories for m in modes]:
        session = Session((llama, params), gist_params, lens_params, cfg, max_tokens=max_tokens,
                          batch_size=B, collapse_headroom=args.headroom,
                          prefill_chunk=args.prefill_chunk, kv_reuse=mode,
                          decode_focus=decode_focus,
                          focus_policy="retrieval" if args.focus == "retrieval" else "lens")
        if args.focus == "shipped" and any(session.provenance[p]["source"] != "shipped"
                                           for p in ("gist", "lens")):
            raise SystemExit(f"the shipped nets do not fit this setup: {session.provenance}")
        t0 = time.perf_counter()
        session.feed([rng.integers(0, llama.vocab_size, H) if text is None
                      else text[b * H:(b + 1) * H] for b in range(B)])
        t_ingest = time.perf_counter() - t0
        session.sync()  # initial layout, refocus, prefill
        t_layout = time.perf_counter() - t0 - t_ingest
        session.generate(N)  # warm-up: decode and refocus programs, view row buckets
        n_warm = len(session.events)
        t_session, t_base = [], []
        with CompileCounter() as compiles:
            for _ in range(iters):  # interleaved so background load hits both alike
                t_base.append(base_decode())
                t1 = time.perf_counter()
                out = session.generate(N)
                t_session.append(time.perf_counter() - t1)
                assert out.shape == (B, N)
        timed = list(session.events)[n_warm:]
        result["collapse_headroom"] = session._plan.headroom
        result["prefill_chunk"] = session._plan.prefill_chunk
        last = timed[-1]
        session_tps, base_tps = N / median(t_session), N / median(t_base)
        decode_s = median([e.timings["decode_s"] for e in timed])

        def mean(key: str) -> float:
            return float(np.mean([e.timings[key] for e in timed]))

        def all_streams(field: str) -> float:
            return float(np.mean([getattr(e, field) for e in timed]))

        # Chunk-loop slots: every stream's own range runs under vmap, so a refocus iterates
        # as long as its busiest stream needs. For exact reuse, the former rule (one range
        # for the batch: the earliest first change through the latest last slot) is counted
        # from the same events for comparison.
        own = [max(e.reprefill_slots) for e in timed]
        shared = None
        if mode == "exact":
            shared = []
            for e in timed:
                need = [b for b in range(B) if e.reprefill_slots[b] and not e.kv_reused[b]]
                lo = min((e.reprefill_start[b] for b in need), default=0)
                hi = max((-(-round(e.budget_use[b] * W) // K) * K for b in need), default=0)
                shared.append(hi - lo)
            shared = float(np.mean(shared))

        result["histories"].setdefault(str(H), {})[name] = {
            "session_tokens_per_s": session_tps, "base_tokens_per_s": base_tps,
            "ratio_session_over_base": session_tps / base_tps,
            "session_s_per_token": 1 / session_tps,
            "compiles_after_warmup": compiles.count, "compiled": sorted(set(compiles.names)),
            "ingest_s": t_ingest, "ingest_tokens_per_s": B * H / t_ingest,
            "read_pass": dict(session.read_pass, outputs=list(session.read_pass["outputs"])),
            "layout_and_prefill_s_incl_compile": t_layout,
            "tree_counts": list(session.tree().counts),
            "wc_lod_histogram": last.lod_histogram[0], "budget_use": last.budget_use[0],
            "residency": last.residency[0],
            "per_refocus": {  # means: the amortized cost per K decoded tokens
                "count": len(timed),
                "decode_block_s": decode_s,
                "decode_only_tokens_per_s": K / decode_s,
                "ingest_s": mean("ingest_s"),
                "refocus_s": mean("refocus_s"),
                "refocus_s_median": median([e.timings["refocus_s"] for e in timed]),
                "reprefill_slots": all_streams("reprefill_slots"),  # mean over streams
                "reprefill_loop_slots": float(np.mean(own)),
                "reprefill_loop_slots_one_range_for_the_batch": shared,
                "approximate_share": all_streams("reprefill_approximate"),
                "kv_reused_share": all_streams("kv_reused"),
                "focus_actions": float(np.mean([np.add(e.num_expand, e.num_collapse).mean()
                                                for e in timed])),
                "reprefilling_share": float(np.mean([max(e.reprefill_slots) > 0
                                                     for e in timed])),
                "budget_collapses": float(np.mean([e.append_collapses[0] for e in timed])),
                "headroom_collapses": float(np.mean([e.headroom_collapses[0] for e in timed])),
                "swap_rate": float(np.mean([e.swap_rate[0] for e in timed])),
            },
        }
        del session
    result["goal"] = ("session >= 0.95x base tokens/s at every history, flat cost per token, "
                      "0 compilations after warm-up")
    for mode, _, _ in modes:
        rows = [h[mode] for h in result["histories"].values()]
        tps = [r["session_tokens_per_s"] for r in rows]
        ratios = [r["ratio_session_over_base"] for r in rows]
        compiles = sum(r["compiles_after_warmup"] for r in rows)
        result[mode] = {
            "flatness_max_over_min_s_per_token": max(tps) / min(tps),
            "ratio_min_max": [min(ratios), max(ratios)],  # base speed drifts with load
            "compiles_after_warmup_total": compiles,
            "goal_met": bool(min(ratios) >= 0.95 and compiles == 0)}
    return result


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    add_args(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
