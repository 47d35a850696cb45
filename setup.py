"""Packaging metadata lives in pyproject.toml; only the package list is computed here: every package under
fxadapt/ is found, so a new method folder (fxadapt/methods/<family>/) needs no packaging line."""

from setuptools import find_packages, setup

setup(packages=["fxadapt", *(f"fxadapt.{name}" for name in find_packages("fxadapt")), "fxadapt.passes",
                "fxadapt.tools"])
