"""Host folders over virtio-9p (chapter III): the 9P2000.L server, its device, the
launcher's --share and --root, and real guests reading and writing through them (the lean
guest here, and Debian's where kernel mode is hardware: in the bed).

The server is tested as the guest would attack it: a client in this process that speaks
9P to `Server.handle()` directly, well-behaved first, then hostile (walks through `..`,
names with `/`, links that point out, huge counts, fids reused, bytes at random), beside
a canary file outside the share that must never be read or changed.
LGUEST_FUZZ_INPUTS=2000 makes a quick local run of the fuzzing.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lguest import LguestError
from lguest.guest.payload import cache_root
from lguest.drivers import ninep
from lguest.drivers.ninep import (HEADER, LAYOUTS, MAX_MSIZE, MESSAGES, NOFID,
                                  RLERROR, Server, Share, message, pack, unpack)
from lguest.launcher.cli import ROOT_TAG, parse_args

LGUEST = [sys.executable, "-m", "lguest"]
CHECKOUT = Path(__file__).resolve().parent.parent
INPUTS = int(os.environ.get("LGUEST_FUZZ_INPUTS", "100000"))
COUNTED = {"messages from a hostile client": 0, "messages of random bytes": 0}
NUMBERS = {name: kind for kind, (name, _, _) in MESSAGES.items()}
SECRET = b"CANARY-" + os.urandom(8).hex().encode()


class Client:
    """9P by hand: call(name, *fields) sends a T-message and returns (R-name, fields), or
    ("lerror", [errno])."""

    def __init__(self, server: Server, msize: int = 1 << 16):
        self.server, self.replies = server, []
        assert self.call("version", msize, b"9P2000.L")[0] == "version"
        assert self.call("attach", 0, NOFID, b"", b"", 0)[0] == "attach"

    def call(self, name: str, *values, tag: int = 1):
        kind = NUMBERS[name]
        reply = self.raw(message(kind, tag, pack(LAYOUTS[kind][0], values)))
        size, rkind, rtag = HEADER.unpack_from(reply)
        assert size == len(reply) and rtag == tag
        if rkind == RLERROR:
            return "lerror", unpack((("ecode", "i"),), reply)
        assert rkind == kind + 1
        return name, unpack(LAYOUTS[kind][1], reply)

    def raw(self, request: bytes) -> bytes:
        """The server's answer; a read is also answered the device's short way, into
        buffers of a few sizes, which must hold the same answer or none."""
        room = [memoryview(bytearray(n)) for n in (5, 4096, 3, 1 << 20)]
        short = self.server.read_into(request, room)
        reply = self.server.handle(request)
        if short is not None:
            assert b"".join(bytes(v) for v in room)[:short] == reply
        assert SECRET not in reply, "the canary was read"
        return reply

    def ok(self, name: str, *values):
        got, fields = self.call(name, *values)
        assert got == name, (name, values, errno.errorcode.get(fields[0], fields))
        return fields

    def fails(self, name: str, *values) -> int:
        got, fields = self.call(name, *values)
        assert got == "lerror", (name, values, fields)
        return fields[0]

    def walk(self, newfid: int, *names: bytes, fid: int = 0):
        return self.ok("walk", fid, newfid, list(names))[0]

    def read_all(self, fid: int) -> bytes:
        data, offset = b"", 0
        while chunk := self.ok("read", fid, offset, 1 << 20)[0]:
            data += chunk
            offset += len(chunk)
        return data

    def listing(self, fid: int) -> list[bytes]:
        names, offset = [], 0
        while data := self.ok("readdir", fid, offset, 4096)[0]:
            at = 0
            while at < len(data):
                offset, = struct.unpack_from("<Q", data, at + 13)
                n, = struct.unpack_from("<H", data, at + 22)
                names.append(data[at + 24:at + 24 + n])
                at += 24 + n
        return names


def make_world(top: Path) -> tuple[Path, Path]:
    """A share with a file, a folder, links in and out; and beside it, the canary."""
    share, canary = top / "share", top / "canary"
    share.mkdir()
    canary.write_bytes(SECRET + b"\n")
    (share / "file").write_bytes(b"hello, guest\n")
    (share / "dir").mkdir()
    (share / "dir" / "inner").write_bytes(b"inside\n")
    os.symlink("../canary", share / "up")
    os.symlink(str(canary), share / "absolute")
    os.symlink("dir", share / "dirlink")
    os.symlink("/", share / "slash")
    return share, canary


def fingerprint(top: Path, canary: Path) -> tuple:
    st_ = canary.stat()
    return (canary.read_bytes(), st_.st_mtime_ns, st_.st_ctime_ns, st_.st_mode,
            sorted(os.listdir(top)))


@pytest.fixture
def world(tmp_path):
    share, canary = make_world(tmp_path)
    before = fingerprint(tmp_path, canary)
    yield share
    assert fingerprint(tmp_path, canary) == before, "the canary was changed"


# --- the well-behaved client ----------------------------------------------------------

def test_a_file_is_walked_to_opened_read_and_clunked(world):
    c = Client(Server(str(world)))
    qids = c.walk(1, b"dir", b"inner")
    assert [q[0] for q in qids] == [0x80, 0]
    assert qids[1][2] == os.stat(world / "dir" / "inner").st_ino
    attrs = c.ok("getattr", 1, 0x7FF)
    assert attrs[0] == 0x7FF and attrs[2] == os.stat(world / "dir" / "inner").st_mode
    assert attrs[7] == 7                                         # its size
    c.ok("lopen", 1, os.O_RDONLY)
    assert c.read_all(1) == b"inside\n"
    c.ok("clunk", 1)
    assert c.fails("read", 1, 0, 10) == errno.EBADF


def test_writing_making_renaming_and_removing(world):
    c = Client(Server(str(world)))
    c.walk(1)                                                    # a clone of the root
    c.ok("lcreate", 1, b"new", os.O_WRONLY, 0o4755, 0)           # set-uid asked, not given
    assert c.ok("write", 1, 0, b"written by the guest") == [20]
    c.ok("fsync", 1, 0)
    assert (world / "new").read_bytes() == b"written by the guest"
    assert stat.S_IMODE(os.stat(world / "new").st_mode) == 0o755
    c.ok("mkdir", 0, b"made", 0o2777, 0)
    assert stat.S_IMODE(os.stat(world / "made").st_mode) == 0o777
    c.ok("renameat", 0, b"new", 0, b"renamed")
    c.walk(2, b"renamed")
    c.ok("rename", 2, 0, b"again")                               # the older way
    assert (world / "again").read_bytes() == b"written by the guest"
    c.walk(3, b"made")
    c.ok("symlink", 3, b"link", b"../again", 0)
    assert os.readlink(world / "made" / "link") == "../again"
    c.ok("link", 3, 2, b"hard")
    assert os.stat(world / "made" / "hard").st_ino == os.stat(world / "again").st_ino
    c.ok("mknod", 3, b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0)
    assert stat.S_ISFIFO(os.lstat(world / "made" / "fifo").st_mode)
    c.walk(4, b"again")
    c.ok("setattr", 4, 0x1 | 0x8, 0o6640, 0, 0, 5, 0, 0, 0, 0)   # chmod and truncate
    assert stat.S_IMODE(os.stat(world / "again").st_mode) == 0o640
    assert (world / "again").read_bytes() == b"writt"
    c.ok("setattr", 4, 0x20 | 0x100, 0, 0, 0, 0, 0, 0, 1234567, 89)
    assert os.stat(world / "again").st_mtime_ns == 1234567 * 10**9 + 89
    assert c.walk(5, b"made", b"..", b"again")[2][2] == os.stat(world / "again").st_ino
    c.ok("unlinkat", 3, b"hard", 0)
    c.ok("unlinkat", 3, b"link", 0)
    c.ok("unlinkat", 3, b"fifo", 0)
    c.ok("unlinkat", 0, b"made", 0x200)
    c.ok("remove", 4)
    assert not (world / "made").exists() and not (world / "again").exists()
    assert c.fails("getattr", 4, 0x7FF) == errno.EBADF           # remove clunked it


def test_a_directory_lists_and_a_renamed_folder_keeps_its_fids(world):
    c = Client(Server(str(world)))
    c.walk(1)
    c.ok("lopen", 1, os.O_RDONLY | os.O_DIRECTORY)
    assert sorted(c.listing(1)) == sorted([b".", b"..", *map(os.fsencode,
                                                             os.listdir(world))])
    for i in range(300):
        (world / "dir" / f"f{i:03}").write_bytes(b"x")
    c.walk(2, b"dir")
    c.ok("lopen", 2, os.O_RDONLY)
    assert len(c.listing(2)) == 303                              # ., .., inner and 300
    c.walk(3, b"dir", b"inner")
    c.ok("renameat", 0, b"dir", 0, b"moved")
    assert c.walk(4, b"..", fid=3)[0][2] == os.stat(world / "moved").st_ino
    assert c.ok("statfs", 0)[8] == 255


def test_ownership_set_id_bits_and_devices(world):
    c = Client(Server(str(world)))
    c.walk(1, b"file")
    uid = os.stat(world / "file").st_uid
    assert c.fails("setattr", 1, 0x2, 0, uid + 1, 0, 0, 0, 0, 0, 0) == errno.EPERM
    c.ok("setattr", 1, 0x2, 0, uid, 0, 0, 0, 0, 0, 0)            # to its own owner: no-op
    c.ok("setattr", 1, 0x1, 0o4777, 0, 0, 0, 0, 0, 0, 0)
    assert stat.S_IMODE(os.stat(world / "file").st_mode) == 0o777
    for kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFDIR, 0):
        assert c.fails("mknod", 0, b"dev", kind | 0o666, 1, 3, 0) == errno.EPERM
    assert not (world / "dev").exists()
    assert c.fails("xattrwalk", 1, 9, b"user.x") == errno.EOPNOTSUPP
    assert c.ok("lock", 1, 1, 0, 0, 0, 1, b"guest") == [0]
    assert c.ok("getlock", 1, 1, 0, 10, 1, b"guest")[0] == 2


def test_a_read_only_share_refuses_every_change(world):
    c = Client(Server(str(world), read_only=True))
    before = {p: (p.lstat().st_mtime_ns, p.lstat().st_mode) for p in world.rglob("*")}
    c.walk(1, b"file")
    c.walk(2, b"dir")
    refused = [("lopen", 1, os.O_WRONLY), ("lopen", 1, os.O_RDWR),
               ("lopen", 1, os.O_RDONLY | os.O_TRUNC),
               ("lcreate", 2, b"x", os.O_WRONLY, 0o644, 0), ("mkdir", 2, b"x", 0o755, 0),
               ("symlink", 2, b"x", b"file", 0), ("mknod", 2, b"x", stat.S_IFIFO, 0, 0, 0),
               ("link", 2, 1, b"x"), ("unlinkat", 0, b"file", 0),
               ("renameat", 0, b"file", 2, b"x"), ("rename", 1, 2, b"x"),
               ("setattr", 1, 0x8, 0, 0, 0, 0, 0, 0, 0, 0),
               ("setattr", 1, 0x1, 0o777, 0, 0, 0, 0, 0, 0, 0),
               ("xattrcreate", 1, b"user.x", 1, 0)]
    for request in refused:
        assert c.fails(*request) == errno.EROFS, request
    c.walk(3, b"file")
    assert c.fails("remove", 3) == errno.EROFS
    assert c.fails("getattr", 3, 0x7FF) == errno.EBADF           # clunked all the same
    c.ok("lopen", 1, os.O_RDONLY)
    assert c.read_all(1) == b"hello, guest\n"
    assert c.fails("write", 1, 0, b"no") == errno.EBADF
    assert {p: (p.lstat().st_mtime_ns, p.lstat().st_mode) for p in world.rglob("*")} == before


def test_no_way_out(world):
    c = Client(Server(str(world)))
    root_ino = os.stat(world).st_ino
    assert [q[2] for q in c.walk(1, b"..", b"..", b"..")] == [root_ino] * 3
    assert c.fails("walk", 0, 2, [b"canary"]) == errno.ENOENT
    for name in (b"../canary", b"/", b"/etc", b"dir/inner", b".", b"", b"a\0b"):
        assert c.fails("walk", 0, 2, [name]) == errno.EINVAL, name
    assert c.walk(2, b"dir", b"..", b"..", b"file")[-1][2] == os.stat(world / "file").st_ino
    for link in (b"up", b"absolute", b"slash", b"dirlink"):
        assert c.walk(3, link)[0][0] == 0x02                      # a link, not its target
        assert c.fails("lopen", 3, os.O_RDONLY) == errno.EACCES
        assert c.fails("walk", 3, 4, [b"canary"]) == errno.ENOTDIR
        assert c.fails("setattr", 3, 0x1, 0o777, 0, 0, 0, 0, 0, 0, 0) == errno.ELOOP
        assert c.fails("setattr", 3, 0x8, 0, 0, 0, 0, 0, 0, 0, 0) == errno.ELOOP
        assert c.fails("link", 0, 3, b"hard") == errno.EPERM
        c.ok("clunk", 3)
    c.walk(3, b"up")
    assert c.ok("readlink", 3) == [b"../canary"]                 # text for the guest
    c.walk(5)
    assert c.fails("lcreate", 5, b"up", os.O_WRONLY, 0o644, 0) == errno.EEXIST
    c.walk(6, b"dir")
    c.ok("renameat", 0, b"up", 6, b"up2")                        # a link moves, unfollowed
    c.walk(7, b"dir", b"up2")
    assert c.fails("lopen", 7, os.O_RDONLY) == errno.EACCES


def test_the_kernels_own_filesystems_are_sealed():
    c = Client(Server("/", read_only=True))
    c.walk(1, b"proc")                                           # the mount point: seen
    c.ok("getattr", 1, 0x7FF)
    assert c.fails("walk", 1, 2, [b"self"]) == errno.EACCES      # but never entered
    assert c.fails("lopen", 1, os.O_RDONLY) == errno.EACCES
    with pytest.raises(LguestError, match="kernel's own filesystems"):
        Server("/proc")
    with pytest.raises(LguestError, match="cannot share"):
        Server("/no/such/folder")


def test_limits_on_fids_messages_and_counts(world, monkeypatch):
    server = Server(str(world))
    c = Client(server, msize=1 << 30)
    assert server.msize == MAX_MSIZE
    monkeypatch.setattr(ninep, "MAX_FIDS", 64)                   # as if MAX_FIDS were 64
    for fid in range(1, 64):
        c.walk(fid)
    assert c.fails("walk", 0, 64, []) == errno.EMFILE
    assert c.fails("walk", 0, 5, []) == errno.EBADF              # in use
    for fid in range(1, 64):
        c.ok("clunk", fid)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
    try:                                                         # out of descriptors
        replies = [c.call("walk", 0, fid, [b"dir"]) for fid in range(1, 40)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert ("lerror", [errno.EMFILE]) in replies
    for fid in range(1, 40):
        c.call("clunk", fid)
    (world / "big").write_bytes(os.urandom(2 * MAX_MSIZE))
    c.walk(1, b"big")
    c.ok("lopen", 1, os.O_RDONLY)
    assert len(c.ok("read", 1, 0, 0xFFFFFFFF)[0]) == MAX_MSIZE - 11
    assert c.fails("read", 1, 1 << 63, 1) == errno.EINVAL
    assert c.fails("walk", 0, 2, [b"dir"] * 17) == errno.EINVAL
    # before Tversion nothing is answered but an error; a wrong size is malformed
    fresh = Server(str(world))
    assert fresh.handle(message(NUMBERS["attach"], 1, pack(LAYOUTS[104][0],
                                                            (0, NOFID, b"", b"", 0)))) \
        == message(RLERROR, 1, struct.pack("<I", errno.EPROTO))
    assert c.raw(message(NUMBERS["clunk"], 3, b"\0\0")) == \
        message(RLERROR, 3, struct.pack("<I", errno.EPROTO))
    assert c.raw(message(9, 3, b"")) == message(RLERROR, 3, struct.pack("<I", errno.EOPNOTSUPP))
    assert c.raw(b"\1\0") == message(RLERROR, 0xFFFF, struct.pack("<I", errno.EPROTO))
    assert c.call("version", 1 << 16, b"9P2000.u")[1][1] == b"unknown"


def test_the_device_reads_one_message_from_many_buffers(world):
    share = Share(str(world), "mytag")
    assert share.device_id == 9 and share.features == 1
    assert share.config() == b"\x05\x00mytag"
    version = message(100, 0xFFFF, pack(LAYOUTS[100][0], (8192, b"9P2000.L")))
    pieces = [memoryview(bytearray(version[i:i + 3])) for i in range(0, len(version), 3)]
    pieces.append(memoryview(bytearray(b"trailing bytes are not read")))
    assert share.request(pieces) == version
    short = share.request([memoryview(bytearray(version[:10]))])
    assert share.server.handle(short) == message(RLERROR, 0xFFFF, struct.pack("<I", errno.EPROTO))
    assert share.request([memoryview(bytearray(3))]) == b""
    share.close()


def test_a_read_goes_straight_into_the_guests_buffers(world):
    c = Client(Server(str(world)))
    c.walk(1, b"file")
    c.ok("lopen", 1, os.O_RDONLY)
    read = message(116, 7, pack(LAYOUTS[116][0], (1, 2, 100)))
    room = [memoryview(bytearray(n)) for n in (3, 8, 5, 100)]
    assert c.server.read_into(read, room) == 11 + 11
    assert b"".join(bytes(v) for v in room)[:22] == c.server.handle(read)
    assert unpack(LAYOUTS[116][1], c.server.handle(read)) == [b"llo, guest\n"]
    assert c.server.read_into(read, [memoryview(bytearray(10))]) is None     # no room
    c.walk(2, b"dir")
    for fid in (2, 9, 0):                      # not open, not a fid, a directory: the
        other = message(116, 7, pack(LAYOUTS[116][0], (fid, 0, 100)))     # long way
        assert c.server.read_into(other, room) is None
    with pytest.raises(LguestError, match="cannot be a share's tag"):
        Share(str(world), "a tag")


# --- the hostile client ---------------------------------------------------------------

HOSTILE_NAMES = [b"..", b".", b"", b"/", b"//", b"../canary", b"/etc/passwd", b"canary",
                 b"dir", b"file", b"up", b"absolute", b"slash", b"dirlink", b"inner",
                 b"new", b"a\0b", b"x" * 300, b"\xff\xfe", b"dir/inner", b"...", b"new2"]
FIDS = st.sampled_from([0, 1, 2, 3, 4, NOFID]) | st.integers(0, (1 << 32) - 1)
NAMES = st.sampled_from(HOSTILE_NAMES) | st.binary(max_size=12)
INTS = {"b": st.integers(0, 255), "h": st.integers(0, 0xFFFF),
        "q": st.sampled_from([0, 1, 4096, 1 << 62, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1)}
MODES = st.sampled_from([0o644, 0o4755, 0o2777, stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o600,
                         stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o755, stat.S_IFREG | 0o6777]) \
    | st.integers(0, (1 << 32) - 1)


def field_values(name: str, code: str):
    if "fid" in name:
        return FIDS
    if code == "i":
        if name in ("mode",):
            return MODES
        if name in ("flags", "valid"):
            return st.integers(0, (1 << 32) - 1) | st.sampled_from(
                [os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC, os.O_DIRECTORY, 0x200,
                 0x1 | 0x8 | 0x20, 0x2 | 0x4])
        return st.sampled_from([0, 1, 4096, 1 << 20, 0xFFFFFFFF]) | st.integers(0, (1 << 32) - 1)
    if code in INTS:
        return INTS[code]
    if code == "s":
        return NAMES
    if code == "S":
        return st.lists(NAMES, max_size=20)
    if code == "D":
        return st.binary(max_size=64)
    return st.tuples(st.integers(0, 255), st.integers(0, (1 << 32) - 1),
                     st.integers(0, (1 << 64) - 1))


REQUEST = st.sampled_from(sorted(k for k in MESSAGES if k != 100)).flatmap(
    lambda kind: st.tuples(st.just(kind), st.tuples(*(field_values(n, c)
                                                      for n, c in LAYOUTS[kind][0]))))


def well_formed(reply: bytes, tag: int, kind: int) -> None:
    size, rkind, rtag = HEADER.unpack_from(reply)
    assert size == len(reply) and rtag == tag and rkind in (RLERROR, kind + 1)
    unpack(LAYOUTS[kind][1] if rkind != RLERROR else (("e", "i"),), reply)


def hostile_session(top: Path, requests, read_only: bool) -> None:
    """Play `requests` (type, fields) against a fresh share beside the canary; then
    nothing outside the share may have changed, and nothing inside may be a device or
    carry a set-id bit."""
    share, canary = make_world(top)
    before = fingerprint(top, canary)
    server = Server(str(share), read_only=read_only)
    c = Client(server)
    c.walk(1, b"dir")
    c.walk(2, b"file")
    for tag, (kind, values) in enumerate(requests):
        reply = c.raw(message(kind, tag & 0xFFFF, pack(LAYOUTS[kind][0], values)))
        well_formed(reply, tag & 0xFFFF, kind)
        COUNTED["messages from a hostile client"] += 1
    server.close()
    assert fingerprint(top, canary) == before
    assert len(os.listdir(top)) == 2
    for p in share.rglob("*"):
        mode = p.lstat().st_mode
        assert not stat.S_ISCHR(mode) and not stat.S_ISBLK(mode), p
        assert not mode & (stat.S_ISUID | stat.S_ISGID), p


@given(st.lists(REQUEST, min_size=40, max_size=40), st.booleans())
@settings(max_examples=max(INPUTS // 1000, 5), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_a_hostile_client_stays_inside(tmp_path_factory, requests, read_only):
    """Hypothesis builds each session, and shrinks a failing one to its core."""
    hostile_session(tmp_path_factory.mktemp("hostile"), requests, read_only)


def random_request(rng: random.Random) -> tuple[int, tuple]:
    """One hostile request, drawn as REQUEST draws it but cheaply, for volume."""
    kind = rng.choice(sorted(k for k in MESSAGES if k != 100))
    values = []
    for name, code in LAYOUTS[kind][0]:
        plain = rng.random() < 0.7
        if "fid" in name:
            value = rng.choice([0, 1, 2, 3, 4, NOFID]) if plain else rng.getrandbits(32)
        elif code == "s":
            value = rng.choice(HOSTILE_NAMES) if plain else rng.randbytes(rng.randint(0, 12))
        elif code == "S":
            value = [rng.choice(HOSTILE_NAMES) for _ in range(rng.randint(0, 20))]
        elif code == "D":
            value = rng.randbytes(rng.randint(0, 64))
        elif code == "Q":
            value = (rng.getrandbits(8), rng.getrandbits(32), rng.getrandbits(64))
        elif name == "mode" and plain:
            value = rng.choice([0o644, 0o4755, stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o600,
                                stat.S_IFIFO | 0o644, stat.S_IFREG | 0o6777])
        elif name in ("flags", "valid") and plain:
            value = rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC,
                                os.O_DIRECTORY, 0x200, 0x1 | 0x8 | 0x20, 0x2 | 0x4])
        else:
            bits = {"b": 8, "h": 16, "i": 32, "q": 64}[code]
            value = rng.choice([0, 1, min(4096, (1 << bits) - 1), (1 << bits) - 1]) if plain \
                else rng.getrandbits(bits)
        values.append(value)
    return kind, tuple(values)


@given(st.integers(0, (1 << 64) - 1))
@settings(max_examples=max(INPUTS // 400, 5), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_a_hostile_client_stays_inside_at_volume(tmp_path_factory, seed):
    """Volume: each example is a session of 400 requests from a generator Hypothesis seeds."""
    rng = random.Random(seed)
    hostile_session(tmp_path_factory.mktemp("volume"), [random_request(rng) for _ in range(400)],
                    rng.random() < 0.3)


@given(st.integers(0, (1 << 64) - 1))
@settings(max_examples=max(INPUTS // 100, 5), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_random_bytes_are_answered_with_a_message(tmp_path_factory, seed):
    """Volume: each example sends a hundred messages of random bytes behind a header of
    a real type and a right or wrong size, and the server answers each."""
    top = tmp_path_factory.mktemp("bytes")
    share, canary = make_world(top)
    before = fingerprint(top, canary)
    server = Server(str(share))
    c = Client(server)
    rng = random.Random(seed)
    for tag in range(100):
        kind = rng.choice(sorted(MESSAGES) + [rng.randint(0, 255)])
        body = rng.randbytes(rng.choice([0, 1, 4, 13, rng.randint(0, 200)]))
        size = rng.choice([7 + len(body)] * 4 + [rng.randint(0, (1 << 32) - 1)])
        reply = c.raw(struct.pack("<IBH", size, kind, tag) + body)
        assert HEADER.unpack_from(reply)[0] == len(reply)
        COUNTED["messages of random bytes"] += 1
    server.close()
    assert fingerprint(top, canary) == before


def test_the_fuzzing_reached_its_inputs():
    print(f"\nfuzzing inputs: {COUNTED}")
    if not all(COUNTED.values()):
        pytest.skip(f"not every surface ran in this session: {COUNTED}")
    assert all(n >= INPUTS for n in COUNTED.values()), COUNTED


# --- the command line -----------------------------------------------------------------

def lguest_says(*args: str) -> str:
    result = subprocess.run(LGUEST + list(args), capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lguest: "), result.stderr
    return lines[0]


def test_share_and_root_options(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    options = parse_args([f"--share={tmp_path}/a", f"--share={tmp_path}/b,tag=bee,ro",
                          f"--root={tmp_path}"])
    assert [(s.tag, s.read_only) for s in options.shares] == [("a", False), ("bee", True)]
    assert options.root.tag == ROOT_TAG and options.root.read_only
    assert not parse_args([f"--root={tmp_path},rw"]).root.read_only
    assert parse_args(["--share=/"]).shares[0].tag == "root"


def test_root_tells_init_on_the_command_line(tmp_path):
    from lguest.launcher.main import command_line
    words = command_line(parse_args(["--root=/"]), "", []).split()
    assert f"lguest.root={ROOT_TAG}" in words and "lguest.root_rw=1" not in words
    assert "lguest.root_rw=1" in command_line(parse_args(["--root=/,rw"]), "", []).split()
    assert "lguest.root" not in command_line(parse_args([f"--share={tmp_path}"]), "", [])


def test_share_mistakes_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "a").mkdir()
    assert "no such folder" in lguest_says(f"--share={tmp_path}/missing")
    assert "not a folder" in lguest_says(f"--share={tmp_path}/file")
    assert "needs a folder" in lguest_says(f"--share={tmp_path}/a,rw")
    assert "needs a folder" in lguest_says(f"--root={tmp_path}/a,ro")
    assert "needs a folder" in lguest_says("--share=")
    assert "cannot tag a share" in lguest_says(f"--share={tmp_path}/a,tag=two words")
    assert "two shares tagged a" in lguest_says(f"--share={tmp_path}/a",
                                                f"--share={tmp_path}/a,ro")


# --- a real guest ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def lean():
    from lguest.guest import lean_guest
    return lean_guest()


@pytest.fixture(scope="module")
def debian():
    from lguest.guest import default_guest
    return default_guest()


def guest(kernel, *args: str, timeout: float = 600) -> tuple[int, str]:
    """lguest 256m with a built guest's own files, a guest's name ("debian"), or (None)
    no KERNEL at all."""
    chosen = [kernel] if isinstance(kernel, str) else [] if kernel is None else \
        [str(kernel.vmlinux), f"--initrd={kernel.initrd}"]
    result = subprocess.run(LGUEST + ["256m", *chosen, *args], capture_output=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    text = (result.stdout + result.stderr).decode(errors="replace").replace("\r\n", "\n")
    return result.returncode, text


def test_both_guests_mount_9p_and_say_so(lean, debian):
    """The lean kernel has 9P built in; Debian's generic kernel has it as modules, which
    the default guest carries with what they need, and loads in order."""
    assert lean.mounts_9p() and debian.mounts_9p()
    modules = debian.manifest["modules"]
    assert modules.index("9pnet") < modules.index("9pnet_virtio") < modules.index("9p")
    assert modules.index("netfs") < modules.index("9p") and "overlay" in modules


def test_without_a_kernel_a_share_boots_the_guest_this_machine_suits(tmp_path, monkeypatch,
                                                                     capsys):
    """Shares choose nothing: the lean guest where kernel mode is emulated (and one line
    saying so), Debian's where it is hardware. Nothing is built or booted here."""
    from lguest.launcher import main
    for name in ("lean", "default"):
        built = SimpleNamespace(kernel=f"{name}-kernel", initrd=f"{name}-initrd", cmdline="",
                                mounts_9p=lambda: True)
        monkeypatch.setattr(main, f"{name}_guest", lambda built=built: built)
    options = parse_args(["256m", f"--share={tmp_path}", "--root=/"])
    assert main.choose_guest(options, emulated=True)[0] == "lean-kernel"
    assert "lean guest" in capsys.readouterr().err
    assert main.choose_guest(options, emulated=False)[0] == "default-kernel"
    assert capsys.readouterr().err == ""


