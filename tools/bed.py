"""The bed: our users' kind of KVM, on a machine that has only the other kind.

This machine's /dev/kvm runs a guest's kernel mode in KVM's instruction emulator (PVM).
Our users have AMD-V or VT-x, where it runs in hardware. The bed is a virtual machine
under QEMU's TCG with `-cpu max`, whose CPU model includes AMD-V (SVM): Debian's generic
kernel inside it loads `kvm_amd`, and the bed's /dev/kvm runs guest kernel mode in
(QEMU-emulated) hardware. TCG has no VMX, so Intel's VT-x path cannot be had this way.

The bed sees this machine's files: its root is the host's `/` over 9p, read-only, with
tmpfs where a system writes (/tmp, /run, /var/tmp), and the checkout and lguest's cache
read-write at their own paths. So lguest runs inside exactly as it runs here: the same
.venv, the same built guests, the same commands.

    .venv/bin/python tools/bed.py build          fetch and assemble the bed (once; cached)
    .venv/bin/python tools/bed.py shell          a root shell in the bed, in the checkout
    .venv/bin/python tools/bed.py run CMD...     run CMD there; its output, then its status

Test machinery, not part of the lguest package: it borrows the Guest chapter's Debian
fetcher, module orderer and cpio writer rather than writing them again.
"""
from __future__ import annotations

import base64
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build"))

from lguest import LguestError                                         # noqa: E402
from lguest.guest.cpio import CpioWriter                               # noqa: E402
from lguest.guest.payload import cache_root                            # noqa: E402
from lguest.guest.provision.debian import apt_package, fetch, unpack_deb   # noqa: E402
from lguest.guest.provision.modules import (builtin_modules, module_index,  # noqa: E402
                                            module_order, read_module)
from lguest.guest.provision.store import locked, progress, recipe_hash  # noqa: E402

GENERIC_KERNEL = "linux-image-amd64"
BUSYBOX = "busybox-static"
# KVM for AMD-V; 9p over virtio for the host's files; tun and bridge for lguest's
# networks inside; what the PCI transport needs.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "kvm_amd", "tun", "bridge")
MEMORY = "6G"
FORMAT = "1"

INIT = r"""#!/bin/sh
# The bed's first process: drivers, the host's files, then the job or a shell.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "bed: could not load $module"
done < /etc/modules
read -r cmdline < /proc/cmdline
arg() {
    for word in $cmdline; do
        case "$word" in "$1="*) value=${word#*=}; return 0 ;; esac
    done
    return 1
}
opts=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o "$opts,ro,cache=loose" host /host || { echo "bed: no host share"; poweroff -f; }
for dir in tmp run var/tmp; do
    mount -t tmpfs tmpfs "/host/$dir"
done
chmod 1777 /host/tmp /host/var/tmp
# After the tmpfs, so that a checkout or cache under /tmp is not hidden by it.
for tag in work cache; do
    arg "bed.$tag" && mkdir -p "/host$value" && \
        mount -t 9p -o "$opts,cache=mmap" "$tag" "/host$value"
done
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
echo bed > /proc/sys/kernel/hostname
# KVM turns SVM off on every CPU when its last VM is destroyed, and on again for the
# next, by IPIs that TCG's nested SVM now and then never answers (a soft lockup in
# kvm_destroy_vm's smp_call_function). One idle VM, held all the bed's life, keeps
# SVM on, so no test's VM is ever the last.
chroot /host /usr/bin/python3 -c 'import fcntl, os, signal
vm = fcntl.ioctl(os.open("/dev/kvm", os.O_RDWR), 0xAE01, 0)   # KVM_CREATE_VM
signal.pause()' &
ip link set lo up
arg bed.work && work=$value
arg bed.cache && export LGUEST_CACHE=$value
# The host's home is read-only here: programs that keep state there (Jupyter,
# IPython, matplotlib) get a fresh one in /tmp; lguest's cache is named above.
mkdir -p /host/tmp/home
export HOME=/tmp/home TERM=${TERM:-linux} LGUEST_BED=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if arg bed.job; then
    job=$value
    arg bed.nonce && nonce=$value
    chroot /host /bin/sh -c "cd '$work' && exec /bin/sh '$job'" < /dev/null
    status=$?
    sync
    echo "bed-$nonce: status $status"
else
    echo "bed: a root shell in the users' kind of KVM; 'exit' ends the bed."
    chroot /host /bin/sh -c "cd '$work'; exec setsid -c /bin/bash -l" < /dev/ttyS0 > /dev/ttyS0 2>&1
fi
sync
poweroff -f
"""


