"""Checks a command runs before it loads a model: optional extras installed, output paths writable without
silently replacing anything, the server's port free. Each failure is one FineMoEError line naming the fix."""
from __future__ import annotations

import errno
import importlib
import os
import socket

from finemoe.errors import ConfigError, MissingExtraError


def require_extra(modules: list[str], extra: str, purpose: str) -> None:
    """Import each of `modules` (checking only); if one is missing, say which pip extra installs it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingExtraError(f"{purpose} needs {name}, which is not installed: pip install -e \".[{extra}]\" "
                                    f"(or pip install \"finemoe[{extra}]\")") from None


def check_out_file(path: str, flag: str = "--out", overwrite: bool = False) -> None:
    """`path` names a file this command will write: not a directory, in an existing directory, and not an
    existing file unless `overwrite`."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a directory: name a file inside it, e.g. {os.path.join(path, 'out')}")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{flag} {path!r} already exists: pass --overwrite to replace it, or name another file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path!r}: the directory {parent!r} does not exist: create it first")


def check_out_dir(path: str, flag: str = "--out") -> None:
    """`path` names a folder this command writes into (created if missing): not an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file, not a folder: name a folder for the outputs")


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) once and release it: a port in use is reported before the model loads."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use: pass another --port, or stop the "
                                  "process listening there") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}: check --host and --port") from None
