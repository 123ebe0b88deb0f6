"""Benchmark FSDP2 against DDP on CPU: per-rank parameter + gradient + AdamW memory, and step time.

    python benchmarks/fsdp2.py [--encoders vit3d_tiny vit3d_small] [--ranks 2] [--steps 5] [--quick]
        [--save docs/benchmarks/fsdp2.md]

Each case starts `--ranks` processes (gloo, one torch thread each) that build the same encoder,
wrap it in DDP or shard it with `fm3d.train.fsdp.shard_module` (one unit per transformer block,
then the encoder), and take AdamW steps on random [2, 1, D, H, W] volumes (a pooled-embedding
regression loss, so only the encoder is measured). Per rank it counts the bytes of the tensors
it holds for the model: its parameters (the local shard under FSDP2), their gradients and
AdamW's two moments, and reports its peak RSS (VmHWM) and the median step time. The ratio
column is FSDP2 over DDP; the issue's target is per-rank parameter + optimizer memory <= 0.6x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import machine_line, markdown_table, median, run_child

IMAGE_SIZE = (64, 128, 128)  # 256 tokens at 16^3 patches, the objectives benchmark's size


def _held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards only)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = list(model.parameters())
    held = {
        "params": sum(local(p).numel() * p.element_size() for p in params),
        "grads": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": 0,
    }
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                held["optimizer"] += local(value).numel() * value.element_size()
    return held


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rank(rank: int, world: int, port: int, case: dict, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import fm3d
        from fm3d.train.fsdp import shard_module

        torch.manual_seed(0)
        encoder = fm3d.create_encoder(case["encoder"], image_size=IMAGE_SIZE, patch_size=(16, 16, 16))
        if case["strategy"] == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(encoder)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            shard_module(encoder, init_device_mesh("cpu", (world,)))
            model = encoder
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(case["steps"] + 1):
            x = torch.randn(2, 1, *IMAGE_SIZE, generator=generator)
            start = time.perf_counter()
            loss = model(x).pooled.square().mean()
            loss.backward()
            optimizer.step()
            held = _held_bytes(model, optimizer)  # before zero_grad: gradients still held
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        results[rank] = {**held, "step_s": median(times[1:]), "peak_rss_mib": _peak_rss_mib()}
    finally:
        dist.destroy_process_group()


def run_case(case: dict) -> dict:
    """Run one (encoder, strategy) case on `case["ranks"]` processes; rank 0's figures and the max RSS."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(case["ranks"], port, case, results), nprocs=case["ranks"], join=True)
    ranks = [results[r] for r in range(case["ranks"])]
    return {
        **{key: ranks[0][key] for key in ("params", "grads", "optimizer")},
        "step_s": max(r["step_s"] for r in ranks),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["vit3d_tiny", "vit3d_small"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="vit3d_tiny, 1 step (a smoke run)")
    parser.add_argument("--save", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    encoders, steps = (["vit3d_tiny"], 1) if args.quick else (args.encoders, args.steps)
    rows = []
    for encoder in encoders:
        measured = {}
        for strategy in ("ddp", "fsdp2"):
            case = {"encoder": encoder, "strategy": strategy, "ranks": args.ranks, "steps": steps}
            measured[strategy] = run_child([__file__, "--case", json.dumps(case)], timeout=1800).report
        ddp = measured["ddp"]
        state = {name: r["params"] + r["optimizer"] for name, r in measured.items()}
        for name, r in measured.items():
            rows.append([
                encoder, name, f"{r['params'] / 2**20:.1f}", f"{r['grads'] / 2**20:.1f}",
                f"{r['optimizer'] / 2**20:.1f}", f"{state[name] / state['ddp']:.2f}x",
                f"{r['step_s']:.2f}", f"{r['step_s'] / ddp['step_s']:.2f}x", f"{r['peak_rss_mib']:.0f}",
            ])  # fmt: skip
    headers = ["encoder", "strategy", "params (MiB/rank)", "grads (MiB/rank)", "AdamW state (MiB/rank)",
               "params + AdamW vs DDP", "step (s)", "step vs DDP", "peak RSS (MiB, max rank)"]  # fmt: skip
    table = markdown_table(headers, rows, [False, False, *[True] * 7])
    text = (
        f"FSDP2 vs DDP on {args.ranks} CPU processes (gloo, 1 torch thread each), AdamW, input "
        f"[2, 1, {', '.join(map(str, IMAGE_SIZE))}] per rank, 16^3 patches, median of {steps} step(s).\n\n"
        f"{table}\n\n{machine_line()}"
    )
    print(text)
    if args.save:
        args.save.write_text(f"# FSDP2 vs DDP\n\n`python benchmarks/fsdp2.py --save {args.save}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
