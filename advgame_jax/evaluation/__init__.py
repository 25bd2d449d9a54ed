"""Evaluation of trained players: safety metrics of a defender on prompt sets (``runner``),
red-teaming with the trained attacker (``redteam``), reports and plots (``report``),
checkpoint conversion (``convert``) and the lm-evaluation-harness path (``lmeval``).

Modules: ``prompt_sets`` (readers of our seed files and public formats), ``classifiers``
(rule / LLM-rubric / served-classifier verdicts), ``metrics`` (rates with bootstrap CIs),
``targets`` (HF dir, game checkpoint or endpoint behind one ``generate``), ``http_client``,
``results`` (private resumable JSONL files).
"""


def user_errors() -> tuple:
    """Exception types that mean bad user input (launch scripts print them without a trace)."""
    from advgame_jax.errors import UserError
    from advgame_jax.evaluation.http_client import EndpointUnreachable
    from advgame_jax.evaluation.prompt_sets import PromptSetError
    from advgame_jax.evaluation.redteam import NotAcknowledged
    from advgame_jax.evaluation.report import ReportError
    from advgame_jax.evaluation.results import ResultsFileError, RunMismatchError
    from advgame_jax.evaluation.targets import AttackerNotAllowed, TargetError

    return (
        UserError,
        EndpointUnreachable,
        PromptSetError,
        NotAcknowledged,
        ReportError,
        ResultsFileError,
        RunMismatchError,
        AttackerNotAllowed,
        TargetError,
        FileExistsError,
    )


def parse_flags(argv):
    """absl ``flags_parser`` of the launch scripts: a bad, unknown or missing flag is one
    ``error:`` line with exit status 2 (no help dump); ``--help`` still prints the help."""
    from absl import flags

    from advgame_jax.errors import fail, one_line

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(f"{one_line(err)} (--helpshort lists the flags)")


def run_entry_point(body) -> None:
    """Run a launch script's ``body()``; bad user input (a ``UserError``, or an
    ``app.UsageError`` raised by the script) becomes one ``error:`` line, exit status 2."""
    from absl import app

    from advgame_jax.errors import fail, one_line

    try:
        body()
    except app.UsageError as err:
        fail(one_line(err))
    except user_errors() as err:
        fail(one_line(err))
