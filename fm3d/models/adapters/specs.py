"""The preprocessing each peer trained with, as data: one `PeerPreprocessing` per peer, with sources.

A peer's weights only mean something on the input they were trained on, and that input is
scattered over papers, training scripts and issue threads. This table holds it in one place:
spacing, HU window, intensity scaling, axis order and input size as an `fm3d.spec.InputSpec`,
what the spec cannot say (orientation flips, several windows, resizing) as text, and where
every value comes from. The adapters take their encoders' input spec from here, so
`fm3d.load_encoder` of a Merlin, M3D-CLIP, VoCo or MONAI file hands back the preprocessing
its peer used (`fm3d.preprocessing(encoder)`); the recipes in conf/recipes/ train with the same
values (tests/fm3d/models/adapters/test_specs.py keeps the two from drifting apart).

Peers whose weights fm3d does not load (CT-CLIP's CTViT, Pillar-0's Atlas, SPECTRE's RoPE ViT)
are here too: their recipes reproduce their training, and the entry says what it used.
Spacing is always (D, H, W) = (z, y, x) in mm, as `InputSpec` has it; `image_size` is in the
spec's axis order ("xyz" for MONAI-style peers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fm3d.cli_errors import did_you_mean
from fm3d.models.adapters.matching import PeerWeightsError
from fm3d.spec import InputSpec


@dataclass(frozen=True)
class PeerPreprocessing:
    """What a peer's encoder saw in training, and where each value was published.

    peer: the peer's name as people cite it.
    citation: its paper and repository, for `config.source`.
    spec: spacing, HU window, intensity range, axis order and input size (`InputSpec`).
    orientation: how the peer orients the volume before its network, in words.
    not_in_spec: what the peer does that an `InputSpec` cannot hold; '' when nothing.
    assumed: spec fields the peer did not publish (or cannot state): fm3d's values stand in,
        and the loaded encoder lists them in `config.source["spec_assumed"]`.
    formats: fm3d peer formats (`peer_formats()`) whose weights this describes; () when no
        adapter loads the peer's weights.
    recipe: the conf/recipes/ file (stem) that reproduces the peer's training, or None.
    recipe_view: the recipe's view whose size is `spec.image_size` (in fm3d's axes); None when
        the recipe trains on crops of another size (said in `not_in_spec`).
    sources: spec field (or "orientation") -> where its value comes from.
    """

    peer: str
    citation: str
    spec: InputSpec
    orientation: str
    sources: Mapping[str, str]
    not_in_spec: str = ""
    assumed: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    recipe: str | None = None
    recipe_view: str | None = None

    def config_fields(self) -> dict[str, Any]:
        """The encoder config's input-spec fields; an unknown image size (None) is left to the file."""
        fields = {f.name: getattr(self.spec, f.name) for f in dataclasses.fields(InputSpec)}
        if fields["image_size"] is None:
            del fields["image_size"]
        return fields

    def source_fields(self) -> dict[str, Any]:
        """What a loaded encoder's `config.source` records of its preprocessing."""
        fields: dict[str, Any] = {"preprocessing": f"{self.peer}: {self.citation}"}
        if self.assumed:
            fields["spec_assumed"] = list(self.assumed)
        return fields

    @property
    def image_size_zyx(self) -> tuple[int, int, int] | None:
        """`spec.image_size` in fm3d's (D, H, W) order, whatever the spec's axis order."""
        size = self.spec.image_size
        if size is None or self.spec.axis_order == "zyx":
            return size
        return (size[2], size[1], size[0])


MERLIN_REPO = "github.com/StanfordMIMI/Merlin"
CT_CLIP_REPO = "github.com/ibrahimethemhamamci/CT-CLIP (commit 13d84fb)"
M3D_REPO = "github.com/BAAI-DCAI/M3D"
VOCO_REPO = "github.com/Luffy03/VoCo and github.com/Luffy03/Large-Scale-Medical"
PILLAR_REPOS = "github.com/YalaLab/pillar-pretrain, github.com/YalaLab/rate-evals"
SPECTRE_REPO = "github.com/cclaess/SPECTRE (commit 9260676)"

