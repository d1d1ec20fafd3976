"""Hardening, round two: the files we write are never inputs and never followed through
links; the files we read are locked, opened without blocking and named safely.

Every case goes through the front door (`python -m lguest`) with a tiny hand-made guest.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_hardening import LGUEST, lguest, one_line
from test_host_tinyguests import HALT, RESET, pvpanic, say, tiny_vmlinux
from lguest.drivers.sharenet import FILE_SIZE
from lguest.tiny import u32


WAIT = b"\xFB\xF4\xEB\xFD"                        # sti; hlt; jmp back: waiting, not dead


@pytest.fixture
def kernel(tmp_path) -> str:
    return tiny_vmlinux(tmp_path / "k", say(b"ready\n", HALT))


def last_line(result: subprocess.CompletedProcess, says: str, status: int = 1) -> None:
    """A guest that ran (so the slow host may have had its say first) ends with one line."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert says in result.stderr.strip().splitlines()[-1], result.stderr


# Item 1, 10, 12: --trace=FILE never destroys an input, never blocks, never follows a link.

@pytest.mark.parametrize("target, says", [
    ("KERNEL", "would overwrite"), ("DISK", "would overwrite"), ("INITRD", "would overwrite"),
    ("HARDLINK", "would overwrite"), ("LAN", "would overwrite"),
    ("SYMLINK", "is a symbolic link"), ("FIFO", "is a FIFO"),
    ("/dev/full", "is a device"), ("/", "is a directory")])
def test_a_trace_onto_an_input_or_a_non_file_is_one_line_and_changes_nothing(
        tmp_path, kernel, target, says):
    disk, initrd = tmp_path / "disk.img", tmp_path / "initrd"
    disk.write_bytes(b"precious" * 512)
    initrd.write_bytes(b"also precious")
    lan = tmp_path / "lan"
    files = {"KERNEL": kernel, "DISK": str(disk), "INITRD": str(initrd), "LAN": str(lan)}
    if target == "HARDLINK":
        os.link(disk, tmp_path / "other-name")
        files[target] = str(tmp_path / "other-name")
    elif target == "SYMLINK":
        (tmp_path / "link").symlink_to(disk)
        files[target] = str(tmp_path / "link")
    elif target == "FIFO":
        os.mkfifo(tmp_path / "fifo")
        files[target] = str(tmp_path / "fifo")
    before = {p: open(p, "rb").read() for p in (kernel, disk, initrd)}
    args = ["32m", kernel, f"--block={disk}", f"--initrd={initrd}",
            f"--trace={files.get(target, target)}"]
    if target == "LAN":
        args += [f"--sharenet={lan}"]             # made by the launcher, before the trace
    one_line(lguest(*args, timeout=60), says)
    assert {p: open(p, "rb").read() for p in before} == before
    if target == "LAN":
        assert lan.stat().st_size == FILE_SIZE


def test_a_trace_is_written_only_once_the_disks_are_found_good(tmp_path, kernel):
    old = tmp_path / "old.trace"
    old.write_bytes(b"yesterday's trace")
    one_line(lguest("32m", kernel, "--block=/no/such/disk", f"--trace={old}"), "no such disk")
    assert old.read_bytes() == b"yesterday's trace"


# Many exits (an unclaimed port, again and again), then the keyboard controller's reset.
KNOCKS = 30_000
CHATTY = b"".join([b"\xB9" + u32(KNOCKS),         # mov ecx, KNOCKS
                   b"\xE6\x80",                   # again: out 0x80, al
                   b"\xFF\xC9",                   #        dec ecx
                   b"\x75\xFA"]) + RESET          #        jnz again   (-6)


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a small tmpfs; run as root")
def test_a_disk_that_fills_under_the_trace_is_one_line_at_the_end(tmp_path):
    kernel = tiny_vmlinux(tmp_path / "chatty", CHATTY)
    small = tmp_path / "small"
    small.mkdir()
    script = (f"mount -t tmpfs -o size=64k lguest-full {small} && "
              f"exec {sys.executable} -m lguest 32m {kernel} --trace={small}/t")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    last_line(result, "stops short: No space left on device")


# Item 16: --plot's picture is a file we write, too.

@pytest.fixture
def trace(tmp_path, kernel) -> str:
    path = tmp_path / "boot.trace"
    assert lguest("32m", kernel, f"--trace={path}").returncode == 0
    return str(path)


@pytest.mark.parametrize("out, says", [
    ("/proc/nope.svg", "cannot write the picture /proc/nope.svg"),
    ("FOLDER", "is a directory"),
    ("LINK", "is a symbolic link"), ("TRACE", "would overwrite")])
