"""Radiology reports for demo studies: findings and impression that state what the volume shows.

Written in the organ-by-organ style of chest/abdomen CT reports. Every positive finding
is described with its side, place and size as drawn; every organ without a finding gets a
negative statement, so the report is truthful in both directions. Phrasing varies (several
wordings per statement, optional section headers) so a text model cannot key on one
template string.
"""

from __future__ import annotations

import numpy as np

from fm3d.demo.cohort import Finding


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cm(mm: float) -> str:
    return f"{mm / 10:.1f} cm"


def _lungs(f: dict[str, Finding], rng) -> list[str]:
    out = []
    if "lung_nodule" in f:
        n = f["lung_nodule"]
        out.append(_pick(rng, [
            f"There is a {n.size_mm:.0f} mm solid nodule in the {n.side} {n.region}.",
            f"A solid pulmonary nodule measuring {n.size_mm:.0f} mm is present in the {n.side} {n.region}.",
            f"{n.size_mm:.0f} mm noncalcified nodule in the {n.side} {n.region}.",
        ]))  # fmt: skip
    else:
        out.append(_pick(rng, ["No pulmonary nodules.", "No suspicious pulmonary nodule or mass.",
                               "There are no pulmonary nodules or masses."]))  # fmt: skip
    if "emphysema" in f:
        out.append(_pick(rng, [
            f"{f['emphysema'].severity.capitalize()} centrilobular emphysema, upper lobe predominant.",
            f"There is {f['emphysema'].severity} emphysema with scattered bullae.",
        ]))  # fmt: skip
    else:
        out.append(_pick(rng, ["No emphysema.", "The lung parenchyma is otherwise clear without emphysema."]))
    out.append(_pick(rng, ["No consolidation.", "No focal consolidation or ground-glass opacity.",
                           "No airspace consolidation."]))  # fmt: skip
    return out


def _pleura(f: dict[str, Finding], rng) -> list[str]:
    if "pleural_effusion" in f:
        e = f["pleural_effusion"]
        return [_pick(rng, [
            f"{e.severity.capitalize()} {e.side} pleural effusion.",
            f"There is a {e.severity} {e.side}-sided pleural effusion with adjacent compressive atelectasis.",
        ]) + " No pneumothorax."]  # fmt: skip
    return [_pick(rng, ["No pleural effusion or pneumothorax.", "The pleural spaces are clear.",
                        "No pleural effusion. No pneumothorax."])]  # fmt: skip


def _mediastinum(f: dict[str, Finding], rng) -> list[str]:
    heart = _pick(rng, ["Heart size is normal. No pericardial effusion.",
                        "Normal heart size without pericardial effusion."])  # fmt: skip
    nodes = _pick(rng, ["No mediastinal or hilar lymphadenopathy.", "No enlarged mediastinal lymph nodes."])
    return [heart, nodes]


def _liver(f: dict[str, Finding], rng) -> list[str]:
    out = []
    if "hepatic_steatosis" in f:
        out.append(_pick(rng, [
            "The liver is diffusely hypoattenuating, consistent with "
            f"{f['hepatic_steatosis'].severity} hepatic steatosis.",
            "Diffuse low attenuation of the liver in keeping with fatty infiltration.",
        ]))  # fmt: skip
    if "liver_lesion" in f:
        les = f["liver_lesion"]
        out.append(_pick(rng, [
            f"There is a {_cm(les.size_mm)} hypodense lesion in the {les.region} of the liver.",
            f"A hypoattenuating hepatic lesion measuring {_cm(les.size_mm)} is seen in the {les.region}.",
            f"Ill-defined {les.size_mm:.0f} mm hypodense lesion in the hepatic {les.region}, indeterminate.",
        ]))  # fmt: skip
    if not out:
        out.append(_pick(rng, ["The liver is normal in size and attenuation without focal lesion.",
                               "No focal hepatic lesion.", "The liver is unremarkable."]))  # fmt: skip
    elif "liver_lesion" not in f:
        out.append("No focal hepatic lesion.")
    return out


