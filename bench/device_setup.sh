# Source on the GPU machine: installs the carried folders (.whl_nemo: NeMo + audio deps; .whl_hf: the
# pinned transformers/peft; .whl: Ray + DeepSpeed; .tts_debs: flite) into $HOME/site and $HOME/tts, which survive between calls while the
# machine is warm, and sets the environment the benchmarks need. See BENCHMARKS.md for how the folders are made.
mkdir -p "$HOME/site"
for folder in .whl_nemo .whl_hf .whl; do
  if ls "$folder"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$HOME/site" "$folder"/*.whl 2>&1 | grep -v -i "warning" || true
  fi
done
# flite for the offline speech corpus (bench/learning_gpu.py): Debian packages unpacked, not installed.
if ls .tts_debs/*.deb >/dev/null 2>&1; then
  mkdir -p "$HOME/tts" && for deb in .tts_debs/*.deb; do dpkg -x "$deb" "$HOME/tts"; done
fi
if [ -x "$HOME/tts/usr/bin/flite" ]; then
  export PATH="$HOME/tts/usr/bin:$PATH" LD_LIBRARY_PATH="$HOME/tts/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# NeMo's TTS modules `import wandb` when the collections load; SALM never calls it.
[ -d "$HOME/site/wandb" ] || { mkdir -p "$HOME/site/wandb" && echo '"""Import stub."""' > "$HOME/site/wandb/__init__.py"; }
export PYTHONPATH="$HOME/site:$PWD" RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
