#!/usr/bin/env bash
# One-shot set-up on a fresh Debian/Ubuntu machine: system packages for offline speech
# synthesis and audio decoding, then a virtual environment in .venv with the pinned project.
set -euo pipefail
cd "$(dirname "$0")"

# g++: torch.compile's Inductor builds C++ (CPU kernels; the canary recipe's `cpp_wrapper` on GPUs)
# and DeepSpeed builds its ops with it.
SYSTEM_PACKAGES=(flite espeak-ng sox libsndfile1 g++)
missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# DS_BUILD_OPS=0: DeepSpeed compiles its ops on first use instead of at install.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[test]"
# DeepSpeed's CPU backend otherwise compiles its shared-memory comm op (~2 min) at the first
# deepspeed.initialize of every fresh machine; build it into the package once, here.
if ! ls .venv/lib/python3*/site-packages/deepspeed/ops/comm/deepspeed_shm_comm_op*.so >/dev/null 2>&1; then
  echo "prebuilding DeepSpeed's CPU comm op (about 2 minutes)"
  DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 .venv/bin/python -m pip install -q --no-cache-dir --no-build-isolation \
    --no-deps --force-reinstall "deepspeed==0.19.8"
fi
echo "salm-ray installed in .venv ($(.venv/bin/python -c 'import salm; print(salm.__version__)'))"
