"""attent_vision: MultiMAE pretraining under an AtteNT difficulty-aware teacher, on Hydra + Lightning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attent_vision")
except (
    PackageNotFoundError
):  # a source tree on sys.path without an install (pyproject.toml holds the version)
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
