"""Step hooks (``experiment/hooks.py``): cadences, forcing and order, checked against the
steps written out by hand; no model is built."""

from advgame_jax.experiment.hooks import Hooks, StepInfo, WeightSync


def _fired(hooks: Hooks, steps, **info):
    seen: list = []
    for step in steps:
        hooks.run(StepInfo(step=step, state={}, record={"seen": seen}, **info))
    return seen


def test_cadence_first_and_never():
    hooks = Hooks()
    hooks.add(lambda i: i.record["seen"].append(("every3", i.step)), every=3)
    hooks.add(lambda i: i.record["seen"].append(("from1", i.step)), every=3, first=1)
    hooks.add(lambda i: i.record["seen"].append(("never", i.step)), every=0)
    seen = _fired(hooks, range(1, 11))
    assert [s for n, s in seen if n == "every3"] == [3, 6, 9]
    assert [s for n, s in seen if n == "from1"] == [1, 4, 7, 10]
    assert not [s for n, s in seen if n == "never"]


def test_force_runs_an_off_cadence_hook_and_hooks_see_earlier_ones():
    hooks = Hooks()
    hooks.add(lambda i: setattr(i, "stop", i.step == 5), name="agree")
    hooks.add(
        lambda i: i.record["seen"].append(i.step),
        every=4,
        force=lambda i: i.stop or i.step == 7,
        name="save",
    )
    assert _fired(hooks, range(1, 9)) == [4, 5, 7, 8]
    assert hooks.names() == ["agree", "save"]


def test_weight_sync_is_pending_until_it_ran():
    class _Game:  # WeightSync reads nothing of its game until it syncs
        pass

    sync = WeightSync(_Game())  # type: ignore[arg-type]
    assert sync.pending
    hooks = Hooks()
    hooks.add(sync, every=3, first=1, force=lambda _: sync.pending)
    assert [h.due(StepInfo(step=s, state={})) for h in hooks for s in (1, 2, 4)] == [
        True,
        True,  # still pending: no sync has run
        True,
    ]
    sync.pending = False
    assert [h.due(StepInfo(step=s, state={})) for h in hooks for s in (1, 2, 3, 4, 7)] == [
        True,
        False,
        False,
        True,
        True,
    ]
