"""Safety evaluation of a defender: ASR, refusal, benign compliance / over-refusal per prompt set.

    # the offline default's checkpoint (defender EMA params), toy validation seeds, rule judge
    python launch/eval.py --checkpoint=runs/tiny --out_dir=runs/tiny/eval \
        --set=toy=seeds:advgame_jax/data/assets/toy_valid.jsonl

    # a real defender served by launch/serve.py or vLLM, judged by an LLM with our rubric
    python launch/eval.py --endpoint=http://127.0.0.1:8000/v1 --endpoint_model=advgame \
        --classifier=rubric --classifier_endpoint=http://judge:8000/v1 \
        --classifier_model=Qwen2.5-32B-Instruct --out_dir=/evals/step1000 \
        --set=harmbench:/data/harmbench_behaviors_text_test.csv \
        --set=wjb=wildjailbreak:/data/wildjailbreak/eval.tsv --set=xstest:/data/xstest.csv

Targets: exactly one of --hf_dir, --checkpoint (a training workdir or checkpoint; --player,
--params), --endpoint. Sets: ``[NAME=]KIND:PATH`` (kinds in
``advgame_jax/evaluation/prompt_sets.py``). Greedy decoding by default; results resume from
``<out_dir>/results.jsonl`` (mode 0600). All logic is in ``advgame_jax.evaluation``.
"""

import os

from absl import app, flags

flags.DEFINE_multi_string("set", [], "Prompt set [NAME=]KIND:PATH (repeatable).")
flags.DEFINE_string("out_dir", None, "Where results.jsonl, eval.json and eval.md go.")
flags.DEFINE_string("hf_dir", "", "Defender as a Hugging Face directory.")
flags.DEFINE_string("checkpoint", "", "Defender from a game checkpoint (workdir or step dir).")
flags.DEFINE_string("endpoint", "", "Defender behind an OpenAI-compatible base URL (…/v1).")
flags.DEFINE_string("endpoint_model", "advgame", "Model name at --endpoint.")
flags.DEFINE_enum("player", "defender", ["defender", "attacker"], "Player of --checkpoint.")
flags.DEFINE_enum("params", "ema", ["ema", "trained"], "EMA or trained params of --checkpoint.")
flags.DEFINE_string(
    "base_hf_dir",
    "",
    "Architecture + tokenizer for --checkpoint (default: read from the checkpoint's config).",
)
flags.DEFINE_bool("allow_attacker", False, "Allow evaluating a trained attacker.")
flags.DEFINE_enum("classifier", "rule", ["rule", "rubric", "template"], "Safety classifier.")
flags.DEFINE_string("classifier_endpoint", "", "Classifier base URL (rubric/template).")
flags.DEFINE_string("classifier_model", "", "Classifier model name at the endpoint.")
flags.DEFINE_enum("classifier_api", "chat", ["chat", "completions"], "Classifier API.")
flags.DEFINE_string("classifier_template", "", "Template file with {prompt} and {response}.")
flags.DEFINE_enum(
    "classifier_output", "labels", ["labels", "yes_no"], "How to read the classifier's answer."
)
flags.DEFINE_string("api_key_env", "", "Env var holding an API key for the endpoints.")
flags.DEFINE_float(
    "request_timeout_s",
    300.0,
    "Wall-clock deadline of one request to an "
    "endpoint (--endpoint, --classifier_endpoint), retries included; past it "
    "the example counts as a failure.",
)
flags.DEFINE_integer("seed", 0, "Run seed (per-example sampling seeds derive from it).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy (default).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling.")
flags.DEFINE_integer("max_new_tokens", 256, "Longest response.")
flags.DEFINE_integer("limit", 0, "Keep the first N examples of each set (0 = all).")
flags.DEFINE_integer("batch_size", 32, "Examples per generate + classify batch.")
flags.DEFINE_integer("num_resamples", 1000, "Bootstrap resamples for the CIs.")
flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "In-process matmul dtype.")

FLAGS = flags.FLAGS


def main(argv):
    del argv
    from advgame_jax.evaluation import run_entry_point

    run_entry_point(_main)