def _spleen(f: dict[str, Finding], rng) -> list[str]:
    if "splenomegaly" in f:
        return [_pick(rng, ["The spleen is enlarged.", "Splenomegaly.",
                            "The spleen is enlarged without focal lesion."])]  # fmt: skip
    return [_pick(rng, ["The spleen is normal in size.", "The spleen is unremarkable.", "No splenomegaly."])]


def _kidneys(f: dict[str, Finding], rng) -> list[str]:
    if "kidney_cyst" in f:
        c = f["kidney_cyst"]
        return [_pick(rng, [
            f"Simple cyst in the {c.region} of the {c.side} kidney measuring {_cm(c.size_mm)}.",
            f"There is a {c.size_mm:.0f} mm fluid-attenuation cyst in the {c.side} kidney {c.region}.",
        ]) + " No hydronephrosis."]  # fmt: skip
    return [_pick(rng, ["The kidneys are unremarkable. No hydronephrosis.",
                        "No renal lesion or hydronephrosis.", "Both kidneys are normal."])]  # fmt: skip


def _vessels(f: dict[str, Finding], rng) -> list[str]:
    if "aortic_aneurysm" in f:
        a = f["aortic_aneurysm"]
        return [_pick(rng, [
            f"Fusiform infrarenal abdominal aortic aneurysm measuring {_cm(a.size_mm)} in maximal diameter.",
            f"The abdominal aorta is aneurysmal, measuring up to {_cm(a.size_mm)}.",
        ])]  # fmt: skip
    return [_pick(rng, ["The abdominal aorta is normal in calibre.", "No abdominal aortic aneurysm.",
                        "Normal calibre of the aorta."])]  # fmt: skip


_SECTIONS = (
    ("LUNGS", _lungs), ("PLEURA", _pleura), ("HEART AND MEDIASTINUM", _mediastinum), ("LIVER", _liver),
    ("SPLEEN", _spleen), ("KIDNEYS", _kidneys), ("VESSELS", _vessels),
)  # fmt: skip

_IMPRESSION = {
    "lung_nodule": lambda n: (
        f"{n.size_mm:.0f} mm {n.side} {n.region} pulmonary nodule; follow-up CT recommended."
    ),
    "emphysema": lambda e: f"{e.severity.capitalize()} emphysema.",
    "pleural_effusion": lambda e: f"{e.severity.capitalize()} {e.side} pleural effusion.",
    "liver_lesion": lambda x: f"{_cm(x.size_mm)} hypodense liver lesion, indeterminate; MRI suggested.",
    "hepatic_steatosis": lambda _: "Hepatic steatosis.",
    "splenomegaly": lambda _: "Splenomegaly.",
    "kidney_cyst": lambda c: f"Simple {c.side} renal cyst, benign; no follow-up needed.",
    "aortic_aneurysm": lambda a: f"{_cm(a.size_mm)} abdominal aortic aneurysm; vascular surgery referral.",
}


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """(findings text, impression text) for one study."""
    by_name = {f.name: f for f in findings}
    headers = rng.random() < 0.6
    lines = []
    for title, section in _SECTIONS:
        text = " ".join(section(by_name, rng))
        lines.append(f"{title}: {text}" if headers else text)
    bones = "BONES: No acute osseous abnormality." if headers else "No acute osseous abnormality."
    bone_options = ["Visualised osseous structures are unremarkable.", "No aggressive osseous lesion.", bones]
    lines.append(_pick(rng, bone_options))
    technique = _pick(rng, ["CT of the chest and abdomen with intravenous contrast.",
                            "Contrast-enhanced CT chest/abdomen, portal venous phase."])  # fmt: skip
    findings_text = technique + "\n" + "\n".join(lines) if headers else technique + " " + " ".join(lines)
    if findings:
        items = [_IMPRESSION[f.name](f) for f in findings]
        impression = "\n".join(f"{i + 1}. {item}" for i, item in enumerate(items))
    else:
        impression = _pick(rng, ["No acute abnormality in the chest or abdomen.",
                                 "Normal CT of the chest and abdomen.",
                                 "No significant abnormality."])  # fmt: skip
    return findings_text, impression
