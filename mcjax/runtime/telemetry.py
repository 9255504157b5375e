"""What a refocus did (`RefocusEvent`, from the refocus program's telemetry) and a counter of
XLA compilations (`CompileCounter`, the proof that nothing recompiles as history grows)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mcjax import focus

__all__ = ["RefocusEvent", "event_from", "CompileCounter"]


@dataclasses.dataclass(frozen=True)
class RefocusEvent:
    """What one refocus did, per stream (lists have one entry per stream).

    swap_rate: share of the WC's entries this refocus created by an edit (an expansion
    creates K, a collapse 1; budget and headroom collapses included). residency: share of
    the history's tokens resident at each LOD (index 0 = raw tokens). reprefill_slots:
    cache slots each stream recomputed (its own K-aligned range from its first change, or
    with `reprefill_approximate` its K-slot chunks); reprefill_start: the first of them (W
    when none, or approximate). timings (s):
    ingest_s (tree appends incl. GistNet), refocus_s (view upload + the jitted refocus,
    until its telemetry was read: at once, or for a "decode" refocus just after the next
    decode block was dispatched behind it), decode_s (the decode block before a "decode"
    refocus, from the end of the refocus before it).
    """

    index: int  # refocus number in this session
    trigger: str  # "input" (after feed) or "decode"
    num_tokens: list[int]
    num_new: list[int]
    # (expand|collapse, slot, level before), in order; after input, the settle rounds'
    # follow the first round's, each slot in the WC of its round
    actions: list[list[tuple[str, int, int]]]
    settle_rounds: list[int]  # allocator rounds after the first (input refocuses settle)
    num_expand: list[int]
    num_collapse: list[int]
    append_collapses: list[int]  # budget collapses while appending
    headroom_collapses: list[int]  # collapses ahead of need (see `_collapse_ahead`)
    swap_rate: list[float]
    lod_histogram: list[list[int]]
    budget_use: list[float]
    residency: list[list[float]]
    first_changed_slot: list[int]
    kv_reused: list[bool]  # only the pending tokens were appended: their KV was copied
    reprefill_start: list[int]
    reprefill_slots: list[int]
    reprefill_approximate: list[bool]  # kv_reuse="approx" kept moved entries instead
    nan_scores: list[bool]
    timings: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def event_from(index: int, trigger: str, num_new, t: dict, mc, timings: dict) -> RefocusEvent:
    K, W = mc.block_size, mc.w_max
    kinds = {focus.ACT_EXPAND: "expand", focus.ACT_COLLAPSE: "collapse"}
    num_valid = t["num_valid"].astype(np.int64)
    created = (K * t["num_expand"] + t["num_collapse"] + t["append_collapses"]
               + t["headroom_collapses"])
    slots = [int(x) for x in t["reprefill_slots"]]
    approximate = [bool(x) for x in t["approximate"]]
    start = [int(x) if n and not a else W
             for x, n, a in zip(t["reprefill_start"], slots, approximate)]
    tokens = np.maximum(t["num_tokens"], 1)
    return RefocusEvent(
        index=index, trigger=trigger,
        num_tokens=[int(x) for x in t["num_tokens"]], num_new=[int(x) for x in num_new],
        actions=[[(kinds[int(k)], int(s), int(l))
                  for k, s, l in zip(t["action_kind"][b], t["action_slot"][b],
                                     t["action_level"][b]) if int(k) in kinds]
                 for b in range(len(num_valid))],
        settle_rounds=[int(x) for x in t["settle_rounds"]],
        num_expand=[int(x) for x in t["num_expand"]],
        num_collapse=[int(x) for x in t["num_collapse"]],
        append_collapses=[int(x) for x in t["append_collapses"]],
        headroom_collapses=[int(x) for x in t["headroom_collapses"]],
        swap_rate=[float(c / max(n, 1)) for c, n in zip(created, num_valid)],
        lod_histogram=t["level_hist"].astype(int).tolist(),
        budget_use=[float(n / W) for n in num_valid],
        residency=(t["level_tokens"] / tokens[:, None]).round(6).tolist(),
        first_changed_slot=[int(x) for x in t["first_changed"]],
        kv_reused=[bool(x) for x in t["kv_reused"]],
        reprefill_start=start, reprefill_slots=slots,
        reprefill_approximate=approximate,
        nan_scores=[bool(x) for x in t["nan_scores"]], timings=timings)


class CompileCounter:
    """Counts XLA compilations in this process while active: `with CompileCounter() as c:`.

    Listens to JAX's backend-compile monitoring event, so it sees every compilation — of
    jitted functions and of eager ops alike. `c.names` lists what compiled.
    """

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.names: list[str] = []

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == self._EVENT:
            self.count += 1
            self.names.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
