"""Runs inside the guest (stdlib only): the guest is one network hop between two host
programs. Each relay listens on a guest port (qemu forwards the same host port to it) and
connects on to its port of the host (10.0.2.2 under qemu's user networking); what the guest
sends leaves through its NIC, where the host turns netem on and off over a control port.
Usage: python3 netem_hop.py CONTROL_PORT LISTEN_PORT:HOST_PORT...
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

HOST = "10.0.2.2"  # the host, as qemu's user networking shows it to the guest
GUEST = "10.0.2.15/24"


def sh(*cmd: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return {"rc": proc.returncode, "out": (proc.stdout + proc.stderr).strip()}


def network_up() -> str:
    """Configure the NIC by hand (no DHCP client needed); its name."""
    nic = next(n for n in sorted(os.listdir("/sys/class/net")) if n != "lo")
    for cmd in (("modprobe", "sch_netem"), ("ip", "link", "set", "lo", "up"),
                ("ip", "link", "set", nic, "up"), ("ip", "addr", "add", GUEST, "dev", nic),
                ("ip", "route", "add", "default", "via", HOST)):  # fmt: skip
        result = sh(*cmd)
        if result["rc"] != 0:
            raise SystemExit(f"{' '.join(cmd)}: {result['out']}")
    return nic


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            s.close()


def relay(listen: int, target: int) -> None:
    with socket.create_server(("0.0.0.0", listen)) as server:
        while True:
            down, _ = server.accept()
            try:
                up = socket.create_connection((HOST, target), timeout=10)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(down, up), daemon=True).start()
            threading.Thread(target=pump, args=(up, down), daemon=True).start()


def control(port: int, nic: str) -> None:
    """One JSON request per line: {"netem": "delay 50ms ..."} (or "" to remove it),
    {"qdisc": true} (tc's statistics), {"nstat": true} (the TCP counters), {"quit": true};
    a connection that closes without "quit" (a probe while the guest was starting) leaves the
    port open for the next."""
    with socket.create_server(("0.0.0.0", port)) as server:
        while True:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as io:
                if serve(io, nic):
                    return


def serve(io, nic: str) -> bool:
    """Answer one control connection; whether it said quit."""
    io.write(json.dumps({"ready": nic, "kernel": os.uname().release}).encode() + b"\n")
    io.flush()
    for line in io:
        request = json.loads(line)
        if "netem" in request:
            spec = request["netem"].split()
            if spec:
                reply = sh("tc", "qdisc", "replace", "dev", nic, "root", "netem", *spec)
            else:
                reply = sh("tc", "qdisc", "del", "dev", nic, "root")
        elif "qdisc" in request:
            reply = sh("tc", "-s", "qdisc", "show", "dev", nic)
        elif "nstat" in request:  # retransmissions by kind among them
            reply = sh("nstat", "-az")
        else:
            return True
        io.write(json.dumps(reply).encode() + b"\n")
        io.flush()
    return False


def main() -> None:
    control_port, relays = int(sys.argv[1]), [a.split(":") for a in sys.argv[2:]]
    nic = network_up()
    for listen, target in relays:
        threading.Thread(target=relay, args=(int(listen), int(target)), daemon=True).start()
    control(control_port, nic)


if __name__ == "__main__":
    main()
