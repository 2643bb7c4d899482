"""Step time, first step and step memory per storage form and layout (one process, FSDP2, ZeRO-2).

Run ``python benchmarks/layouts.py`` (``--device cuda`` on a GPU machine; ``--smoke`` for a
tiny check that everything runs). For every parameter set (``--sets``: ``100M``, the Llama-shaped
set of benchmarks/_timing.py, ``emb``, one 32000x768 tensor, and ``lora``, the rank-16 LoRA
adapters of every linear layer of a 1B Llama: :func:`lora_shapes`), every layout (``--layouts``:
``one`` process, ``fsdp2`` = ``fully_shard`` and ``zero2`` = DeepSpeed ZeRO-2, each on
``--nproc`` processes over gloo, NCCL on CUDA) and every optimizer name (``--names``), it
measures, in a fresh process per layout:

* ``first s``: the first ``optimizer.step()`` (state created, kernels compiled; inductor's disk
  cache as found, reported in the ``cache`` column as the process found it: ``cold`` when
  ``--cold-cache`` gave it an empty cache directory);
* ``x AdamW``: the median over rounds of the step time divided by torch's ``AdamW(foreach=True)``
  step timed in the same round under the same layout (max over processes of each);
* ``transient B/param``: the step's peak memory beyond what was held before it, per parameter
  this process holds (max over processes). On CPU: the process's high-water mark ``VmHWM``
  (reset by writing 5 to ``/proc/self/clear_refs`` just before the step) minus ``VmRSS`` before
  it, after ``malloc_trim`` returned the allocator's free memory; on CUDA:
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step;
* ``compiled``: parameters stepped by the fused kernel per step (``hfoptim.core.compiled_step.calls``);
* ``faults/step``: the minor page faults of the timed steps, per step (``getrusage``'s
  ``ru_minflt``, max over processes), for the candidate and for AdamW. With glibc's default
  allocator a freed block larger than its mmap threshold (which grows to at most 32 MiB) goes
  back to the system, and the next step's allocation of that size faults its pages in again:
  torch AdamW foreach's temporaries (4 bytes per parameter) cost it about 84000 faults and 100-300
  ms a step on the 100M set (2-core AMD EPYC), and how many it pays depends on what the heap
  holds at that moment, which the other optimizers built in the process change. Its step
  measured 139-402 ms in one run; the ratios move with it.

Every row is measured twice (``--allocator both``, the default): with glibc's default
allocator, what a user's process does, and with ``steady``, the workers run with glibc's mmap
and trim thresholds raised (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) so freed
memory stays in the heap and no step faults its temporaries in: a comparison of the steps' own
work (its rows marked; ``--allocator default`` or ``steady`` runs one of the two).

A name may carry options after ``+`` (``adamw_8bit+agc=0.01+compile=off``: the optimizer
``adamw_8bit`` built with ``agc=0.01, compile="off"``; values are Python literals, or text).

``--chunk-bytes N`` gives every optimizer the ``chunk_bytes`` option N (the budget of the step's
temporaries); its rows are kept beside those of the default budget, the name followed by the
budget in MiB.

The CPU (``lscpu``'s model name and flags) and the load average are recorded with the results:
timings on a loaded or different machine are not comparable. Results, one record per kind of
machine (:func:`machine_kind`: the CPU's widest vector extension, or the GPU):
benchmarks/results/layouts-<kind>.{json,md} (not with ``--smoke``) and the ``layouts-<kind>``
section of BENCHMARKS.md. Each row names the run that measured it (the file's ``runs``: commit,
load average, CPU); ``--merge`` keeps the earlier rows this run did not measure, and the table's
header names the runs they came from.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DEFAULT_NAMES = [
    "adamw_8bit", "ademamix_8bit", "adan_8bit", "adamw_4bit", "adamw_bf16",
    "adamw_factored", "adamw_shared", "adamw_smmf",
]  # fmt: skip
SMOKE_NAMES = ["adamw_8bit", "adamw_bf16"]


def _nothing() -> None:
    """Releasing a step that holds no DeepSpeed engine: nothing to do."""


def machine_kind(cpu: dict, device: str) -> str:
    """Which record a run belongs to: "amx" (an Intel Xeon with AMX and AVX-512), "avx512" or
    "avx2" by the CPU's widest vector extension (inductor's CPU kernels differ most between
    them), "cpu" for others, the device type else."""
    if device != "cpu":
        return device
    flags = cpu.get("flags", [])
    if "amx_tile" in flags:
        return "amx"
    if any(f.startswith("avx512") for f in flags):
        return "avx512"
    return "avx2" if "avx2" in flags else "cpu"


def name_and_options(label: str) -> tuple[str, dict]:
    """``"adamw_8bit+agc=0.01+compile=off"`` -> ``("adamw_8bit", {"agc": 0.01, "compile": "off"})``."""
    name, *given = label.split("+")
    options = {}
    for item in given:
        key, _, text = item.partition("=")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return name, options


def lora_shapes(hidden: int, kv: int, intermediate: int, layers: int, rank: int) -> list[tuple[int, ...]]:
    """The adapters peft's LoRA (``target_modules="all-linear"``) trains on a Llama of ``layers``
    layers: per layer, ``A`` of ``(rank, in)`` and ``B`` of ``(out, rank)`` for q, k, v, o (k and
    v of ``kv`` outputs), gate, up and down. For a 1B Llama (hidden 2048, kv 512, intermediate
    8192, 16 layers) and rank 16: 224 tensors of 11.3M parameters, most of them under 65536
    elements and many of one shape (``compile="auto"`` compiles such a shape:
    hfoptim.core.compiled_step.AUTO_MIN_SHAPE_COUNT)."""
    linear = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    linear += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    out: list[tuple[int, ...]] = []
    for _ in range(layers):
        for out_features, in_features in linear:
            out += [(rank, in_features), (out_features, rank)]
    return out


def param_shapes(label: str, smoke: bool) -> list[tuple[int, ...]]:
    """The shapes of parameter set ``label`` (tiny ones with ``smoke``)."""
    from _timing import MODEL_SHAPES, ModelShape

    if label == "emb":
        return [(512, 256)] if smoke else [(32000, 768)]
    if label == "lora":
        return lora_shapes(128, 32, 512, 1, 8) if smoke else lora_shapes(2048, 512, 8192, 16, 16)
    if smoke:
        return ModelShape("tiny", vocab=512, hidden=128, layers=1, intermediate=512).shapes()
    return MODEL_SHAPES[label].shapes()


# ---------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _trim() -> None:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim``), so memory
    a previous step freed but the allocator kept does not hide this step's temporaries."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def transient_bytes(step, device) -> int:
    """Peak bytes held during ``step()`` beyond what was held before it (see the docstring)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _trim()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    return 1024 * max(0, _status_kib("VmHWM") - before)


