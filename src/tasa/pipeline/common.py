"""What every verb of the pipeline shares: output paths checked before any work, the automatic group size,
plan coverage, provenance (machine, dtype, date) and the atomic publication of an output directory."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from tasa import __version__
from tasa.errors import TasaError
from tasa.config import Runtime
from tasa.models import LoadedModel, compute_dtype, load
from tasa.models.arch import ModelArch
from tasa.plan import Plan

log = logging.getLogger("tasa.pipeline")


def model_of(model: str | LoadedModel, runtime: Runtime) -> tuple[LoadedModel, str]:
    """The model a verb works on and its name for the records: ``model`` itself when it is already loaded (as
    tasa run shares one model between its stages), else loaded now."""
    if isinstance(model, LoadedModel):
        return model, model.source
    stream = {"auto": None, "on": True, "off": False}[runtime.stream]
    return load(model, dtype=runtime.dtype, device=runtime.device, stream=stream), model


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """An output directory that can be written (checked now, before any expensive work)."""
    out = check_new_dir(output_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TasaError(f"output directory {out} is not empty; pass --overwrite to replace it")
    return out


def check_output_file(output: str | Path, flag: str = "--output") -> Path:
    """An output file path that can be written: not a directory, in a directory that can be written."""
    path = Path(output)
    if path.is_dir():
        raise TasaError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'results.json'}")
    check_writable(path.parent, path)
    return path


def check_writable(directory: Path, what: Path) -> None:
    """Create ``directory`` if needed and prove it writable by creating and removing a file there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".tasa-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TasaError(f"cannot write {what}: {e.strerror or e} ({directory})") from None


def check_group_size(arch: ModelArch, group_size: int, allow_ragged: bool) -> None:
    """GPTQ checkpoints and engines need the group size to divide every input size."""
    if group_size == -1 or allow_ragged:
        return
    for m in arch.modules:
        if m.in_features % group_size:
            raise TasaError(
                f"group size {group_size} does not divide the input size {m.in_features} of {m.name}; "
                f"choose a divisor (e.g. {_largest_pow2_divisor(m.in_features, group_size)}) or --allow-ragged-groups"
            )


AUTO_GROUP_SIZES = (128, 64, 32, 16)


def resolve_group_size(arch: ModelArch, group_size: int | None, allow_ragged: bool = False) -> int:
    """``group_size`` checked against every input size; ``None`` (auto) chooses the largest of 128, 64, 32, 16
    that divides every input size (SmolLM2's hidden size 576 gives 64) and logs the choice."""
    if group_size is not None:
        check_group_size(arch, group_size, allow_ragged)
        return group_size
    for g in AUTO_GROUP_SIZES:
        if all(m.in_features % g == 0 for m in arch.modules):
            odd = next((m for m in arch.modules if m.in_features % AUTO_GROUP_SIZES[0]), None)
            log.info("group size: auto -> %d%s", g, f" ({AUTO_GROUP_SIZES[0]} does not divide {odd.in_features}, "
                     f"the input size of {odd.name})" if odd else "")
            return g
    sizes = sorted({m.in_features for m in arch.modules})
    raise TasaError(f"no group size of {', '.join(map(str, AUTO_GROUP_SIZES))} divides every input size "
                    f"({', '.join(map(str, sizes[:6]))}); pass --group-size (-1: one group per output channel)")


def validation_group_size(group_size: int | None) -> int:
    """A stand-in for checking a spec before the model (and so the automatic group size) is known."""
    return -1 if group_size is None else group_size


def _largest_pow2_divisor(n: int, below: int) -> int:
    g = 1
    while g * 2 <= below and n % (g * 2) == 0:
        g *= 2
    return g


def check_plan_covers(plan: Plan, arch: ModelArch, allow_partial: bool) -> None:
    """A plan names exactly the model's quantizable linears; left-out ones only with ``allow_partial``."""
    missing, extra = plan.coverage(m.name for m in arch.modules)

    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if extra:
        raise TasaError(f"the plan names {len(extra)} module(s) that are not quantizable linears of this model "
                        f"({listed(extra)}); was it made for another model?")
    if missing and not allow_partial:
        raise TasaError(f"the plan leaves {len(missing)} of the model's {len(arch.modules)} quantizable linears "
                        f"unplanned ({listed(missing)}); pass --allow-partial-plan to keep them in full precision")


def bits_summary(plan: Plan, arch: ModelArch, dtype: str) -> dict:
    """Average weight bits over every quantizable linear (unplanned ones at their stored dtype's bits), over the
    planned ones alone, and over every weight of the decoder layers (routers and norms at the stored dtype's
    bits; every routed expert counted), with the unplanned modules named."""
    numels = arch.numels()
    stored = torch.finfo(getattr(torch, dtype)).bits
    unplanned = [n for n in numels if n not in plan.modules]
    total = sum(numels.values())
    linear_bits = sum(numels[n] * (plan.modules[n].bits if n in plan.modules else stored) for n in numels)
    bits = linear_bits / total
    layer_weights = sum(p.numel() for p in arch.layers.parameters())  # routers, norms: kept at the stored dtype
    all_bits = (linear_bits + (layer_weights - total) * stored) / layer_weights
    return {"average_bits": bits, "planned_average_bits": plan.average_bits(numels),
            "layer_weights_average_bits": all_bits, "layer_weights": layer_weights,
            "unquantized_modules": unplanned, "unquantized_bits": stored if unplanned else None}


def dtype_name(model) -> str:
    return str(compute_dtype(model)).replace("torch.", "")


def machine_info() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "tasa": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def peak_gpu_gb(devices: list[str]) -> float | None:
    """The most GPU memory torch held on any of ``devices`` in this process (GiB); None on the CPU."""
    cuda = [d for d in devices if str(d).startswith("cuda")]
    return max(torch.cuda.max_memory_allocated(d) for d in cuda) / 2 ** 30 if cuda else None


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place, replacing ``out`` if present."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def temp_dir_for(out: Path) -> Path:
    """A new temporary sibling of ``out`` to write into before :func:`publish_dir`; its name carries this
    process's id, so that :func:`clear_stale_temps` can tell a killed writer's leftovers from a live one's."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))


def clear_stale_temps(out: Path) -> None:
    """Remove the temporary siblings of ``out`` left by a writer that was killed (its process is gone)."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another live process is writing there
        log.info("removing %s, left by a writer that was killed", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def now() -> str:
    """The current UTC time, as records carry it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_new_dir(output_dir: str | Path) -> Path:
    """An output path that is a directory or does not exist yet, in a writable place."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TasaError(f"output path {out} exists and is not a directory")
    check_writable(out.parent, out)
    return out
