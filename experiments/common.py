"""Training defaults shared by every experiment file: data, optimizer, mesh, checkpoints, logging.

Everything but the model. `nl_jax.train.config.validate` checks these fields at start and names
the bad key with the allowed values; `launch/train.py --config.x=y` overrides any of them.
`seq_len` and `global_batch_size` are the same values as `data.seq_len` and
`data.global_batch_size` (linked references: overriding either name changes both).
"""

import ml_collections

from nl_jax import data


def base_config() -> ml_collections.ConfigDict:
    """Everything but the model: the trainer fills and validates these fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and the step RNG (data order has its own data.seed)
    c.seq_len = ml_collections.FieldReference(256)
    c.global_batch_size = ml_collections.FieldReference(8)  # sequences per step, all processes
    c.num_steps = 200
    # Where a fresh run draws its initial params: device (jitted init, params born sharded),
    # host (same values, drawn on the CPU, then sharded; much faster to compile on GPUs),
    # auto (host on GPUs, device elsewhere).
    c.init_on = "auto"
    # A non-finite loss or gradient norm: stop (before any checkpoint or evaluation of that
    # state, so the last checkpoint stays a finite one) | continue (train on regardless).
    c.on_nonfinite = "stop"
    # Persistent XLA compilation cache (e.g. ~/.cache/nl_jax/xla): restarts skip compiling.
    c.compilation_cache_dir = ""

    # Input pipeline: the fields of nl_jax.data.default_config() (see nl_jax/data/pipeline.py).
    c.data = data.default_config()
    c.data.seq_len = c.get_ref("seq_len")
    c.data.global_batch_size = c.get_ref("global_batch_size")
    c.data.eval_batches = 16  # batches per evaluation (0 = one full pass over the eval split)
    c.data.num_threads = 2

    # Outer optimizer. name: adamw (default) | muon | m3 (nl_jax.optim.build_optimizer).
    o = c.optimizer = ml_collections.ConfigDict()
    o.name = "adamw"
    o.learning_rate = 3e-3  # peak; for Muon/M3 this is the AdamW branch (embeddings, 1-D params)
    o.schedule = "cosine"  # cosine | linear | constant (all after a linear warmup from 0)
    o.warmup_steps = 20
    o.decay_steps = 0  # 0 = num_steps
    o.min_lr_ratio = 0.1  # final learning rate = min_lr_ratio * peak
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1  # decoupled; applied to params with ndim >= 2 only
    o.grad_clip_norm = 1.0  # clip by global norm; 0 = off
    o.muon = ml_collections.ConfigDict()
    o.muon.learning_rate = 0.02  # peak learning rate of the orthogonalised (matrix) branch
    o.muon.beta = 0.95
    o.muon.ns_steps = 5
    o.m3 = ml_collections.ConfigDict()
    o.m3.learning_rate = 0.02  # peak learning rate of the M3 (matrix) branch
    o.m3.beta3 = 0.9
    o.m3.alpha = 1.0
    o.m3.slow_period = 16
    o.m3.ns_steps = 5
    o.m3.rms_scale = 0.2
    o.m3.form = "ema"  # ema | accumulate
    o.dmgd = ml_collections.ConfigDict()  # deep momentum GD: learning_rate above is its step
    o.dmgd.beta = 0.9  # momentum retention
    o.dmgd.hidden = 8  # hidden width of the momentum MLP

    # Device mesh: sizes of the axes (data, fsdp, tensor); -1 = all remaining devices (one axis).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # Checkpoints in <workdir>/checkpoints (orbax, async); the run resumes from the latest one.
    k = c.checkpoint = ml_collections.ConfigDict()
    k.every_steps = 100  # also saved at the last step and on SIGTERM
    k.keep = 3  # keep the last `keep` checkpoints ...
    k.keep_period = 0  # ... plus every step divisible by keep_period forever (0 = none)
    k.async_save = True

    # Evaluation on the eval split (data.eval_batches batches).
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 100  # also at the last step; 0 = only at the last step

    # Metrics: <workdir>/metrics.jsonl always, TensorBoard events in <workdir>/tensorboard.
    g = c.logging = ml_collections.ConfigDict()
    g.every_steps = 10
    g.tensorboard = True
    g.progress = True  # one progress line per log step on process 0
    g.peak_tflops_per_device = 0.0  # for MFU; 0 = look up the device kind (none on CPU)

    # jax.profiler trace of steps [start_step, start_step + num_steps) into <workdir>/profile.
    c.profiler = ml_collections.ConfigDict({"start_step": 0, "num_steps": 0})  # 0 steps = off
    return c
