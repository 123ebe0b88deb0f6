"""Who is in the demo cohort: patients, their studies, findings and later outcomes.

Everything downstream (volumes, reports, MEDS events) is rendered from these records, so
the three modalities agree by construction: a lung nodule drawn in the CT is the nodule
the report describes, the `R91.1` code in the EHR and a raised lung-cancer hazard.
Outcome hazards rise with the finding burden so that a model reading the image can beat
chance on time-to-event tasks (the pretraining issue measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class FindingType:
    """A kind of abnormality the generator can draw, with its ICD-10 code and phenotype group."""

    name: str
    icd10: str
    description: str
    base_logit: float  # prevalence logit at age 60, non-smoker
    smoker_logit: float = 0.0


FINDING_TYPES: tuple[FindingType, ...] = (
    FindingType("lung_nodule", "R91.1", "Solitary pulmonary nodule", -1.3, 0.9),
    FindingType("emphysema", "J43.9", "Emphysema, unspecified", -2.0, 1.6),
    FindingType("pleural_effusion", "J90", "Pleural effusion, not elsewhere classified", -2.0),
    FindingType("liver_lesion", "K76.89", "Other specified diseases of liver (hypodense lesion)", -1.6),
    FindingType("hepatic_steatosis", "K76.0", "Fatty (change of) liver", -1.5),
    FindingType("splenomegaly", "R16.1", "Splenomegaly, not elsewhere classified", -2.0),
    FindingType("kidney_cyst", "N28.1", "Cyst of kidney, acquired", -1.3),
    FindingType("aortic_aneurysm", "I71.4", "Abdominal aortic aneurysm, without rupture", -2.4, 0.7),
)

# Outcomes: code, yearly baseline hazard and log-hazard weight per finding (plus age, smoking).
OUTCOMES: dict[str, dict[str, float]] = {
    "DIAGNOSIS//ICD//10//C34.90": dict(base=0.015, lung_nodule=2.6, emphysema=0.8, smoker=0.7, age=0.02),
    "HOSPITAL_ADMISSION//EMERGENCY": dict(
        base=0.08,
        pleural_effusion=1.2,
        liver_lesion=0.9,
        aortic_aneurysm=0.9,
        splenomegaly=0.7,
        emphysema=0.6,
        lung_nodule=0.3,
        age=0.02,
    ),
    "MEDS_DEATH": dict(
        base=0.012,
        liver_lesion=1.8,
        aortic_aneurysm=1.4,
        pleural_effusion=1.1,
        emphysema=0.9,
        lung_nodule=0.6,
        splenomegaly=0.5,
        age=0.05,
    ),
}


@dataclass
class Anatomy:
    """Patient-specific body shape in mm (fixed across a patient's studies)."""

    body_half_width_mm: float
    body_half_depth_mm: float
    fat_mm: float
    diaphragm_z_mm: float
    organ_scale: float
    rib_phase_mm: float
    vertebra_phase_mm: float


@dataclass
class Finding:
    """One abnormality in one study: where it is and how big, in the volume's mm."""

    name: str
    side: str = ""  # "right" / "left" where the finding is lateral
    region: str = ""  # e.g. "upper lobe", "right lobe"
    size_mm: float = 0.0  # diameter of a focal lesion, aortic calibre, spleen length ...
    position: tuple[float, float] = (0.0, 0.0)  # relative place inside the organ, each in [-1, 1]
    severity: str = ""  # "small" / "moderate" / "mild" ...


@dataclass
class Study:
    """One CT study: identifiers, acquisition time and what it shows."""

    study_id: str
    time: datetime
    findings: list[Finding]
    shift_mm: tuple[float, float, float]  # patient position on the table (z, y, x)
    noise_seed: int


@dataclass
class Patient:
    """One patient: identifiers, demographics, studies and later EHR events."""

    subject_id: int
    patient_id: str
    birth: datetime
    sex: str
    smoker: bool
    anatomy: Anatomy
    studies: list[Study] = field(default_factory=list)
    outcomes: dict[str, datetime] = field(default_factory=dict)  # code -> first event time
    record_end: datetime = datetime(2024, 1, 1)
    hypertension: bool = False


def _sample_finding(name: str, rng: np.random.Generator) -> Finding:
    side = str(rng.choice(["right", "left"]))
    position = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
    if name == "lung_nodule":
        region = str(rng.choice(["upper lobe", "lower lobe"]))
        if side == "right" and rng.random() < 0.2:
            region = "middle lobe"
        return Finding(name, side, region, float(rng.uniform(6.0, 16.0)), position)
    if name == "emphysema":
        return Finding(name, severity=str(rng.choice(["mild", "moderate"])), position=position)
    if name == "pleural_effusion":
        return Finding(name, side, severity=str(rng.choice(["small", "moderate"])))
    if name == "liver_lesion":
        region = "right lobe" if position[0] > -0.3 else "left lobe"
        return Finding(name, "", region, float(rng.uniform(10.0, 26.0)), position)
    if name == "hepatic_steatosis":
        return Finding(name, severity=str(rng.choice(["mild", "moderate"])))
    if name == "splenomegaly":
        return Finding(name, size_mm=float(rng.uniform(1.35, 1.6)))  # scale of the spleen
    if name == "kidney_cyst":
        region = str(rng.choice(["upper pole", "interpolar region", "lower pole"]))
        return Finding(name, side, region, float(rng.uniform(9.0, 18.0)), position)
    if name == "aortic_aneurysm":
        return Finding(name, size_mm=float(rng.uniform(22.0, 30.0)))  # maximal calibre
    raise ValueError(f"unknown finding type {name!r}")


def _grow(finding: Finding, rng: np.random.Generator) -> Finding:
    """The same finding at a follow-up study: focal lesions grow a little."""
    grown = Finding(**vars(finding))
    if finding.name in {"lung_nodule", "liver_lesion", "kidney_cyst", "aortic_aneurysm"}:
        grown.size_mm = finding.size_mm * float(rng.uniform(1.0, 1.25))
    return grown


def _first_event(hazard_per_year: float, start: datetime, rng: np.random.Generator) -> datetime:
    return start + timedelta(days=float(rng.exponential(DAYS_PER_YEAR / hazard_per_year)))


def _hazard(weights: dict[str, float], names: set[str], age: float, smoker: bool) -> float:
    log_rate = sum(w for key, w in weights.items() if key in names)
    log_rate += weights.get("age", 0.0) * (age - 65.0) + weights.get("smoker", 0.0) * smoker
    return weights["base"] * float(np.exp(log_rate))


def sample_cohort(
    num_studies: int, rng: np.random.Generator, follow_up_fraction: float = 0.3
) -> list[Patient]:
    """Patients whose studies add up to `num_studies`; about `follow_up_fraction` have two."""
    patients: list[Patient] = []
    total = 0
    while total < num_studies:
        index = len(patients)
        first_time = datetime(2015, 1, 1) + timedelta(days=float(rng.uniform(0, 5 * DAYS_PER_YEAR)))
        first_time = first_time.replace(microsecond=0)
        age = float(rng.uniform(40, 85))
        smoker = bool(rng.random() < 0.35)
        patient = Patient(
            subject_id=10_000 + index,
            patient_id=f"P{index:05d}",
            birth=(first_time - timedelta(days=age * DAYS_PER_YEAR)).replace(hour=0, minute=0, second=0),
            sex=str(rng.choice(["F", "M"])),
            smoker=smoker,
            anatomy=Anatomy(
                body_half_width_mm=float(rng.uniform(58, 66)),
                body_half_depth_mm=float(rng.uniform(42, 50)),
                fat_mm=float(rng.uniform(3, 10)),
                diaphragm_z_mm=float(rng.uniform(-6, 6)),
                organ_scale=float(rng.uniform(0.92, 1.08)),
                rib_phase_mm=float(rng.uniform(0, 20)),
                vertebra_phase_mm=float(rng.uniform(0, 24)),
            ),
            hypertension=bool(rng.random() < 0.4),
        )
        findings = []
        for kind in FINDING_TYPES:
            logit = kind.base_logit + 0.04 * (age - 60) + kind.smoker_logit * smoker
            if rng.random() < 1 / (1 + np.exp(-logit)):
                findings.append(_sample_finding(kind.name, rng))
        names = {f.name for f in findings}
        for code, weights in OUTCOMES.items():
            patient.outcomes[code] = _first_event(_hazard(weights, names, age, smoker), first_time, rng)
        death = patient.outcomes["MEDS_DEATH"]
        patient.record_end = min(
            death, first_time + timedelta(days=float(rng.uniform(1.5, 5.0) * DAYS_PER_YEAR))
        )
        patient.outcomes = {c: t for c, t in patient.outcomes.items() if t <= patient.record_end}

        times = [first_time]
        second = first_time + timedelta(days=float(rng.uniform(0.4, 1.2) * DAYS_PER_YEAR))
        if total + 1 < num_studies and rng.random() < follow_up_fraction and second < patient.record_end:
            times.append(second.replace(microsecond=0))
        for number, when in enumerate(times):
            if number > 0:
                findings = [_grow(f, rng) for f in findings]
            patient.studies.append(
                Study(
                    study_id=f"{patient.patient_id}_S{number + 1}",
                    time=when,
                    findings=list(findings),
                    shift_mm=(
                        float(rng.uniform(-4, 4)),
                        float(rng.uniform(-3, 3)),
                        float(rng.uniform(-3, 3)),
                    ),
                    noise_seed=int(rng.integers(0, 2**31 - 1)),
                )
            )
        total += len(times)
        patients.append(patient)
    return patients
