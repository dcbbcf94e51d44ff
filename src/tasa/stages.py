"""Stage records of a ``tasa run``: each stage is keyed by a hash of its inputs.

``stages.json`` in the run directory (schema ``tasa.stages/1``, tasa.schemas.StageRecord) holds, per stage,
the key, the inputs, the stage's small result (paths, figures) and its seconds; it is rewritten
atomically after every finished stage.  A rerun skips a stage whose key is
recorded as done; a changed input changes the key (and, since later stages
include earlier keys in their inputs, every later key); a killed run redoes the
unfinished stage, whose own artifacts resume where they can (profile probes).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from tasa import schemas
from tasa.artifacts import fingerprint, read_json, write_json_atomic
from tasa.errors import TasaError

log = logging.getLogger(__name__)


def stage_key(inputs: dict) -> str:
    return fingerprint(inputs)[:16]


class Stages:
    def __init__(self, root: Path):
        self.root = root
        self.file = root / "stages.json"
        self.records: dict[str, schemas.StageRecord] = {}
        if self.file.is_file():
            try:
                self.records = schemas.stage_records(read_json(self.file), str(self.file))
            except json.JSONDecodeError:
                raise TasaError(f"{self.file} is damaged; remove it (the stages will run again)") from None
        self.ran: list[str] = []  # stages computed (not skipped) by this process

    def done(self, name: str, inputs: dict) -> bool:
        rec = self.records.get(name)
        return bool(rec and rec.done and rec.key == stage_key(inputs))

    def previous_key(self, name: str) -> str | None:
        rec = self.records.get(name)
        return rec.key if rec else None

    def _write(self) -> None:
        write_json_atomic(self.file, schemas.stages_dict(self.records))

    def run(self, name: str, inputs: dict, fn: Callable[[], dict]) -> dict:
        """The stage's result: recorded, or computed by ``fn`` now and recorded."""
        key = stage_key(inputs)
        if self.done(name, inputs):
            log.info("stage %s: up to date (key %s), skipped", name, key)
            return self.records[name].result
        self.records[name] = schemas.StageRecord(key, inputs)
        self._write()
        t0 = time.perf_counter()
        result = fn()
        self.records[name] = schemas.StageRecord(key, inputs, True, result, time.perf_counter() - t0)
        self._write()
        self.ran.append(name)
        return result

    def seconds(self) -> dict[str, float]:
        return {k: float(v.seconds or 0.0) for k, v in self.records.items() if v.done}
