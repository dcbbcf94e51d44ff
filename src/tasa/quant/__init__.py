"""Quantization: pure kernels (RTN grids, GPTQ) and the sequential plan driver."""
from tasa.quant.gptq import accumulate_hessian, gptq_quantize
from tasa.quant.rtn import compute_grid, dequantize, quantize_codes, rtn_quantize
from tasa.quantized import QuantResult

__all__ = [
    "QuantResult",
    "accumulate_hessian",
    "compute_grid",
    "dequantize",
    "gptq_quantize",
    "quantize_codes",
    "rtn_quantize",
]
