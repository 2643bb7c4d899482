"""Optimizer-state bytes per parameter, measured, and per-GPU memory for 1B and 7B Llama configs.

    python benchmarks/memory.py            # every hfoptim name + peers (about 2-4 minutes on 2 cores)
    python benchmarks/memory.py --quick    # a smoke run: a few names

1. **Measured**: every name of ``hfoptim.list_optimizers()`` steps once on the 6.8M-parameter
   transformer-shaped set of the speed benchmark, on meta copies (shapes and dtypes only: the
   state is laid out as on real tensors, nothing is computed), and the state it holds is measured
   with ``hfoptim.memory.state_bytes`` (every tensor: codes, scales, factors, sign bits, counters,
   Lookahead copies); the names of the per-GPU table are measured on the real fp32 tensors too,
   and the two must agree (a mismatch is printed in the table). The peers (torch AdamW,
   pytorch_optimizer, bitsandbytes 32-bit and 8-bit, torchao low-bit AdamW when importable) are
   measured on the real tensors by walking ``optimizer.state`` (tensor subclasses such as
   torchao's by their inner tensors; torchao's step runs uncompiled here, see
   :func:`uncompiled`). Tensors below 4096 elements keep
   fp32 state in hfoptim and bitsandbytes alike, so the 8-bit numbers include those.
2. **Estimated per GPU**: a Llama-3.2-1B-shaped and a Llama-2-7B-shaped config built from
   ``LlamaConfig`` on the meta device (nothing allocated, nothing downloaded), bf16 mixed
   precision, 8 GPUs, under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (``hfoptim.memory.estimate``:
   parameters, gradients, fp32 master weights and optimizer state; activations not counted).
   Peers' rows use their measured bytes per parameter times the model's parameters.

Writes ``results/memory.json`` and ``results/memory.md`` (``memory_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    MODEL_SHAPES,
    RESULTS_DIR,
    library_versions,
    machine_info,
    machine_line,
    make_params,
    update_report,
    write_json,
)

from hfoptim.models import LLAMA_2_7B  # noqa: E402

GiB = 1024**3
WORLD_SIZE = 8
MIXED_PRECISION = "bf16"
STRATEGIES = ("zero2", "zero3", "fsdp")
STRATEGY_NAMES = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP2"}

#: public shapes (no download): Llama-3.2-1B (tied embedding, GQA) and Llama-2-7B
LLAMA_CONFIGS = {
    "Llama-3.2-1B": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "Llama-2-7B": LLAMA_2_7B,
}

#: names shown in the per-GPU table (the measured table has every name)
ESTIMATE_NAMES = [
    f"{base}{suffix}"
    for base in ("adamw", "ademamix", "adan")
    for suffix in ("", "_bf16", "_8bit", "_factored", "_smmf", "_shared")
] + ["adafactor", "smmf", "amos"]
ESTIMATE_PEERS = (
    "bitsandbytes AdamW8bit",
    "bitsandbytes AdEMAMix8bit",
    "torchao AdamW8bit",
    "torchao AdamW4bit",
)
QUICK_NAMES = ("adamw", "ademamix", "ademamix_8bit", "adan_factored", "adamw_smmf")
QUICK_PEERS = ("torch AdamW", "bitsandbytes AdamW8bit", "bitsandbytes AdEMAMix8bit")


# ---------------------------------------------------------------------------------------- walking
def tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, lists, tuples); a tensor
    subclass that wraps inner tensors (torchao's quantized state) counts those."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def peer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(list(optimizer.state.values()), set())


def hfoptim_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Total bytes and the per-kind breakdown from ``hfoptim.memory.state_bytes`` (falls back to
    walking ``optimizer.state`` where that module is not there)."""
    try:
        from hfoptim.memory import state_bytes
    except ImportError:
        return peer_state_bytes(optimizer), {}
    report = state_bytes(optimizer)
    total = int(report["total"] if isinstance(report, dict) else getattr(report, "total", report))
    kinds = getattr(report, "by_kind", None) or getattr(report, "per_kind", None)
    if kinds is None and isinstance(report, dict):
        kinds = report.get("by_kind") or report.get("per_kind")
    return total, dict(kinds or {})


