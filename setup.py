"""dstp: tensor-parallel serving of Hugging Face causal LMs on DeepSpeed.

The metadata lives in setup.cfg; only the package list is here: every ``dstp.*`` package
(found, so a new subpackage cannot be left out of the wheel) plus ``dstp.policies``, which
lives in the top-level ``policies/`` folder (setup.cfg's ``package_dir``).
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["dstp", "dstp.*"]), "dstp.policies"])
