"""Run folders: `<runs_root>/<name>/<YYYYmmdd-HHMMSS>/`, a `latest` link beside them, no overwrites.

All ranks of a multi-process run must agree on the run folder: it comes from
`--trainer.default_root_dir`, else `$FM3D_RUN_DIR`, else the SLURM job id
(`<name>/slurm-<jobid>`, stable across requeues), else torchrun's `--rdzv-id`, else a new
timestamped folder that is handed to processes Lightning spawns through `$FM3D_RUN_DIR`;
processes of an external launcher with none of these are refused (each would pick its own).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from fm3d.errors import Fm3dError

RUN_DIR_ENV = "FM3D_RUN_DIR"
LATEST = "latest"
# What `--ckpt_path` may name besides a file: Lightning's own keywords.
CKPT_KEYWORDS = frozenset({"last", "best", "hpc", "registry"})


class RunFolderError(Fm3dError, ValueError):
    """A run folder or checkpoint that a command was pointed at but cannot use."""


def resolve_run_dir(
    name: str,
    runs_root: str | Path,
    default_root_dir: str | Path | None = None,
    ckpt_path: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """The run folder, the same on every rank of one run (see the module docstring for the order).

    With `ckpt_path="last"` and no explicit folder, the newest run of that name that has a
    `checkpoints/last.ckpt` is resumed.
    """
    if default_root_dir is not None:
        return Path(default_root_dir)
    if environ.get(RUN_DIR_ENV):
        return Path(environ[RUN_DIR_ENV])
    base = Path(runs_root) / name
    if ckpt_path == "last":
        candidates = sorted(base.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise RunFolderError(
                f"--ckpt_path last: no earlier run of {name!r} has a checkpoints/last.ckpt under {base}; "
                "pass --trainer.default_root_dir <run folder> or a checkpoint file"
            )
        return candidates[-1].parent.parent
    if environ.get("SLURM_JOB_ID"):
        return base / f"slurm-{environ['SLURM_JOB_ID']}"
    if environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return base / environ["TORCHELASTIC_RUN_ID"]
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        # Processes started by a launcher (torchrun without --rdzv-id) would each pick a clock
        # of their own, and so different folders.
        raise RunFolderError(
            f"{environ['WORLD_SIZE']} processes and nothing they agree on to name the run folder: "
            "pass --trainer.default_root_dir <run folder> (or torchrun's --rdzv-id)"
        )
    return new_run_dir(base)


def new_run_dir(base: Path) -> Path:
    """`base/<timestamp>`, suffixed `-2`, `-3`, ... when a run of the same second already has it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, count = base / stamp, 1
    while candidate.exists():
        count += 1
        candidate = base / f"{stamp}-{count}"
    return candidate


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Refuse a `--ckpt_path` that is neither one of Lightning's keywords nor an existing file/folder."""
    if ckpt_path is None or ckpt_path in CKPT_KEYWORDS or Path(ckpt_path).exists():
        return
    raise RunFolderError(
        f"--ckpt_path {ckpt_path}: no such file; pass a checkpoint of an earlier run "
        "(e.g. runs/<name>/latest/checkpoints/last.ckpt) or 'last'"
    )


@rank_zero_only
def point_latest(run_dir: str | Path) -> Path | None:
    """Make `<run_dir>/../latest` a relative symlink to `run_dir`, replaced atomically.

    Callers link only run folders laid out under a runs root (`<runs_root>/<name>/<run>`), so
    `runs/<name>/latest/...` always names the newest run of that name. Returns the link, or
    None when the file system refuses symlinks.
    """
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)
        return None
    return link


def unique_path(path: Path) -> Path:
    """`path` if nothing is there yet, else `stem-2.suffix`, `stem-3.suffix`, ...: never overwrite."""
    candidate, count = path, 1
    while candidate.exists():
        count += 1
        candidate = path.with_name(f"{path.stem}-{count}{path.suffix}")
    return candidate
