"""Build script. Metadata lives in pyproject.toml; no native extension yet (comes later).

Always install with ``pip install --no-build-isolation -e .`` (see Makefile).
"""
from setuptools import find_namespace_packages, setup

setup(
    # namespace finder so the package is found even before untangle_ext/__init__.py exists
    packages=find_namespace_packages(include=["untangle_ext", "untangle_ext.*"], exclude=["*.__pycache__"]),
)
