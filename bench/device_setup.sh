# Source on the GPU machine: installs the carried wheel folders (.whl_nemo: NeMo + audio deps;
# .whl: Ray + DeepSpeed) into $HOME/site, which survives between calls while the machine is warm,
# and sets the environment the benchmarks need. See BENCHMARKS.md for how the folders are made.
mkdir -p "$HOME/site"
for folder in .whl_nemo .whl; do
  if ls "$folder"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$HOME/site" "$folder"/*.whl 2>&1 | grep -v -i "warning" || true
  fi
done
# NeMo's TTS modules `import wandb` when the collections load; SALM never calls it.
[ -d "$HOME/site/wandb" ] || { mkdir -p "$HOME/site/wandb" && echo '"""Import stub."""' > "$HOME/site/wandb/__init__.py"; }
export PYTHONPATH="$HOME/site:$PWD" RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
