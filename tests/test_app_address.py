"""The app listens on the loopback address unless told otherwise (issue 10, section 4).

The listening sockets are read from the kernel's table (/proc/net/tcp, tcp6): a
connection test alone cannot fail on a machine whose only interface is loopback, while
the table names the bound address whatever the network looks like.
"""
from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from streamlit_server import ROOT, free_port, streamlit_server

PROC_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
LISTEN = "0A"

needs_proc = pytest.mark.skipif(not PROC_TABLES[0].is_file(), reason="no /proc/net/tcp (not Linux)")


def _decode(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp prints addresses as host-order 32-bit words in hex."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_addresses(port: int) -> set[str]:
    """Addresses with a TCP socket in LISTEN state on ``port`` (any process)."""
    found = set()
    for table in PROC_TABLES:
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, port_hex = local.rsplit(":", 1)
            if state == LISTEN and int(port_hex, 16) == port:
                found.add(str(_decode(addr)))
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@needs_proc
def test_the_table_reader_sees_loopback_and_wildcard_listeners():
    # The reader must be able to tell the two apart, or the app test below proves nothing.
    with socket.socket() as lo, socket.socket() as anywhere:
        lo.bind(("127.0.0.1", 0))
        anywhere.bind(("0.0.0.0", 0))
        lo.listen()
        anywhere.listen()
        assert listening_addresses(lo.getsockname()[1]) == {"127.0.0.1"}
        assert listening_addresses(anywhere.getsockname()[1]) == {"0.0.0.0"}
        assert not _is_loopback("0.0.0.0") and not _is_loopback("::") and _is_loopback("::ffff:127.0.0.1")


@needs_proc
@pytest.mark.slow
def test_plain_streamlit_run_listens_on_loopback_only(tmp_path):
    """``streamlit run streamlit_app.py`` without an address flag: the project's config decides."""
    port = free_port()
    with streamlit_server(port, tmp_path / "runs", tmp_path / "streamlit.log"):
        addresses = listening_addresses(port)
    assert addresses, f"nothing listens on port {port}"
    assert all(_is_loopback(a) for a in addresses), addresses


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_app_passes_the_address_through():
    def app_line(*args: str) -> str:
        out = subprocess.run(["make", "-n", "app", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return next(line for line in out.stdout.splitlines() if "streamlit run streamlit_app.py" in line)

    assert "--server.address" not in app_line()  # the default comes from .streamlit/config.toml
    assert app_line("ADDRESS=0.0.0.0").endswith("streamlit run streamlit_app.py --server.address 0.0.0.0")


def test_the_config_defaults_to_loopback():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
