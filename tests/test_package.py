"""The package itself: no import cycle between its modules, and `import mudsc_fx` stays light."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

import mudsc_fx

ROOT = Path(mudsc_fx.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk(tree: ast.AST):
    """Every node, except the bodies of ``if TYPE_CHECKING:`` blocks (never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            continue
        yield node
        yield from _walk(node)


# The one sanctioned lazy edge: PermutationGraph's public view methods delegate to the views
# package, which reads the graph.
DELEGATION = ("mudsc_fx.ir.graph", "mudsc_fx.views.")


def _imports(path: Path, name: str) -> set[str]:
    """Package modules a module imports, at module level or deferred inside functions."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mudsc_fx"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("mudsc_fx"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_import_cycle_between_package_modules():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for dep in _imports(path, name):
            if dep in modules and dep != name and not (name == DELEGATION[0] and dep.startswith(DELEGATION[1])):
                g.add_edge(name, dep)
    # a package's __init__ importing its own submodules is not a cycle of the code's design
    cycles = [c for c in nx.simple_cycles(g) if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)
              and not any(all(m.startswith(p + ".") or m == p for m in c) for p in c)]
    assert not cycles, cycles[:5]


def test_import_is_cycle_free_and_does_not_import_heavy_libraries():
    code = ("import sys, mudsc_fx; heavy = [m for m in ('torchvision', 'timm', 'transformers', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
