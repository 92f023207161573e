"""Cut this process off the network for one test: any internet connection attempt raises.

Loopback and Unix sockets stay allowed (Ray and local servers use them); everything else fails
loudly, so a test passes only if the code under test never reaches for a hub.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest


class NetworkDisabled(OSError):
    """Raised instead of connecting anywhere but this machine."""


def _is_local(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: resolving it already means going out


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every non-loopback connect fail, and tell huggingface_hub it is offline."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def guarded_connect(sock, address):
        if not _is_local(address):
            raise NetworkDisabled(f"network disabled in this test: tried to connect to {address!r}")
        return real_connect(sock, address)

    def guarded_lookup(host, *args, **kwargs):
        if host is not None and not _is_local((host,)):
            raise NetworkDisabled(f"network disabled in this test: tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
