"""The ``hfoptim`` command: list the optimizers and predict their memory.

hfoptim list                        every optimizer name, its state bytes per parameter
hfoptim memory MODEL --optim NAME   per-device memory for a model config, next to AdamW

(The benchmark runner belongs to the application: ``python -m hfoptim.app.bench``.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .console import format_bytes, print_table, progress, status

BASELINE = "adamw"

EPILOG = """\
examples:
  hfoptim list                                   all names with state bytes per parameter
  hfoptim list '*8bit'                           only the 8-bit ones
  hfoptim memory tiny-llama --optim ademamix_8bit --measure
  hfoptim memory meta-llama/Llama-3.1-8B --optim adan_8bit --zero 2 --world-size 8 --mixed-precision bf16
  hfoptim memory ./my-model --optim adamw_factored --fsdp --world-size 4

the application (pip install 'hfoptim[app]'): python -m hfoptim.app.demo, python -m hfoptim.app.bench
"""


# ---------------------------------------------------------------------------------------- list
def sharding_support(name: str) -> str:
    """The sharding backends that run ``name`` exactly (:func:`hfoptim.distributed.sharding_support`),
    a backend with a condition marked ``*`` (e.g. ``zero2*``: stable weight decay needs one
    parameter group)."""
    from .distributed import sharding_support as reported

    return ", ".join(backend if ok is True else f"{backend}*" for backend, ok in reported(name).items())


def cmd_list(args: argparse.Namespace) -> int:
    from .memory import per_param as state_bytes_per_param
    from .registry import get_optimizer, list_optimizers

    names = list_optimizers(args.pattern)
    if not names:
        print(f"no optimizer matches {args.pattern!r}; try `hfoptim list` for all names", file=sys.stderr)
        return 1
    shape = _parse_shape(args.shape)
    baseline = state_bytes_per_param(BASELINE, shape)
    rows, records = [], []
    for name in progress(names, desc="measuring state", disable=len(names) < 20):
        spec = get_optimizer(name)
        try:
            per_param = state_bytes_per_param(name, shape)
            bpp, ratio = f"{per_param:.3f}", f"{per_param / baseline:.2f}x"
        except Exception as error:  # an optimizer that cannot step on meta tensors
            per_param, bpp, ratio = None, "?", f"({type(error).__name__})"
        support = sharding_support(name)
        rows.append([name, spec.optimizer_class.__name__, bpp, ratio, support])
        records.append(
            {
                "name": name,
                "class": spec.optimizer_class.__name__,
                "state_bytes_per_param": per_param,
                "sharding": support,
            }
        )
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    shape_text = "x".join(map(str, shape))
    print_table(
        ["name", "class", "state B/param", f"vs {BASELINE}", "sharding"],
        rows,
        title=f"hfoptim optimizers ({len(names)} names)",
        caption=f"state bytes per parameter for one {shape_text} tensor; suffixes combine (adan_cautious_8bit); "
        f"sharding: the backends that run it exactly, * with a condition (hfoptim.distributed.sharding_support)",
        align="llrrl",
    )
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape must look like 4096x4096, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise SystemExit(f"--shape needs positive sizes, got {text!r}")
    return shape


# ---------------------------------------------------------------------------------------- memory
def _strategy(args: argparse.Namespace) -> str:
    if args.fsdp:
        return "fsdp"
    if args.zero:
        return f"zero{args.zero}"
    return "ddp"


STRATEGY_NAMES = {
    "ddp": "no sharding (DDP / one device)",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp": "FSDP2",
}


def parse_options(text: str | None) -> dict:
    """``"lr=1e-3,betas=(0.9,0.99)"`` -> dict, values read as Python literals where possible."""
    import ast

    if not text:
        return {}
    out, depth, current = {}, 0, ""
    pieces = []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            pieces.append(current)
            current = ""
        else:
            current += ch
    pieces.append(current)
    for piece in pieces:
        if not piece.strip():
            continue
        key, sep, value = piece.partition("=")
        if not sep:
            raise SystemExit(f"--optim-args entries look like key=value, got {piece!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _check_options(spec, options: dict) -> None:
    """Build the optimizer once on a one-element parameter: a bad ``--optim-args`` value ends the
    command with the optimizer's own message, one line, instead of failing inside the estimate."""
    import torch

    from .core.hparams import HyperparameterError

    try:
        spec([torch.nn.Parameter(torch.zeros(1))], **options)
    except (HyperparameterError, TypeError, ValueError) as error:
        raise SystemExit(f"--optim-args: {error}") from None