def bed_files() -> tuple[Path, Path]:
    """The bed's kernel and initramfs, built once from Debian's packages and cached."""
    meta = apt_package(GENERIC_KERNEL)
    images = [d for d in meta.depends if d.startswith("linux-image-")]
    if not images:
        raise LguestError(f"{GENERIC_KERNEL} names no kernel package")
    kernel_pkg, busybox_pkg = apt_package(images[0]), apt_package(BUSYBOX)
    out = cache_root() / "bed" / recipe_hash(FORMAT, INIT, *MODULES, kernel_pkg.version,
                                             busybox_pkg.version)
    kernel, initrd = out / "vmlinuz", out / "bed.cpio"
    with locked(out):
        if kernel.exists() and initrd.exists():
            return kernel, initrd
        progress(f"building the bed from {kernel_pkg.name} {kernel_pkg.version}")
        kroot, broot = unpack_deb(fetch(kernel_pkg)), unpack_deb(fetch(busybox_pkg))
        release = kernel_pkg.name.removeprefix("linux-image-")
        moddir = kroot / "lib" / "modules" / release
        index = module_index(moddir)
        order = module_order(MODULES, index, builtin_modules(moddir))
        w = CpioWriter()
        for name in ("dev", "proc", "sys", "host", "etc"):
            w.directory(name)
        w.char_device("dev/console", 5, 1)
        w.file("init", INIT.encode(), 0o755)
        w.file("bin/busybox", (broot / "bin" / "busybox").read_bytes(), 0o755)
        for applet in ("sh", "mount", "insmod", "chroot", "poweroff", "ip", "chmod",
                       "mkdir", "sync", "echo"):
            w.symlink(f"bin/{applet}", "busybox")
        for name in order:
            w.file(f"lib/modules/{name}.ko", read_module(index[name]))
        w.file("etc/modules", "".join(f"{name}\n" for name in order).encode())
        out.mkdir(parents=True, exist_ok=True)
        initrd.with_suffix(".tmp").write_bytes(w.getvalue())
        os.replace(initrd.with_suffix(".tmp"), initrd)
        shutil.copyfile(kroot / "boot" / f"vmlinuz-{release}", kernel.with_suffix(".tmp"))
        os.replace(kernel.with_suffix(".tmp"), kernel)
        return kernel, initrd


def qemu_command(cmdline: str) -> list[str]:
    """QEMU-TCG with an AMD-V CPU, sharing the host's root, the checkout and the cache."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise LguestError("the bed needs QEMU: run tools/system-deps.sh (Debian's "
                          "qemu-system-x86)")
    kernel, initrd = bed_files()
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    shares = [("host", "/", "on"), ("work", str(ROOT), "off"), ("cache", str(cache), "off")]
    command = [qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
               "-m", MEMORY, "-M", "q35", "-nodefaults", "-no-user-config", "-nographic",
               "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", f"console=ttyS0 loglevel=3 panic=-1 softlockup_panic=1 "
                          f"bed.work={ROOT} bed.cache={cache} {cmdline}"]
    for tag, path, readonly in shares:
        command += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=passthrough,"
                               f"multidevs=remap,readonly={readonly}"]
    return command


def run(command: str, timeout: float | None = None, echo: bool = True) -> tuple[str, int]:
    """Run a shell command in the bed, in the checkout: (its output, its status).

    The output is the bed's console: the command's stdout and stderr, and anything
    the bed's kernel says; it is also written, as it comes, to build/bed/console.log,
    for anyone who wants to watch a long run. A status of None means the bed ended
    without reporting one."""
    jobs = ROOT / "build" / "bed"
    jobs.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(8)
    job = jobs / f"job-{nonce}.sh"
    job.write_text(f"export PATH={shlex.quote(os.environ.get('PATH', '/usr/bin:/bin'))}\n"
                   f"{command}\n")
    qemu = subprocess.Popen(qemu_command(f"bed.job={job} bed.nonce={nonce}") +
                            ["-serial", "stdio", "-monitor", "none"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    marker = f"bed-{nonce}: status ".encode()
    lines, status = [], None
    watchdog = threading.Timer(timeout, qemu.kill) if timeout else None
    if watchdog:
        watchdog.start()
    try:
        with open(jobs / "console.log", "w") as log:
            for raw in qemu.stdout:
                if (at := raw.find(marker)) >= 0:     # a job that printed nothing leaves it
                    status = int(raw[at + len(marker):].strip() or -1)   # after the firmware's
                    raw = raw[:at]                                        # last words
                    if not raw.strip():
                        continue
                line = raw.decode("utf-8", "replace").replace("\r\n", "\n")
                lines.append(line)
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
    finally:
        if watchdog:
            watchdog.cancel()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        job.unlink(missing_ok=True)
    if status is None and timeout and qemu.returncode == -9:
        lines.append(f"bed: stopped after {timeout:.0f} s\n")
    return "".join(lines), status


def shell() -> int:
    """A root shell in the bed, on this terminal (QEMU's monitor on Ctrl-A c)."""
    return subprocess.call(qemu_command("") + ["-serial", "mon:stdio"])


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["build"]:
            kernel, initrd = bed_files()
            print(f"the bed: {kernel} and {initrd}")
            return 0
        if argv[:1] == ["shell"]:
            return shell()
        if argv[:1] == ["run"] and len(argv) > 1:
            started = time.monotonic()
            _, status = run(" ".join(argv[1:]))
            print(f"bed: status {status} after {time.monotonic() - started:.0f} s",
                  file=sys.stderr)
            return 1 if status is None else status
    except LguestError as e:
        print(f"bed: {e}", file=sys.stderr)
        return 1
    print(__doc__.split("\n\n")[3], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
