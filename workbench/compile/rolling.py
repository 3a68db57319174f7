"""A long step's repeated blocks compiled once each and called in turn: a loop the trace
unrolled (an ODE solved step by step, a recursion over time) rolled back up.

Tracing unrolls a Python loop into thousands of operations, and inductor compiles a graph in
time and memory that grow with its length: minutes and GBs for an ODE solved by RK4. Here the
traced graph is scanned for a block of operations repeated back to back: the same operations
on the same constants and shapes, wired the same way inside the block, taking the rest from
outside it (the previous turn's state, the parameters). Each distinct block is compiled once,
for the layouts its inputs come in, and the graph calls it at each turn (in groups of turns
where a block is short). Before the scan, a loop's reads of a series at an index that changes
from turn to turn (``y[t]``) are taken out of the turns (one ``unbind``), and the gradients
its backward puts back into the series are gathered after the loop (one ``stack``), so that
the turns are alike. After it, each stretch of operations between the calls is compiled as a
block called once. The arithmetic is the traced graph's, operation for operation; an
operation that draws random numbers or writes a tensor in place stays as traced.
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
GROUP_OPS = 300
SEGMENT_OPS = 16  # a stretch of operations between the calls, as long, is compiled too
# a stack or cat of more tensors than this stays as traced, outside the stretches: inductor
# copies each in a kernel of its own (a loop's gradients stacked: 400 us against eager's 25)
GATHER_INPUTS = 32
_GATHERS = {torch.ops.aten.stack.default, torch.ops.aten.cat.default}
_CHUNK = "vibench_chunk"  # a node's meta key: a view of a series that a call takes (_Chunk)


@dataclass
class Rolled:
    """The graph with its repeated blocks as calls, and what was rolled."""

    graph: fx.GraphModule
    calls: int  # blocks the graph now calls
    bodies: int  # distinct blocks compiled
    left: int  # operations outside every block, run as traced
    segments: int = 0  # runs of operations between the calls, compiled as blocks called once

    def describe(self, ops: int) -> str:
        return (f"a loop of {ops} operations rolled into {self.calls} calls of {self.bodies} "
                f"compiled blocks and {self.segments} compiled stretches between them, "
                f"{self.left} operations left as traced")


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
    more replaced by calls of ``compile_body(block, example inputs)``, as a new graph; None
    where it has none. ``graph`` itself is changed too."""
    _hoist_picks(graph.graph)
    _sink_scatters(graph.graph)
    nodes = [node for node in graph.graph.nodes if node.op == "call_function"]
    where = {node: i for i, node in enumerate(nodes)}
    regions = [region for found in _repeats(nodes) for region in _grouped(nodes, where, *found)]
    if not regions:
        return None
    values = _values(graph, inputs)  # the blocks' and stretches' example inputs
    regions = [region for region in regions  # a tuple or a number from outside: left as is
               if all(isinstance(values[node], torch.Tensor)
                      for ins in region.inputs for node in ins)]
    if not regions:
        return None
    bodies: dict[tuple, Callable] = {}
    replaced: dict[fx.Node, fx.Node] = {}
    calls = 0
    gathered_into: dict[fx.Node, set[fx.Node]] = collections.defaultdict(set)
    long_stacks = {node for node in nodes if node.target is torch.ops.aten.stack.default
                   and len(node.args[0]) > GATHER_INPUTS}
    for region in regions:
        gathered = _gathered(nodes, region, long_stacks)
        outputs = _outputs(nodes, where, region, gathered)
        block = _block(nodes, region.start + region.period, region.period, outputs,
                       [(run.positions, _stack_dim(run.stack)) for run in gathered])
        chunks = _chunks(region, values)
        kept = _fewer_inputs(block, chunks, _duplicates(region))
        signature = (tuple(kept), tuple((chunk.dim, tuple(sorted(chunk.offsets.items())))
                                        for chunk in chunks),
                     tuple(outputs), tuple(tuple(run.positions) for run in gathered))
        for repeat in range(region.repeats):
            first = region.start + repeat * region.period
            ins = [values[region.inputs[repeat][slot]] for slot in kept]
            args = [replaced.get(node, node) for node in region.inputs[repeat]]
            args = [args[slot] for slot in kept]
            for chunk in chunks:  # each a view of its series, made just before the turns
                ins.append(chunk.of(values[chunk.source], repeat))
                with graph.graph.inserting_before(nodes[first]):
                    args.append(graph.graph.call_function(torch.ops.aten.slice.Tensor, (
                        replaced.get(chunk.source, chunk.source), chunk.dim,
                        chunk.starts[repeat], chunk.starts[repeat] + chunk.span)))
                args[-1].meta[_CHUNK] = True
            kind = (region.shape, signature, tuple(_layout(value) for value in ins))
            if kind not in bodies:
                bodies[kind] = _named(compile_body(block, ins))
            members = nodes[first:first + region.period]
            for run, chunk in zip(gathered, _replace(graph.graph, members, outputs,
                                                     bodies[kind], args, replaced, gathered)):
                values[chunk] = torch.stack([values[members[q]] for q in run.positions],
                                            _stack_dim(run.stack))
                gathered_into[run.stack].add(chunk)
            calls += 1
    values.update({new: values[old] for old, new in replaced.items()})  # a call's outputs
    for stack, chunks_of_it in gathered_into.items():
        _as_cat(graph.graph, stack, chunks_of_it, values)
    _picks_left(graph.graph, values)
    segments = _compile_segments(graph.graph, values, compile_body)
    graph.graph.lint()
    graph.recompile()
    left = sum(1 for node in graph.graph.nodes if node.op == "call_function"
               and node.target is not operator.getitem and not node.meta.get(_CHUNK)) \
        - calls - segments
    return Rolled(_fresh(graph), calls, len(bodies), left, segments)


