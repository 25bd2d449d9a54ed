"""Shared defaults of every advgame_jax experiment (GAME_SPEC §2–3, the paper's common settings).

Experiment files import ``base_config()`` and override what differs. The config is converted
once, before anything is built and after command-line overrides such as
``--config.train.num_steps=10`` are applied, into the typed sections of
``advgame_jax/settings.py`` (``advgame_jax.experiment.validate.settings_from_config``), which
state what each field accepts; an unknown field or a bad value stops the run naming the field.
"""

import ml_collections


def _player(role: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # Local Hugging Face checkpoint directory (config.json + safetensors). Required
            # for paper configs; the offline world builds its own tiny models.
            hf_path="",
            # Tokenizer directory; empty = the checkpoint directory.
            tokenizer_path="",
            trainable=True,
            param_dtype="float32",
            compute_dtype="bfloat16",
            sampler_dtype="bfloat16",
            # JAX sampler shape buckets: rows and prompt lengths are padded to powers of two at
            # least this large (fixing them at the largest size a run needs means no compile
            # after the first step).
            sampler_min_batch_bucket=1,
            sampler_min_prompt_bucket=16,
            # vLLM engine options (ignored by the JAX sampler).
            vllm_kv_cache_bytes=2 * 1024**3,
            vllm_max_model_len=0,  # 0: derived (engine.max_prompt_tokens below)
            # This player's completion budget (the reference sets one per player); 0: the
            # shared sampling.max_new_tokens.
            max_new_tokens=0,
            role=role,
            # ---- sampler placement and engine settings (docs/sampling.md) ----
            # 'jax' (the JAX-native KV-cache sampler inside the trainer, runs everywhere),
            # 'colocated' (vLLM inside the trainer, explicit memory plan; extra [vllm]) or
            # 'offloaded' (vLLM engine in its own process on other devices, or a user-started
            # one at engine.address). The older `sampler` field ('jax' | 'vllm') is still
            # read: 'vllm' turns the default 'jax' into 'colocated' (settings.resolve_placement).
            placement="jax",
            engine=ml_collections.ConfigDict(
                dict(
                    address="",  # offloaded: 'host:port' of a user-started vLLM server
                    authkey_env="",  # env var holding that server's API key ('' = none)
                    devices="",  # offloaded: CUDA_VISIBLE_DEVICES of the engine, e.g. '8,9'
                    tensor_parallel_size=1,
                    gpu_memory_utilization=0.0,  # 0: vLLM default (offloaded); required if colocated
                    # prompt budget: max_model_len = this + the player's max_new_tokens (0:
                    # the model's whole context)
                    max_prompt_tokens=0,
                    enforce_eager=False,  # True: no CUDA graphs (faster start, slower decode)
                    startup_timeout_s=900.0,
                    request_timeout_s=3600.0,
                    keep_sync_checkpoints=2,  # committed sync versions kept on disk
                )
            ),
            # ---- end of placement block ----
        )
    )


def _run_fields(c: ml_collections.ConfigDict) -> None:
    """The run's identity and where it starts from."""
    c.name = "advgame"
    c.workdir = ""  # required: checkpoints, metrics, audit logs go here
    c.seed = 0
    # True: build the offline toy world (tiny tokenizer + warmed-up tiny models) in workdir/toy
    # instead of loading hf_path checkpoints.
    c.toy_world = False
    c.toy_warmup_steps = 300
    c.toy_dir = ""  # where the toy world is built/cached; empty = <workdir>/toy
    # Continue a finished run in a NEW workdir: both players' params and EMA from this
    # workdir / checkpoints dir / checkpoints/<step> dir, with a fresh optimizer and schedule
    # (advgame_jax/experiment/init_from.py). Empty = start from the players' hf_path.
    c.init_from = ""


def _mesh() -> ml_collections.ConfigDict:
    # Device mesh: -1 on `data` = all remaining devices. Multi-host: data/fsdp/tensor are the
    # sizes INSIDE one host (GPU node) or TPU slice; dcn_* multiply them across hosts/slices
    # (e.g. fsdp=8, dcn_data=2: FSDP inside each of 2 nodes, data parallel across them).
    return ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )


