"""`fm3d info`: the report's content, in-process."""

from __future__ import annotations

import json

import torch

import fm3d
from fm3d.info import collect, main


def test_collect_reports_versions_and_cpu_backends():
    info = collect()
    assert info["versions"]["fm3d"] == fm3d.__version__
    assert info["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    cpu = info["attention"]["cpu"]
    assert cpu["available"] == ["sdpa", "math"]
    assert cpu["auto"] == {"float32": "sdpa", "bfloat16": "sdpa"}
    assert info["cuda"]["available"] == torch.cuda.is_available()


def test_main_prints_json(capsys):
    assert main(["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "cpu" in printed["attention"]
