"""The on-disk formats, in one place that imports nothing else of the project.

- `indexed`: Megatron-LM's `MMapIndexedDataset` (`.bin`/`.idx`) reader and streaming writer.
- `manifest`: a dataset folder's `manifest.json`, the tokenizer's vocabulary hash and special-token ids.
- `tokenizer`: the one tokenizer loader.
- `atomic`: the one family of atomic, durable writes (files, JSON, folders).

`data_prep` (the writing side) and `alectra.data` (the reading side) both import it; neither imports
the other.
"""

from alectra.storage.atomic import write_dir_atomically, write_json_atomic, write_text_atomic
from alectra.storage.indexed import IndexedDataset, IndexedDatasetWriter, IndexFormatError, token_dtype
from alectra.storage.manifest import (
    FORMAT,
    MANIFEST_NAME,
    MODEL_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    check_tokenizer,
    load_manifest,
    special_token_ids,
    tokenizer_info,
)
from alectra.storage.tokenizer import TokenizerError, load_tokenizer

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "MODEL_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "IndexFormatError",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "TokenizerError",
    "check_tokenizer",
    "load_manifest",
    "load_tokenizer",
    "special_token_ids",
    "token_dtype",
    "tokenizer_info",
    "write_dir_atomically",
    "write_json_atomic",
    "write_text_atomic",
]
