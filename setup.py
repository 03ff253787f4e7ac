"""daformer_fast: a fast, faithful DAFormer trainer in modern PyTorch."""

from setuptools import find_packages, setup

setup(
    name="daformer_fast",
    version="0.1.0",
    description="Fast, faithful re-implementation of DAFormer (domain-adaptive semantic segmentation)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["daformer_fast", "daformer_fast.*"]) + ["daformer_fast.kernels"],
    # Triton kernels live in the top-level kernels/ folder but import as daformer_fast.kernels: a top-level
    # module named plain `kernels` would collide with an unrelated PyPI package.
    package_dir={"daformer_fast.kernels": "kernels"},
    # Ranges, not pins: here torch resolves to 2.14.1 (CUDA build, brings triton 3.8); a GPU image with torch 2.11 /
    # triton 3.6 satisfies them without installing anything. The floors are the oldest versions the whole test suite
    # has passed with (torch 2.11, Python 3.12). Every entry is imported by the package: safetensors reads HF
    # `nvidia/mit-b*` weights, tensorboard is torch.utils.tensorboard's backend, timm provides the baselines' CNN
    # encoders (ResNetV1c, ResNeSt, ResNeXt; models/resnet.py).
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "pillow>=10",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "timm>=1.0",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.3"],
        "dev": [
            "nvidia-dali-cuda130>=2.3",
            # Test oracle only (tests/test_uda_stages.py): the kornia version DAFormer pins, whose colour-jitter and
            # blur semantics the uda/augment.py ops reproduce; never imported by the package.
            "kornia==0.5.8",
            "pytest>=8",
            "pytest-timeout>=2.3",
        ],
    },
    entry_points={
        "console_scripts": [
            "daformer-train=daformer_fast.train:main",
            "daformer-evaluate=daformer_fast.evaluate:main",
            "daformer-predict=daformer_fast.predict:main",
            "daformer-experiments=daformer_fast.experiments:main",
        ]
    },
)
