"""Data for fedsoda: where it lives (paths), public proxy text (public), client tasks (tasks),
SFT batches (sft), GSM8K answer extraction (answers) and client partitions (partition)."""

from fedsoda_cli.data.answers import extract_gsm8k_answer, normalize_number
from fedsoda_cli.data.partition import partition, partition_examples, partition_stats
from fedsoda_cli.data.paths import data_file, resolve_data_dir
from fedsoda_cli.data.public import public_sequences
from fedsoda_cli.data.sft import encode_answer, encode_prompt, sft_batch
from fedsoda_cli.data.tasks import Example, load_task

__all__ = [
    "Example",
    "data_file",
    "encode_answer",
    "encode_prompt",
    "extract_gsm8k_answer",
    "load_task",
    "normalize_number",
    "partition",
    "partition_examples",
    "partition_stats",
    "public_sequences",
    "resolve_data_dir",
    "sft_batch",
]
