"""The package's version: its one source.

pyproject.toml reads it (``[tool.setuptools.dynamic]``), so the wheel's metadata, the
sdist's name, ``gradprobe.__version__``, the HTML reports and each run's ``meta.json``
all say the same. Change it here only.
"""

__version__ = "0.1.0"
