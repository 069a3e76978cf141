"""The package's shape: no import cycle among edge's modules, and each layer imports only downward.

Every import statement counts, including those inside functions (a backend imported by its
factory when it is built); only imports under ``if TYPE_CHECKING:`` are left out, since they
never run. Layers, bottom up: the foundation (config, errors, events, signals, cpu, ...) and
the audio chunk types; a package per stage (wake, stt, llm, tts), none importing another; the
conversation, which composes stages through their protocol modules; the composition root
(app, daemon, simulate, control, kiosk); the CLI. Tooling (``edge.devtools``) sits beside the
CLI, off the daemon's import path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EDGE = Path(__file__).resolve().parents[1] / "edge"
STAGES = ("edge.wake", "edge.stt", "edge.llm", "edge.tts")
FOUNDATION = ("edge.config", "edge.errors", "edge.events", "edge.paths", "edge.logs", "edge.signals",
              "edge.cpu", "edge.onnxmeta", "edge.audio.chunk", "edge.audio.base", "edge.audio.buffers")


def _modules() -> dict[str, Path]:
    out = {}
    for path in EDGE.rglob("*.py"):
        parts = list(path.relative_to(EDGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[str]:
    """Modules of ours each import statement runs, anywhere in the file but type-checking blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name in MODULES]


GRAPH = {mod: sorted(set(_imports(ast.parse(path.read_text(encoding="utf-8"))))) for mod, path in MODULES.items()}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, []):
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def _in(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["a"]}) == [["a"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    # The stage factories import their backends when called: those edges must be in the graph.
    assert "edge.stt.vad" in GRAPH["edge.stt"]
    assert "edge.llm.llama" in GRAPH["edge.llm"]
    assert "edge.wake.oww" in GRAPH["edge.wake"]


def test_no_import_cycle_in_edge() -> None:
    assert _cycles(GRAPH) == []


def test_the_foundation_imports_nothing_above_it() -> None:
    for mod in FOUNDATION:
        above = [d for d in GRAPH[mod] if d not in FOUNDATION and d != "edge"]
        assert above == [], f"{mod} imports {above}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage_nor_anything_that_composes_stages(stage: str) -> None:
    for mod, deps in GRAPH.items():
        if not _in(mod, stage):
            continue
        for dep in deps:
            other_stage = any(_in(dep, s) for s in STAGES if s != stage)
            composer = any(_in(dep, p) for p in ("edge.conversation", "edge.app", "edge.daemon", "edge.simulate",
                                                 "edge.control", "edge.kiosk", "edge.cli", "edge.mqtt",
                                                 "edge.devtools", "edge.models"))
            assert not other_stage and not composer, f"{mod} imports {dep}"


def test_the_conversation_knows_stages_by_their_protocols_only() -> None:
    allowed = {f"{s}.base" for s in STAGES} | {"edge.tts.clauses"}
    for mod, deps in GRAPH.items():
        if not _in(mod, "edge.conversation"):
            continue
        stage_deps = [d for d in deps if any(_in(d, s) for s in STAGES)]
        assert set(stage_deps) <= allowed, f"{mod} imports {sorted(set(stage_deps) - allowed)}"


def test_tooling_is_off_the_daemons_import_path() -> None:
    for mod, deps in GRAPH.items():
        if _in(mod, "edge.devtools") or mod == "edge.cli":
            continue
        assert not [d for d in deps if _in(d, "edge.devtools")], f"{mod} imports the devtools"
