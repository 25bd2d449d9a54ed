"""configs/smol.py with SmolLM2-135M-Instruct also as the LLM judge, over the OpenAI API.

Start a server for the judge first (either one; both speak /v1/chat/completions):

    python launch/serve.py --model_dir=$HOME/.cache/advgame_jax/smollm2-135m-instruct-hf \\
        --port=8001 --served_model_name=smollm2 --max_tokens=256
    # or vLLM:  python -m vllm.entrypoints.openai.api_server --port 8001 \\
    #   --model $HOME/.cache/advgame_jax/smollm2-135m-instruct-hf --served-model-name smollm2 \\
    #   --dtype float32 --max-model-len 2048
    python launch/train.py --config=configs/smol_llm_judge.py \\
        --config.judge.endpoints=http://127.0.0.1:8001/v1

The judge reads the smol_v1 (= advgame_v1) rubrics, greedy, with 96 new tokens for its
short explanation and the score tags. A 135M model follows that format rarely (as
launch/eval.py's LLM-rubric classifier, 30 of 32 of its judgments did not parse), so most
judgments are expected to fail (BAD_*_JUDGE, counted in judge/*/failures and named by the
loop's no-signal warning). This config exercises the LLM-judge path with a real model;
configs/smol.py (the rule judge) is the one meant to train.
"""

from advgame_jax.experiment.configs.smol import smol_config


def get_config():
    c = smol_config()
    c.name = "smol_llm_judge"
    c.workdir = "runs/smol_llm_judge"
    c.judge.backend = "endpoint"
    c.judge.model = "smollm2"
    c.judge.endpoints = ()  # required: --config.judge.endpoints=http://host:port/v1
    c.judge.temperature = 0.0
    c.judge.max_new_tokens = 96
    c.judge.timeout_s = 600.0
    c.judge.concurrency = 8
    return c
