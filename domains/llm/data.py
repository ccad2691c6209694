"""Real text, offline, in three domains, tokenised and packed into fixed-length blocks.

- ``bible``: the King James Bible from Debian's ``bible-kjv`` (its ``bible`` program decompresses
  the packaged text; one document per chapter);
- ``fortunes``: Debian's ``fortunes`` cookie files in /usr/share/games/fortunes (one per fortune);
- ``python``: the running interpreter's own standard library sources (one document per module);
- any user file: ``.jsonl`` (one document per line, its ``text`` field) or plain text (documents
  separated by blank lines); the domain is named after the file's stem.

Per domain the documents are shuffled by ``split_seed`` (independent of training seeds); the first
ones fill the held-out blocks, the next ones the training blocks and, when asked for, the next ones
the steering blocks (the validation data DDK re-weights the mixture by, kept apart from the held-out
blocks the results are reported on), so no document is in two splits. Tokens of
consecutive documents are joined with the tokenizer's EOS and cut into non-overlapping blocks of
``block_size + 1`` tokens: x = block[:-1], y = block[1:].
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

FORTUNES_DIR = Path("/usr/share/games/fortunes")
BUILTIN_SOURCES = ("bible", "fortunes", "python")


def bible_documents() -> list[str]:
    """The KJV, one document per chapter (verse references stripped)."""
    program = shutil.which("bible")
    if program is None:
        raise FileNotFoundError("the 'bible' text domain needs Debian's bible-kjv package: "
                                "sudo apt-get install bible-kjv")
    out = subprocess.run([program, "-f", "gen1:1-rev22:21"], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        ref, _, verse = line.partition(" ")
        if verse:
            chapters.setdefault(ref.split(":")[0], []).append(verse)
    return [" ".join(verses) for verses in chapters.values()]


def fortune_documents(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune of every cookie file (files without the .dat index / .u8 link suffixes)."""
    files = sorted(p for p in directory.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix) \
        if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"the 'fortunes' text domain needs Debian's fortunes package (no cookie files "
                                f"in {directory}): sudo apt-get install fortunes")
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if d.strip()]
    return docs


def python_documents() -> list[str]:
    """The standard library's top-level modules of the running interpreter."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources in {stdlib} (a stripped interpreter?)")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def file_documents(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{n}: each JSONL line must be an object with a string 'text' field")
                docs.append(record["text"])
        return docs
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def source_documents(source: str) -> tuple[str, list[str]]:
    """(domain name, documents) for a built-in source name or a file path."""
    if source == "bible":
        return source, bible_documents()
    if source == "fortunes":
        return source, fortune_documents()
    if source == "python":
        return source, python_documents()
    if "/" in source or "." in source:
        return Path(source).stem, file_documents(source)
    raise ValueError(f"unknown text source {source!r}: use one of {BUILTIN_SOURCES} or a .txt/.jsonl path")


def pack_blocks(documents: list[str], tokenizer, block_size: int, eval_blocks: int, train_blocks: int,
                seed: int, name: str, steer_blocks: int = 0) -> dict[str, torch.Tensor]:
    """``{"heldout": [eval_blocks, block_size + 1], "train": [<= train_blocks, block_size + 1]}`` int64,
    plus ``"steer": [steer_blocks, block_size + 1]`` when ``steer_blocks > 0``.

    Only as many (shuffled) documents are tokenised as the blocks need; the steering documents come
    after the training ones, so asking for them leaves the held-out and training blocks unchanged.
    Raises ValueError when the text tokenises to too little for the held-out blocks and at least one
    training block (and, if asked for, the steering blocks)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    need = {"heldout": eval_blocks * (block_size + 1), "train": train_blocks * (block_size + 1)}
    if steer_blocks > 0:
        need["steer"] = steer_blocks * (block_size + 1)
    splits = list(need)
    streams: dict[str, list[int]] = {key: [] for key in splits}
    current = 0
    for i in order:
        ids = tokenizer(documents[i], add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        split = splits[current]
        streams[split] += ids + [eos]
        if len(streams[split]) >= need[split]:
            current += 1
            if current == len(splits):
                break
    out = {}
    for key, stream in streams.items():
        n = min(len(stream), need[key]) // (block_size + 1)
        if n == 0 or (key == "heldout" and n < eval_blocks) or (key == "steer" and n < steer_blocks):
            steer = f", {steer_blocks} steering blocks" if steer_blocks > 0 else ""
            raise ValueError(
                f"text domain {name!r} tokenises to {sum(len(s) for s in streams.values())} tokens in all "
                f"({len(documents)} documents): too few for {eval_blocks} held-out blocks{steer} and a training "
                f"block of {block_size + 1} tokens")
        out[key] = torch.tensor(stream[: n * (block_size + 1)], dtype=torch.int64).view(n, block_size + 1)
    return out
