"""`fm3d pretrain plan`: what a pretraining config costs, before any data, cache or GPU is touched.

    fm3d pretrain plan --config conf/recipes/merlin.yaml --volumes 15331 --gpu H100
    fm3d pretrain plan --config conf/recipes/voco_v2.yaml --volumes 160000 --gpu A100-80GB --gpus 8 --mfu 0.3

A subcommand of its own rather than a `--dry_run` flag of `fit`: `fit` makes a run folder, an
MLflow run and a Trainer, and needs the prepared cache; the plan needs none of them, and takes
options (`--volumes`, `--gpu`, `--mfu`) that mean nothing to `fit`.

The config is parsed by the same LightningCLI parser as `fit`, so a recipe that plans is a recipe
that parses. The PretrainModule is built exactly as `fit` builds it (on CPU, from the config),
then moved to the meta device, where one training step at batch 1 runs without computing
anything: `torch.utils.flop_counter.FlopCounterMode` counts its forward and backward FLOPs, and
a saved-tensors hook adds up the activations autograd keeps for the backward pass. The batch is
made by the config's own views (`fm3d.data.views`) from a blank volume, so every tensor has the
shape the data module would serve; reports are a text of `max_length` tokens, every row counts
as having a report and EHR (the most expensive step). Ops whose output size depends on values
(boolean masks, `.item()`) are answered as if every mask were true (`_AllTrue`).

Figures per GPU: FLOPs and activations scale with the per-GPU batch (`data.loader.batch_size`);
model state is 16 bytes per trainable parameter (fp32 weights, gradients and AdamW's two
moments) and 4 per frozen one. Activation memory is measured in fp32; under bf16 autocast the
matmul activations are bf16, so it is given halved there (an estimate: norms and softmax
statistics stay fp32). With activation checkpointing the kept tensors are measured with the
encoder's checkpointing on, plus one checkpointed segment recomputed during backward, estimated
as (activations without - kept with) / segments, segments = the family's depth (ViT blocks,
ResNet stages, Swin stages). GPU-hours = training samples x FLOPs per sample / (the GPU's dense
bf16 peak x MFU); the peaks are datasheet figures (`GPUS`, with sources).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fm3d.cli_errors import did_you_mean, report
from fm3d.data.datamodule import CTDataModule
from fm3d.data.views import GlobalView
from fm3d.errors import Fm3dError
from fm3d.models.registry import encoder_family
from fm3d.parsing import ArgumentParser
from fm3d.spec import InputSpec
from fm3d.train.cli import RunCLI
from pretrain.module import PretrainModule
from pretrain.run_cli import PretrainCLI
from pretrain.step_count import StepMeasure, measure, measure_cpu_step, planning_batch

GIB = 2**30
ADAMW_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
FROZEN_BYTES_PER_PARAM = 4
DEFAULT_MFU = 0.4


class PlanError(Fm3dError, ValueError):
    """A plan that cannot be made: an unknown GPU, a bad MFU or volume count, a config that does not build."""


@dataclass(frozen=True)
class GPU:
    """A GPU's dense (no sparsity) bf16 tensor-core peak and memory, from its datasheet."""

    name: str
    bf16_tflops: float
    memory_gib: float
    source: str


# Dense bf16 peaks (the datasheets' "with sparsity" figures are twice these).
GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU(
            "H100",
            989.0,
            80,
            "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity",
        ),
        GPU("H100-PCIe", 756.0, 80, "NVIDIA H100 datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity"),
        GPU(
            "H200",
            989.0,
            141,
            "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity",
        ),
        GPU(
            "A100-80GB",
            312.0,
            80,
            "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 with sparsity)",
        ),
        GPU(
            "A100-40GB",
            312.0,
            40,
            "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 with sparsity)",
        ),
        GPU("L40S", 362.05, 48, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity)"),
        GPU("L4", 121.0, 24, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity"),
        GPU("A6000", 154.8, 48, "NVIDIA RTX A6000 datasheet: tensor performance 309.7 TFLOPS with sparsity"),
        GPU("B200", 2250.0, 180, "NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity"),
        GPU("MI300X", 1307.4, 192, "AMD Instinct MI300X datasheet: BF16 1307.4 TFLOPS dense"),
    )
}


