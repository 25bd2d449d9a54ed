"""One contract suite for every sampler placement (``advgame_jax.sampling.base.Sampler``).

Placements: ``jax`` (the in-trainer ``JaxSampler``), ``colocated`` (``VllmSampler``, the vLLM
engine in this process; needs the vllm extra) and ``offloaded`` (``RemoteSampler`` over HTTP,
speaking vLLM's server routes to a stand-in engine that runs the JAX sampler and reads the
committed sync checkpoints the way the worker extension does, so it needs no vLLM; the real
spawned vLLM server runs in test_offloaded_engines.py). Each is checked against transformers'
greedy decoding of the same tiny model: shapes and ids of ``generate``, ``load_weights``
returning increasing versions that change the outputs, the prompt budget answered with the
game's MAX_LENGTH error (empty completions, finish "length", counted), and ``stats()``.

A grep test keeps ``hasattr`` / ``getattr`` dispatch on samplers out of the library.
"""

import ast
import http.server
import itertools
import json
import pathlib
import threading

import jax.numpy as jnp
import pytest

from advgame_jax.models import load_hf
from advgame_jax.sampling import InMemoryWeights, SamplingParams, SyncCheckpoint
from advgame_jax.sampling.base import STAT_KEYS
from advgame_jax.sampling.jax_sampler import JaxSampler
from advgame_jax.sampling.weight_sync import read_sync_checkpoint, write_sync_checkpoint
from tests.test_engine_process import _FakeEngine
from tests.test_sampling_jax import _hf_greedy, _prompts
from tests.test_vllm_sampler import skip_without_vllm
from tests.tiny_models import make_tiny_llama

