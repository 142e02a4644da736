#!/usr/bin/env bash
# Run cancelflow's token, pool and executor tests on a free-threaded (no-GIL) CPython 3.13.
#
#   scripts/free-threaded.sh [--build] [REPO [PYTEST-ARGS...]]
#
# The interpreter is the first free-threaded one of: $CANCELFLOW_FT_PYTHON, python3.13t on
# PATH, /opt/python3.13t/bin/python3.13t. With --build, and none found, one is built into
# /opt/python3.13t (as root, about 10-15 min on 2 cores) from the upstream tarball of
# Debian trixie's python3.13 source package: the only route that needs no download from
# outside the package registries (PyPI has no free-threaded CPython, Debian 12 no 3.13).
# REPO defaults to this script's repository; it is installed into a throwaway venv.
set -euo pipefail

build=0
if [[ ${1:-} == --build ]]; then build=1; shift; fi
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
shift || true
prefix=/opt/python3.13t

find_ft() {
  local c
  for c in "${CANCELFLOW_FT_PYTHON:-}" "$(command -v python3.13t || true)" "$prefix/bin/python3.13t"; do
    if [[ -n $c && -x $c ]] &&
      "$c" -c 'import sys, sysconfig; sys.exit(not sysconfig.get_config_var("Py_GIL_DISABLED"))'; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

build_ft() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q build-essential pkg-config libssl-dev zlib1g-dev libffi-dev \
    libsqlite3-dev libbz2-dev liblzma-dev libreadline-dev uuid-dev libncurses-dev libgdbm-dev
  # Source only: never install trixie binaries on this bookworm machine (libc).
  printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: trixie' \
    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
    > /etc/apt/sources.list.d/trixie-src.sources
  apt-get update -q
  local src
  src=$(mktemp -d)
  (
    cd "$src"
    apt-get source -q --download-only python3.13
    tar xf python3.13_*.orig.tar.xz
    cd Python-3.13.*/
    ./configure --disable-gil --prefix="$prefix" # no PGO/LTO
    make -j"$(nproc)"
    make install
  )
  rm -rf "$src"
}

if ! py=$(find_ft); then
  if ((build)); then build_ft && py=$(find_ft); else
    echo "no free-threaded Python 3.13 found; rerun with --build (as root) to build one" >&2
    exit 1
  fi
fi
echo "interpreter: $py ($("$py" -VV))"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
vpy=$tmp/venv/bin/python
"$vpy" -m pip install -q --upgrade pip
# --prefer-binary: hypothesis >= 6.156 ships no cp313t wheel and its sdist needs crates.io
# (Rust), so take the newest release with a wheel (a pure-Python one, 6.155.x).
"$vpy" -m pip install -q --prefer-binary -e "$repo[test]"

cd "$repo"
gil_check='import sys, cancelflow, psutil, cloudpickle, loguru; print("sys._is_gil_enabled():", sys._is_gil_enabled()); sys.exit(sys._is_gil_enabled())'
if ! "$vpy" -c "$gil_check"; then
  echo "an extension module turned the GIL back on: running with PYTHON_GIL=0"
  export PYTHON_GIL=0
  "$vpy" -c "$gil_check"
fi
"$vpy" -m pytest -q -n 2 -p no:cacheprovider "$@" \
  tests/test_token.py tests/test_cell.py tests/test_timer.py tests/test_remote.py \
  tests/test_platform.py tests/test_thread_pool.py tests/test_thread_pool_contract.py \
  tests/test_to_thread.py tests/test_process_pool.py tests/test_process_pool_contract.py \
  tests/test_to_process.py tests/test_executor.py tests/test_protocol.py tests/test_node_fates.py \
  tests/test_process_pool_handover.py tests/test_process_pool_channel.py tests/test_pickling.py
