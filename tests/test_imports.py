"""No import cycle in the packages or the benchmarks, and pf_engine's layers imported downward
only: every ``import`` (at module level or inside a function: a function-local import that hides
a cycle is still one) is an edge from the module to the module it names, and the graph must have
no cycle.  ``from P import x`` is an edge to P.x when P.x is a module, else to P; a package's
``__init__`` counts as the package."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pf_engine", "pf_kernels", "benchmarks")


def modules() -> dict[str, str]:
    """module name -> file path, for every .py file of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(folder, f)
    return out


def edges(name: str, path: str, known: dict) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[:len(here) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:             # pf_engine.x.y (an attribute) -> pf_engine.x
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                got = visit(n)
                if got:
                    return got
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            got = visit(m)
            if got:
                return got
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: edges(m, p, known) for m, p in known.items()}


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_a_cycle():
    """The walk finds a cycle hidden in a function-local import (the kind this test exists for)."""
    graph = import_graph()
    assert "pf_engine.model.linear" in graph and graph["pf_engine.engine"]
    graph["pf_engine.model.linear"] = graph["pf_engine.model.linear"] | {"pf_engine.engine"}
    assert find_cycle(graph) is not None


# pf_engine's units (a subpackage, or a module at its top; "" the package itself), lowest first:
# a unit imports units of its own layer or below, never above (pf_kernels imports none of them).
LAYERS = [
    ("errors", "outputs"),
    ("model",),                      # the decoder, its weights, KV pool and step (no personas)
    ("tokenizer", "persona"),        # persona: banks, routers, gate specs, the forward's Mix
    ("backends",),                   # how every layer runs, and its thread policy
    ("generation",),                 # one request: its handle, sampling, logprobs, grammars
    ("runtime", "parallel"),         # the scheduler and step runner; tensor-parallel ranks
    ("engine", ""),
    ("serve",),
    ("train",),
    ("cli",),
]


def unit(module: str) -> str | None:
    parts = module.split(".")
    return None if parts[0] != "pf_engine" else (parts[1] if len(parts) > 1 else "")


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    layer = {u: i for i, us in enumerate(LAYERS) for u in us}
    bad = []
    for m, targets in sorted(graph.items()):
        u = unit(m)
        for t in sorted(targets):
            v = unit(t)
            if m.startswith("pf_kernels") and v is not None:
                bad.append(f"{m} -> {t} (pf_kernels is below pf_engine)")
            elif u is not None and v is not None and u != v:
                if u not in layer or v not in layer:
                    bad.append(f"{m} -> {t}: {u if u not in layer else v!r} has no layer in LAYERS")
                elif layer[v] > layer[u]:
                    bad.append(f"{m} -> {t} ({u} is below {v})")
    return bad


def test_layers_import_downward():
    bad = upward_edges(import_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import():
    """A function-local import of the runtime from the model (what model/decoder.py did for its
    KV pool) is an upward edge."""
    graph = import_graph()
    graph["pf_engine.model.decoder"] = graph["pf_engine.model.decoder"] | {"pf_engine.runtime.scheduler"}
    assert upward_edges(graph) == ["pf_engine.model.decoder -> pf_engine.runtime.scheduler "
                                   "(model is below runtime)"]
