"""A roofline step-time estimate read from a compiled XLA program's HLO text.

`mmlm compile` uses it when the compiler gives no step-time estimate of its
own (`cost_analysis()["optimal_seconds"]` <= 0, e.g. for the scanned 7B train
step). The HLO is the compiled, per-chip program (after SPMD partitioning),
so every shape is what one chip holds.

Model, per chip:

* Every top-level instruction of the entry computation (and, recursively, of
  the bodies it runs) costs ``max(flops / peak FLOP/s, bytes / HBM bandwidth)``:
  FLOPs are those of the `dot` and `convolution` instructions it contains
  (2 x multiply-adds; inside a fusion, those of the fused computation);
  bytes are its operands read plus its results written, except that a
  dynamic slice reads only the slice and a dynamic update slice writes only
  the update (also when fused), so a scanned layer stack reads one layer's
  weights per iteration, not the whole stack. A static `slice` likewise
  moves only the slice; an asynchronous `slice-start` (the compiler streams
  chunks of a weight into on-chip memory with them, then joins the chunks in
  place with a `ConcatBitcast`, which costs nothing) reads its slice once.
* A `while` (a scan) costs its body times its trip count, read from the
  condition (``counter < constant``; the counter starts at 0, as in
  `lax.scan` / `fori_loop`); when the count cannot be read the body counts
  once and `unknown_trip_counts` says how often that happened. A
  `conditional` (`lax.switch`) costs its most expensive branch.
* A Pallas TPU kernel (`tpu_custom_call`) costs what its `pl.CostEstimate`
  says (FLOPs and bytes); one without an estimate counts its operand and
  result bytes only and is listed in `pallas_calls_without_estimate`.
* Collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute) move their bytes over the chip's ICI links: an
  all-gather its result, a reduce-scatter its operand, an all-reduce twice
  its operand (reduce-scatter + all-gather), each at the chip's ICI
  bandwidth. XLA runs them asynchronously, overlapped with compute, so the
  estimate is ``max(sum of compute/memory times, sum of collective times)``.

Elementwise work is assumed hidden under the memory time of its op (the VPU
is not modelled), and ops are assumed not to overlap each other. The estimate
is checked against the compiler's own `optimal_seconds` on programs where the
compiler gives one (tests/test_compile.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from mmlm.accelerators import Chip  # noqa: F401 - the chip figures the roofline reads (re-exported)
from mmlm.kernels.attention import FLOPS_TAG

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_SHAPE_RE = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8\w*?)\[([\d,]*)\]")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "copy-start", "copy-done", "opt-barrier", "add-dependency"}


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _shapes(type_text: str) -> list[tuple[str, list[int]]]:
    # Layouts like {1,0:T(8,128)(2,1)S(1)} follow the dims and never match the dtype[dims] pattern.
    return [(m.group(1), _dims(m.group(2))) for m in _SHAPE_RE.finditer(type_text)]


def _nbytes(shapes: list[tuple[str, list[int]]]) -> float:
    return float(sum(math.prod(d) * _DTYPE_BYTES.get(t, 1) for t, d in shapes))


@dataclasses.dataclass
class Instr:
    name: str
    op: str
    shapes: list[tuple[str, list[int]]]  # result (several for a tuple)
    operands: list[str]
    args: str  # the text inside the opcode's parentheses (a constant's value, a parameter's index)
    attrs: str
    root: bool

    @property
    def bytes(self) -> float:
        return _nbytes(self.shapes)


@dataclasses.dataclass
class Cost:
    """Per-chip totals of one computation (loops unrolled by trip count)."""

    flops: float = 0.0
    bytes: float = 0.0
    op_seconds: float = 0.0  # sum over ops of max(compute time, memory time)
    collective_seconds: float = 0.0
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=lambda: {c: 0.0 for c in COLLECTIVES})

    def add(self, other: "Cost", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.op_seconds += times * other.op_seconds
        self.collective_seconds += times * other.collective_seconds
        for k, v in other.collective_bytes.items():
            self.collective_bytes[k] += times * v


def _logical_lines(text: str) -> list[str]:
    """HLO lines with continuation lines joined: a custom call's backend_config can hold newlines (splash
    attention's does), and its continuation would otherwise read as the "}" that ends a computation."""
    out: list[str] = []
    for line in text.splitlines():
        starts_new = (not out or line.startswith("  %") or line.startswith("  ROOT") or line.strip() in ("}", "")
                      or _COMP_RE.match(line) is not None or line.startswith("HloModule"))
        if starts_new:
            out.append(line)
        else:
            out[-1] += " " + line.strip()
    return out


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations (name -> instructions) of an HLO module's text and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in _logical_lines(text):
        head = _COMP_RE.match(line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR_RE.match(line)
        if not m:
            continue
        root, name, type_text, op, rest = m.groups()
        depth, i = 1, 0
        while i < len(rest) and depth:  # the operand list ends at the matching parenthesis
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        operands = re.findall(r"%([\w.\-]+)", rest[: i - 1])
        comps[current].append(Instr(name, op, _shapes(type_text), operands, rest[: i - 1], rest[i:], bool(root)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _tagged_flops(ins: "Instr") -> float | None:
    m = re.search(FLOPS_TAG + r"((?:_[a-z]+_\d+)+)", ins.attrs)
    if not m:
        return None
    parts = m.group(1).strip("_").split("_")
    table = dict(zip(parts[::2], (float(x) for x in parts[1::2])))
    kernel = re.search(r'kernel_name\s*=\s*"?([\w.]+)|"name"\s*:\s*"([\w.]+)"', ins.attrs)
    name = ins.name + " " + " ".join(g for g in (kernel.groups() if kernel else ()) if g)
    for key, flops in sorted(table.items(), key=lambda kv: -len(kv[0])):  # "dkv" before "dq" before ...
        if re.search(rf"_{key}(_|\b|\.)", name):
            return flops
    return None


class Roofline:
    """Roofline cost of a parsed HLO module on one chip."""

    def __init__(self, hlo_text: str, chip: Chip):
        self.comps, self.entry = parse_hlo(hlo_text)
        self.chip = chip
        self.defs = {ins.name: ins for instrs in self.comps.values() for ins in instrs}
        self.unknown_trip_counts = 0
        self.pallas_without_estimate = 0
        self.pallas_calls = 0
        self._memo: dict[str, Cost] = {}
        self._flops_memo: dict[str, float] = {}
        self._users_memo: dict[str, dict[str, list[tuple[Instr, int]]]] = {}

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _called(ins: Instr, key: str) -> list[str]:
        m = re.search(r"\b" + key + r"=\{([^}]*)\}", ins.attrs)
        if m:
            return re.findall(r"%([\w.\-]+)", m.group(1))
        m = re.search(r"\b" + key + r"=%([\w.\-]+)", ins.attrs)
        return [m.group(1)] if m else []

    def _matmul_flops(self, ins: Instr) -> float:
        out = ins.shapes[0][1] if ins.shapes else []
        lhs = self.defs.get(ins.operands[0]) if ins.operands else None
        rhs = self.defs.get(ins.operands[1]) if len(ins.operands) > 1 else None
        if ins.op == "dot":
            c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            if not (c and lhs and lhs.shapes):
                return 0.0
            k = math.prod(lhs.shapes[0][1][i] for i in _dims(c.group(1)))
        else:
            k = self._conv_macs_per_output(ins, lhs, rhs)
        return 2.0 * math.prod(out) * k

    @staticmethod
    def _conv_macs_per_output(ins: Instr, lhs: Instr | None, rhs: Instr | None) -> float:
        """Multiply-adds per output element of a convolution: input features x the window taps that
        can meet real input. TPU HLO writes batched matmuls as convolutions whose batch dimensions are
        windows over a dilated input (`lhs_dilate`): such a window meets one real element per output."""
        labels = re.search(r"dim_labels=(\w+)_(\w+)->", ins.attrs)
        if not (labels and lhs and rhs and lhs.shapes and rhs.shapes):
            return 0.0
        lhs_labels, rhs_labels = labels.groups()
        kernel, image = rhs.shapes[0][1], lhs.shapes[0][1]
        k = float(kernel[rhs_labels.index("i")])
        window = re.search(r"window=\{([^}]*)\}", ins.attrs)
        fields = dict(re.findall(r"(\w+)=([\w.]+)", window.group(1))) if window else {}
        sizes = [int(x) for x in fields.get("size", "").split("x") if x]
        dilate = [int(x) for x in fields.get("lhs_dilate", "").split("x") if x] or [1] * len(sizes)
        spatial = [c for c in lhs_labels if c.isdigit()]
        for d, size in enumerate(sizes):
            real = image[lhs_labels.index(spatial[d])] if d < len(spatial) else size
            k *= min(-(-size // dilate[d]), real)
        return k

    def _comp_flops(self, comp: str) -> float:
        """Matmul FLOPs inside a fused (or otherwise called) computation, nested calls included."""
        if comp not in self._flops_memo:
            total = 0.0
            for ins in self.comps.get(comp, []):
                if ins.op in ("dot", "convolution"):
                    total += self._matmul_flops(ins)
                for sub in self._called(ins, "calls"):
                    total += self._comp_flops(sub)
            self._flops_memo[comp] = total
        return self._flops_memo[comp]

    def _users(self, comp: str) -> dict[str, list[tuple[Instr, int]]]:
        if comp not in self._users_memo:
            users: dict[str, list[tuple[Instr, int]]] = {}
            for b in self.comps.get(comp, []):
                for pos, o in enumerate(b.operands):
                    users.setdefault(o, []).append((b, pos))
            self._users_memo[comp] = users
        return self._users_memo[comp]

    def _param(self, comp: str, index: int) -> Instr | None:
        return next((b for b in self.comps.get(comp, [])
                     if b.op == "parameter" and b.args.strip() == str(index)), None)

    def _read_bytes(self, comp: str, value: str, full: float, depth: int = 0) -> float:
        """HBM bytes read of `value` (a fused parameter) in `comp`: slices at their size, in-place
        update targets at 0, through bitcasts and nested fusions; else the whole value."""
        uses = self._users(comp).get(value, [])
        if not uses or depth > 8:
            return full
        total = 0.0
        for user, pos in uses:
            if user.op == "dynamic-slice" and pos == 0:
                total += user.bytes
            elif user.op == "dynamic-update-slice" and pos == 0:
                continue
            elif user.op in ("bitcast", "reshape"):
                total += self._read_bytes(comp, user.name, full, depth + 1)
            elif user.op == "fusion":
                sub = self._called(user, "calls")
                param = self._param(sub[0], pos) if sub else None
                if param is None:
                    return full
                total += self._read_bytes(sub[0], param.name, full, depth + 1)
            else:
                return full
        return min(total, full)

    def _written_bytes(self, comp: str, out: Instr, depth: int = 0) -> float:
        """Bytes written for a fused result: an in-place dynamic update writes only its update."""
        if out.op == "dynamic-update-slice" and len(out.operands) > 1:
            upd = next((b for b in self.comps.get(comp, []) if b.name == out.operands[1]), None)
            return upd.bytes if upd is not None else out.bytes
        if out.op in ("bitcast", "reshape") and out.operands and depth < 8:
            src = next((b for b in self.comps.get(comp, []) if b.name == out.operands[0]), None)
            if src is not None:
                return min(self._written_bytes(comp, src, depth + 1), out.bytes)
        if out.op == "fusion" and depth < 8:
            sub = self._called(out, "calls")
            root = next((b for b in self.comps.get(sub[0], []) if b.root), None) if sub else None
            if root is not None and root.op != "tuple":
                return min(self._written_bytes(sub[0], root, depth + 1), out.bytes)
        return out.bytes

    def _fusion_bytes(self, ins: Instr, comp: str) -> float:
        """Operands read + results written by a fusion (see `_read_bytes`, `_written_bytes`)."""
        total = 0.0
        for i, operand in enumerate(ins.operands):
            outer = self.defs.get(operand)
            full = outer.bytes if outer else 0.0
            param = self._param(comp, i)
            total += self._read_bytes(comp, param.name, full) if param is not None else full
        body = self.comps.get(comp, [])
        root = next((b for b in body if b.root), None)
        if root is None:
            return total + ins.bytes
        if root.op != "tuple":
            return total + self._written_bytes(comp, root)
        by_name = {b.name: b for b in body}
        return total + sum(self._written_bytes(comp, by_name[o]) for o in root.operands if o in by_name)

    def _trip_count(self, ins: Instr) -> int:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
        if known:
            return int(known.group(1))
        for cond in self._called(ins, "condition"):
            for c in self.comps.get(cond, []):
                if c.op == "compare" and "direction=LT" in c.attrs and len(c.operands) == 2:
                    bound = self.defs.get(c.operands[1])
                    if bound is not None and bound.op == "constant" and re.fullmatch(r"-?\d+", bound.args.strip()):
                        return max(int(bound.args), 0)
        self.unknown_trip_counts += 1
        return 1

    def _op_cost(self, flops: float, nbytes: float) -> Cost:
        t = max(flops / self.chip.peak_flops, nbytes / self.chip.hbm_bytes_per_s)
        return Cost(flops=flops, bytes=nbytes, op_seconds=t)

    def _collective(self, ins: Instr, kind: str) -> Cost:
        if kind == "all-gather":
            moved = _nbytes(ins.shapes[-1:])  # -start ops return (operand, result)
        elif kind == "reduce-scatter":
            moved = sum(self.defs[o].bytes for o in ins.operands if o in self.defs)
        else:
            moved = sum(self.defs[o].bytes for o in ins.operands if o in self.defs) or ins.bytes
        factor = 2.0 if kind == "all-reduce" else 1.0
        cost = Cost(collective_seconds=factor * moved / self.chip.ici_bytes_per_s)
        cost.collective_bytes[kind] += moved
        return cost

    def _pallas(self, ins: Instr) -> Cost:
        self.pallas_calls += 1
        m = re.search(r'"cost_estimate"\s*:\s*(\{[^}]*\})', ins.attrs)
        if m:
            est = json.loads(m.group(1))
            return self._op_cost(float(est.get("flops", 0)), float(est.get("bytes_accessed", 0)))
        tagged = _tagged_flops(ins)
        if tagged is not None:  # a library kernel without an estimate, whose caller named its FLOPs
            return self._op_cost(tagged, ins.bytes + sum(self.defs[o].bytes for o in ins.operands if o in self.defs))
        self.pallas_without_estimate += 1
        return self._op_cost(0.0, ins.bytes + sum(self.defs[o].bytes for o in ins.operands if o in self.defs))

    # ------------------------------------------------------------------ walk
    def computation(self, comp: str) -> Cost:
        if comp in self._memo:
            return self._memo[comp]
        total = Cost()
        for ins in self.comps.get(comp, []):
            op = ins.op
            base = op[:-6] if op.endswith("-start") else op
            if op in _FREE or op.endswith("-done"):
                continue
            if base in COLLECTIVES:
                total.add(self._collective(ins, base))
            elif op == "while":
                trips = self._trip_count(ins)
                for body in self._called(ins, "body"):
                    total.add(self.computation(body), trips)
            elif op == "conditional":
                branches = self._called(ins, "branch_computations") or (
                    self._called(ins, "true_computation") + self._called(ins, "false_computation"))
                costs = [self.computation(b) for b in branches]
                if costs:
                    total.add(max(costs, key=lambda c: c.op_seconds + c.collective_seconds))
            elif op == "fusion":
                called = self._called(ins, "calls")
                inner = [i for c in called for i in self.comps.get(c, [])]
                kinds = [i.op[:-6] if i.op.endswith("-start") else i.op for i in inner]
                coll = next((k for k in kinds if k in COLLECTIVES), None)
                if coll is not None:  # a fused collective (e.g. an all-gather fused with its consumer)
                    total.add(self._collective(ins, coll))
                flops = sum(self._comp_flops(c) for c in called)
                total.add(self._op_cost(flops, sum(self._fusion_bytes(ins, c) for c in called)))
            elif op in ("call", "async-start", "async-update") or (op != "custom-call" and "calls=" in ins.attrs
                                                                     and op not in ("reduce", "map", "sort",
                                                                                    "scatter", "select-and-scatter",
                                                                                    "reduce-window")):
                for sub in self._called(ins, "calls") or self._called(ins, "to_apply"):
                    total.add(self.computation(sub))
            elif op == "custom-call":
                if "tpu_custom_call" in ins.attrs:
                    total.add(self._pallas(ins))
                elif "AllocateBuffer" in ins.attrs or "ConcatBitcast" in ins.attrs:
                    continue  # a buffer, or on-chip slices joined in place: no HBM traffic
                else:
                    total.add(self._op_cost(0.0, ins.bytes + sum(
                        self.defs[o].bytes for o in ins.operands if o in self.defs)))
            elif op in ("dot", "convolution"):
                total.add(self._op_cost(self._matmul_flops(ins), ins.bytes + sum(
                    self.defs[o].bytes for o in ins.operands if o in self.defs)))
            elif op in ("dynamic-slice", "slice"):
                total.add(self._op_cost(0.0, 2 * ins.bytes))
            elif op == "slice-start":  # streams a static slice (a weight chunk) into on-chip memory: one read
                total.add(self._op_cost(0.0, _nbytes(ins.shapes[-2:-1])))
            elif op == "dynamic-update-slice":
                upd = self.defs.get(ins.operands[1]) if len(ins.operands) > 1 else None
                total.add(self._op_cost(0.0, 2 * (upd.bytes if upd else ins.bytes)))
            else:
                total.add(self._op_cost(0.0, ins.bytes + sum(
                    self.defs[o].bytes for o in ins.operands if o in self.defs)))
        self._memo[comp] = total
        return total

    def estimate(self) -> dict[str, Any]:
        c = self.computation(self.entry)
        return {
            "seconds": max(c.op_seconds, c.collective_seconds),
            "compute_memory_seconds": c.op_seconds,
            "collective_seconds": c.collective_seconds,
            "flops": c.flops,
            "bytes": c.bytes,
            "collective_bytes": dict(c.collective_bytes),
            "unknown_trip_counts": self.unknown_trip_counts,
            "pallas_calls": self.pallas_calls,
            "pallas_calls_without_estimate": self.pallas_without_estimate,
        }


def roofline(hlo_text: str, chip: Chip) -> dict[str, Any]:
    """The roofline estimate of a compiled program (see the module docstring)."""
    return Roofline(hlo_text, chip).estimate()
