"""`check_text`: a file that must be text (a metrics.jsonl, a log) and is binary is a one-line ValueError naming the
file and line, before a reader trips over it with a decoder traceback or reads it as an empty log.

    check_text(path)                                   # UTF-8, no NUL byte, every line (metrics files: small)
    check_text(path, utf8=False, limit=1 << 16)        # logs: only a NUL byte in the first 64 KiB marks binary
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["check_text"]


def check_text(path: str | Path, *, utf8: bool = True, limit: int | None = None) -> None:
    """ValueError("FILE:LINE: ...") at the first NUL byte or (with `utf8`) the first invalid UTF-8 byte; reads at
    most `limit` bytes when given (a binary file shows itself at its start). Unreadable files are left to the
    caller's own error."""
    try:
        with Path(path).open("rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except OSError:
        return
    nul = data.find(b"\0")
    if nul != -1:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(f"{path}:{line}: a NUL byte at byte {nul}: a binary file, not text")
    if utf8:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            if limit is not None and e.start >= len(data) - 3:  # a character cut by the read limit
                return
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start})") from None
