"""The AdvGame training loop (GAME_SPEC §2): what ``launch/train.py`` runs.

One trainer step:
  1. sync each player's sampler from its EMA (MD variants) or trained params, every
     ``train.sync_every_n_steps`` steps (and right after a resume);
  2. for the harmful split, then the benign split: play a B×A×D rollout tree, turn it into
     preference pairs (DPO / IPO) or GRPO samples, and make one optimizer update per trained
     player;
  3. one EMA update per trained player;
  4. every ``train.validate_every`` steps (and at step 0): the defender answers validation
     seeds directly, judged against the seeds (GAME_SPEC §4);
  5. one metrics record, and a checkpoint every ``train.checkpoint_every`` steps.

Resume: the latest checkpoint in ``<workdir>/checkpoints`` (both players' params, optimizer
states and EMA, the RNG key, data-iterator positions, the config) is restored automatically,
and ``metrics.jsonl`` is cut back to that step, so a resumed run writes exactly what an
uninterrupted one would (per-step sampling seeds derive from ``(config.seed, step)``).
SIGTERM / SIGINT finish the current step, save a checkpoint and exit cleanly. A finished run
is continued in a new workdir with ``config.init_from`` (``experiment.init_from``). One run per
workdir: ``locking.DirLock`` refuses a second one while the first is alive.

Faults are caught where they happen: the workdir is proven writable before any model loads;
a checkpoint written under another config is refused (differing fields named, nothing
touched; fields marked resumable in ``advgame_jax.settings`` may change between runs); a failed background save stops the
run at the next step boundary, naming the step; a non-finite loss or gradient skips that
update (``<split>/<role>/skipped_nonfinite``); a prompt longer than a sampler's budget is the
game's MAX_LENGTH error for its slot (``sys/<role>/prompt_too_long``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from advgame_jax import fsutil, game, locking
from advgame_jax.data import SeedIterator
from advgame_jax.experiment import compile_counter, hosts
from advgame_jax.experiment.metrics import MetricsWriter, truncate_metrics
from advgame_jax.experiment.players import (
    Player,
    build_player,
    close_player,
    initial_state,
    resolve_mesh,
    sync_sampler,
)
from advgame_jax.experiment.timing import StageTimer, TimedJudge, TimedSampler
from advgame_jax.experiment.validate import (
    ADDED_FIELDS,
    RESUMABLE_FIELDS,
    ConfigError,
    Settings,
    game_config_from_experiment,
    settings_from_config,
)
from advgame_jax.experiment.validation import SPLITS, _prefixed, load_seed_splits, validate_defender
from advgame_jax.game.diagnosis import no_signal_warning
from advgame_jax.game.templates import template_budget_warnings
from advgame_jax.training.checkpoint import GameCheckpointer, config_differences
from advgame_jax.training.ema import ema_step
from advgame_jax.training.multihost import collate_global, host_to_global
from advgame_jax.training.sharding import batch_parallel_size, replicated, state_shardings
from advgame_jax.training.state import abstract_player_state

ROLES = ("attacker", "defender")
# Console summary: label -> metric key.
CONSOLE_KEYS = {
    "val_def_harmful": "valid/harmful/reward",
    "val_def_benign": "valid/benign/reward",
    "att_harmful": "harmful/x/reward/mean",
    "att_benign": "benign/x/reward/mean",
    "def_harmful": "harmful/y/reward/mean",
    "def_benign": "benign/y/reward/mean",
    "s/step": "time/step",
}


class GameRunner:
    """Builds everything from a validated config and runs trainer steps."""

    def __init__(self, config, *, judge=None, settings: Optional[Settings] = None):
        # The one conversion (ConfigError if bad), or the caller's, of this same config.
        self.settings = settings if settings is not None else settings_from_config(config)
        self.config = config
        self.workdir = os.path.abspath(config.workdir)
        try:  # before anything is loaded: a read-only disk is found now, not at a save
            fsutil.check_writable_dir(self.workdir, "config.workdir")
        except OSError as e:
            raise ConfigError(str(e)) from None
        # One run per workdir: a second one is refused here, before anything loads.
        self._lock = locking.DirLock(self.workdir, "config.workdir")
        if hosts.is_writer():
            self._lock.acquire()
        try:
            self._build(config, judge)
        except BaseException:
            self._lock.release()
            raise

    def _build(self, config, judge) -> None:
        compile_counter.install()
        self.mesh = resolve_mesh(self.settings)
        self.train_seeds, self.valid_seeds = load_seed_splits(config)
        # B per split and process = this process's share of the global seeds per split
        # (train.seeds_per_step, or seeds_per_device × data-parallel devices; hosts.py).
        b = (
            self.settings.train.seeds_per_split(batch_parallel_size(self.mesh), jax.process_count())
            // jax.process_count()
        )
        a, d = config.game.num_attacks, config.game.num_responses
        most_rows = b * a * d if config.loss.kind == "grpo" else b * a
        if config.train.pair_buckets and max(config.train.pair_buckets) < most_rows:
            raise ConfigError(
                f"config.train.pair_buckets: the largest bucket {max(config.train.pair_buckets)} "
                f"cannot hold the {most_rows} {'samples' if config.loss.kind == 'grpo' else 'pairs'} "
                f"a split can produce (B={b}, A={a}, D={d})"
            )

        self.game_config = game_config_from_experiment(config, self.settings)
        # Cheap checks first: the judge (endpoints are probed) before loading any model.
        self.timer = StageTimer()
        if judge is None:
            judge_sampler = judge_tok = None
            if config.judge.backend == "sampler":
                from advgame_jax.sampling.jax_sampler import JaxSampler
                from advgame_jax.tokenization import ChatTokenizer

                judge_sampler = JaxSampler.from_hf_dir(config.judge.hf_path, mesh=self.mesh)
                judge_tok = ChatTokenizer.from_dir(config.judge.hf_path)
            judge = game.make_judge(
                self.settings.judge,
                templates=self.game_config.templates,
                sampler=judge_sampler,
                tokenizer=judge_tok,
                seed=config.seed,
            )
        self.judge = TimedJudge(judge, self.timer)
        hf_paths = {r: config[r].hf_path for r in ROLES}
        if config.toy_world:
            from advgame_jax.experiment.toy_world import build_toy_world

            templates = game.get_template_set(self.game_config.templates)

            def build():
                return build_toy_world(
                    config.toy_dir or os.path.join(self.workdir, "toy"),
                    seed=config.seed,
                    train_seeds=self.train_seeds["harmful"] + self.train_seeds["benign"],
                    attacker_prompt_text=lambda s: templates.attacker_prompt(
                        s.prompt, s.category, config.game.attacker_format
                    ),
                    warmup_steps=config.toy_warmup_steps,
                )

            # One process builds the shared toy world; the others then find it built.
            if hosts.is_writer():
                paths = build()
            hosts.barrier("toy_world")
            if not hosts.is_writer():
                paths = build()
            hf_paths = {r: config[r].hf_path or getattr(paths, r) for r in ROLES}

        # Optimizer updates: one per split per trainer step.
        total_updates = 2 * config.train.num_steps
        self.players: dict[str, Player] = {}
        params0, update_steps = {}, {}
        for role in ROLES:
            self.players[role], params0[role] = build_player(
                config,
                role,
                hf_paths[role],
                self.mesh,
                settings=self.settings,
                total_updates=total_updates,
                update_steps=update_steps,
            )

        self._report_unfit_seeds()
        self.samplers = {
            "attacker": TimedSampler(
                self.players["attacker"].sampler, self.timer, "attacker_generation"
            ),
            "defender": TimedSampler(
                self.players["defender"].sampler, self.timer, "defender_generation"
            ),
        }

        self.iterators = {
            c: SeedIterator(
                self.train_seeds[c],
                b,
                seed=config.seed + i,
                shard_index=jax.process_index(),
                shard_count=jax.process_count(),
            )
            for i, c in enumerate(SPLITS)
        }
        # Each role's PlayerState, and under "rng" the game's PRNG key.
        self.state: dict[str, Any] = {
            r: initial_state(self.players[r], params0[r], self.settings) for r in ROLES
        }
        # Replicated over the mesh (a global array: every process can checkpoint it).
        self.state["rng"] = host_to_global(
            np.asarray(jax.random.PRNGKey(config.seed)), replicated(self.mesh)
        )
        self.step = 0

        self.checkpointer = GameCheckpointer(
            os.path.join(self.workdir, "checkpoints"),
            save_every=config.train.checkpoint_every or 10**9,
            keep=config.train.keep_checkpoints,
        )
        self._restore()
        self.audit = None
        if config.logging.audit_log and hosts.is_writer():
            self.audit = game.AuditLog(os.path.join(self.workdir, "audit", "trees.jsonl"))
        self._stop_requested = False
        self._in_step = False
        self._needs_sync = True

    def _report_unfit_seeds(self) -> None:
        """Warn at load about seeds longer than the prompt budget of the sampler that reads
        them (training seeds: the attacker's; validation seeds: the defender's). They never
        crash a step: the sampler answers them with a MAX_LENGTH error, counted."""
        from advgame_jax.data.seeds import seeds_over_budget

        for role, seeds_by_split, what in (
            ("attacker", self.train_seeds, "training"),
            ("defender", self.valid_seeds, "validation"),
        ):
            player = self.players[role]
            budget = player.sampler.prompt_budget
            if not budget:
                continue
            if role == "attacker":  # the template alone may fill the prompt budget
                for msg in template_budget_warnings(
                    self.game_config.templates,
                    self.config.game.attacker_format,
                    lambda t, tok=player.tokenizer: len(tok.render_user_turn(t)),
                    budget,
                ):
                    logging.warning("%s", msg)
            for split, seeds in seeds_by_split.items():
                bad = seeds_over_budget(
                    seeds, lambda t, tok=player.tokenizer: len(tok.encode(t)), budget
                )
                if bad:
                    logging.warning(
                        "%d of %d %s %s seeds are longer than the %s sampler's prompt budget "
                        "of %d tokens (first: #%d); they can never be played and will count "
                        "as MAX_LENGTH errors (sys/%s/prompt_too_long)",
                        len(bad),
                        len(seeds),
                        what,
                        split,
                        role,
                        budget,
                        bad[0],
                        role,
                    )

    # ------------------------------------------------------------------ checkpoints
    def _abstract_state(self):
        out = {}
        for r in ROLES:
            sh = state_shardings(self.state[r], self.players[r].model_config, self.mesh)
            out[r] = abstract_player_state(self.state[r], sh)
        out["rng"] = jax.ShapeDtypeStruct(
            self.state["rng"].shape, self.state["rng"].dtype, sharding=replicated(self.mesh)
        )
        return out

    def _meta(self) -> dict:
        return {
            "step": self.step,
            # GAME_SPEC "Beyond the reference": the attacker inside is a controlled artifact.
            "advgame_controlled_artifact": {
                "contains": "attacker",
                "note": "trained red-teaming attacker; export "
                "(training.export.export_hf) and serving need an explicit flag",
            },
            # Each player's own model config: what an export writes as config.json.
            "models": {r: self.players[r].model_config.to_hf_dict() for r in ROLES},
            "iterators": hosts.gather_iterator_states(
                {c: it.state() for c, it in self.iterators.items()}
            ),
            "config": json.loads(self.config.to_json()),
        }

    def _restore(self) -> None:
        current = json.loads(self.config.to_json())
        restored = self.checkpointer.restore(
            self._abstract_state(),
            check_meta=lambda meta: config_differences(
                meta.get("config", {}), current, ignore=RESUMABLE_FIELDS, added=ADDED_FIELDS
            ),
        )
        if restored is None:
            if self.config.get("init_from"):  # a new run continuing an old one
                from advgame_jax.experiment.init_from import states_from_checkpoint

                self.state.update(
                    states_from_checkpoint(
                        self.config.init_from,
                        self.players,
                        {r: self.state[r] for r in ROLES},
                        self.config,
                    )
                )
            return
        step, state, meta = restored
        self.state = state
        self.step = int(meta["step"])
        positions = hosts.own_iterator_states(meta["iterators"])
        for c, it in self.iterators.items():
            if positions is not None:
                it.restore(positions[c])
        logging.info("resumed from checkpoint at step %d in %s", step, self.workdir)

    def save_checkpoint(self, *, force: bool = False) -> bool:
        return self.checkpointer.save(self.step, self.state, self._meta(), force=force)

    # ------------------------------------------------------------------ one step
    def _sync(self) -> None:
        with self.timer.stage("sync"):
            for r in ROLES:
                sync_sampler(
                    self.players[r],
                    self.state[r],
                    self.config.train.sample_from,
                    self.workdir,
                    version=self.step,
                )

    def _update(self, role: str, scored, split: str) -> dict:
        player = self.players[role]
        if not player.trainable:
            return {}
        upd = player.update
        t = self.config.train
        # Each record carries its weight in the update objective (game.normalization).
        if self.config.loss.kind == "grpo":
            records = game.with_weight(
                game.grpo_samples(scored, role, self.config.loss.grpo_baseline),
                game.sample_weight(scored, role, t.loss_normalization),
            )
        else:
            records = game.with_weight(
                game.pairs(scored, role),
                game.pair_weight(scored, role, t.loss_normalization, t.norm_seeds_per_microbatch),
            )
        # This process's records → one global batch (one process: plain collation).
        batch = collate_global(
            records,
            kind="samples" if self.config.loss.kind == "grpo" else "pairs",
            pad_id=player.tokenizer.pad_id,
            mesh=self.mesh,
            num_microbatches=t.num_microbatches,
            row_buckets=tuple(t.pair_buckets),
            length_buckets=tuple(t.length_buckets),
            overflow="truncate_prompt",
        )
        with self.timer.stage("update"):
            self.state[role], m = upd(self.state[role], batch)
            m = jax.device_get(m)
        return _prefixed(f"{split}/{role}/", m)

    def train_step(self) -> dict:
        """Run one trainer step (``self.step`` += 1) and return its metrics record."""
        t0 = time.perf_counter()
        self._in_step = True
        self.step += 1
        cfg = self.config
        if self._needs_sync or (self.step - 1) % cfg.train.sync_every_n_steps == 0:
            self._sync()
            self._needs_sync = False
        record: dict[str, float] = {}
        for i, split in enumerate(SPLITS):
            seeds = self.iterators[split].next_batch()
            scored = game.build_tree(
                seeds,
                self.game_config,
                judge=self.judge,
                attacker=self.samplers["attacker"],
                attacker_tokenizer=self.players["attacker"].tokenizer,
                defender=self.samplers["defender"],
                defender_tokenizer=self.players["defender"].tokenizer,
                sample_index=(2 * self.step + i) * jax.process_count() + jax.process_index(),
            )
            if self.audit is not None:
                self.audit.write(scored, step=self.step, split=split)
            record.update(_prefixed(f"{split}/", game.tree_metrics(scored)))
            for role in ROLES:
                record.update(self._update(role, scored, split))
        with self.timer.stage("update"):
            for r in ROLES:
                if self.players[r].trainable:
                    self.state[r] = ema_step(self.state[r], cfg.train.ema_decay)
        # The training step's stage timings, before validation pops its own.
        record.update(self.timer.pop())
        if cfg.train.validate_every and self.step % cfg.train.validate_every == 0:
            record.update(self.validate())
        record["time/step"] = time.perf_counter() - t0
        record["sys/compilations"] = float(compile_counter.count())
        for r in ROLES:
            record[f"sys/{r}/prompt_too_long"] = float(
                self.players[r].sampler.stats()["prompt_too_long"]
            )
        record = hosts.merge_records(record)
        skipped = [k for k, v in record.items() if k.endswith("/skipped_nonfinite") and v]
        if skipped:
            logging.warning(
                "step %d: non-finite loss or gradient, update skipped (%s)",
                self.step,
                ", ".join(k.rsplit("/", 1)[0] for k in skipped),
            )
        why = no_signal_warning(record)
        if why:
            logging.warning("step %d: %s", self.step, why)
        self._in_step = False
        return record

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Defender-only validation (GAME_SPEC §4) with the defender's sampling weights
        (``experiment.validation``)."""
        t0 = time.perf_counter()
        if self._needs_sync:
            self._sync()
            self._needs_sync = False
        out = validate_defender(
            self.valid_seeds,
            self.game_config,
            self.config.validation,
            judge=self.judge,
            defender=self.samplers["defender"],
            tokenizer=self.players["defender"].tokenizer,
        )
        self.timer.pop()  # validation's own stage times: reported as one number
        out["time/validation"] = time.perf_counter() - t0
        return hosts.merge_records(out)

    def close(self) -> None:
        """Shut down the players' inference engines (offloaded processes, colocated engines)."""
        for player in self.players.values():
            close_player(player)
        self._lock.release()

    # ------------------------------------------------------------------ the run
    def _on_signal(self, signum, frame) -> None:
        if self._in_step:
            logging.warning(
                "signal %d received: finishing step %d, then checkpointing", signum, self.step
            )
        else:
            logging.warning(
                "signal %d received: stopping after step %d, checkpointing", signum, self.step
            )
        self._stop_requested = True

    def run(self, *, max_steps: Optional[int] = None) -> dict:
        """Train until ``train.num_steps`` (or ``max_steps`` more steps, or a signal)."""
        cfg = self.config
        writer = _NullWriter()
        if hosts.is_writer():
            self._lock.acquire()  # held since __init__; again after an earlier run() ended
            truncate_metrics(os.path.join(self.workdir, "metrics.jsonl"), self.step)
            writer = MetricsWriter(
                self.workdir,
                total_steps=cfg.train.num_steps,
                tensorboard=cfg.logging.tensorboard,
                wandb_project=cfg.logging.wandb_project,
                progress_bar=cfg.logging.progress_bar,
                config_json=cfg.to_json(),
                console_keys=CONSOLE_KEYS,
            )
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last: dict = {}
        try:
            if self.step == 0 and cfg.train.validate_every:
                writer.write(0, self.validate())
            steps_done = 0
            # The loop stops on the AGREED flag only: a signal seen by any process stops every
            # process after the same step (a signal landing after an agreement counts at the
            # next one), with one checkpoint of that step.
            stop = hosts.any_process(self._stop_requested)
            while self.step < cfg.train.num_steps and not stop:
                if max_steps is not None and steps_done >= max_steps:
                    break
                last = self.train_step()
                steps_done += 1
                writer.write(self.step, last)
                # A background save that failed stops the run here, naming its step.
                self.checkpointer.poll()
                stop = hosts.any_process(self._stop_requested)
                self.save_checkpoint(force=stop or self.step == cfg.train.num_steps)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            try:
                self.checkpointer.close()
            finally:
                writer.close()
                if self.audit is not None:
                    self.audit.close()
                self._lock.release()
        if stop:
            logging.warning(
                "stopped cleanly at step %d; rerun the same command to resume", self.step
            )
        return last


class _NullWriter:
    """The metrics writer of processes other than process 0: writes nothing."""

    def write(self, step, record) -> None:
        pass

    def close(self) -> None:
        pass


def run_from_config(config, *, judge=None, settings: Optional[Settings] = None) -> dict:
    """Build a :class:`GameRunner` for ``config`` (``settings``: its conversion, when the caller
    already has it) and run it to the end; returns the last record."""
    runner = GameRunner(config, judge=judge, settings=settings)
    try:
        return runner.run()
    finally:
        runner.close()
