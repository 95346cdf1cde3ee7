"""Where torch.compile keeps its caches when the CLI runs (no torch import: `--help` stays fast)."""

from __future__ import annotations

import os


def private_cache() -> None:
    """Point inductor's cache at a directory only this user can write, unless the user chose one.

    Inductor loads the shared objects it finds in its cache, and its default,
    /tmp/torchinductor_<user>, can be created beforehand by anyone on the machine. Done by the
    CLI, which owns its process; API callers keep their own environment.
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") or not hasattr(os, "getuid"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "bn-diff", "inductor")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return
    if st.st_uid == os.getuid() and not st.st_mode & 0o022:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
