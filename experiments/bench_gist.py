"""gist: GistNet throughput and cost relative to the base forward; tree append throughput.

All at SmolLM2-135M width (D=576, 30 layers, 9/3 heads, FFN 1536, vocab 49,152) with random
weights (cost does not depend on the values), default GistNet (width 512, 8 heads, 2
layers, query pooling), in one process:

* gisting: blocks/s for a batch of `--batch-blocks` blocks of 32 children, and for one
  block; the base model's forward over the same tokens ([N, 32] ids, logits for every
  position, and hidden states only) is timed alternately with it, and the ratio
  gist time / base time is the goal metric (goal <= 0.10);
* tree append: tokens/s, gisting included, for a `--tokens` stream appended in chunks of
  `--chunk` tokens, in memory and on disk (durable: fsync per append), plus a streaming
  run that appends one block (32 tokens) at a time;
* read pass (v2 GistNet input, SPEC §2.3a): tokens/s of `layer_hidden` (the first
  `--read-layer` layers over independent chunks of `--read-chunk` tokens) against the
  plain base prefill (all layers, hidden states only) of the same `--read-tokens` tokens,
  timed alternately; the ratio is what the read pass adds to ingesting a history;
* storage: bytes per 1M tokens at each level, measured from the on-disk files;
* streams: `--streams` trees (a session's batch) that each gain one block per round, appended
  tree by tree (one GistNet call each) and with `mcjax.tree.append_to_trees` (one shared
  call), timed alternately round by round, for embedding and read-pass (hidden) GistNet
  input; the trees of both ways are checked bit-identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="stream length for the tree append throughput")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per append")
    p.add_argument("--stream-tokens", type=int, default=8192,
                   help="stream length for the one-block-per-append (streaming) run")
    p.add_argument("--batch-blocks", type=int, default=64,
                   help="blocks per gist call in the throughput measurement")
    p.add_argument("--gist-batch", type=int, default=None,
                   help="the tree's fixed gist batch (blocks per call; default: "
                   "mcjax.tree.default_gist_batch() for this backend)")
    p.add_argument("--sweep", type=int, nargs="*", default=[1, 4, 16, 64],
                   help="gist batch sizes whose per-block cost is measured")
    p.add_argument("--gist-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of gists in the tree")
    p.add_argument("--read-tokens", type=int, default=4096,
                   help="tokens per read-pass timing (one stream)")
    p.add_argument("--read-layer", type=int, default=10,
                   help="read-pass depth (GistConfig.input_layer)")
    p.add_argument("--read-chunk", type=int, default=1024,
                   help="read-pass chunk (GistConfig.read_chunk)")
    p.add_argument("--streams", type=int, default=4,
                   help="trees in the shared-call streaming measurement")
    p.add_argument("--stream-rounds", type=int, default=16,
                   help="timed rounds (one new block per tree each) of that measurement")
    p.add_argument("--skip-throughput", action="store_true",
                   help="only the streams measurement (skip gisting, read pass, tree "
                   "append and storage)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dir", default=None, help="directory for the on-disk store (default: a "
                   "temporary directory, removed afterwards)")


def _alternate(fns: dict, iters: int) -> dict:
    """Median seconds per fn, timed alternately so background load hits all alike."""
    from mcjax.benchmarking import block

    for fn in fns.values():  # warm-up (compile)
        block(fn())
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _append_run(tree, tokens: np.ndarray, chunk: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(tokens), chunk):
        tree.append(tokens[i:i + chunk])
    return time.perf_counter() - t0


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from mcjax.base import model as base
    from mcjax.benchmarking import smollm2_135m_config, time_call, time_compile
    from mcjax.config import GistConfig, MCConfig
    from mcjax.gist import _gist_blocks, init_gist_params, num_params
    from mcjax.tree import BlockGister, MegaContextTree, bytes_per_million_tokens

    bcfg = smollm2_135m_config()
    gcfg = GistConfig()
    mc = MCConfig(gist_dtype=args.gist_dtype)
    K, D = mc.block_size, bcfg.hidden_size
    base_params = base.init_params(bcfg, jax.random.PRNGKey(0))
    gparams = init_gist_params(gcfg, D, jax.random.PRNGKey(1), block_size=K)
    rng = np.random.default_rng(0)
    result: dict = {
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "base": "SmolLM2-135M dims, random weights, fp32",
        "gistnet": {**dataclasses.asdict(gcfg), "params": num_params(gparams)},
        "block_size": K, "embed_dim": D,
    }

    if args.skip_throughput:
        result["streams"] = _streams(args, gparams, base_params, bcfg, mc, rng)
        return result
    # ---------------------------------------------------------------- gist vs base forward
    level = jnp.int32(1)
    gisting = {}
    for n in (1, args.batch_blocks):
        ids = jnp.asarray(rng.integers(0, bcfg.vocab_size, (n, K)), jnp.int32)
        children = base.embed_tokens(base_params, ids)
        positions = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (n, K))
        mask = jnp.ones((n, K), bool)
        compile_s = time_compile(_gist_blocks, gparams, gcfg, children, level)
        med = _alternate({
            "gist": lambda: _gist_blocks(gparams, gcfg, children, level),
            "base_logits": lambda: base._forward(base_params, bcfg, ids, None, positions,
                                                 mask, False),
            "base_hidden": lambda: base._forward(base_params, bcfg, ids, None, positions,
                                                 mask, True),
        }, args.iters)
        gisting[f"batch_{n}"] = {
            "blocks": n, "gist_s": med["gist"], "gist_blocks_per_s": n / med["gist"],
            "gist_ms_per_block": 1e3 * med["gist"] / n,
            "base_forward_s": med["base_logits"], "base_hidden_only_s": med["base_hidden"],
            "ratio_gist_over_base_forward": med["gist"] / med["base_logits"],
            "ratio_gist_over_base_hidden_only": med["gist"] / med["base_hidden"],
            "gist_compile_s": compile_s,
        }
    result["gisting"] = gisting
    # Per-block cost against the batch size: what the tree's fixed gist batch trades off
    # (bulk throughput vs. the padding paid by a one-block streaming append).
    sweep = {}
    for g in args.sweep:
        ch = jnp.asarray(rng.normal(size=(g, K, D)), jnp.float32)
        reps = max(1, max(args.sweep) // g)  # same number of blocks per timing
        t = time_call(lambda: [_gist_blocks(gparams, gcfg, ch, level) for _ in range(reps)],
                      iters=args.iters)
        sweep[str(g)] = {"ms_per_block": 1e3 * t["median_s"] / (reps * g),
                         "ms_per_call": 1e3 * t["median_s"] / reps}
    result["gist_batch_sweep"] = sweep
    headline = gisting[f"batch_{args.batch_blocks}"]
    result["goal"] = {"ratio_gist_over_base_forward_max": 0.10,
                      "ratio": headline["ratio_gist_over_base_forward"],
                      "met": headline["ratio_gist_over_base_forward"] <= 0.10}

    # ---------------------------------------------------------------- read pass
    T = args.read_tokens
    ids = jnp.asarray(rng.integers(0, bcfg.vocab_size, (1, T)), jnp.int32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    mask = jnp.ones((1, T), bool)
    read = lambda: base._layer_hidden(base_params, bcfg, ids, args.read_layer, args.read_chunk)
    prefill = lambda: base._forward(base_params, bcfg, ids, None, pos, mask, True)
    med = _alternate({"read": read, "prefill": prefill}, args.iters)
    result["read_pass"] = {
        "tokens": T, "layer": args.read_layer, "chunk": args.read_chunk,
        "read_pass_tokens_per_s": T / med["read"],
        "base_prefill_tokens_per_s": T / med["prefill"],
        "ratio_read_pass_over_base_prefill_time": med["read"] / med["prefill"]}

    # ---------------------------------------------------------------- tree append
    gister = BlockGister.from_base(gcfg, gparams, base_params, bcfg, block_size=K,
                                   gist_batch=args.gist_batch)  # None: backend default
    tokens = rng.integers(0, bcfg.vocab_size, args.tokens).astype(np.int32)
    warm = MegaContextTree.in_memory(mc, gister)  # compile embed + gist outside the timings
    warm.append(tokens[:K * K])
    appends: dict = {"tokens": args.tokens, "chunk": args.chunk,
                     "gist_batch": gister.gist_batch,
                     "gist_dtype": args.gist_dtype}
    mem = MegaContextTree.in_memory(mc, gister)
    secs = _append_run(mem, tokens, args.chunk)
    appends["memory"] = {"seconds": secs, "tokens_per_s": args.tokens / secs,
                         "counts": list(mem.counts), "gist_calls": mem.stats.gist_calls}
    tmp = args.dir or tempfile.mkdtemp(prefix="mcjax_bench_tree_")
    try:
        store = os.path.join(tmp, "store")
        disk = MegaContextTree.create(store, mc, gister, model_name="SmolLM2-135M",
                                      overwrite=True)
        secs = _append_run(disk, tokens, args.chunk)
        counts = list(disk.counts)
        disk.close()
        appends["disk"] = {"seconds": secs, "tokens_per_s": args.tokens / secs,
                           "counts": counts, "durable": True}
        t0 = time.perf_counter()
        reopened = MegaContextTree.open(store, mc, gister, model_name="SmolLM2-135M")
        appends["disk"]["reopen_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        view = reopened.view()
        jax.block_until_ready(view)
        appends["disk"]["view_build_s"] = time.perf_counter() - t0
        assert reopened.counts == mem.counts
        sizes = {f"LOD{l}": os.path.getsize(os.path.join(store, f"LOD{l}.ctx"))
                 for l in range(mc.num_levels + 1)}
        reopened.close()
        result["bytes_per_1M_tokens"] = {
            "measured": {k: (v - 64) * 1e6 / args.tokens for k, v in sizes.items()},
            "analytic": bytes_per_million_tokens(mc, D),
            "file_bytes": sizes,
        }
        # Streaming: one block per append (the runtime's cadence), on disk.
        s_tokens = tokens[:args.stream_tokens]
        sdisk = MegaContextTree.create(os.path.join(tmp, "stream"), mc, gister,
                                       model_name="SmolLM2-135M", overwrite=True)
        secs = _append_run(sdisk, s_tokens, K)
        appends["streaming_disk_one_block_per_append"] = {
            "tokens": len(s_tokens), "seconds": secs, "tokens_per_s": len(s_tokens) / secs,
            "ms_per_append": 1e3 * secs / (len(s_tokens) // K)}
        sdisk.close()
        smem = MegaContextTree.in_memory(mc, gister)
        secs = _append_run(smem, s_tokens, K)
        appends["streaming_memory_one_block_per_append"] = {
            "tokens": len(s_tokens), "seconds": secs, "tokens_per_s": len(s_tokens) / secs,
            "ms_per_append": 1e3 * secs / (len(s_tokens) // K)}
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["tree_append"] = appends
    result["streams"] = _streams(args, gparams, base_params, bcfg, mc, rng)
    return result


def _streams(args, gparams, base_params, bcfg, mc, rng) -> dict:
    """B trees gaining one block each per round: tree-by-tree appends vs `append_to_trees`."""
    import dataclasses as dc

    from mcjax.config import GistConfig
    from mcjax.tree import BlockGister, MegaContextTree, append_to_trees

    B, K, out = args.streams, mc.block_size, {"streams": args.streams,
                                               "rounds": args.stream_rounds}
    for name, gcfg in (("embeddings", GistConfig()),
                       ("hidden", dc.replace(GistConfig(), input="hidden", input_layer=10,
                                             read_chunk=1024))):
        gister = BlockGister.from_base(gcfg, gparams, base_params, bcfg, block_size=K,
                                       gist_batch=args.gist_batch)
        one, shared = ([MegaContextTree.in_memory(mc, gister) for _ in range(B)]
                       for _ in range(2))
        start = [rng.integers(0, bcfg.vocab_size, 1000 + 37 * b) for b in range(B)]
        for trees in (one, shared):  # a history inside an open read chunk; compiles
            append_to_trees(trees, start)
        times = {"tree_by_tree": [], "append_to_trees": []}
        for r in range(args.stream_rounds + 1):  # round 0 warms up both paths
            new = [rng.integers(0, bcfg.vocab_size, K) for _ in range(B)]
            calls = {}
            for key, fn in (("tree_by_tree", lambda: [t.append(x) for t, x in zip(one, new)]),
                            ("append_to_trees", lambda: append_to_trees(shared, new))):
                c0, t0 = gister.calls, time.perf_counter()
                fn()
                if r:
                    times[key].append(time.perf_counter() - t0)
                calls[key] = gister.calls - c0
        for a, b in zip(one, shared):  # the same trees, bit for bit
            assert a.counts == b.counts
            for level in range(1, mc.num_levels + 1):
                assert a.gists(level).tobytes() == b.gists(level).tobytes()
        med = {k: float(np.median(v)) for k, v in times.items()}
        out[name] = {"ms_per_round": {k: 1e3 * v for k, v in med.items()},
                     "gist_calls_per_round": calls,
                     "ratio_shared_over_tree_by_tree": med["append_to_trees"]
                     / med["tree_by_tree"], "trees_bit_identical": True}
    return out


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    add_args(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
