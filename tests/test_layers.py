"""Imports flow one way: ground -> objectives -> engine -> eval, interop -> studies -> cli.

Read from the source with ``ast``, so an import inside a function counts as much as one at the top:
a lazy import that runs up a layer, or closes a circle between modules, fails here.
"""

import ast
from pathlib import Path

import mimaim

PACKAGE = Path(mimaim.__file__).parent
#: the layers, lowest first; a module may import its own layer (without circles) and the ones below
LAYERS = [{"models", "masking", "data", "tokenizers", "config", "version"}, {"objectives"}, {"engine"}, {"eval", "interop"},
          {"studies"}, {"cli", "__main__", ""}]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = ["mimaim", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The mimaim modules ``path`` (module ``name``) imports, wherever the import statement stands."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYER, f"{module}: add its package {top!r} to a layer in tests/test_layers.py"
    return LAYER[top]


def test_no_import_runs_up_a_layer():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "imports that run up a layer:\n" + "\n".join(sorted(upward))


def test_evaluation_opens_runs_through_checkpoints_and_the_backbone_contract():
    """A seam inside the layers: eval/ reads a run with engine/runs.py (record + encoder weights), never by
    rebuilding the objective through the trainer or naming a concrete objective."""
    forbidden = {"mimaim.engine.trainer", "mimaim.engine.build",
                 *(f"mimaim.objectives.{o}" for o in ("mae", "beit", "simmim", "aim"))}
    bad = [f"{a} -> {b}" for a, targets in graph().items() if a.startswith("mimaim.eval")
           for b in targets & forbidden]
    assert not bad, "eval/ must go through mimaim.engine.runs.open_backbone/build_backbone:\n" + "\n".join(bad)


def test_no_circle_between_modules():
    edges, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from ..engine import trainer\n    import mimaim.studies.compare\n")
    modules = {"mimaim.engine", "mimaim.engine.trainer", "mimaim.studies.compare"}
    assert imports(source, modules, name="mimaim.models.probe") == {"mimaim.engine.trainer", "mimaim.studies.compare"}
