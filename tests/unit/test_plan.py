import pytest

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.plan import Plan


def test_plan_json_round_trip(tmp_path):
    plan = Plan({"a": QuantSpec(bits=3, group_size=64), "b": QuantSpec(bits=8, group_size=-1, sym=False,
                                                                       act_order=True)}, method="gptq",
                meta={"budget": 3.5})
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back.modules == plan.modules and back.meta == plan.meta and back.method == "gptq"
    assert list(back.modules) == ["a", "b"]  # order preserved


def test_average_bits_weighted_by_size():
    plan = Plan({"a": QuantSpec(bits=3), "b": QuantSpec(bits=8)})
    assert plan.average_bits({"a": 300, "b": 100}) == pytest.approx((900 + 800) / 400)
    with pytest.raises(TasaError, match="no size known"):
        plan.average_bits({"a": 1})


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(group_size=0), dict(damp=0.0)])
def test_quant_spec_validation(bad):
    with pytest.raises(TasaError):
        QuantSpec(**bad)


def test_bad_plan_files(tmp_path):
    with pytest.raises(TasaError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "p.json").write_text('{"version": 99, "modules": {}}')
    with pytest.raises(TasaError, match="unsupported plan version"):
        Plan.load(tmp_path / "p.json")
    with pytest.raises(TasaError, match="unknown quantization method"):
        Plan(method="awq")
