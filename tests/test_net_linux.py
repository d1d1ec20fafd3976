"""Networks through real Linux guests: the lean guest, end to end.

Every test makes its own network namespace (`ip netns add`) and uses addresses only
inside it (DEVELOPERS.md, non-negotiable 6): the taps, the bridge, the host's sockets and
the guests' traffic never see another network. The sharenet guests run with every
capability dropped, to show that a shared file needs no root.

The guests' scripts avoid pipelines (tests/test_linux.py's TLS_SEGFAULT) and loops over
`seq`: shell arithmetic only, so that each ping is the one new process.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from test_virtio_linux import lean, read_until   # noqa: F401 (lean: a fixture)

pytestmark = pytest.mark.kvm
LGUEST = [sys.executable, "-m", "lguest"]
NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
BOOT = 600                 # seconds: a lean boot is ~80 s alone, slower two or three at once


@pytest.fixture
def netns():
    name = f"lguest-test-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def inside(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def guest(ns: str, lean, script: str, *args: str, prefix=()) -> subprocess.Popen:
    return subprocess.Popen(inside(ns, [*prefix, *LGUEST, "128m", str(lean.vmlinux),
                                        f"--initrd={lean.initrd}", *args, "--run", script]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def until_answered(address: str, then: str) -> str:
    """Shell: ping `address` (for up to ~4 minutes: the other guest may still be booting),
    then echo `then`."""
    return (f"i=0; while [ $i -lt 120 ] && ! ping -c 1 -W 2 {address} >/dev/null; "
            f"do i=$((i+1)); done; [ $i -lt 120 ] && echo {then}")


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


TCP_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 7001))               # inside the namespace only
server.listen()
server.settimeout(500)
print("LISTENING", flush=True)
conn, _ = server.accept()
conn.settimeout(60)
conn.sendall(sys.argv[1].encode() + b"\\n")
got = b""
while (chunk := conn.recv(4096)):
    got += chunk
print("HOST GOT", got.decode().strip(), flush=True)
"""


def test_tunnet_the_guest_pings_the_host_and_tcp_carries_data_both_ways(lean, netns, tmp_path):
    to_guest, to_host = f"from-host-{secrets.token_hex(4)}", f"from-guest-{secrets.token_hex(4)}"
    script = "; ".join([
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu",
        "ip -4 addr show dev eth0",
        until_answered("192.168.19.1", "PING-OK"),
        f"echo {to_host} > /tmp/message",
        # The host pings us first, then listens: until it does, nc is refused.
        "i=0; while [ $i -lt 60 ] && ! nc 192.168.19.1 7001 < /tmp/message; "
        "do i=$((i+1)); sleep 1; done",
        "echo TCP-DONE"])
    proc = guest(netns, lean, script, "--tunnet=192.168.19.1,tap=lgtest0,mac=02:4c:47:00:00:09")
    server = None
    try:
        out = read_until(proc, b"PING-OK", BOOT)
        pinged = subprocess.run(inside(netns, ["ping", "-c", "2", "-W", "10", "192.168.19.2"]),
                                capture_output=True, text=True)
        # Look at the host's side while the guest still waits for the server: once it
        # has sent, it ends, and its tap goes with it (at once, where kernel mode is
        # hardware).
        listed = subprocess.run(LGUEST + ["ps"], capture_output=True, text=True).stdout
        host_side = subprocess.run(inside(netns, ["ip", "-j", "addr", "show", "lgtest0"]),
                                   capture_output=True, text=True)
        server = subprocess.Popen(inside(netns, [sys.executable, "-c", TCP_SERVER, to_guest]),
                                  stdout=subprocess.PIPE, text=True)
        out += read_until(proc, b"TCP-DONE", 180)
        status = proc.wait(60)
        heard = server.communicate(timeout=60)[0]
    finally:
        stop(proc, *[server] if server else [])
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert "PING-OK" in text and "TCP-DONE" in text, text[-3000:]
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr       # the guest answers
    assert status == 0, text[-2000:]
    assert "02:4c:47:00:00:09\n1500\n" in text                      # our MAC and MTU
    assert "inet 192.168.19.2/24" in text                           # the next address up
    assert to_guest in text                                          # host -> guest
    assert f"HOST GOT {to_host}" in heard                           # guest -> host
    assert host_side.returncode == 0, host_side.stderr
    addresses = json.loads(host_side.stdout)[0]["addr_info"]
    assert {"192.168.19.1"} <= {a["local"] for a in addresses}
    assert "virtio-net 02:4c:47:00:00:09 on tap lgtest0 (host 192.168.19.1/24)" in listed, listed
    assert "guest 192.168.19.2/24" in listed, listed
    gone = subprocess.run(inside(netns, ["ip", "link", "show", "lgtest0"]),
                          capture_output=True, text=True)
    assert gone.returncode != 0, "the tap outlived its guest: " + gone.stdout