@dataclass
class Plan:
    """What one pretraining config costs; `render()` is what `fm3d pretrain plan` prints."""

    config: str
    encoder: str
    input_spec: InputSpec
    spacing_source: str
    tokens: dict[str, tuple[int, int]]
    encoder_params: int
    head_params: int
    frozen_params: int
    batch_size: int
    grad_checkpointing: bool
    precision: str
    step: StepMeasure
    saved_bytes_without: int
    saved_bytes_with: int
    segments: int
    gpu: GPU
    gpus: int
    mfu: float
    volumes: int
    epochs: float
    epochs_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def flops_per_sample(self) -> int:
        """Forward + backward FLOPs of one sample, with the recipe's activation checkpointing."""
        return self.step.flops

    @property
    def flops_per_step(self) -> int:
        """FLOPs of one optimizer step on one GPU (the per-GPU batch)."""
        return self.flops_per_sample * self.batch_size

    @property
    def activation_scale(self) -> float:
        """Bytes per measured fp32 activation byte at the recipe's precision (see the module docstring)."""
        return 0.5 if "16" in self.precision else 1.0

    @property
    def activation_gib_without(self) -> float:
        """Activation memory per GPU without checkpointing, GiB."""
        return self.saved_bytes_without * self.batch_size * self.activation_scale / GIB

    @property
    def activation_gib_with(self) -> float:
        """Activation memory per GPU with checkpointing: kept tensors plus one recomputed segment, GiB."""
        segment = max(self.saved_bytes_without - self.saved_bytes_with, 0) / max(self.segments, 1)
        return (self.saved_bytes_with + segment) * self.batch_size * self.activation_scale / GIB

    @property
    def state_gib(self) -> float:
        """Weights, gradients and AdamW moments per GPU (DDP keeps a full copy on each), GiB."""
        trainable = self.encoder_params + self.head_params
        return (trainable * ADAMW_BYTES_PER_PARAM + self.frozen_params * FROZEN_BYTES_PER_PARAM) / GIB

    @property
    def samples(self) -> float:
        return self.volumes * self.epochs

    @property
    def gpu_hours(self) -> float:
        """GPU-hours of the whole run at the assumed MFU on the named GPU."""
        return self.samples * self.flops_per_sample / (self.gpu.bf16_tflops * 1e12 * self.mfu) / 3600

    def render(self) -> str:
        spec = self.input_spec
        lines = [
            f"plan for {self.config}",
            f"  encoder            {self.encoder}, input {_shape(spec.image_size)} voxels at "
            f"{_shape(spec.target_spacing_mm, 'x', '{:g}')} mm ({self.spacing_source}), "
            f"HU {_shape(spec.hu_window, '..', '{:g}')} -> {_shape(spec.intensity_range, '..', '{:g}')}",
        ]
        for view, (tokens, count) in self.tokens.items():
            lines.append(f"  tokens / volume    {view}: {count} x {tokens:,} = {count * tokens:,}")
        lines += [
            f"  parameters         encoder {_millions(self.encoder_params)}, heads "
            f"{_millions(self.head_params)} (trainable), frozen {_millions(self.frozen_params)}",
            f"  FLOPs / sample     {_tera(self.flops_per_sample)} (forward {_tera(self.step.forward_flops)}, "
            f"backward {_tera(self.step.backward_flops)}"
            + (", with checkpoint recompute)" if self.grad_checkpointing else ")"),
        ]
        if self.step.flops_by_part:
            lines.append("    forward by part:")
        for part, flops in self.step.flops_by_part.items():
            lines.append(f"      {part:<21} {_tera(flops)}")
        lines += [
            f"  FLOPs / GPU step   {_tera(self.flops_per_step)} at batch {self.batch_size} per GPU",
            f"  activations / GPU  {self.activation_gib_without:.1f} GiB without checkpointing, "
            f"{self.activation_gib_with:.1f} GiB with ({self.precision}; recipe: checkpointing "
            f"{'on' if self.grad_checkpointing else 'off'})",
            f"  model state / GPU  {self.state_gib:.1f} GiB (fp32 weights, gradients, AdamW moments)",
            f"  memory / GPU       {self.state_gib + self.activation_gib_without:.1f} GiB without, "
            f"{self.state_gib + self.activation_gib_with:.1f} GiB with checkpointing, of "
            f"{self.gpu.memory_gib:g} GiB on {self.gpu.name}",
            f"  training           {self.volumes:,} volumes x {self.epochs:.3g} epochs "
            f"({self.epochs_source}) = {self.samples:,.0f} samples",
            f"  GPU-hours          {self.gpu_hours:,.1f} on {self.gpu.name} ({self.gpu.bf16_tflops:g} "
            f"dense bf16 TFLOP/s x MFU {self.mfu:g}); {self.gpu_hours / self.gpus:,.1f} h wall on "
            f"{self.gpus} GPU(s)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def gpu_named(name: str) -> GPU:
    """The GPU of `GPUS` named `name` (case-insensitive); an unknown name lists the nearest ones."""
    by_key = {key.lower(): gpu for key, gpu in GPUS.items()}
    gpu = by_key.get(name.lower())
    if gpu is None:
        raise PlanError(f"--gpu {name!r} is not in the datasheet table{did_you_mean(name, list(GPUS))}; "
                        f"known: {', '.join(GPUS)}")  # fmt: skip
    return gpu


def _epochs(
    trainer: Mapping[str, Any], epochs: float | None, volumes: int, global_batch: int
) -> tuple[float, str]:
    if epochs is not None:
        return float(epochs), "--epochs"
    max_epochs = trainer.get("max_epochs")
    max_steps = trainer.get("max_steps")
    if max_steps is not None and int(max_steps) > 0:
        return int(max_steps) * global_batch / volumes, (
            f"trainer.max_steps {int(max_steps):,} x global batch {global_batch}"
        )
    if max_epochs is not None and int(max_epochs) > 0:
        return float(max_epochs), "trainer.max_epochs"
    return 1.0, "no max_steps or max_epochs in the config: one epoch"


def make_plan(
    module: PretrainModule,
    datamodule: CTDataModule,
    trainer: Mapping[str, Any],
    *,
    config: str,
    volumes: int,
    gpu: str = "H100",
    gpus: int = 1,
    mfu: float = DEFAULT_MFU,
    epochs: float | None = None,
) -> Plan:
    """The plan of a built module and data module (see the module docstring for every estimate)."""
    if volumes < 1:
        raise PlanError(f"--volumes must be at least 1, got {volumes}")
    if not 0.0 < mfu <= 1.0:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {gpus}")
    device = gpu_named(gpu)
    input_spec, spacing_source = _input_spec(datamodule)
    encoder_params = sum(p.numel() for p in module.encoder.parameters())
    encoder_ids = {id(p) for p in module.encoder.parameters()}
    others = [p for p in module.parameters() if id(p) not in encoder_ids]
    head_params = sum(p.numel() for p in others if p.requires_grad)
    frozen_params = sum(p.numel() for p in others if not p.requires_grad)
    batch_size = int(datamodule.loader_settings.batch_size)
    epoch_count, epochs_source = _epochs(trainer, epochs, volumes, batch_size * gpus)
    batch = planning_batch(module, datamodule, input_spec)
    checkpointing = bool(module.encoder.config.grad_checkpointing)
    family = encoder_family(module.encoder)
    segments = int(family.depth(module.encoder.config)) if family is not None else 1
    step, without, with_ = measure(module, batch)
    notes = []
    if any(getattr(o, "clip", None) is not None and not o.frozen_text for o in module.objectives.values()):
        notes.append("reports counted at max_length tokens (the text tower's longest input)")
    return Plan(
        config=config,
        encoder=module.encoder_name,
        input_spec=input_spec,
        spacing_source=spacing_source,
        tokens=step.tokens,
        encoder_params=encoder_params,
        head_params=head_params,
        frozen_params=frozen_params,
        batch_size=batch_size,
        grad_checkpointing=checkpointing,
        precision=str(trainer.get("precision") or "32-true"),
        step=step,
        saved_bytes_without=without,
        saved_bytes_with=with_,
        segments=segments,
        gpu=device,
        gpus=gpus,
        mfu=mfu,
        volumes=volumes,
        epochs=epoch_count,
        epochs_source=epochs_source,
        notes=notes,
    )


def _input_spec(datamodule: CTDataModule) -> tuple[InputSpec, str]:
    """The data's input spec, and where its spacing came from."""
    spec = datamodule.input_spec
    source = getattr(datamodule, "spacing_source", f"the prepared cache {datamodule.cache_dir}")
    return spec, source


def _shape(values: Any, sep: str = " x ", fmt: str = "{}") -> str:
    return "any" if values is None else sep.join(fmt.format(v) for v in values)


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M"


def _tera(flops: float) -> str:
    return f"{flops / 1e12:,.3f} TFLOP" if flops >= 1e10 else f"{flops / 1e9:,.3f} GFLOP"


class UnpreparedDataModule(CTDataModule):
    """`CTDataModule` whose input spec does not need the prepared cache: a plan is made before one exists.

    With a prepared cache at `cache_dir` the spec is the cache's (its spacing); without one the
    spacing is fm3d's default, which only changes what millimetre extents (DINO's multi-crop)
    cover, never a crop's voxel size, so the plan's figures stand.
    """

    spacing_source = "the prepared cache"

    @property
    def input_spec(self) -> InputSpec:
        try:
            spec = super().input_spec
        except Fm3dError:
            self.spacing_source = f"fm3d's default spacing: no prepared cache at {self.cache_dir}"
            views = self.spec.views
            sizes = [view.image_size for view in views if view.image_size is not None]
            global_sizes = [view.image_size for view in views if isinstance(view, GlobalView)]
            return InputSpec(
                hu_window=self.spec.hu_window,
                intensity_range=self.spec.intensity_range,
                image_size=(global_sizes or sizes or [None])[0],
            )
        self.spacing_source = f"the prepared cache {self.cache_dir}"
        return spec


class PlanCLI(PretrainCLI):
    """`fit`'s parser and model building, without a run folder, a Trainer or the prepared cache."""

    def __init__(self, args: list[str] | None = None) -> None:
        RunCLI.__init__(
            self,
            model_class=PretrainModule,
            datamodule_class=UnpreparedDataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_class=ArgumentParser,
            parser_kwargs={
                "prog": "fm3d pretrain plan",
                "description": "Tokens, parameters, FLOPs, memory and GPU-hours of a pretraining config, "
                "from the config alone (no data, no GPU).",
            },
            args=args,
            run=False,
        )

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--volumes", type=int, default=10000, help="training volumes (an epoch's samples)"
        )
        parser.add_argument(
            "--epochs",
            type=float | None,
            default=None,
            help="epochs over --volumes; default: trainer.max_steps x global batch / volumes, else "
            "trainer.max_epochs",
        )
        parser.add_argument("--gpu", type=str, default="H100", help=f"GPU of the estimate: {', '.join(GPUS)}")
        parser.add_argument(
            "--gpus", type=int, default=1, help="GPUs sharing the run (global batch, wall time)"
        )
        parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed")
        parser.add_argument(
            "--cpu_step",
            type=bool,
            default=False,
            help="also time one real CPU step at batch 1 and print the implied GFLOP/s (small configs only)",
        )

    def before_instantiate_classes(self) -> None:
        """No run folder, MLflow store or `latest` link: a plan leaves nothing behind."""

    def instantiate_classes(self) -> None:
        """The data and model modules as `fit` builds them (the input spec linked); no Trainer."""
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d pretrain plan` (mounted by `pretrain.cli.main`)."""
    prog = "fm3d pretrain plan"
    try:
        cli = PlanCLI(args=argv)
        config = cli.config
        sources = [str(path) for path in (config.get("config") or [])]
        trainer = config.trainer.as_dict() if hasattr(config.trainer, "as_dict") else dict(config.trainer)
        cpu = None
        if config.cpu_step:
            cpu = measure_cpu_step(
                cli.model, planning_batch(cli.model, cli.datamodule, cli.datamodule.input_spec)
            )
        plan = make_plan(
            cli.model,
            cli.datamodule,
            trainer,
            config=", ".join(sources) or str(config.name or "the command line"),
            volumes=config.volumes,
            gpu=config.gpu,
            gpus=config.gpus,
            mfu=config.mfu,
            epochs=config.epochs,
        )
    except Fm3dError as exc:
        return report(prog, str(exc))
    print(plan.render())
    if cpu is not None:
        seconds, flops = cpu
        meta = plan.flops_per_sample
        print(f"  CPU check          one real step at batch 1 in {seconds:.3f} s: "
              f"{meta / seconds / 1e9:,.1f} GFLOP/s implied by the plan's {meta / 1e9:,.2f} GFLOP (the real "
              f"step's counter, blind to CPU flash attention, saw {flops / 1e9:,.2f})")  # fmt: skip
    return 0
