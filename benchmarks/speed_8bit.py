"""8-bit optimizer step time, as ratios to torch AdamW (foreach) measured in the same process.

    python benchmarks/speed_8bit.py                # about 3 minutes on 2 quiet cores
    python benchmarks/speed_8bit.py --quick        # fewer rounds, no unaligned set
    python benchmarks/speed_8bit.py --threads 2    # both cores (noisy when the machine is shared)

Candidates: torch AdamW (fused), hfoptim ``adamw`` (fp32 state), ``adamw_8bit`` and
``ademamix_8bit`` on the compiled path (the default, ``compile="auto"``), ``adamw_8bit`` also on
the plain path (``compile="off"``), bitsandbytes ``AdamW8bit`` / ``AdEMAMix8bit`` and torchao ``AdamW8bit``
when installed. Every candidate steps its own copy of a transformer-shaped fp32 parameter set
with a fixed gradient (default hyperparameters, lr 1e-3); rounds interleave the candidates with
the torch AdamW foreach baseline (``_timing.interleaved``); the ratio is the median over rounds
of candidate time / baseline time in the same round. "first step" includes compilation
(hfoptim: one kernel per distinct parameter shape; torchao: one per parameter).

Two parameter sets: ``23M`` (Llama layout, every row a multiple of 256 elements, as in most real
models) and ``23M-odd`` (intermediate size 1376: the down-projection rows end in a short block,
which the 8-bit compiled path leaves to the plain path -- see ``hfoptim.core.fused``).

Writes ``results/speed_8bit.md`` and ``results/speed_8bit.json`` (``speed_8bit_quick.*`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RESULTS_DIR,
    ModelShape,
    interleaved,
    library_versions,
    machine_info,
    machine_line,
    make_params,
    update_report,
    write_json,
)

SETS = {
    "23M": ModelShape("23M", vocab=10240, hidden=512, layers=6, intermediate=1280),
    "23M-odd": ModelShape("23M-odd", vocab=8192, hidden=512, layers=6, intermediate=1376),
}
LR = 1e-3


def candidates() -> dict:
    """name -> builder(params) for every optimizer that can be built here."""
    import hfoptim

    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True),
        "hfoptim adamw (fp32 state)": lambda ps: hfoptim.create_optimizer(ps, "adamw", lr=LR),
        "hfoptim adamw_8bit": lambda ps: hfoptim.create_optimizer(ps, "adamw_8bit", lr=LR),
        "hfoptim adamw_8bit plain": lambda ps: hfoptim.create_optimizer(ps, "adamw_8bit", lr=LR, compile="off"),
        "hfoptim ademamix_8bit": lambda ps: hfoptim.create_optimizer(ps, "ademamix_8bit", lr=LR),
    }
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=LR)
        out["bitsandbytes AdEMAMix8bit"] = lambda ps: bnb.optim.AdEMAMix8bit(ps, lr=LR)
    except Exception as error:  # pragma: no cover - optional peer
        print(f"bitsandbytes unavailable: {error}")
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit

        out["torchao AdamW8bit"] = lambda ps: TorchaoAdamW8bit(ps, lr=LR)
    except Exception as error:  # pragma: no cover - optional peer
        print(f"torchao unavailable: {error}")
    return out


def bytes_per_param(opt) -> float | None:
    try:
        from hfoptim.memory import state_bytes

        return state_bytes(opt).per_param
    except Exception:
        return None


def measure(shape: ModelShape, names: dict, rounds: int, target: float) -> list[dict]:
    baseline = torch.optim.AdamW(make_params(shape), lr=LR, foreach=True)
    fused = torch.optim.AdamW(make_params(shape), lr=LR, fused=True)
    baseline.step(), fused.step()
    rows = []
    for name, build in names.items():
        params = make_params(shape)
        opt = build(params)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        first = time.perf_counter() - start
        opt.step()
        timing = interleaved(opt.step, {"foreach": baseline.step, "fused": fused.step}, rounds, target)
        low, high = timing.spread("foreach")
        rows.append(
            {
                "set": shape.label,
                "params_M": round(shape.numel / 1e6, 2),
                "name": name,
                "ms": round(timing.median_seconds() * 1e3, 1),
                "ratio_foreach": round(timing.ratio("foreach"), 2),
                "ratio_spread": [round(low, 2), round(high, 2)],
                "ratio_fused": round(timing.ratio("fused"), 2),
                "first_step_s": round(first, 1),
                "bytes_per_param": None if (b := bytes_per_param(opt)) is None else round(b, 3),
            }
        )
        r = rows[-1]
        print(
            f"  {name:30s} {r['ms']:8.1f} ms  x{r['ratio_foreach']:5.2f} foreach "
            f"({low:.2f}-{high:.2f})  x{r['ratio_fused']:5.2f} fused  first {first:6.1f} s  "
            f"{r['bytes_per_param']} B/param",
            flush=True,
        )
        del opt, params
        gc.collect()
    return rows


def markdown(rows: list[dict], info: dict, command: str, level: int = 1, minutes: float | None = None) -> str:
    took = f" ({minutes:.1f} min)" if minutes is not None else ""
    lines = [
        "#" * level + " 8-bit optimizer step time",
        "",
        f"Machine: {machine_line(info)}.",
        f"Command: `{command}`{took}",
        "",
        "Ratios are medians over interleaved rounds of (candidate step time / torch AdamW foreach step "
        "time in the same round); the spread is the range over rounds. Absolute milliseconds move with "
        'the machine\'s load, ratios much less. "first step" includes compilation.',
        "",
    ]
    for label in dict.fromkeys(r["set"] for r in rows):
        part = [r for r in rows if r["set"] == label]
        lines += [
            "#" * (level + 1) + f" {label} ({part[0]['params_M']}M parameters, {SETS[label].shapes()[1]}... "
            f"intermediate {SETS[label].intermediate})",
            "",
            "| optimizer | ms/step | x torch AdamW foreach | (spread) | x torch AdamW fused | first step s "
            "| state B/param |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in part:
            lines.append(
                f"| {r['name']} | {r['ms']} | **{r['ratio_foreach']}** | {r['ratio_spread'][0]}-"
                f"{r['ratio_spread'][1]} | {r['ratio_fused']} | {r['first_step_s']} | {r['bytes_per_param']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable ratios)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.3, help="seconds per timed block")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sets", nargs="*", default=None, choices=list(SETS))
    parser.add_argument("--only", default=None, help="measure only candidates whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = args.sets or (["23M"] if args.quick else list(SETS))
    rounds = 3 if args.quick else args.rounds
    started = time.perf_counter()
    info = machine_info()
    print(machine_line(info), flush=True)
    names = candidates()
    if args.only:
        names = {k: v for k, v in names.items() if args.only in k}
    rows = []
    for label in sets:
        print(f"{label}: {SETS[label].numel / 1e6:.1f}M parameters", flush=True)
        rows += measure(SETS[label], names, rounds, args.target)
    command = "python benchmarks/speed_8bit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = "speed_8bit_quick" if args.quick else "speed_8bit"
    elapsed = time.perf_counter() - started
    text = markdown(rows, info, command.strip(), minutes=elapsed / 60)
    (RESULTS_DIR / f"{stem}.md").write_text(text + "\n")
    record = {"machine": info, "libraries": library_versions(), "elapsed_s": elapsed, "rows": rows}
    write_json(RESULTS_DIR / f"{stem}.json", record)
    report = markdown(rows, info, command.strip(), level=3, minutes=elapsed / 60)
    if not args.quick and not args.only and update_report("speed_8bit", report):
        print("updated the speed_8bit section of BENCHMARKS.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
