"""Rows an EHR table may hold but no label can use: counted, then refused or dropped on request.

A null code, a date outside the plausible years (sentinels such as 9999-12-31 or 1900-01-01
from a hospital export), or a subject id that is not an integer would otherwise flow into
labels silently: a study "followed up" for 8000 years, an event counted for no code. The
default is to refuse, naming the counts, an example, and the option that drops them; dropping
is an explicit choice (`fm3d ehr labels --drop-invalid`) and is logged with the same counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehr.errors import EHRError, EHRSettingError

logger = logging.getLogger(__name__)

DROP_OPTION = "--drop-invalid"
YEARS_OPTION = "--valid-years"


@dataclass(frozen=True)
class ValidityPolicy:
    """What counts as a usable row (`valid_years`, inclusive) and whether unusable rows are dropped."""

    drop_invalid: bool = False
    valid_years: tuple[int, int] = (1800, 2300)

    def __post_init__(self) -> None:
        low, high = self.valid_years
        if not (isinstance(low, int) and isinstance(high, int)) or low > high:
            raise EHRSettingError(f"valid years must be two integers MIN <= MAX, got {self.valid_years}")

    def plausible(self, time: pl.Expr) -> pl.Expr:
        """True where `time` (a datetime expression) falls in `valid_years`; null stays null."""
        return time.dt.year().is_between(*self.valid_years)


def describe(counts: dict[str, int], examples: dict[str, str]) -> str:
    """'2 null code, 1 date outside ... (e.g. 9999-12-31)' for the non-zero counts."""
    parts = [
        f"{n} {kind}" + (f" (e.g. {examples[kind]})" if kind in examples else "")
        for kind, n in counts.items()
    ]
    return ", ".join(parts)


def enforce(
    source: str | Path,
    what: str,
    counts: dict[str, int],
    examples: dict[str, str],
    policy: ValidityPolicy,
    error: type[EHRError],
) -> dict[str, int]:
    """Refuse (raise `error` naming `source`) or log the drop; returns the non-zero counts."""
    counts = {kind: n for kind, n in counts.items() if n}
    if not counts:
        return {}
    total = sum(counts.values())
    text = describe(counts, examples)
    low, high = policy.valid_years
    if not policy.drop_invalid:
        raise error(
            source,
            f"{total} unusable {what}: {text}",
            f"fix the data, or leave them out with {DROP_OPTION} (drop_invalid=True); "
            f"{YEARS_OPTION} MIN MAX sets the plausible years (now {low}-{high})",
        )
    logger.warning("%s: dropping %d unusable %s (%s: %s)", source, total, what, DROP_OPTION, text)
    return counts
