"""The application (``hfoptim.app``) apart from the library: nothing in the library imports it,
each side's third-party imports are what pyproject.toml declares for it, a missing optional
package names the extra to install, and the benchmark runner discovers, runs and reports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib

import hfoptim
from hfoptim.app import INSTALL, bench, require

PACKAGE = Path(hfoptim.__file__).resolve().parent
APP = PACKAGE / "app"
PYPROJECT = PACKAGE.parent / "pyproject.toml"
#: imported by the library only where the user's accelerate config asks for DeepSpeed (its extra)
OPTIONAL_INTEGRATIONS = {"deepspeed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved; ``from a import b`` gives a and a.b)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if APP not in p.parents]


def third_party(paths: list[Path]) -> set[str]:
    tops = {m.split(".")[0] for p in paths for m in imported_modules(p)}
    return {t for t in tops if t and t not in sys.stdlib_module_names and t != "hfoptim"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_the_library_never_imports_the_application():
    upward = {
        f"{module_name(p)} imports {m}"
        for p in library_files()
        for m in imported_modules(p)
        if m == "hfoptim.app" or m.startswith("hfoptim.app.")
    }
    assert library_files() and not upward


def test_dependencies_are_what_each_side_imports():
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    hard = requirement_names(project["dependencies"])
    app_extra = requirement_names(project["optional-dependencies"]["app"])
    library = third_party(library_files())
    assert library - OPTIONAL_INTEGRATIONS == hard  # nothing missing, nothing installed for no import
    application = third_party(list(APP.rglob("*.py")))
    assert application - hard == app_extra
    extras = project["optional-dependencies"]
    assert "hfoptim[app]" in extras["recipes"] and "peft" in requirement_names(extras["recipes"])  # LoRA
    assert "hfoptim[app,recipes]" in extras["dev"]  # `make setup`: the demo and every test can run


def test_a_missing_package_names_the_extra(monkeypatch):
    assert require("json", "reading JSON").loads("1") == 1
    with pytest.raises(ModuleNotFoundError, match=re.escape(INSTALL)):
        require("hfoptim_no_such_package", "this test")
    from hfoptim.app import corpus, demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"the demo's loss-curve plot needs the package 'matplotlib'.*app\]"):
        demo.plot([], Path("unused.png"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ModuleNotFoundError, match=r"'tokenizers'.*pip install 'hfoptim\[app\]'"):
        corpus.train_tokenizer(["text"])


def test_llama_2_7b_has_the_public_parameter_count():
    from transformers import LlamaConfig

    from hfoptim.models import LLAMA_2_7B, model_from_config

    model = model_from_config(LlamaConfig(**LLAMA_2_7B), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616


# ---------------------------------------------------------------------------------------- bench
def test_bench_discovers_and_runs_scripts(capsys, tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "ok.py").write_text('"""Says hello."""\nimport sys\nprint("hello", sys.argv[1:])\n')
    (folder / "bad.py").write_text('"""Fails."""\nraise SystemExit(3)\n')
    (folder / "_helper.py").write_text("x = 1\n")
    assert set(bench.discover_benchmarks(folder)) == {"ok", "bad"}
    assert bench.main(["--dir", str(folder), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "Says hello." in listing and "_helper" not in listing
    assert bench.main(["--dir", str(folder), "ok", "--", "--quick"]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    assert bench.main(["--dir", str(folder)]) == 1
    assert "failed (exit 3)" in capsys.readouterr().out
    assert bench.main(["--dir", str(folder), "nope"]) == 2


def test_bench_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m hfoptim.app.bench" in text and "examples:" in text
