"""HTTP clients of the project's OpenAI-compatible servers: ``client`` (pooled httpx client
with a wall-clock deadline per request, retries, fault kinds) and ``replicas`` (least-loaded
healthy replica router, failure-rate warning)."""

from advgame_jax.net.client import (  # noqa: F401
    DEFAULT_TIMEOUT_S,
    Client,
    ClientError,
    ClientOptions,
    DeadlineExceeded,
    FaultCounter,
    HTTPStatusError,
    MalformedResponse,
    Unreachable,
    chat_text,
    check_base_url,
    check_models,
    run_batch,
    served_models,
)
from advgame_jax.net.replicas import FailureRateMonitor, ReplicaRouter  # noqa: F401