PEERS: dict[str, PeerPreprocessing] = {
    "merlin": PeerPreprocessing(
        peer="Merlin",
        citation=f"arXiv 2406.06512; {MERLIN_REPO}",
        spec=InputSpec(
            target_spacing_mm=(3.0, 1.5, 1.5),
            hu_window=(-1000.0, 1000.0),
            intensity_range=(0.0, 1.0),
            axis_order="zyx",
            image_size=(160, 224, 224),
        ),
        orientation="RAS; Merlin permutes MONAI's (x, y, z) array to (z, x, y), which the adapter "
        "absorbs by transposing the in-plane kernels, so the encoder takes fm3d's (z, y, x)",
        sources={
            "target_spacing_mm": f"{MERLIN_REPO} merlin/data/monai_transforms.py: Spacingd 1.5 x 1.5 x 3 mm",
            "hu_window": f"{MERLIN_REPO} merlin/data/monai_transforms.py: ScaleIntensityRanged -1000..1000",
            "intensity_range": f"{MERLIN_REPO} merlin/data/monai_transforms.py: b_min 0, b_max 1",
            "image_size": f"{MERLIN_REPO} merlin/data/monai_transforms.py: SpatialPadd / CenterSpatialCropd "
            "224 x 224 x 160 (x, y, z)",
            "orientation": f"{MERLIN_REPO} merlin/models/i3res.py: permute to (z, x, y) before the stem",
        },
        formats=("merlin",),
        recipe="merlin",
        recipe_view="image",
    ),
    "ct_clip": PeerPreprocessing(
        peer="CT-CLIP",
        citation=f"arXiv 2403.17834; {CT_CLIP_REPO}",
        spec=InputSpec(
            target_spacing_mm=(1.5, 0.75, 0.75),
            # The training window. The first inference loader clipped -1000..200 (the drift of
            # fm3d issue 22); weights trained on -1000..1000 see that range.
            hu_window=(-1000.0, 1000.0),
            intensity_range=(-1.0, 1.0),
            axis_order="zyx",
            image_size=(240, 480, 480),
        ),
        orientation="the NIfTI array permuted to (slices, rows, columns) = fm3d's (D, H, W)",
        sources={
            "target_spacing_mm": f"{CT_CLIP_REPO} scripts/data.py: resampled to 0.75 x 0.75 x 1.5 mm",
            "hu_window": f"{CT_CLIP_REPO} scripts/data.py nii_img_to_tensor: clip -1000..1000 (training); "
            "scripts/data_inference.py (commits 40427c1, 0f679cb) clipped -1000..200",
            "intensity_range": f"{CT_CLIP_REPO} scripts/data.py: HU / 1000 -> -1..1",
            "image_size": f"{CT_CLIP_REPO} scripts/data.py: pad with -1 / centre-crop to 480 x 480 x 240",
            "orientation": f"{CT_CLIP_REPO} scripts/data.py: permuted to (240, 480, 480)",
        },
        not_in_spec="CTViT's weights do not load into fm3d (no adapter): the entry serves the recipe",
        recipe="ct_clip",
        recipe_view="image",
    ),
    "m3d_clip": PeerPreprocessing(
        peer="M3D-CLIP",
        citation=f"arXiv 2404.00578; {M3D_REPO}",
        spec=InputSpec(intensity_range=(0.0, 1.0), axis_order="zyx", image_size=(32, 256, 256)),
        orientation="8-bit display slices stacked as (slice, row, column); display rows and columns "
        "run opposite to RAS y and x",
        sources={
            "intensity_range": f"{M3D_REPO} Data/process/m3d_cap_data_prepare.py: min-max per volume to 0..1",
            "image_size": f"{M3D_REPO} LaMed/src/model/CLIP.py M3DCLIPConfig: img_size (32, 256, 256)",
            "orientation": f"{M3D_REPO} Data/process/m3d_cap_data_prepare.py: JPEG/PNG slices of M3D-Cap",
        },
        not_in_spec="no spacing or HU window: M3D foreground-crops display images and resizes them to "
        "32 x 256 x 256; the display flips cannot be stated",
        assumed=("target_spacing_mm", "hu_window"),
        formats=("m3d_clip",),
        recipe="m3d_clip",
        recipe_view="image",
    ),
    "voco": PeerPreprocessing(
        peer="VoCo / VoCo-v2 (SwinUNETR)",
        citation=f"arXiv 2402.17300, arXiv 2410.09890; {VOCO_REPO}",
        spec=InputSpec(
            target_spacing_mm=(1.5, 1.5, 1.5),
            hu_window=(-175.0, 250.0),
            intensity_range=(0.0, 1.0),
            axis_order="xyz",
            image_size=(96, 96, 96),
        ),
        orientation="MONAI LoadImage + Orientation('RAS'): (x, y, z) arrays, taken as they are",
        sources={
            "target_spacing_mm": "Large-Scale-Medical Self-supervised/voco_train.py: Spacingd 1.5 mm",
            "hu_window": "Large-Scale-Medical Self-supervised/voco_train.py: ScaleIntensityRanged -175..250",
            "intensity_range": "Large-Scale-Medical Self-supervised/voco_train.py: b_min 0, b_max 1",
            "image_size": "Luffy03/VoCo Finetune/BTCV/main.py: roi 96 x 96 x 96 (pretraining crops are 64^3)",
            "orientation": "Large-Scale-Medical Self-supervised/voco_train.py: Orientationd RAS",
        },
        not_in_spec="pretraining sees 64^3 crops of a 64 x 192 x 192 region (the recipe); the spec keeps "
        "the 96^3 crop the weights are fine-tuned and used at",
        formats=("voco",),
        recipe="voco_v2",
        recipe_view=None,
    ),
    "monai_vit": PeerPreprocessing(
        peer="MONAI ViT / UNETR",
        citation="MONAI networks.nets.ViT files",
        spec=InputSpec(axis_order="xyz"),
        orientation="MONAI LoadImage + Orientation('RAS'): (x, y, z) arrays",
        sources={"orientation": "MONAI's transforms (the layout every MONAI ViT/UNETR recipe uses)"},
        not_in_spec="the files record neither spacing, window nor scaling; the grid comes from the file",
        assumed=("target_spacing_mm", "hu_window", "intensity_range"),
        formats=("monai_vit",),
    ),
    "pillar0": PeerPreprocessing(
        peer="Pillar-0 (abdomen CT)",
        citation=f"arXiv 2511.17803; {PILLAR_REPOS}",
        spec=InputSpec(
            target_spacing_mm=(1.25, 1.25, 1.25),
            hu_window=(-1000.0, 1000.0),
            # Pillar's window -> 0..1, then (x - 0.289) / 0.198: the window's ends land here.
            intensity_range=(-1.4596, 3.5909),
            axis_order="zyx",
            image_size=(384, 384, 384),
        ),
        orientation="rad-vision-engine (D, H, W) volumes, depth running superior to inferior",
        sources={
            "target_spacing_mm": "YalaLab/pillar-pretrain scripts/demo.py build_inline_rave_config: "
            "target_spacing 1.25 mm for abdomen CT (its README's cache folder says 1.5mm)",
            "hu_window": "not one window: rve.apply_windowing(..., 'all', 'CT') stacks 11 windows "
            "(YalaLab/rate-evals configs/model/pillar0.yaml ct_window_type all)",
            "intensity_range": "YalaLab/rate-evals configs/model/pillar0.yaml: ct_normalize_mean 0.289, "
            "ct_normalize_std 0.198 after windowing to 0..1",
            "image_size": "YalaLab/rate-evals configs/dataset/rve_abd_ct.yaml: target_d/h/w 384",
            "orientation": "huggingface.co/YalaLab/Pillar0-AbdomenCT discussion 2 (superior-to-inferior)",
        },
        not_in_spec="11 HU windows as 11 input channels (multi-window tokenization) and a depth axis that "
        "runs superior to inferior; fm3d's single-channel encoders take one window, -1000..1000 here",
        assumed=("hu_window",),
        recipe="pillar0",
        recipe_view="image",
    ),
    "spectre": PeerPreprocessing(
        peer="SPECTRE",
        citation=f"arXiv 2511.17209; {SPECTRE_REPO}",
        spec=InputSpec(
            target_spacing_mm=(1.5, 0.75, 0.75),
            hu_window=(-1000.0, 1000.0),
            intensity_range=(0.0, 1.0),
            axis_order="xyz",
            image_size=(384, 384, 256),
        ),
        orientation="MONAI Orientationd RAS: (x, y, z) arrays",
        sources={
            "target_spacing_mm": f"{SPECTRE_REPO} src/spectre/ssl/transforms/siglip_transform.py: "
            "image_pixdim 0.75 x 0.75 x 1.5 (the DINO stage: 0.5 x 0.5 x 1.0, dino_transform.py)",
            "hu_window": f"{SPECTRE_REPO} dino_transform.py, siglip_transform.py: ScaleIntensityRanged "
            "-1000..1000",
            "intensity_range": f"{SPECTRE_REPO} dino_transform.py, siglip_transform.py: b_min 0, b_max 1",
            "image_size": f"{SPECTRE_REPO} siglip_transform.py: image_size 384 x 384 x 256, read as a "
            "3 x 3 x 4 grid of 128 x 128 x 64 windows (README)",
            "orientation": f"{SPECTRE_REPO} dino_transform.py, siglip_transform.py: Orientationd RAS",
        },
        not_in_spec="the whole scan runs through the ViT as 36 windows of 128 x 128 x 64 and a global "
        "transformer combines them; SPECTRE's weights do not load into fm3d (no adapter)",
        recipe="spectre",
        recipe_view="image",
    ),
}


def peer_preprocessing(name: str) -> PeerPreprocessing:
    """The table's entry for peer (or peer format) `name`; an unknown name names the known ones."""
    if name in PEERS:
        return PEERS[name]
    for entry in PEERS.values():
        if name in entry.formats:
            return entry
    raise PeerWeightsError(
        f"no preprocessing is recorded for peer {name!r}{did_you_mean(name, PEERS)}; known: {sorted(PEERS)}. "
        "Add an entry to fm3d.models.adapters.specs.PEERS with its sources."
    )
