"""Notices when the database file under an open connection was removed, replaced or cut.

SQLite keeps using a file that was unlinked, replaced or truncated under an open
connection (its pages are cached, its descriptor still points at the old inode), so a
long-lived connection would go on reading stale data or writing into a file nobody will
ever read. Callers `remember()` the file right after opening it and ask `fault()` before
relying on the connection; on a fault they close it and open the path again.
"""

from __future__ import annotations

import os


class FileIdentity:
    """(device, inode) and the largest size seen of one database path."""

    def __init__(self, path: str):
        self.path = path
        self._file: tuple[int, int] | None = None
        self._size = 0

    def remember(self) -> None:
        """Take the file now at `path` as the one the new connection uses (OSError if gone)."""
        info = os.stat(self.path)
        self._file, self._size = (info.st_dev, info.st_ino), info.st_size

    def fault(self) -> str | None:
        """Why the remembered file can no longer be trusted, or None. Only stat(): opening
        the file ourselves would drop SQLite's POSIX locks on close."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return f"database {self.path} was removed"
        except OSError as exc:
            return f"database {self.path}: {exc.strerror}"
        if (info.st_dev, info.st_ino) != self._file:
            return f"database {self.path} was replaced"
        if info.st_size < self._size:
            # It never shrinks by itself (no auto-vacuum); after a VACUUM the reopen's
            # checks pass and this becomes the new baseline.
            return f"database {self.path} shrank (truncated?)"
        self._size = info.st_size
        return None