# ---------------------------------------------------------------------------------------- worker
def worker(args) -> int:
    """Measure every (set, name) under ``args.layout`` in this process (and its peers)."""
    import logging

    import torch
    import torch.distributed as dist

    import hfoptim
    from hfoptim.core import compiled_step

    device = torch.device(args.device)
    distributed = args.layout != "one"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if args.layout == "zero2":
            import deepspeed

            deepspeed.utils.logger.setLevel(logging.ERROR)
            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend)
    rank = dist.get_rank() if distributed else 0
    if device.type == "cpu":
        torch.set_num_threads(1 if distributed else torch.get_num_threads())

    def reduce_max(value: float) -> float:
        if not distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if distributed:
            dist.barrier()

    class Net(torch.nn.Module):
        def __init__(self, shapes):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.blocks = torch.nn.ModuleList()
            for s in shapes:
                m = torch.nn.Module()
                m.weight = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device))
                self.blocks.append(m)

        def forward(self, x):
            return sum(b.weight.sum() for b in self.blocks) * x

    options = {} if args.chunk_bytes is None else {"chunk_bytes": args.chunk_bytes}
    marks = {} if args.allocator == "default" else {"allocator": args.allocator}

    def build(shapes, name: str):
        """(step function, the element count of the tensors the optimizer steps here, a function
        that releases what the step holds)."""
        net = Net(shapes)
        base, extra = name_and_options(name)
        make = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)) if name == "torch_adamw" else None
        if args.layout == "zero2":
            import deepspeed

            from hfoptim.integrations.deepspeed import attach

            opt = make(net.parameters()) if make else hfoptim.create_optimizer(net, base, **options, **extra)
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_clipping": 0.0,
                "zero_optimization": {"stage": 2},
                "zero_allow_untested_optimizer": True,
                "zero_force_ds_cpu_optimizer": False,
                "steps_per_print": 10**9,
            }
            ds_engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
            opt = ds_engine.optimizer.optimizer if make else attach(ds_engine)
            tensors = [flat for g in opt.param_groups for flat in g["params"]]
            gen = torch.Generator().manual_seed(1 + rank)
            for flat in tensors:
                flat.grad = (torch.randn(flat.shape, generator=gen) * 1e-2).to(flat.device)
            local = [flat for flat in tensors]
            # ZeRO's gradient hooks hold its optimizer through autograd's C++ nodes, out of the
            # garbage collector's reach: without destroy() every engine built here stays alive
            # (a ZeRO-2 run of every form on the three sets held 11.8 GB per process)
            release = ds_engine.destroy
        else:
            if args.layout == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.tensor import distribute_tensor

                # the mesh of --device (FSDP2's default takes the GPU where one is present)
                mesh = init_device_mesh(device.type, (dist.get_world_size(),))
                for b in net.blocks:
                    fully_shard(b, mesh=mesh)
                fully_shard(net, mesh=mesh)
            opt = make(list(net.parameters())) if make else hfoptim.create_optimizer(net, base, **options, **extra)
            gen = torch.Generator().manual_seed(1)
            local = []
            for p in net.parameters():
                g = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
                if args.layout == "fsdp2":
                    g = distribute_tensor(g, p.device_mesh, p.placements)
                    local.append(p._local_tensor)
                else:
                    local.append(p)
                p.grad = g
            release = _nothing
        return opt.step, sum(t.numel() for t in local), release

    def timed(step, n: int, faults: list) -> float:
        sync()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        seconds = reduce_max((time.perf_counter() - start) / n)
        faults.append(reduce_max((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n))
        return seconds

    rows = []
    release = _nothing
    for given in args.sets.split(","):
        shapes = param_shapes(given, args.smoke)
        label = f"{given} (smoke: tiny)" if args.smoke else given
        base_step, _, base_release = build(shapes, "torch_adamw")
        base_step()
        for name in args.names.split(","):
            # the previous candidate's optimizer, model and DeepSpeed engine go first: kept alive
            # beside the next one, a ZeRO-2 run of every form ran out of memory
            release()
            step, release = None, _nothing
            gc.collect()
            before_calls = sum(compiled_step.calls.values())
            try:
                step, local_numel, release = build(shapes, name)
                sync()
                start = time.perf_counter()
                step()
                sync()
                first = reduce_max(time.perf_counter() - start)
            except Exception as error:  # a name this layout refuses: record it
                rows.append({"set": label, "name": name, **options, **marks, "error": str(error).splitlines()[0][:200]})
                continue
            compiled = sum(compiled_step.calls.values()) - before_calls
            step()  # a second step: no compilation left in what is timed
            cand, base, cand_faults, base_faults = [], [], [], []
            for r in range(args.rounds):
                order = [(step, cand, cand_faults), (base_step, base, base_faults)]
                for fn, out, faults in order if r % 2 == 0 else order[::-1]:
                    out.append(timed(fn, args.steps, faults))
            sync()
            per_param = reduce_max(transient_bytes(step, device) / max(1, local_numel))
            sync()
            base_per_param = reduce_max(transient_bytes(base_step, device) / max(1, local_numel))
            rows.append(
                {
                    "set": label,
                    "name": name,
                    **options,
                    **marks,
                    "first_step_s": first,
                    "step_ms": 1e3 * statistics.median(cand),
                    "adamw_step_ms": 1e3 * statistics.median(base),
                    "ratio_adamw": statistics.median(c / b for c, b in zip(cand, base)),
                    "transient_bytes_per_param": per_param,
                    "adamw_transient_bytes_per_param": base_per_param,
                    "compiled_params_first_step": reduce_max(compiled),
                    "faults_per_step": statistics.median(cand_faults),
                    "adamw_faults_per_step": statistics.median(base_faults),
                }
            )
            if rank == 0:
                # after every row: a launch that dies later (a process killed for memory) keeps them
                Path(args.out).write_text(json.dumps(rows))
                r = rows[-1]
                print(
                    f"{args.layout:6s} {label} {shown(r):16s} first {r['first_step_s']:6.1f} s  "
                    f"x{r['ratio_adamw']:.2f} AdamW  {r['transient_bytes_per_param']:5.2f} B/param transient "
                    f"(AdamW {r['adamw_transient_bytes_per_param']:.2f})  "
                    f"{r['compiled_params_first_step']:.0f} compiled",
                    flush=True,
                )
        release()  # this set's last candidate, then its AdamW
        base_release()
        release = _nothing
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    if distributed:
        dist.barrier()
    return 0


# ---------------------------------------------------------------------------------------- driver
def run_layout(args, layout: str, out: Path, allocator: str) -> list[dict]:
    """Measure ``layout`` in fresh processes with glibc's ``allocator`` setting (see the module
    docstring); its rows (an ``error`` row when the launch failed)."""
    own = [
        "--worker", "--layout", layout, "--out", str(out), "--sets", args.sets, "--names", args.names,
        "--rounds", str(args.rounds), "--steps", str(args.steps), "--device", args.device,
    ] + (["--smoke"] if args.smoke else [])  # fmt: skip
    if args.chunk_bytes is not None:
        own += ["--chunk-bytes", str(args.chunk_bytes)]
    own += ["--allocator", allocator]
    if layout == "one":
        cmd = [sys.executable, __file__, *own]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        cmd = [*launcher, __file__, *own]
    from _timing import allocator_environ

    # glibc's thresholds of ``allocator`` (see the module docstring), whatever this shell holds
    env = dict(allocator_environ(allocator), PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        if layout != "one":
            env["OMP_NUM_THREADS"] = "1"
    if args.cold_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hfoptim-inductor-")
    rc = subprocess.call(cmd, env=env, cwd=HERE.parent)
    rows = [{"layout": layout, **row} for row in json.loads(out.read_text())] if out.exists() else []
    if rc != 0:  # the rows measured before the failure stay, with the failure after them
        rows.append({"layout": layout, "error": f"the {layout} launch failed (exit {rc}) after {len(rows)} rows"})
    return rows


def shown(row: dict) -> str:
    """A row's optimizer name, with the ``chunk_bytes`` budget and the allocator setting it ran
    under when one was given."""
    budget, allocator = row.get("chunk_bytes"), row.get("allocator")
    marks = ([] if budget is None else [f"chunk_bytes {budget / 2**20:g} MiB"]) + (
        [] if allocator is None else [f"{allocator} allocator"]
    )
    return row.get("name", "") + (f" ({', '.join(marks)})" if marks else "")


def key(row: dict) -> tuple:
    """What identifies a row across runs (``--merge``)."""
    return row["layout"], row.get("set"), row.get("name"), row.get("chunk_bytes"), row.get("allocator")


def run_of(info: dict, cpu: dict) -> dict:
    """Which run measured a row (its commit, load and CPU): every row carries it, so that a row
    kept by ``--merge`` still says where it came from."""
    return {
        "git_commit": info.get("git_commit"),
        "load_average_1_5_15": info.get("load_average_1_5_15"),
        "cpu": info.get("cpu"),
        "vector_flags": cpu.get("vector_flags", []),
    }


def _run_key(run: dict) -> str:
    """A run as text that identifies it (runs are dicts, which do not hash)."""
    return json.dumps(run, sort_keys=True)


def described(run: dict, this_run: dict) -> str:
    """``run`` in words, its CPU named where it is not this run's."""
    words = f"hfoptim {run['git_commit']}, load average {run['load_average_1_5_15']}"
    if (run["cpu"], run["vector_flags"]) != (this_run["cpu"], this_run["vector_flags"]):
        words += f", {run['cpu']} with {' '.join(run['vector_flags']) or 'unknown flags'}"
    return words + (f" ({run['merged']})" if "merged" in run else "")


def merged(earlier: dict, rows: list[dict]) -> list[dict]:
    """``rows`` with the rows of the ``earlier`` record that this run did not measure (``key``),
    in the table's order. A kept row keeps its run; a row of a record from before rows carried
    one takes that record's run and, where it was itself merged, its account of the rows' runs."""
    before = earlier["machine"]
    legacy = run_of(before, earlier.get("lscpu", {}))
    if "merged" in before:  # that record's own account of its rows' runs
        legacy["merged"] = f"of its rows, {before['merged']} ({before['previous_commit']})"
    runs = earlier.get("runs", [])
    fresh = {key(r) for r in rows}
    kept = [dict(r, run=runs[r["run"]] if "run" in r else legacy) for r in earlier["rows"] if key(r) not in fresh]
    names = dict.fromkeys(r.get("name") for r in rows if r.get("name") not in DEFAULT_NAMES)
    order = {name: i for i, name in enumerate([*DEFAULT_NAMES, *names])}
    layouts = ["one", "fsdp2", "zero2"]
    return sorted(
        kept + rows,
        key=lambda r: (
            layouts.index(r["layout"]),
            r.get("set", ""),
            order.get(r.get("name"), 99),
            r.get("chunk_bytes") or 0,
            r.get("allocator") or "",
        ),
    )


def packed(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(runs, rows)`` for the results file: each distinct run once, and rows that name theirs
    by its place in ``runs``."""
    keys = [_run_key(r["run"]) for r in rows]
    runs = {key: r["run"] for key, r in zip(keys, rows)}  # (first seen first)
    place = {key: i for i, key in enumerate(runs)}
    return list(runs.values()), [dict(r, run=place[key]) for key, r in zip(keys, rows)]


def kept_note(rows: list[dict], this_run: dict) -> str:
    """The header's account of the rows an earlier run measured (``--merge``), by run: which
    optimizers, layouts and sets; empty when this run measured every row."""
    by_run: dict[str, tuple[dict, list[dict]]] = {}
    for r in rows:
        if r.get("run", this_run) != this_run:
            by_run.setdefault(_run_key(r["run"]), (r["run"], []))[1].append(r)
    parts = []
    for run, kept in by_run.values():
        names = ", ".join(dict.fromkeys(shown(r) for r in kept))
        layouts = ", ".join(dict.fromkeys(r["layout"] for r in kept))
        sets = ", ".join(dict.fromkeys(r.get("set", "") for r in kept))
        rows_of = f"{len(kept)} row{'s' if len(kept) > 1 else ''} of {names}"
        parts.append(f"{rows_of} on {layouts} for {sets} from {described(run, this_run)}")
    return "; kept from earlier runs: " + "; ".join(parts) if parts else ""


def report(rows: list[dict], info: dict, cpu: dict, args) -> list[str]:
    world = f"{args.nproc} processes" if args.device == "cpu" else f"{args.nproc} GPUs"
    lines = [
        f"Step time, first step and step memory per layout (one process; FSDP2 and ZeRO-2 on {world}), "
        f"device {args.device}, {info['cpu']} (lscpu flags: {' '.join(cpu.get('vector_flags', [])) or 'unknown'}), "
        f"load average {info.get('load_average_1_5_15')}, torch {info['torch']}, hfoptim {info['git_commit']}, "
        f"inductor cache {'cold' if args.cold_cache else 'as found'}" + kept_note(rows, run_of(info, cpu)),
        "",
        "| set | layout | optimizer | first step s | step ms | AdamW ms | x AdamW foreach | transient B/param "
        "| AdamW B/param | compiled tensors | faults/step | AdamW faults/step |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('set', '')} | {r['layout']} | {shown(r)} | {r['error']} | | | | | | | | |")
            continue
        faults = [r.get(k) for k in ("faults_per_step", "adamw_faults_per_step")]
        faults = ["" if f is None else f"{f:.0f}" for f in faults]  # (not in records before 2026-12-04)
        lines.append(
            f"| {r['set']} | {r['layout']} | {shown(r)} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | "
            f"{r['adamw_step_ms']:.1f} | {r['ratio_adamw']:.2f} | {r['transient_bytes_per_param']:.2f} | "
            f"{r['adamw_transient_bytes_per_param']:.2f} | {r['compiled_params_first_step']:.0f} | "
            f"{faults[0]} | {faults[1]} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", default="one,fsdp2,zero2", help="comma-separated: one, fsdp2, zero2")
    parser.add_argument(
        "--sets",
        default="100M,emb,lora",
        help="comma-separated: 100M (Llama-shaped), emb (32000x768), lora (LoRA adapters of a 1B Llama)",
    )
    parser.add_argument("--names", default="", help="comma-separated optimizer names (default: every storage form)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--chunk-bytes", type=int, default=None, help="the chunk_bytes option of every optimizer (default: its own)"
    )
    parser.add_argument("--cold-cache", action="store_true", help="an empty inductor cache for each layout")
    parser.add_argument(
        "--allocator",
        choices=["both", "default", "steady"],
        default="both",
        help="glibc's default, or steady: it keeps freed memory (no page faults of the steps' temporaries; "
        "see the docstring); both (the default): every row with each",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and two names; writes no result files")
    parser.add_argument(
        "--merge", action="store_true", help="keep the rows of the layouts not run from the existing results file"
    )
    args = parser.parse_args()
    if not args.names:
        args.names = ",".join(SMOKE_NAMES if args.smoke else DEFAULT_NAMES)
    if args.smoke:
        args.rounds, args.steps = min(args.rounds, 2), 1
    if args.worker:
        return worker(args)

    from _timing import lscpu, machine_info, update_report, write_json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for allocator in ("default", "steady") if args.allocator == "both" else (args.allocator,):
            for layout in args.layouts.split(","):
                rows += run_layout(args, layout, Path(tmp) / f"{layout}-{allocator}.json", allocator)
    info, cpu = machine_info(), lscpu()
    kind = machine_kind(cpu, args.device)
    previous = HERE / "results" / f"layouts-{kind}.json"
    this_run = run_of(info, cpu)
    rows = [dict(r, run=this_run) for r in rows]
    if args.merge and previous.exists():
        rows = merged(json.loads(previous.read_text()), rows)
    lines = report(rows, info, cpu, args)
    print("\n".join(lines))
    if args.smoke:
        return 0 if rows and not any("error" in r and "launch failed" in r["error"] for r in rows) else 1
    runs, rows = packed(rows)
    record = {"machine": info, "lscpu": cpu, "device": args.device, "nproc": args.nproc, "runs": runs, "rows": rows}
    write_json(previous, record)
    previous.with_suffix(".md").write_text("\n".join(lines) + "\n")
    command = "python benchmarks/layouts.py " + " ".join(sys.argv[1:])
    if not update_report(f"layouts-{kind}", "\n".join([*lines, "", f"Command: `{command.strip()}`"])):
        print(f"BENCHMARKS.md has no layouts-{kind} section: add its markers to keep this run there")
    return 0 if not any("launch failed" in r.get("error", "") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
