"""Loop-aware bytes and FLOPs of a compiled XLA program, read from its optimized HLO text.

`compiled.cost_analysis()` (XLA's HloCostAnalysis) counts every `while` body **once**,
whatever its trip count: a 32-layer `scan` is counted as one layer, a K-step decode loop as
one step. And on the CPU backend, which has no bf16 dot, XLA upcasts bf16 weights and
caches to f32 (often hoisted out of loops as whole-tensor copies), so its byte counts
describe XLA:CPU's traffic, not an accelerator's. `program_cost` walks the same optimized
HLO and counts it the way a projection to an accelerator needs:

- a `while` with a known trip count (XLA's `known_trip_count`, e.g. every `scan`) counts
  its body that many times; one with a data-dependent trip count (a decode loop over
  `num_steps`, a re-prefill over the changed chunks) is reported separately, per
  iteration (`Loop`), so the caller says how many iterations a scenario runs;
- a `conditional` counts its most expensive branch (the branch that does the work);
- a pure widening convert (a fusion of only converts and data movement on its one float
  operand, bf16 -> f32, index arithmetic aside) is a CPU artifact: it costs nothing, and its
  consumers read the value at its source width (tracked through tuples, loop carries and
  slices); converts fused into other fusions change widths in registers, not what is read;
- bytes of an instruction are its operands read plus its output written, as
  HloCostAnalysis counts them, except: slices, dynamic slices and gathers read only what
  they take; a dynamic-update-slice (in place) reads and writes only its update; inside a
  fusion the same rules apply per parameter, so a fused layer-slice of stacked weights
  reads one layer;
- FLOPs: 2·M·N·K per dot, one per output element of elementwise arithmetic, one per input
  element of a reduce (XLA's conventions).

What this is not: a simulator. It assumes the accelerator's compiler makes the same
fusion decisions XLA:CPU made (a GPU fuses more, e.g. softmax chains and attention, so
the activation traffic here is an upper bound; weights and caches, which dominate a batch-1
decode step, are read once either way) and ignores caches (every read is from HBM).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping

__all__ = ["HloCost", "Loop", "ProgramCost", "program_cost", "parse_module", "stack_frames",
           "HloParseError"]


class HloParseError(ValueError):
    """The HLO text has a construct this reader does not understand."""


_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
    "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e5m2": 1, "f8e4m3fn": 1, "f8e4m3b11fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
    "f8e4m3": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5,
}
_FLOATS = {"f16", "bf16", "f32", "f64"} | {k for k in _DTYPE_BYTES if k.startswith(("f8", "f4"))}
# no bytes of their own: views, tuple plumbing, scalars the runtime keeps in registers
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}
# ops that move data without arithmetic (a widening-convert fusion may hold only these)
_MOVES = {"bitcast", "copy", "transpose", "reshape", "slice", "dynamic-slice", "parameter",
          "constant", "convert"}
_LOOK_THROUGH = {"bitcast", "convert"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "power",
                "remainder", "exponential", "exponential-minus-one", "log", "log-plus-one",
                "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "sine", "cosine", "tan", "atan2",
                "negate", "abs", "sign", "floor", "ceil", "round-nearest-even",
                "round-nearest-afz", "erf", "compare", "select", "clamp", "and", "or", "xor",
                "not", "is-finite", "shift-left", "shift-right-logical",
                "shift-right-arithmetic", "popcnt", "count-leading-zeros"}


# --------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def itemsize(self) -> float:
        if self.dtype not in _DTYPE_BYTES:
            raise HloParseError(f"unknown HLO element type {self.dtype!r}")
        return _DTYPE_BYTES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Tuple:
    items: tuple  # of Array | Tuple


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    shape: Array | Tuple
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    args: str = ""  # the raw text between the opcode's parentheses (a parameter's index)

    def attr_computation(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    def attr_dims(self, key: str) -> tuple[int, ...]:
        m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", self.attrs)
        return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()

    @property
    def stack_frame_id(self) -> int | None:
        m = re.search(r"\bstack_frame_id=(\d+)", self.attrs)
        return int(m.group(1)) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def known_trip_count(self) -> int | None:
        """XLA's proof of a `while`'s trip count (in its backend_config), if any."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.attrs)
        return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class Computation:
    name: str
    instrs: tuple[Instr, ...]
    root: str

    @functools.cached_property
    def by_name(self) -> dict[str, Instr]:
        return {i.name: i for i in self.instrs}

    @functools.cached_property
    def params(self) -> dict[int, Instr]:
        return {_param_index(i): i for i in self.instrs if i.opcode == "parameter"}

    @functools.cached_property
    def users(self) -> dict[str, list[Instr]]:
        out: dict[str, list[Instr]] = {i.name: [] for i in self.instrs}
        for i in self.instrs:
            for o in i.operands:
                out.setdefault(o, []).append(i)
        return out


