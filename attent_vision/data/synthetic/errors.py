"""The errors of a dataset root the embedded generators may not write into.

Imported only when one is raised: `attent_vision.config` imports torch, which the synthetic command line (and the
reuse of a complete set) does not need.
"""

from __future__ import annotations

from attent_vision.config import ConfigError

__all__ = ["ConfigError", "DataRootError"]


class DataRootError(ConfigError, FileExistsError):
    """``data.root`` holds files that the generator did not write; nothing in it is overwritten or deleted.

    A `ConfigError` (the entry points print it as one line) and a `FileExistsError` (what the generators raised
    before they told the cases apart).
    """