def test_a_picture_that_cannot_be_drawn_there_is_one_line(tmp_path, trace, out, says):
    if out == "FOLDER":
        out = str(tmp_path / "pictures.svg")
        os.mkdir(out)
    elif out == "LINK":
        out = str(tmp_path / "full.svg")
        os.symlink("/dev/full", out)
    elif out == "TRACE":
        out = str(tmp_path / "boot.svg")
        os.link(trace, out)
    before = open(trace, "rb").read()
    one_line(lguest("trace", trace, "--plot", out), says)
    assert open(trace, "rb").read() == before


# Item 2: the folder of `lguest ps` notes is used only if it is ours alone.

STRANGER, US = 4321, 54321                         # someone else, and a user to run as


@pytest.fixture
def tmp_notes():
    """/tmp/lguest-US, as someone else made it first: open to all, with a note in it."""
    folder = f"/tmp/lguest-{US}"
    subprocess.run(["rm", "-rf", folder], check=True)
    os.mkdir(folder)
    os.chmod(folder, 0o777)
    os.chown(folder, STRANGER, STRANGER)
    note = os.path.join(folder, "999999.json")
    with open(note, "w") as f:
        f.write('{"pid": 999999, "memory": 1, "cpus": 1, "kernel": "k", "started": 0}')
    os.chown(note, STRANGER, STRANGER)
    yield folder, note
    subprocess.run(["rm", "-rf", folder], check=True)


@pytest.mark.skipif(os.getuid() != 0, reason="plays two users; run as root")
def test_ps_refuses_a_notes_folder_someone_else_made_first(tmp_notes):
    folder, note = tmp_notes
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    result = subprocess.run(["setpriv", f"--reuid={US}", f"--regid={US}", "--clear-groups",
                             *LGUEST, "ps"], capture_output=True, text=True, timeout=60,
                            env=env, stdin=subprocess.DEVNULL)
    one_line(result, f"{folder}, where lguest notes its running guests, is not a folder "
                     "of yours alone")
    assert os.path.exists(note)                    # a stranger's file, left alone


@pytest.mark.parametrize("how", ["open to others", "someone else's", "a symbolic link"])
def test_a_notes_folder_not_ours_alone_is_said_before_any_guest(tmp_path, kernel, how):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir(mode=0o700)
    if how == "a symbolic link":
        (run / "lguest").symlink_to(elsewhere)
    else:
        (run / "lguest").mkdir(mode=0o700)
        os.chmod(run / "lguest", 0o755) if how == "open to others" else \
            os.chown(run / "lguest", STRANGER, STRANGER)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run)}
    one_line(lguest("32m", kernel, env=env), "is not a folder of yours alone")
    one_line(lguest("ps", env=env), "is not a folder of yours alone")
    assert os.listdir(elsewhere) == []


def test_a_note_is_never_written_through_a_link_planted_at_its_name(tmp_path, kernel):
    run, victim = tmp_path / "run", tmp_path / "victim"
    (run / "lguest").mkdir(parents=True, mode=0o700)
    victim.write_text("precious")
    plant = f'ln -s {victim} {run}/lguest/$$.json && exec "$@"'
    result = subprocess.run(["sh", "-c", plant, "sh", *LGUEST, "32m", kernel],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(run)},
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious"
    assert os.listdir(run / "lguest") == []        # and the note went with the guest


# Item 24: names are printed safely, whole and absolute.

def test_a_name_with_a_newline_or_an_escape_stays_on_one_line(tmp_path, kernel):
    one_line(lguest("32m", kernel, "--block=/no/such\ndisk"), "no such disk: /no/such\\ndisk")
    odd = tmp_path / "k\x1b[2J\nernel"
    odd.write_bytes(b"\x7fELF" + bytes(60))
    result = lguest("32m", str(odd))
    one_line(result, "k\\x1b[2J\\nernel")
    assert "\x1b" not in result.stderr


def test_ps_shows_odd_names_escaped_and_paths_whole(tmp_path, monkeypatch):
    import pexpect
    from test_host_tinyguests import spawn
    monkeypatch.chdir(tmp_path)                    # the names given are relative
    tiny_vmlinux(tmp_path / "k\x1b[31m", say(b"ready\n", HALT))
    (tmp_path / "d\nisk").write_bytes(bytes(4096))
    child = spawn("k\x1b[31m", "--block=d\nisk,ro")
    listing = subprocess.run(LGUEST + ["ps"], capture_output=True, text=True, timeout=60)
    child.kill(15)
    child.expect(pexpect.EOF)
    child.close()
    assert "\x1b" not in listing.stdout
    lines = listing.stdout.splitlines()
    row = [i for i, line in enumerate(lines) if line.split()[0] == str(child.pid)][0]
    assert lines[row].endswith(f"{tmp_path}/k\\x1b[31m"), listing.stdout
    assert f"virtio-blk {tmp_path}/d\\nisk (read-only)" in lines[row + 1], listing.stdout


