"""Who may talk to the server, checked before any route runs: the ``Host`` header and the ``Origin`` of writes.

- Host: a page of another web site whose domain name is re-pointed at 127.0.0.1 (DNS rebinding) reaches
  the server with its own name in ``Host``. Only the names the server was started for are accepted:
  127.0.0.1, localhost, ::1, the ``--host`` value and the names of ``--allow-host`` (as Jupyter does).
  With a wildcard bind (0.0.0.0, ::), any IP-address literal is accepted too: other machines reach
  the server by address, and a rebinding attack needs a domain name.
- Origin: a browser names the page that sends a request in ``Origin``. Writes (POST) from a page of
  another origin would let any web site run the model; they are refused unless ``--allow-origin`` names
  that origin. Requests without ``Origin`` (curl, scripts) are not a browser's and pass.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Optional, Sequence

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_name(header: str) -> Optional[str]:
    """``Host`` header -> the lower-case name or address without port and brackets; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 address: [::1]:8000
        end = header.find("]")
        rest = header[end + 1 :] if end > 0 else None
        if rest is None or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[1:end]
    name, _, port = header.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def normal_origin(origin: str) -> str:
    """An origin as compared: lower case, no trailing slash (``http://host:port``)."""
    return origin.strip().rstrip("/").lower()


class Access:
    """The hosts and origins a server accepts (see the module docstring)."""

    def __init__(
        self,
        bind_host: str = "127.0.0.1",
        allowed_hosts: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
    ) -> None:
        names = [*LOCAL_HOSTS, bind_host, *allowed_hosts]
        # Configured names come without port; a bare IPv6 address has colons of its own.
        self.hosts = {n.strip("[]").lower().rstrip(".") for n in names if n}
        self.any_host = "*" in allowed_hosts
        self.any_address = bind_host in WILDCARD_HOSTS
        self.origins = {normal_origin(o) for o in allowed_origins}
        self.any_origin = "*" in allowed_origins

    def host_refusal(self, header: Optional[str]) -> Optional[str]:
        """None when the ``Host`` header names this server, else the reason (one line)."""
        if self.any_host:
            return None
        name = host_name(header or "")
        if name is not None and (name in self.hosts or (self.any_address and is_ip_address(name))):
            return None
        shown = (header or "")[:80]
        return (
            f"Host {shown!r} is not a name this server was started for "
            f"(start it with --allow-host {name or 'NAME'} to accept it)"
        )

    def origin_refusal(self, method: str, origin: Optional[str], host: Optional[str]) -> Optional[str]:
        """None when a request may go on, else why a cross-origin write is refused (one line)."""
        if method in SAFE_METHODS or origin is None or self.any_origin:
            return None
        given = normal_origin(origin)
        if given in self.origins:
            return None
        netloc = urllib.parse.urlsplit(given).netloc if "://" in given else None
        if netloc is not None and host is not None and netloc == host.strip().lower():
            return None
        return (
            f"cross-origin request from {origin[:80]!r} refused "
            f"(start the server with --allow-origin {origin[:80] if netloc else 'ORIGIN'} to allow it)"
        )
