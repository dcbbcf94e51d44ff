import json
from pathlib import Path

import pytest

from tasa import schemas
from tasa.errors import TasaError

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "benchmarks" / "results" / "paper_table" / "layer-sensitivity.json"  # a real, committed profile


def test_a_real_profile_round_trips_through_its_typed_record():
    raw = json.loads(PROFILE.read_text())
    s = schemas.Sensitivity.from_dict(raw)
    assert (s.granularity, s.bits, s.group_size, len(s.units)) == ("layer", [3, 4, 8], 64, 30)
    assert s.units[3].name == "layer.3" and len(s.units[3].modules) == 7 and s.sizes[3] == raw["units"][3]["numel"]
    assert s.cost("gsm8k", 3) == raw["costs"]["gsm8k"]["3"]["cost"]
    assert s.to_dict() == raw  # every field kept, nothing added


@pytest.mark.parametrize("record, message", [
    ({"schema": "tasa.mixture/1"}, "is not a tasa.sensitivity/1 record"),
    ({"schema": "tasa.sensitivity/1", "granularity": "layer"}, "lacks bits, group_size, units, costs"),
    ({"schema": "tasa.sensitivity/1", "granularity": "layer", "bits": [3], "group_size": 64, "costs": {},
      "units": [{"name": "layer.0"}]}, "has a malformed unit"),
])
def test_malformed_profiles_are_refused_with_one_line(record, message):
    with pytest.raises(TasaError, match=message):
        schemas.Sensitivity.from_dict(record, "p.json")


def test_stage_records_round_trip_and_read_the_bare_map_of_earlier_runs():
    from tasa.schemas import STAGES, StageRecord, stage_records, stages_dict

    recs = {"profile": StageRecord("ab12", {"bits": [3, 4]}, True, {"sensitivity": "p.json"}, 12.5),
            "quantize": StageRecord("cd34", {"calib": "wikitext2"})}
    d = stages_dict(recs)
    assert d["schema"] == STAGES and d["stages"]["quantize"] == {"key": "cd34", "inputs": {"calib": "wikitext2"},
                                                                  "done": False}
    assert stage_records(d) == recs
    assert stage_records(d["stages"]) == recs  # the bare map written before the schema was stamped
    with pytest.raises(TasaError, match="stage profile is malformed"):
        stage_records({"profile": {"inputs": {}}})
    with pytest.raises(TasaError, match="not a tasa.stages/1 record"):
        stage_records({"schema": "tasa.stages/9", "stages": {}})


def test_mixture_record_is_checked_and_round_trips():
    from tasa.schemas import MIXTURE, Mixture

    d = {"schema": MIXTURE, "general": "wikitext2", "tasks": ["gsm8k"], "targets": ["gsm8k"],
         "criteria": ["grad-align"], "sources": ["wikitext2", "gsm8k"], "grid": [[1.0, 0.0], [0.0, 1.0]],
         "results": {"grad-align": {"values": [0.2, 0.9], "best": [0.0, 1.0]}}, "chosen": [0.0, 1.0],
         "calib": "gsm8k:1", "seed": 0}
    m = Mixture.from_dict(d)
    assert m.calib == "gsm8k:1" and m.extra == {"seed": 0} and m.to_dict() == d
    with pytest.raises(TasaError, match="lacks calib"):
        Mixture.from_dict({k: v for k, v in d.items() if k != "calib"})
    with pytest.raises(TasaError, match="do not match in length"):
        Mixture.from_dict({**d, "results": {"grad-align": {"values": [0.2], "best": [0.0, 1.0]}}})
    with pytest.raises(TasaError, match="not a tasa.mixture/1 record"):
        Mixture.from_dict({**d, "schema": "tasa.sensitivity/1"})


def test_evaluation_record_round_trips_and_reads_unstamped_records():
    from tasa.schemas import EVALUATION, Evaluation

    d = {"schema": EVALUATION, "model": "m", "config": {"limit": 2}, "results": {"gsm8k": {"gold_nll": 1.5}},
         "seconds": 3.0, "samples": {"gsm8k": [{"acc": 1}]}}
    e = Evaluation.from_dict(d)
    assert e.results["gsm8k"]["gold_nll"] == 1.5 and e.extra == {"seconds": 3.0} and e.to_dict() == d
    legacy = {k: v for k, v in d.items() if k != "schema"}  # written before the schema was stamped
    assert Evaluation.from_dict(legacy).to_dict() == d
    with pytest.raises(TasaError, match="lacks results"):
        Evaluation.from_dict({"model": "m", "config": {}})
    with pytest.raises(TasaError, match="not a tasa.eval/1 record"):
        Evaluation.from_dict({**d, "schema": "tasa.mixture/1"})