def test_a_bridge_joins_two_guests_taps_and_they_ping_each_other(lean, netns):
    for command in (["ip", "link", "add", "lgbr0", "type", "bridge"],
                    ["ip", "link", "set", "lgbr0", "up"]):
        subprocess.run(inside(netns, command), check=True)
    procs = [guest(netns, lean, "; ".join([until_answered(f"10.19.0.{3 - n}", f"GUEST{n}-SAW"),
                                             "sleep 30"]),
                   "--tunnet=bridge:lgbr0", f"lguest.ip=10.19.0.{n}/24") for n in (1, 2)]
    try:
        outs = [read_until(p, f"GUEST{n}-SAW".encode(), BOOT)
                for n, p in zip((1, 2), procs)]
        members = subprocess.run(inside(netns, ["ip", "-j", "link", "show", "master", "lgbr0"]),
                                 capture_output=True, text=True).stdout
    finally:
        stop(*procs)
    for n, out in zip((1, 2), outs):
        assert f"GUEST{n}-SAW".encode() in out, out[-3000:].decode(errors="replace")
    assert len(json.loads(members)) == 2, members


def test_three_guests_share_a_file_without_root_and_survive_one_killed(lean, netns, tmp_path):
    lan = tmp_path / "lan"                                     # made by the first launcher
    addresses = {name: f"10.20.0.{n}" for n, name in enumerate("abc", start=1)}

    def script(me: str) -> str:
        others = [a for name, a in addresses.items() if name != me]
        steps = [until_answered(a, f"{me.upper()}-SAW-{a}") for a in others]
        if me == "c":
            return "; ".join(steps + ["sleep 600"])
        victim, friend = addresses["c"], [a for a in others if a != addresses["c"]][0]
        # Each stays a minute after it has talked, still answering, so that the other,
        # which may have seen c go a moment later, still finds someone to talk to.
        talked = until_answered(friend, f"{me.upper()}-STILL-TALKS") + " && sleep 60"
        return "; ".join(steps + [
            # Wait until the test has killed c, then show that the rest still talk.
            f"i=0; while [ $i -lt 200 ] && ping -c 1 -W 1 {victim} >/dev/null; "
            f"do i=$((i+1)); sleep 1; done",
            talked])

    procs = {me: guest(netns, lean, script(me), f"--sharenet={lan}",
                       f"lguest.ip={addresses[me]}/24", prefix=NO_CAPABILITIES)
             for me in "abc"}
    outs = dict.fromkeys("abc", b"")
    try:
        deadline = time.monotonic() + BOOT
        for me, proc in procs.items():
            last = addresses["b" if me == "c" else "c"]
            outs[me] += read_until(proc, f"{me.upper()}-SAW-{last}".encode(),
                                   max(deadline - time.monotonic(), 1))
        listed = subprocess.run(LGUEST + ["ps"], capture_output=True, text=True).stdout
        procs["c"].send_signal(signal.SIGKILL)
        for me in "ab":
            outs[me] += read_until(procs[me], f"{me.upper()}-STILL-TALKS".encode(), 300)
        statuses = {me: procs[me].wait(120) for me in "ab"}
    finally:
        stop(*procs.values())
    text = {me: out.decode(errors="replace") for me, out in outs.items()}
    for me in "abc":
        for other, address in addresses.items():
            if other != me:
                assert f"{me.upper()}-SAW-{address}" in text[me], text[me][-3000:]
    for me in "ab":
        assert f"{me.upper()}-STILL-TALKS" in text[me], text[me][-3000:]
    assert statuses == {"a": 0, "b": 0}, text
    assert listed.count(f"on sharenet {lan}") == 3, listed
    assert "guest 10.20.0.1/24" in listed, listed
    assert lan.stat().st_size > 0
