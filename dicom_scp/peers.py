"""Who may open an association: calling AE titles bound to the addresses they send from.

An AE title alone is a claim anyone can make; on a hospital network a spoofed
one could add an image to a study and reopen it. So each known peer is an AE
title *and* where it may connect from: an address, a CIDR, or a hostname
(resolved when the peer connects, so a DHCP reservation behind a DNS name
keeps working). Anything else is refused at negotiation with A-ASSOCIATE-RJ
"calling AE title not recognised".
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# How long a hostname's addresses are trusted before it is resolved again.
RESOLVE_TTL_SECONDS = 60.0


def _address(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    # A dual-stack listener sees IPv4 senders as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _resolve(hostname: str) -> frozenset[IPAddress]:
    infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)
    return frozenset(_address(info[4][0]) for info in infos)


@dataclass(frozen=True)
class Peer:
    """One known sender: `host` is an address, a CIDR (10.2.0.0/16) or a hostname."""

    ae_title: str
    host: str

    def __post_init__(self) -> None:
        title = self.ae_title.strip()
        if not title or len(title) > 16 or "\\" in title or not title.isprintable():
            raise ValueError(f"not an AE title: {self.ae_title!r}")
        object.__setattr__(self, "ae_title", title)
        if not self.host.strip():
            raise ValueError(f"peer {title}: host is empty")

    @property
    def network(self) -> IPNetwork | None:
        """The host as a network (an address is a /32 or /128), or None for a hostname."""
        try:
            return ipaddress.ip_network(self.host.strip(), strict=False)
        except ValueError:
            return None


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str = ""  # why not, for the log and the audit trail


class PeerPolicy:
    """Decides, from the calling AE title and the connecting address, whether to
    negotiate. Fails closed: an address that cannot be read or a hostname that
    does not resolve refuses."""

    def __init__(self, peers: Iterable[Peer], *, accept_any: bool = False,
                 resolve: Callable[[str], frozenset[IPAddress]] = _resolve):
        self.peers = tuple(peers)
        self.accept_any = accept_any
        if not self.peers and not accept_any:
            raise ValueError("no known peers: list the senders, or accept any peer explicitly")
        self._resolve = resolve
        self._resolved: dict[str, tuple[float, frozenset[IPAddress]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def any_peer(cls) -> "PeerPolicy":
        return cls((), accept_any=True)

    def check(self, calling_ae: str, address: str) -> Decision:
        if self.accept_any:
            return Decision(True)
        title = calling_ae.strip()
        candidates = [p for p in self.peers if p.ae_title == title]
        if not candidates:
            return Decision(False, "calling AE title not recognised: unknown AE title")
        try:
            ip = _address(address)
        except ValueError:
            return Decision(False, "calling AE title not recognised: unreadable peer address")
        for peer in candidates:
            if self._matches(peer, ip):
                return Decision(True)
        return Decision(False, "calling AE title not recognised: not allowed from this address")

    def _matches(self, peer: Peer, ip: IPAddress) -> bool:
        network = peer.network
        if network is not None:
            return ip.version == network.version and ip in network
        return ip in self._addresses(peer.host.strip())

    def _addresses(self, hostname: str) -> frozenset[IPAddress]:
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(hostname)
        if cached and now - cached[0] < RESOLVE_TTL_SECONDS:
            return cached[1]
        try:
            addresses = self._resolve(hostname)
        except OSError:
            addresses = frozenset()  # unresolvable: nobody matches
        with self._lock:
            self._resolved[hostname] = (now, addresses)
        return addresses
