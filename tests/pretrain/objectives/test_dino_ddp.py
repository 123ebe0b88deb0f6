"""Issue 19: two-process (gloo, CPU) DINO equals one process on the joined batch.

Sinkhorn-Knopp normalises over the global batch and `TeacherCenter.update` averages the global
batch, both through all_reduce: each rank's Sinkhorn rows must equal the matching rows of the
single-process result, and both ranks must hold the single-process centre. Ranks hold equal
rows, unequal rows, and no row at all (a rank without a masked patch, for iBOT). Then the
whole objective: SGD steps and EMA updates under DDP move the teacher and the centres as one
process does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))  # spawn imports the worker module by name
import dino_ddp_worker

ROWS, PROTOTYPES = 6, 10
SPLITS = {
    "equal": [(0, 3), (3, 6)],
    "unequal": [(0, 4), (4, 6)],
    "empty_rank": [(0, 6), (6, 6)],
}


@pytest.mark.slow
def test_two_process_targets_and_centre_equal_single_process(tmp_path):
    torch.manual_seed(0)
    inputs = {
        "logits": torch.randn(ROWS, PROTOTYPES),
        "batches": [torch.randn(ROWS, PROTOTYPES) + 1.0, torch.randn(ROWS, PROTOTYPES) - 0.5],
    }
    mp.spawn(dino_ddp_worker.run, args=(2, inputs, SPLITS, str(tmp_path)), nprocs=2, join=True)
    single = dino_ddp_worker.targets_and_centres(inputs["logits"], inputs["batches"])
    # Not a comparison of trivial values: the targets are far from a softmax, the centres moved.
    assert (single["sinkhorn"] - torch.softmax(inputs["logits"] / 0.07, dim=-1)).abs().max() > 0.1
    assert single["centres"][1].abs().min() > 0
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, bounds in SPLITS.items():
        for rank, (start, stop) in enumerate(bounds):
            result = ranks[rank][name]
            torch.testing.assert_close(
                result["sinkhorn"], single["sinkhorn"][start:stop], rtol=1e-5, atol=1e-6, msg=name
            )
            for centre, expected in zip(result["centres"], single["centres"], strict=True):
                torch.testing.assert_close(centre, expected, rtol=1e-6, atol=1e-7, msg=name)
            if 0 < stop - start < ROWS:  # the rank's rows alone give other values: the reduction matters
                alone = dino_ddp_worker.targets_and_centres(
                    inputs["logits"][start:stop], [batch[start:stop] for batch in inputs["batches"]]
                )
                assert not torch.allclose(alone["sinkhorn"], single["sinkhorn"][start:stop], atol=1e-3)
                assert not torch.allclose(alone["centres"][1], single["centres"][1], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_two_ddp_processes_move_teacher_and_centre_as_one_process_on_the_joined_batch(tmp_path, centering):
    """Two gloo ranks with half the batch each end with the teacher and centre of one process.

    The DINO and iBOT terms are means over the rows, the running centre and Sinkhorn-Knopp
    reduce over ranks, and DDP averages gradients: after two SGD steps and EMA updates the
    teacher encoder, heads and centres equal a single process's on the joined batch, and the
    mean of the ranks' losses equals its loss.
    """
    from test_dino import multicrop_batch

    batch = multicrop_batch(batch_size=4, seed=3)
    mp.spawn(dino_ddp_worker.run_objective, args=(2, centering, batch, str(tmp_path)), nprocs=2, join=True)
    student = dino_ddp_worker.Student(centering)
    single = dino_ddp_worker.train(student, student, batch)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(
        (ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"], rtol=1e-5, atol=1e-6
    )
    moved = 0
    for key, value in single.items():
        if key.startswith("state."):
            for rank in ranks:
                torch.testing.assert_close(rank[key], value, rtol=1e-4, atol=1e-5, msg=key)
            moved += 1
    assert moved > 10
    initial = dino_ddp_worker.Student(centering).objective.state_dict()
    assert not torch.equal(
        single["state.teacher_encoder.blocks.0.attn.qkv.weight"],
        initial["teacher_encoder.blocks.0.attn.qkv.weight"],
    )
