"""The schema identifiers of tasa's JSON artifacts, declared once: writers stamp them, readers check them.
A change of an artifact's layout that old readers would misread bumps its version here."""
from __future__ import annotations

from tasa.errors import TasaError

SENSITIVITY = "tasa.sensitivity/1"  # profile/sensitivity.json (tasa profile)
MIXTURE = "tasa.mixture/1"  # mixture/mixture.json (tasa search-mixture)


def check(record: dict, schema: str, what: str) -> None:
    """Refuse ``record`` unless it carries ``schema``."""
    if record.get("schema") != schema:
        raise TasaError(f"{what} is not a {schema} record (schema {record.get('schema')!r})")
