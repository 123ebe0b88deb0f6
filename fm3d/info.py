"""`fm3d info`: what this installation can run — versions, attention backends, devices.

The first thing to paste into a bug report, and the quickest check that a cluster node sees
its GPUs and that xformers is importable there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from fm3d.cli import summary_line
from fm3d.models.attention import ENV_VAR, available_backends, resolve_backend

PACKAGES = ("fm3d", "torch", "monai", "lightning", "xformers", "safetensors", "transformers")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, Any]:
    """Versions, devices and the attention backend `auto` picks on each device and dtype."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    attention = {}
    for device in devices:
        picks = {}
        for dtype in (torch.float32, torch.bfloat16):
            probe = torch.empty(1, 1, 1, 8, dtype=dtype, device=device)
            picks[str(dtype).removeprefix("torch.")] = resolve_backend("auto", probe)
        attention[device] = {"available": available_backends(device), "auto": picks}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
        "cuda": {
            "built_with": torch.version.cuda,
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "cpu_threads": torch.get_num_threads(),
        "attention": attention,
        "attention_env": {ENV_VAR: os.environ.get(ENV_VAR)},
    }


def _render(info: dict[str, Any]) -> str:
    lines = [f"python        {info['python']} on {info['platform']}"]
    lines += [f"{name:<14}{ver}" for name, ver in info["versions"].items()]
    cuda = info["cuda"]
    lines.append(f"cuda          built with {cuda['built_with']}, available: {cuda['available']}")
    lines += [f"  cuda:{i}    {name}" for i, name in enumerate(cuda["devices"])]
    lines.append(f"cpu threads   {info['cpu_threads']}")
    lines.append(f"attention     ({ENV_VAR}={info['attention_env'][ENV_VAR] or 'unset'})")
    for device, entry in info["attention"].items():
        picks = ", ".join(f"{dtype} -> {backend}" for dtype, backend in entry["auto"].items())
        lines.append(f"  {device:<9} available: {', '.join(entry['available'])}; auto: {picks}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the installation report (human-readable, or JSON with --json)."""
    parser = argparse.ArgumentParser(prog="fm3d info", description=summary_line(__doc__))
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else _render(info))
    return 0
