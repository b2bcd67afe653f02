#!/bin/sh
# Shrink a venv once its packages are installed; runs in the Containerfile's build stages only.
#   venv-trim.sh VENV
set -eu
venv=$1
site=$(echo "$venv"/lib/python3*/site-packages)
# pip and setuptools do nothing at run time.
"$venv/bin/python" -m pip uninstall -q -y pip setuptools 2>/dev/null || true
rm -f "$venv"/bin/pip* "$venv"/bin/activate* "$venv"/bin/Activate.ps1
if [ -d "$site/llama_cpp/lib" ]; then
    # llama-cpp-python's wheel also puts headers, CMake files and a second set of its
    # libraries in site-packages/{include,lib}; llama_cpp loads only from llama_cpp/lib.
    rm -rf "$site/include" "$site/lib"
    # A wheel cannot hold symlinks, so libX.so, libX.so.0 and libX.so.0.y.z arrive as three
    # full copies: keep the versioned file and link the other two names to it.
    for versioned in "$site"/llama_cpp/lib/lib*.so.*.*.*; do
        [ -e "$versioned" ] || continue
        name=$(basename "$versioned")
        ln -sf "$name" "$site/llama_cpp/lib/${name%.*.*}"
        ln -sf "$name" "$site/llama_cpp/lib/${name%%.so.*}.so"
    done
fi
[ -d "$site/numpy" ] && find "$site/numpy" -depth -type d -name tests -exec rm -rf {} +
find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
# Byte-compile once here: a read-only root cannot cache .pyc files at run time. unchecked-hash
# keeps them valid whatever times COPY --from gives the sources.
"$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$venv/lib" >/dev/null
