"""Convert checkpoints: game checkpoint → HF dir, HF dir → Orbax params, Orbax params → HF dir.

    # the defender's EMA params of the latest checkpoint of a run, as an HF directory
    python launch/convert.py --mode=checkpoint_to_hf --checkpoint=runs/tiny \
        --player=defender --params=ema --out_dir=runs/tiny/export/defender_ema
    # an HF model as initial params (Orbax) and back
    python launch/convert.py --mode=hf_to_params --hf_dir=/models/Qwen2.5-7B-Instruct --out_dir=/ckpt/init
    python launch/convert.py --mode=params_to_hf --params_dir=/ckpt/init --out_dir=/models/copy
    # a Llama/Qwen2 GGUF (llama.cpp) as an HF directory (extra `real-model`; models/gguf.py)
    python launch/convert.py --mode=gguf_to_hf --gguf=model.Q4_1.gguf --out_dir=/models/hf

The trained attacker is a controlled artifact: converting it needs --allow_attacker, and
every output made from it carries the attacker marker. Outputs are built aside and renamed
into place; an existing --out_dir is refused. Logic: ``advgame_jax.evaluation.convert``.
"""

from absl import app, flags

flags.DEFINE_enum(
    "mode",
    None,
    ["checkpoint_to_hf", "hf_to_params", "params_to_hf", "gguf_to_hf"],
    "What to convert.",
)
flags.DEFINE_string("out_dir", None, "New output directory.")
flags.DEFINE_string("checkpoint", "", "Game checkpoint: training workdir, checkpoints/ or a step.")
flags.DEFINE_enum("player", "defender", ["defender", "attacker"], "Player to export.")
flags.DEFINE_enum("params", "ema", ["ema", "trained"], "EMA or trained params.")
flags.DEFINE_string("base_hf_dir", "", "Architecture + tokenizer (default: from the checkpoint).")
flags.DEFINE_string("hf_dir", "", "HF directory (hf_to_params).")
flags.DEFINE_string("gguf", "", "GGUF file (gguf_to_hf).")
flags.DEFINE_string("params_dir", "", "hf_to_params output (params_to_hf).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Stored dtype of an HF export.")
flags.DEFINE_bool("allow_attacker", False, "Allow converting the trained attacker.")

FLAGS = flags.FLAGS


def main(argv):
    del argv
    from advgame_jax.evaluation import run_entry_point

    run_entry_point(_main)


def _main():
    from advgame_jax.evaluation import convert
    from advgame_jax.experiment.logsetup import quiet_console

    quiet_console()  # no Orbax/library chatter or tracebacks on the console
    if FLAGS.mode == "gguf_to_hf":
        from advgame_jax.models.gguf import gguf_to_hf

        print(f"wrote {gguf_to_hf(FLAGS.gguf, FLAGS.out_dir, dtype=FLAGS.dtype or 'float32')}")
        return
    if FLAGS.mode == "checkpoint_to_hf":
        out = convert.checkpoint_to_hf(
            FLAGS.checkpoint,
            FLAGS.out_dir,
            player=FLAGS.player,
            params=FLAGS.params,
            base=FLAGS.base_hf_dir,
            allow_attacker=FLAGS.allow_attacker,
            dtype=FLAGS.dtype,
        )
    elif FLAGS.mode == "hf_to_params":
        out = convert.hf_to_params(FLAGS.hf_dir, FLAGS.out_dir, allow_attacker=FLAGS.allow_attacker)
    else:
        out = convert.params_to_hf(
            FLAGS.params_dir, FLAGS.out_dir, allow_attacker=FLAGS.allow_attacker, dtype=FLAGS.dtype
        )
    print(f"wrote {out}")


def run():
    """``advgame-convert`` (pyproject.toml): the same as ``python launch/convert.py``."""
    flags.mark_flags_as_required(["mode", "out_dir"])
    from advgame_jax.evaluation import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
