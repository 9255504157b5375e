"""What approximate KV reuse costs: teacher-forced NLL from the session's own cache, exact
vs approximate re-prefill, paired over the same held-out windows (SPEC §2.7).

Each window is `history` tokens of one held-out document followed by `rounds` blocks of K
tokens. Two sessions (`kv_reuse="exact"` and `"approx"`, same networks, same focus policy)
are fed the history; then, per round, `Session.cache_logprobs` scores the block's tokens
1..K-1 from the cache and the block is fed (a refocus follows: appends, budget collapses,
focus edits). Feeding is teacher-forced, so both sessions hold the same working context at
every step (checked: their focus actions are identical) and differ only in their caches;
the paired NLL difference is the cost of the approximation alone.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from mcjax.eval.metrics import mean_stderr
from mcjax.runtime import Session


def paired_difference(a, b) -> dict[str, Any]:
    """mean(a − b) over paired samples, its standard error and a 95 % normal interval."""
    d = mean_stderr(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if d["stderr"] is not None:
        d["ci95"] = [d["mean"] - 1.96 * d["stderr"], d["mean"] + 1.96 * d["stderr"]]
    return d


def _run(make_session, windows: np.ndarray, history: int, rounds: int, K: int,
         batch_size: int, progress) -> dict[str, Any]:
    n = len(windows)
    nll = np.zeros((n, rounds), np.float64)
    actions, slots, refocus_s = [], [], []
    for lo in range(0, n, batch_size):
        rows = windows[lo:lo + batch_size]
        if len(rows) < batch_size:  # pad the last batch with copies (not scored)
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), 0)])
        session = make_session()
        session.feed(list(rows[:, :history]))
        session.sync()
        for r in range(rounds):
            block = rows[:, history + r * K: history + (r + 1) * K]
            lp = session.cache_logprobs(block)
            m = min(batch_size, n - lo)
            nll[lo:lo + m, r] = -lp.mean(1)[:m]
            t0 = time.perf_counter()
            session.feed(list(block))
            session.sync()
            refocus_s.append(time.perf_counter() - t0)
        provenance = session.provenance
        events = list(session.events)
        actions.append([e.actions for e in events])
        # per stream and refocus, after the initial prefill
        slots += [n for e in events[1:] for n in e.reprefill_slots]
        if progress is not None:
            progress.update(min(batch_size, n - lo))
    return dict(nll=nll, actions=actions, reprefill_slots=float(np.mean(slots)),
                provenance=provenance,
                refocus_s=float(np.median(refocus_s)))


def kv_reuse_cost(base_model, gist_params, lens_params, cfg, windows: np.ndarray, *,
                  history: int, rounds: int, batch_size: int = 8,
                  focus_policy: str = "lens", max_tokens: int | None = None,
                  progress: bool = True, modes: Sequence[str] = ("exact", "approx")
                  ) -> dict[str, Any]:
    """Per-window NLL (mean over the scored tokens of `rounds` blocks) under each of
    `modes`, the paired difference approx − exact with its standard error, re-prefilled
    slots per refocus and the median feed+refocus time per round. windows: [N, ≥ history +
    rounds·K] token ids (e.g. `pipeline.held_out_windows`)."""
    K = cfg.mc.block_size
    windows = np.asarray(windows)
    need = history + rounds * K
    if windows.ndim != 2 or windows.shape[1] < need:
        raise ValueError(f"windows must be [N, >= history + rounds*K = {need}], got "
                         f"{windows.shape}")
    if rounds < 1 or history < 1:
        raise ValueError(f"need history >= 1 and rounds >= 1, got {history}, {rounds}")
    max_tokens = max_tokens or max(cfg.mc.w_max, -(-need // 1024) * 1024)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows) * len(modes), desc="kv_reuse", unit="window")
    out: dict[str, Any] = {"windows": len(windows), "history": history, "rounds": rounds,
                           "scored_tokens_per_window": rounds * (K - 1),
                           "focus_policy": focus_policy, "w_max": cfg.mc.w_max,
                           "block_size": K, "modes": {}}
    runs = {}
    for mode in modes:
        def make(mode=mode):
            return Session(base_model, gist_params, lens_params, cfg, batch_size=batch_size,
                           max_tokens=max_tokens, focus_policy=focus_policy, kv_reuse=mode)

        runs[mode] = _run(make, windows, history, rounds, K, batch_size, bar)
        r = runs[mode]
        out["modes"][mode] = {
            "nll_mean": float(r["nll"].mean()),
            "reprefill_slots_per_refocus": r["reprefill_slots"],
            "round_s_median": r["refocus_s"],
            "per_window_nll": r["nll"].mean(1).round(6).tolist(),
        }
        out["provenance"] = r["provenance"]
    if bar is not None:
        bar.close()
    if "exact" in runs and "approx" in runs:
        if runs["exact"]["actions"] != runs["approx"]["actions"]:
            raise RuntimeError("exact and approx sessions took different focus actions: the "
                               "comparison would not be paired")
        diff = paired_difference(runs["approx"]["nll"].mean(1), runs["exact"]["nll"].mean(1))
        out["approx_minus_exact"] = diff
        out["per_round_approx_minus_exact"] = [
            paired_difference(runs["approx"]["nll"][:, r], runs["exact"]["nll"][:, r])
            for r in range(rounds)]
    return out
