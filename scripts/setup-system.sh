#!/usr/bin/env bash
# Installs the Debian packages of the real NBD peers the test suite drives,
# only when one is missing. A tool missing in CI is a failure, not a skip, so
# the suite needs every one of them.
set -euo pipefail
need=()
command -v nbdkit   >/dev/null || need+=(nbdkit)
command -v nbdinfo  >/dev/null || need+=(libnbd-bin)
command -v nbdcopy  >/dev/null || need+=(libnbd-bin)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need+=(python3-libnbd)
command -v qemu-io  >/dev/null || need+=(qemu-utils)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v fio      >/dev/null || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "installing Debian packages: ${need[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
