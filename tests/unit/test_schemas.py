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
