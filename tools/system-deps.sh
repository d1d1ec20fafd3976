#!/usr/bin/env bash
# Install the Debian packages lguest needs, only those missing.
#   tools/system-deps.sh base   what building and running lguest needs
#   tools/system-deps.sh        that, plus what the tests need (a browser, tmux, cpio, ip,
#                               GDB, QEMU for the bed: the users' kind of KVM, tools/bed.py)
#   tools/system-deps.sh bench  the same: QEMU is also the benchmarks' peer
set -euo pipefail
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd cc || need+=(gcc)
[ -f /usr/include/linux/kvm.h ] || need+=(linux-libc-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need+=(python3-dev)
if [ "${1:-}" != base ]; then
    have_cmd chromium || need+=(chromium)
    have_cmd tmux || need+=(tmux)
    have_cmd cpio || need+=(cpio)       # GNU cpio checks our archive writer
    have_cmd ip || need+=(iproute2)     # the network tests' namespaces and bridges
    have_cmd setpriv || need+=(util-linux)   # tests that drop root's capabilities
    have_cmd ping || need+=(iputils-ping)    # the host pings a guest
    have_cmd mke2fs || need+=(e2fsprogs)     # root disks for the Linux tests
    have_cmd gdb || need+=(gdb)              # the door for GDB, tried with the real one
    have_cmd qemu-system-x86_64 || need+=(qemu-system-x86)   # the bed, and make bench's peer
fi
[ ${#need[@]} -eq 0 ] && exit 0
echo "system-deps: installing ${need[*]}"
if [ "$(id -u)" != 0 ]; then
    if have_cmd sudo; then SUDO=sudo; else
        echo "system-deps: need root to install ${need[*]}; run: apt-get install ${need[*]}" >&2
        exit 1
    fi
else SUDO=""; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
