"""Typed, validated configuration objects.

Everything here is a frozen dataclass validated on construction, so an invalid
setting fails where it is written, not deep inside a quantizer.  This file is longer
than ~400 lines because every verb's spec (and the runtime's and cluster's) is declared
and checked here, in one place, with the defaults the CLI and the Python API share.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from tasa.errors import TasaError

MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class QuantSpec:
    """How one linear module is quantized.

    bits:        weight bit-width, 2..8.
    group_size:  columns (input features) sharing one scale/zero; -1 = one group per row.
    sym:         symmetric grid (zero point fixed at the middle of the range, GPTQ convention).
    act_order:   GPTQ: process columns in order of decreasing Hessian diagonal.
    static_groups: GPTQ with act_order: compute all group grids before quantizing,
                 so group membership follows the original column order (exportable
                 with a trivial g_idx).
    damp:        GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean.
    block_size:  GPTQ: columns per lazy-batch update.
    super_group: 0, or columns sharing one fp16 super-scale: each group's scale is then that super-scale times
                 a ``scale_bits``-bit integer, the two-level grid of llama.cpp's K-quants (Q3_K: 16-column
                 groups, 256-column super-groups, signed 6-bit scales); asymmetric, each group also subtracts
                 an fp16 super-min times an unsigned integer (Q4_K: 32-column groups, 6-bit scales and mins).
    scale_bits:  bits of those integer group scales (and mins).
    scale_search: 0, or the number of narrower ranges to try for each group's grid besides the plain one
                 (1 - k / (2 * scale_search) of it, k = 1..scale_search: down to half), keeping, row by row, the
                 one with the least weighted squared error (weights: the Hessian's diagonal inside GPTQ, equal
                 ones for RTN): clipping that trades the outliers' error for everyone else's.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    super_group: int = 0
    scale_bits: int = 6
    scale_search: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise TasaError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise TasaError(f"group size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if not 0.0 < self.damp < 1.0:
            raise TasaError(f"damp must be in (0, 1), got {self.damp!r}")
        if self.block_size < 1:
            raise TasaError(f"block size must be positive, got {self.block_size!r}")
        if self.super_group:
            if self.group_size < 1 or self.super_group % self.group_size or self.super_group == self.group_size:
                raise TasaError(f"a super-group must hold several groups: {self.super_group} columns in groups of "
                                f"{self.group_size}")
            if self.act_order and not self.static_groups:
                raise TasaError("super-group scales with act_order need static_groups")
            if not 2 <= self.scale_bits <= 8:
                raise TasaError(f"scale_bits must be 2 to 8, got {self.scale_bits!r}")
        if not isinstance(self.scale_search, int) or not 0 <= self.scale_search <= 1000:
            raise TasaError(f"scale search takes 0 to 1000 candidate ranges, got {self.scale_search!r}")

    def fits_width(self, in_features: int) -> bool:
        """Whether this grid can quantize a module of ``in_features`` inputs (super-groups must tile them)."""
        return not self.super_group or in_features % self.super_group == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.super_group:  # one-level grids: the plans every earlier tasa wrote, unchanged
            del d["super_group"], d["scale_bits"]
        if not self.scale_search:
            del d["scale_search"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TasaError(f"unknown QuantSpec fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class CalibSpec:
    """Calibration set: N sequences of T tokens drawn from weighted sources."""

    sources: tuple[tuple[str, float], ...] = (("wikitext2", 1.0),)
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise TasaError(f"nsamples must be positive, got {self.nsamples}")
        if self.seqlen < 2:
            raise TasaError(f"seqlen must be at least 2, got {self.seqlen}")
        if not self.sources:
            raise TasaError("calibration needs at least one source")
        for name, w in self.sources:
            if w < 0:
                raise TasaError(f"calibration weight for {name!r} is negative ({w})")
        if sum(w for _, w in self.sources) <= 0:
            raise TasaError("calibration weights sum to zero")

    @classmethod
    def parse(cls, text: str, **kw) -> "CalibSpec":
        """Parse ``"wikitext2:0.5,gsm8k:0.5"`` (a bare name means weight 1)."""
        sources = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, weight = part.rpartition(":")
            if not sep or not _is_number(weight):
                name, weight = part, "1"
            sources.append((name, float(weight)))
        if not sources:
            raise TasaError(f"empty calibration spec {text!r}")
        return cls(sources=tuple(sources), **kw)

    def describe(self) -> str:
        return ",".join(f"{n}:{w:g}" for n, w in self.sources)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- the verbs' specs
# One frozen spec per verb (tasa.pipeline): what the verb computes, validated on construction, so that a bad
# setting fails before any model is loaded.  How it computes (device, dtype, batch size, progress) is a Runtime.

DTYPES = ("float32", "bfloat16", "float16")
STREAM_MODES = ("auto", "on", "off")


def _distinct(names: tuple[str, ...], what: str) -> None:
    if not names:
        raise TasaError(f"give one or more {what}")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise TasaError(f"{what}: {twice!r} is listed twice")


def _positive(value, flag: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise TasaError(f"{flag} must be a positive integer, got {value!r}")


_SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text: str, what: str) -> int:
    """Bytes of a size like "1GB", "500MB", "2GiB" or "4096"."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise TasaError(f"{what} must be a size such as 1GB, 500MB or 2GiB, got {text!r}")
    value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()])
    if value < 1:
        raise TasaError(f"{what} must be positive, got {text!r}")
    return value


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``auto`` (the first CUDA device when there is one, else the CPU), or a comma
    list of two or more distinct CUDA devices (``cuda:0,cuda:1``: the model's decoder layers spread over them,
    tasa.models.placement), returned as ``cuda:N`` names joined by commas; a CUDA device this machine does not have
    is an error."""
    if "," in device:
        names = [d.strip() for d in device.split(",")]
        if any(not re.fullmatch(r"cuda(:[0-9]+)?", d) for d in names):
            raise TasaError(f"--device: a list of devices names CUDA devices only (cuda:0,cuda:1), got {device!r}")
        names = [d if ":" in d else "cuda:0" for d in names]
        if len(set(names)) != len(names):
            raise TasaError(f"--device {device}: a device is named twice")
        return ",".join(resolve_device(d) for d in names)
    if device == "cpu":
        return device
    if device != "auto" and not re.fullmatch(r"cuda(:[0-9]+)?", device):
        raise TasaError(f"--device must be cpu, cuda, cuda:N, a list cuda:0,cuda:1 or auto, got {device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda:0" if count else "cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise TasaError(f"--device {device}: this machine has {count} CUDA device(s)"
                        + ("" if count else f" (torch {torch.__version__}, CUDA {torch.version.cuda})"))
    return device


def device_list(device: str) -> list[str]:
    """The devices of a :func:`resolve_device` result, the primary first (one, or the list's)."""
    return device.split(",")


def _one_of(value, choices: tuple, what: str) -> None:
    if value not in choices:
        raise TasaError(f"{what} must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got {value!r}")


DISTRIBUTED = ("ray",)
PLACEMENTS = ("auto", "task", "pipeline")


@dataclass(frozen=True)
class Cluster:
    """Where measurements run besides this process: ``backend`` ``ray`` (None: here, serially); the Ray cluster's
    ``address`` (None: the one RAY_ADDRESS names, else a local Ray instance started for the run); ``workers``
    (None: one per GPU of the cluster when the device is a GPU, else its CPU cores // ``threads``); ``threads``
    torch threads per CPU worker; ``placement`` of the probes: ``task`` (every worker holds the model),
    ``pipeline`` (each holds a slice of the layers), or ``auto`` (pipeline when this process streams the model
    because it exceeds memory, else task); ``stages`` per pipeline (None: every worker in one pipeline; else
    workers // stages pipelines)."""

    backend: str | None = None
    address: str | None = None
    workers: int | None = None
    threads: int = 1
    placement: str = "auto"
    stages: int | None = None

    def __post_init__(self) -> None:
        if self.backend is not None:
            _one_of(self.backend, DISTRIBUTED, "the distributed backend")
            import importlib.util

            if importlib.util.find_spec("ray") is None:  # now, before any model is loaded
                raise TasaError("--distributed ray needs Ray: pip install 'tasa[distributed]'")
        elif self.address is not None or self.workers is not None or self.placement != "auto" or \
                self.stages is not None:
            raise TasaError("--address, --workers, --placement and --stages need --distributed ray")
        if self.stages is not None and self.placement == "task":
            raise TasaError("--stages applies to --placement pipeline")
        _positive(self.workers, "--workers", allow_none=True)
        _positive(self.threads, "--worker-threads")
        _one_of(self.placement, PLACEMENTS, "--placement")
        _positive(self.stages, "--stages", allow_none=True)


@dataclass(frozen=True)
class Runtime:
    """Where and how a verb computes, not what: torch device (or devices: ``cuda:0,cuda:1``), model dtype (None:
    float32 on CPU, bfloat16 on GPU), sequences per forward batch, progress bars, and whether the model's weights
    are read from disk one decoder layer at a time (``stream``: on, off, or auto: when they exceed half of the free
    memory); the ``cluster`` that measurements spread over (probes; serial here by default)."""

    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = 8
    progress: bool = True
    stream: str = "auto"
    cluster: Cluster = Cluster()

    def __post_init__(self) -> None:
        if self.dtype is not None:
            _one_of(self.dtype, DTYPES, "dtype")
        _one_of(self.stream, STREAM_MODES, "--stream")
        object.__setattr__(self, "device", resolve_device(self.device))
        _positive(self.batch_size, "--batch-size")

    @property
    def devices(self) -> list[str]:
        """Every device: one, or a list (the model's decoder layers spread over them, tasa.models.placement)."""
        return device_list(self.device)

    @property
    def primary(self) -> str:
        """Where everything outside the decoder layers computes (the only device, or the list's first)."""
        return self.devices[0]


LEARN_DTYPES = ("auto", "float32", "bfloat16")
LEARN_STARTS = ("rtn", "gptq")
# The default quantizer of tasa quantize, run and sweep: GPTQ with act-order, static groups and a 16-range scale
# search, the best option that keeps `make run` (SmolLM2-135M on 2 CPU cores) within its 15 minutes: on tasa
# run's 3.5-bit plan (3 calibration seeds) it took the KL to full precision from 0.549 (plain GPTQ) to 0.349, the
# scale search alone to 0.391, in GPTQ's time; learned rounding (--learn-rounding) is better still but takes
# several times GPTQ's time on a CPU (docs/RESULTS.md, "Quantizer options").
SCALE_SEARCH = 16
# GPTQ's asymmetric calibration (--float-targets) at this strength wherever it applies (GPTQ in one process): on
# SmolLM2-135M it took the KL of `tasa run`'s plan from 0.349 to 0.305 over three calibration seeds
# (docs/RESULTS.md, "Quantizer options"); 1 (the plain least-squares fit) overshoots.
FLOAT_TARGETS = 0.25
# The better option where time allows, and the one to use on a GPU (its steps are a layer's forward and backward
# on a batch, what accelerators do best): learned rounding from the default GPTQ's result, 128 steps per layer, the
# last decoder layer on the model's output distribution (--learn-output-kl), the best of every option measured: on
# the paper table's TASA 3.5-bit plan of SmolLM2-135M with three quarters general text in the calibration, KL to
# full precision 0.135 +- 0.004 and WikiText-2 perplexity 32.68 over three seeds (AutoRound's AutoScheme 3.5:
# 0.142, 32.96; without --learn-output-kl 0.142, 33.01), GSM8K NLL 1.399 against AutoScheme's 1.588 (docs/RESULTS.md,
# "TASA's plan with each quantizer ..."), in this many times the default's quantize time in `tasa run`'s setting
# on 2 CPU cores (64 x 512 calibration tokens: 1,260 s against 256 s on an AMD EPYC, 2026-12-07; 4.6x on an Intel
# Xeon, 2026-12-06; benchmarks/run_quantizer.py).  The run report names it with its estimated time.
BETTER_OPTIONS = {"learn_rounding": 128, "learn_start": "gptq", "learn_output_kl": True}  # its QuantizeSpec fields
BETTER_QUANTIZER = ("--learn-rounding 128 --learn-start gptq --learn-output-kl", 4.9)  # as tasa quantize flags
# On a CPU that computes bfloat16 natively (AVX512-BF16, AMX), the faster one at AutoRound's quality: the same
# learning in 2-sequence batches with the model in bfloat16 while it is quantized (GPTQ and learned grids stay
# float32, Hessians are summed in float32 from bfloat16 products), as AutoRound itself computes there: on the paper
# table's plan and calibration KL 0.139 +- 0.003 and perplexity 32.67 over three seeds; in one invocation with
# AutoRound on the same plan, calibration and machine 0.42x its time at KL 0.138 (docs/RESULTS.md, "Met in one
# invocation"); in `tasa run`'s setting this many times the default's quantize time on the same machine (767 s
# against 296 s, benchmarks/run_quantizer.py, 2026-12-07 15:28; 1.9x, 494 s against 256 s, the same morning: its
# ratio to GPTQ varies with this machine's load). tasa run --time-budget tries it rather than rely on the ratio.
BETTER_QUANTIZER_BF16 = ("--learn-rounding 128 --learn-start gptq --learn-output-kl --batch-size 2 --dtype bfloat16",
                         2.6)
# The bfloat16 products of the Hessians did not slow it: 21.6 s a layer with them, 22.8 s with float32 products
# (benchmarks/bf16_products.py, the same afternoon).
BETTER_BF16_BATCH = 2  # its --batch-size (tasa run --time-budget quantizes so with this one)
# tasa run's general text: the general source of its mixture search, its calibration where the tasks have none,
# and its first profile objective.
GENERAL_TEXT = "wikitext2"
ACT_ORDER = True  # with static groups: grids fixed in column order before the columns are reordered (g_idx trivial)


@dataclass(frozen=True)
class QuantizeSpec:
    """tasa quantize: every decoder-layer linear at one QuantSpec (``group_size`` None: the largest of 128, 64,
    32, 16 dividing every input size), or by a plan; GPTQ on a calibration or RTN."""

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    act_order: bool = ACT_ORDER  # GPTQ: for every module, the plan's modules included
    static_groups: bool = ACT_ORDER
    damp: float = 0.01
    true_sequential: bool = True
    allow_ragged_groups: bool = False
    scale_search: int = SCALE_SEARCH  # QuantSpec.scale_search for every module, the plan's modules included
    learn_rounding: int = 0  # not 0: learned rounding (tasa.quant.learned) in this many steps per decoder layer
    learn_lr: float | None = None  # its first step size (None: 1 / learn_rounding)
    learn_dtype: str = "auto"  # its steps' dtype: auto (tasa.quant.learned.step_dtype), float32 or bfloat16
    # GPTQ with asymmetric calibration of this strength (tasa.quant.apply); None: FLOAT_TARGETS where it applies
    float_targets: float | None = None
    learn_start: str = "rtn"  # learned rounding from RTN on the grid, or "gptq": GPTQ's result, refined
    learn_output_kl: bool = False  # learned rounding of the last decoder layer on the output distribution's KL

    def __post_init__(self) -> None:
        _one_of(self.method, ("gptq", "rtn"), "the quantization method")
        if self.learn_output_kl and not self.learn_rounding:
            raise TasaError("--learn-output-kl is an objective of learned rounding: give --learn-rounding STEPS")
        _one_of(self.learn_start, LEARN_STARTS, "--learn-start")
        if self.learn_start == "gptq" and not (self.learn_rounding and self.method == "gptq"):
            raise TasaError("--learn-start gptq refines GPTQ's result by learned rounding: give --learn-rounding "
                            "STEPS, with GPTQ")
        if self.float_targets is not None and not 0 <= self.float_targets <= 1:
            raise TasaError(f"--float-targets takes a strength in [0, 1], got {self.float_targets!r}")
        if self.float_targets and (not self.runs_gptq or self.method != "gptq"):
            raise TasaError("--float-targets is a GPTQ option (learned rounding from RTN already targets the float "
                            "model's outputs; RTN has no calibration)")
        if not isinstance(self.learn_rounding, int) or not 0 <= self.learn_rounding <= 100_000:
            raise TasaError(f"--learn-rounding takes 0 to 100000 steps, got {self.learn_rounding!r}")
        if self.learn_lr is not None and not 0 < self.learn_lr <= 1:
            raise TasaError(f"--learn-lr must be in (0, 1], got {self.learn_lr!r}")
        _one_of(self.learn_dtype, LEARN_DTYPES, "--learn-dtype")
        self.quant_spec(-1 if self.group_size is None else self.group_size)  # bits, group size, damp in range

    def float_strength(self, method: str | None = None, distributed: bool = False) -> float:
        """The asymmetric calibration's strength for a quantization by ``method`` (default: this spec's; a plan
        brings its own): the one asked for, else FLOAT_TARGETS for GPTQ without learned rounding in one process
        (``distributed``: data-parallel calibration, which holds no float stream), else 0."""
        if self.float_targets is not None:
            return self.float_targets
        gptq = (method or self.method) == "gptq" and self.runs_gptq
        return FLOAT_TARGETS if gptq and not distributed else 0.0

    @property
    def runs_gptq(self) -> bool:
        """Whether GPTQ computes the weights (alone, or as learned rounding's start) for a GPTQ plan."""
        return not self.learn_rounding or self.learn_start == "gptq"

    def check_distributed(self, distributed: bool) -> None:
        """Refuse, with --distributed calibration, the options that need the float model's layer inputs and outputs
        beside the quantized model's (one process holds both streams)."""
        if distributed and (self.float_targets or self.learn_start == "gptq"):
            raise TasaError(f"{'--float-targets' if self.float_targets else '--learn-start gptq'} keeps the float "
                            "model's inputs beside the quantized model's in one process; it does not run with "
                            "--distributed")

    def resolved(self, method: str | None = None, distributed: bool = False) -> "QuantizeSpec":
        """This spec with its asymmetric calibration's strength settled (:meth:`float_strength`), as it runs."""
        return replace(self, float_targets=self.float_strength(method, distributed))

    def quant_spec(self, group_size: int) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=group_size, sym=self.sym, act_order=self.act_order,
                         static_groups=self.static_groups, damp=self.damp, scale_search=self.scale_search)

    @property
    def quantizer(self) -> str:
        """What rounds the weights, for records and reports, e.g. ``gptq with --act-order --static-groups
        --scale-search 16``."""
        flags = [f for f, on in (("--act-order", self.act_order), ("--static-groups", self.static_groups))
                 if on and self.method == "gptq" and self.runs_gptq]
        if self.learn_rounding:
            name = f"learned rounding ({self.learn_rounding} steps per layer)" + \
                (" from GPTQ" if self.learn_start == "gptq" else "")
        else:
            name = self.method
        if self.scale_search:
            flags.append(f"--scale-search {self.scale_search}")
        if self.float_targets:
            flags.append(f"--float-targets {self.float_targets:g}")
        if self.learn_output_kl:
            flags.append("--learn-output-kl")
        return name + (" with " + " ".join(flags) if flags else "")


EXPORT_FORMATS = ("gptq", "compressed-tensors", "gguf", "fp")
FLOAT_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ExportSpec:
    """How a quantized model is written: ``gptq``, ``compressed-tensors`` or ``gguf`` (packed checkpoints
    servable by ``target``; None: the plan's, else gptqmodel; ``gguf``: one file, for llama.cpp) or ``fp`` (the dequantized float model), in safetensors shards of at most
    ``max_shard_size`` (e.g. "1GB", "500MB"; a larger single tensor gets a shard of its own).  The export
    holds at most one shard in memory.  ``float_dtype``: the dtype of every tensor left in float (embeddings,
    head, norms, routers; with ``fp`` the dequantized linears too): ``auto`` is the source checkpoint's own
    dtype when it is a half one (a GGUF file's: float16), else the compute dtype.  ``gguf_template``,
    ``llama_cpp``: where a ``gguf`` export of a Hugging Face model takes its metadata, tokenizer and unquantized
    tensors from (a GGUF of the model, or a llama.cpp checkout whose converter makes one; see
    tasa.export.gguf_source)."""

    format: str | None = None  # None: the format the target is served from (gptq for gptqmodel)
    target: str | None = None
    max_shard_size: str = "1GB"
    float_dtype: str = "auto"  # the dtype of the tensors left in float (auto: the source's half dtype)
    gguf_template: str | None = None
    llama_cpp: str | None = None
    w8a8: bool = False  # compressed-tensors: the 8-bit modules as W8A8 (int8 weights per channel, int8 activations)

    def __post_init__(self) -> None:
        if self.format is not None:
            _one_of(self.format, EXPORT_FORMATS, "export format")
        if self.w8a8 and self.format not in (None, "compressed-tensors"):
            raise TasaError(f"--w8a8 is a compressed-tensors scheme, not one of {self.format} checkpoints")
        _one_of(self.float_dtype, FLOAT_DTYPES, "--float-dtype")
        self.max_shard_bytes  # validated

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size, "--max-shard-size")


@dataclass(frozen=True)
class EvalSpec:
    """tasa eval: ``tasks`` (built-in names or task spec files) on their first ``limit`` rows (None: all),
    wikitext2 on ``windows`` windows of ``seqlen`` tokens (None: ``limit``)."""

    tasks: tuple[str, ...] = ("wikitext2",)
    limit: int | None = None
    windows: int | None = None
    num_fewshot: int | None = None
    seqlen: int = 512
    kl_topk: int = 256
    apply_chat_template: bool = False
    generate: bool = True
    prefix_cache: bool = True
    log_samples: bool = False

    def __post_init__(self) -> None:
        _distinct(tuple(self.tasks), "tasks")
        _positive(self.limit, "--limit", allow_none=True)
        _positive(self.windows, "--windows", allow_none=True)
        _positive(self.seqlen, "--seqlen")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise TasaError(f"--num-fewshot must be a non-negative integer, got {self.num_fewshot!r}")


PROFILE_ESTIMATORS = ("measured", "fisher", "autoscheme")
CHOICE_COSTS = ("auto", "kl", "gold", "token-kl")  # how a probe scores multiple-choice objectives (tasa.profile.objectives)
# "auto": token-kl for an objective of fewer items than this, else kl (the crossover measured on ARC-Easy)
AUTO_CHOICE_ITEMS = 100
TOKEN_COSTS = ("kl", "nll")  # how a probe scores text objectives


@dataclass(frozen=True)
class ProfileSpec:
    """tasa profile: per-unit (layer or module) sensitivity at ``bits`` on each objective, from probes of
    ``probe_tokens`` scored tokens (RTN, or GPTQ on ``calib``) or a gradient estimator (``method``)."""

    objectives: tuple[str, ...] = ("wikitext2", "gsm8k", "arc_easy")
    bits: tuple[int, ...] = (3, 4, 8)
    granularity: str = "layer"
    group_size: int | None = None
    sym: bool = True
    probe_tokens: int = 4096
    probe_seqlen: int = 128
    seed: int = 0
    batch_tokens: int = 512
    estimator: str = "measured"
    choice_cost: str = "auto"
    token_cost: str = "kl"
    probe_quantizer: str = "rtn"
    calib: CalibSpec | None = None
    damp: float = 0.01
    layers: tuple[int, ...] | None = None
    max_state_gb: float = 4.0
    compare_estimators: bool = False
    tie_experts: bool = True

    def __post_init__(self) -> None:
        _distinct(tuple(self.objectives), "objectives")
        object.__setattr__(self, "bits", tuple(sorted({int(b) for b in self.bits})))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if not self.bits:
            raise TasaError("give one or more bit-widths to profile")
        for b in self.bits:
            QuantSpec(bits=b, group_size=-1 if self.group_size is None else self.group_size, sym=self.sym,
                      damp=self.damp)
        _one_of(self.granularity, ("layer", "module"), "granularity")
        _one_of(self.estimator, PROFILE_ESTIMATORS, "the sensitivity estimator")
        _one_of(self.choice_cost, CHOICE_COSTS, "the choice cost")
        _one_of(self.token_cost, TOKEN_COSTS, "the token cost")
        _one_of(self.probe_quantizer, ("rtn", "gptq"), "the probe quantizer")
        _positive(self.probe_tokens, "--probe-tokens")
        _positive(self.probe_seqlen, "--probe-seqlen")
        _positive(self.batch_tokens, "--batch-tokens")
        if self.max_state_gb < 0:
            raise TasaError(f"--max-state-gb must be non-negative, got {self.max_state_gb}")
        if self.probe_quantizer == "gptq":
            if self.estimator != "measured":
                raise TasaError("GPTQ probes are measured probes: they cannot be combined with an estimator")
            if self.calib is None:
                raise TasaError("GPTQ probes need calibration data (--calib)")


@dataclass(frozen=True)
class AllocationSpec:
    """tasa allocate: bits per unit minimising the aggregated cost (``beta`` * perplexity + (1 - beta) *
    tasks, tasks weighted by ``task_weights``) under ``budget`` average bits, servable by ``target``."""

    budget: float
    bits: tuple[int, ...] | None = None
    beta: float | str = 0.5
    task_weights: tuple[tuple[str, float], ...] | None = None
    budget_includes_metadata: bool = False
    method: str = "gptq"
    target: str = "gptqmodel"
    tie_fused: bool | None = None

    def __post_init__(self) -> None:
        _one_of(self.method, ("gptq", "rtn"), "the quantization method")
        if isinstance(self.beta, str):
            _one_of(self.beta, ("ppl-only", "task-only"), "beta preset")
        elif not 0.0 <= float(self.beta) <= 1.0:
            raise TasaError(f"beta must be in [0, 1] or ppl-only / task-only, got {self.beta!r}")
        if self.bits is not None:
            object.__setattr__(self, "bits", tuple(sorted({int(b) for b in self.bits})))

    @property
    def weights(self) -> dict[str, float] | None:
        return dict(self.task_weights) if self.task_weights is not None else None


MIXTURE_CRITERIA = ("hessian-trace", "grad-align", "measured")


@dataclass(frozen=True)
class MixtureSpec:
    """tasa search-mixture: calibration mixtures of ``general`` and ``tasks`` text scored by ``criteria`` (the
    first chooses) over general-text shares ``ratios`` (or the simplex at ``grid_step``), ``nsamples`` x
    ``seqlen`` tokens per source."""

    general: str = "wikitext2"
    tasks: tuple[str, ...] = ("gsm8k",)
    targets: tuple[str, ...] | None = None
    criteria: tuple[str, ...] = ("grad-align",)
    ratios: tuple[float, ...] | None = None
    grid_step: float | None = None
    nsamples: int = 128
    seqlen: int = 512
    heldout_samples: int = 32
    heldout_fraction: float = 0.2
    damp: float = 0.01
    damping_study: bool = True
    sketch_dim: int = 1 << 16
    measure_bits: int = 3
    group_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _distinct(tuple(self.tasks), "task sources")
        if not self.criteria or any(c not in MIXTURE_CRITERIA for c in self.criteria) \
                or len(set(self.criteria)) != len(self.criteria):
            raise TasaError(f"criteria are one or more of {', '.join(MIXTURE_CRITERIA)}; got {list(self.criteria)}")
        _positive(self.nsamples, "--nsamples")
        _positive(self.heldout_samples, "--heldout-samples")
        if self.seqlen < 2:
            raise TasaError(f"--seqlen must be at least 2, got {self.seqlen}")


@dataclass(frozen=True)
class RunSpec:
    """tasa run: [mixture search ->] profile -> allocate -> quantize -> export -> evaluate -> report.

    ``calib`` None: "auto" when every task is a built-in dataset with calibration rows, else wikitext2.
    ``bits`` None: those of 3, 4, 8 the target serves."""

    tasks: tuple[str, ...]
    budget: float
    calib: str | None = None
    mixture_criterion: str = "grad-align"
    bits: tuple[int, ...] | None = None
    beta: float | str = 0.5
    task_weights: tuple[tuple[str, float], ...] | None = None
    budget_includes_metadata: bool = False
    target: str = "gptqmodel"
    group_size: int | None = None
    probe_tokens: int = 768
    choice_cost: str = "auto"
    token_cost: str = "kl"
    probe_quantizer: str = "rtn"
    granularity: str = "layer"
    tie_experts: bool = True
    export_format: str | None = None  # None: the format the target is served from
    gguf_template: str | None = None  # a gguf export's ExportSpec.gguf_template and llama_cpp
    llama_cpp: str | None = None
    nsamples: int = 64
    search_samples: int = 4
    seqlen: int = 512
    seed: int = 0
    eval_limit: int = 50
    eval_windows: int = 20
    generate: bool = False
    scale_search: int = SCALE_SEARCH  # the quantize stage's QuantizeSpec.scale_search, act_order, static_groups
    act_order: bool = ACT_ORDER
    static_groups: bool = ACT_ORDER
    learn_rounding: int = 0  # ... and its learn_rounding, learn_lr and learn_dtype
    learn_lr: float | None = None
    learn_dtype: str = "auto"
    float_targets: float | None = None  # ... and its float_targets, learn_start and learn_output_kl
    learn_start: str = "rtn"
    learn_output_kl: bool = False
    # minutes the run's stages may take (None: no budget): the quantizer is then the first of the better one
    # (BETTER_OPTIONS) and, on a CPU that computes bfloat16 natively, its bfloat16 variant whose trial on the first
    # decoder layer projects it within the minutes left, else the default (tasa.pipeline.run, quantizer_choice)
    time_budget: float | None = None

    def __post_init__(self) -> None:
        self.quantize_spec()  # in range
        if self.time_budget is not None:
            if not (isinstance(self.time_budget, (int, float)) and 0 < self.time_budget < float("inf")):
                raise TasaError(f"--time-budget takes a positive number of minutes, got {self.time_budget!r}")
            if self.learn_rounding:
                raise TasaError("--time-budget chooses the quantizer (learned rounding where it fits, else the "
                                "default); give it or --learn-rounding, not both")
        if not self.tasks or "wikitext2" in self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise TasaError("give one or more distinct tasks (wikitext2 perplexity is always profiled and evaluated)")
        _one_of(self.mixture_criterion, MIXTURE_CRITERIA, "the mixture criterion")
        _one_of(self.choice_cost, CHOICE_COSTS, "the choice cost")
        _one_of(self.token_cost, TOKEN_COSTS, "the token cost")
        _one_of(self.probe_quantizer, ("rtn", "gptq"), "probe quantizer")
        _one_of(self.granularity, ("layer", "module"), "granularity")
        if self.export_format is not None:
            _one_of(self.export_format, EXPORT_FORMATS, "--format")
        _positive(self.search_samples, "--search-samples")
        if self.eval_limit < 1 or self.eval_windows < 1:
            raise TasaError(f"--eval-limit and --eval-windows must be positive, got {self.eval_limit}, "
                            f"{self.eval_windows}")
        AllocationSpec(budget=self.budget, bits=self.bits, beta=self.beta, task_weights=self.task_weights,
                       target=self.target)  # beta in range
        if self.calib not in (None, "auto"):
            CalibSpec.parse(self.calib, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)

    def quantize_spec(self) -> "QuantizeSpec":
        """The quantize stage's options (its method and grids are the plan's)."""
        return QuantizeSpec(act_order=self.act_order, static_groups=self.static_groups,
                            scale_search=self.scale_search, learn_rounding=self.learn_rounding,
                            learn_lr=self.learn_lr, learn_dtype=self.learn_dtype, float_targets=self.float_targets,
                            learn_start=self.learn_start, learn_output_kl=self.learn_output_kl)


@dataclass(frozen=True)
class SweepSpec:
    """tasa sweep: the plans of ``budgets`` x ``betas``, allocated from one profile as tasa allocate does (over
    ``bits``, for ``target``), each quantized in memory by ``quantize`` on ``calib`` and evaluated by
    ``evaluation``."""

    budgets: tuple[float, ...]
    betas: tuple[float | str, ...] = (0.5,)
    bits: tuple[int, ...] | None = None
    target: str = "gptqmodel"
    quantize: QuantizeSpec = QuantizeSpec()
    calib: CalibSpec = CalibSpec(nsamples=64)
    evaluation: EvalSpec = EvalSpec(tasks=("wikitext2",), limit=50, windows=20, generate=False)

    def __post_init__(self) -> None:
        if not self.budgets or not self.betas:
            raise TasaError("give one or more budgets and betas to sweep")
        _distinct(tuple(self.budgets), "budgets")
        _distinct(tuple(self.betas), "betas")
        if self.quantize.learn_rounding:
            raise TasaError("tasa sweep quantizes with GPTQ (with the quantizer options); learned rounding is a "
                            "tasa quantize option")
        self.allocations()  # each in range

    def allocations(self) -> list[tuple[str, AllocationSpec]]:
        """(name, allocation) of every point of the sweep, budgets outer."""
        return [(f"b{budget:g}-beta{beta}", AllocationSpec(budget=budget, bits=self.bits, beta=beta,
                                                           target=self.target))
                for budget in self.budgets for beta in self.betas]
