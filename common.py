"""Plumbing that train.py and infer.py both need, kept out of their way: the user-error type, writes
that never leave a half-written file, checkpoints (ours and Hugging Face's), the names of a run's files,
and the command-line runner. Imports nothing from the programs.
"""
import argparse
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager

import torch

from model import to_hf


class UserError(Exception):
    """The user's mistake: a bad flag, a missing or malformed file, checkpoints that do not belong
    together. The programs print it on one line and exit with status 2. Anything else that goes wrong
    is our bug and ends in a normal traceback."""


# What a run leaves in its out_dir (train.py writes them, infer.py reads them).
FILES = {"base": "base.pt", "tuned": "finetuned.pt", "snapshot": "ffn_snapshot.pt", "tokenizer": "tokenizer.model",
         "results": "results.json", "auto": "auto.json"}


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


class DirectoryLock:
    """One run at a time per folder: an exclusive lock (flock) on FOLDER/.lock, which holds the holder's
    pid. The operating system releases it when the holder exits, however it exits, so a killed run never
    leaves a stale lock behind. Taking it also checks, before any training, that files can be created in
    the folder. Use as `with DirectoryLock(folder):`."""

    def __init__(self, folder: str):
        self.folder = folder

    def __enter__(self):
        make_dir(self.folder)
        try:
            self.file = open(os.path.join(self.folder, ".lock"), "a+")
            tempfile.TemporaryFile(dir=self.folder).close()  # a file of our own can be created here
        except OSError as e:
            raise UserError(f"cannot write in {self.folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.folder} is in use by another run (pid {holder}); wait for it, or use another "
                            "--out_dir") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing the file releases the lock


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


def save_hf(model, path: str):
    """Write a model.Transformer as a Hugging Face Llama directory (config.json + model.safetensors)
    that transformers.LlamaForCausalLM and Transformer.from_pretrained load."""
    from safetensors.torch import save_file  # an optional dependency: only this function needs it
    hf_config, state = to_hf(model)
    make_dir(path)
    with atomic_write(os.path.join(path, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_json(os.path.join(path, "config.json"), hf_config)


# ---- the command line ------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when a GPU is there, else cpu; anything else must name a usable device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
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

