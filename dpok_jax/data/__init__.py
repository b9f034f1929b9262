"""Preference data: formats, the embedded synthetic tasks, tokenization and batching.

`load_preference_dataset` (rows of prompt / chosen / rejected, each with its file and line) ->
`tokenize_pairs` (token ids and a `BadRowReport`) -> `PreferenceBatcher` (padded numpy batches for
this host; `make_batcher` builds a run's). `load_pairs` does the first two for a config's ``data``
section, with the held-out split.
See docs/data.md.
"""

from dpok_jax.data.batching import DEFAULT_BUCKETS, PreferenceBatcher, make_batcher
from dpok_jax.data.formats import FORMATS, detect_format, render_conversation, split_implicit
from dpok_jax.data.loading import ORIGIN_COLUMN, load_preference_dataset
from dpok_jax.data.pipeline import held_out_count, load_pairs
from dpok_jax.data.readers import read_file
from dpok_jax.data.report import REASONS, BadRowReport
from dpok_jax.data.synthetic import TASKS, synthetic_tasks
from dpok_jax.data.tokenization import EMBEDDING_COLUMNS, TokenizedPairs, tokenize_pairs
from dpok_jax.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "BadRowReport",
    "ByteTokenizer",
    "DEFAULT_BUCKETS",
    "EMBEDDING_COLUMNS",
    "FORMATS",
    "ORIGIN_COLUMN",
    "PreferenceBatcher",
    "REASONS",
    "TASKS",
    "TokenizedPairs",
    "detect_format",
    "held_out_count",
    "load_pairs",
    "load_preference_dataset",
    "load_tokenizer",
    "make_batcher",
    "read_file",
    "render_conversation",
    "split_implicit",
    "synthetic_tasks",
    "tokenize_pairs",
]