def cmd_memory(args: argparse.Namespace) -> int:
    from .footprint import compare, model_on_meta
    from .registry import get_optimizer

    try:
        spec = get_optimizer(args.optim)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    options = parse_options(args.optim_args)
    _check_options(spec, options)
    strategy = _strategy(args)
    with status(f"building {args.model} on the meta device"):
        try:
            model = model_on_meta(args.model, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"cannot read a model config from {args.model!r}: {error}\n"
                "MODEL is 'tiny-llama', a local folder with a config.json, or a hub name (needs network or cache)"
            ) from None
    names = [args.optim] if args.optim == args.baseline else [args.optim, args.baseline]
    with status("estimating optimizer state"):
        results = compare(model, names, strategy, args.world_size, args.mixed_precision, options)
    num = results[0].num_params
    measured = _measure(args, options) if args.measure else None

    if args.json:
        out = {
            "model": args.model,
            "trainable_params": num,
            "strategy": strategy,
            "world_size": args.world_size,
            "mixed_precision": args.mixed_precision,
            "per_device": {
                f.optim: {
                    "params": f.params,
                    "grads": f.grads,
                    "grad_partition": f.grad_partition,
                    "master": f.master,
                    "state": f.state,
                    "gathered": f.gathered,
                    "total": f.total,
                    "state_total": f.state_total,
                    "state_bytes_per_param": f.state_per_param,
                }
                for f in results
            },
        }
        if measured is not None:
            out["measured"] = measured
        print(json.dumps(out, indent=2))
        return 0

    rows = []
    for label, attr in (
        ("parameters", "params"),
        ("gradients", "grads"),
        ("fp32 gradient partition", "grad_partition"),
        ("fp32 master weights", "master"),
        ("optimizer state", "state"),
        ("largest layer, gathered", "gathered"),
        ("total", "total"),
    ):
        rows.append([label, *[format_bytes(getattr(f, attr)) if getattr(f, attr) else "-" for f in results]])
    rows.append(["state bytes / param", *[f"{f.state_per_param:.3f}" for f in results]])
    title = (
        f"{args.model}: {num / 1e6:,.2f} M trainable parameters, {STRATEGY_NAMES[strategy]}, "
        f"{args.world_size} device{'s' if args.world_size > 1 else ''}, mixed precision {args.mixed_precision}"
    )
    print_table(["per device", *[f.optim for f in results]], rows, title=title)
    if len(results) == 2:
        chosen, base = results
        saved = base.total - chosen.total
        verb = "saves" if saved >= 0 else "costs"
        print(
            f"{chosen.optim} {verb} {format_bytes(abs(saved))} per device against {base.optim} "
            f"({abs(saved) / max(base.total, 1):.1%} of its total)"
        )
    for note in dict.fromkeys(n for f in results for n in f.notes):
        print(f"note: {note}")
    if measured is not None:
        _print_measured(measured)
    return 0


def _measure(args: argparse.Namespace, options: dict) -> dict:
    """Build a small model for real, run one optimizer step, compare measured state bytes with
    the estimate for that same model."""
    import torch

    from .footprint import trainable_parameters
    from .memory import estimate, state_bytes
    from .models import TINY_LLAMA, load_config, model_from_config
    from .registry import create_optimizer

    source = args.model
    config = (
        load_config(source) if source == TINY_LLAMA else load_config(source, trust_remote_code=args.trust_remote_code)
    )
    meta = model_from_config(config, device="meta")
    if sum(p.numel() for p in meta.parameters()) > args.measure_max_params:
        print(
            f"note: {source} has more than --measure-max-params={args.measure_max_params:,} parameters; "
            f"measuring on {TINY_LLAMA} instead",
            file=sys.stderr,
        )
        source = TINY_LLAMA
        config = load_config(TINY_LLAMA)
    out = {"model": source, "optimizers": {}}
    names = dict.fromkeys([args.optim, args.baseline])
    for name in progress(list(names), desc="measuring one real step"):
        torch.manual_seed(0)
        model = model_from_config(config, device="cpu")
        params = trainable_parameters(model)
        _real_backward(model, config)
        optimizer = create_optimizer(model, name, **_measure_options(name, options))  # by role for Muon
        start = time.perf_counter()
        if getattr(getattr(optimizer, "rule", None), "needs_loss", False):
            optimizer.step(loss=1.0)
        else:
            optimizer.step()
        seconds = time.perf_counter() - start
        measured = state_bytes(optimizer).total
        estimated = estimate(model, name, **options).total
        out["optimizers"][name] = {
            "params": sum(p.numel() for p in params),
            "measured_state_bytes": measured,
            "estimated_state_bytes": estimated,
            "relative_error": abs(measured - estimated) / max(measured, 1),
            "step_seconds": seconds,
        }
        del model, optimizer
    return out


