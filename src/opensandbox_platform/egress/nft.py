"""nftables through libnftables (ctypes): one `nft -f` transaction per call, no process per change.

A context opens its netlink socket in the network namespace of the thread that creates it, and
keeps talking to that namespace from any thread afterwards: `Nft(netns_fd)` creates it in a short
thread that entered the namespace first (the local runtime guards every jail from the server's
own process that way); the sidecar, already in the namespace it guards, passes none.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
LIBRARY = "libnftables.so.1"
CLONE_NEWNET = 0x40000000
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(RuntimeError):
    pass


def _load() -> ctypes.CDLL:
    bundled = os.path.join(getattr(sys, "_MEIPASS", ""), LIBRARY)  # the sidecar's one-file bundle
    lib = ctypes.CDLL(bundled if os.path.exists(bundled) else LIBRARY)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    return lib


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class Nft:
    """A libnftables context bound to one network namespace (the caller's, or `netns_fd`'s)."""

    def __init__(self, netns_fd: int | None = None) -> None:
        self._lib = library()
        self._lock = threading.Lock()
        self._ctx = self._new() if netns_fd is None else in_namespace(netns_fd, self._new)

    def _new(self) -> int:
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        # The netlink socket is opened by the first command: open it here, in this namespace.
        if self._lib.nft_run_cmd_from_buffer(ctx, b"list tables") != 0:
            raise NftError(self._lib.nft_ctx_get_error_buffer(ctx).decode(errors="replace").strip())
        return int(ctx)

    def run(self, commands: str) -> str:
        """Runs `commands` (nft -f syntax) as one transaction; NftError with nft's message if refused."""
        with self._lock:
            if not self._ctx:
                raise NftError("the nftables context is closed")
            status = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if status != 0:
            raise NftError(error.strip() or f"nft failed ({status})")
        return output

    def json(self, command: str) -> Any:
        """A `list` command's JSON output."""
        with self._lock:
            flags = self._lib.nft_ctx_output_get_flags(self._ctx)
            self._lib.nft_ctx_output_set_flags(self._ctx, flags | NFT_CTX_OUTPUT_JSON)
            try:
                status = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
                output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            finally:
                self._lib.nft_ctx_output_set_flags(self._ctx, flags)
        if status != 0:
            raise NftError(f"{command} failed")
        return json.loads(output) if output.strip() else {}

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = 0


def in_namespace(netns_fd: int, make: Callable[[], T]) -> T:
    """`make()` in a new thread that entered the network namespace first (the thread then ends):
    a netlink or network socket it opens stays in that namespace."""
    result: list[Any] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(netns_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the sandbox's network namespace failed")
            result.append(make())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name="nft-netns", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    found: T = result[0]
    return found


def denied_counts(listing: Any) -> dict[str, int]:
    """Address -> packets refused, from `nft -j list set` of a counted set."""
    counts: dict[str, int] = {}
    for item in listing.get("nftables", []) if isinstance(listing, dict) else []:
        for element in (item.get("set") or {}).get("elem") or []:
            inner = element.get("elem") if isinstance(element, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("val"), str):
                counts[inner["val"]] = int((inner.get("counter") or {}).get("packets", 0))
    return counts
