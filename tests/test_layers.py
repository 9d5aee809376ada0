"""The import structure: no cycles among lorakit's modules, and the lower layers (storage, the
primitive, the family tables, LoRA naming) never import the commands built on them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lorakit": ROOT / "lorakit", "lorakit.kernels": ROOT / "kernels"}
LOWER = ("lorakit.io", "lorakit.ops", "lorakit.arch", "lorakit.formats", "lorakit.codecs", "lorakit.kernels")
UPPER = ("lorakit.planner", "lorakit.engine", "lorakit.merge", "lorakit.patching", "lorakit.check", "lorakit.cli",
         "lorakit.sampler", "lorakit.workflow")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """lorakit modules ``name`` imports, anywhere in the file (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(n) == 1 and not m.startswith(n + "."):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_lower_layers_do_not_import_commands() -> None:
    bad = [(m, n) for m, deps in _graph().items() if m.startswith(LOWER) for n in deps if n.startswith(UPPER)]
    assert bad == []


def test_public_names_are_the_functions_not_modules() -> None:
    """No public name is hidden by a submodule of the same name (lorakit.plan once was)."""
    import lorakit
    import lorakit.merge  # noqa: F401
    import lorakit.patching  # noqa: F401
    import lorakit.planner  # noqa: F401

    for name in ("patch", "plan", "merge_file", "load_lora", "LoraSpec", "parse_lora_arg", "lowrank_update_"):
        assert callable(getattr(lorakit, name)), name


def test_import_and_the_command_line_start_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, lorakit, lorakit.cli; from lorakit._entry import main; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for args in (["--version"], ["--help"], ["merge", "--help"]):
        res = subprocess.run([sys.executable, "-c", "import sys; sys.argv[1:] = " + repr(args) +
                              "; from lorakit._entry import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
                              "assert 'torch' not in sys.modules, 'torch imported'"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (args, res.stderr)