def _measure_options(name: str, options: dict) -> dict:
    """One step measures memory, not speed: skip torch.compile (same state, no compile wait)
    unless the user asked for it."""
    from .core.optimizer import engine_hyperparams
    from .registry import get_optimizer

    if "compile" in engine_hyperparams(get_optimizer(name).rule) and "compile" not in options:
        return {**options, "compile": "off"}
    return options


def _real_backward(model, config) -> None:
    """Gradients from a real forward/backward on random tokens (random gradients for models that
    are not causal LMs)."""
    import torch

    vocab = getattr(config, "vocab_size", None)
    try:
        ids = torch.randint(0, vocab, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        return
    except Exception:
        pass
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3


def _print_measured(measured: dict) -> None:
    rows = []
    for name, m in measured["optimizers"].items():
        rows.append(
            [
                name,
                f"{m['params']:,}",
                format_bytes(m["estimated_state_bytes"]),
                format_bytes(m["measured_state_bytes"]),
                f"{m['measured_state_bytes'] / max(m['params'], 1):.3f}",
                f"{m['relative_error']:.3%}",
            ]
        )
    print_table(
        ["optimizer", "params", "estimated state", "measured state", "measured B/param", "difference"],
        rows,
        title=f"one real step on {measured['model']} (one process)",
    )


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfoptim",
        description="Newer optimizers for HuggingFace training, with small state, exact when sharded.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hfoptim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "list",
        help="every optimizer name with its state bytes per parameter",
        description="List every optimizer name (rule + suffixes), its optimizer-state bytes per parameter for "
        "a large 2-D tensor, the ratio to AdamW and what is known about sharded runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  hfoptim list\n  hfoptim list 'ademamix*'\n  hfoptim list --json > optimizers.json",
    )
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. '*8bit' or 'adan*'")
    p.add_argument("--shape", default="4096x4096", help="tensor shape the bytes are measured on (default 4096x4096)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "memory",
        help="per-device memory of a model's training state, next to AdamW",
        description="Per-device memory for training MODEL with optimizer NAME: parameters, gradients, fp32 "
        "master weights and optimizer state, under DDP, DeepSpeed ZeRO-1/2/3 or FSDP2. The model is built "
        "from its config on the meta device (no weights are allocated or downloaded) and the optimizer is "
        "stepped once there, so every stored tensor is counted exactly.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  hfoptim memory tiny-llama --optim ademamix_8bit --measure\n"
        "  hfoptim memory meta-llama/Llama-3.1-8B --optim adan_8bit --zero 3 --world-size 8 --mixed-precision bf16\n"
        "  hfoptim memory ./checkpoint --optim adamw_factored --fsdp --world-size 4 --json",
    )
    p.add_argument(
        "model", metavar="MODEL", help="'tiny-llama' (embedded), a local folder with config.json, or a hub name"
    )
    p.add_argument("--optim", required=True, metavar="NAME", help="optimizer name (see `hfoptim list`)")
    p.add_argument(
        "--optim-args", metavar="K=V,...", help="optimizer options, e.g. 'state_min_numel=0,betas=(0.9,0.95)'"
    )
    p.add_argument("--baseline", default=BASELINE, metavar="NAME", help="compared with (default: adamw)")
    shard = p.add_mutually_exclusive_group()
    shard.add_argument("--zero", type=int, choices=(1, 2, 3), help="DeepSpeed ZeRO stage")
    shard.add_argument("--fsdp", action="store_true", help="FSDP2 (fully sharded parameters, gradients and state)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="number of devices (default 1)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"), help="default: no")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also run one real optimizer step on a small model and report measured bytes",
    )
    p.add_argument(
        "--measure-max-params",
        type=int,
        default=50_000_000,
        metavar="N",
        help="models larger than this are measured on tiny-llama instead (default 50M)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_memory)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "world_size", 1) < 1:
        parser.error("--world-size must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
