#!/usr/bin/env bash
# Installs what cvt-gpu needs at run time on a fresh Debian/Ubuntu machine
# without a GPU: Mesa's Vulkan driver (lavapipe) and Mesa's GL/EGL for the GL
# backend. Machines with a GPU driver already installed need nothing.
# `--datasets` also installs the data sets the tests read; `--mpi` Open MPI and
# libclang, which a build with `--features mpi` needs (docs/distributed.md).
set -euo pipefail
need=()
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
ldconfig -p | grep -q 'libEGL.so.1' || need+=(libegl1)
ls /usr/lib/*/libEGL_mesa.so.0 >/dev/null 2>&1 || need+=(libegl-mesa0)
ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1 || need+=(libgl1-mesa-dri)
# The tests also read the real Fashion-MNIST (Debian's dataset-fashion-mnist).
for opt in "$@"; do
  case "$opt" in
    --datasets) [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist) ;;
    --mpi)
      command -v mpirun >/dev/null || need+=(openmpi-bin)
      [ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || ls /usr/lib/*/openmpi/include/mpi.h >/dev/null 2>&1 || need+=(libopenmpi-dev)
      ls /usr/lib/*/libclang*.so* /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
      ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install a Vulkan driver (Mesa's lavapipe) for: ${need[*]}" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
