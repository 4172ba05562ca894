#!/usr/bin/env bash
# Sets up this project on a fresh machine: a virtual environment in .venv with the project installed,
# and the Fashion-MNIST files from the system's package manager where it has them.
#   ./setup.sh          runtime only
#   ./setup.sh --dev    plus the test tools and headless Chromium (for the report rendering tests)
set -euo pipefail
cd "$(dirname "$0")"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 

# System packages: the Fashion-MNIST IDX files (Debian: dataset-fashion-mnist) and, for tests, Chromium.
packages=(dataset-fashion-mnist)
[ $dev = 1 ] && packages+=(chromium)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "setup: could not install ${missing[*]}; Fashion-MNIST will be downloaded by torchvision on first use"
  fi
else
  echo "setup: no apt-get as root here; Fashion-MNIST will be downloaded by torchvision on first use"
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
[ $dev = 1 ] && extra="[dev]"
# pip byte-compiles what it installs on one core; compileall does the same on every core (about half the time).
.venv/bin/python -m pip install -q --no-compile -e ".${extra}"
.venv/bin/python -m compileall -qq -j 0 .venv/lib/python3.11/site-packages || :  # (a few vendored test files do not parse)
echo "setup: done (.venv)"