def _max_positions():
    """``max_position_embeddings`` of the in-process defender (its config.json only; no
    weights are read), or None for an endpoint."""
    from advgame_jax.evaluation import targets
    from advgame_jax.models import ModelConfig

    if FLAGS.endpoint or not (FLAGS.hf_dir or FLAGS.checkpoint):
        return None
    if FLAGS.hf_dir:
        hf, field = FLAGS.hf_dir, "--hf_dir"
    else:
        step_dir = targets.find_step_dir(FLAGS.checkpoint)
        hf = targets.resolve_base_hf_dir(step_dir, FLAGS.player, FLAGS.base_hf_dir)
        field = "--base_hf_dir"
    targets.check_hf_dir(hf, field)
    try:
        return ModelConfig.from_hf_file(os.path.join(hf, "config.json")).max_position_embeddings
    except ValueError as err:
        raise targets.TargetError(f"{field} {hf!r}: unsupported model config ({err})") from None


def _main():
    from advgame_jax.evaluation import classifiers, prompt_sets, runner, targets
    from advgame_jax.experiment.logsetup import quiet_console

    quiet_console()  # no Orbax/library chatter or tracebacks on the console
    if not FLAGS.set:
        raise app.UsageError("give at least one --set=[NAME=]KIND:PATH")
    if not FLAGS.request_timeout_s > 0:
        raise app.UsageError(
            f"--request_timeout_s: expected seconds > 0, got {FLAGS.request_timeout_s}"
        )
    decoding = targets.Decoding(FLAGS.temperature, FLAGS.top_p, FLAGS.max_new_tokens)
    # Every flag first (no model, endpoint or file is touched before the numbers are right),
    # then every set file, then the classifier endpoint, then the target.
    runner.check_settings(
        batch_size=FLAGS.batch_size,
        num_resamples=FLAGS.num_resamples,
        decoding=decoding,
        limit=FLAGS.limit,
    )
    runner.check_settings(
        batch_size=FLAGS.batch_size,
        num_resamples=FLAGS.num_resamples,
        decoding=decoding,
        limit=FLAGS.limit,
        max_positions=_max_positions(),
    )
    api_key = os.environ.get(FLAGS.api_key_env) if FLAGS.api_key_env else None
    sets = prompt_sets.load_prompt_sets(FLAGS.set, limit=FLAGS.limit or None)
    clf = classifiers.make_classifier(
        FLAGS.classifier,
        classifiers.EndpointSpec(
            FLAGS.classifier_endpoint,
            FLAGS.classifier_model,
            api=FLAGS.classifier_api,
            api_key=api_key,
            timeout_s=FLAGS.request_timeout_s,
        ),
        template_path=FLAGS.classifier_template,
        output=FLAGS.classifier_output,
        seed=FLAGS.seed,
    )
    target = targets.load_target(
        targets.TargetSpec(
            hf_dir=FLAGS.hf_dir,
            checkpoint=FLAGS.checkpoint,
            endpoint=FLAGS.endpoint,
            endpoint_model=FLAGS.endpoint_model,
            player=FLAGS.player,
            params=FLAGS.params,
            base_hf_dir=FLAGS.base_hf_dir,
            allow_attacker=FLAGS.allow_attacker,
            api_key=api_key,
            compute_dtype=FLAGS.compute_dtype,
            timeout_s=FLAGS.request_timeout_s,
        )
    )
    out = runner.run_eval(
        sets,
        target,
        clf,
        FLAGS.out_dir,
        runner.EvalSettings(
            seed=FLAGS.seed,
            decoding=decoding,
            batch_size=FLAGS.batch_size,
            num_resamples=FLAGS.num_resamples,
        ),
    )
    from advgame_jax.evaluation.metrics import markdown_table

    print(markdown_table(out))
    print(f"wrote {os.path.join(FLAGS.out_dir, 'eval.json')}")


def run():
    """``advgame-eval`` (pyproject.toml): the same as ``python launch/eval.py``."""
    flags.mark_flag_as_required("out_dir")
    from advgame_jax.evaluation import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
