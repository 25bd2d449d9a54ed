"""Plots and a markdown summary of a training run and of evaluations (needs the ``report``
extra: matplotlib).

    python launch/report.py --workdir=runs/tiny --eval=runs/tiny/eval/eval.json \
        --out_dir=runs/tiny/report
    # several checkpoints or runs on one safety-compliance frontier, plus lm-eval utility
    python launch/report.py --eval=/evals/base/eval.json --eval=/evals/step1000/eval.json \
        --lmeval=/evals/step1000/lmeval --out_dir=/evals/report

Logic: ``advgame_jax.evaluation.report``.
"""

from absl import app, flags

flags.DEFINE_string("workdir", "", "Training workdir (metrics.jsonl).")
flags.DEFINE_multi_string("eval", [], "eval.json of launch/eval.py (repeatable).")
flags.DEFINE_multi_string("lmeval", [], "lm-evaluation-harness results JSON or output dir.")
flags.DEFINE_string("out_dir", None, "Where the PNGs and report.md go.")

FLAGS = flags.FLAGS


def main(argv):
    del argv
    from advgame_jax.errors import run_cli
    from advgame_jax.evaluation.report import build_report

    path = run_cli(
        lambda: build_report(
            FLAGS.out_dir, workdir=FLAGS.workdir, eval_paths=FLAGS.eval, lmeval_paths=FLAGS.lmeval
        )
    )
    print(f"wrote {path}")


def run():
    """``advgame-report`` (pyproject.toml): the same as ``python launch/report.py``."""
    flags.mark_flag_as_required("out_dir")
    from advgame_jax.evaluation import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
