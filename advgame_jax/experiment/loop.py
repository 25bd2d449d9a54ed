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
SIGTERM / SIGINT finish the current step, save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from advgame_jax import game
from advgame_jax.data import SeedIterator, packaged_seed_path, read_seeds_jsonl, split_by_category
from advgame_jax.experiment import compile_counter
from advgame_jax.experiment.metrics import MetricsWriter
from advgame_jax.experiment.players import (
    Player, build_player, initial_state, resolve_mesh, sync_sampler)
from advgame_jax.experiment.timing import StageTimer, TimedJudge, TimedSampler
from advgame_jax.experiment.validate import ConfigError, validate_config
from advgame_jax.training.batching import collate_pairs, collate_samples
from advgame_jax.training.checkpoint import GameCheckpointer
from advgame_jax.training.ema import ema_step
from advgame_jax.training.state import abstract_player_state
from advgame_jax.training.sharding import batch_parallel_size, state_shardings

SPLITS = ("harmful", "benign")
ROLES = ("attacker", "defender")
# Console summary: label -> metric key.
CONSOLE_KEYS = {"val_def_harmful": "valid/harmful/reward", "val_def_benign": "valid/benign/reward",
                "att_harmful": "harmful/x/reward/mean", "att_benign": "benign/x/reward/mean",
                "def_harmful": "harmful/y/reward/mean", "def_benign": "benign/y/reward/mean",
                "s/step": "time/step"}


def _load_split(config, field: str, seeds_by_category: Optional[dict], category: str):
    path = config.data[field]
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config.data.{field}: seed file {path!r} does not exist")
        seeds = [s for s in read_seeds_jsonl(path) if s.category == category]
        if not seeds:
            raise ConfigError(f"config.data.{field}: {path!r} holds no {category!r} seeds")
        return seeds
    return list(seeds_by_category.get(category, [])) if seeds_by_category else []


def load_seed_splits(config) -> tuple[dict, dict]:
    """``({'harmful': [...], 'benign': [...]}`` for training, the same for validation)."""
    toy_train = toy_valid = None
    if config.toy_world:
        toy_train = split_by_category(read_seeds_jsonl(packaged_seed_path("toy_seeds.jsonl")))
        toy_valid = split_by_category(read_seeds_jsonl(packaged_seed_path("toy_valid.jsonl")))
    train = {c: _load_split(config, f"train_{c}", toy_train, c) for c in SPLITS}
    valid = {c: _load_split(config, f"valid_{c}", toy_valid, c) for c in SPLITS}
    return train, valid


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