def _param_index(instr: Instr) -> int:
    if not instr.args.strip().isdigit():
        raise HloParseError(f"parameter {instr.name} has no index: ({instr.args})")
    return int(instr.args)


def _balanced(s: str, start: int, open_: str = "(", close: str = ")") -> str:
    """s[start:end] where s[start] == open_ and end is just past its matching close."""
    if s[start] != open_:
        raise HloParseError(f"expected {open_!r} at {start} in {s[:80]!r}")
    depth, i = 0, start
    while i < len(s):
        c = s[i]
        if c == '"':  # skip strings (metadata may hold brackets)
            j = s.index('"', i + 1)
            while s[j - 1] == "\\":
                j = s.index('"', j + 1)
            i = j + 1
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return s[start:i + 1]
        i += 1
    raise HloParseError(f"unbalanced {open_}{close} in {s[:80]!r}")


def _parse_shape(text: str) -> Array | Tuple:
    text = re.sub(r"/\*.*?\*/", "", text).strip()
    if text.startswith("("):
        inner = text[1:-1]
        items, depth, cur = [], 0, ""
        for c in inner:
            if c in "({[":
                depth += 1
            elif c in ")}]":
                depth -= 1
            if c == "," and depth == 0:
                if cur.strip():
                    items.append(_parse_shape(cur))
                cur = ""
            else:
                cur += c
        if cur.strip():
            items.append(_parse_shape(cur))
        return Tuple(tuple(items))
    m = re.match(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", text)
    if not m:
        if text == "token[]" or text.startswith("token"):
            return Array("token", ())
        raise HloParseError(f"cannot parse HLO shape {text!r}")
    return Array(m.group(1), tuple(int(x) for x in m.group(2).split(",") if x))


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


def _parse_instr(line: str) -> tuple[Instr, bool]:
    m = _INSTR.match(line)
    if not m:
        raise HloParseError(f"cannot parse HLO instruction {line[:120]!r}")
    name, pos = m.group(1), m.end()
    if line[pos] == "(":
        shape_text = _balanced(line, pos)
        pos += len(shape_text)
    else:
        end = line.index(" ", pos)
        shape_text = line[pos:end]
        pos = end
    rest = line[pos:].lstrip()
    op_end = rest.index("(")
    opcode = rest[:op_end]
    operands_text = _balanced(rest, op_end)
    attrs = rest[op_end + len(operands_text):]
    inner = operands_text[1:-1]
    operands = tuple(re.findall(r"%([\w.\-]+)", inner))
    instr = Instr(name, _parse_shape(shape_text), opcode, operands, attrs, inner.strip())
    return instr, line.lstrip().startswith("ROOT ")


def _sections(text: str) -> dict[str, dict[int, str]]:
    """The numbered tables JAX writes before the computations (FileNames, FunctionNames,
    FileLocations, StackFrames): {table: {id: entry}}."""
    out: dict[str, dict[int, str]] = {}
    for m in re.finditer(r"^([A-Za-z]+)\n((?:\d+ .*\n)+)", text, re.M):
        out[m.group(1)] = {int(line.split(" ", 1)[0]): line.split(" ", 1)[1]
                           for line in m.group(2).splitlines()}
    return out


def stack_frames(text: str) -> dict[int, str]:
    """{stack_frame_id: "function:line"} of the innermost frame of every stack the HLO's
    metadata names (e.g. "refocus.exact.prefill_chunks:364"); {} when the text has none."""
    t = _sections(text)
    files, funcs, locs, frames = (t.get(k, {}) for k in ("FileNames", "FunctionNames",
                                                          "FileLocations", "StackFrames"))
    out = {}
    for fid, frame in frames.items():
        loc = re.search(r"file_location_id=(\d+)", frame)
        where = locs.get(int(loc.group(1)), "") if loc else ""
        fn = re.search(r"function_name_id=(\d+)", where)
        line = re.search(r"\bline=(\d+)", where)
        if fn and line:
            name = funcs.get(int(fn.group(1)), "?").strip('"').replace("<locals>.", "")
            out[fid] = f"{name}:{line.group(1)}"
    return out


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """(computations by name, the entry computation's name) of optimized HLO text."""
    comps: dict[str, Computation] = {}
    entry = None
    current, instrs, root = None, [], None
    for raw in text.splitlines():
        line = raw.rstrip()
        if current is None:
            m = _HEADER.match(line)
            if m:
                current, instrs, root = m.group(2), [], None
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            if root is None and instrs:
                root = instrs[-1].name
            comps[current] = Computation(current, tuple(instrs), root)
            current = None
            continue
        if not line.strip():
            continue
        instr, is_root = _parse_instr(line)
        instrs.append(instr)
        if is_root:
            root = instr.name
    if entry is None:
        raise HloParseError("no ENTRY computation in the HLO text")
    return comps, entry


# --------------------------------------------------------------------------- costs


@dataclasses.dataclass(frozen=True)
class HloCost:
    bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: "HloCost") -> "HloCost":
        return HloCost(self.bytes + other.bytes, self.flops + other.flops)

    def __mul__(self, k: float) -> "HloCost":
        return HloCost(self.bytes * k, self.flops * k)

    __rmul__ = __mul__


