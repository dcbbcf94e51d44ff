"""The package layering of issue 35, checked from the source: no import cycle between tasa's packages,
no forbidden import, allocation importable without torch.  The graph itself: tools/import_graph.py."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
ig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ig)


def test_cycle_search_finds_every_cycle_once_and_none_in_a_dag():
    g = {"a": {"b": []}, "b": {"c": [], "a": []}, "c": {"a": []}, "d": {"a": []}}
    assert sorted(map(tuple, ig.cycles(g))) == [("a", "b", "a"), ("a", "b", "c", "a")]
    assert ig.cycles({"a": {"b": []}, "b": {"c": []}, "c": {}, "d": {"a": [], "c": []}}) == []


def test_forbidden_imports_are_named(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.py").write_text("from tasa.quant.apply import quantize_model\nimport tasa.cli\n")
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "rtn.py").write_text("def f():\n    from tasa.models import load\n")
    (tmp_path / "quant" / "apply.py").write_text("from tasa.models.walker import walk\n")  # allowed: not a kernel
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "probe.py").write_text("from tasa.distributed.probes import RayProbes\n")
    assert ig.violations(tmp_path) == ["eval/x.py imports quant (evaluation scores any model)",
                                       "eval/x.py imports cli (nothing but __main__ may)",
                                       "profile/probe.py imports distributed (only the stages choose where their "
                                       "work runs)",
                                       "quant/rtn.py imports models (quantization kernels are pure functions)"]
    assert ig.graph(tmp_path) == {"eval": {"quant": ["eval/x.py"], "cli": ["eval/x.py"]},
                                  "profile": {"distributed": ["profile/probe.py"]},
                                  "quant": {"models": ["quant/apply.py", "quant/rtn.py"]}}


def test_tasa_packages_form_no_cycle_and_respect_the_layering():
    g = ig.graph()
    assert {"models", "quant", "export", "allocate", "profile", "mixture", "eval", "pipeline", "distributed"} <= set(g)
    assert ig.cycles(g) == []
    assert ig.violations() == []


def test_allocation_imports_without_torch():
    code = ("import sys; import tasa.allocate.plan, tasa.allocate.dp, tasa.allocate.aggregate, tasa.allocate.targets; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
