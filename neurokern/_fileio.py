"""Crash-safe file writes for the trainer and the synthetic data set (docs/training.md, "Crash
safety and resume").

A file is written to a temporary name in its own folder (`.<name>.<random>.nk-tmp`), flushed,
fsync'ed, renamed over the target (atomic on POSIX) and the folder fsync'ed: a reader (or a
run resumed after a kill or a power cut) sees the old file or the new one, never a mix, and a
failed write (a full disk) leaves the old file as it was.
"""

import errno
import os
import secrets
import shutil
import socket
from pathlib import Path

TMP_SUFFIX = ".nk-tmp"

# errnos that mean "no room left": a full disk or an exhausted quota
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def fsync_dir(folder):
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:          # some file systems refuse fsync on a folder
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def replace(src, dst):
    """Rename `src` over `dst` atomically and make it durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def is_disk_full(error):
    """True for an OSError meaning no space is left. (Checkpoints are serialised in memory and
    written here, so torch's zip writer, whose full-disk error reads "unexpected pos", never
    writes to a disk.)"""
    return isinstance(error, OSError) and error.errno in _NO_SPACE


def disk_full_error(path, error):
    """The OSError(ENOSPC) to raise when writing `path` failed for want of space."""
    return OSError(errno.ENOSPC, f"the disk is full: could not write {path} ({error}); "
                                 f"free some space and run again (nothing older was "
                                 f"overwritten)", str(path))


def write_all(fd, data):
    """os.write until all of `data` (bytes-like) is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_new(path, data):
    """Create `path` (it must not exist) holding `data`, fsync'ed; for files of a folder that
    `build_folder` renames into place once complete. OSError(ENOSPC) names `path`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise


def _create_unique(folder, prefix, suffix, folder_mode=None):
    """Create a new file (or, with `folder_mode`, a folder) `folder/<prefix><random><suffix>`
    with the permissions a plain open() would give (tempfile's are private). Returns
    (fd or None, path)."""
    while True:
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            if folder_mode is not None:
                path.mkdir(mode=folder_mode)
                return None, path
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def atomic_write(path, data, before_replace=None):
    """Write `data` (bytes, or a list of bytes chunks) to `path` atomically and durably;
    `before_replace()` runs once the new content is on disk, just before it replaces `path`.

    Raises OSError(ENOSPC) naming `path` when the disk is full; on any failure the temporary file
    is removed and a previous `path` is left untouched."""
    path = Path(path)
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd, tmp = _create_unique(path.parent, f".{path.name}.", TMP_SUFFIX)
    try:
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        replace(tmp, path)
    except BaseException as e:    # (a KeyboardInterrupt too: no temporary file left behind)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise


def remove_stale_temporaries(folder):
    """Delete the temporary files a killed writer left in `folder` (ours only: `.*.nk-tmp`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir()
             if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _scratch_prefix(root):
    return f".{root.name}.partial-{socket.gethostname()}-"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # another user's process
        return True
    return True


def remove_stale_scratch(root):
    """Delete the scratch folders of `build_folder(root, ...)` calls whose process (on this
    host) is gone: a killed run leaves none behind for good."""
    prefix = _scratch_prefix(root)
    removed = []
    if root.parent.is_dir():
        for entry in root.parent.iterdir():
            if not (entry.name.startswith(prefix) and entry.is_dir()):
                continue
            pid = entry.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def build_folder(root, fill):
    """Create the folder `root` (missing or empty) in one step: `fill(scratch)` writes its
    content (with `write_new`) into a scratch folder beside it, which is fsync'ed and renamed to
    `root` once complete, so no process ever sees half of it.

    Returns True, or False when another process completed `root` first (this one's scratch is
    then deleted). On any failure the scratch folder is deleted; a killed process's scratch is
    deleted by the next call for the same `root`."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(root)
    _, scratch = _create_unique(root.parent, f"{_scratch_prefix(root)}{os.getpid()}-", "",
                                folder_mode=0o777)
    try:
        fill(scratch)
        for folder, _, _ in os.walk(scratch):
            fsync_dir(folder)
        try:
            replace(scratch, root)    # (rename(2) replaces a missing or empty folder only)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(scratch, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return True
