"""Streaming MegaContext runtime (SPEC §2.7): a `Session` over a batch of streams, and the
pure programs it drives.

A session serves B independent streams with one frozen base model. Per stream it keeps a
MegaContext tree of the whole history (host side, `mcjax.tree`, gisting every completed
block once) and a fixed-shape working context (WC, `mcjax.working_context`); the WC
operations run vmapped over the leading stream axis. All streams share one KV cache of
`w_max + K` slots (K = block size = refocus cadence):

    slots [0, w_max)          the materialized WC (each stream's valid slots packed at the
                              front, its padding slots invalid)
    slots [w_max, w_max + K)  "pending": the tokens decoded since the last refocus

Every stream writes its decoded token at the same slot (the base model's cache write index
is one shared scalar, so a decode step is an in-place update); streams of different
lengths stay exact because attention ignores invalid slots, and positions (which only feed
RoPE) are per stream: a pending token sits at its absolute index (`absolute` scheme) or
right after the WC (`compact`).

Refocus — every K decoded tokens, and once after new input:
  1. host: append the new tokens to each stream's tree (GistNet gists the blocks they
     complete) and write the new rows into a batched device view of the trees with a fixed
     capacity (`max_tokens`), so no device shape ever depends on the history length;
  2. one jitted program: LensNet scores the WC → `append` adds the new tokens at LOD0,
     collapsing the lowest-scored sibling groups when the budget would overflow → LensNet
     scores the result → if the next block would not fit, collapse ahead until
     `collapse_headroom` slots are free (so most refocuses only append) → the focus
     allocator applies ≤ n_diff expand/collapse edits →
     materialize → re-prefill the cache from the first slot that changed in any stream
     (rounded down to a multiple of K) through the last valid slot, in fixed-shape chunks
     inside `while_loop`s (K-slot chunks up to a multiple of C = `prefill_chunk`, C-slot
     chunks, a K-slot tail: big matmuls for bulk, < K wasted slots at either end) → the
     next token of each stream whose newest slot was recomputed. A stream whose only change
     is the append of its pending tokens re-prefills nothing: their KV entries are copied
     from the pending slots (same context, same positions).
With `kv_reuse="approx"` the cache is instead rebuilt from the entries it already holds —
each kept entry moved to its new slot, its key re-rotated to its new position — and only the
K-slot chunks holding new entries plus each changed stream's newest chunk are recomputed
(falling back to the exact range when that is not cheaper); see `Session`.
Unchanged slots before the first change keep their cache entries. Every stream has its own
range (and its own chunks under approximate reuse): one stream's early edit recomputes
nothing of its batch neighbours' (the per-stream loops run under `vmap`, as long as the
busiest stream needs).

Decoding (`generate` / `stream`): one jitted `lax.while_loop` runs up to K greedy steps over
a fixed-shape `StreamState`; the host reads the block's tokens, then refocuses when K are
pending. Generating n tokens in pieces equals generating them at once.

Input (`feed`) is ingested into the trees at once (gisting happens as text arrives) and the
WC is brought up to date lazily, by one refocus before the next generation (or `sync()`):
a fresh stream starts from `initial_layout` (recent tokens LOD0, older LOD1, oldest LOD2 —
any length, even ≫ w_max — and the sink, the history's first `sink_blocks` blocks, LOD0 in
slot 0 onward, never collapsed) followed by a refocus; a running stream appends.

GistNet's LOD1 children are the blocks' token embeddings or, with `GistConfig.input =
"hidden"`, the frozen base model's read-pass hidden states after `input_layer` layers
(chunks of `read_chunk` tokens aligned to each stream's history start; `BlockGister.
from_base` builds either, and the trees compute them as blocks complete). Feeding a text
in pieces therefore equals feeding it at once, bit for bit.

Programs are compiled once per plan (configs, batch size, capacity, headroom, chunk size,
mesh) and shared by every session with that plan; with a mesh the decode step and the
refocus are jitted with `NamedSharding`s over ("data", "model") — streams on `data`, base
weights split on `model` by `mcjax.sharding`'s rules. After warm-up nothing recompiles as
the history grows (`CompileCounter` counts XLA compilations to prove it).

Telemetry: one `RefocusEvent` per refocus (actions, swap rate, LOD histogram, budget use,
residency, re-prefilled slots, timings) in `session.events` and to an optional callback.
`debug_invariants=True` runs `check_invariants` (and a cache/WC consistency check) after
every refocus.

Layout of the package: `state` (the `StreamState` pytree, the static `Plan`, host builders
of initial states, views and layouts), `policies` (focus scores), `programs` (the pure
`refocus` / `decode_block` and their jitted, donated, sharded forms, with the tree's
`write_view` — callable from a user's own loop, see its docstring; new tree rows come from
`mcjax.tree.view_update`), `telemetry` (`RefocusEvent`, `CompileCounter`),
`persist` (the save format's pieces) and `session` (`Session`, the thin host wrapper).
"""

from mcjax.base.model import InputError
from mcjax.nets import default_params, load_trained_params, untrained_params
from mcjax.runtime.persist import (SAVE_VERSION, BaseModelMismatchError, SaveDamagedError,
                                   SaveLockedError)
from mcjax.runtime.policies import (focus_conditioning, lens_stream_scores, policy_scores,
                                    random_scores, recency_scores)
from mcjax.runtime.programs import Programs, collapse_ahead, decode_block, programs, refocus
from mcjax.runtime.session import Session
from mcjax.runtime.state import (DEFAULT_MAX_TOKENS, FOCUS_POLICIES, KV_REUSE, Plan,
                                 StreamState, empty_view, initial_layouts, initial_state,
                                 make_plan, pending_base_position)
from mcjax.runtime.telemetry import CompileCounter, RefocusEvent
from mcjax.tree import view_update, write_view

__all__ = [
    "Session", "StreamState", "Plan", "RefocusEvent", "CompileCounter", "InputError",
    "load_trained_params", "untrained_params", "default_params",
    "DEFAULT_MAX_TOKENS", "FOCUS_POLICIES", "KV_REUSE", "SAVE_VERSION",
    "SaveLockedError", "SaveDamagedError", "BaseModelMismatchError",
    "recency_scores", "random_scores", "policy_scores", "focus_conditioning",
    "lens_stream_scores", "decode_block", "refocus", "collapse_ahead", "write_view",
    "Programs", "programs", "make_plan", "initial_state", "empty_view", "initial_layouts", "view_update",
    "pending_base_position",
]
