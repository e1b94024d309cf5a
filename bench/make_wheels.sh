#!/usr/bin/env bash
# Rebuild .whl/: the wheels the GPU machine's image lacks (Python 3.12, x86-64, no network there), plus the two
# small assets the benchmarks need (bench-assets/: vocab.txt, VADER sentences). Run from the repository root on a
# machine with PyPI. Everything must stay under the 64 MiB that travels with a device call (~54 MiB now).
#
# ray 2.60.0 is repacked without ray/jars/ (Java support, 31 MiB compressed) and the dashboard's *.js.map source
# maps; its RECORD loses those lines, so it installs as a valid wheel. One version of each package; versions match
# the .venv that CI tests. The image already has torch, transformers, pandas, pyarrow, numpy, aiohttp, attrs,
# protobuf, msgpack, click, filelock, fsspec, pyyaml, requests, xxhash, huggingface-hub, safetensors, tokenizers,
# scikit-learn, markupsafe, psutil, tqdm, packaging (device KINDS.md). peft and typing_extensions are carried to
# pin the versions lorasent and pydantic were tested with.
#
# On the GPU machine (bench/gpu_run.sh does this):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$RAW" \
  ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 \
  tensorboardX==2.6.5 optuna==5.0.0 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 typing-extensions==4.16.0

rm -f .whl/*.whl
mkdir -p .whl
for wheel in "$RAW"/*.whl; do
  case "$(basename "$wheel")" in ray-*) ;; *) cp "$wheel" .whl/ ;; esac
done
python3 - "$RAW"/ray-2.60.0-*.whl .whl/ <<'EOF'
"""Copy the ray wheel without ray/jars/ and *.js.map, dropping their RECORD lines."""
import sys
import zipfile
from pathlib import Path

src, dest = Path(sys.argv[1]), Path(sys.argv[2]) / Path(sys.argv[1]).name


def dropped(name: str) -> bool:
    return name.startswith("ray/jars/") or name.endswith(".js.map")


with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for info in zin.infolist():
        if dropped(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(True) if not dropped(line.split(",")[0])).encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
print(f"{dest.name}: {src.stat().st_size / 2**20:.1f} MiB -> {dest.stat().st_size / 2**20:.1f} MiB")
EOF
.venv/bin/python bench/data.py export-assets --dest .whl/bench-assets
du -ch .whl/*.whl | tail -1