# Items 3, 13: --sharenet=FILE follows no link, and takes no file of the kernel's.

@pytest.mark.parametrize("what, says", [
    ("DANGLING", "is a symbolic link"), ("TO EMPTY", "is a symbolic link"),
    ("/proc/self/mem", "cannot be a network: Input/output error"),
    ("/proc/version", "is one of the kernel's files"),
    ("/proc/sys/kernel/hostname", "is one of the kernel's files")])
@pytest.mark.skipif(os.getuid() != 0, reason="makes a UTS namespace; run as root")
def test_a_sharenet_link_or_kernel_file_is_one_line_and_left_alone(tmp_path, kernel, what,
                                                                   says):
    target, link = tmp_path / "target", tmp_path / "lan"
    if what == "TO EMPTY":
        target.touch()
    if what in ("DANGLING", "TO EMPTY"):
        link.symlink_to(target)
        what = str(link)
    # In a UTS namespace of its own: a launcher that wrote its header into
    # /proc/sys/kernel/hostname (as root, one did) renames only the namespace.
    script = 'hostname before; "$@"; status=$?; hostname; exit $status'
    result = subprocess.run(["unshare", "-u", "sh", "-c", script, "sh", *LGUEST, "32m", kernel,
                             f"--sharenet={what}"], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    one_line(result, says)
    assert result.stdout == "before\n"
    assert not target.exists() or target.stat().st_size == 0


# Items 5, 9: disks are locked as QEMU locks them, and a FIFO is no disk.

@pytest.mark.parametrize("first, second", [("", ""), ("", ",ro"), (",ro", "")])
def test_a_disk_two_may_write_is_one_line(tmp_path, kernel, first, second):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    one_line(lguest("32m", kernel, f"--block={disk}{first}", f"--block={disk}{second}"),
             f"the disk {disk} is in use by another guest")


def test_a_disk_every_guest_reads_only_is_shared(tmp_path, kernel):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    result = lguest("32m", kernel, f"--block={disk},ro", f"--block={disk},ro")
    assert result.returncode == 0 and "ready" in result.stdout, result.stderr


def test_a_disk_another_launcher_writes_is_one_line(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    import pexpect
    from test_host_tinyguests import spawn
    waiting = tiny_vmlinux(tmp_path / "waits", say(b"ready\n", WAIT))
    first = spawn(waiting, f"--block={disk}")
    try:
        one_line(lguest("32m", waiting, f"--block={disk},ro"), "in use by another guest")
    finally:
        first.kill(15)
        first.expect(pexpect.EOF)
        first.close()


@pytest.mark.parametrize("option", ["", ",ro"])
def test_a_fifo_named_as_a_disk_is_one_line(tmp_path, kernel, option):
    os.mkfifo(tmp_path / "fifo")
    one_line(lguest("32m", kernel, f"--block={tmp_path}/fifo{option}", timeout=60),
             "is neither a file nor a block device")


# Item 8: a network file cut short under a running guest is no SIGBUS.


def test_a_network_file_cut_short_is_no_sigbus(tmp_path, monkeypatch):
    import pexpect
    from test_host_tinyguests import cooked, spawn
    run, lan = tmp_path / "run", tmp_path / "lan"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    child = spawn(tiny_vmlinux(tmp_path / "waits", say(b"ready\n", WAIT)), f"--sharenet={lan}")
    os.truncate(lan, 0)
    child.expect(pexpect.TIMEOUT, timeout=3)       # the listener looks once a second
    assert child.isalive(), "the launcher died of the cut"
    child.kill(15)
    child.expect(pexpect.EOF)
    assert cooked(child)
    child.close()
    assert child.exitstatus == 128 + 15, (child.exitstatus, child.signalstatus)
    assert os.listdir(run / "lguest") == []        # its note went with it


# Past the list: a FIFO named as kernel or initrd, and the guest's words in our last line.

@pytest.mark.parametrize("what", ["kernel", "initrd"])
def test_a_fifo_named_as_kernel_or_initrd_is_one_line(tmp_path, kernel, what):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = ["32m", str(fifo)] if what == "kernel" else ["32m", kernel, f"--initrd={fifo}"]
    one_line(lguest(*args, timeout=60), "is not a regular file")


def test_a_panic_that_says_escapes_is_printed_escaped(tmp_path):
    panic = (b"Kernel panic - not syncing: \x1b[2Jgone\r\n"
             b"---[ end Kernel panic - not syncing: gone ]---\r\n")
    result = lguest("32m", tiny_vmlinux(tmp_path / "panic", say(panic, pvpanic() + HALT)))
    assert result.returncode == 100
    assert result.stderr.strip().splitlines()[-1] == \
        "lguest: the guest kernel panicked: \\x1b[2Jgone"
