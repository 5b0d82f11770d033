"""Import a source checkout's cli/ and configs/ as align.cli and align.configs, as an installed package does.

The repository keeps both folders beside align/; setuptools installs them inside the package (``package-dir`` in
pyproject.toml). With only the checkout on sys.path (PYTHONPATH=., ``python -m pytest``), nothing maps them, so a
tiny finder does; in an installed package this finds align/cli and does nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any, Sequence

MAPPED = ("cli", "configs")


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Find ``align.<name>`` in ``<checkout>/<name>/`` for the folders of MAPPED."""

    def __init__(self, checkout: Path) -> None:
        self.checkout = checkout

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> ModuleSpec | None:
        """The spec of align.cli / align.configs from the checkout; None for every other module."""
        package, _, name = fullname.partition(".")
        if package != "align" or name not in MAPPED:
            return None
        folder = self.checkout / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def map_checkout_folders(package_dir: Path) -> None:
    """Install the finder when ``package_dir`` (align/) sits in a checkout rather than in an installed package."""
    checkout = package_dir.parent
    if any((package_dir / name).is_dir() for name in MAPPED):
        return  # installed: align/cli and align/configs are real subpackages
    if not all((checkout / name / "__init__.py").is_file() for name in MAPPED):
        return
    if not any(isinstance(finder, CheckoutFinder) for finder in sys.meta_path):
        # first, so that another checkout's editable install can never answer for this one
        sys.meta_path.insert(0, CheckoutFinder(checkout))
