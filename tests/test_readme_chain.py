"""The README's chain, demo -> pretraining -> every downstream task -> evaluate -> predict, run as
written on a fresh clone, so the commands a new user copies can never drift from the code.

The commands are the `<!-- chain -->` fenced blocks of README.md, which must equal those of
docs/tutorial.md (the same chain, explained). They run in order on a `git clone` of HEAD in
tmp_path, each in its own shell with only small-settings flags appended (one short epoch of
pretraining, a few steps of fine-tuning, a batch or two of evaluation), and each must exit 0
and leave the files the tutorial names. `make demo` runs the real Makefile target and
scripts/demo.sh against a stand-in `.venv` whose `python` is this test's interpreter with the
clone first on PYTHONPATH (the checkout's editable install would otherwise map `fm3d` to
its own sources, not the clone's); `source .venv/bin/activate` is run as written.
Commit before running it: the clone is of HEAD, not of the working tree.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- chain -->"

pytestmark = pytest.mark.slow

# Flags the test appends to each kind of command: small settings, nothing else.
DEMO_ARGS = (
    "--trainer.max_epochs 1 --trainer.limit_train_batches 3 --trainer.check_val_every_n_epoch 1 "
    "--trainer.limit_val_batches 2"
)
# The demo's evaluation suite with fewer bootstrap draws (every protocol still runs).
EVAL_ARGS = "--resamples 50"
SMALL = {
    ("finetune", "fit"): ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                          "--data.loader.num_workers", "0"],
    ("finetune", "predict"): ["--trainer.limit_predict_batches", "1", "--data.loader.num_workers", "0"],
    ("evaluate",): ["--trainer.limit_test_batches", "2", "--data.loader.num_workers", "0"],
}  # fmt: skip


def chain_commands(markdown: str) -> list[str]:
    """The commands of the fenced blocks right after a `<!-- chain -->` line, comments stripped."""
    commands = []
    for block in re.findall(re.escape(MARKER) + r"\s*\n```bash\n(.*?)\n```", markdown, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def small_settings(command: str) -> str:
    """`command` with the test's small-settings flags appended."""
    words = shlex.split(command)
    if words[:2] == ["make", "demo"]:
        return f"{command} DEMO_ARGS={shlex.quote(DEMO_ARGS)} EVAL_ARGS={shlex.quote(EVAL_ARGS)}"
    if words[0] != "fm3d":
        return command
    key = ("evaluate",) if words[1] == "evaluate" else tuple(words[1:3])
    return shlex.join([*words, *SMALL.get(key, [])])


def stand_in_venv(clone: Path) -> None:
    """`.venv/bin/{python,fm3d,activate}` running this interpreter on the clone's sources.

    The clone's `fm3d.commands` entry points are registered from its pyproject.toml in a
    dist-info folder on the same PYTHONPATH (what installing the clone would do), so a command
    the checkout's install does not know yet still resolves. The stamp `make` checks is written
    after the clone's files, so `make demo` goes straight to scripts/demo.sh."""
    bin_dir, site = clone / ".venv" / "bin", clone / ".venv" / "site"
    bin_dir.mkdir(parents=True)
    section = re.search(r'\[project\.entry-points\."fm3d\.commands"\]\n(.*?)(?:\n\[|\Z)',
                        (clone / "pyproject.toml").read_text(), flags=re.S)  # fmt: skip
    pairs = [line.split("=", 1) for line in section.group(1).splitlines() if "=" in line and line[0] != "#"]
    lines = [f"{name.strip()} = {target.strip().strip(chr(34))}" for name, target in pairs]
    dist_info = site / "fm3d_readme_chain-0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fm3d-readme-chain\nVersion: 0\n")
    (dist_info / "entry_points.txt").write_text("[fm3d.commands]\n" + "\n".join(lines) + "\n")
    env = f'export PYTHONPATH="{clone}:{site}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\n{env}exec "{sys.executable}" "$@"\n')
    (bin_dir / "fm3d").write_text(f'#!/usr/bin/env bash\n{env}exec "{sys.executable}" -m fm3d.cli "$@"\n')
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    for script in ("python", "fm3d"):
        (bin_dir / script).chmod(0o755)
    time.sleep(0.01)
    (clone / ".venv" / ".fm3d-installed").touch()


def expected_outputs(command: str) -> list[str]:
    """Glob patterns (under the clone) of what the tutorial says the command writes.

    A fit's checkpoints are under `runs/<task>/latest`; evaluate and predict runs get folders of
    their own beside the fit runs (`latest` keeps naming the fit), found by their contents."""
    words = shlex.split(command)
    if words[:2] == ["make", "demo"]:
        return [f"runs/demo/latest/{path}" for path in
                ("config.yaml", "checkpoints/last.ckpt", "export/encoder/*", "export/clip/*")] + [
            f"runs/eval/demo/latest/{name}" for name in ("results.md", "results.csv", "intervals.png")
        ]  # fmt: skip
    if words[0] != "fm3d":
        return []
    task = Path(words[words.index("--config") + 1]).stem if "--config" in words else None
    if words[1:3] == ["finetune", "fit"]:
        return [f"runs/{task}/latest/checkpoints/last.ckpt", f"runs/{task}/latest/config.yaml"]
    if words[1] == "evaluate":
        return [f"runs/{task}/*/evaluation/metrics.csv"]
    if words[1:3] == ["finetune", "predict"]:
        return [f"runs/{task}/*/predictions/*_seg.nii.gz"]
    if words[1] in {"causal-lm", "text-model"}:
        return [f"{words[words.index('--out') + 1]}/config.json"]
    return []


def test_readme_and_tutorial_give_the_same_chain() -> None:
    readme = chain_commands((REPO / "README.md").read_text())
    tutorial = chain_commands((REPO / "docs" / "tutorial.md").read_text())
    assert readme == tutorial
    assert readme[0] == "make demo" and len(readme) >= 10
    for task in ("segmentation", "classification", "zero_shot", "retrieval", "report_generation", "survival"):
        assert any(f"conf/downstream/{task}.yaml" in c and " evaluate " in f" {c} " for c in readme), task
    assert any(c.startswith("fm3d finetune predict") for c in readme)


def test_the_readme_chain_runs_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "fm3d"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    stand_in_venv(clone)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "FM3D_RUN_DIR", "VIRTUAL_ENV"}}
    env["MPLBACKEND"] = "Agg"
    prelude: list[str] = []  # shell state lines (`source ...`) every later command runs after
    log = tmp_path / "chain.log"
    for command in chain_commands((clone / "README.md").read_text()):
        if command.split()[0] in {"source", "."}:
            prelude.append(command)
            continue
        script = "\n".join(["set -euo pipefail", *prelude, small_settings(command)])
        before = {pattern: set(clone.glob(pattern)) for pattern in expected_outputs(command)}
        start = time.monotonic()
        done = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True)
        took = time.monotonic() - start
        with log.open("a") as f:
            f.write(f"$ {small_settings(command)}  ({took:.0f} s, rc {done.returncode})\n")
            f.write(done.stdout[-4000:] + done.stderr[-4000:] + "\n")
        assert done.returncode == 0, f"{command!r} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        for pattern in expected_outputs(command):
            written = set(clone.glob(pattern)) - before[pattern]
            assert written, f"{command!r} wrote nothing matching {pattern} (log: {log})"
    # The chain ran the clone's code, not the checkout's.
    check = subprocess.run(
        ["bash", "-c", "source .venv/bin/activate && python -c 'import fm3d; print(fm3d.__file__)'"],
        cwd=clone, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert check.stdout.strip().startswith(str(clone))
