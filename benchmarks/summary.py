"""The headline table: state bytes, step time and final loss of the main optimizers, from the
results the other benchmarks wrote, into the README.

    python benchmarks/summary.py          # after memory.py, quality.py and speed.py (a second)

Reads ``results/memory.json`` (bytes per parameter on the 6.8M set), ``results/speed.json``
(ratio to torch AdamW foreach on the 25M and 100M sets: the default path, and in brackets the
plain path, ``compile="off"``, where it was timed too) and the quality results (final
validation loss, mean and standard deviation over seeds, and the paired difference to the fp32
twin): ``results/quality_study.json`` (each optimizer at its own best lr, ``quality.py --study``)
when it exists, ``results/quality.json`` (one lr for all) otherwise; and rewrites the part of
``README.md`` between ``<!-- headline:begin -->`` and ``<!-- headline:end -->``. ``make bench``
runs it last (scripts run in name order). A result file that is missing leaves its column empty;
results from different commits are named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS_DIR, allocator_of, flags_text, update_report  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"

#: the rows; each is looked up by its label in every result file, but for the baseline's labels
ROWS = [
    "torch AdamW (foreach)",
    "torch AdamW fused",
    "torch AdamW compiled",
    *(f"{base}{form}" for base in ("adamw",) for form in ("", "_8bit", "_factored", "_smmf", "_shared")),
    *(f"{base}{form}" for base in ("ademamix", "adan") for form in ("", "_8bit")),
    "adafactor",
    "lamb",
    "adam_atan2",
    "diffgrad",
    "pytorch_optimizer AdEMAMix",
    "pytorch_optimizer Adan",
    "pytorch_optimizer AdaFactor",
    "torch Adafactor foreach",
    "pytorch_optimizer Lamb",
    "pytorch_optimizer DiffGrad",
    "bitsandbytes AdamW8bit",
    "bitsandbytes AdEMAMix8bit",
    "torchao AdamW8bit",
]
#: the plain path's label in the speed results (hfoptim names timed with ``compile="off"`` too)
PLAIN = " compile=off"
SPEED_LABEL = {"torch AdamW (foreach)": "torch AdamW foreach"}
MEMORY_NAME = {"torch AdamW (foreach)": "torch AdamW"}


def _load(folder: Path, stem: str) -> dict | None:
    path = folder / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(folder: Path = RESULTS_DIR) -> str:
    speed, memory = _load(folder, "speed"), _load(folder, "memory")
    tuned = _load(folder, "quality_study")
    quality = tuned or _load(folder, "quality")
    rows = (speed or {}).get("rows", [])
    ratio = {(r["size"], r["label"]): r["ratio_foreach"] for r in rows if r.get("ratio_foreach")}
    measured = (memory or {}).get("hfoptim", []) + (memory or {}).get("peers", [])
    bpp = {r["name"]: r["bytes_per_param"] for r in measured if "bytes_per_param" in r}  # not the failed ones
    summary = {r["name"]: r for r in (quality or {}).get("summary", []) if "final_mean" in r}
    seeds = len((quality or {}).get("seeds", []))
    lines = [
        f"| optimizer | state bytes / param | step time, 24M set (plain path) | step time, 95M set (plain path) "
        f"| final val loss ({seeds} seeds" + (", each at its best lr" if tuned else "") + ") | vs fp32 twin |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in ROWS:
        memory_name = MEMORY_NAME.get(label, label)
        cells = [f"{bpp[memory_name]:.2f}" if memory_name in bpp else ""]
        for size in ("25M", "100M"):
            r = ratio.get((size, SPEED_LABEL.get(label, label)))
            plain = ratio.get((size, label + PLAIN))
            cells.append(("" if r is None else f"{r:.2f}x") + ("" if plain is None else f" ({plain:.2f}x)"))
        q = summary.get(label)
        cells.append(f"{q['final_mean']:.3f} ± {q['final_std']:.3f}" if q else "")
        cells.append(f"{100 * q['vs_twin']:+.1f}%" if q and "vs_twin" in q else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    runs = {name: rec["machine"] for name, rec in (("memory", memory), ("speed", speed), ("quality", quality)) if rec}
    commits = sorted({m["git_commit"] for m in runs.values()})
    # a CPU is its model and its vector extensions (one model name covers EPYCs with and without
    # AVX-512); a record from before the extensions were recorded counts as a CPU of its own
    cpu_of = {
        k: (m["cpu"], None if m.get("vector_flags") is None else tuple(m["vector_flags"])) for k, m in runs.items()
    }
    machine = next(iter(runs.values()), None)
    if machine and len(set(cpu_of.values())) > 1:  # different machines: each column names its own
        named = []
        for k, m in runs.items():  # the flags at a CPU's first mention, "the same CPU" after
            first = next(j for j in runs if cpu_of[j] == cpu_of[k])
            cpu = f"{m['cpu']}{flags_text(m)}" if first == k else f"the same CPU as {first}"
            named.append(
                f"{k} on {cpu} ({m['cores']} cores, torch {m['torch']}, hfoptim {m['git_commit']}, "
                f"load {m.get('load_average_1_5_15', [0])[0]:.1f}{_heap(m)})"
            )
        lines += ["", "Machines: " + "; ".join(named) + "."]
    elif machine:
        lines += [
            "",
            f"Machine: {machine['cpu']}{flags_text(machine)}, {machine['cores']} cores, "
            f"torch {machine['torch']}; hfoptim "
            + (commits[0] if len(commits) == 1 else ", ".join(f"{k} {m['git_commit']}" for k, m in runs.items()))
            + f"; {statistics.mean(m.get('load_average_1_5_15', [0])[0] for m in runs.values()):.1f} mean load"
            + ("; speed with a steady allocator." if speed and _heap(speed["machine"]) else "."),
        ]
    return "\n".join(lines)


def _heap(machine: dict) -> str:
    """ ", steady allocator" for a run with glibc's thresholds raised (speed.py's default)."""
    return ", steady allocator" if allocator_of(machine.get("malloc_env") or {}) == "steady" else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="print the table without touching the README")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if not args.quick and update_report("headline", text, report=README):
        print("updated the headline table in README.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
