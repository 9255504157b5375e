"""LensNet v2 by distillation of retrieval focus plus synthetic-task labels (SPEC §2.5,
§2.8 item 2; `mcjax.train.distill`). Two phases, each resumable:

  gen    build histories (passkey prompts over the *train* split's real text, some plain
         text), their trees (shipped GistNet, read-pass keys) and the focus states LensNet
         v2 learns from; one npz shard per history under DATA/states/.
  train  fit LensNet v2 to the teacher's slot scores on those shards (the last
         --val-histories shards are held out) through the shared training loop
         (`mcjax.train.loop.train_distill`): orbax checkpoints every --save-every steps (a
         rerun resumes from the latest), metrics.jsonl and TensorBoard under --workdir;
         --export writes the params-only file + card (e.g. into mcjax/assets/).

Example (CPU):
  python experiments/distill_lens.py gen --data runs/distill --histories 200
  python experiments/distill_lens.py train --data runs/distill --workdir runs/lens_v2 \\
      --minutes 40 --export mcjax/assets/lensnet_smollm2_135m.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    for name in ("gen", "train"):
        s = sub.add_parser(name, help=f"{name} phase (see the module doc)",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", default="smollm2_135m_cpu",
                       help="registered experiment config; its `lens` must be v2")
        s.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.FIELD=VALUE", help="override a config field")
        s.add_argument("--data", required=True, help="directory of the states shards")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--no-progress", action="store_true")
    g = sub.choices["gen"]
    g.add_argument("--histories", type=int, default=200, help="histories to have in total")
    g.add_argument("--min-tokens", type=int, default=1536)
    g.add_argument("--max-tokens", type=int, default=8192)
    g.add_argument("--rounds", type=int, default=5,
                   help="allocator rounds per history (states: rounds + 1)")
    g.add_argument("--plain-fraction", type=float, default=0.2,
                   help="share of histories of plain text without a needle")
    g.add_argument("--explore", type=float, default=0.25,
                   help="chance a round moves by random scores instead of the teacher's")
    t = sub.choices["train"]
    t.add_argument("--workdir", required=True,
                   help="checkpoints, metrics.jsonl, tensorboard/, lens_params.safetensors")
    t.add_argument("--steps", type=int, default=2000,
                   help="optimizer steps (the warmup-cosine schedule spans them)")
    t.add_argument("--minutes", type=float, default=None,
                   help="stop early after this long (the schedule still follows --steps)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--val-histories", type=int, default=20)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    t.add_argument("--no-resume", action="store_true",
                   help="start afresh even if --workdir holds checkpoints")
    t.add_argument("--export", default=None, metavar="PARAMS.safetensors",
                   help="write the final params + card here")
    return p


def _config(args):
    from mcjax.config import get_config, override

    cfg = get_config(args.config)
    if args.overrides:
        cfg = override(cfg, args.overrides)
    if not cfg.lens.query_tokens:
        raise SystemExit(f"config {cfg.name!r} has LensNet v1 (lens.query_tokens=0); "
                         f"distillation trains v2")
    return cfg


def _gen(args) -> int:
    from tqdm.auto import tqdm

    import jax

    from mcjax.nets import shipped_gist
    from mcjax.retrieval import BlockKeys
    from mcjax import data
    from mcjax.scoring import load_frozen
    from mcjax.train import distill
    from mcjax.tree import BlockGister, MegaContextTree

    cfg = _config(args)
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    shipped = shipped_gist(cfg)
    if shipped is None:
        raise SystemExit("no shipped GistNet fits this config: LensNet v2 learns on the "
                         "shipped gists")
    gist_params = shipped[0]
    K = cfg.mc.block_size
    base_params = jax.device_put(frozen.params)
    gister = BlockGister.from_base(cfg.gist, gist_params, base_params, cfg.base_config,
                                   block_size=K, retrieval=cfg.retrieval)
    block_keys = BlockKeys(cfg.retrieval, cfg.base_config, K)
    haystack = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "train",
                                     separator=frozen.separator, progress=False).tokens
    out = Path(args.data) / "states"
    out.mkdir(parents=True, exist_ok=True)
    cap = -(-args.max_tokens // K) * K
    (Path(args.data) / "gen.json").write_text(json.dumps(
        {"config": cfg.name, "overrides": args.overrides, "args": vars(args)}, indent=2))
    todo = [i for i in range(args.histories) if not (out / f"h{i:05d}.npz").is_file()]
    bar = tqdm(todo, desc="histories", disable=args.no_progress)
    for i in bar:
        rng = np.random.default_rng([args.seed, i])
        length = int(rng.integers(args.min_tokens // K, args.max_tokens // K + 1)) * K
        plain = rng.random() < args.plain_fraction
        if plain:
            start = int(rng.integers(0, len(haystack) - length))
            tokens, needle_blocks = haystack[start: start + length], []
        else:
            ex = data.make_retrieval_example(frozen.encode, length, rng, haystack=haystack)
            tokens = ex.tokens
            a, b = ex.needle_span
            needle_blocks = list(range(a // K, (b - 1) // K + 1))
        tree = MegaContextTree.in_memory(cfg.mc, gister, view_capacity_tokens=cap,
                                         block_keys=block_keys)
        tree.append(np.asarray(tokens, np.int32))
        states = distill.distill_states(base_params, tree.view(), cfg, needle_blocks,
                                        rounds=args.rounds, rng=rng, explore=args.explore)
        arrays = distill.stack_states(states)
        tmp = out / f"h{i:05d}.tmp.npz"
        np.savez(tmp, **arrays, history_tokens=len(tokens), plain=plain)
        tmp.rename(out / f"h{i:05d}.npz")
        bar.set_postfix(tokens=len(tokens), plain=int(plain))
    done = [p for p in out.glob("h*.npz") if not p.name.endswith(".tmp.npz")]
    print(json.dumps({"histories": len(done), "dir": str(out)}))
    return 0


def _load_shards(paths):
    from mcjax.train import distill

    parts = []
    for p in paths:
        with np.load(p) as z:
            parts.append({f: z[f] for f in distill.STATE_FIELDS})
    return {f: np.concatenate([x[f] for x in parts]) for f in distill.STATE_FIELDS}


def _train(args) -> int:
    import jax

    from mcjax.assets import save_params_safetensors, write_card, FORMAT
    from mcjax.config import config_to_json
    from mcjax.train import loop

    cfg = _config(args)
    shards = sorted(p for p in (Path(args.data) / "states").glob("h*.npz")
                    if not p.name.endswith(".tmp.npz"))
    if len(shards) <= args.val_histories:
        raise SystemExit(f"{len(shards)} shards in {args.data}/states: need more than "
                         f"--val-histories={args.val_histories}")
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    train_arr = _load_shards(shards[: -args.val_histories])
    val_arr = _load_shards(shards[-args.val_histories:])
    n_train, n_val = len(train_arr["target"]), len(val_arr["target"])
    # the warmup-cosine schedule spans --steps; AdamW with weight decay 1e-4, clipping at 1
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=min(args.warmup, args.steps // 4), eval_every=args.eval_every,
        checkpoint_every=args.save_every, log_every=10, seed=args.seed, weight_decay=1e-4,
        grad_clip=1.0))
    work = Path(args.workdir)
    t0 = time.time()
    result = loop.train_distill(
        cfg, work, train_arr, val_arr, resume=not args.no_resume,
        progress=not args.no_progress,
        stop_after_s=None if args.minutes is None else 60 * args.minutes)
    params = jax.device_get(result["state"].params["lens"])

    def save(path=None):
        path = Path(path) if path else work / "lens_params.safetensors"
        save_params_safetensors(params, path, {"part": "lens"})
        return path

    save()
    step = result["end_step"]
    summary = {"steps": step, "start_step": result["start_step"],
               "minutes": (time.time() - t0) / 60, "train_states": n_train,
               "val_states": n_val, "train_histories": len(shards) - args.val_histories,
               "val_histories": args.val_histories, "eval_start": result.get("eval_before"),
               "eval_final": result.get("eval_after")}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    if args.export:
        out = save(args.export)
        card = {"format": FORMAT, "part": "lens", "config": config_to_json(cfg),
                "source": "experiments/distill_lens.py", "step": step,
                "command": " ".join(["python", "experiments/distill_lens.py"] + sys.argv[1:]),
                "data": json.loads((Path(args.data) / "gen.json").read_text())
                if (Path(args.data) / "gen.json").is_file() else None,
                "training": summary}
        write_card(out, card)
        print(f"exported {out}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return _gen(args) if args.phase == "gen" else _train(args)


if __name__ == "__main__":
    raise SystemExit(main())
