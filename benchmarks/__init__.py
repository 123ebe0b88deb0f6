"""fm3d's benchmark suite: one script per area, each printing a markdown table.

`python -m benchmarks [--quick] [--only NAME ...]` runs them all in one go and writes
docs/benchmarks.md; each script also runs alone (`python benchmarks/<name>.py [--quick]`).
"""