def _fresh(graph: fx.GraphModule) -> fx.GraphModule:
    """``graph`` copied into a new graph of its live operations alone. A graph's namespace
    keeps every node it ever made, erased ones too, with their metadata (a stack trace
    each): tens of thousands of objects for a long loop, which the garbage collector then
    scans in each full pass through training (over a second a pass for an RK4 loop)."""
    fresh = fx.Graph()
    fresh.output(fresh.graph_copy(graph.graph, {}))
    return fx.GraphModule(graph, fresh)


@dataclass
class _Chunk:
    """Picks a block's turns make from one series (``y[t]`` for each of its turns, the
    unbind's outputs after ``_hoist_picks``) taken as one view of it: ``source`` sliced along
    ``dim`` from ``starts[repeat]`` for ``span``, each of the block's ``offsets`` (slot: its
    index in the view) picked inside the compiled block, where it costs nothing. A call
    then takes one tensor for the series, not a tensor a turn."""

    source: fx.Node
    dim: int
    offsets: dict[int, int]
    starts: list[int]
    span: int

    def of(self, series: torch.Tensor, repeat: int) -> torch.Tensor:
        return series.narrow(self.dim, self.starts[repeat], self.span)


def _chunks(region: _Region, values: dict[fx.Node, object]) -> list[_Chunk]:
    """The series a region's turns pick from at indices that move by the same amount from
    one repeat to the next, on the CPU (inductor's CPU code takes a view at any offset);
    two picks a repeat or more, else the pick is as cheap as the view."""
    picked: dict[fx.Node, dict[int, list[int]]] = collections.defaultdict(dict)
    for slot in range(len(region.inputs[0])):
        picks = [ins[slot] for ins in region.inputs]
        unbind = _unbound(picks[0])
        if unbind is not None and all(_unbound(pick) is unbind for pick in picks):
            picked[unbind][slot] = [pick.args[1] for pick in picks]
    found = []
    for unbind, slots in picked.items():
        source, dim = unbind.args[0], unbind.args[1]
        series = values.get(source)
        if len(slots) < 2 or not isinstance(series, torch.Tensor) or \
                series.device.type != "cpu":
            continue
        size = series.shape[dim]
        indices = {slot: [index % size for index in at] for slot, at in slots.items()}
        starts = [min(at[repeat] for at in indices.values()) for repeat in range(region.repeats)]
        offsets = {slot: at[0] - starts[0] for slot, at in indices.items()}
        if all(at[repeat] - starts[repeat] == offsets[slot] for slot, at in indices.items()
               for repeat in range(region.repeats)):
            found.append(_Chunk(source, dim, offsets, starts, max(offsets.values()) + 1))
    return found


