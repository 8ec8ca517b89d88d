"""The one place rdsd's version is written: ``pyproject.toml`` reads it for
the package's metadata (``[tool.setuptools.dynamic]``), and the code reads
it here, which costs nothing, where finding the installed distribution's
metadata took 15-40 ms of every command and of every ``rdsft`` run."""

VERSION = "0.1.0"
