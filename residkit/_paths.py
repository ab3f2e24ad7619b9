"""Where residkit keeps what it builds and fetches."""

import os
from pathlib import Path

__all__ = ["home"]


def home() -> Path:
    """residkit's cache folder: ``$RESIDKIT_HOME``, else the platform's user cache dir.

    Zoo checkpoints live under ``home() / "zoo"``, real models under ``home() / "models"``.

    Examples:
        >>> home().is_absolute()
        True
    """
    env = os.environ.get("RESIDKIT_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("residkit", appauthor=False))
