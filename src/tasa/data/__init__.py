"""Data: local sources (with evaluation splits protected) and calibration token sets."""
from tasa.data.calib import CalibrationSet, apportion, build_calibration, mix_sources, split_heldout
from tasa.data.sources import BUILTIN, builtin_rows, eval_texts, resolve_calibration_source

__all__ = ["BUILTIN", "CalibrationSet", "apportion", "build_calibration", "builtin_rows", "eval_texts", "mix_sources",
           "resolve_calibration_source", "split_heldout"]
