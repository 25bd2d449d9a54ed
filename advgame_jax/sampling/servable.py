"""Which directories ``launch/serve.py`` may serve: an HF export, never a game checkpoint or
a training workdir (``check_hf_export``), and an exported attacker only when explicitly
allowed (``check_servable``, the attacker gate); plus the tiny random model of the demo.
"""

from __future__ import annotations

import os

from advgame_jax.errors import UserError


class AttackerCheckpointError(UserError, PermissionError):
    """Serving an attacker checkpoint without ``allow_attacker``."""


class NotAnHFExportError(UserError, ValueError):
    """``--model_dir`` is not an HF export (a training workdir, a checkpoint, nothing)."""


def is_attacker_checkpoint(model_dir: str) -> bool:
    """True when ``model_dir`` holds attacker weights (``controlled.is_attacker_artifact``)."""
    from advgame_jax.controlled import is_attacker_artifact

    return is_attacker_artifact(model_dir)


def check_servable(model_dir: str, *, allow_attacker: bool) -> None:
    """Raise ``AttackerCheckpointError`` for an attacker checkpoint unless allowed (the one
    gate, ``controlled.require_attacker_allowed``)."""
    from advgame_jax.controlled import require_attacker_allowed

    require_attacker_allowed(
        model_dir, allow_attacker, "--model_dir", error=AttackerCheckpointError
    )


def check_hf_export(model_dir: str) -> None:
    """Raise ``NotAnHFExportError`` unless ``model_dir`` holds config.json, safetensors and a
    tokenizer; the message says what the directory is and how to make an export."""
    how = (
        "expected an HF export (config.json + *.safetensors + tokenizer files); make one "
        "with: python launch/convert.py --mode=checkpoint_to_hf --checkpoint={src} "
        "--player=defender --params=ema --out_dir=NEW_DIR"
    )
    if not os.path.isdir(model_dir):
        raise NotAnHFExportError(
            f"--model_dir {model_dir} does not exist; " + how.format(src="WORKDIR")
        )
    names = set(os.listdir(model_dir))
    if names & {
        "checkpoints",
        "state",
        "meta",
        "_CHECKPOINT_METADATA",
        "advgame_manifest.json",
    } or any(n.isdigit() for n in names):
        raise NotAnHFExportError(
            f"--model_dir {model_dir} is a training workdir or game "
            f"checkpoint, not an HF export; " + how.format(src=model_dir)
        )
    if (
        "config.json" not in names
        or not any(n.endswith(".safetensors") for n in names)
        or not names & {"tokenizer.json", "tokenizer_config.json"}
    ):
        raise NotAnHFExportError(
            f"--model_dir {model_dir} lacks config.json, *.safetensors "
            f"or the tokenizer; " + how.format(src="WORKDIR")
        )


def make_tiny_model_dir(path: str, *, seed: int = 0) -> str:
    """A tiny random Llama + the tiny offline tokenizer in ``path`` (demo and tests)."""
    import jax

    from advgame_jax.models import ModelConfig, init_params, save_hf
    from advgame_jax.tokenization import ChatTokenizer, build_tiny_tokenizer

    build_tiny_tokenizer(path)
    tok = ChatTokenizer.from_dir(path)
    config = ModelConfig(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        eos_token_id=tok.stop_token_ids[0],
        pad_token_id=tok.pad_id,
    )
    save_hf(path, config, init_params(config, jax.random.key(seed), std=0.15))
    return path