# ---------------------------------------------------------------------------------------- peers
def peers() -> dict[str, tuple[str, str, object]]:
    """label -> (library, algorithm, factory(params))."""
    out: dict[str, tuple[str, str, object]] = {
        "torch AdamW": ("torch", "adamw", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        "torch Adafactor": ("torch", "adafactor", lambda ps: torch.optim.Adafactor(ps, foreach=True)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pytorch_optimizer as po

            for cls, algorithm in (
                ("AdEMAMix", "ademamix"),
                ("Adan", "adan"),
                ("AdaFactor", "adafactor"),
                ("Lamb", "lamb"),
                ("Amos", "amos"),
            ):
                if hasattr(po, cls):
                    out[f"pytorch_optimizer {cls}"] = ("pytorch_optimizer", algorithm, getattr(po, cls))
        except ImportError:
            pass
        try:
            import bitsandbytes as bnb

            # AdEMAMix 32-bit as AdEMAMix(optim_bits=32): the AdEMAMix32bit class of bitsandbytes
            # 0.50 fails on CPU for 2-D parameters
            for label, cls, options, algorithm in (
                ("AdamW32bit", "AdamW32bit", {}, "adamw"),
                ("AdamW8bit", "AdamW8bit", {}, "adamw"),
                ("AdEMAMix 32-bit", "AdEMAMix", {"optim_bits": 32}, "ademamix"),
                ("AdEMAMix8bit", "AdEMAMix8bit", {}, "ademamix"),
            ):
                factory = partial(getattr(bnb.optim, cls), **options)
                out[f"bitsandbytes {label}"] = ("bitsandbytes", algorithm, factory)
        except ImportError:
            pass
        try:
            from torchao import optim as ao

            for cls in ("AdamW8bit", "AdamW4bit", "AdamWFp8"):
                if hasattr(ao, cls):
                    out[f"torchao {cls}"] = ("torchao", "adamw", getattr(ao, cls))
        except Exception:  # not installed, or built for another torch
            pass
    return out


# ---------------------------------------------------------------------------------------- measuring
def meta_params(shape) -> list[torch.nn.Parameter]:
    """The parameter set on the meta device, each with a meta gradient."""
    out = []
    for s in shape.shapes():
        p = torch.nn.Parameter(torch.empty(s, device="meta"))
        p.grad = torch.empty_like(p)
        out.append(p)
    return out


def measure_names(names: list[str], params: list[torch.nn.Parameter], log) -> list[dict]:
    from hfoptim.registry import get_optimizer

    numel = sum(p.numel() for p in params)
    rows = []
    for i, name in enumerate(names, 1):
        row = {"name": name, "library": "hfoptim", "params": numel}
        try:
            spec = get_optimizer(name)
            options = {"compile": "off"} if "compile" in _engine_options(spec) else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimizer = spec(params, **options)
                if getattr(getattr(optimizer, "rule", None), "needs_loss", False) or _inner_needs_loss(optimizer):
                    optimizer.step(loss=1.0)
                else:
                    optimizer.step()
            total, kinds = hfoptim_state_bytes(optimizer)
            row.update(state_bytes=total, bytes_per_param=total / numel, by_kind=kinds)
            del optimizer
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            log(f"[{i}/{len(names)}] {name}: FAILED {row['error']}")
        rows.append(row)
        if i % 20 == 0:
            log(f"[{i}/{len(names)}] measured")
        gc.collect()
    return rows


def _engine_options(spec) -> set[str]:
    from hfoptim.core.optimizer import engine_hyperparams

    return set(engine_hyperparams(spec.rule))


def _inner_needs_loss(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", None)  # Lookahead
    return bool(getattr(getattr(inner, "rule", None), "needs_loss", False))


@contextlib.contextmanager
def uncompiled():
    """Run code that calls ``torch.compile(fn, ...)(...)`` in its step (torchao's low-bit
    optimizers do, per parameter) with ``fn`` itself. The state it allocates is the same tensor
    subclasses either way; compiling them would cost about 25 seconds per optimizer and shape
    here, for one step whose numbers are not what is measured."""
    with mock.patch.object(torch, "compile", lambda fn, **options: fn):
        yield


def measure_peers(labels: list[str], params: list[torch.nn.Parameter], log) -> list[dict]:
    numel = sum(p.numel() for p in params)
    available = peers()
    rows = []
    for label in labels:
        library, algorithm, factory = available[label]
        row = {"name": label, "library": library, "algorithm": algorithm, "params": numel}
        try:
            with warnings.catch_warnings(), uncompiled() if library == "torchao" else contextlib.nullcontext():
                warnings.simplefilter("ignore")
                optimizer = factory(params)
                optimizer.step()
            total = peer_state_bytes(optimizer)
            row.update(state_bytes=total, bytes_per_param=total / numel)
            del optimizer
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            log(f"{label}: FAILED {row['error']}")
        rows.append(row)
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------- estimate
def llama_on_meta(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_CONFIGS[name])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def trainable(model) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def estimate_rows(model_name: str, names: list[str], peer_bpp: dict[str, float], log) -> list[dict]:
    """Per-GPU bytes under each strategy for each name (hfoptim: estimated by hfoptim.memory
    from the meta model; peers: their measured bytes/param times the parameters)."""
    model = llama_on_meta(model_name)
    params = trainable(model)
    num = sum(p.numel() for p in params)
    rows = []
    for name in names:
        row = {"model": model_name, "name": name, "params": num}
        try:
            state = _state_estimate(params, name)
            row["state_bytes"] = state
            row["per_gpu"] = {s: _split(num, state, s) for s in STRATEGIES}
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            log(f"{model_name} {name}: FAILED {row['error']}")
        rows.append(row)
    for label, bpp in peer_bpp.items():
        state = int(bpp * num)
        per = {s: _split(num, state, s) for s in STRATEGIES}
        rows.append({"model": model_name, "name": label, "params": num, "state_bytes": state, "per_gpu": per})
    return rows


def _state_estimate(params, name: str) -> int:
    """The whole model's state bytes for ``name`` from ``hfoptim.memory.estimate`` (each codec
    asked for the state it would create, on the meta device)."""
    try:
        from hfoptim.memory import estimate
    except ImportError:  # before hfoptim.memory existed: one optimizer step on meta copies
        from hfoptim.memory import estimate

        return estimate(params, name).total
    return int(estimate(params, name).total)


def _as_dict(result) -> dict:
    get = result.get if isinstance(result, dict) else lambda k, d=None: getattr(result, k, d)
    out = {k: int(get(k, 0) or 0) for k in ("params", "grads", "master", "state")}
    out["total"] = int(get("total", 0) or sum(out.values()))
    out["state_total"] = int(get("state_total", 0) or 0)
    return out


def _split(num: int, state_total: int, strategy: str) -> dict:
    """Bytes per GPU under ``strategy`` (:func:`hfoptim.footprint.footprint`: parameters,
    gradients, fp32 master weights and the state divided as DeepSpeed / FSDP2 divide them)."""
    from hfoptim.footprint import footprint

    return _as_dict(footprint("peer", num, state_total, strategy, WORLD_SIZE, MIXED_PRECISION))


# ---------------------------------------------------------------------------------------- output
def _gib(x: int | None) -> str:
    return "" if x is None else f"{x / GiB:.2f}"


def _bpp_table(rows: list[dict], base: float) -> list[str]:
    lines = ["| optimizer | library | state bytes / param | vs torch AdamW |", "|---|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['library']} | failed: {r['error']} | |")
        else:
            bpp = r["bytes_per_param"]
            lines.append(f"| {r['name']} | {r['library']} | {bpp:.3f} | {bpp / base:.2f}x |")
    return lines


def _matrix(rows: list[dict]) -> list[str]:
    """Bytes per parameter, one row per base name, one column per storage form."""
    from hfoptim.registry import ALIASES
    from hfoptim.rules import RULES
    from hfoptim.state.codec import CODECS

    measured = {r["name"]: r for r in rows}
    forms = [f for f in CODECS if f != "fp32"]
    columns = ["", *[f"_{f}" for f in forms], "_lookahead"]
    lines = [
        "| base name | default | " + " | ".join(c.lstrip("_") for c in columns[1:]) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for base in sorted({*RULES, *ALIASES}):
        cells = []
        for suffix in columns:
            r = measured.get(base + suffix)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("failed")
            else:
                cells.append(f"{r['bytes_per_param']:.2f}")
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return lines


def _agreement(rows: list[dict]) -> str:
    checked = [r for r in rows if "real_tensor_state_bytes" in r and "error" not in r]
    wrong = [r["name"] for r in checked if r["real_tensor_state_bytes"] != r["state_bytes"]]
    if wrong:
        return f"MISMATCH with real tensors for {', '.join(wrong)}"
    return f"{len(checked)} of them also on the real tensors: identical bytes"


def markdown(record: dict, level: int = 1, details: bool = False) -> str:
    h, hh = "#" * level, "#" * (level + 1)
    peers_ = record["peers"]
    base = next((r["bytes_per_param"] for r in peers_ if r["name"] == "torch AdamW" and "error" not in r), 8.0)
    lines = [
        f"{h} Optimizer-state memory",
        "",
        f"Machine: {machine_line(record['machine'])}.",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in record['libraries'].items() if v)}.",
        f"Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min).",
        "",
        f"{hh} Measured state bytes per parameter ({record['measured_on']})",
        "",
        "State after one optimizer step; hfoptim measured with `hfoptim.memory.state_bytes` on meta copies "
        f"of the set ({_agreement(record['hfoptim'])}), 8-bit/bf16 forms with `compile='off'` (the stored "
        "state is the same); peers on the real fp32 tensors by walking `optimizer.state`. Tensors under "
        "4096 elements keep fp32 state in hfoptim and bitsandbytes.",
        "",
        "Peers:",
        "",
        *_bpp_table(peers_, base),
        "",
        "hfoptim, every base name by storage form (suffix); modifiers (`_cautious`, `_agc`, ...) add no state:",
        "",
        *_matrix(record["hfoptim"]),
        "",
        "<details><summary>every name</summary>" if details else f"{hh} Every name",
        "",
        *_bpp_table(record["hfoptim"], base),
    ]
    if details:
        lines += ["", "</details>"]
    for model_name in LLAMA_CONFIGS:
        rows = [r for r in record["estimates"] if r["model"] == model_name]
        if not rows:
            continue
        num = rows[0]["params"]
        lines += [
            "",
            f"{hh} {model_name} shapes ({num / 1e9:.2f}B parameters): GiB per GPU on {record['world_size']} GPUs, "
            f"{record['mixed_precision']} mixed precision",
            "",
            "Parameters + gradients + fp32 master weights + optimizer state per GPU (activations, "
            "all-gather and communication buffers not counted). hfoptim rows from `hfoptim.memory.estimate` "
            "on the meta-device model; peer rows: measured bytes/param x parameters.",
            "",
            "| optimizer | state B/param | state, whole model | "
            + " | ".join(f"{STRATEGY_NAMES[s]} state | {STRATEGY_NAMES[s]} total" for s in STRATEGIES)
            + " |",
            "|---|---:|---:|" + "---:|---:|" * len(STRATEGIES),
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | failed: {r['error']} |")
                continue
            cells = []
            for s in STRATEGIES:
                cells += [_gib(r["per_gpu"][s]["state"]), _gib(r["per_gpu"][s]["total"])]
            lines.append(
                f"| {r['name']} | {r['state_bytes'] / r['params']:.2f} | {_gib(r['state_bytes'])} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few names, the 1B estimate only")
    parser.add_argument("--size", default="6M", choices=list(MODEL_SHAPES), help="parameter set measured (6M)")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    return parser


def main(argv: list[str] | None = None) -> int:
    from hfoptim.registry import list_optimizers

    args = build_parser().parse_args(argv)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    shape = MODEL_SHAPES[args.size]
    params = make_params(shape)
    all_names = list_optimizers()
    names = [n for n in QUICK_NAMES if n in all_names] if args.quick else all_names
    available = peers()
    peer_labels = [p for p in (QUICK_PEERS if args.quick else available) if p in available]
    log(f"measuring {len(peer_labels)} peers and {len(names)} hfoptim names on {shape.numel / 1e6:.1f}M parameters")
    peer_rows = measure_peers(peer_labels, params, log)
    # every name on meta copies (shapes and dtypes only: the same state layout, nothing computed),
    # and the names of the per-GPU table on the real tensors as a check
    hf_rows = measure_names(names, meta_params(shape), log)
    checked = [n for n in names if n in ESTIMATE_NAMES]
    real = {r["name"]: r for r in measure_names(checked, params, log)}
    for row in hf_rows:
        if row["name"] in real:
            row["real_tensor_state_bytes"] = real[row["name"]].get("state_bytes")
    del params
    gc.collect()

    peer_bpp = {r["name"]: r["bytes_per_param"] for r in peer_rows if r["name"] in ESTIMATE_PEERS and "error" not in r}
    estimate_names = [n for n in ESTIMATE_NAMES if n in all_names]
    if args.quick:
        estimate_names = [n for n in estimate_names if n in QUICK_NAMES]
    estimates = []
    for model_name in list(LLAMA_CONFIGS)[: 1 if args.quick else None]:
        log(f"estimating {model_name} ({len(estimate_names)} names)")
        estimates += estimate_rows(model_name, estimate_names, peer_bpp, log)

    command = "python benchmarks/memory.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    record = {
        "machine": machine_info(),
        "libraries": library_versions(),
        "command": command.strip(),
        "measured_on": f"{shape.numel / 1e6:.1f}M-parameter transformer-shaped set",
        "world_size": WORLD_SIZE,
        "mixed_precision": MIXED_PRECISION,
        "elapsed_s": time.perf_counter() - started,
        "peers": peer_rows,
        "hfoptim": hf_rows,
        "estimates": estimates,
    }
    out = Path(args.output_dir)
    stem = "memory_quick" if args.quick else "memory"
    write_json(out / f"{stem}.json", record)
    text = markdown(record)
    (out / f"{stem}.md").write_text(text)
    if not args.quick and out.resolve() == RESULTS_DIR.resolve():
        if update_report("memory", markdown(record, level=3, details=True)):
            log("updated the memory section of BENCHMARKS.md")
    print(text)
    log(f"wrote {out / stem}.json/.md in {record['elapsed_s'] / 60:.1f} min")
    failed = [row["name"] for row in hf_rows if "error" in row]
    if failed:  # recorded above with their errors; a run that lost names must not pass for complete
        log(f"{len(failed)} of {len(hf_rows)} hfoptim names failed: {', '.join(failed[:10])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
