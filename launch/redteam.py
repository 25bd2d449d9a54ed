"""Red-team a target model with the trained attacker (a controlled artifact: needs
--acknowledge_controlled_artifact).

    # offline default: the tiny run's attacker against its defender served on loopback
    python launch/serve.py --model_dir=runs/tiny/export/defender_ema --port=8011 &
    python launch/redteam.py --acknowledge_controlled_artifact \
        --attacker_checkpoint=runs/tiny --templates=toy_v1 --attacker_format=any \
        --target_endpoint=http://127.0.0.1:8011/v1 \
        --set=seeds:advgame_jax/data/assets/toy_valid.jsonl --out_dir=runs/tiny/redteam

    # a real attacker export against any OpenAI-compatible target, LLM-judged
    python launch/redteam.py --acknowledge_controlled_artifact \
        --attacker_hf_dir=/ckpt/qwen_dpo_md/export/attacker_ema \
        --target_endpoint=https://api.example.com/v1 --target_endpoint_model=target-model \
        --classifier=rubric --classifier_endpoint=http://judge:8000/v1 --classifier_model=judge \
        --faithfulness=judge --faith_endpoint=http://judge:8000/v1 --faith_model=judge \
        --set=harmbench:/data/harmbench_behaviors_text_test.csv --num_attempts=8 \
        --out_dir=/redteam/run1

Outputs (``advgame_jax.evaluation.redteam``): results.jsonl and successes.jsonl (mode 0600),
redteam.json and redteam.md (ASR per category, best-of-N).
"""

import os

from absl import app, flags

flags.DEFINE_bool(
    "acknowledge_controlled_artifact",
    False,
    "Confirm this is authorised red-teaming with a controlled attacker artifact.",
)
flags.DEFINE_multi_string("set", [], "Seed set(s) [NAME=]KIND:PATH; harmful prompts are used.")
flags.DEFINE_string("out_dir", None, "Output directory.")
for _who in ("attacker", "target"):
    flags.DEFINE_string(f"{_who}_hf_dir", "", f"{_who} as an HF directory.")
    flags.DEFINE_string(f"{_who}_checkpoint", "", f"{_who} from a game checkpoint.")
    flags.DEFINE_string(f"{_who}_endpoint", "", f"{_who} behind an OpenAI-compatible URL.")
    flags.DEFINE_string(f"{_who}_endpoint_model", "advgame", f"Model name at the {_who} endpoint.")
    flags.DEFINE_enum(f"{_who}_params", "ema", ["ema", "trained"], "EMA or trained params.")
    flags.DEFINE_string(f"{_who}_base_hf_dir", "", "Architecture + tokenizer for a checkpoint.")
flags.DEFINE_integer("num_attempts", 4, "Attacker rewrites per seed (best-of-N).")
flags.DEFINE_string("templates", "advgame_v1", "Game template set of the attacker prompt.")
flags.DEFINE_string("attacker_format", "think_prompt_strict", "Attack format to parse.")
flags.DEFINE_float("attacker_temperature", 0.6, "Attacker sampling temperature.")
flags.DEFINE_float("attacker_top_p", 0.9, "Attacker nucleus sampling.")
flags.DEFINE_integer("attacker_max_new_tokens", 1024, "Longest attacker output.")
flags.DEFINE_integer("target_max_new_tokens", 256, "Longest target response (greedy).")
flags.DEFINE_enum("faithfulness", "none", ["none", "rule", "judge"], "Faithfulness filter.")
flags.DEFINE_string("faith_endpoint", "", "Judge URL for --faithfulness=judge.")
flags.DEFINE_string("faith_model", "", "Judge model for --faithfulness=judge.")
flags.DEFINE_enum("classifier", "rule", ["rule", "rubric", "template"], "Safety classifier.")
flags.DEFINE_string("classifier_endpoint", "", "Classifier base URL.")
flags.DEFINE_string("classifier_model", "", "Classifier model name.")
flags.DEFINE_string("classifier_template", "", "Template file with {prompt} and {response}.")
flags.DEFINE_enum("classifier_output", "labels", ["labels", "yes_no"], "Classifier answer format.")
flags.DEFINE_string("api_key_env", "", "Env var holding an API key for the endpoints.")
flags.DEFINE_float(
    "request_timeout_s",
    300.0,
    "Wall-clock deadline of one request to an "
    "endpoint (target, attacker, classifier, faithfulness judge), retries "
    "included; past it the attempt counts as a failure.",
)
flags.DEFINE_integer("seed", 0, "Run seed.")
flags.DEFINE_integer("limit", 0, "Keep the first N seeds of each set (0 = all).")

FLAGS = flags.FLAGS


def _target(who, api_key, **kw):
    from advgame_jax.evaluation.targets import TargetSpec, load_target

    spec = TargetSpec(
        hf_dir=FLAGS[f"{who}_hf_dir"].value,
        checkpoint=FLAGS[f"{who}_checkpoint"].value,
        endpoint=FLAGS[f"{who}_endpoint"].value,
        endpoint_model=FLAGS[f"{who}_endpoint_model"].value,
        params=FLAGS[f"{who}_params"].value,
        base_hf_dir=FLAGS[f"{who}_base_hf_dir"].value,
        api_key=api_key,
        field=f"{who}_",
        timeout_s=FLAGS.request_timeout_s,
        **kw,
    )
    return load_target(spec)


