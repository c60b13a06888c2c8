"""Plumbing that train.py and infer.py both need, kept out of their way: the user-error type, writes
that never leave a half-written file, our own checkpoint files and the names of a run's files, and the
command-line runner (other formats: checkpoints/). Imports nothing from the programs.
"""
import argparse
import hashlib
import json
import os
import sys
from contextlib import contextmanager

import torch


class UserError(Exception):
    """The user's mistake: a bad flag, a missing or malformed file, checkpoints that do not belong
    together. The programs print it on one line and exit with status 2. Anything else that goes wrong
    is our bug and ends in a normal traceback."""


# What a run leaves in its out_dir (train.py writes them, infer.py reads them).
FILES = {"base": "base.pt", "tuned": "finetuned.pt", "snapshot": "ffn_snapshot.pt", "tokenizer": "tokenizer.model",
         "results": "results.json", "auto": "auto.json",
         # in place of tokenizer.model, a fine-tune of a tokenizer.json or GGUF base keeps these two
         "tokenizer_json": "tokenizer.json", "tokenizer_config": "tokenizer_config.json"}


# ---- files ---------------------------------------------------------------------------------------

@contextmanager
def atomic_write(path: str):
    """Yields a temporary name to write to; once the body has finished, the file is renamed to `path`.
    A crash or a kill at any moment leaves either the old file or the new one, never half of one. A
    write the operating system refuses (OSError: read-only folder, full disk) removes the temporary file
    and becomes a UserError; the temporary file is removed whatever went wrong."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str, mode: str = "w"):
    with atomic_write(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        f.write(text)


def write_json(path: str, obj):
    write_text(path, json.dumps(obj, indent=2))


def make_dir(path: str):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {path}: {e.strerror or e}") from None


def inside(folder: str, name: str) -> str:
    """folder/name, for a name read from a file's contents (a shard index, a config): refused when it would
    leave the folder (an absolute path, '..', a symbolic link out of it), so that a write built from it
    never lands on a file elsewhere."""
    path, root = os.path.join(folder, name), os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.isabs(name) or real == root or os.path.commonpath([root, real]) != root:
        raise UserError(f"{name!r} is not a name inside the folder {folder}: refused (it would leave it)")
    return path


def save_checkpoint(path: str, obj: dict):
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's writer reports a write the disk refused as an error of its own
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None  # which atomic_write turns into one line
            raise


def remove(*paths: str):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def file_fingerprint(*paths: str) -> str:
    """Names files by their content: total size and SHA-256 of their bytes (a second per GB or so, cheap
    next to training on them). Two runs that read the same bytes get the same fingerprint, whatever the
    files are called; one changed byte, and they do not."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        try:
            digest.update(f"{os.path.basename(path)} {os.path.getsize(path)}\n".encode())  # where each file ends
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"


def load_checkpoint(path: str, keys=("model", "config"), mmap: bool = False) -> dict:
    """A dict holding at least `keys`. weights_only=True: a file can never run code when loaded. mmap: the
    tensors are read from disk only when touched (to look at a big checkpoint's settings)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # a truncated file, a pickle that would run code, not a checkpoint at all
        raise UserError(f"cannot load {path}: not a checkpoint of plain tensors (refused or corrupt)") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise UserError(f"{path} is not a checkpoint of this project (expected the keys {', '.join(keys)})")
    return ckpt


# ---- the command line ------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit status 2), without the usage block, and takes
    no abbreviations: --out would silently be --out_dir, and a guard that reads flags as text would miss it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when a GPU is there, else cpu; anything else must name a usable device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no Apple GPU (Metal) is available here")
    return device


def run_cli(main, who: str = ""):
    """Run a program's main(): a UserError is one line on stderr and exit status 2; Ctrl-C is exit
    status 130 with the program's word on what it saved; any other exception is a bug and keeps its
    traceback. `who` prefixes the messages (under torchrun, which process speaks); only the process
    with no prefix reports an interruption, so a job stopped with Ctrl-C says it once."""
    try:
        main()
    except UserError as e:
        print(f"{who}error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if not who:
            print(f"interrupted: {str(e) or 'nothing was saved'}", file=sys.stderr)
        sys.exit(130)

