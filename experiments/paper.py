"""The paper's training setup for the sized presets: `experiments/paper.py:hope_760m`.

The model is `experiments/lm.py`'s preset of the same name; this file replaces the training
fields, which `lm.py` keeps at CPU-demo sizes (seq 256 x 8, 200 steps), with the setup the
paper takes from Titans and Gated DeltaNet (spec 2.5 and ambiguity row 21):
- FineWeb-Edu with the Llama-2 tokenizer (32K, sentencepiece). Neither ships here: set
  `--config.data.paths` (ArrayRecord files, one document per record, or change `data.kind`)
  and `--config.data.tokenizer_path` (the tokenizer.model file); the trainer names each one
  that is missing before it builds anything.
- Training length 4K, batches of 0.5M tokens (128 x 4096), the token budget per size: 340M 15B,
  760M 30B, 1.3B 100B tokens (340M: the Titans paper's 400M row's budget).
- AdamW, cosine, peak lr 4e-4 (3e-4 at 1.3B, row 21), weight decay 0.1, warmup 1% of the steps
  (row 21 says ~1-2%: `--config.optimizer.warmup_steps` for 2%).

    python launch/train.py --config=experiments/paper.py:hope_760m --workdir=runs/hope_760m \
      --config.data.paths='fineweb_edu/train-*.array_record' \
      --config.data.tokenizer_path=llama2/tokenizer.model

The global batch is split over the data and FSDP axes of `mesh`; hope_1.3b needs FSDP on
H200s (BENCHMARKS.md, "Several GPUs"). Not run at these sizes here.
"""

import importlib.util
import math
import pathlib

import ml_collections

SEQ_LEN = 4096
BATCH_TOKENS = 2**19  # 0.5M tokens per optimizer step
TOKENS = {"340m": 15e9, "760m": 30e9, "1.3b": 100e9}
PEAK_LR = {"340m": 4e-4, "760m": 4e-4, "1.3b": 3e-4}
WARMUP_FRACTION = 0.01


def _presets():
    """experiments/lm.py, by path (config files are loaded by path, not as a package)."""
    path = pathlib.Path(__file__).with_name("lm.py")
    spec = importlib.util.spec_from_file_location("nl_jax_experiments_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "hope_760m") -> ml_collections.ConfigDict:
    """`lm.py`'s preset `arg` with the paper's data, batch, schedule and token budget."""
    size = arg.rpartition("_")[2]
    if size not in TOKENS:
        raise ValueError(
            f"experiments/paper.py:{arg}: the paper trains the sizes {list(TOKENS)}; "
            f"{size!r} has no paper setup (use experiments/lm.py:{arg})"
        )
    c = _presets().get_config(arg)
    c.seq_len = SEQ_LEN
    c.global_batch_size = BATCH_TOKENS // SEQ_LEN
    c.num_steps = math.ceil(TOKENS[size] / BATCH_TOKENS)
    o = c.optimizer
    o.name, o.schedule = "adamw", "cosine"
    o.learning_rate = PEAK_LR[size]
    o.warmup_steps = round(WARMUP_FRACTION * c.num_steps)
    o.decay_steps = 0  # cosine over the whole run
    o.weight_decay = 0.1
    d = c.data
    d.kind, d.paths, d.eval_paths = "array_record", "", ""
    d.eval_fraction = 0.001  # held-out documents of data.paths, unless eval_paths is set
    d.tokenizer, d.tokenizer_path = "sentencepiece", ""
    d.eval_batches = 32
    c.eval.every_steps = 1000
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep_period = 10_000
    c.logging.every_steps = 50
    return c
