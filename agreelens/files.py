"""Files that another user reads (the service image's non-root user, a colleague, a registry download):
written atomically and world-readable, 0644 files and 0755 directories, whatever the umask."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def publish_tree(path: str | Path) -> Path:
    """Set ``path`` and everything under it to 0755 (directories) / 0644 (files); links are left alone."""
    path = Path(path)
    if path.is_symlink():
        return path
    if not path.is_dir():
        os.chmod(path, FILE_MODE)
        return path
    os.chmod(path, DIR_MODE)
    for top, dirs, files in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(top, d)):
                os.chmod(os.path.join(top, d), DIR_MODE)
        for f in files:
            if not os.path.islink(os.path.join(top, f)):
                os.chmod(os.path.join(top, f), FILE_MODE)
    return path


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same directory, renamed over it) with
    mode 0644; the parent directory is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_readable(path: str | Path) -> Path:
    """Open ``path`` for reading; a PermissionError names the file, its mode and owner and the reading uid
    (libraries such as safetensors report an unreadable file as missing)."""
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        try:
            st = path.stat()
            what = f"mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid}"
        except OSError:
            what = "its directory cannot be searched"
        raise PermissionError(
            f"{path}: permission denied ({what}; this process runs as uid {os.getuid()}): "
            f"make it readable, e.g. chmod -R a+rX {path.parent}"
        ) from None
    return path