def _distributed() -> ml_collections.ConfigDict:
    # Joining a multi-process world (advgame_jax.distributed): empty/0 = detect from the
    # environment (ADVGAME_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID, Slurm, TPU VM pods).
    return ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1))


def _placement() -> ml_collections.ConfigDict:
    # Colocated vLLM engines share the trainer's devices: JAX's share of each device (applied
    # before JAX initialises) + engines' gpu_memory_utilization + margin must be <= 1.
    return ml_collections.ConfigDict(dict(jax_memory_fraction=0.0, device_memory_margin=0.05))


def _judge() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            backend="endpoint",  # 'endpoint' | 'rule' | 'sampler'
            endpoints=(),  # OpenAI-compatible base URLs, e.g. ('http://host:8000/v1',)
            model="",  # model name sent to the endpoint
            api_key_env="",  # name of an env var holding the API key (never the key itself)
            timeout_s=120.0,
            max_retries=3,
            concurrency=32,
            # Judge decoding. The reference samples (0.6 / 0.9, paper configs); greedy here.
            temperature=0.0,
            top_p=1.0,
            # Answers per pairwise/pointwise request, their scores averaged (1 = one answer).
            num_samples=1,
            max_new_tokens=8192,
            hf_path="",  # for backend='sampler': a local judge checkpoint
            mode="pairwise",  # 'pairwise' | 'pointwise'
            swap_positions=False,
            condition_on="prompt",  # defender judge sees x ('prompt') or s ('seed')
            attacker_judge=True,
            defender_judge=True,
            num_faith_samples=1,
            # Faithfulness samples split evenly: 'bad_judge' (excluded) or 'not_faithful'
            # (the reference's rule).
            faith_tie="bad_judge",
            # ---- judge endpoint throughput and health (game/endpoint.py) ----
            # timeout_s above is wall-clock per request, retries included.
            max_in_flight_per_endpoint=0,  # per replica; 0: only `concurrency` bounds it
            unhealthy_after=3,  # consecutive failed attempts before a replica is skipped
            unhealthy_cooldown_s=30.0,
            warn_failure_rate=0.1,  # warn when more requests than this fail in a window...
            warn_every=10,  # ...of this many judge batches (the first batch over it warns)
            # Send top_k=-1, min_p=0, repetition_penalty=1, presence/frequency_penalty=0 with
            # every request, so a vLLM judge does not take them from the model's
            # generation_config.json. False for an API that rejects these fields.
            explicit_sampling=True,
            # ---- end of judge endpoint block ----
        )
    )


def _game() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_attacks=2,  # A
            num_responses=2,  # D
            templates="advgame_v1",
            # A template file (docs/game.md, "Template files") used instead of `templates`; its
            # set is registered under the file's name without '.txt'.
            templates_file="",
            attacker_format="think_prompt_strict",
            defender_format="any",
            optimistic_attacker=True,
            faithfulness=True,
            # 'reference': an attack whose selected response got BAD_DEF_JUDGE stays unjudged
            # (reward 0.0) and defender pairs come only from error-free attacks; 'fallback':
            # judge such an attack on its first sampled response, pairs from every attack.
            selection="fallback",
        )
    )


def _sampling() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(temperature=0.6, top_p=0.9, top_k=0, max_new_tokens=2048))


def _loss() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="dpo",  # 'dpo' | 'ipo' | 'grpo'
            beta=0.1,
            length_normalization=False,
            nll_coef=0.0,
            entropy_coef=0.0,
            kl_coef=0.1,  # GRPO
            tis_cap=2.0,  # GRPO truncated importance sampling cap; 0 disables
            # GRPO: stop the gradient of the importance weight (True) or keep it (False, the
            # reference: gradient 2·w·A·∇log π where w < cap).
            tis_detach=True,
            grpo_baseline="across_seeds",  # 'across_seeds' | 'per_seed'
        )
    )


