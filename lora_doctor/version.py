"""The package's version: one home, read by the reports (`tool.version`) and by the package's `__version__`.
Kept apart from the package's `__init__` so that no module imports the package root for it."""

__version__ = "0.1.0"  # pyproject.toml's [project] version (tests/test_api.py holds them equal)
