"""What exactness under sharding costs: the statistics' collectives per optimizer step.

Run ``python benchmarks/sharding_overhead.py`` (it starts itself under ``torchrun`` with
``--nproc`` CPU processes over gloo) or under your own launcher. For every optimizer name and
for FSDP2 (``fully_shard``) and DeepSpeed ZeRO-2, on a transformer-shaped parameter set
(benchmarks/_timing.py, "6M" by default), it times ``optimizer.step()`` alone (gradients set once,
the same on every step), alternating with AdamW under the same sharding, and counts what
:class:`hfoptim.distributed.stats.ShardedStats` communicates:

* ``step ms``: median step time (max over processes); ``x AdamW``: median of the per-round ratio
  to AdamW timed in the same rounds;
* ``coll/step``, ``KiB/step``: collectives per step (all-reduces of statistics; Muon's
  all-to-alls, which gather each matrix on its owner and send the result rows back) and the bytes
  this process sends in them (all-reduce payload, all-to-all bytes to other processes; AdamW: 0);
* ``comm ms/step``: wall time spent inside those all-reduces (the extra time exactness costs,
  beyond the optimizer's own arithmetic). It includes waiting for the slowest process: a
  collective is a synchronization point, so uneven work per process (ZeRO partitions hold
  different parameters) shows up here; ``bytes / grad bytes``: statistics payload relative to
  the gradient the sharding layer itself reduces every step (4 bytes per parameter).

Results: benchmarks/results/sharding_overhead.{json,md}.

``--muon``: Muon and ``muon_8bit`` alone, against AdamW under the same sharding, into
``results/sharding_muon.{json,md}`` and BENCHMARKS.md's ``sharding-muon`` section, with the
whole-matrix exchange counted exactly: for each matrix ``k`` (``n_k`` elements, ``h_k`` of them
held by its owner process) the momentum rows go to the owner and the orthogonalized rows come
back, ``2 (n_k - h_k) e`` bytes over all processes per step (``e``: bytes per element of Muon's
``ns_dtype``, 2 for bf16). The ``expected`` column is that sum, from the owned spans and owners
the exchange itself computed (``ShardedStats._spans``, ``matrix_owners``); ``measured`` is the
bytes the processes handed to ``all_to_all_single``, summed over processes; they must agree.
``all-gather on every rank`` is what gathering every matrix on every process would move instead
(``(world - 1) sum_k n_k e``). In both runs the embedding (the set's first tensor) takes AdamW, as
``hfoptim.roles`` gives a model's embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DEFAULT_NAMES = [
    "adamw", "adamw_8bit", "adamw_bf16", "adamw_factored", "adamw_smmf", "adamw_shared",
    "adamw_agc", "adamw_cautious", "adamw_gc", "adamw_softclip", "lamb",
    "adafactor", "smmf", "ademamix", "adan", "nsgda", "amos", "adalo", "adanorm", "diffgrad", "pnm",
    "muon", "muon_8bit",
]  # fmt: skip
MUON_NAMES = ["muon", "muon_8bit"]


def _nothing() -> None:
    """Releasing a step that holds no DeepSpeed engine: nothing to do."""


def exchange_bytes(span_lists, element_size: int) -> tuple[int, int]:
    """``(bytes over all processes, per step, of Muon's two all-to-alls; what an all-gather of
    every matrix on every process would move)``. ``span_lists``: for each ``matrix_map`` call of
    a step, the ``(world, n, 2)`` flat ranges each process owns of each of its ``n`` matrices (as
    the exchange caches them in ``ShardedStats._spans``). Per matrix ``k`` of ``n_k`` elements
    whose owner holds ``h_k``: ``2 (n_k - h_k)`` elements (rows to the owner, results back); no
    exchange at all when every matrix is whole on its owner."""
    from hfoptim.distributed.stats import matrix_owners

    expected = gather_all = 0
    for spans in span_lists:
        world = spans.shape[0]
        lengths = (spans[:, :, 1] - spans[:, :, 0]).tolist()
        numels = [sum(col) for col in zip(*lengths)]
        owners = matrix_owners(spans, numels)
        if any(lengths[r][k] and owners[k] != r for r in range(world) for k in range(len(numels))):
            expected += sum(2 * (n - lengths[o][k]) * element_size for k, (n, o) in enumerate(zip(numels, owners)))
        gather_all += (world - 1) * sum(numels) * element_size
    return expected, gather_all


def launch(args) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        __file__,
        "--worker",
        *sys.argv[1:],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    return subprocess.call(cmd, env=env)


def worker(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import torch
    import torch.distributed as dist
    from _timing import MODEL_SHAPES, machine_info, machine_line, update_report, write_json

    import hfoptim
    from hfoptim.distributed.stats import ShardedStats

    torch.set_num_threads(1)
    comm_seconds = [0.0]
    original = ShardedStats.all_reduce

    def timed(self, pieces, views, op=dist.ReduceOp.SUM):
        start = time.perf_counter()
        try:
            return original(self, pieces, views, op)
        finally:
            comm_seconds[0] += time.perf_counter() - start

    ShardedStats.all_reduce = timed
    original_exchange = ShardedStats._all_to_all

    def timed_exchange(self, *exchange_args):
        start = time.perf_counter()
        try:
            return original_exchange(self, *exchange_args)
        finally:
            comm_seconds[0] += time.perf_counter() - start

    ShardedStats._all_to_all = timed_exchange
    rank, world = None, None
    backends = args.backends.split(",")
    if "zero2" in backends:
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = MODEL_SHAPES[args.model]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.blocks = torch.nn.ModuleList()
            for s in shape.shapes():
                m = torch.nn.Module()
                m.weight = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
                self.blocks.append(m)

        def forward(self, x):
            return sum(b.weight.sum() for b in self.blocks) * x

    def build(backend: str, name: str):
        """(step function, the hfoptim engine, a function that releases what the step holds) for
        ``name`` under ``backend``."""
        net = Net()
        kwargs = {}
        if hfoptim.get_optimizer(name).rule.name == "muon":  # the embedding takes AdamW, as in a model
            kwargs["adamw_params"] = [r"^blocks\.0\.weight$"]
        if backend == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import distribute_tensor

            # on the CPU also where a GPU is present (FSDP2's default mesh would take the GPU)
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for b in net.blocks:
                fully_shard(b, mesh=mesh)
            fully_shard(net, mesh=mesh)
            opt = hfoptim.create_optimizer(net, name, **kwargs)
            gen = torch.Generator().manual_seed(1)
            for p in net.parameters():
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen) * 1e-2, p.device_mesh, p.placements)
            release = _nothing
        else:
            import deepspeed

            from hfoptim.integrations.deepspeed import attach

            opt = hfoptim.create_optimizer(net, name, **kwargs)
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_clipping": 0.0,
                "zero_optimization": {"stage": 2},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            }
            ds_engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
            opt = attach(ds_engine)
            release = ds_engine.destroy  # (ZeRO's gradient hooks keep an engine alive: layouts.py)
            gen = torch.Generator().manual_seed(1 + rank)
            for g in opt.param_groups:
                for flat in g["params"]:
                    flat.grad = torch.randn(flat.shape, generator=gen) * 1e-2
        engine = getattr(opt, "optimizer", opt)

        def step():
            if engine.rule.needs_loss:
                engine.set_loss(1.0)
            opt.step()

        step()  # state created, layout chosen
        return step, engine, release

    def sent_bytes(stats) -> int:
        return getattr(stats, "bytes_reduced", 0) + getattr(stats, "bytes_sent", 0)

    def timed_block(step, n):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            step()
        seconds = torch.tensor([(time.perf_counter() - start) / n], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return float(seconds)

    names = args.names.split(",") if args.names else MUON_NAMES if args.muon else DEFAULT_NAMES
    rows = []
    for backend in backends:
        base_step, _, base_release = build(backend, "adamw")
        for name in names:
            try:
                step, engine, release = build(backend, name)
            except Exception as error:  # a name this backend refuses: record it
                rows.append({"backend": backend, "name": name, "error": str(error).splitlines()[0][:200]})
                continue
            stats = engine.layout.stats
            c0, b0 = getattr(stats, "collectives", 0), sent_bytes(stats)
            bs0 = getattr(stats, "bytes_sent", 0)
            comm_seconds[0] = 0.0
            cand, base = [], []
            for r in range(args.rounds):
                order = [(step, cand), (base_step, base)] if r % 2 == 0 else [(base_step, base), (step, cand)]
                for fn, out in order:
                    out.append(timed_block(fn, args.steps))
            n = args.rounds * args.steps
            comm = torch.tensor([comm_seconds[0] / n], dtype=torch.float64)
            dist.all_reduce(comm, op=dist.ReduceOp.MAX)
            exchanged = torch.tensor([getattr(stats, "bytes_sent", 0) - bs0], dtype=torch.float64)
            dist.all_reduce(exchanged)  # over all processes
            params = sum(p.numel() for p in Net().parameters())
            nbytes = (sent_bytes(stats) - b0) / n
            rows.append(
                {
                    "backend": backend,
                    "name": name,
                    "step_ms": 1e3 * statistics.median(cand),
                    "ratio_adamw": statistics.median(c / b for c, b in zip(cand, base)),
                    "collectives_per_step": (getattr(stats, "collectives", 0) - c0) / n,
                    "kib_per_step": nbytes / 1024,
                    "comm_ms_per_step": 1e3 * float(comm),
                    "bytes_over_grad_bytes": nbytes / (4 * params),
                }
            )
            if engine.rule.name == "muon":
                ns_dtype = next(g["ns_dtype"] for g in engine.param_groups if g["algorithm"] == "muon")
                element_size = 2 if ns_dtype == "bf16" else 4
                expected, gather_all = exchange_bytes(getattr(stats, "_spans", {}).values(), element_size)
                rows[-1].update(
                    ns_dtype=ns_dtype,
                    exchange_bytes_measured=float(exchanged) / n,
                    exchange_bytes_expected=expected,
                    gather_all_bytes=gather_all,
                    matrix_runs=stats.matrix_runs[-1] if stats.matrix_runs else None,
                )
            if rank == 0:
                r = rows[-1]
                print(
                    f"{backend:6s} {name:16s} {r['step_ms']:8.1f} ms  x{r['ratio_adamw']:.2f}  "
                    f"{r['collectives_per_step']:6.1f} coll  {r['kib_per_step']:8.2f} KiB  "
                    f"{r['comm_ms_per_step']:6.2f} ms comm",
                    flush=True,
                )
            release()
        base_release()
    if rank == 0 and args.print_only:
        print(json.dumps(rows, indent=1))
    elif rank == 0 and args.muon:
        write_muon(rows, args, world, shape, machine_info(), machine_line, update_report, write_json)
    elif rank == 0:
        info = machine_info()
        record = {
            "machine": info,
            "model": args.model,
            "world": world,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "rows": rows,
        }
        out = HERE / "results" / "sharding_overhead.json"
        write_json(out, record)
        lines = [
            f"Sharding overhead, {args.model} parameter set ({shape.numel / 1e6:.1f}M), {world} CPU processes "
            f"(gloo), {machine_line(info)}",
            "",
            "| backend | optimizer | step ms | x AdamW | coll/step | KiB/step | comm ms/step | bytes / grad bytes |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['backend']} | {r['name']} | refused: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {r['backend']} | {r['name']} | {r['step_ms']:.1f} | {r['ratio_adamw']:.2f} | "
                f"{r['collectives_per_step']:.1f} | {r['kib_per_step']:.2f} | {r['comm_ms_per_step']:.2f} | "
                f"{r['bytes_over_grad_bytes']:.1e} |"
            )
        (HERE / "results" / "sharding_overhead.md").write_text("\n".join(lines) + "\n")
        command = "python benchmarks/sharding_overhead.py " + " ".join(sys.argv[1:]).replace("--worker", "").strip()
        update_report("sharding", "\n".join([*lines, "", f"Command: `{command.strip()}`"]))
        print(json.dumps({"written": str(out)}))
    dist.barrier()
    return 0


def write_muon(rows, args, world, shape, info, machine_line, update_report, write_json) -> None:
    """``--muon``: results/sharding_muon.{json,md} and the sharding-muon section of BENCHMARKS.md."""
    record = {"machine": info, "model": args.model, "world": world, "rounds": args.rounds,
              "steps_per_round": args.steps, "rows": rows}  # fmt: skip
    out = HERE / "results" / "sharding_muon.json"
    write_json(out, record)
    command = "python benchmarks/sharding_overhead.py " + " ".join(sys.argv[1:]).replace("--worker", "").strip()
    lines = [
        f"Muon's whole-matrix exchange, {args.model} parameter set ({shape.numel / 1e6:.1f}M; the embedding takes "
        f"AdamW), {world} CPU processes (gloo), {machine_line(info)}.",
        f"Command: `{command.strip()}`. Bytes are exact and machine-independent; step times are medians of "
        f"{args.rounds} rounds of {args.steps} steps, alternating with AdamW.",
        "",
        "| backend | optimizer | step ms | x AdamW (same sharding) | collectives/step "
        "| exchanged bytes/step, measured (all processes) | expected | all-gather on every rank | comm ms/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['name']} | refused: {r['error']} | | | | | | |")
            continue
        if "exchange_bytes_measured" not in r:
            continue
        exact = "" if r["exchange_bytes_measured"] == r["exchange_bytes_expected"] else " (DIFFERS)"
        lines.append(
            f"| {r['backend']} | {r['name']} | {r['step_ms']:.1f} | {r['ratio_adamw']:.2f} | "
            f"{r['collectives_per_step']:.0f} | {r['exchange_bytes_measured']:,.0f}{exact} | "
            f"{r['exchange_bytes_expected']:,} | {r['gather_all_bytes']:,} | {r['comm_ms_per_step']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "sharding_muon.md").write_text(text)
    update_report("sharding-muon", text)
    print(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="6M")
    parser.add_argument("--backends", default="fsdp2,zero2")
    parser.add_argument("--names", default="", help="comma-separated optimizer names (default: a representative set)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--print-only", action="store_true", help="print the rows, write no result files")
    parser.add_argument(
        "--muon",
        action="store_true",
        help="muon and muon_8bit with their exchange bytes counted (results/sharding_muon.*)",
    )
    args = parser.parse_args()
    return worker(args) if args.worker or "LOCAL_RANK" in os.environ else launch(args)


if __name__ == "__main__":
    sys.exit(main())