N_NEW = 6
BUDGET, CONTEXT = 32, 64  # prompt budget and (vLLM) context of every placement here
PROMPT_LENS = (3, 9, 17)
_versions = itertools.count(1)  # one increasing sequence for the whole module
# Every JAX program here (the jax placement's and the stand-in engine's) falls in one bucket:
# batch <= 8, prompt <= 64, <= 16 new tokens, no top-k / top-p filter: one compilation.
BUCKETS = dict(min_batch_bucket=8, min_prompt_bucket=64, min_new_bucket=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = make_tiny_llama(root / name, seed=seed)
        out[name] = (str(root / name), model, load_hf(root / name)[1])
    return root, out


class _Placement:
    """A sampler under test and how its placement names new weights."""

    def __init__(self, sampler, weights, close=()):
        self.sampler, self.weights, self._close = sampler, weights, close

    def close(self):
        self.sampler.close()
        for c in self._close:
            c()


def _sync_ref(root):
    def weights(params, version):
        path = write_sync_checkpoint(
            str(root / "sync"), params, version=version, role="defender", dtype=jnp.float32
        )
        return SyncCheckpoint(path, version)

    return weights


def _jax(root, models):
    hf_dir, _, params = models["a"]
    sampler = JaxSampler(
        model_config(hf_dir), params, compute_dtype="float32", max_prompt_len=BUDGET, **BUCKETS
    )
    return _Placement(sampler, lambda p, v: InMemoryWeights(p, v))


def _colocated(root, models):
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    sampler = VllmSampler(
        models["a"][0],
        dtype="float32",
        kv_cache_memory_bytes=32 << 20,
        max_model_len=CONTEXT,
        prompt_budget=BUDGET,
        enforce_eager=True,
    )
    return _Placement(sampler, _sync_ref(root))


def _offloaded(root, models):
    from advgame_jax.sampling.engines import EngineClient, RemoteSampler

    hf_dir, _, params = models["a"]
    config = model_config(hf_dir)
    engine = _StandInEngine.serve(JaxSampler(config, params, compute_dtype="float32", **BUCKETS))
    client = EngineClient("defender", engine.url)
    sampler = RemoteSampler(client, config, prompt_budget=BUDGET)
    return _Placement(sampler, _sync_ref(root), close=(engine.shutdown,))


def model_config(hf_dir):
    from advgame_jax.models import ModelConfig

    with open(pathlib.Path(hf_dir) / "config.json") as f:
        return ModelConfig.from_hf_dict(json.load(f))


PLACEMENTS = {
    "jax": _jax,
    "colocated": _colocated,
    "offloaded": _offloaded,
}


@pytest.fixture(
    scope="module",
    params=[
        "jax",
        pytest.param("colocated", marks=[pytest.mark.vllm, skip_without_vllm]),
        "offloaded",
    ],
)
def placement(request, models):
    root, m = models
    p = PLACEMENTS[request.param](root / request.param, m)
    # Every test starts from model "a" under a fresh version.
    p.sampler.load_weights(p.weights(m["a"][2], next(_versions)))
    yield p
    p.close()


# ---------------------------------------------------------------------------------- contract
def test_generate_matches_transformers_and_is_grouped_by_prompt(placement, models):
    _, m = models
    model = m["a"][1]
    s = placement.sampler
    version = s.stats()["weights_version"]
    prompts = _prompts(model.config.vocab_size, lens=PROMPT_LENS)
    greedy = s.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=N_NEW))
    assert [c.token_ids for c in greedy] == _hf_greedy(model, prompts, N_NEW)
    sp = SamplingParams(temperature=1.0, max_new_tokens=N_NEW, n=2, seed=4)
    out = s.generate(prompts, sp)
    assert len(out) == len(prompts) * 2
    for c in out:
        assert 1 <= len(c.token_ids) <= N_NEW and len(c.logprobs) == len(c.token_ids)
        assert all(0 <= t < model.config.vocab_size for t in c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.finish_reason == "length"  # no stop ids
        assert c.weights_version == version  # stamped by the sampler itself
    assert [c.token_ids for c in s.generate(prompts, sp)] == [c.token_ids for c in out]


def test_load_weights_returns_increasing_versions_and_changes_outputs(placement, models):
    _, m = models
    s = placement.sampler
    prompts = _prompts(m["a"][1].config.vocab_size, lens=PROMPT_LENS)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
    before, loads = s.stats()["weights_version"], s.stats()["loads"]
    v_b = next(_versions)
    assert s.load_weights(placement.weights(m["b"][2], v_b)) == v_b > before
    got_b = s.generate(prompts, greedy)
    assert [c.token_ids for c in got_b] == _hf_greedy(m["b"][1], prompts, N_NEW)
    assert {c.weights_version for c in got_b} == {v_b}
    v_a = next(_versions)
    assert s.load_weights(placement.weights(m["a"][2], v_a)) == v_a > v_b
    got_a = s.generate(prompts, greedy)
    assert [c.token_ids for c in got_a] == _hf_greedy(m["a"][1], prompts, N_NEW)
    assert [c.token_ids for c in got_a] != [c.token_ids for c in got_b]
    assert {c.weights_version for c in got_a} == {v_a}
    assert s.stats()["loads"] == loads + 2 and s.stats()["weights_version"] == v_a


def test_a_reference_of_another_placement_is_refused(placement, models):
    _, m = models
    s = placement.sampler
    own = placement.weights(m["a"][2], 10**6)
    other = SyncCheckpoint("/nonexistent") if isinstance(own, InMemoryWeights) else None
    other = other or InMemoryWeights(m["a"][2], 10**6)
    before = s.stats()
    with pytest.raises(TypeError, match="loads weights only from"):
        s.load_weights(other)
    assert s.stats() == before


def test_prompt_budget_is_the_games_max_length_error(placement, models):
    _, m = models
    s = placement.sampler
    assert s.prompt_budget == BUDGET
    vocab = m["a"][1].config.vocab_size
    fits, over = _prompts(vocab, seed=3, lens=(BUDGET, BUDGET + 1))
    sp = SamplingParams(temperature=0.0, max_new_tokens=2, n=2)
    counted = s.stats()["prompt_too_long"]
    got = s.generate([fits, over, fits[:4]], sp)
    assert len(got) == 6 and s.stats()["prompt_too_long"] == counted + 1
    assert [len(c.token_ids) for c in got[:2]] == [2, 2]
    for c in got[2:4]:  # GAME_SPEC: finish reason not "stop" -> MAX_LENGTH for the slot
        assert (c.token_ids, c.logprobs, c.text, c.finish_reason) == ((), (), "", "length")
        assert c.weights_version == s.stats()["weights_version"]
    assert [c.token_ids for c in got[4:]] == [c.token_ids for c in s.generate([fits[:4]], sp)]


def test_stats_report_the_contract_counters(placement):
    stats = placement.sampler.stats()
    assert set(STAT_KEYS) <= set(stats)
    assert isinstance(stats["prompt_too_long"], int) and isinstance(stats["loads"], int)
    assert isinstance(stats["weights_version"], int) and stats["loads"] >= 1


# ---------------------------------------------------------------------------------- stand-in
class _StandInEngine(_FakeEngine):
    """vLLM's server routes as ``RemoteSampler`` uses them (engines.py's docstring), over a
    ``JaxSampler``: ``advgame_load_sync`` reads the committed sync checkpoint, as the worker
    extension does, and every token is labelled with the version last set. The transport and
    the GET routes are those of test_engine_process's scripted engine."""

    sampler: JaxSampler
    version = "default"
    max_model_len = CONTEXT
    lock = threading.Lock()

    @classmethod
    def serve(cls, sampler):
        handler = type("Engine", (cls,), {"sampler": sampler, "lock": threading.Lock()})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        return server

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"null")
        path = self.path.split("?")[0]
        if path == "/collective_rpc":
            version, params = read_sync_checkpoint(body["args"][0])
            with cls.lock:
                cls.sampler.load_weights(InMemoryWeights(params, version, copy=False))
            return self._send({"results": [str(version)]})
        if path == "/update_weight_version":
            cls.version = body["new_version"]
        if path == "/inference/v1/generate":
            return self._send(self._generate(body))
        return self._send(None)

    def _generate(self, body):
        cls, p = type(self), body["sampling_params"]
        sp = SamplingParams(
            temperature=p["temperature"],
            top_p=p["top_p"],
            top_k=max(p["top_k"], 0),
            max_new_tokens=p["max_tokens"],
            stop_token_ids=tuple(p["stop_token_ids"]),
            n=p["n"],
            seed=p.get("seed", 0),
        )
        with cls.lock:
            out = cls.sampler.generate([body["token_ids"]], sp)
        choices = []
        for i, c in enumerate(out):
            choices.append(
                {
                    "index": i,
                    "token_ids": list(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "logprobs": {"content": [{"logprob": lp} for lp in c.logprobs]},
                    "weight_versions": [
                        {"version": cls.version, "start": 0, "end": len(c.token_ids)}
                    ],
                }
            )
        return {"choices": choices}


# ---------------------------------------------------------------------------------- no dispatch
# ``hasattr`` / ``getattr`` calls allowed in the files that build, wrap or call samplers: each
# probes an object that is not one of our samplers (vLLM's engine internals, Orbax metadata,
# vLLM's model and parameter objects, a tokenizer). Anything else there that dispatches on an
# attribute's presence breaks the one-contract rule.
ALLOWED_SOURCE = {
    # vLLM's V1 engine core has a shutdown(); other engines do not (VllmSampler.close).
    "sampling/vllm_sampler.py": [
        'getattr(getattr(llm, "llm_engine", None), "engine_core", None)',
        'getattr(llm, "llm_engine", None)',
        'hasattr(core, "shutdown")',
    ],
    # A dtype or an array; Orbax metadata; vLLM's model / parameter objects (the tied head).
    "sampling/weight_sync.py": [
        'hasattr(dtype, "dtype")',
        'getattr(tree, "item_metadata", tree)',
        'getattr(tree, "tree", tree)',
        'getattr(model, "lm_head", None)',
        'hasattr(head, "weight")',
        'getattr(head.weight, "weight_loader", default_weight_loader)',
    ],
    "sampling/checkpoints.py": [
        'getattr(meta, "item_metadata", meta)',
        'getattr(meta, "tree", meta)',
        "getattr(m, 'name', '?')",
        'getattr(ref, "sharding", None)',
    ],
}
ALLOWED = {
    (rel, ast.unparse(ast.parse(src))) for rel, srcs in ALLOWED_SOURCE.items() for src in srcs
}
# Files whose every probe must be allowlisted; elsewhere, no probe may name a sampler-like
# object (its first argument's text mentions one of SAMPLER_WORDS).
SAMPLER_FILES = ("sampling/", "experiment/players.py", "experiment/timing.py")
SAMPLER_WORDS = ("sampler", "inner", "engine", "player")


def _attribute_probes(root):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
                and node.args
            ):
                yield rel, ast.unparse(node), ast.unparse(node.args[0])


def test_no_attribute_dispatch_on_samplers():
    root = pathlib.Path(__file__).resolve().parents[1] / "advgame_jax"
    probes = list(_attribute_probes(root))
    assert len(probes) > len(ALLOWED), "the scan is not reading the library"
    named = [
        (rel, call)
        for rel, call, first in probes
        if any(w in first.lower() for w in SAMPLER_WORDS) and (rel, call) not in ALLOWED
    ]
    assert named == [], f"attribute dispatch on samplers: {named}"
    in_sampler_files = [
        (rel, call)
        for rel, call, _ in probes
        if rel.startswith(SAMPLER_FILES) and (rel, call) not in ALLOWED
    ]
    assert in_sampler_files == [], f"hasattr/getattr where samplers live: {in_sampler_files}"
    # Every allowlisted call exists (a stale entry would only hide a future one).
    assert ALLOWED <= {(rel, call) for rel, call, _ in probes}
