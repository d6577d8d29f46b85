"""Write failures a test can plant: root in a container ignores chmod, so a read-only folder is simulated."""

import builtins
import errno
import io
import os


def failing_writes(monkeypatch, folder, error):
    """Files opened for writing in `folder` fail like a read-only folder (EROFS, at open) or a full disk
    (ENOSPC, at the first non-empty write): what root in a test container cannot get from chmod."""
    real_open = io.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            return 0

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") \
                and os.path.dirname(os.path.abspath(file)) == str(folder):
            if error == "read-only":
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return Full(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)