def _unbound(node: fx.Node) -> fx.Node | None:
    """The unbind whose output ``node`` is, if it is one."""
    if node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[0], fx.Node) and \
            node.args[0].target is torch.ops.aten.unbind.int:
        return node.args[0]
    return None


@dataclass
class _Gathered:
    """A run of a region's outputs that a long stack after the loop takes one after another,
    at the same positions of every repeat (each turn's value of a series, gathered): the
    block stacks them itself and gives the run as one output, the long stack becomes a cat
    of a few runs, and a value nothing else reads is no output of its own."""

    stack: fx.Node
    positions: list[int]  # the block's positions, in the stack's order

    def place(self, run: list[fx.Node], chunk: fx.Node) -> None:
        """The stack's list with ``chunk`` in place of ``run``, one repeat's values."""
        items = list(self.stack.args[0])
        at = items.index(run[0])
        items[at:at + len(run)] = [chunk]
        self.stack.args = (items, *self.stack.args[1:])


def _stack_dim(stack: fx.Node) -> int:
    return stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)


def _gathered(nodes: list[fx.Node], region: _Region, long_stacks: set[fx.Node]
              ) -> list[_Gathered]:
    """The runs of ``region``'s outputs that ``long_stacks`` (of more than GATHER_INPUTS
    tensors, left as traced) take in turn, two or more a repeat, the same positions in every
    repeat."""
    member_of: dict[fx.Node, tuple[int, int]] = {}
    for repeat in range(region.repeats):
        first = region.start + repeat * region.period
        for q in region.outputs:
            member_of[nodes[first + q]] = (repeat, q)
    stacks = {user for node in member_of for user in node.users if user in long_stacks}
    found = []
    for stack in stacks:
        items = list(stack.args[0])
        if len(set(items)) != len(items):
            continue
        runs: dict[int, tuple[int, list[int]]] = {}
        alike = True
        for at, item in enumerate(items):
            if item not in member_of:
                continue
            repeat, q = member_of[item]
            start, positions = runs.setdefault(repeat, (at, []))
            alike = alike and start + len(positions) == at
            positions.append(q)
        patterns = {tuple(positions) for _, positions in runs.values()}
        if alike and len(runs) == region.repeats and len(patterns) == 1 and \
                len(next(iter(patterns))) >= 2:
            found.append(_Gathered(stack, list(next(iter(patterns)))))
    return found


def _outputs(nodes: list[fx.Node], where: dict[fx.Node, int], region: _Region,
             gathered: list[_Gathered]) -> list[int]:
    """The region's outputs less those that, outside their own repeat, only ``gathered``'s
    stacks read."""
    stacks = {run.stack for run in gathered}
    kept = []
    for q in region.outputs:
        for repeat in range(region.repeats):
            first = region.start + repeat * region.period
            if any(not first <= where.get(user, -1) < first + region.period
                   and user not in stacks for user in nodes[first + q].users):
                kept.append(q)
                break
    return kept


def _as_cat(graph: fx.Graph, stack: fx.Node, chunks: set[fx.Node],
            values: dict[fx.Node, object]) -> None:
    """A long stack whose runs ``chunks`` are now (``_Gathered``) as a cat along its dim:
    the chunks as they are, each other value unsqueezed there."""
    dim = _stack_dim(stack)
    parts = []
    with graph.inserting_before(stack):
        for item in stack.args[0]:
            if item in chunks:
                parts.append(item)
                continue
            part = graph.call_function(torch.ops.aten.unsqueeze.default, (item, dim))
            values[part] = values[item].unsqueeze(dim)
            parts.append(part)
        cat = graph.call_function(torch.ops.aten.cat.default, (parts, dim))
    cat.meta = dict(stack.meta)
    values[cat] = values[stack]
    stack.replace_all_uses_with(cat)
    graph.erase_node(stack)


def _duplicates(region: _Region) -> dict[int, int]:
    """The slots given the same value as an earlier slot in every repeat (a parameter each
    turn reads, say), each with that earlier slot."""
    first: dict[tuple, int] = {}
    same = {}
    for slot in range(len(region.inputs[0])):
        given = tuple(ins[slot] for ins in region.inputs)
        if given in first:
            same[slot] = first[given]
        else:
            first[given] = slot
    return same


