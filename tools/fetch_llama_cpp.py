"""llama.cpp's source, as the llama-cpp-python source distribution vendors it, from the package registry.

    python tools/fetch_llama_cpp.py DEST            # the HF -> GGUF converter only (convert_hf_to_gguf.py, ...)
    python tools/fetch_llama_cpp.py DEST --all      # the whole tree (to build llama-quantize, llama-imatrix)

The converter is what ``tasa quantize --format gguf --llama-cpp DEST`` runs on a Hugging Face model; ``make test``
fetches it for the GGUF export tests (they run the real converter), benchmarks/engines.py the whole tree.  The
version is pinned (LLAMA_CPP_PYTHON) so tests and benchmarks use the llama.cpp the engine proof runs.  Where the
registry is out of reach, point $LLAMA_CPP_DIR at any llama.cpp checkout instead.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def fetch(dest: Path, everything: bool = False) -> Path:
    """``dest`` holding the vendored llama.cpp (the converter's files, or ``everything``); kept when already
    there."""
    dest = Path(dest)
    marker = dest / ("CMakeLists.txt" if everything else "convert_hf_to_gguf.py")
    if marker.is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or m.name == prefix.rstrip("/"):
                    continue
                m.name = m.name[len(prefix):]
                if everything or any(m.name == p or m.name.startswith(p) for p in CONVERTER_PATHS):
                    members.append(m)
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    if not marker.is_file():
        raise SystemExit(f"{LLAMA_CPP_PYTHON}'s source distribution holds no {marker.name}")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--all", action="store_true", help="the whole llama.cpp tree, not only the converter")
    args = ap.parse_args()
    print(fetch(args.dest, args.all))


if __name__ == "__main__":
    main()
