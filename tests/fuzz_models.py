"""Random DAG models for fuzzing the permutation inference (seeded, small, fx-traceable).

A model is a :class:`Program`: model inputs, then steps, each one op of the catalogue
(``fuzz_ops.OPS``) applied to earlier values; the model returns every value no step consumed
(so nothing it computes is dead). :func:`generate` draws a program from a seed; :func:`build`
turns a program into an ``nn.Module`` (:class:`FuzzNet`) and its example inputs. Programs
are plain data: ``repr(program)`` is a repro that :func:`build` accepts, and the fuzz harness
shrinks failing programs by dropping steps.

>>> p = generate(7)
>>> model, inputs = build(p)
>>> out = model(*inputs)
>>> len(describe(p).splitlines()) == len(p.inputs) + len(p.steps) + 2  # header and return lines
True
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn as nn

from fuzz_ops import LEAF_MODULES, OPS, VOCAB, FuzzOp, Params, Rand, Value

__all__ = ["Profile", "DEFAULT", "Program", "Step", "InputSpec", "generate", "build", "describe", "FuzzNet", "LEAF_MODULES",
           "consumed_outputs", "GenerationFailed", "generate_model", "prune", "bypass", "drop_input", "n_outputs"]

BATCH = 2


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    kind: str

    def __deepcopy__(self, memo):  # immutable: copying models must not walk it
        return self


@dataclass(frozen=True)
class Step:
    op: str
    inputs: tuple[int, ...]                 # value ids: model inputs first, then step outputs
    args: tuple[tuple[str, Any], ...]       # sorted (name, value) pairs

    @property
    def a(self) -> dict:
        return dict(self.args)

    def __deepcopy__(self, memo):  # immutable: copying models must not walk it
        return self


@dataclass(frozen=True)
class Program:
    seed: int
    inputs: tuple[InputSpec, ...]
    steps: tuple[Step, ...]

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(s.op for s in self.steps)

    def __deepcopy__(self, memo):  # immutable: copying models must not walk it
        return self


class GenerationFailed(RuntimeError):
    pass


def _kinds_of(step: Step, in_kind: str, n_out: int) -> tuple[str, ...]:
    a = step.a
    if "kinds" in a:
        return tuple(a["kinds"])
    return (a.get("kind", in_kind),) * n_out


def _run_args(step: Step, values: list[Value]) -> dict:
    x = values[step.inputs[0]]
    a = step.a
    a["_shape"], a["_ch"], a["_kin"] = x.shape, x.ch, x.kind
    a["_shapes"] = tuple(values[i].shape for i in step.inputs)
    return a


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


class FuzzNet(nn.Module):
    """A generated model: runs its program. The forward is a Python loop over fixed steps, so
    torch.fx unrolls it into the graph of the ops themselves."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.values: list[Value] = [Value(i, s.shape, s.kind, "long" if s.kind == "tok" else "float")
                                    for i, s in enumerate(program.inputs)]
        self.outputs: tuple[int, ...] = ()

    def run(self, inputs: tuple) -> Any:
        env = list(inputs)
        for k, step in enumerate(self.program.steps):
            P = Params(self, f"s{k}_", building=False)
            a = _run_args(step, self.values)
            env.extend(_as_tuple(OPS[step.op].run(P, a, *[env[i] for i in step.inputs])))
        outs = tuple(env[i] for i in self.outputs)
        return outs[0] if len(outs) == 1 else outs


class FuzzNet1(FuzzNet):
    """One input (fx needs named arguments, not ``*inputs``)."""

    def forward(self, x0):
        return self.run((x0,))


class FuzzNet2(FuzzNet):
    def forward(self, x0, x1):
        return self.run((x0, x1))


def _new_net(program: Program) -> FuzzNet:
    return (FuzzNet1 if len(program.inputs) == 1 else FuzzNet2)(program)


def consumed_outputs(program: Program, n_values: int) -> tuple[int, ...]:
    """Values no step reads (and that are not token inputs): the model's outputs."""
    used = {i for s in program.steps for i in s.inputs}
    return tuple(i for i in range(n_values) if i not in used and not
                 (i < len(program.inputs) and program.inputs[i].kind == "tok"))


def _example(program: Program) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(10_000 + program.seed)
    out = []
    for spec in program.inputs:
        if spec.kind == "tok":
            out.append(torch.randint(0, VOCAB, spec.shape, generator=g))
        else:
            out.append(torch.randn(spec.shape, generator=g))
    return tuple(out)