# The lean guest here and in the bed; Debian's where kernel mode is hardware (the bed).
EACH_GUEST = ["lean", pytest.param("debian", marks=pytest.mark.bed)]


@pytest.mark.kvm
@pytest.mark.parametrize("which", EACH_GUEST)
def test_a_guest_reads_and_writes_a_share_and_cannot_leave_it(which, tmp_path, request):
    kernel = request.getfixturevalue("lean") if which == "lean" else "debian"
    share, canary = make_world(tmp_path)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "kept").write_bytes(b"read me\n")
    before = fingerprint(tmp_path, canary)
    data = os.urandom(300_000)
    (share / "data").write_bytes(data)
    script = "; ".join([
        "mount -t 9p -o trans=virtio share /mnt",
        "mkdir /ro && mount -t 9p -o trans=virtio,msize=65536 keep /ro",
        "cat /mnt/file", "sha256sum /mnt/data", "cat /ro/kept",
        "echo from the guest > /mnt/made && echo MADE",
        "mkdir /mnt/sub && mv /mnt/made /mnt/sub/moved && echo MOVED",
        "echo no > /ro/new || echo REFUSED-NEW", "rm /ro/kept || echo REFUSED-RM",
        "mknod /mnt/null c 1 3 || echo REFUSED-MKNOD",
        "cat /mnt/up || echo LINK-OUT-FAILED",
        "ls /mnt/slash/init && echo SLASH-IS-THE-GUESTS"])
    status, text = guest(kernel, f"--share={share}", f"--share={tmp_path}/ro,tag=keep,ro",
                         "--run", script)
    assert status == 0, text[-3000:]
    assert "hello, guest" in text and "read me" in text, text[-3000:]
    assert f"{hashlib.sha256(data).hexdigest()}  /mnt/data" in text
    assert (share / "sub" / "moved").read_bytes() == b"from the guest\n"
    for word in ("MADE", "MOVED", "REFUSED-NEW", "REFUSED-RM", "REFUSED-MKNOD",
                 "LINK-OUT-FAILED", "SLASH-IS-THE-GUESTS"):
        assert word in text, (word, text[-3000:])
    assert sorted(os.listdir(tmp_path / "ro")) == ["kept"]
    assert not (share / "null").exists()
    assert SECRET.decode() not in text
    assert fingerprint(tmp_path, canary) == before


