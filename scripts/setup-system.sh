#!/usr/bin/env bash
# Installs the Debian packages of the real NBD peers the test suite drives,
# only when one is missing. A tool missing in CI is a failure, not a skip, so
# the suite needs every one of them. qemu-system-x86 (the image-boot test
# boots an image export in qemu) is installed without its recommends, which
# would pull in a desktop's worth of display and audio libraries.
set -euo pipefail
need=()
need_norec=()
command -v nbdkit   >/dev/null || need+=(nbdkit)
command -v nbdinfo  >/dev/null || need+=(libnbd-bin)
command -v nbdcopy  >/dev/null || need+=(libnbd-bin)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need+=(python3-libnbd)
command -v qemu-io  >/dev/null || need+=(qemu-utils)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v fio      >/dev/null || need+=(fio)
command -v curl     >/dev/null || need+=(curl)  # the console tests speak HTTP through it
command -v psktool  >/dev/null || need+=(gnutls-bin)  # the TLS-PSK test's key file, as its users make one
# The dashboard test drives a real headless browser through its WebDriver.
command -v chromium >/dev/null || need_norec+=(chromium)
command -v chromedriver >/dev/null || need_norec+=(chromium-driver)
command -v qemu-system-x86_64 >/dev/null || need_norec+=(qemu-system-x86)
if [ ${#need[@]} -gt 0 ] || [ ${#need_norec[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
if [ ${#need_norec[@]} -gt 0 ]; then
    echo "installing Debian packages (no recommends): ${need_norec[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_norec[@]}"
fi
