"""Serve a checkpoint over an OpenAI-compatible HTTP API with the JAX sampler.

    python launch/serve.py --model_dir=/path/to/hf_dir            # config.json + safetensors + tokenizer
    python launch/serve.py --tiny_random                          # tiny random model, offline demo
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'

The API key is read from --api_key or the ADVGAME_API_KEY environment variable. An exported
attacker checkpoint is refused unless --allow_attacker is given. SIGINT / SIGTERM shut the
server down gracefully. All logic lives in ``advgame_jax.sampling.server``.
"""

import os
import signal
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("model_dir", None, "HF checkpoint dir (save_hf output + tokenizer).")
flags.DEFINE_bool("tiny_random", False, "Serve a tiny random model with the tiny tokenizer.")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (default: loopback only).")
flags.DEFINE_integer("port", 8000, "Port (0 = any free port).")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' (or ADVGAME_API_KEY).")
flags.DEFINE_string("served_model_name", "advgame", "Model id reported by /v1/models.")
flags.DEFINE_bool("allow_attacker", False, "Allow serving an exported attacker checkpoint.")
flags.DEFINE_integer("max_prompt_tokens", 2048, "Longest prompt accepted.")
flags.DEFINE_integer("max_tokens", 1024, "Largest max_tokens a request may ask for.")
flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request gives none.")
flags.DEFINE_integer("max_n", 16, "Most completions one request may ask for (prompts × n).")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body accepted (413 above).")
flags.DEFINE_integer("queue_size", 64, "Requests waiting before new ones get 503.")
flags.DEFINE_integer("max_connections", 32, "Connections served at once (one thread each).")
flags.DEFINE_integer("max_overflow", 32, "Extra connections answered 503 while all are busy.")
flags.DEFINE_integer("listen_backlog", 128, "Connections the kernel queues before accept.")
flags.DEFINE_integer("max_batch_size", 64, "Rows per compiled generate call.")
flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                  "Matmul dtype (default: bf16 on accelerators, fp32 on CPU).")

FLAGS = flags.FLAGS


def main(argv):
    del argv
    from advgame_jax.sampling.server import make_tiny_model_dir

    logging.set_verbosity(logging.INFO)
    if bool(FLAGS.model_dir) == FLAGS.tiny_random:
        raise app.UsageError("give exactly one of --model_dir or --tiny_random")
    with tempfile.TemporaryDirectory(prefix="advgame_tiny_") as tmp:
        model_dir = FLAGS.model_dir or make_tiny_model_dir(tmp)
        _serve(model_dir)


def _serve(model_dir):
    from advgame_jax.sampling.openai_protocol import Limits
    from advgame_jax.sampling.server import (
        AttackerCheckpointError, ServerConfig, serve_model_dir, wait_forever)

    config = ServerConfig(
        host=FLAGS.host, port=FLAGS.port,
        api_key=FLAGS.api_key or os.environ.get("ADVGAME_API_KEY") or None,
        model_name=FLAGS.served_model_name, max_body_bytes=FLAGS.max_body_bytes,
        queue_size=FLAGS.queue_size, max_connections=FLAGS.max_connections,
        max_overflow=FLAGS.max_overflow, listen_backlog=FLAGS.listen_backlog,
        limits=Limits(max_prompt_tokens=FLAGS.max_prompt_tokens, max_tokens=FLAGS.max_tokens,
                      default_max_tokens=min(FLAGS.default_max_tokens, FLAGS.max_tokens),
                      max_n=FLAGS.max_n))
    try:
        server = serve_model_dir(model_dir, config=config, allow_attacker=FLAGS.allow_attacker,
                                 compute_dtype=FLAGS.compute_dtype,
                                 max_batch_size=FLAGS.max_batch_size)
    except AttackerCheckpointError as err:
        raise app.UsageError(str(err)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    logging.info("serving %s as %r at %s%s", model_dir, config.model_name, server.url,
                 " (API key required)" if config.api_key else "")
    wait_forever(server, stop)
    logging.info("server stopped")


if __name__ == "__main__":
    app.run(main)
