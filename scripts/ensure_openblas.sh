#!/usr/bin/env bash
# MLX's Linux CPU wheel bundles a slow reference BLAS; Debian/Ubuntu's OpenBLAS makes MLX ~7x
# faster. Install it when we can (root, or passwordless sudo); otherwise say what to run.
# polygpt finds and preloads it at run time (see polygpt/blas.py).
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
for p in /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
         /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0; do
  [ -f "$p" ] && exit 0
done
command -v apt-get >/dev/null 2>&1 || { echo "note: install OpenBLAS for fast MLX on CPU"; exit 0; }
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "note: MLX on CPU is ~7x faster with OpenBLAS: sudo apt-get install libopenblas0-pthread"
    exit 0
  fi
fi
echo "installing libopenblas0-pthread (fast BLAS for MLX on CPU)"
$SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || \
  { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; } || \
  echo "note: could not install libopenblas0-pthread; MLX will use its slow bundled BLAS"
exit 0
