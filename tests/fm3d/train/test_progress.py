"""Progress lines where stdout is a pipe (a log file, SLURM, CI), a live bar on a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import time

from lightning.pytorch.callbacks import TQDMProgressBar

from fm3d.train.progress import LineProgress, format_duration, progress
from fm3d.train.progress_bar import PlainProgressBar, progress_callbacks

LIGHTNING_RUN = textwrap.dedent(
    """
    import time
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from fm3d.train.progress_bar import progress_callbacks

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            time.sleep(0.02)
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train/loss", loss, prog_bar=True)
            return loss
        def validation_step(self, batch, batch_idx):
            pass
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=progress_callbacks([], enabled=True, every_s=0.0),
    )
    trainer.fit(Tiny(), data, data)
    """
)


def test_a_lightning_run_prints_plain_lines_into_a_pipe() -> None:
    done = subprocess.run([sys.executable, "-c", LIGHTNING_RUN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "fit: start, 0/6 steps" in lines
    steps = [
        line for line in lines if re.fullmatch(r"fit: step \d/6 epoch \d loss \S+ \S+ it/s ETA \S+", line)
    ]
    assert len(steps) >= 4  # every step at every_s=0
    assert any(line.startswith("validate: start, 0/3 batches") for line in lines)
    assert re.fullmatch(r"fit: done: step 6/6 epoch \d loss \S+ \S+ it/s ETA \S+ in 0:00:\d\d", lines[-1])
    assert "\r" not in done.stdout  # no carriage-return bar in a log


def test_a_plain_loop_prints_lines_into_a_pipe() -> None:
    script = (
        "import time\n"
        "from fm3d.train.progress import progress\n"
        "for _ in progress(range(20), 'work', unit='item', every_s=0.05):\n"
        "    time.sleep(0.01)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "work: start, 0/20 item"
    assert any(re.fullmatch(r"work: \d+/20 item \S+ item/s ETA \d:\d\d:\d\d", line) for line in lines[1:-1])
    assert re.fullmatch(r"work: 20/20 item \S+ item/s ETA 0:00:00 done in 0:00:0\d", lines[-1])


def test_the_tqdm_interface_prepare_uses() -> None:
    out = io.StringIO()
    bar = progress(total=5, initial=2, desc="fm3d prepare", unit="study", every_s=0.0, stream=out)
    assert isinstance(bar, LineProgress)
    for _ in range(3):
        bar.update()
        bar.set_postfix({"prepared": 1, "failed": 0}, refresh=False)
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert lines[0] == "fm3d prepare: start, 2/5 study"
    assert lines[-1].startswith("fm3d prepare: 5/5 study") and lines[-1].endswith("done in 0:00:00")
    assert "prepared=1 failed=0" in lines[-1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_its_bar() -> None:
    configured = [TQDMProgressBar()]
    assert progress_callbacks(configured, enabled=True, every_s=30, stream=_Terminal()) == configured
    piped = progress_callbacks(configured, enabled=True, every_s=30, stream=io.StringIO())
    assert [type(c) for c in piped] == [PlainProgressBar]
    assert progress_callbacks([], enabled=False, every_s=30, stream=io.StringIO()) == []
    assert not isinstance(progress(range(3), "x", stream=_Terminal()), LineProgress)


def test_durations_read_as_clock_time() -> None:
    assert format_duration(421) == "0:07:01"
    assert format_duration(float("inf")) == "?"


def test_frequent_validation_does_not_silence_the_fit_lines() -> None:
    # Validation after every 0.2 s epoch; a clock shared with validation never let a 0.3 s fit
    # line through (the demo printed nothing for 4.5 min while validating every 5 epochs).
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Slow(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(0.05)
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx) -> None:
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    stream = io.StringIO()
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[PlainProgressBar(every_s=0.3, stream=stream)],
    )
    trainer.fit(Slow(), data, data)
    lines = stream.getvalue().splitlines()
    assert sum(line.startswith("validate: done") for line in lines) == 8
    assert len([line for line in lines if re.match(r"fit: step \d+/32 ", line)]) >= 3  # ~1.6 s of steps
