"""What exact deduplication hashes (kept out of modules with postponed annotations: datatrove reads
the getter's return annotation to pick its hash function)."""

from datatrove.data import Document
from datatrove.utils.hashing import HashConfig

# sha1 (hashlib): datatrove's default, xxhash, needs xxhash<4, older than what datasets and wandb bring.
HASH = HashConfig(precision=64, hash_fc="sha1")


def document_text(doc: Document) -> str:
    """A document's whole text: byte-identical documents are exact duplicates."""
    return doc.text
