"""What every file that touches the disk or the network shares: the errors a user can fix, the cache
folder, downloads, and writes that never leave a half-written file."""
import errno
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager


# ----------------------------------------------------------------------------------------------
# Errors a user can fix. Each also inherits the builtin type raised here before, so callers that
# catch FileNotFoundError, ValueError or ConnectionError keep working.


class UserError(Exception):
    """A problem the user can fix: a path, a file, a download, a setting. train.py prints it as one
    'error: ...' message and exits 2; any other exception is a bug and keeps its traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A folder or file the run needs is not there (or a name that is neither a folder nor a release)."""


class BadFile(UserError, ValueError):
    """A file is there but unusable: a malformed row, a corrupt or unfitting checkpoint, a bad vocabulary."""


class Offline(UserError, ConnectionError):
    """A download failed: no network, a refused connection, or a transfer cut short."""


def unreadable(path):
    """Whether `path` is there but this user cannot read it (a folder: list and enter it)."""
    return os.path.exists(path) and not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0))


def denied(path):
    """The PermissionError train.py explains: "cannot read X" where this user cannot read it, else "cannot write X"."""
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def check_access(path):
    """A file or folder that this user cannot read: the PermissionError train.py explains, not the "not found"
    or "corrupt" a reader of it, or of what it holds, would report."""
    if unreadable(path):
        raise denied(path)


def one_level_down(folder, wanted):
    """For a folder one level above the one meant (an unzipped download's outer folder): a hint naming its
    subfolders that hold one of the names in `wanted`, or ""."""
    try:
        subs = [os.path.join(folder, d) for d in sorted(os.listdir(folder))]
    except OSError:  # no folder there, or none that can be read: no hint
        return ""
    hints = []
    for sub in subs:
        name = next((w for w in wanted if os.path.exists(os.path.join(sub, w))), None)
        if name:
            hints.append(f" {sub} holds {name}: pass that folder?")
    return "".join(hints[:3])


def cache_root():
    """Where downloads go: $MOEBERT_CACHE (set and not empty), else ~/.cache/moebert."""
    return os.environ.get("MOEBERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moebert")


def cache_dir():
    """cache_root(), made if missing."""
    folder = cache_root()
    try:
        os.makedirs(folder, exist_ok=True)  # a file there is a FileExistsError
    except OSError as e:
        raise UserError(f"the download cache {folder} ($MOEBERT_CACHE, else ~/.cache/moebert) cannot be a folder "
                        f"({'it is a file' if os.path.isfile(folder) else e.strerror}): set MOEBERT_CACHE to a folder "
                        f"you can write to") from None
    return folder


# A write that fails on this machine (for the error train.py prints: runtime.disk_error), not on the network.
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "no permission", errno.EPERM: "no permission",
               errno.EISDIR: "where this run reads or writes a file"}


def name_file(e, path):
    """A write's OSError (a full disk) names no file, so train.py's error would say "a file": it names `path`."""
    if isinstance(e, OSError) and e.filename is None:
        e.filename = path


def download(url, path, what="file"):
    """Download `url` to `path` with a progress line; the file appears only once complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(partial, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            done, t0 = 0, time.time()
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                pct = f"{100 * done / total:5.1f}% of {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
                print(f"\rdownloading {what}: {pct} ({done / 1e6 / max(time.time() - t0, 1e-3):.1f} MB/s)",
                      end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except OSError as e:  # URLError, timeouts and HTTP errors are all OSErrors
        if os.path.isfile(partial):
            os.remove(partial)
        if e.errno in DISK_ERRORS and not isinstance(e, urllib.error.URLError):  # the disk's, not the network's
            name_file(e, partial)
            raise
        raise Offline(f"could not download {what} from {url}: {e}; check the network and run again") from e
    if total and done != total:
        os.remove(partial)
        raise Offline(f"download of {what} from {url} stopped at {done} of {total} bytes; run again")
    os.replace(partial, path)


def makedirs(path):
    os.makedirs(path, exist_ok=True)
    return path


def unzip(zip_path, pick, folder):
    """The zip's members that pick(zip) lists, [(member, file name)], as the files of `folder`, whole or not at all:
    written into folder.partial, renamed when complete. A failed write (a full disk) removes what was written, and
    its error names the file (a write's names none)."""
    tmp = path = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            for member, name in pick(z):
                path = os.path.join(makedirs(tmp), name)
                with z.open(member) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name_file(e, path)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


@contextmanager
def written_beside(path):
    """with written_beside(path) as tmp: write tmp. Renamed over `path` when the block ends, so `path` is
    whole or as it was; if the block or the rename fails, tmp is removed (a refused run leaves no file)."""
    tmp = os.fspath(path) + ".partial"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        name_file(e, tmp)
        raise


def atomic_write_json(path, obj):
    with written_beside(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} to `path` whole or not at all: written beside, checked complete (safetensors
    reports no full disk: its file just comes out short), flushed to disk, then renamed over `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    with written_beside(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors as the OSError they are: a folder in the way, no permission
            code = re.search(r"\(os error (\d+)\)", str(e))
            if not code:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), tmp) from e
        size = os.path.getsize(tmp)
        with open(tmp, "rb+") as f:
            n = int.from_bytes(f.read(8), "little")  # the file: header length, JSON header, the tensors' bytes
            try:
                header = json.loads(f.read(n)) if 0 < n <= size else {}
            except ValueError:
                header = {}
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if not header or size != 8 + n + max(ends, default=0):
                raise OSError(errno.ENOSPC, f"{path} came out short ({size} bytes written)", path)
            os.fsync(f.fileno())  # on disk before the rename, so a crash of the machine cannot half-write it
        mask = os.umask(0)  # read, then put back: the mode open() gives a new file (0644 under the usual umask),
        os.umask(mask)  # where safetensors makes its files 0600: a model others can read, as its config.json
        os.chmod(tmp, 0o666 & ~mask)