@dataclasses.dataclass(frozen=True)
class Loop:
    """A `while` whose trip count XLA cannot know (data-dependent). `body` is one
    iteration's cost outside the loops nested in it (`nested`, each again per iteration
    of theirs); `repeats` is how often the loop itself is entered per enclosing iteration
    (a known-trip-count loop around it)."""

    name: str
    op_name: str
    body: HloCost
    nested: tuple["Loop", ...] = ()
    repeats: int = 1
    items: tuple[tuple[str, HloCost], ...] = ()  # `body` by source label, largest first
    source: str = ""  # the Python function (and line) that made the loop, when known

    def cost(self, iterations: int | Mapping[str, int] = 1) -> HloCost:
        """Cost of this loop (entered `repeats` times) running `iterations` times each
        (an int for this loop and every nested one, or {loop name: iterations}, default 1)."""
        n = iterations.get(self.name, 1) if isinstance(iterations, Mapping) else iterations
        inner = self.body
        for loop in self.nested:
            inner = inner + loop.cost(iterations)
        return inner * (n * self.repeats)


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """`fixed`: the program with every data-dependent loop run zero times (known loops
    expanded); `loops`: those loops, outermost first."""

    fixed: HloCost
    loops: tuple[Loop, ...]
    items: tuple[tuple[str, HloCost], ...] = ()  # `fixed` by source label, largest first

    def total(self, iterations: int | Mapping[str, int] = 1) -> HloCost:
        out = self.fixed
        for loop in self.loops:
            out = out + loop.cost(iterations)
        return out

    def find(self, fragment: str) -> list[Loop]:
        """The loops (at any depth) whose source or op_name contains `fragment`."""
        found, stack = [], list(self.loops)
        while stack:
            loop = stack.pop(0)
            if fragment in loop.source or fragment in loop.op_name:
                found.append(loop)
            stack.extend(loop.nested)
        return found


def _label(i: Instr) -> str:
    """Where an instruction came from, short: its op_name without the `jit(f)/` prefix,
    loop nesting and call wrappers (e.g. "Llama/layers/k_proj/dot_general"); unnamed
    instructions by their kind (e.g. "(convert_bitcast_fusion)")."""
    name = i.op_name
    if not name:
        return "(" + re.sub(r"\.\d+$", "", i.name) + ")"
    name = re.sub(r"\bjit\(([^()]*)\)/", "", name)
    name = re.sub(r"\b(while/body|while/cond|closed_call|vmap\([^()]*\)|vmap)/", "", name)
    return name


