"""Checkpoint conversion: game checkpoint → HF directory (either player, trained or EMA
params), HF directory → initial params (Orbax), and those params → HF again.

Every output is built in a temporary sibling directory and renamed into place; an existing
output is never overwritten. The trained attacker is a controlled artifact: every input is
checked by the one gate (``controlled.require_attacker_allowed``: a game checkpoint's
attacker, an HF export, converted params, a sampler sync version), converting it needs
``allow_attacker=True``, and every output made from an attacker carries every marker and is
private (0700/0600), so the marker survives any chain of conversions.

Orbax params layout (``hf_to_params`` output): ``<out>/params`` (a plain Orbax PyTree,
readable by ``sampling.checkpoints.restore_params`` and ``JaxSampler.load_weights``),
``<out>/config.json`` (the HF config), ``<out>/tokenizer`` (when the source had one), and the
attacker marker file when the source was an attacker.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from advgame_jax import controlled
from advgame_jax.evaluation.targets import (
    TargetError,
    check_hf_dir,
    find_step_dir,
    resolve_base_hf_dir,
    restore_player_params,
)
from advgame_jax.training.export import export_hf

PROVENANCE = "ADVGAME_CONVERSION.json"


def _build_aside(out_dir: str, build, *, private: bool = False) -> str:
    """Run ``build(tmp_dir)`` in a fresh sibling dir of ``out_dir`` (mode 0700 while it is
    built), then rename it into place; ``private`` (attacker weights): it stays 0700 with
    files 0600, else it becomes 0755."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"--out_dir {out_dir!r} already exists; choose a new directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        build(tmp)
        if private:
            controlled.make_private(tmp)
        else:
            os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory
        raise
    return out_dir


def _copy_tokenizer(src: str, dst: str) -> bool:
    try:
        from advgame_jax.tokenization import ChatTokenizer

        ChatTokenizer.from_dir(src).save(dst)
        return True
    except Exception:  # no tokenizer there: weights only
        return False


def _provenance(path: str, **info) -> None:
    with open(os.path.join(path, PROVENANCE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def checkpoint_to_hf(
    checkpoint: str,
    out_dir: str,
    *,
    player: str = "defender",
    params: str = "ema",
    base: str = "",
    allow_attacker: bool = False,
    dtype=None,
) -> str:
    """Export ``player``'s ``params`` ('ema'|'trained') of a game checkpoint as an HF dir."""
    step_dir = find_step_dir(checkpoint)
    attacker = controlled.require_attacker_allowed(
        step_dir, allow_attacker, "--checkpoint", attacker=player == "attacker"
    )
    hf = resolve_base_hf_dir(step_dir, player, base)
    config, p = restore_player_params(step_dir, player, params, hf)

    def build(tmp):
        export_hf(
            tmp, config, p, attacker=attacker, allow_attacker_export=allow_attacker, dtype=dtype
        )
        _copy_tokenizer(hf, tmp)
        _provenance(tmp, source=step_dir, player=player, params=params, base_hf_dir=hf)

    return _build_aside(out_dir, build, private=attacker)


def hf_to_params(hf_dir: str, out_dir: str, *, allow_attacker: bool = False) -> str:
    """HF directory → Orbax params (initial params of a player, or sampler weights)."""
    from advgame_jax.models import load_hf
    from advgame_jax.sampling.checkpoints import save_params

    check_hf_dir(hf_dir, "--hf_dir")
    attacker = controlled.require_attacker_allowed(hf_dir, allow_attacker, "--hf_dir")
    config, params = load_hf(hf_dir)

    def build(tmp):
        save_params(os.path.join(tmp, "params"), params)
        cfg = config.to_hf_dict()
        if attacker:
            cfg[controlled.CONFIG_FIELD] = "attacker"
            controlled.write_marker(tmp, params_subdir=True)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        _copy_tokenizer(hf_dir, os.path.join(tmp, "tokenizer"))
        _provenance(tmp, source=os.path.abspath(hf_dir))

    return _build_aside(out_dir, build, private=attacker)


def params_to_hf(params_dir: str, out_dir: str, *, allow_attacker: bool = False, dtype=None) -> str:
    """``hf_to_params`` output → HF directory (the marker follows an attacker)."""
    import jax

    from advgame_jax.models import ModelConfig, init_params
    from advgame_jax.sampling.checkpoints import restore_params

    cfg_file = os.path.join(params_dir, "config.json")
    if not os.path.isfile(cfg_file) or not os.path.isdir(os.path.join(params_dir, "params")):
        raise TargetError(
            f"--params_dir {params_dir!r}: expected config.json and params/ (the "
            f"output of --mode=hf_to_params)"
        )
    attacker = controlled.require_attacker_allowed(params_dir, allow_attacker, "--params_dir")
    config = ModelConfig.from_hf_file(cfg_file)
    like = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    p = restore_params(os.path.join(params_dir, "params"), like=like)

    def build(tmp):
        export_hf(
            tmp, config, p, attacker=attacker, allow_attacker_export=allow_attacker, dtype=dtype
        )
        tok = os.path.join(params_dir, "tokenizer")
        if os.path.isdir(tok):
            _copy_tokenizer(tok, tmp)
        _provenance(tmp, source=os.path.abspath(params_dir))

    return _build_aside(out_dir, build, private=attacker)
