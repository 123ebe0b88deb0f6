"""Run every benchmark under benchmarks/ in one go and write their tables to docs/benchmarks.md.

A benchmark is any `benchmarks/<name>.py` not starting with an underscore. Each runs as its
own process (`python benchmarks/<name>.py [--quick]`), which in turn runs its candidates in
child processes, so every peak RSS is that candidate's own. The script's stdout is its
markdown table; the runner collects them under one machine header, in one file. The matmul
limit runs first so the other tables can be read against it.

    python -m benchmarks                         # everything, the figures of docs/benchmarks.md
    python -m benchmarks --quick                 # smoke run of every script that has --quick
    python -m benchmarks --only matmul_limit encoder_step
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIRST = ("matmul_limit",)  # the limit leads: every other figure is read against it


class BenchmarkNotFoundError(LookupError):
    """`--only` named a script that is not in benchmarks/."""


@dataclass
class ScriptRun:
    """The outcome of one benchmark script: its table (stdout) or why there is none."""

    name: str
    command: list[str]
    status: str  # "ok", "failed" or "skipped"
    stdout: str = ""
    detail: str = ""
    seconds: float = 0.0


def discover(folder: Path = HERE) -> list[str]:
    """Benchmark names in run order: the matmul limit first, then alphabetical."""
    names = sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _script_tree(name: str) -> ast.Module:
    return ast.parse((HERE / f"{name}.py").read_text())


def accepts_quick(name: str) -> bool:
    """Whether the script declares `--quick` (read from its source, so nothing is imported)."""
    for node in ast.walk(_script_tree(name)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            and any(isinstance(a, ast.Constant) and a.value == "--quick" for a in node.args)
        ):
            return True
    return False


def summary_line(name: str) -> str:
    """The first line of the script's docstring: what it measures."""
    doc = ast.get_docstring(_script_tree(name)) or ""
    return doc.splitlines()[0] if doc else ""


def run_script(name: str, quick: bool, timeout: float | None) -> ScriptRun:
    """Run one benchmark script as its own process; its stderr (progress) goes straight to ours."""
    command = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if quick else [])
    if quick and not accepts_quick(name):
        return ScriptRun(
            name, command, "skipped", detail="the script has no --quick option, so a smoke run skips it"
        )
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return ScriptRun(name, command, "failed", detail=f"stopped after {timeout:.0f} s (--timeout)",
                         seconds=time.perf_counter() - started)  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return ScriptRun(name, command, "failed", done.stdout, f"exit status {done.returncode}", seconds)
    return ScriptRun(name, command, "ok", done.stdout, seconds=seconds)


def _machine_table() -> str:
    sys.path.insert(0, str(HERE))  # the scripts' helpers, importable as they are when run as scripts
    from _common import machine, markdown_table

    rows = list(machine().items())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if commit.returncode == 0:  # the code the figures belong to, when run from a checkout
        rows.append(("commit", commit.stdout.strip()))
    return markdown_table(("machine", ""), rows)


def render(runs: list[ScriptRun], argv: list[str], machine_table: str, started: datetime.datetime) -> str:
    """docs/benchmarks.md: the machine, a summary, then every script's own table."""
    from _common import markdown_table

    total = sum(r.seconds for r in runs)
    lines = [
        "# fm3d benchmarks",
        "",
        f"Written by `{' '.join(['python -m benchmarks', *argv])}` on {started:%Y-%m-%d %H:%M} UTC, "
        f"{len(runs)} script(s) in one run ({total / 60:.1f} min). Each script runs as its own process and "
        "each of its candidates in a child process of its own, so every peak RSS is that candidate's alone. "
        "Ratios inside one table (candidate vs reference, candidate vs the matmul limit) were measured in "
        "the same run, interleaved where the script says so; they hold on a busy machine far better than "
        "seconds do, which depend on what else was running (see the load average).",
        "",
        "## Machine",
        "",
        machine_table,
        "",
        "## Scripts",
        "",
        markdown_table(
            ("script", "measures", "status", "wall (s)"),
            [
                (
                    f"[{r.name}](#{r.name})",
                    summary_line(r.name),
                    r.status,
                    f"{r.seconds:.0f}",
                )
                for r in runs
            ],
            (False, False, False, True),
        ),
    ]
    for r in runs:
        lines += ["", f"## {r.name}", "", summary_line(r.name), "", f"`{' '.join(_display(r.command))}`"]
        if r.status == "ok":
            lines += [f"({r.seconds:.0f} s)", "", nest_headings(r.stdout.strip())]
        else:
            lines += ["", f"**{r.status}**: {r.detail}."]
            if r.stdout.strip():
                lines += ["", "```", r.stdout.strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


def nest_headings(markdown: str, levels: int = 2) -> str:
    """A script's markdown with every heading `levels` deeper, so its own `# Title` sits under
    the runner's `## name` (one H1 per page: the docs site's contents list reads it as a page title).
    Lines inside ``` fences are left alone."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#") and line.lstrip("#").startswith(" "):
            line = "#" * levels + line
        lines.append(line)
    return "\n".join(lines)


def _display(command: list[str]) -> list[str]:
    # The interpreter's path says nothing to a reader; the script path relative to the repo does.
    return [
        "python",
        *(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c for c in command[1:]),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: pass --quick to every script")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these scripts (names without .py)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="the markdown file")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds one script may run (default: none)"
    )
    parser.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(f"{n}: {summary_line(n)}" for n in names))
        return 0
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(
                f"no benchmark named {', '.join(unknown)} in {HERE}; choose from {', '.join(names)}."
            )
        names = [n for n in names if n in args.only]
    started = datetime.datetime.now(datetime.timezone.utc)
    machine_table = _machine_table()
    runs = []
    for name in names:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        run = run_script(name, args.quick, args.timeout)
        runs.append(run)
        print(
            f"[benchmarks] {name}: {run.status} in {run.seconds:.0f} s {run.detail}",
            file=sys.stderr,
            flush=True,
        )
        if run.stdout:
            print(f"\n## {name}\n\n{run.stdout.strip()}\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(render(runs, argv, machine_table, started))
    os.replace(partial, args.out)  # a reader never sees half a file
    print(f"[benchmarks] wrote {args.out}", file=sys.stderr)
    return 0 if all(r.status != "failed" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
