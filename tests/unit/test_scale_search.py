"""Scale/clipping search (issue 38, 1a): each group's grid chosen among narrower ranges by weighted squared error,
in RTN and inside GPTQ; never worse than the plain grid on its own objective; the codes stay on the grid."""
import pytest
import torch

from tasa.config import QuantizeSpec, QuantSpec
from tasa.errors import TasaError
from tasa.quant.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from tasa.quant.rtn import compute_grid, grid_error, rtn_quantize, search_grid


def _heavy(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights with a few outliers per row, as trained layers have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w += (torch.rand(rows, cols, generator=g) < 0.02) * torch.randn(rows, cols, generator=g) * 0.15
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_search_never_raises_the_weighted_error_and_usually_lowers_it(bits, sym):
    x = _heavy(256, 64, bits)
    weights = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.1
    plain = grid_error(x, *compute_grid(x, bits, sym), bits, weights)
    found = grid_error(x, *search_grid(x, bits, sym, 16, weights), bits, weights)
    assert torch.all(found <= plain)
    if bits <= 4:
        assert (found < plain).float().mean() > 0.3 and found.sum() < 0.95 * plain.sum()
    scale, zero = search_grid(x, bits, sym, 0, weights)  # 0 steps: the plain grid
    assert torch.equal(scale, compute_grid(x, bits, sym)[0])


def test_search_weighs_the_columns_it_is_told_to():
    """One row, two columns that matter and one huge outlier that does not: the search clips the outlier."""
    x = torch.tensor([[1.0, 0.3, 0.2, -0.26]])
    weights = torch.tensor([1e-6, 1.0, 1.0, 1.0])
    scale, zero = search_grid(x, 2, True, 8, weights)
    assert scale.abs().item() < compute_grid(x, 2, True)[0].abs().item()
    assert grid_error(x, scale, zero, 2, weights) < grid_error(x, *compute_grid(x, 2, True), 2, weights)


@pytest.mark.parametrize("sym", [True, False])
def test_the_search_in_bands_of_rows_finds_the_grids_it_finds_at_once(sym, monkeypatch):
    """Rows are searched in bands that fit a cache (SEARCH_BAND_ELEMENTS): each row's grid is its own, so bands of 3
    rows (the last one short) give the whole-matrix search's scales and zeros bit for bit, with the column weights
    shared by every row or given row by row."""
    import tasa.quant.rtn as rtn

    x = _heavy(11, 16, 7)
    g = torch.Generator().manual_seed(2)
    for weights in (None, torch.rand(16, generator=g) + 0.1, torch.rand(11, 16, generator=g) + 0.1):
        monkeypatch.setattr(rtn, "SEARCH_BAND_ELEMENTS", 2**30)
        whole = search_grid(x, 3, sym, 8, weights)
        monkeypatch.setattr(rtn, "SEARCH_BAND_ELEMENTS", 3 * 16)
        banded = search_grid(x, 3, sym, 8, weights)
        assert torch.equal(banded[0], whole[0]) and torch.equal(banded[1], whole[1])
    plain = compute_grid(x, 3, sym)
    assert not torch.equal(whole[0], plain[0])  # the search moved some grids (what the bands must reproduce)


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, group_size=64), QuantSpec(bits=4, group_size=32),
                                  QuantSpec(bits=3, group_size=64, act_order=True, static_groups=True),
                                  QuantSpec(bits=3, group_size=16, super_group=256)])
