"""The library's structure, checked on its import graph (read with `ast`, nothing imported):
no import circle, layers imported only downward (at most MAX_UPWARD exceptions), no module of
`domadapt/` over MAX_LINES lines.

Every import counts: at module level, inside functions and under `if TYPE_CHECKING:`.
`from pkg import name` imports the module `pkg.name` when there is one, else `pkg` (as
import-linter's grimp reads it). A package's lazy re-exports (`domadapt.sweep`'s PEP 562
`__getattr__`) are no import.

LAYERS is docs/DESIGN.md's list (lowest first), adjusted where the code has a better shape:
- `validators` is in layer 2 with `selection` (not 1): a validator scores predictions with
  the shared losses of `nn/losses.py`, and selection rules and validators are one idea.
- `system`, `distributed`, `provenance` (what a run ran on) are layer 1, like `io`.
- `nn/model.py` (the network a method trains, `DomainAdaptModel`) is layer 2, beside the
  heads it is made of, so a method names its type without importing `models` (layer 3);
  this broke the circle config -> methods -> models -> config.
- `distributions` (search distributions, declared by plug-ins) is layer 1 beside `registry`;
  `hparam_search` (drawing a cell's trials) is layer 3 beside `config`.
- `run_state.py` (what a run carries besides its modules: TrainState, seeds, the deferred
  stop) is layer 3 beside `rundir`, out of `engine` (which kept the loop and its hooks).
- `presets` (named overrides of the RunConfig defaults, a registry) is layer 2 with the
  other plug-in registries, below `config` (layer 3), which applies them.
- `plots` is layer 4 with the tables it draws; `sweep/` and `analysis/` are layer 5.
- `norms/gates.py` (the gate-record schema, gates.csv) is in layer 2 beside the BIN norm, so
  the results code (layer 4) reads it without importing `analysis` (layer 5).
The CLI (`cli/`, layer 6) lives outside `domadapt/` and may import any layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DOMADAPT = Path(__file__).resolve().parent.parent / "domadapt"
MAX_LINES = 500
MAX_UPWARD = 3
LAYERS: tuple[tuple[str, ...], ...] = (  # module or package prefixes, lowest layer first
    ("domadapt", "domadapt.errors", "domadapt.progress", "domadapt.io", "domadapt.registry",
     "domadapt.schedules", "domadapt.stats", "domadapt.system", "domadapt.distributed",
     "domadapt.provenance", "domadapt.distributions"),
    ("domadapt.nn", "domadapt.data", "domadapt.backbones", "domadapt.norms", "domadapt.methods",
     "domadapt.selection", "domadapt.validators", "domadapt.presets"),
    ("domadapt.config", "domadapt.settings", "domadapt.models", "domadapt.evaluation",
     "domadapt.rundir", "domadapt.run_state", "domadapt.hparam_search"),
    ("domadapt.engine", "domadapt.train", "domadapt.tables", "domadapt.plots"),
    ("domadapt.sweep", "domadapt.analysis"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(DOMADAPT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(DOMADAPT.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The domadapt modules that module `name` (file `path`) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*head, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in MODULES else base)
    found = set()
    for target in targets:
        while target and target not in MODULES:  # `domadapt.nn.bin.X` -> `domadapt.nn.bin`
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    """The layer (1 = lowest) of the longest LAYERS prefix of `name`."""
    best = max(((len(prefix), i) for i, layer in enumerate(LAYERS, 1) for prefix in layer
                if name == prefix or name.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS")
    return best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_circle():
    assert cycles(GRAPH) == []


def test_the_checker_sees_circles_and_type_checking_imports(tmp_path):
    """The checks above would fail on what they forbid (not vacuous)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "domadapt.nn.model" in GRAPH["domadapt.methods.base"]  # a TYPE_CHECKING import
    assert "domadapt.norms.gates" in GRAPH["domadapt.tables.frames"]
    assert layer_of("domadapt.tables.frames") == 4 and layer_of("domadapt.nn.bin_kernel") == 2


def upward_imports() -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
                  for a, targets in GRAPH.items() for b in targets if layer_of(b) > layer_of(a))


def test_layers_are_imported_downward():
    up = upward_imports()
    assert len(up) <= MAX_UPWARD, "\n".join(up)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_library_file_over_the_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines"