def _step_seed(program_seed: int, k: int) -> int:
    return (program_seed * 1_000_003 + k * 7919) % (2 ** 31)


def _add_step(net: FuzzNet, env: list[torch.Tensor], k: int, step: Step) -> tuple[torch.Tensor, ...]:
    """Build step k's weights and run it on real tensors. On failure nothing is left behind."""
    P = Params(net, f"s{k}_", building=True, seed=_step_seed(net.program.seed, k))
    a = _run_args(step, net.values)
    try:
        with torch.no_grad():
            outs = _as_tuple(OPS[step.op].run(P, a, *[env[i] for i in step.inputs]))
    except Exception:
        for name in P.created:
            _forget(net, name)
        raise
    return outs


def _forget(net: nn.Module, name: str) -> None:
    for table in (net._parameters, net._buffers, net._modules, net.__dict__):
        table.pop(name, None)


def _register_outputs(net: FuzzNet, step: Step, outs: tuple[torch.Tensor, ...]) -> None:
    kinds = _kinds_of(step, net.values[step.inputs[0]].kind, len(outs))
    for t, kind in zip(outs, kinds):
        dtype = "float" if t.is_floating_point() else ("bool" if t.dtype == torch.bool else "long")
        net.values.append(Value(len(net.values), tuple(t.shape), kind, dtype))


def build(program: Program) -> tuple[FuzzNet, tuple[torch.Tensor, ...]]:
    """The model and example inputs of ``program`` (deterministic: weights are seeded per step)."""
    with torch.random.fork_rng(devices=[]):
        net = _new_net(program)
        inputs = _example(program)
        env = list(inputs)
        for k, step in enumerate(program.steps):
            outs = _add_step(net, env, k, step)
            _register_outputs(net, step, outs)
            env.extend(outs)
        net.outputs = consumed_outputs(program, len(env))
    return net.eval(), inputs


# ---------------------------------------------------------------------------------------------
# generation
_INPUT_KINDS = ("img", "img", "img", "seq", "seq", "vec", "c1d", "c3d", "tok")


def _input(r: Rand, kind: str) -> InputSpec:
    C = r.choice((3, 4, 6))
    if kind == "img":
        hw = r.choice((4, 5, 6))
        return InputSpec((BATCH, C, hw, hw), kind)
    if kind == "c1d":
        return InputSpec((BATCH, C, r.choice((5, 8))), kind)
    if kind == "c3d":
        return InputSpec((BATCH, C, 3, 4, 4), kind)
    if kind == "seq":
        return InputSpec((BATCH, r.choice((4, 5, 6)), C), kind)
    if kind == "vec":
        return InputSpec((BATCH, C), kind)
    return InputSpec((BATCH, r.choice((4, 5))), "tok")


def _healthy(outs: tuple[torch.Tensor, ...]) -> bool:
    """Finite, moderate, small outputs (keeps float64 comparisons meaningful and models fast)."""
    for t in outs:
        if t.numel() == 0 or t.numel() > 4096 or t.dim() < 1:
            return False
        if t.is_floating_point() and not float(t.abs().max()) <= 1e3:  # NaN fails too
            return False
    return True


class _Env(list):
    """The values so far, and the model being built (for ops that reuse an earlier module)."""

    def __init__(self, net: FuzzNet):
        super().__init__(net.values)
        self.net = net


def _pick_op(r: Rand, x: Value, banned: frozenset[str], only: Optional[frozenset[str]] = None) -> Optional[FuzzOp]:
    cands = [op for op in OPS.values() if x.kind in op.kinds and op.weight > 0 and op.name not in banned
             and (only is None or op.name in only)]
    if not cands:
        return None
    # ops made for few kinds (attention on heads, embeddings on tokens) would drown among the
    # generic elementwise ops that accept anything: favour them
    weights = [op.weight * (12.0 if op.kinds == ("heads",) else 4.0 if len(op.kinds) <= 2 else 1.0) for op in cands]
    u = r.g.random() * sum(weights)
    for op, w in zip(cands, weights):
        u -= w
        if u < 0:
            return op
    return cands[-1]


@dataclass(frozen=True)
class Profile:
    """What the generator may draw: ``banned_ops`` are never drawn; a step whose weight/tensor
    source argument (``w``, ``src``, ``b``) is in ``banned_sources`` is redrawn; ``require``
    (op names) forces at least one of those ops into every model."""
    banned_ops: frozenset[str] = frozenset()
    banned_sources: frozenset[str] = frozenset()
    require: frozenset[str] = frozenset()
    require_sources: frozenset[str] = frozenset()  # the required op draws its source from these
    steps: tuple[int, int] = (3, 10)

    def allows(self, step: "Step") -> bool:
        a = step.a
        return step.op not in self.banned_ops and not any(a.get(k) in self.banned_sources
                                                          for k in ("w", "src", "b"))