def test_gptq_with_the_search_lowers_the_output_error_and_stays_on_the_grid(spec):
    g = torch.Generator().manual_seed(5)
    w = _heavy(48, 512, 3)
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, 512, generator=g) + 0.3 * torch.randn(2048, 512,
                                                                                                   generator=g)
    h = make_empty_hessian(512)
    accumulate_hessian(h, 0, x)
    err = lambda q: torch.trace((q - w) @ h @ (q - w).T).item()  # noqa: E731
    import dataclasses

    plain = gptq_quantize(w, h, spec)
    found = gptq_quantize(w, h, dataclasses.replace(spec, scale_search=16))
    assert err(found.weight) < 0.99 * err(plain.weight)
    assert torch.equal(found.dequantize(), found.weight) and int(found.codes.max()) < 2 ** spec.bits
    r = rtn_quantize(w, spec.bits, spec.group_size, spec.sym, spec.super_group, spec.scale_bits, 16)
    assert ((r.weight - w) ** 2).sum() < ((rtn_quantize(w, spec.bits, spec.group_size, spec.sym, spec.super_group,
                                                        spec.scale_bits).weight - w) ** 2).sum()


def test_the_option_is_validated_and_recorded_only_when_on():
    with pytest.raises(TasaError, match="scale search takes 0 to 1000"):
        QuantSpec(scale_search=-1)
    assert "scale_search" not in QuantSpec().to_dict()
    assert QuantSpec.from_dict(QuantSpec(scale_search=8).to_dict()).scale_search == 8
    assert QuantizeSpec(scale_search=8).quant_spec(64).scale_search == 8


def test_quantize_applies_the_search_to_every_module_of_a_plan(tmp_path, tiny_model_dir):
    import json

    from tasa.config import ExportSpec
    from tasa.pipeline.quantize import quantize
    from tasa.plan import Plan

    plain = quantize(str(tiny_model_dir), tmp_path / "a", QuantizeSpec(method="rtn", bits=3, group_size=32),
                     export=ExportSpec(format="gptq"))
    plan = tmp_path / "a" / "plan.json"
    found = quantize(str(tiny_model_dir), tmp_path / "b", QuantizeSpec(method="rtn", scale_search=12), plan=plan,
                     export=ExportSpec(format="gptq"))
    assert {s.scale_search for s in Plan.load(tmp_path / "b" / "plan.json").modules.values()} == {12}
    errs = lambda r: sum(m["rel_error"] or 0 for m in r.record["modules"].values())  # noqa: E731
    rec = json.loads((tmp_path / "b" / "quantize.json").read_text())
    assert rec["modules"] and errs(found) <= errs(plain) or all(m["rel_error"] is None for m in rec["modules"].values())


def test_tasa_run_and_quantize_take_the_option():
    from tasa.cli import build_parser
    from tasa.config import RunSpec

    p = build_parser()
    assert p.parse_args(["run", "--tasks", "arc_easy", "--budget", "3.5", "--output-dir", "x",
                         "--scale-search", "8"]).scale_search == 8
    assert p.parse_args(["quantize", "--output-dir", "x", "--scale-search", "4"]).scale_search == 4
    with pytest.raises(TasaError, match="scale search takes 0 to 1000"):
        RunSpec(tasks=("arc_easy",), budget=3.5, scale_search=2000)


def test_quantize_applies_act_order_and_static_groups_to_every_module_of_a_plan(tmp_path, tiny_model_dir, data_dir):
    """Given with a plan, the GPTQ options reach every module (they were silently ignored before 2026-12-04)."""
    from safetensors.torch import load_file

    from tasa.config import CalibSpec, ExportSpec
    from tasa.pipeline.quantize import quantize
    from tasa.plan import Plan

    calib = CalibSpec.parse("wikitext2", nsamples=8, seqlen=32)
    quantize(str(tiny_model_dir), tmp_path / "a", QuantizeSpec(bits=3, group_size=16, act_order=False,
                                                               static_groups=False), calib,
             export=ExportSpec(format="fp"))
    plan = tmp_path / "a" / "plan.json"
    quantize(str(tiny_model_dir), tmp_path / "b", QuantizeSpec(act_order=True, static_groups=True), calib, plan=plan,
             export=ExportSpec(format="fp"))
    specs = Plan.load(tmp_path / "b" / "plan.json").modules.values()
    assert all(s.act_order and s.static_groups and s.bits == 3 and s.group_size == 16 for s in specs)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("q_proj.weight"))
