"""How the processes reach each other: socket addresses, binding them safely, heartbeat timings.

Every frame on a socket is one serialized protobuf message from ``protos/`` (no pickle); the
conversions between those messages and in-process types are in ``protos.sampling`` and
``protos.requests``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

# A part sends a status message every HEARTBEAT_S; a peer silent for DEAD_AFTER_S is gone.
HEARTBEAT_S = 0.5
DEAD_AFTER_S = 3.0
# Workers also ping the gateway over ZMTP (its ZeroMQ I/O thread answers): unanswered for
# GATEWAY_PING_TIMEOUT_S after a ping, the connection is dropped and the gateway counts as gone.
GATEWAY_PING_S = 1.0
GATEWAY_PING_TIMEOUT_S = 5.0


@dataclass(slots=True, frozen=True)
class Addresses:
    """Where the engines and the gateway bind their ROUTER sockets (the workers connect)."""

    engines: list[str]  # one per data-parallel replica
    gateway: str

    @classmethod
    def in_run_dir(cls, run_dir: Path, num_engines: int = 1) -> Addresses:
        names = ["engine"] if num_engines == 1 else [f"engine-{k}" for k in range(num_engines)]
        return cls(
            engines=[f"ipc://{run_dir}/{n}.sock" for n in names],
            gateway=f"ipc://{run_dir}/gateway.sock",
        )

    def all(self) -> list[str]:
        return [*self.engines, self.gateway]


class BindError(Exception):
    """An address this process cannot listen on: a configuration error (exit 2), which the
    supervisor does not retry."""


def prepare_bind(address: str, remove_stale: bool = True) -> None:
    """Check an ipc:// address before binding it: create its directory, refuse a path over
    ZeroMQ's limit or a socket another live process listens on, and remove a stale socket
    file (what a killed process left). ``remove_stale=False`` only checks (for ``up``)."""
    if not address.startswith("ipc://"):
        return
    path = Path(address[len("ipc://") :])
    # ZeroMQ limits ipc paths to the size of sockaddr_un.sun_path.
    if len(os.fsencode(str(path))) > 107:
        raise BindError(f"ipc socket path is too long (max 107 bytes): {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BindError(f"cannot create the directory of {address}: {e.strerror}") from None
    if path.is_socket() and _listening(path):
        raise BindError(f"{address} is in use by a running process (another pagedserve?)")
    if remove_stale and (path.exists() or path.is_symlink()):
        try:
            path.unlink()
        except OSError as e:
            raise BindError(f"cannot remove the old socket file {path}: {e.strerror}") from None


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):  # nobody behind the file
            return False
        except OSError:  # a full backlog, another user's socket: someone is there
            return True
    return True


def bind(sock, address: str) -> None:
    """``prepare_bind``, then bind a ZeroMQ socket; any failure is a ``BindError``."""
    import zmq

    prepare_bind(address)
    try:
        sock.bind(address)
    except zmq.ZMQError as e:
        raise BindError(f"cannot listen on {address}: {e}") from None
