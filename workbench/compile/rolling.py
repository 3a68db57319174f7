"""A long step's repeated blocks compiled once each and called in turn: a loop the trace
unrolled (an ODE solved step by step, a recursion over time) rolled back up.

Tracing unrolls a Python loop into thousands of operations, and inductor compiles a graph in
time and memory that grow with its length: minutes and GBs for an ODE solved by RK4. Here the
traced graph is scanned for a block of operations repeated back to back: the same operations
on the same constants and shapes, wired the same way inside the block, taking the rest from
outside it (the previous repeat's state, the parameters). Each distinct block is compiled
once, for the layouts its inputs come in, and the graph calls it at each repeat; what lies
outside every block runs as traced. The arithmetic is the traced graph's, operation for
operation. A block that draws random numbers or writes a tensor in place is left as traced.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import torch
import torch.fx as fx

MIN_REPEATS = 3  # a block repeated fewer times is left as traced
MAX_PERIOD = 3000  # the most operations in one block
MIN_PERIOD = 4  # the fewest
# repeats of a shorter block are called in groups of this many operations or more: a call
# costs about as much as tens of small operations
GROUP_OPS = 100


@dataclass
class Rolled:
    """The graph with its repeated blocks as calls, and what was rolled."""

    graph: fx.GraphModule
    calls: int  # blocks the graph now calls
    bodies: int  # distinct blocks compiled
    left: int  # operations outside every block, run as traced

    def describe(self, ops: int) -> str:
        return (f"a loop of {ops} operations rolled into {self.calls} calls of {self.bodies} "
                f"compiled blocks, {self.left} operations left as traced")


@dataclass
class _Region:
    start: int  # index of the first block's first operation
    period: int  # operations in a block
    repeats: int
    outputs: list[int]  # positions in the block whose values are used outside it
    inputs: list[list[fx.Node]]  # each repeat's inputs from outside it, in slot order
    shape: tuple  # the block's operations and wiring: equal shapes are one compiled block


def roll(graph: fx.GraphModule, inputs: list[torch.Tensor],
         compile_body: Callable[[fx.GraphModule, list[torch.Tensor]], Callable]
         ) -> Rolled | None:
    """``graph`` (run on ``inputs``) with each run of a block repeated ``MIN_REPEATS`` times or
    more replaced by calls of ``compile_body(block, example inputs)``; None where it has
    none. ``graph`` itself is changed."""
    nodes = [node for node in graph.graph.nodes if node.op == "call_function"]
    where = {node: i for i, node in enumerate(nodes)}
    regions = [region for found in _repeats(nodes) for region in _grouped(nodes, where, *found)]
    if not regions:
        return None
    examples = _values(graph, inputs, {node for region in regions
                                       for ins in region.inputs for node in ins})
    regions = [region for region in regions  # a tuple or a number from outside: left as is
               if all(isinstance(examples[node], torch.Tensor)
                      for ins in region.inputs for node in ins)]
    if not regions:
        return None
    bodies: dict[tuple, tuple[Callable, list]] = {}
    replaced: dict[fx.Node, fx.Node] = {}
    calls = 0
    for region in regions:
        block = _block(nodes, region.start + region.period, region.period, region.outputs)
        for repeat in range(region.repeats):
            ins = [examples[node] for node in region.inputs[repeat]]
            kind = (region.shape, tuple(_kind(value) for value in ins))
            if kind not in bodies:  # compiled for the first repeat's strides
                bodies[kind] = compile_body(block, ins), [value.stride() for value in ins]
            body, strides = bodies[kind]
            first = region.start + repeat * region.period
            _replace(graph.graph, nodes[first:first + region.period], region.outputs,
                     _called(body, strides, ins),
                     [replaced.get(node, node) for node in region.inputs[repeat]], replaced)
            calls += 1
    graph.graph.lint()
    graph.recompile()
    left = sum(1 for node in graph.graph.nodes if node.op == "call_function"
               and node.target is not operator.getitem
               and getattr(node.target, "__name__", "") != "rolled_block")
    return Rolled(graph, calls, len(bodies), left)


def _token(node: fx.Node) -> tuple:
    """What makes two operations the same apart from where their tensor arguments come from:
    the operation, its other arguments, and its output's shape and dtype."""
    value = node.meta.get("val")
    shape = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None
    return (node.target, repr(fx.node.map_arg(node.args, lambda _: None)),
            repr(sorted(fx.node.map_arg(node.kwargs, lambda _: None).items())), repr(shape))


