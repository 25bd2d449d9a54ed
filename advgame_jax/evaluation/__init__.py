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
    from advgame_jax.evaluation.http_client import EndpointUnreachable
    from advgame_jax.evaluation.prompt_sets import PromptSetError
    from advgame_jax.evaluation.redteam import NotAcknowledged
    from advgame_jax.evaluation.report import ReportError
    from advgame_jax.evaluation.results import ResultsFileError
    from advgame_jax.evaluation.results import RunMismatchError
    from advgame_jax.evaluation.targets import AttackerNotAllowed, TargetError

    from advgame_jax.errors import UserError

    return (UserError, EndpointUnreachable, PromptSetError, NotAcknowledged, ReportError, ResultsFileError,
            RunMismatchError, AttackerNotAllowed, TargetError, FileExistsError)


def run_entry_point(body) -> None:
    """Run a launch script's ``body()``; bad user input becomes one usage line, no trace."""
    from absl import app

    try:
        body()
    except user_errors() as err:
        raise app.UsageError(f"{type(err).__name__}: {err}") from None