DEFAULT = Profile()


def generate(seed: int, profile: Profile = DEFAULT) -> Program:
    """A random program from ``seed``: 1-2 inputs, 3-10 ops, sometimes a classifier head."""
    return generate_model(seed, profile)[0]


def generate_model(seed: int, profile: Profile = DEFAULT, max_tries: int = 400
                   ) -> tuple[Program, FuzzNet, tuple[torch.Tensor, ...]]:
    """:func:`generate` and :func:`build` in one pass (the same model as ``build(program)``)."""
    r = Rand(seed)
    n_in = 1 if r.coin(0.75) else 2
    first = r.choice(_INPUT_KINDS)
    kinds = [first] + [r.choice(("seq", "img", "vec", "tok") if first != "tok" else ("seq", "img"))
                       for _ in range(n_in - 1)]
    inputs = tuple(_input(r, k) for k in kinds)
    n_steps = r.int(*profile.steps)
    required_at = r.int(0, n_steps - 1) if profile.require else -1
    program = Program(seed, inputs, ())
    with torch.random.fork_rng(devices=[]):
        net = _new_net(program)
        example = _example(program)
        env = list(example)
        steps: list[Step] = []
        tries = 0
        while len(steps) < n_steps:
            tries += 1
            if tries > max_tries:
                if not steps:
                    raise GenerationFailed(f"seed {seed}: could not place a step")
                break
            # token inputs feed embeddings; once embedded they are rarely drawn again
            used = {i for st in steps for i in st.inputs}
            vals = [v for v in net.values if v.dtype == "float" or
                    (v.kind == "tok" and (v.id not in used or r.coin(0.1)))]
            unused_tok = [v for v in vals if v.kind == "tok" and v.id not in used]
            # favour recent values (deep chains) but reach back (branches, residuals)
            x = unused_tok[0] if unused_tok else (vals[-1] if r.coin(0.5) else r.choice(vals))
            forced = False
            fresh = [v for v in net.values[:len(inputs)] if v.id not in used]
            if fresh and r.coin(0.85):  # a stem: the first op on an input makes a space
                x = fresh[0]
                op = _pick_op(r, x, profile.banned_ops, only=frozenset(o.name for o in OPS.values() if o.producer))
            elif len(steps) >= required_at >= 0 and not any(st.op in profile.require for st in steps):
                op = _pick_op(r, x, profile.banned_ops, only=profile.require)
                forced = True
            else:
                op = _pick_op(r, x, profile.banned_ops)
            if op is None:
                continue
            proposal = op.propose(r, x, _Env(net))
            if proposal is None:
                continue
            args, extra = proposal
            step = Step(op.name, (x.id,) + tuple(extra), tuple(sorted(args.items())))
            if not profile.allows(step) or (forced and profile.require_sources and not any(
                    step.a.get(k) in profile.require_sources for k in ("w", "src", "b"))):
                continue
            net.program = replace(program, steps=tuple(steps) + (step,))
            try:
                outs = _add_step(net, env, len(steps), step)
            except Exception:  # an invalid combination of hyper-parameters: draw again
                continue
            if not _healthy(outs):
                prefix = f"s{len(steps)}_"
                for name in [n for n in list(net._parameters) + list(net._buffers) + list(net._modules)
                             + list(net.__dict__) if n.startswith(prefix)]:
                    _forget(net, name)
                continue
            steps.append(step)
            _register_outputs(net, step, outs)
            env.extend(outs)
        vecs = [v.id for v in net.values[len(inputs):] if v.kind == "vec"]
        if vecs and r.coin(0.4):
            step = Step("head", (vecs[-1],), (("out", 3),))
            net.program = replace(program, steps=tuple(steps) + (step,))
            outs = _add_step(net, env, len(steps), step)
            steps.append(step)
            _register_outputs(net, step, outs)
            env.extend(outs)
        for v in [net.values[i] for i in consumed_outputs(replace(program, steps=tuple(steps)), len(env))]:
            if v.id < len(inputs) or v.dtype != "float" or not r.coin(0.9):
                continue  # an unused input / an integer result / sometimes a raw output
            step = Step("readout", (v.id,), tuple(sorted(OPS["readout"].propose(r, v, net.values)[0].items())))
            net.program = replace(program, steps=tuple(steps) + (step,))
            outs = _add_step(net, env, len(steps), step)
            steps.append(step)
            _register_outputs(net, step, outs)
            env.extend(outs)
    program = replace(program, steps=tuple(steps))
    net.program = program
    net.outputs = consumed_outputs(program, len(env))
    return program, net.eval(), example


