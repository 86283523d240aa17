"""The layout's rules, checked on the source (ast, no imports): who may import whom, no import cycles,
no C++ inside Python, no oversized files, and no documentation citation that leaves the repository."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "models", "data", "deploy")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The deepest of our modules that ``name`` names (``trainer.optim.rules.RuleConfig`` -> the module)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def imports_of(module: str) -> set[str]:
    """Every import of ours in the module, at any depth (function-level imports count too)."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for n in names:
            r = _resolve(n)
            if r and r != module:
                out.add(r)
    return {m for m in out if not module.startswith(m + ".") or MODULES[m].name != "__init__.py"}


GRAPH = {m: imports_of(m) for m in MODULES}


def _layer(module: str) -> str:
    if module.startswith("trainer.experiments"):
        return "experiments"
    if module in ("trainer.cli", "trainer.__main__"):
        return "cli"                                 # the console script dispatches to every command
    return module.split(".")[0]


# layer -> layers it must not import
FORBIDDEN = {
    "models": {"trainer", "experiments", "deploy", "data"},
    "data": {"trainer", "experiments", "models", "deploy"},
    "trainer": {"experiments", "deploy"},          # the training service never needs the tooling
    "deploy": {"experiments", "models", "data"},
}


def _forbidden(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if _layer(d) in FORBIDDEN.get(_layer(m), ()))


def test_layering():
    bad = _forbidden(GRAPH)
    assert not bad, "forbidden imports:\n" + "\n".join(bad)
    # deploy needs only the launcher's argument builder (TorchX builds the torchrun part)
    assert {d for m, deps in GRAPH.items() if m.startswith("deploy") for d in deps
            if d.startswith("trainer")} <= {"trainer.launch"}


def test_layering_check_catches_forbidden_imports():
    """The rule itself: models -> trainer and service -> experiments are reported."""
    graph = dict(GRAPH, **{"models.fm": GRAPH["models.fm"] | {"trainer.config"},
                           "trainer.loop": GRAPH["trainer.loop"] | {"trainer.experiments.plots"}})
    assert _forbidden(graph) == ["models.fm -> trainer.config", "trainer.loop -> trainer.experiments.plots"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_cycle_check_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def test_no_cpp_inside_python():
    bad = [str(p.relative_to(ROOT)) for p in _tracked("*.py")
           if re.search(r"#include\s*<|PYBIND11_MODULE|TORCH_LIBRARY", p.read_text())
           and p.name != "test_layering.py"]
    assert not bad


@pytest.mark.parametrize("pattern", ["*.py", "*.cpp", "*.md", "*.yaml", "*.yml", "Makefile", "Dockerfile"])
def test_no_file_over_the_limit(pattern):
    long = {str(p.relative_to(ROOT)): n for p in _tracked(pattern) if not str(p.relative_to(ROOT)).startswith("reports/")
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


DOC_REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z_]+\.md)\b")


def test_citations_stay_inside_the_repository():
    """No absolute paths or shared/ citations, and every cited *.md is a file of this repository."""
    bad = []
    for p in _tracked("*.py", "*.md", "*.cpp", "*.yaml", "*.toml", "Makefile", "Dockerfile"):
        rel = str(p.relative_to(ROOT))
        if rel.startswith("reports/") or rel == "tests/test_layering.py":
            continue
        text = p.read_text()
        for m in re.finditer(r"\.\./shared\b|/work/|(?<![\w.])shared/(?:data|research|ALGORITHMS|ARCHITECTURE)", text):
            bad.append(f"{rel}: {m.group(0)}")
        for m in DOC_REF.finditer(text):
            ref = m.group(1)
            if not ((ROOT / ref).is_file() or (p.parent / ref).is_file() or (ROOT / "docs" / ref).is_file()):
                bad.append(f"{rel}: cites {ref}, not a file here")
            elif "/" not in ref and not (p.parent / ref).is_file() and (ROOT / "docs" / ref).is_file():
                bad.append(f"{rel}: cites {ref}; write docs/{ref}")
    assert not bad, "\n".join(bad)
