"""No import cycles in msm/: the module-level imports form no cycle, and neither do all imports (function-level, lazy
ones included) apart from the named lazy re-exports below. Read from the source with ast, so nothing is imported."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "msm"

# Lazy edges allowed to point up the pipeline: a stable name of docs/DESIGN.md kept importable from its old home,
# forwarded on first use to the module that builds on it. (module, imported module): why.
LAZY_REEXPORTS = {
    ("hunet", "official"): "msm.hunet.load_official / to_official / official_names (PEP 562 forward to msm.official, "
                           "which builds on msm.hunet)",
}


def _targets(node, top_level_msm=False) -> set[str]:
    "msm modules named by one import statement (relative `from .x`, absolute `msm.x`, `from msm import x`)."
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("msm.")}
    if isinstance(node, ast.ImportFrom):
        if node.level == 1:
            return {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        if node.level == 0 and node.module == "msm":
            return {a.name for a in node.names}
        if node.level == 0 and node.module and node.module.startswith("msm."):
            return {node.module.split(".")[1]}
    return set()


def module_imports(path: Path, lazy: bool = False) -> set[str]:
    """msm modules that `path` imports at module level (statements of the module body, also inside its if / try
    blocks); with `lazy`, also those imported inside functions and classes."""
    tree = ast.parse(path.read_text(), str(path))
    if lazy:
        return set().union(*(_targets(n) for n in ast.walk(tree)))
    found = set()

    def visit(body):
        for node in body:
            found.update(_targets(node))
            if isinstance(node, (ast.If, ast.Try)):
                for block in (node.body, node.orelse, getattr(node, "finalbody", [])):
                    visit(block)
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return found


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    "Module name -> the msm modules it imports (module level, or with `lazy` anywhere), self and unknown names left out."
    mods = {p.stem: p for p in PKG.glob("*.py") if p.stem != "__init__"}
    return {m: {d for d in module_imports(p, lazy) if d in mods and d != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import cycle as [a, b, ..., a], or None (depth-first search)."
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = dfs(d)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_reads_every_import_style(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from .core import x\nimport msm.data\nfrom msm import sparse\nfrom msm.hunet import H\n"
                 "try:\n    from .viz import y\nexcept ImportError:\n    pass\n"
                 "def f():\n    from msm.cli import main\n")
    assert module_imports(f) == {"core", "data", "sparse", "hunet", "viz"}
    assert module_imports(f, lazy=True) == {"core", "data", "sparse", "hunet", "viz", "cli"}


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert len(graph) > 10 and "core" in graph
    cycle = find_cycle(graph)
    assert cycle is None, f"module-level import cycle: {' -> '.join(cycle)}"


def test_no_import_cycle_with_lazy_imports():
    graph = import_graph(lazy=True)
    for (a, b), why in LAZY_REEXPORTS.items():
        assert b in graph[a], f"{a} no longer imports {b} ({why}): drop it from LAZY_REEXPORTS"
        graph[a] = graph[a] - {b}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle (counting imports inside functions): {' -> '.join(cycle)}"