@pytest.mark.kvm
@pytest.mark.parametrize("which", EACH_GUEST)
def test_the_hosts_root_runs_the_hosts_python_in_the_guest(which, request):
    """The host's / as the guest's, read-only: the host's own Python runs, and what the
    guest writes (over a file of the host's, and beside it) stays in the guest. Debian's
    guest is booted as users get it, with no KERNEL named, where kernel mode is hardware.
    The folder is in lguest's cache, not under /tmp or /run (where the guest mounts tmpfs
    of its own, as a checkout cloned into /tmp would be)."""
    built = request.getfixturevalue(which)
    cache_root().mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="share-test-", dir=cache_root()))
    try:
        (where / "kept").write_text("the host's\n")
        status, text = guest(built if which == "lean" else None, "--root=/", "--run",
                             f"uname -r; python3 -c 'print(6*7)'; cd {where} && "
                             f"echo the guest\\'s > kept && touch new && cat kept && ls -1; "
                             "exit 3")
        assert status == 3, text[-3000:]
        assert built.manifest["kernel_release"] in text, text[-3000:]
        assert "\n42\n" in "\n" + text, text[-3000:]
        assert "the guest's\nkept\nnew\n" in text, text[-3000:]
        assert (where / "kept").read_text() == "the host's\n"
        assert sorted(os.listdir(where)) == ["kept"]
    finally:
        shutil.rmtree(where)
