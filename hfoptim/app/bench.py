"""Run the benchmark scripts of a checkout, each in its own process.

    python -m hfoptim.app.bench --list            the benchmarks it runs (what `make bench` runs)
    python -m hfoptim.app.bench                   all of them
    python -m hfoptim.app.bench memory -- --quick one, with arguments after '--' passed to it

A benchmark is every ``benchmarks/*.py`` not starting with ``_`` (those are helpers).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

from ..console import print_table


def default_bench_dir() -> Path:
    """``./benchmarks`` when run from a checkout, else the one next to the installed package."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "benchmarks"


def discover_benchmarks(folder: Path) -> dict[str, Path]:
    """Benchmark scripts: ``*.py`` files in ``folder`` not starting with ``_`` (helpers)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def _describe(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (SyntaxError, OSError):
        doc = None
    return (doc or "").strip().splitlines()[0] if doc else ""


def run_benchmarks(args: argparse.Namespace, extra: list[str]) -> int:
    folder = Path(args.dir) if args.dir else default_bench_dir()
    found = discover_benchmarks(folder)
    if not found:
        print(f"no benchmark scripts in {folder}", file=sys.stderr)
        return 1
    if args.list:
        print_table(
            ["benchmark", "what it measures"],
            [[k, _describe(v)] for k, v in found.items()],
            title=f"benchmarks in {folder}",
            align="ll",
        )
        return 0
    chosen = args.names or list(found)
    unknown = [n for n in chosen if n not in found]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(found)}", file=sys.stderr)
        return 2
    results = []
    for i, name in enumerate(chosen, 1):
        cmd = [sys.executable, str(found[name]), *extra]
        print(f"[{i}/{len(chosen)}] {' '.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, cwd=folder.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        results.append([name, "ok" if rc == 0 else f"failed (exit {rc})", f"{time.perf_counter() - start:.1f} s"])
        if rc != 0 and args.fail_fast:
            break
    print_table(["benchmark", "result", "time"], results, title="hfoptim benchmarks", align="llr")
    return 0 if all(r[1] == "ok" for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hfoptim.app.bench",
        description="Run benchmark scripts (every benchmarks/*.py not starting with '_', or the NAMEs given), "
        "each in its own process; arguments after '--' are passed to every script.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m hfoptim.app.bench --list\n  python -m hfoptim.app.bench\n"
        "  python -m hfoptim.app.bench memory -- --quick",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dir", help="folder of benchmark scripts (default: ./benchmarks)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after "--" goes to the benchmark scripts
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    return run_benchmarks(build_parser().parse_args(argv), extra)


if __name__ == "__main__":
    sys.exit(main())