def _check_flags():
    """Every numeric and named flag, before any set, endpoint or model is touched."""
    from advgame_jax.evaluation import runner, targets
    from advgame_jax.game.parsing import FORMATS
    from advgame_jax.game.templates import get_template_set

    if FLAGS.num_attempts < 1:
        raise app.UsageError(f"--num_attempts={FLAGS.num_attempts}: expected an integer >= 1")
    if FLAGS.attacker_format not in FORMATS:
        raise app.UsageError(
            f"--attacker_format={FLAGS.attacker_format!r}: expected one of {list(FORMATS)}"
        )
    get_template_set(FLAGS.templates)  # an unknown name lists the known ones
    for who, decoding in (
        (
            "attacker_",
            targets.Decoding(
                FLAGS.attacker_temperature, FLAGS.attacker_top_p, FLAGS.attacker_max_new_tokens
            ),
        ),
        ("target_", targets.Decoding(0.0, 1.0, FLAGS.target_max_new_tokens)),
    ):
        try:
            runner.check_settings(
                batch_size=1, num_resamples=1, decoding=decoding, limit=FLAGS.limit
            )
        except runner.EvalSettingsError as err:  # name this script's flag
            raise app.UsageError(
                str(err).replace("--", f"--{who}", 1) if "--limit" not in str(err) else str(err)
            ) from None


def main(argv):
    del argv
    from advgame_jax.evaluation import run_entry_point

    run_entry_point(_main)


def _main():
    from advgame_jax.evaluation import classifiers, prompt_sets, redteam, targets
    from advgame_jax.experiment.logsetup import quiet_console

    quiet_console()  # no Orbax/library chatter or tracebacks on the console
    redteam.require_ack(FLAGS.acknowledge_controlled_artifact)  # before anything is loaded
    _check_flags()
    if not FLAGS.set:
        raise app.UsageError("give at least one --set=[NAME=]KIND:PATH of harmful seeds")
    if not FLAGS.request_timeout_s > 0:
        raise app.UsageError(
            f"--request_timeout_s: expected seconds > 0, got {FLAGS.request_timeout_s}"
        )
    api_key = os.environ.get(FLAGS.api_key_env) if FLAGS.api_key_env else None
    sets = prompt_sets.load_prompt_sets(FLAGS.set, limit=FLAGS.limit or None)
    clf = classifiers.make_classifier(
        FLAGS.classifier,
        classifiers.EndpointSpec(
            FLAGS.classifier_endpoint,
            FLAGS.classifier_model,
            api_key=api_key,
            timeout_s=FLAGS.request_timeout_s,
        ),
        template_path=FLAGS.classifier_template,
        output=FLAGS.classifier_output,
        seed=FLAGS.seed,
    )
    judge = None
    if FLAGS.faithfulness == "judge":
        from advgame_jax import game
        from advgame_jax.game.endpoint import EndpointBackend

        backend = EndpointBackend(
            [FLAGS.faith_endpoint],
            FLAGS.faith_model,
            api_key=api_key,
            temperature=0.0,
            max_tokens=2048,
            timeout_s=FLAGS.request_timeout_s,
        )
        backend.check_endpoints()
        judge = game.LLMJudge(backend, game.get_template_set(FLAGS.templates))
    target = _target("target", api_key)
    attacker = _target("attacker", api_key, player="attacker", allow_attacker=True)
    cfg = redteam.RedteamConfig(
        num_attempts=FLAGS.num_attempts,
        templates=FLAGS.templates,
        attacker_format=FLAGS.attacker_format,
        faithfulness=FLAGS.faithfulness,
        attacker_decoding=targets.Decoding(
            FLAGS.attacker_temperature, FLAGS.attacker_top_p, FLAGS.attacker_max_new_tokens
        ),
        target_decoding=targets.Decoding(0.0, 1.0, FLAGS.target_max_new_tokens),
        seed=FLAGS.seed,
    )
    seeds = [e for s in sets for e in s.examples]
    players = redteam.RedteamPlayers(attacker, target, clf, judge)
    m = redteam.run_redteam(seeds, players, FLAGS.out_dir, cfg=cfg, acknowledged=True)
    o = m["overall"]
    print(
        f"attempt ASR {o['attempt_asr']['value']}, best-of-{FLAGS.num_attempts} ASR "
        f"{o['best_of_n_asr']['value']} over {o['num_seeds']} seeds; "
        f"see {os.path.join(FLAGS.out_dir, 'redteam.md')}"
    )


def run():
    """``advgame-redteam`` (pyproject.toml): the same as ``python launch/redteam.py``."""
    flags.mark_flag_as_required("out_dir")
    from advgame_jax.evaluation import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