def _rollable(node: fx.Node) -> bool:
    """Whether an operation may go into a compiled block: no random draw, no write in place."""
    target = node.target
    if target is operator.getitem:  # one output of an operation that gives several
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return torch.Tag.nondeterministic_seeded not in target.tags and \
        not target._schema.is_mutable


def _repeats(nodes: list[fx.Node]) -> list[tuple[int, int, int]]:
    """Runs of a block repeated back to back, as (start, period, repeats), the largest saving
    first, none overlapping; by the operations' tokens alone (``_checked`` checks wiring)."""
    codes: dict[tuple, int] = {}
    tokens = numpy.array([codes.setdefault(_token(node), len(codes)) if _rollable(node)
                          else -1 - i for i, node in enumerate(nodes)], dtype=numpy.int64)
    taken = numpy.zeros(len(nodes), dtype=bool)
    found = []
    while True:
        best = None
        for period in range(MIN_PERIOD, min(MAX_PERIOD, len(nodes) // MIN_REPEATS) + 1):
            same = (tokens[:-period] == tokens[period:]) & ~taken[:-period] & ~taken[period:]
            if same.sum() < period * (MIN_REPEATS - 1):
                continue
            edges = numpy.diff(numpy.concatenate([[0], same.astype(numpy.int8), [0]]))
            starts, ends = numpy.flatnonzero(edges == 1), numpy.flatnonzero(edges == -1)
            longest = int((ends - starts).argmax())
            repeats = int(ends[longest] - starts[longest]) // period + 1
            saving = (repeats - 1) * period
            if repeats >= MIN_REPEATS and (best is None or saving > best[0]):
                best = (saving, int(starts[longest]), period, repeats)
        if best is None:
            return sorted(found)
        _, start, period, repeats = best
        found.append((start, period, repeats))
        taken[start:start + period * repeats] = True


def _grouped(nodes: list[fx.Node], where: dict[fx.Node, int], start: int, period: int,
             repeats: int) -> list[_Region]:
    """The run of repeats checked (``_checked``), its repeats called in groups where a block
    is shorter than GROUP_OPS, so long as MIN_REPEATS groups remain; the repeats left over
    after the last group as a region of their own, where MIN_REPEATS."""
    region = _checked(nodes, where, start, period, repeats)
    if region is None or period >= GROUP_OPS:
        return [region] if region else []
    group = min(-(-GROUP_OPS // period), region.repeats // MIN_REPEATS)
    whole = _checked(nodes, where, region.start, period * group, region.repeats // group) \
        if group > 1 else None
    if whole is None:
        return [region]
    tail = region.repeats - whole.repeats * group
    rest = _checked(nodes, where, whole.start + whole.repeats * whole.period, period, tail) \
        if whole.start == region.start and tail >= MIN_REPEATS else None
    return [whole, rest] if rest else [whole]


def _checked(nodes: list[fx.Node], where: dict[fx.Node, int], start: int, period: int,
             repeats: int) -> _Region | None:
    """The longest run of the repeats wired alike inside (each argument from the same
    position of the block, or from outside it), as a region; None where under MIN_REPEATS."""
    wiring, outside = [], []
    for repeat in range(repeats):
        first = start + repeat * period
        inside, ins = [], []
        for node in nodes[first:first + period]:
            refs = []
            for arg in node.all_input_nodes:
                j = where.get(arg)
                if j is not None and first <= j < first + period:
                    refs.append(j - first)
                else:
                    refs.append(None)
                    ins.append(arg)
            inside.append(tuple(refs))
        wiring.append(tuple(inside))
        outside.append(ins)
    usual = collections.Counter(wiring).most_common(1)[0][0]
    best, run_start = (0, 0), None
    for repeat, alike in enumerate([w == usual for w in wiring] + [False]):
        if alike and run_start is None:
            run_start = repeat
        elif not alike and run_start is not None:
            if repeat - run_start > best[1] - best[0]:
                best = (run_start, repeat)
            run_start = None
    if best[1] - best[0] < MIN_REPEATS:
        return None
    start, repeats = start + best[0] * period, best[1] - best[0]
    outputs = set()
    for repeat in range(repeats):
        first = start + repeat * period
        for q, node in enumerate(nodes[first:first + period]):
            if any(not first <= where.get(user, -1) < first + period for user in node.users):
                outputs.add(q)
    shape = (tuple(_token(node) for node in nodes[start:start + period]), usual,
             tuple(sorted(outputs)))
    return _Region(start, period, repeats, sorted(outputs), outside[best[0]:best[1]], shape)


def _values(graph: fx.GraphModule, inputs: list[torch.Tensor],
            wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values of the ``wanted`` nodes on ``inputs``: the blocks' example inputs, in the
    layouts the step gives them."""
    seen: dict[fx.Node, torch.Tensor] = {}

    class Recording(fx.Interpreter):
        def run_node(self, node: fx.Node):
            out = super().run_node(node)
            if node in wanted:
                seen[node] = out
            return out

    with torch.no_grad():
        Recording(graph).run(*inputs)
    return seen


def _kind(value: torch.Tensor) -> tuple:
    """What a compiled block is specific to, but its inputs' strides."""
    return tuple(value.shape), value.dtype, value.device


def _block(nodes: list[fx.Node], first: int, period: int, outputs: list[int]
           ) -> fx.GraphModule:
    """One repeat as a graph of its own: an input for each argument from outside it (in the
    order ``_checked`` lists them), the values used outside it as outputs."""
    block, env = fx.Graph(), {}
    members = nodes[first:first + period]
    inside = set(members)
    slots = 0

    def argument(arg: fx.Node) -> fx.Node:
        nonlocal slots
        if arg in inside:
            return env[arg]
        slots += 1
        return block.placeholder(f"in{slots}")

    for node in members:
        # all_input_nodes order, as _checked lists the inputs: map them in that order first
        for arg in node.all_input_nodes:
            if arg not in inside:
                env.setdefault(("slot", node, arg), argument(arg))
        env[node] = block.node_copy(
            node, lambda arg, node=node: env[arg] if arg in inside else env[("slot", node, arg)])
    block.output(tuple(env[members[q]] for q in outputs))
    return fx.GraphModule(torch.nn.Module(), block)


def _called(body: Callable, strides: list, inputs: list[torch.Tensor]) -> Callable:
    """``body`` as a repeat with ``inputs`` calls it: an input laid out otherwise than the
    block was compiled for (``strides``) is copied into that layout first (a few numbers,
    against a compile of seconds)."""
    moved = [i for i, value in enumerate(inputs) if value.stride() != strides[i]]

    def rolled_block(*args: torch.Tensor):
        if moved:
            args = list(args)
            for i in moved:
                args[i] = torch.empty_strided(args[i].shape, strides[i], dtype=args[i].dtype,
                                              device=args[i].device).copy_(args[i])
        return body(*args)

    return rolled_block


def _replace(graph: fx.Graph, members: list[fx.Node], outputs: list[int], call: Callable,
             args: list[fx.Node], replaced: dict[fx.Node, fx.Node]) -> None:
    """Put one call of ``call`` in place of the repeat ``members``."""
    inside = set(members)
    with graph.inserting_after(members[-1]):
        node = graph.call_function(call, tuple(args))
    with graph.inserting_after(node):
        outs = [graph.call_function(operator.getitem, (node, i)) for i in range(len(outputs))]
    for q, out in zip(outputs, outs):
        replaced[members[q]] = out
        members[q].replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
    for member in reversed(members):
        graph.erase_node(member)
