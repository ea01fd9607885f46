"""A trainer package that cannot be installed, for the platform's
InstallFailed path. Its sdist builds (`sdist`/`egg_info` are allowed), but
building the wheel, which installing it needs, fails with the message below."""
import sys

from setuptools import setup

if not {"sdist", "egg_info"} & set(sys.argv[1:]):
    raise RuntimeError("broken-trainer: this package fails to install on purpose (cloudml InstallFailed example)")

setup(
    name="broken-trainer",
    version="1.0",
    description="Cloud-ML test trainer whose installation fails on purpose",
    packages=["broken_trainer"],
)
