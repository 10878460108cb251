"""Names for the picture: module chains (``conv1 -> bn1 -> conv2``) and the repeated blocks
(``layer2.0``, ``features.5.3``) and stages (``layer2``, ``features.5``) items belong to, found
from module paths and the classes the tracer recorded."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import torch.fx as fx

if TYPE_CHECKING:
    from .outline import Item

_INDEXED = re.compile(r"^(\D*?)_?(\d+)$")


def stack_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else str(path)
    return re.sub(r"^L\['self'\]\.?|^L__self___?", "", str(path))


# -- names -----------------------------------------------------------------------------------

def common_prefix(paths) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        out.append(comps[0])
    return ".".join(out)


def relative(path: str, base: str) -> str:
    if base and path.startswith(base + "."):
        return path[len(base) + 1:]
    return path if path != base else (path.rpartition(".")[2] or path)


def chain(modules, base: str = "", limit: int = 4) -> str:
    """``conv1 -> bn1 -> conv2``: each module relative to ``base``, and to the one before it
    when they share a prefix (``attn.qkv -> proj``)."""
    rel = [relative(m, base) or "(model)" for m in modules]
    out, prev = [], None
    for r in rel:
        shown = r
        if prev is not None:
            common = common_prefix([prev, r])
            if common and common != r:
                shown = r[len(common) + 1:]
        out.append(shown)
        prev = r
    if len(out) > limit:
        out = out[:limit - 1] + [f"... (+{len(out) - limit + 1})"]
    return " -> ".join(dict.fromkeys(out))


def _indexed_components(paths, classes: Mapping[str, str]) -> set[tuple[str, str]]:
    """(parent, child) module-path components that index a repeated block: containers named
    by digits in a container whose numbered children are all of one class (not a Sequential of
    different layers), or named ``stem<N>`` with a sibling of the same stem, class and
    children (``denselayer3``). Leaf layers (``downsample.0``) never name a block."""
    children: dict[str, set[str]] = {}
    for p in paths:
        parts = p.split(".") if p else []
        for k in range(len(parts)):
            children.setdefault(".".join(parts[:k]), set()).add(parts[k])

    def full(parent: str, c: str) -> str:
        return f"{parent}.{c}" if parent else c

    out = set()
    for parent, names in children.items():
        digits = [c for c in names if c.isdigit()]
        if len(digits) >= 2 and len({classes.get(full(parent, c)) for c in digits}) == 1:
            out.update((parent, c) for c in digits if full(parent, c) in children)
        stems: dict[str, list[str]] = {}
        for c in names:
            m = _INDEXED.match(c)
            if m and not c.isdigit():
                stems.setdefault(m.group(1), []).append(c)
        for cs in stems.values():
            for c in cs:
                me = full(parent, c)
                if me in children and any(classes.get(full(parent, d)) == classes.get(me)
                                          and children.get(full(parent, d)) == children[me] for d in cs if d != c):
                    out.add((parent, c))
    return out


def _block_of(owner: str, indexed: set, owners: list[str]) -> str:
    """The repeated block an item belongs to: the deepest indexed prefix of its owner path
    (``layer2.0`` of ``layer2.0.downsample.0``) whose sibling blocks hold items too."""
    parts = owner.split(".") if owner else []
    for k in range(len(parts) - 1, -1, -1):
        parent, child = ".".join(parts[:k]), parts[k]
        if (parent, child) not in indexed:
            continue
        base = parent + "." if parent else ""
        for o in owners:
            if not o.startswith(base):
                continue
            other = o[len(base):].split(".")[0]
            if other != child and (parent, other) in indexed:
                return base + child
    return ""


def module_classes(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> class name, from the module stacks the tracer records (the GraphModule
    itself keeps only the leaf layers' classes)."""
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        for value in (n.meta.get("nn_module_stack") or {}).values():
            if isinstance(value, tuple) and len(value) == 2:
                path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", str(value[0]))
                cls = value[1]
                out.setdefault(path, getattr(cls, "__name__", str(cls)))
        if n.op == "call_module":
            try:
                out[str(n.target)] = type(gm.get_submodule(str(n.target))).__name__
            except AttributeError:
                pass
    return out


def assign_blocks(items: list["Item"], classes: Mapping[str, str], blocks: bool = True) -> list["Item"]:
    owners = [common_prefix(it.modules) if it.kind != "barrier" else it.modules[0] for it in items]
    indexed = _indexed_components([m for it in items for m in it.modules], classes)
    found = [_block_of(own, indexed, owners) if blocks else "" for own in owners]
    per_parent: dict[str, set[str]] = {}
    for b in found:
        if b:
            per_parent.setdefault(b.rpartition(".")[0], set()).add(b)
    out = []
    for it, block in zip(items, found):
        parent = block.rpartition(".")[0] if block else ""
        stage = parent if parent and len(per_parent.get(parent, ())) >= 2 else ""
        out.append(replace(it, block=block, stage=stage))
    return out
