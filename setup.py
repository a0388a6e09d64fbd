from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version = {}
exec((HERE / "src" / "diffusers_masked" / "version.py").read_text(), version)

# What each does for us: docs/index.md, "Dependencies". (`evaluate` is not one: torchmetrics computes FID and the
# CLIP score, and nothing else needed it.)
train_requires = [
    "accelerate>=0.30",
    "datasets>=2.19",
    "tensorboard",
    "scikit-learn>=1.3",
    "torchmetrics>=1.3",
]

setup(
    name="diffusers-masked",
    version=version["__version__"],
    description="Masked training (MaskDiT, MaskDM) for diffusion transformers, in the Hugging Face diffusers family",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_masked": ["imagenet_id2label.json"]},
    python_requires=">=3.10",
    install_requires=[
        # A loose lower bound only: users bring the torch build (CPU, CUDA, ROCm) that fits their machine.
        "torch>=2.1",
        "diffusers>=0.35",
        "transformers>=4.40",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "numpy",
        "Pillow",
    ],
    extras_require={
        "train": train_requires,
        # matplotlib draws the benchmarks' plots; mkdocs builds the docs site (offline, `mkdocs build --strict`).
        "dev": train_requires
        + [
            "pytest>=7",
            "ruff>=0.4",
            "matplotlib",
            "mkdocs>=1.6",
            "mkdocs-material>=9.5",
            "mkdocstrings[python]>=0.26",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
