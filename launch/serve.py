"""Serve an HF export over an OpenAI-compatible HTTP API with the JAX sampler.

    python launch/serve.py --model_dir=/path/to/hf_dir            # config.json + safetensors + tokenizer
    python launch/serve.py --tiny_random                          # tiny random model, offline demo
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'

The API key is read from the environment variable named by --api_key_env (default
ADVGAME_API_KEY) or from --api_key_file, never from the command line (where `ps` shows it).
Binding beyond loopback without a key prints a warning. An exported attacker checkpoint is
refused unless --allow_attacker is given. A game checkpoint or training workdir is not
servable: export it first with launch/convert.py. SIGINT / SIGTERM shut the server down
gracefully. All logic lives in ``advgame_jax.sampling.server``.
"""

import ipaddress
import os
import signal
import tempfile
import threading

from absl import app, flags, logging

flags.DEFINE_string("model_dir", None, "HF export (config.json + safetensors + tokenizer).")
flags.DEFINE_bool("tiny_random", False, "Serve a tiny random model with the tiny tokenizer.")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (default: loopback only).")
flags.DEFINE_integer("port", 8000, "Port (0 = any free port).")
flags.DEFINE_string(
    "api_key",
    None,
    "Refused: a key on the command line shows in `ps`; use --api_key_env or --api_key_file.",
)
flags.DEFINE_string("api_key_env", "ADVGAME_API_KEY", "Env var holding the API key, if set.")
flags.DEFINE_string("api_key_file", None, "File holding the API key (first line).")
flags.DEFINE_string("served_model_name", "advgame", "Model id reported by /v1/models.")
flags.DEFINE_bool("allow_attacker", False, "Allow serving an exported attacker checkpoint.")
flags.DEFINE_integer("max_prompt_tokens", 2048, "Longest prompt accepted.")
flags.DEFINE_integer("max_tokens", 1024, "Largest max_tokens a request may ask for.")
flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request gives none.")
flags.DEFINE_integer("max_n", 16, "Most completions one request may ask for (prompts × n).")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body accepted (413 above).")
flags.DEFINE_integer("queue_size", 64, "Requests waiting before new ones get 503 + Retry-After.")
flags.DEFINE_integer("max_batch_requests", 16, "Waiting requests served by one generate call.")
flags.DEFINE_float("read_timeout_s", 30.0, "Deadline for a request's headers + body.")
flags.DEFINE_float("request_timeout_s", 600.0, "Longest wait for a request's generation.")
flags.DEFINE_integer("max_connections", 1024, "Open connections before new ones get 503.")
flags.DEFINE_integer("listen_backlog", 2048, "Connections the kernel queues before accept.")
flags.DEFINE_integer("max_batch_size", 64, "Rows per compiled generate call.")
flags.DEFINE_enum(
    "compute_dtype",
    None,
    ["float32", "bfloat16"],
    "Matmul dtype (default: bf16 on accelerators, fp32 on CPU).",
)

FLAGS = flags.FLAGS
_POSITIVE = (
    "max_prompt_tokens",
    "max_tokens",
    "default_max_tokens",
    "max_n",
    "max_body_bytes",
    "queue_size",
    "max_batch_requests",
    "max_connections",
    "listen_backlog",
    "max_batch_size",
    "read_timeout_s",
    "request_timeout_s",
)


def main(argv):
    del argv
    from advgame_jax.errors import run_cli

    logging.set_verbosity(logging.INFO)
    run_cli(_main)


def _main():
    from advgame_jax.errors import UserError
    from advgame_jax.sampling.servable import make_tiny_model_dir

    if FLAGS.api_key is not None:
        raise UserError(
            "--api_key is refused: a key on the command line shows in `ps`; put "
            f"it in ${FLAGS.api_key_env} or a file given by --api_key_file"
        )
    if bool(FLAGS.model_dir) == FLAGS.tiny_random:
        raise UserError("give exactly one of --model_dir or --tiny_random")
    bad = [f"--{n}={FLAGS[n].value}" for n in _POSITIVE if not FLAGS[n].value > 0]
    if bad or not 0 <= FLAGS.port < 65536:
        raise UserError(
            f"{', '.join(bad) or f'--port={FLAGS.port}'}: expected a positive "
            f"number (a port in [0, 65535])"
        )
    api_key = _api_key()
    if not api_key and not _is_loopback(FLAGS.host):
        logging.warning(
            "serving on %s without an API key: anyone who can reach this port can "
            "generate; set $%s or --api_key_file",
            FLAGS.host,
            FLAGS.api_key_env,
        )
    with tempfile.TemporaryDirectory(prefix="advgame_tiny_") as tmp:
        model_dir = FLAGS.model_dir or make_tiny_model_dir(tmp)
        _serve(model_dir, api_key)


def _api_key():
    from advgame_jax.errors import UserError

    if FLAGS.api_key_file:
        try:
            with open(FLAGS.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"--api_key_file {FLAGS.api_key_file}: cannot read it "
                f"({type(err).__name__}); expected a text file with the key "
                "on its first line"
            ) from None
        if not key:
            raise UserError(
                f"--api_key_file {FLAGS.api_key_file} is empty; expected the key on its first line"
            )
        return key
    return os.environ.get(FLAGS.api_key_env) or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(model_dir, api_key):
    from advgame_jax.sampling.openai_schema import Limits
    from advgame_jax.sampling.server import ServerConfig, serve_model_dir

    config = ServerConfig(
        host=FLAGS.host,
        port=FLAGS.port,
        api_key=api_key,
        model_name=FLAGS.served_model_name,
        max_body_bytes=FLAGS.max_body_bytes,
        queue_size=FLAGS.queue_size,
        max_batch_requests=FLAGS.max_batch_requests,
        read_timeout_s=FLAGS.read_timeout_s,
        request_timeout_s=FLAGS.request_timeout_s,
        max_connections=FLAGS.max_connections,
        listen_backlog=FLAGS.listen_backlog,
        limits=Limits(
            max_prompt_tokens=FLAGS.max_prompt_tokens,
            max_tokens=FLAGS.max_tokens,
            default_max_tokens=min(FLAGS.default_max_tokens, FLAGS.max_tokens),
            max_n=FLAGS.max_n,
        ),
    )
    server = serve_model_dir(
        model_dir,
        config=config,
        allow_attacker=FLAGS.allow_attacker,
        compute_dtype=FLAGS.compute_dtype,
        max_batch_size=FLAGS.max_batch_size,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    logging.info(
        "serving %s as %r at %s%s",
        model_dir,
        config.model_name,
        server.url,
        " (API key required)" if config.api_key else "",
    )
    try:
        while not stop.wait(0.5):  # until a signal; then shut down gracefully
            pass
    finally:
        server.shutdown()
    logging.info("server stopped")


def run():
    """``advgame-serve`` (pyproject.toml): the same as ``python launch/serve.py``."""
    app.run(main)


if __name__ == "__main__":
    run()