def _fewer_inputs(block: fx.GraphModule, chunks: list[_Chunk], same: dict[int, int]
                 ) -> list[int]:
    """``block`` changed to take each of ``chunks`` as one input (after the others) and pick
    its turns' values inside, and to take a value given twice (``same``: slot, the earlier
    slot) once; the slots of the inputs it still takes, in order."""
    graph = block.graph
    slots = [node for node in graph.nodes if node.op == "placeholder"]
    taken = {slot for chunk in chunks for slot in chunk.offsets}
    same = {slot: earlier for slot, earlier in same.items()
            if slot not in taken and earlier not in taken}
    for slot, earlier in same.items():
        slots[slot].replace_all_uses_with(slots[earlier])
    taken |= set(same)
    if not taken:
        return list(range(len(slots)))
    body = next(node for node in graph.nodes if node.op != "placeholder")
    for slot in slots:  # the inputs first, in order (``_block`` makes each where first used)
        body.prepend(slot)
    with graph.inserting_before(body):
        views = [graph.placeholder(f"chunk{i}") for i in range(len(chunks))]
    for view, chunk in zip(views, chunks):
        for slot, offset in chunk.offsets.items():
            with graph.inserting_before(body):
                pick = graph.call_function(torch.ops.aten.select.int, (view, chunk.dim, offset))
            slots[slot].replace_all_uses_with(pick)
    for slot in sorted(taken, reverse=True):
        graph.erase_node(slots[slot])
    graph.lint()
    block.recompile()
    return [slot for slot in range(len(slots)) if slot not in taken]


