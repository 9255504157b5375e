"""What the runtime's speed options cost in NLL: teacher-forced NLL from the session's own
cache, paired over the same held-out windows (SPEC §2.7).

Each window is `history` tokens of one held-out document followed by `rounds` blocks of K
tokens. Every variant (a set of `Session` settings: `kv_reuse`, `decode_focus`,
`collapse_headroom`; same networks, same focus policy) is fed the history; then, per round,
`Session.cache_logprobs` scores the block's tokens 1..K-1 from the cache and the block
enters the history — as input (`teacher="feed"`: a refocus with the input rules, settle
rounds included) or as decoded tokens (`teacher="decode"`, `Session.force`: the pending
slots and the refocus after K of them, as during generation). Teacher forcing keeps every
variant on the same text, so the paired NLL difference is the cost of the option alone:
approximate reuse changes only the cache (variants that differ only in `kv_reuse` take
identical focus actions — checked), `decode_focus` and the headroom change what the WC
holds while generating.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from mcjax.statistics import mean_stderr
from mcjax.runtime import Session

TEACHERS = ("feed", "decode")
VARIANT_SETTINGS = ("kv_reuse", "decode_focus", "collapse_headroom")


def paired_difference(a, b) -> dict[str, Any]:
    """mean(a − b) over paired samples, its standard error and a 95 % normal interval."""
    d = mean_stderr(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if d["stderr"] is not None:
        d["ci95"] = [d["mean"] - 1.96 * d["stderr"], d["mean"] + 1.96 * d["stderr"]]
    return d


def _run(make_session, windows: np.ndarray, history: int, rounds: int, K: int,
         batch_size: int, teacher: str, progress) -> dict[str, Any]:
    n = len(windows)
    nll = np.zeros((n, rounds), np.float64)
    actions, slots, round_s = [], [], []
    for lo in range(0, n, batch_size):
        rows = windows[lo:lo + batch_size]
        if len(rows) < batch_size:  # pad the last batch with copies (not scored)
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), 0)])
        session = make_session()
        session.feed(list(rows[:, :history]))
        session.sync()
        n_initial = len(session.events)
        for r in range(rounds):
            block = rows[:, history + r * K: history + (r + 1) * K]
            lp = session.cache_logprobs(block)
            m = min(batch_size, n - lo)
            nll[lo:lo + m, r] = -lp.mean(1)[:m]
            t0 = time.perf_counter()
            if teacher == "feed":
                session.feed(list(block))
                session.sync()
            else:
                session.force(block)
            round_s.append(time.perf_counter() - t0)
        provenance = session.provenance
        events = list(session.events)
        actions.append([e.actions for e in events])
        # per stream and refocus of the rounds (the initial prefill excluded)
        slots += [s for e in events[n_initial:] for s in e.reprefill_slots]
        if progress is not None:
            progress.update(min(batch_size, n - lo))
    slots = np.asarray(slots, np.float64)
    return dict(nll=nll, actions=actions, reprefill_slots=float(slots.mean()),
                reprefilling_share=float(np.mean(slots > 0)), provenance=provenance,
                round_s=float(np.median(round_s)))


def session_variants_nll(base_model, gist_params, lens_params, cfg, windows: np.ndarray, *,
                         history: int, rounds: int, variants: dict[str, dict],
                         teacher: str = "decode", batch_size: int = 8,
                         focus_policy: str = "lens", max_tokens: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Per-window NLL (mean over the scored tokens of `rounds` blocks) under each variant
    ({name: Session settings among VARIANT_SETTINGS}), and each variant's paired difference
    to the first (the reference) with its standard error and 95 % interval, overall and per
    round; re-prefilled slots per refocus, the share of refocuses that re-prefill, and the
    median time per round (enter the block + its refocus). windows: [N, ≥ history +
    rounds·K] token ids (e.g. `pipeline.held_out_windows`)."""
    K = cfg.mc.block_size
    windows = np.asarray(windows)
    need = history + rounds * K
    if windows.ndim != 2 or windows.shape[1] < need:
        raise ValueError(f"windows must be [N, >= history + rounds*K = {need}], got "
                         f"{windows.shape}")
    if rounds < 1 or history < 1:
        raise ValueError(f"need history >= 1 and rounds >= 1, got {history}, {rounds}")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    if not variants:
        raise ValueError("no variants to compare")
    for name, settings in variants.items():
        unknown = set(settings) - set(VARIANT_SETTINGS)
        if unknown:
            raise ValueError(f"variant {name!r}: unknown settings {sorted(unknown)} (allowed: "
                             f"{VARIANT_SETTINGS})")
    max_tokens = max_tokens or max(cfg.mc.w_max, -(-need // 1024) * 1024)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows) * len(variants), desc="variants", unit="window")
    out: dict[str, Any] = {"windows": len(windows), "history": history, "rounds": rounds,
                           "scored_tokens_per_window": rounds * (K - 1), "teacher": teacher,
                           "focus_policy": focus_policy, "w_max": cfg.mc.w_max,
                           "block_size": K, "variants": {}}
    runs = {}
    for name, settings in variants.items():
        def make(settings=settings):
            return Session(base_model, gist_params, lens_params, cfg, batch_size=batch_size,
                           max_tokens=max_tokens, focus_policy=focus_policy, **settings)

        runs[name] = r = _run(make, windows, history, rounds, K, batch_size, teacher, bar)
        out["variants"][name] = {
            "settings": dict(settings),
            "nll_mean": float(r["nll"].mean()),
            "reprefill_slots_per_refocus": r["reprefill_slots"],
            "reprefilling_refocus_share": r["reprefilling_share"],
            "round_s_median": r["round_s"],
            "per_window_nll": r["nll"].mean(1).round(6).tolist(),
        }
        out["provenance"] = r["provenance"]
    if bar is not None:
        bar.close()
    names = list(variants)
    for a in names:  # only the cache differs between these: the pairing must be exact
        for b in names[names.index(a) + 1:]:
            other = {k: v for k, v in variants[a].items() if k != "kv_reuse"}
            if other == {k: v for k, v in variants[b].items() if k != "kv_reuse"} \
                    and runs[a]["actions"] != runs[b]["actions"]:
                raise RuntimeError(f"variants {a!r} and {b!r} differ only in kv_reuse but took "
                                   f"different focus actions: the comparison is not paired")
    ref = names[0]
    out["reference"] = ref
    out["paired_vs_reference"] = {
        name: dict(paired_difference(runs[name]["nll"].mean(1), runs[ref]["nll"].mean(1)),
                   per_round=[paired_difference(runs[name]["nll"][:, r],
                                                runs[ref]["nll"][:, r])
                              for r in range(rounds)])
        for name in names[1:]}
    return out


def kv_reuse_cost(base_model, gist_params, lens_params, cfg, windows: np.ndarray, *,
                  history: int, rounds: int, batch_size: int = 8,
                  focus_policy: str = "lens", max_tokens: int | None = None,
                  progress: bool = True, modes: Sequence[str] = ("exact", "approx"),
                  teacher: str = "feed") -> dict[str, Any]:
    """`session_variants_nll` over `kv_reuse` modes alone, in the layout of the recorded
    `results/kv_reuse/`: "modes" per mode, "approx_minus_exact" (overall and per round)."""
    res = session_variants_nll(base_model, gist_params, lens_params, cfg, windows,
                               history=history, rounds=rounds,
                               variants={m: {"kv_reuse": m} for m in modes}, teacher=teacher,
                               batch_size=batch_size, focus_policy=focus_policy,
                               max_tokens=max_tokens, progress=progress)
    out = {k: v for k, v in res.items() if k not in ("variants", "paired_vs_reference",
                                                        "reference")}
    out["modes"] = {m: {k: v for k, v in r.items() if k != "settings"}
                    for m, r in res["variants"].items()}
    if "exact" in modes and "approx" in modes:
        if res["reference"] == "exact":
            diff = res["paired_vs_reference"]["approx"]
        else:
            raise ValueError("list 'exact' first among the modes")
        out["approx_minus_exact"] = {k: v for k, v in diff.items() if k != "per_round"}
        out["per_round_approx_minus_exact"] = diff["per_round"]
    return out