def _sorted(items: Mapping[str, HloCost]) -> tuple[tuple[str, HloCost], ...]:
    return tuple(sorted(items.items(), key=lambda kv: -kv[1].bytes))


def _bytes(shape: Array | Tuple, eff) -> float:
    """Bytes of a value of `shape` whose elements are really `eff` bytes wide (a float
    for an array, a tuple of them for a tuple; None: the shape's own width)."""
    if isinstance(shape, Array):
        return shape.elements * (shape.itemsize if eff is None else eff)
    effs = eff if isinstance(eff, tuple) else (None,) * len(shape.items)
    return sum(_bytes(s, e) for s, e in zip(shape.items, effs))


def _item(eff, k: int):
    return eff[k] if isinstance(eff, tuple) and k < len(eff) else None


class _Walker:
    def __init__(self, comps: dict[str, Computation], expand_loops: bool = True,
                 frames: Mapping[int, str] | None = None):
        self.comps = comps
        self.frames = dict(frames or {})
        self.expand_loops = expand_loops  # False: every loop body once (XLA's convention)
        self._memo: dict = {}

    # ---- fusions -----------------------------------------------------------------

    def _trace_users(self, comp: Computation, name: str) -> list[tuple[Instr, str]]:
        """Terminal users of `name` inside a fused computation, looking through bitcasts
        and converts (a fused convert changes the width in registers, not what is read):
        (user, the operand name it reads it as)."""
        out, stack = [], [name]
        while stack:
            n = stack.pop()
            for u in comp.users.get(n, []):
                if u.opcode in _LOOK_THROUGH:
                    stack.append(u.name)
                else:
                    out.append((u, n))
        return out

    def _source_param(self, comp: Computation, name: str) -> Instr | None:
        i = comp.by_name[name]
        while i.opcode in _LOOK_THROUGH:
            i = comp.by_name[i.operands[0]]
        return i if i.opcode == "parameter" else None

    def _widening_view(self, comp: Computation, effs) -> float | None:
        """If fused computation `comp` only moves data and widens one float parameter
        (bf16 -> f32: XLA:CPU's upcast for its f32 dots), the source's element width;
        else None. Index arithmetic (integer or scalar values) may ride along."""
        def on_data_path(i: Instr) -> bool:
            return (isinstance(i.shape, Array) and i.shape.dtype in _FLOATS
                    and i.shape.elements > 1)

        data = [i for i in comp.instrs if on_data_path(i)]
        if not data or any(i.opcode not in _MOVES for i in data) or \
                not any(i.opcode == "convert" for i in data):
            return None
        root = comp.by_name[comp.root]
        if not on_data_path(root):
            return None
        big = [p for p in comp.params.values() if on_data_path(p)]
        if len(big) != 1:
            return None
        idx = _param_index(big[0])
        src = effs[idx] if idx < len(effs) and effs[idx] is not None else big[0].shape.itemsize
        if root.shape.elements > big[0].shape.elements or root.shape.itemsize <= src:
            return None
        return src

    def _fusion(self, comp: Computation, effs) -> tuple[HloCost, object]:
        """(cost, the output's width override) of a fusion calling `comp` with operands of
        widths `effs`."""
        view = self._widening_view(comp, effs)
        if view is not None:
            return HloCost(), view
        read = 0.0
        for idx, p in comp.params.items():
            eff = effs[idx] if idx < len(effs) else None
            width = p.shape.itemsize if (eff is None or not isinstance(p.shape, Array)) else eff
            if not isinstance(p.shape, Array):
                read += _bytes(p.shape, eff)
                continue
            partial, full = 0.0, False
            for user, as_name in self._trace_users(comp, p.name):
                if user.opcode in ("dynamic-slice", "slice", "gather") and \
                        user.operands[0] == as_name:
                    partial += user.shape.elements * width
                elif user.opcode == "dynamic-update-slice" and user.operands[0] == as_name:
                    pass  # the buffer updated in place: not read
                else:
                    full = True
            size = p.shape.elements * width
            read += size if full else min(partial, size)
        root = comp.by_name[comp.root]
        outs = [comp.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
        written = 0.0
        for out in outs:
            base = out
            while base.opcode in _LOOK_THROUGH:
                base = comp.by_name[base.operands[0]]
            if base.opcode == "dynamic-update-slice" and \
                    self._source_param(comp, base.operands[0]) is not None:
                upd = comp.by_name[base.operands[1]].shape
                # read-modify-write of the update, at the buffer's width (the fusion may
                # compute it wider)
                written += 2 * upd.elements * min(upd.itemsize, out.shape.itemsize)
            else:
                written += _bytes(out.shape, None)
        return HloCost(read + written, self._flops(comp)), None

    def _flops(self, comp: Computation) -> float:
        flops = 0.0
        for i in comp.instrs:
            flops += self._instr_flops(comp, i)
            if i.opcode in ("fusion", "call"):
                sub = i.attr_computation("calls") or i.attr_computation("to_apply")
                if sub in self.comps:
                    flops += self._flops(self.comps[sub])
        return flops

    def _instr_flops(self, comp: Computation, i: Instr) -> float:
        if i.opcode == "dot":
            lhs = comp.by_name[i.operands[0]].shape
            k = 1
            for d in i.attr_dims("lhs_contracting_dims"):
                k *= lhs.dims[d]
            return 2.0 * i.shape.elements * k
        if i.opcode in _ELEMENTWISE and isinstance(i.shape, Array):
            return float(i.shape.elements)
        if i.opcode in ("reduce", "reduce-window"):
            return float(sum(comp.by_name[o].shape.elements for o in i.operands[:1]
                             if isinstance(comp.by_name[o].shape, Array)))
        return 0.0

    # ---- computations ------------------------------------------------------------

    def computation(self, name: str, param_effs: tuple):
        """(cost outside data-dependent loops, those loops, the root's element width
        override, cost by label) of computation `name` whose parameters hold values of
        widths `param_effs` (None: their own)."""
        key = (name, param_effs)
        if key in self._memo:
            return self._memo[key]
        comp = self.comps[name]
        eff: dict[str, object] = {}
        total, loops, items = HloCost(), [], {}

        def add(i: Instr, cost: HloCost) -> None:
            nonlocal total
            total = total + cost
            label = _label(i)
            items[label] = items.get(label, HloCost()) + cost

        def merge(more: dict, k: float = 1) -> None:
            nonlocal total
            for label, cost in more.items():
                total = total + cost * k
                items[label] = items.get(label, HloCost()) + cost * k

        def e(n):
            return eff.get(n)

        def operand_bytes(i: Instr) -> float:
            return sum(_bytes(comp.by_name[o].shape, e(o)) for o in i.operands)

        for i in comp.instrs:
            op = i.opcode
            out_eff = None
            if op == "parameter":
                idx = _param_index(i)
                out_eff = param_effs[idx] if idx < len(param_effs) else None
            elif op == "get-tuple-element":
                m = re.search(r"\bindex=(\d+)", i.attrs)
                out_eff = _item(e(i.operands[0]), int(m.group(1))) if m else None
            elif op == "tuple":
                out_eff = tuple(e(o) for o in i.operands)
                if all(x is None for x in out_eff):
                    out_eff = None
            elif op in ("bitcast", "opt-barrier"):
                out_eff = e(i.operands[0])
            elif op in _FREE:
                pass
            elif op == "fusion":
                sub = self.comps[i.attr_computation("calls")]
                cost, out_eff = self._fusion(sub, tuple(e(o) for o in i.operands))
                add(i, cost)
            elif op == "convert":
                src = comp.by_name[i.operands[0]].shape
                width = e(i.operands[0]) or src.itemsize
                if (src.dtype in _FLOATS and i.shape.dtype in _FLOATS
                        and i.shape.itemsize > width):
                    out_eff = width  # a widening convert: XLA:CPU's upcast, free
                else:
                    add(i, HloCost(operand_bytes(i) + _bytes(i.shape, None),
                                   float(i.shape.elements)))
            elif op == "while":
                body, cond = i.attr_computation("body"), i.attr_computation("condition")
                carried = (e(i.operands[0]),)
                _, b_loops, _, b_items = self.computation(body, carried)
                _, c_loops, _, c_items = self.computation(cond, carried)
                n = i.known_trip_count if self.expand_loops else 1
                if n is not None:
                    merge(b_items, n)
                    merge(c_items, n + 1)
                    loops.extend(dataclasses.replace(l, repeats=l.repeats * n)
                                 for l in b_loops + c_loops)
                else:
                    merge(c_items)
                    per_iter = dict(b_items)
                    for label, cost in c_items.items():
                        per_iter[label] = per_iter.get(label, HloCost()) + cost
                    loops.append(Loop(i.name, i.op_name,
                                      sum(per_iter.values(), HloCost()),
                                      tuple(b_loops + c_loops), items=_sorted(per_iter),
                                      source=self.frames.get(i.stack_frame_id, "")))
                out_eff = e(i.operands[0])
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
                names = (re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else
                         [i.attr_computation("true_computation"),
                          i.attr_computation("false_computation")])
                best = None
                for k, b in enumerate(names):
                    arg = (e(i.operands[k + 1]),) if k + 1 < len(i.operands) else ()
                    got = self.computation(b, arg)
                    if best is None or (got[0].bytes + sum(l.cost().bytes for l in got[1])
                                        > best[0].bytes + sum(l.cost().bytes
                                                              for l in best[1])):
                        best = got
                merge(best[3])
                loops.extend(best[1])
                out_eff = best[2]
            elif op == "call":
                sub = i.attr_computation("to_apply") or i.attr_computation("calls")
                _, l, out_eff, sub_items = self.computation(sub, tuple(e(o) for o in i.operands))
                merge(sub_items)
                loops.extend(l)
            elif op in ("dynamic-slice", "slice"):
                width = e(i.operands[0])
                out_eff = width
                add(i, HloCost(2 * _bytes(i.shape, width), 0.0))
            elif op == "gather":
                width = e(i.operands[0])
                out_eff = width
                idx = comp.by_name[i.operands[1]].shape
                add(i, HloCost(2 * _bytes(i.shape, width) + _bytes(idx, None), 0.0))
            elif op == "dynamic-update-slice":
                out_eff = e(i.operands[0])
                upd = comp.by_name[i.operands[1]]
                add(i, HloCost(2 * _bytes(upd.shape, e(upd.name)), 0.0))
            elif op == "scatter":
                out_eff = e(i.operands[0])
                n_ops = (len(i.operands) - 1) // 2
                idx = comp.by_name[i.operands[n_ops]].shape
                upd = sum(_bytes(comp.by_name[o].shape, e(o)) for o in i.operands[n_ops + 1:])
                add(i, HloCost(_bytes(idx, None) + 2 * upd, 0.0))
            elif op in ("copy", "transpose", "reshape", "broadcast", "concatenate", "pad",
                        "reverse"):
                out_eff = e(i.operands[0]) if i.operands else None
                add(i, HloCost(operand_bytes(i) + _bytes(i.shape, out_eff), 0.0))
            else:  # dot, reduce, sort, custom-call, iota, rng, elementwise, ...
                add(i, HloCost(operand_bytes(i) + _bytes(i.shape, None),
                               self._instr_flops(comp, i)))
            if out_eff is not None:
                eff[i.name] = out_eff
        result = (total, tuple(loops), eff.get(comp.root), items)
        self._memo[key] = result
        return result


def program_cost(hlo_text: str, *, expand_loops: bool = True) -> ProgramCost:
    """The loop-aware cost of a compiled program (module docstring) from
    `compiled.as_text()`. `expand_loops=False` counts every loop body once, as XLA's
    HloCostAnalysis does (for comparing the two)."""
    comps, entry = parse_module(hlo_text)
    n_params = len(comps[entry].params)
    walker = _Walker(comps, expand_loops, stack_frames(hlo_text))
    fixed, loops, _, items = walker.computation(entry, (None,) * n_params)
    return ProgramCost(fixed, loops, _sorted(items))