# ---------------------------------------------------------------------------------------------
# description and shrinking
def n_outputs(step: Step) -> int:
    a = step.a
    return len(a["sizes"]) if "sizes" in a else 1


def _first_output(program: Program, k: int) -> int:
    return len(program.inputs) + sum(n_outputs(s) for s in program.steps[:k])


def describe(program: Program) -> str:
    """One line per input and step: ``v3 = conv.fn(v1; groups=2, w='ws') -> [2, 6, 4, 4] img``."""
    net, _ = build(program)
    lines = [f"# fuzz program seed={program.seed}"]
    for i, spec in enumerate(program.inputs):
        lines.append(f"v{i} = input {list(spec.shape)} {spec.kind}")
    for k, step in enumerate(program.steps):
        pos = _first_output(program, k)
        outs = net.values[pos:pos + n_outputs(step)]
        args = ", ".join(f"{key}={v!r}" for key, v in step.args if key != "kinds")
        ins = ", ".join(f"v{i}" for i in step.inputs)
        lines.append(f"{', '.join(f'v{v.id}' for v in outs)} = {step.op}({ins}{'; ' + args if args else ''})"
                     f" -> {'; '.join(f'{list(v.shape)} {v.kind}' for v in outs)}")
    lines.append("return " + ", ".join(f"v{i}" for i in net.outputs))
    return "\n".join(lines)


def prune(program: Program, drop: set[int]) -> Optional[Program]:
    """``program`` without the steps in ``drop`` and every step that reads their outputs
    (value ids renumbered). None if no step is left."""
    dead_values: set[int] = set()
    dead_steps = set(drop)
    remap: dict[int, int] = {i: i for i in range(len(program.inputs))}
    step_index: dict[int, int] = {}
    nxt = len(program.inputs)
    steps = []
    for k, step in enumerate(program.steps):
        first = _first_output(program, k)
        outs = range(first, first + n_outputs(step))
        ref = step.a.get("step") if step.op in _REFERRING else None
        if k in dead_steps or any(i in dead_values for i in step.inputs) or (ref is not None and ref in dead_steps):
            dead_steps.add(k)
            dead_values.update(outs)
            continue
        step_index[k] = len(steps)
        new = replace(step, inputs=tuple(remap[i] for i in step.inputs))
        if ref is not None:
            new = _with_arg(new, "step", step_index[ref])
        steps.append(new)
        for v in outs:
            remap[v] = nxt
            nxt += 1
    return replace(program, steps=tuple(steps)) if steps else None


_REFERRING = ("shared_module", "tied_head")  # ops whose args name an earlier step


def _with_arg(step: Step, key: str, value) -> Step:
    a = step.a
    a[key] = value
    return replace(step, args=tuple(sorted(a.items())))


def bypass(program: Program, k: int) -> Optional[Program]:
    """``program`` with step k removed and its single output replaced by its first input;
    None unless that output has the input's shape and kind."""
    step = program.steps[k]
    if n_outputs(step) != 1 or any(s.op in _REFERRING and s.a["step"] == k for s in program.steps):
        return None
    net, _ = build(program)
    pos = _first_output(program, k)
    src, out = net.values[step.inputs[0]], net.values[pos]
    if (src.shape, src.kind, src.dtype) != (out.shape, out.kind, out.dtype):
        return None
    steps = []
    for j, s in enumerate(program.steps):
        if j != k:
            new = replace(s, inputs=tuple(src.id if i == pos else (i - 1 if i > pos else i) for i in s.inputs))
            if s.op in _REFERRING and s.a["step"] > k:
                new = _with_arg(new, "step", s.a["step"] - 1)
            steps.append(new)
    return replace(program, steps=tuple(steps)) if steps else None


def drop_input(program: Program, i: int) -> Optional[Program]:
    """``program`` without model input i, if no step reads it."""
    if len(program.inputs) < 2 or any(i in s.inputs for s in program.steps):
        return None
    steps = tuple(replace(s, inputs=tuple(j - 1 if j > i else j for j in s.inputs)) for s in program.steps)
    return replace(program, inputs=program.inputs[:i] + program.inputs[i + 1:], steps=steps)