def _picks_left(graph: fx.Graph, values: dict[fx.Node, object]) -> None:
    """An unbind whose outputs the chunks took but for a few (the turns outside every
    group): those few picked alone (a view each, once an index), and the unbind, whose every
    output is a tensor made, gone; the picks the chunks took, gone too."""
    for unbind in [node for node in graph.nodes if node.target is torch.ops.aten.unbind.int]:
        for user in list(unbind.users):
            if not user.users:  # a pick a chunk took
                graph.erase_node(user)
        users = list(unbind.users)
        indices = {user.args[1] for user in users}
        if len(indices) >= len(values.get(unbind) or ()) or \
                not all(_unbound(user) is unbind for user in users):
            continue  # as many tensors made either way
        source, dim = unbind.args[0], unbind.args[1]
        picks: dict[int, fx.Node] = {}
        for user in users:
            if user.args[1] not in picks:
                with graph.inserting_before(unbind):
                    picks[user.args[1]] = graph.call_function(torch.ops.aten.select.int,
                                                              (source, dim, user.args[1]))
                picks[user.args[1]].meta = dict(user.meta)
                values[picks[user.args[1]]] = values.get(user)
            user.replace_all_uses_with(picks[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(unbind)


def _compile_segments(graph: fx.Graph, values: dict[fx.Node, object],
                      compile_body: Callable) -> int:
    """Compile each run of SEGMENT_OPS or more operations left between the blocks' calls
    (none drawing random numbers or writing in place) as a block of its own, called once; how
    many. ``values``: each node's value in one run of the step. ``graph`` is changed."""
    nodes = [node for node in graph.nodes if node.op == "call_function"]

    def compilable(node: fx.Node) -> bool:
        return _rollable(node) and node.target is not operator.getitem and \
            not node.meta.get(_CHUNK) and \
            isinstance(values.get(node), torch.Tensor) and \
            all(isinstance(values.get(arg), torch.Tensor) for arg in node.all_input_nodes) \
            and not (node.target in _GATHERS and len(node.all_input_nodes) > GATHER_INPUTS)

    runs, current = [], []
    for node in nodes + [None]:
        if node is not None and compilable(node):
            current.append(node)
        else:
            if len(current) >= SEGMENT_OPS:
                runs.append(current)
            current = []
    for members in runs:
        inside = set(members)
        ins = [arg for node in members for arg in node.all_input_nodes if arg not in inside]
        outputs = [q for q, node in enumerate(members)
                   if any(user not in inside for user in node.users)]
        body = compile_body(_block(members, 0, len(members), outputs),
                            [values[arg] for arg in ins])
        outs: dict[fx.Node, fx.Node] = {}
        _replace(graph, members, outputs, _named(body), ins, outs)
        values.update({new: values[old] for old, new in outs.items()})  # for later stretches
    return len(runs)


# an element or a slice picked from a tensor at an index given as a number: args (tensor,
# dim, index) and (tensor, dim, start, end, step)
_PICKS = {torch.ops.aten.select.int, torch.ops.aten.slice.Tensor}


def _hoist_picks(graph: fx.Graph) -> None:
    """Move the picks a loop makes from one tensor at an index that changes from turn to turn
    (``y[t]``: the same operation at MIN_REPEATS indices or more) to just after that tensor
    is made, so that each turn's block is the same and takes its pick as an input."""
    families: dict[tuple, list[fx.Node]] = collections.defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PICKS and not node.kwargs and \
                isinstance(node.args[0], fx.Node):
            families[(node.target, node.args[0], node.args[1])].append(node)
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    for (target, source, dim), picks in families.items():
        if len({repr(node.args[2:]) for node in picks}) < MIN_REPEATS:
            continue
        after = inputs[-1] if source.op == "placeholder" else source
        if target is torch.ops.aten.select.int:  # one operation gives every element
            with graph.inserting_after(after):
                parts = graph.call_function(torch.ops.aten.unbind.int, (source, dim))
            for node in picks:
                with graph.inserting_after(parts):
                    part = graph.call_function(operator.getitem, (parts, node.args[2]))
                part.meta = dict(node.meta)
                node.replace_all_uses_with(part)
                graph.erase_node(node)
            continue
        for node in picks:
            after.append(node)
            after = node


# a gradient put back at an index given as a number (the backward of a pick): args (grad,
# sizes, dim, index) and (grad, sizes, dim, start, end, step)
_SCATTERS = {torch.ops.aten.select_backward.default, torch.ops.aten.slice_backward.default}


def _sink_scatters(graph: fx.Graph) -> None:
    """Move the gradients a loop's backward puts back into one tensor at an index that
    changes from turn to turn (the backward of ``y[t]``), and the sums that gather them, to
    just before the first operation that uses the gathered gradient: each turn's block is then
    the same and gives its gradient as an output."""
    families: dict[tuple, list[fx.Node]] = collections.defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _SCATTERS and not node.kwargs:
            families[(node.target, repr(node.args[1]), node.args[2])].append(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for scatters in families.values():
        if len({repr(node.args[3:]) for node in scatters}) < MIN_REPEATS:
            continue
        moving = set(scatters)
        for node in graph.nodes:  # the sums that gather them, in order
            if _sum_of_two(node) and any(arg in moving for arg in node.args):
                moving.add(node)
        users = [user for node in moving for user in node.users if user not in moving]
        if not users:
            continue
        before = min(users, key=order.__getitem__)
        if not _stacked(graph, scatters, moving, before):
            for node in sorted(moving, key=order.__getitem__):
                if order[node] < order[before]:
                    before.prepend(node)


def _sum_of_two(node: fx.Node) -> bool:
    """Whether ``node`` adds two tensors, as a backward gathers gradients."""
    return node.target is torch.ops.aten.add.Tensor and not node.kwargs and \
        len(node.args) == 2 and all(isinstance(arg, fx.Node) for arg in node.args)


def _stacked(graph: fx.Graph, scatters: list[fx.Node], moving: set[fx.Node],
             before: fx.Node) -> bool:
    """Where ``scatters`` put gradients back at every index of their dim (select_backward at
    0, 1, ..., n - 1), the sums gathering them (``moving``) as one stack of those gradients
    (summed per index) plus the sums' other terms, placed before ``before``; False where
    not so."""
    first = scatters[0]
    if first.target is not torch.ops.aten.select_backward.default:
        return False
    sizes, dim = first.args[1], first.args[2]
    by_index: dict[int, list[fx.Node]] = collections.defaultdict(list)
    for node in scatters:
        by_index[node.args[3]].append(node.args[0])
    ends = [node for node in moving if any(user not in moving for user in node.users)]
    if sorted(by_index) != list(range(sizes[dim])) or len(ends) != 1:
        return False
    others = [arg for node in moving if node not in scatters for arg in node.all_input_nodes
              if arg not in moving]
    with graph.inserting_before(before):
        grads = []
        for i in range(sizes[dim]):  # an index picked twice a turn: its gradients summed
            grad, *more = by_index[i]
            for another in more:
                grad = graph.call_function(torch.ops.aten.add.Tensor, (grad, another))
            grads.append(grad)
        total = graph.call_function(torch.ops.aten.stack.default, (grads, dim))
        total.meta = {key: value for key, value in ends[0].meta.items() if key == "val"}
        for other in others:
            total = graph.call_function(torch.ops.aten.add.Tensor, (total, other))
    ends[0].replace_all_uses_with(total)
    for node in reversed([node for node in graph.nodes if node in moving]):
        graph.erase_node(node)
    return True


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
    after the last group grouped alike, where MIN_REPEATS."""
    region = _checked(nodes, where, start, period, repeats)
    if region is None or period >= GROUP_OPS:
        return [region] if region else []
    group = min(-(-GROUP_OPS // period), region.repeats // MIN_REPEATS)
    whole = _checked(nodes, where, region.start, period * group, region.repeats // group) \
        if group > 1 else None
    if whole is None:
        return [region]
    tail = region.repeats - whole.repeats * group
    if whole.start != region.start or tail < MIN_REPEATS:
        return [whole]
    return [whole, *_grouped(nodes, where, whole.start + whole.repeats * whole.period, period,
                             tail)]


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


def _values(graph: fx.GraphModule, inputs: list[torch.Tensor]) -> dict[fx.Node, object]:
    """Each node's value in one run of ``graph`` on ``inputs``: the example inputs of the
    blocks, in the layouts the step gives them."""
    seen: dict[fx.Node, object] = {}

    class Recording(fx.Interpreter):
        def run_node(self, node: fx.Node):
            seen[node] = super().run_node(node)
            return seen[node]

    with torch.no_grad():
        Recording(graph).run(*inputs)
    return seen


def _layout(value: torch.Tensor) -> tuple:
    """What a compiled block is specific to: its inputs' shapes, strides, dtypes, devices."""
    return tuple(value.shape), value.stride(), value.dtype, value.device


def _block(nodes: list[fx.Node], first: int, period: int, outputs: list[int],
           stacked: list[tuple[list[int], int]] = ()) -> fx.GraphModule:
    """One repeat as a graph of its own: an input for each argument from outside it (in the
    order ``_checked`` lists them), the values used outside it as outputs, then each of
    ``stacked`` (positions, dim) as one more: those positions' values stacked."""
    block, env = fx.Graph(), {}
    members = nodes[first:first + period]
    inside = set(members)
    for node in members:
        # a placeholder for each argument from outside, in all_input_nodes' order, as
        # _checked lists the inputs
        slots = {arg: block.placeholder(f"in{len(block.nodes)}")
                 for arg in node.all_input_nodes if arg not in inside}
        env[node] = block.node_copy(
            node, lambda arg, slots=slots: env[arg] if arg in inside else slots[arg])
    stacks = [block.call_function(torch.ops.aten.stack.default,
                                  ([env[members[q]] for q in positions], dim))
              for positions, dim in stacked]
    block.output(tuple(env[members[q]] for q in outputs) + tuple(stacks))
    return fx.GraphModule(torch.nn.Module(), block)


def _named(body: Callable) -> Callable:
    def rolled_block(*args: torch.Tensor):  # the name the graph's code shows
        return body(*args)

    return rolled_block


def _replace(graph: fx.Graph, members: list[fx.Node], outputs: list[int], call: Callable,
             args: list[fx.Node], replaced: dict[fx.Node, fx.Node],
             gathered: list[_Gathered] = ()) -> list[fx.Node]:
    """Put one call of ``call`` in place of the repeat ``members``; its outputs after
    ``outputs`` are ``gathered``'s runs stacked, each put in its stack's list in place of
    the run: those outputs are returned."""
    inside = set(members)
    with graph.inserting_after(members[-1]):
        node = graph.call_function(call, tuple(args))
    with graph.inserting_after(node):
        outs = [graph.call_function(operator.getitem, (node, i))
                for i in range(len(outputs) + len(gathered))]
    chunks = outs[len(outputs):]
    for run, chunk in zip(gathered, chunks):
        run.place([members[q] for q in run.positions], chunk)
    for q, out in zip(outputs, outs):
        replaced[members[q]] = out
        members[q].replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside)
    for member in reversed(members):
        graph.erase_node(member)
    return chunks
