"""Writing files and folders so that no crash, kill or power cut leaves a half-written one under the real
name: write a temporary sibling, fsync it, rename it into place, fsync the folder that holds it.

The temporary sibling of NAME is .tmp-PID-NAME (it ends as NAME does, so a reader that goes by the suffix,
a .gguf, reads it); temporaries whose process is gone (a killed run) are removed by the next writer in the
same folder, and a predecessor parked as .old-PID-NAME (killed between the two renames of a replacement)
is put back.
"""
import contextlib
import os
import re
import shutil

from REPORT import log

TEMP = re.compile(r"\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<name>.+)")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_stale(folder):
    """Remove the temporaries of dead processes in `folder`; put back a predecessor parked mid-replacement."""
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        m = TEMP.fullmatch(entry)
        if not m or alive(int(m["pid"])):
            continue
        stale, original = os.path.join(folder, entry), os.path.join(folder, m["name"])
        if m["kind"] == "old" and not os.path.exists(original):
            os.rename(stale, original)
        else:
            remove(stale)
            log(f"removed {stale}, left incomplete by an interrupted run")


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def fsync(path):
    """Flush a file, or every file and folder under a folder, to the disk."""
    for root, dirs, files in os.walk(path) if os.path.isdir(path) else [(None, [], [path])]:
        for name in files:
            fd = os.open(name if root is None else os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if root is not None:
            fsync_folder(root)


def fsync_folder(folder):
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path):
    """`with replacing(path) as tmp:` write the file or folder `tmp`; when the block ends without an error it
    takes the place of `path` (a same-named predecessor survives until the new one is in place); on an error
    it is removed and `path` is as it was."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    clear_stale(folder)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    old = os.path.join(folder, f".old-{os.getpid()}-{os.path.basename(path)}")
    remove(tmp)
    try:
        yield tmp
        fsync(tmp)
        if os.path.isdir(path) and not os.path.islink(path):  # a folder cannot be renamed over a folder
            os.rename(path, old)
        os.replace(tmp, path)
        fsync_folder(folder)
        remove(old)
    except BaseException:
        remove(tmp)
        if os.path.exists(old) and not os.path.exists(path):
            os.rename(old, path)
        raise