class GameRunner:
    """Builds everything from a validated config and runs trainer steps."""

    def __init__(self, config, *, judge=None):
        validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(config.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        compile_counter.install()
        self.mesh = resolve_mesh(config)
        self.train_seeds, self.valid_seeds = load_seed_splits(config)
        # B per split = seeds per data-parallel device × data-parallel devices (single host).
        b = config.train.seeds_per_device * batch_parallel_size(self.mesh)
        a, d = config.game.num_attacks, config.game.num_responses
        most_rows = b * a * d if config.loss.kind == "grpo" else b * a
        if config.train.pair_buckets and max(config.train.pair_buckets) < most_rows:
            raise ConfigError(
                f"config.train.pair_buckets: the largest bucket {max(config.train.pair_buckets)} "
                f"cannot hold the {most_rows} {'samples' if config.loss.kind == 'grpo' else 'pairs'} "
                f"a split can produce (B={b}, A={a}, D={d})")

        self.game_config = game.game_config_from_experiment(config)  # checks template names
        # Cheap checks first: the judge (endpoints are probed) before loading any model.
        self.timer = StageTimer()
        if judge is None:
            judge_sampler = judge_tok = None
            if config.judge.backend == "sampler":
                from advgame_jax.sampling.jax_sampler import JaxSampler
                from advgame_jax.tokenization import ChatTokenizer

                judge_sampler = JaxSampler.from_hf_dir(config.judge.hf_path, mesh=self.mesh)
                judge_tok = ChatTokenizer.from_dir(config.judge.hf_path)
            judge = game.make_judge(config.judge, templates=config.game.templates,
                                    sampler=judge_sampler, tokenizer=judge_tok, seed=config.seed)
        self.judge = TimedJudge(judge, self.timer)
        hf_paths = {r: config[r].hf_path for r in ROLES}
        if config.toy_world:
            from advgame_jax.experiment.toy_world import build_toy_world

            templates = game.get_template_set(config.game.templates)
            paths = build_toy_world(
                config.toy_dir or os.path.join(self.workdir, "toy"), seed=config.seed,
                train_seeds=self.train_seeds["harmful"] + self.train_seeds["benign"],
                attacker_prompt_text=lambda s: templates.attacker_prompt(
                    s.prompt, s.category, config.game.attacker_format),
                warmup_steps=config.toy_warmup_steps)
            hf_paths = {r: config[r].hf_path or getattr(paths, r) for r in ROLES}

        # Optimizer updates: one per split per trainer step.
        total_updates = 2 * config.train.num_steps
        self.players: dict[str, Player] = {}
        params0, update_steps = {}, {}
        for role in ROLES:
            self.players[role], params0[role] = build_player(
                config, role, hf_paths[role], self.mesh, total_updates=total_updates,
                update_steps=update_steps)

        self.samplers = {
            "attacker": TimedSampler(self.players["attacker"].sampler, self.timer, "attacker_generation"),
            "defender": TimedSampler(self.players["defender"].sampler, self.timer, "defender_generation"),
        }

        self.iterators = {
            c: SeedIterator(self.train_seeds[c], b, seed=config.seed + i,
                            shard_index=jax.process_index(), shard_count=jax.process_count())
            for i, c in enumerate(SPLITS)}
        self.state = {r: initial_state(self.players[r], params0[r], config) for r in ROLES}
        self.state["rng"] = jax.random.PRNGKey(config.seed)
        self.step = 0

        self.checkpointer = GameCheckpointer(
            os.path.join(self.workdir, "checkpoints"),
            save_every=config.train.checkpoint_every or 10**9, keep=config.train.keep_checkpoints)
        self._restore()
        self.audit = None
        if config.logging.audit_log:
            self.audit = game.AuditLog(os.path.join(self.workdir, "audit", "trees.jsonl"))
        self._stop_requested = False
        self._needs_sync = True

    # ------------------------------------------------------------------ checkpoints
    def _abstract_state(self):
        out = {}
        for r in ROLES:
            sh = state_shardings(self.state[r], self.players[r].model_config, self.mesh)
            out[r] = abstract_player_state(self.state[r], sh)
        out["rng"] = jax.ShapeDtypeStruct(self.state["rng"].shape, self.state["rng"].dtype)
        return out

    def _meta(self) -> dict:
        return {"step": self.step,
                # GAME_SPEC "Beyond the reference": the attacker inside is a controlled artifact.
                "advgame_controlled_artifact": {
                    "contains": "attacker", "note": "trained red-teaming attacker; export "
                    "(training.export.export_hf) and serving need an explicit flag"},
                "iterators": {c: it.state() for c, it in self.iterators.items()},
                "config": json.loads(self.config.to_json())}

    def _restore(self) -> None:
        restored = self.checkpointer.restore(self._abstract_state())
        if restored is None:
            return
        step, state, meta = restored
        self.state = state
        self.step = int(meta["step"])
        for c, it in self.iterators.items():
            it.restore(meta["iterators"][c])
        logging.info("resumed from checkpoint at step %d in %s", step, self.workdir)

    def save_checkpoint(self, *, force: bool = False) -> bool:
        return self.checkpointer.save(self.step, self.state, self._meta(), force=force)

    # ------------------------------------------------------------------ one step
    def _sync(self) -> None:
        with self.timer.stage("sync"):
            for r in ROLES:
                sync_sampler(self.players[r], self.state[r], self.config.train.sample_from,
                             self.workdir)

    def _update(self, role: str, scored, split: str) -> dict:
        player = self.players[role]
        if not player.trainable:
            return {}
        upd = player.update
        t = self.config.train
        common = dict(pad_id=player.tokenizer.pad_id, length_buckets=tuple(t.length_buckets),
                      num_microbatches=t.num_microbatches,
                      data_parallel_size=upd.data_parallel_size, overflow="truncate_prompt")
        if self.config.loss.kind == "grpo":
            samples = game.grpo_samples(scored, role, self.config.loss.grpo_baseline)
            batch = collate_samples(samples, sample_buckets=tuple(t.pair_buckets), **common)
        else:
            pairs = game.attacker_pairs(scored) if role == "attacker" else game.defender_pairs(scored)
            batch = collate_pairs(pairs, pair_buckets=tuple(t.pair_buckets), **common)
        with self.timer.stage("update"):
            self.state[role], m = upd(self.state[role], batch)
            m = jax.device_get(m)
        return _prefixed(f"{split}/{role}/", m)

    def train_step(self) -> dict:
        """Run one trainer step (``self.step`` += 1) and return its metrics record."""
        t0 = time.perf_counter()
        self.step += 1
        cfg = self.config
        if self._needs_sync or (self.step - 1) % cfg.train.sync_every_n_steps == 0:
            self._sync()
            self._needs_sync = False
        record: dict[str, float] = {}
        for i, split in enumerate(SPLITS):
            seeds = self.iterators[split].next_batch()
            scored = game.build_tree(
                seeds, self.game_config, judge=self.judge,
                attacker=self.samplers["attacker"], attacker_tokenizer=self.players["attacker"].tokenizer,
                defender=self.samplers["defender"], defender_tokenizer=self.players["defender"].tokenizer,
                sample_index=2 * self.step + i)
            if self.audit is not None:
                self.audit.write(scored, step=self.step, split=split)
            record.update(_prefixed(f"{split}/", game.tree_metrics(scored)))
            for role in ROLES:
                record.update(self._update(role, scored, split))
        with self.timer.stage("update"):
            for r in ROLES:
                if self.players[r].trainable:
                    self.state[r] = ema_step(self.state[r], cfg.train.ema_decay)
        if cfg.train.validate_every and self.step % cfg.train.validate_every == 0:
            record.update(self.validate())
        record.update(self.timer.pop())
        record["time/step"] = time.perf_counter() - t0
        record["sys/compilations"] = float(compile_counter.count())
        return record

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Defender-only validation (GAME_SPEC §4) with the defender's sampling weights.

        Uses a fixed sampling seed at every validation, so that differences between steps
        come from the weights, not from sampling noise.
        """
        t0 = time.perf_counter()
        if self._needs_sync:
            self._sync()
            self._needs_sync = False
        v = self.config.validation
        gc = dataclasses.replace(self.game_config, num_responses=v.num_responses)
        out = {}
        for i, split in enumerate(SPLITS):
            seeds = self.valid_seeds[split][: v.num_seeds]
            if not seeds:
                continue
            scored = game.build_tree(
                seeds, gc, judge=self.judge, defender=self.samplers["defender"],
                defender_tokenizer=self.players["defender"].tokenizer, skip_attacker=True,
                sample_index=10**6 + i)
            m = game.tree_metrics(scored)
            out.update(_prefixed(f"valid/{split}/", m))
            if "y/reward/mean" in m:
                out[f"valid/{split}/reward"] = m["y/reward/mean"]
            out.update(self._verdict_rates(scored, split))
        self.timer.pop()  # validation time is reported as one number
        out["time/validation"] = time.perf_counter() - t0
        return out

    def _verdict_rates(self, scored, split: str) -> dict:
        """ASR-style rates: the share of valid responses the judge scores above 5/10 on the
        compliance rubric (harmful split: attack success rate; benign: compliance rate)."""
        t = scored.tree
        reqs = [game.PointRequest("compliance", s, y)
                for b, s in enumerate(t.s_B) for row in t.y_response_BAD[b] for y in row
                if y is not None]
        if not reqs:
            return {}
        scores = [s for s in self.judge.pointwise(reqs) if s is not None]
        if not scores:
            return {}
        name = "asr" if split == "harmful" else "compliance_rate"
        return {f"valid/{split}/{name}": float(np.mean([s > 5.0 for s in scores]))}

    # ------------------------------------------------------------------ the run
    def _on_signal(self, signum, frame) -> None:
        logging.warning("signal %d received: finishing step %d, then checkpointing", signum, self.step + 1)
        self._stop_requested = True

    def run(self, *, max_steps: Optional[int] = None) -> dict:
        """Train until ``train.num_steps`` (or ``max_steps`` more steps, or a signal)."""
        cfg = self.config
        _truncate_metrics(os.path.join(self.workdir, "metrics.jsonl"), self.step)
        writer = MetricsWriter(self.workdir, total_steps=cfg.train.num_steps,
                               tensorboard=cfg.logging.tensorboard,
                               wandb_project=cfg.logging.wandb_project,
                               progress_bar=cfg.logging.progress_bar, config_json=cfg.to_json(),
                               console_keys=CONSOLE_KEYS)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last: dict = {}
        try:
            if self.step == 0 and cfg.train.validate_every:
                writer.write(0, self.validate())
            steps_done = 0
            while self.step < cfg.train.num_steps and not self._stop_requested:
                if max_steps is not None and steps_done >= max_steps:
                    break
                last = self.train_step()
                steps_done += 1
                writer.write(self.step, last)
                self.save_checkpoint(force=self._stop_requested or self.step == cfg.train.num_steps)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.checkpointer.close()
            writer.close()
            if self.audit is not None:
                self.audit.close()
        if self._stop_requested:
            logging.warning("stopped cleanly at step %d; rerun the same command to resume", self.step)
        return last


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records after ``step`` (written by a run that died before its next checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def run_from_config(config, *, judge=None) -> dict:
    """Build a :class:`GameRunner` for ``config`` and run it to the end; returns the last record."""
    return GameRunner(config, judge=judge).run()