def _optim() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=1e-6,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            clip_norm=1.0,
            final_lr_fraction=0.2,
            warmup_steps=0,
            # 'run': one cosine over all 2·num_steps updates; 'cycle' (the reference): a
            # cosine over num_steps updates that restarts (training/optimizer.py).
            lr_schedule="run",
            # Storage of Adam's first moment (see _update_step_scale below).
            mu_dtype="float32",
        )
    )


def _train() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            seeds_per_device=4,  # B per device per split (when seeds_per_step is 0)
            # Global seeds per split per step, whatever the layout (the reference: 32 + 32);
            # each process plays an equal share. 0 = seeds_per_device × data-parallel devices.
            seeds_per_step=0,
            ema_decay=0.95,
            sample_from="ema",  # 'ema' (MD variants) | 'trained' (on-policy)
            reference="ema",  # 'ema' (MD) | 'initial'
            sync_every_n_steps=1,
            num_microbatches=1,
            # Gradient normaliser (game/normalization.py): 'pairs' = mean over the split's
            # pairs/samples; 'reference' = the reference's rows per microbatch of
            # `norm_seeds_per_microbatch` seeds, an empty microbatch counting one row.
            loss_normalization="pairs",
            norm_seeds_per_microbatch=1,
            # A split without pairs still takes an AdamW step (the reference) or is skipped.
            step_on_empty_batch=False,
            pair_buckets=(),  # empty = powers of two
            length_buckets=(),  # empty = 16, 24, 32, 48, 64, 96, ... (2^k and 3·2^(k-1))
            logprob_chunk_size=1024,
            # The older switch of remat_policy below (False = remat_policy 'none'), kept so
            # older configs and --config.train.remat overrides still work; the converter
            # translates it and nothing reads it after. Set remat_policy instead.
            remat=True,
            validate_every=25,
            checkpoint_every=50,
            keep_checkpoints=3,
            log_every=1,
        )
    )


def _update_step_scale(train: ml_collections.ConfigDict) -> None:
    # ---- Scale of the update step: attention, remat, token budget, precision ------------
    # attention: 'auto' (cuDNN flash attention on GPU, exact chunked attention elsewhere),
    # 'xla' (full score matrix), 'chunked', 'cudnn'. remat_policy: 'none' (no
    # rematerialisation) | 'full' | 'dots_no_batch' | 'save_attn'. max_tokens_per_device: tokens of one
    # microbatch on one device (pairs count both sequences); 0 = train.num_microbatches only.
    # ema_dtype / optim.mu_dtype: storage of θ̄ and of Adam's first moment (see
    # advgame_jax.training.state.PRECISION_DEFAULTS for why the defaults are fp32).
    train.attention = "auto"
    train.remat_policy = "full"
    train.max_tokens_per_device = 8192
    train.ema_dtype = "float32"


def _data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            train_harmful="",
            train_benign="",
            valid_harmful="",
            valid_benign="",
            # Adversarial validation splits (launch/prepare_data.py writes them); empty = skipped.
            valid_adversarial_harmful="",
            valid_adversarial_benign="",
            adversarial_harmful="",
            adversarial_benign="",
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    _run_fields(c)
    c.mesh = _mesh()
    c.distributed = _distributed()
    c.placement = _placement()
    c.attacker = _player("attacker")
    c.defender = _player("defender")
    c.judge = _judge()
    c.game = _game()
    c.sampling = _sampling()
    c.loss = _loss()
    c.optim = _optim()
    c.train = _train()
    _update_step_scale(c.train)
    c.data = _data()
    # num_seeds: seeds per validation split, 0 = the whole split; batch_size: seeds per
    # rollout call when validating (0 = all at once).
    c.validation = ml_collections.ConfigDict(dict(num_seeds=64, num_responses=2, batch_size=64))

    c.logging = ml_collections.ConfigDict(
        dict(audit_log=False, tensorboard=True, wandb_project="", progress_bar=True)
    )
    return c
