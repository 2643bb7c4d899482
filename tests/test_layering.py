"""The package imports only downward: every import of an hfoptim module, at module level or inside
a function, goes to the same layer or a lower one, and the imports form no circle. There is no
list of exceptions. Lazy imports of optional third-party packages (transformers, deepspeed) are
not looked at; a lazy import of one of hfoptim's own upper layers fails here like any other.

The layers, bottom first, are defined once, in :data:`LAYERS`; docs/DESIGN.md draws the same
picture (checked below).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hfoptim"

#: (layer, the modules and packages it holds), bottom first. A package name holds its submodules;
#: the root package ``hfoptim`` (the public facade) holds only its ``__init__``.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundation",
        [
            "hfoptim.core",  # the package's __init__ (imports nothing)
            "hfoptim.core.tracing",
            "hfoptim.core.kernel_build",
            "hfoptim.core.tensorlist",
            "hfoptim.core.hparams",
            "hfoptim.core.stats",
            "hfoptim.core.param_layout",
            "hfoptim.core.rule",
            "hfoptim.core.context",
            "hfoptim.roles",
        ],
    ),
    ("parts", ["hfoptim.rules", "hfoptim.state", "hfoptim.modifiers"]),
    (
        "optimizer",
        [
            "hfoptim.core.layout",
            "hfoptim.core.step",
            "hfoptim.core.compiled_step",
            "hfoptim.core.chunking",
            "hfoptim.core.uncut",
            "hfoptim.core.optimizer",
            "hfoptim.optimizers",
            "hfoptim.lookahead",
            "hfoptim.registry",
            "hfoptim.convert",
            "hfoptim.models",
            "hfoptim.memory",
            "hfoptim.footprint",
        ],
    ),
    ("distributed", ["hfoptim.distributed"]),
    ("integrations", ["hfoptim.integrations"]),
    ("package", ["hfoptim"]),
    ("application", ["hfoptim.app", "hfoptim.cli", "hfoptim.console"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the longest entry holding ``module``; None when none does."""
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            holds = module == entry or (entry != "hfoptim" and module.startswith(entry + "."))
            if entry == "hfoptim.app":  # hfoptim.app, hfoptim.app_*, hfoptim.application...
                holds = module.startswith("hfoptim.app")
            if holds and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The hfoptim modules ``module`` imports anywhere in its file, with the line of each import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules and "." in target:  # `import hfoptim.x.y` as names
                target = target.rpartition(".")[0]
            if target in modules and target != module:
                out.append((target, node.lineno))
    return sorted(set(out))


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    missing = [name for name in all_modules() if layer_of(name) is None]
    assert not missing, f"modules in no layer: {missing}; add each to LAYERS in tests/test_layering.py"


def test_no_module_imports_an_upper_layer():
    upward = []
    for module, imports in import_graph().items():
        mine = layer_of(module)
        for target, line in imports:
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(
                    f"{module} (layer {LAYERS[mine][0]}) imports {target} (layer {LAYERS[theirs][0]}) at line {line}"
                )
    assert not upward, "\n".join(upward)


def test_the_imports_form_no_circle():
    """Within a layer too: a function-level import cannot hide a circle."""
    graph = {module: sorted({target for target, _ in imports}) for module, imports in import_graph().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in graph[module]:
            cycle = visit(target, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in graph:
        cycle = visit(module, [])
        assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_function_level_and_upward_imports(tmp_path):
    """The walk finds an import inside a function and resolves relative names to modules."""
    modules = {"hfoptim.core.layout": tmp_path / "layout.py", "hfoptim.distributed.select": tmp_path / "select.py"}
    modules["hfoptim.core.layout"].write_text(
        "def f():\n    from ..distributed.select import layout_for_step\n    return layout_for_step\n"
    )
    found = imported_modules("hfoptim.core.layout", modules["hfoptim.core.layout"], modules)
    assert found == [("hfoptim.distributed.select", 2)]
    assert layer_of("hfoptim.distributed.select") > layer_of("hfoptim.core.layout")


def test_the_design_document_draws_the_same_layers():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text[text.index("## Layers") :]
    positions = [section.find(f"**{name}**") for name, _ in LAYERS]
    assert all(p >= 0 for p in positions), [name for (name, _), p in zip(LAYERS, positions) if p < 0]
    # drawn as a stack: the top layer first
    assert positions == sorted(positions, reverse=True), "docs/DESIGN.md stacks the layers in another order than LAYERS"
