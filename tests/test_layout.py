"""The package layout's import rules, read from the source (no module is imported).

* ``dse.core`` imports nothing else of ``dse``;
* ``dse.deploy`` never imports ``dse.search`` or ``dse.training``, except ``dse.deploy.export``,
  which reads studies;
* ``dse.search`` and ``dse.training`` stand on ``dse.core`` only (and never on each other);
* no import cycle between modules.

Run ``python tests/test_layout.py`` to print the import picture (package -> packages it imports).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "search", "deploy", "training")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def dse_imports(path: Path) -> set[str]:
    """Every ``dse`` module ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "dse" or a.name.startswith("dse."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "dse" or base.startswith("dse."):
                for a in node.names:  # ``from dse.core import models`` imports dse.core.models
                    candidate = f"{base}.{a.name}"
                    out.add(candidate if module_path(candidate) else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            pass  # the packages' lazy __init__ re-exports: checked through their _WHERE tables below
    if path.name == "__init__.py":
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for v in node.values:
                    if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value.startswith("dse."):
                        out.add(v.value)
    return out


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def package_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "cli"


def graph() -> dict[str, set[str]]:
    return {module_name(p): {m for m in dse_imports(p) if module_path(m)}
            for p in sorted((ROOT / "dse").rglob("*.py"))}


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        pkg = package_of(mod)
        for dep in sorted(deps):
            dpkg = package_of(dep)
            if dep == "dse":
                continue
            if pkg == "core" and dpkg != "core":
                bad.append(f"{mod} -> {dep}: dse.core imports nothing else of dse")
            elif pkg == "deploy" and dpkg in ("search", "training") and mod != "dse.deploy.export":
                bad.append(f"{mod} -> {dep}: dse.deploy (but export) never imports search or training")
            elif pkg in ("search", "training") and dpkg not in ("core", pkg):
                bad.append(f"{mod} -> {dep}: dse.{pkg} stands on dse.core only")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (a package's lazy ``__init__`` is not a module dependency)."""
    packages = {"dse", *(f"dse.{p}" for p in PACKAGES)}
    edges = {m: {d for d in deps if d not in packages} for m, deps in g.items()}
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in edges:
        if m not in state:
            visit(m)
    return found


def picture(g: dict[str, set[str]]) -> str:
    pkgs: dict[str, set[str]] = {}
    for mod, deps in g.items():
        pkgs.setdefault(package_of(mod), set()).update(package_of(d) for d in deps if d != "dse")
    return "\n".join(f"{p:>8} -> {', '.join(sorted(d - {p})) or '(nothing else of dse)'}"
                     for p, d in sorted(pkgs.items()))


def test_core_stands_on_nothing_and_deploy_never_reaches_search_or_training():
    assert violations(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_rules_fire_on_a_bad_import():
    g = {"dse.core.build": {"dse.search.study"}, "dse.deploy.runtime": {"dse.training.train"},
         "dse.deploy.export": {"dse.search.storage"}, "dse.search.adapt": {"dse.training.train"}}
    assert len(violations(g)) == 3  # export may read studies
    assert cycles({"dse.core.a": {"dse.core.b"}, "dse.core.b": {"dse.core.a"}}) == [["dse.core.a", "dse.core.b",
                                                                                     "dse.core.a"]]


if __name__ == "__main__":
    g = graph()
    print(picture(g))
    for v in violations(g):
        print("violation:", v)
    for c in cycles(g):
        print("cycle:", " -> ".join(c))
    sys.exit(1 if violations(g) or cycles(g) else 0)
