"""Synthetic CT-like volumes: a small thorax/abdomen phantom in HU with an organ label map.

Each structure is an analytic shape (ellipsoid, cylinder, periodic band) evaluated on
broadcast mm coordinate grids, painted in anatomical order so later structures occlude
earlier ones (lungs carve the liver dome, the heart carves the lungs). HU values follow
a portal-venous contrast CT; Gaussian noise gives the texture. All numpy, no voxel loops.

Coordinates are RAS world mm centred on the volume: +x patient's right, +y anterior,
+z superior. Arrays are fm3d's [D, H, W] = (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fm3d.demo.cohort import Anatomy, Finding

SHAPE = (48, 96, 96)  # (D, H, W) voxels
SPACING_MM = (3.0, 1.5, 1.5)  # (D, H, W)

# Organ label map values (written as labels_<study>.nii.gz; see docs/demo-cohort.md).
LABELS: dict[str, int] = {
    "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "lung_right": 5, "lung_left": 6,
    "aorta": 7, "bone": 8, "heart": 9, "stomach": 10, "lesion": 11, "pleural_effusion": 12,
}  # fmt: skip

HU = dict(
    air=-1000, fat=-100, soft=45, lung=-850, emphysema_lung=-905, bulla=-985, liver=105,
    fatty_liver=45, spleen=115, kidney=165, aorta=175, heart=140, cortical=750, trabecular=240,
    disc=80, canal=15, rib=550, stomach_fluid=15, nodule=25, liver_lesion=40, cyst=5, effusion=12,
)  # fmt: skip
NOISE_HU = 12.0


@dataclass
class Grid:
    """Broadcastable world coordinates (mm) of the voxel centres."""

    z: np.ndarray  # [D, 1, 1]
    y: np.ndarray  # [1, H, 1]
    x: np.ndarray  # [1, 1, W]

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (z, y, x) coordinates as 1-D ascending arrays."""
        return self.z.ravel(), self.y.ravel(), self.x.ravel()

    @classmethod
    def centred(cls, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Grid:
        axes = [
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s - t)
            for n, s, t in zip(SHAPE, SPACING_MM, shift_mm, strict=True)
        ]
        return cls(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


def affine_ras() -> np.ndarray:
    """4x4 NIfTI affine of the volumes, for the nibabel (x, y, z) array order."""
    affine = np.diag([SPACING_MM[2], SPACING_MM[1], SPACING_MM[0], 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(SHAPE[::-1], SPACING_MM[::-1], strict=True)]
    return affine


def _ellipsoid(g: Grid, centre: tuple[float, float, float], axes: tuple[float, float, float]) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid with this (x, y, z) centre and semi-axes."""
    (cx, cy, cz), (ax, ay, az) = centre, axes
    return np.sqrt(((g.x - cx) / ax) ** 2 + ((g.y - cy) / ay) ** 2 + ((g.z - cz) / az) ** 2)


def _point_in(centre, axes, position, depth: float = 0.55) -> tuple[float, float, float]:
    """A point inside an ellipsoid: `position` in [-1, 1]^2 picks x and z; y stays central."""
    (cx, cy, cz), (ax, _, az) = centre, axes
    return (cx + depth * ax * position[0], cy, cz + depth * az * position[1])


class _Painter:
    def __init__(self, grid: Grid) -> None:
        self.g = grid
        self.image = np.full(SHAPE, HU["air"], dtype=np.float32)
        self.labels = np.zeros(SHAPE, dtype=np.uint8)

    def paint(self, mask: np.ndarray, hu: float, label: int | None = None) -> None:
        mask = np.broadcast_to(mask, SHAPE)
        self.image[mask] = hu
        if label is not None:
            self.labels[mask] = label

    def paint_sphere(
        self, centre, radius_mm: float, hu: float, label: int | None = None, within=None
    ) -> None:
        """A ball evaluated only in its bounding box (lesions are small; the volume is not)."""
        box = tuple(
            slice(*np.searchsorted(axis, [c - radius_mm, c + radius_mm]))
            for axis, c in zip(self.g.axes, (centre[2], centre[1], centre[0]), strict=True)
        )
        z, y, x = (axis[b] for axis, b in zip(self.g.axes, box, strict=True))
        mask = (x[None, None] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2 + (
            z[:, None, None] - centre[2]
        ) ** 2 < radius_mm**2
        if within is not None:
            mask &= np.broadcast_to(within, SHAPE)[box]
        self.image[box][mask] = hu
        if label is not None:
            self.labels[box][mask] = label


def synthesize(
    anatomy: Anatomy, findings: list[Finding], shift_mm: tuple[float, float, float], noise_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One study: int16 HU volume and uint8 organ label map, both [D, H, W]."""
    g = Grid.centred(shift_mm)
    p = _Painter(g)
    found = {f.name: f for f in findings}
    s = anatomy.organ_scale
    a, b = anatomy.body_half_width_mm, anatomy.body_half_depth_mm
    body_r = np.sqrt((g.x / a) ** 2 + ((g.y + 3) / b) ** 2)
    inner_r = np.sqrt((g.x / (a - anatomy.fat_mm)) ** 2 + ((g.y + 3) / (b - anatomy.fat_mm)) ** 2)
    p.paint(body_r < 1, HU["fat"])
    p.paint(inner_r < 1, HU["soft"])
    chest = g.z > anatomy.diaphragm_z_mm

    # Abdominal organs first; the lungs then carve the liver and spleen domes.
    liver_c, liver_ax = (22.0, 2.0, anatomy.diaphragm_z_mm - 24), (34 * s, 30 * s, 30 * s)
    liver_r = _ellipsoid(g, liver_c, liver_ax)
    steatosis = "hepatic_steatosis" in found
    p.paint(liver_r < 1, HU["fatty_liver"] if steatosis else HU["liver"], LABELS["liver"])
    spleen_scale = found["splenomegaly"].size_mm if "splenomegaly" in found else 1.0
    spleen_c = (-36.0, -14.0, anatomy.diaphragm_z_mm - 22)
    spleen_ax = tuple(v * s * spleen_scale for v in (11.0, 18.0, 20.0))
    p.paint(_ellipsoid(g, spleen_c, spleen_ax) < 1, HU["spleen"], LABELS["spleen"])
    stomach_c, stomach_ax = (-16.0, 18.0, anatomy.diaphragm_z_mm - 18), (16 * s, 11 * s, 13 * s)
    stomach = _ellipsoid(g, stomach_c, stomach_ax) < 1
    p.paint(stomach, HU["stomach_fluid"], LABELS["stomach"])
    p.paint(stomach & (g.y > stomach_c[1] + 4), HU["air"], LABELS["stomach"])  # gas rises anteriorly
    spine_y = -b + 22
    kidneys = {
        "right": ((28.0, spine_y + 6, anatomy.diaphragm_z_mm - 50), LABELS["kidney_right"]),
        "left": ((-28.0, spine_y + 6, anatomy.diaphragm_z_mm - 45), LABELS["kidney_left"]),
    }
    kidney_ax = (10 * s, 13 * s, 20 * s)
    for centre, label in kidneys.values():
        p.paint(_ellipsoid(g, centre, kidney_ax) < 1, HU["kidney"], label)

    # Lungs above the diaphragm, heart in front of and between them.
    lungs = {
        "right": ((27.0, 0.0, anatomy.diaphragm_z_mm + 48), LABELS["lung_right"]),
        "left": ((-27.0, 0.0, anatomy.diaphragm_z_mm + 48), LABELS["lung_left"]),
    }
    lung_ax = (21 * s, 30 * s, 52.0)
    lung_masks = {}
    lung_hu = HU["emphysema_lung"] if "emphysema" in found else HU["lung"]
    for side, (centre, label) in lungs.items():
        lung_masks[side] = (_ellipsoid(g, centre, lung_ax) < 1) & chest
        p.paint(lung_masks[side], lung_hu, label)
    heart = _ellipsoid(g, (-8.0, 14.0, anatomy.diaphragm_z_mm + 22), (24 * s, 20 * s, 22 * s)) < 1
    p.paint(heart & (g.z > anatomy.diaphragm_z_mm - 4), HU["heart"], LABELS["heart"])

    # Aorta: descending, left-anterior of the spine; fusiform dilation when aneurysmal.
    aorta_radius = np.full(g.z.shape, 6.5, dtype=np.float32)
    if "aortic_aneurysm" in found:
        peak = found["aortic_aneurysm"].size_mm / 2
        centre_z = anatomy.diaphragm_z_mm - 40
        aorta_radius = aorta_radius + (peak - 6.5) * np.exp(-(((g.z - centre_z) / 16.0) ** 2))
    aorta = np.hypot(g.x + 9, g.y - (spine_y + 17)) < aorta_radius
    p.paint(aorta, HU["aorta"], LABELS["aorta"])

    # Spine: vertebral bodies with cortical rim and discs, canal and posterior arch; ribs.
    vertebra_r = np.hypot(g.x, g.y - spine_y)
    disc = ((g.z - anatomy.vertebra_phase_mm) % 24.0) < 5.0
    p.paint(vertebra_r < 10, HU["cortical"], LABELS["bone"])
    p.paint((vertebra_r < 8) & ~disc, HU["trabecular"], LABELS["bone"])
    p.paint((vertebra_r < 8) & disc, HU["disc"], 0)
    canal_r = np.hypot(g.x, g.y - (spine_y - 15))
    p.paint((canal_r < 8) & (canal_r >= 4.5), HU["cortical"], LABELS["bone"])
    p.paint(canal_r < 4.5, HU["canal"], 0)
    # Ribs run obliquely (lower in front), so an axial slice cuts them into arcs, not rings.
    rib_band = (inner_r > 0.87) & (inner_r < 0.95) & (g.y < b * 0.45)
    slope = 10.0 * np.abs(np.arctan2(g.y - spine_y, g.x))
    ribs = (
        rib_band & (((g.z + slope - anatomy.rib_phase_mm) % 20.0) < 6.0) & (g.z > anatomy.diaphragm_z_mm - 24)
    )
    p.paint(ribs, HU["rib"], LABELS["bone"])

    _paint_findings(p, found, lungs, lung_ax, lung_masks, liver_c, liver_ax, kidneys, kidney_ax, steatosis)

    rng = np.random.default_rng(noise_seed)
    noisy = p.image + rng.normal(0.0, NOISE_HU, SHAPE).astype(np.float32)
    image = np.clip(np.rint(noisy), -1024, 3071).astype(np.int16)
    return image, p.labels


def _paint_findings(p, found, lungs, lung_ax, lung_masks, liver_c, liver_ax, kidneys, kidney_ax, steatosis):
    """Draw each finding into the phantom (lesions replace the organ label with 'lesion')."""
    g = p.g
    if "emphysema" in found:
        f = found["emphysema"]
        count = 10 if f.severity == "mild" else 22
        rng = np.random.default_rng(int(1e6 * (f.position[0] + 2)))  # bullae placed by the finding
        for _ in range(count):
            side = "right" if rng.random() < 0.5 else "left"
            centre = _point_in(lungs[side][0], lung_ax, rng.uniform(-1, 1, 2), depth=0.6)
            centre = (centre[0], rng.uniform(-12, 12), centre[2])
            p.paint_sphere(centre, rng.uniform(3, 6), HU["bulla"], within=lung_masks[side])
    if "pleural_effusion" in found:
        f = found["pleural_effusion"]
        depth = 0.28 if f.severity == "small" else 0.5
        (_, cy, _), _ = lungs[f.side]
        fluid = lung_masks[f.side] & (g.y < cy - lung_ax[1] * (1 - 2 * depth))  # dependent, posterior
        p.paint(fluid, HU["effusion"], LABELS["pleural_effusion"])
    if "lung_nodule" in found:
        f = found["lung_nodule"]
        centre, _ = lungs[f.side]
        dz = {"upper lobe": 0.5, "middle lobe": 0.0, "lower lobe": -0.45}[f.region]
        where = _point_in(centre, lung_ax, (0.5 * f.position[0], dz), depth=0.55)
        p.paint_sphere(
            (where[0], 5.0 * f.position[1], where[2]), f.size_mm / 2, HU["nodule"], LABELS["lesion"]
        )
    if "liver_lesion" in found:
        f = found["liver_lesion"]
        x = liver_c[0] + (0.45 if f.region == "right lobe" else -0.45) * liver_ax[0]
        where = (x, liver_c[1] + 0.3 * liver_ax[1] * f.position[1], liver_c[2] - 0.2 * liver_ax[2])
        base = HU["fatty_liver"] if steatosis else HU["liver"]
        p.paint_sphere(where, f.size_mm / 2, base - 60 if not steatosis else base - 35, LABELS["lesion"])
    if "kidney_cyst" in found:
        f = found["kidney_cyst"]
        (cx, cy, cz), _ = kidneys[f.side]
        dz = {"upper pole": 0.55, "interpolar region": 0.0, "lower pole": -0.55}[f.region]
        where = (cx + 0.35 * kidney_ax[0] * np.sign(cx), cy, cz + dz * kidney_ax[2])
        p.paint_sphere(where, f.size_mm / 2, HU["cyst"], LABELS["lesion"])
