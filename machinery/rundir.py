"""A run's folder and what keeps it consistent: the lock that allows one run per folder, each stage's
settings (flags and inputs named by content), whether a stage is finished already, the order in which a
stage's outputs are saved (so that a kill at any moment leaves a consistent folder), the leftovers of a
killed save, and the resumable state a stopped stage continues from.
"""
import os
import tempfile
from dataclasses import asdict

import torch

import taia
from common import FILES, UserError, file_fingerprint, load_checkpoint, make_dir, remove, save_checkpoint
from data.tokenizer import tokenizer_files
from machinery import Interrupted, all_reduce_loss_and_stop, barrier, is_main, log
from machinery.fsdp import gathered_model_state, gathered_optimizer_state, load_whole_state, sharded
from model import ModelConfig


# ---- one run at a time ------------------------------------------------------------------------------

class DirectoryLock:
    """One run at a time per folder: an exclusive lock on FOLDER/.lock, which holds the holder's pid. The
    operating system releases it when the holder exits, however it exits, so a killed run never leaves a
    stale lock behind (flock on POSIX, msvcrt.locking on Windows). Taking it also checks, before any
    training, that files can be created in the folder. Use as `with DirectoryLock(folder):`."""

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
            lock_file(self.file)
        except OSError:  # held by another process (BlockingIOError on POSIX, PermissionError on Windows)
            try:
                self.file.seek(0)
                holder = self.file.read().strip() or "unknown"
            except OSError:  # Windows: the holder's lock covers what we would read
                holder = "unknown"
            self.file.close()
            raise UserError(f"{self.folder} is in use by another run (pid {holder}); wait for it, or use another "
                            "--out_dir") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing the file releases the lock


def lock_file(file):
    """An exclusive, non-blocking lock on an open file, released when it is closed; OSError if held."""
    try:
        import fcntl
    except ImportError:  # Windows: lock the file's first byte
        import msvcrt
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)



# ---- a stage's settings, and whether it is finished ---------------------------------------------------
# A stage's settings: its flags, the seed, and its inputs named by content (file_fingerprint), so that a
# changed file counts as a changed setting. Its output file records them; --resume compares them.
PRETRAIN_KEYS = ("pretrain_text", "pretrain_steps", "pretrain_lr", "batch_tokens", "seq_len", "weight_decay",
                 "vocab_size", "preset", "dim", "n_layers", "hidden_dim", "dtype")
FINETUNE_KEYS = ("init_from", "finetune", "finetune_set", "template", "finetune_steps", "finetune_lr",
                 "finetune_batch", "lora_rank", "lora_alpha", "lora_dropout", "dtype")
PATHS = ("pretrain_text", "finetune", "init_from")  # recorded, but compared by the content they name


def pretrain_settings(args, seed: int, text_path: str) -> dict:
    return {**{k: getattr(args, k) for k in PRETRAIN_KEYS}, "seed": seed, "pretrain_data": file_fingerprint(text_path)}


def finetune_settings(args, seed: int, data_path: str, base_files: list[str], more: dict) -> dict:
    """`base_files`: the files of the base fine-tuning starts from; `more`: what extensions add (their
    options when used, their inputs by content)."""
    settings = {k: getattr(args, k) for k in FINETUNE_KEYS}
    if settings["init_from"]:
        settings["init_from"] = os.path.abspath(args.init_from)
    return {**settings, **more, "seed": seed, "finetune_data": file_fingerprint(data_path),
            "base": file_fingerprint(*base_files)}


def resume_key(settings: dict, **more) -> dict:
    """What a resumed run must share with the stopped one: everything but the learning rate, which may be
    lowered after a non-finite loss, and the paths of inputs, whose contents are in the key instead."""
    return {**{k: v for k, v in settings.items() if not k.endswith("_lr") and k not in PATHS}, **more}


def finished(args, out_dir: str, stage: str, settings: dict) -> bool:
    """With --resume, a training stage whose output is there and that left no state is done already, if
    that output was made with these settings and inputs. One made otherwise is refused: skipping the stage
    would report a model these flags did not train."""
    path = os.path.join(out_dir, FILES["base" if stage == "pretrain" else "tuned"])
    if not (args.resume and os.path.exists(path) and not os.path.exists(state_path(out_dir, stage))):
        return False
    made_with = load_checkpoint(path, keys=(stage,), mmap=True)[stage]
    differ = [f"{k} {made_with.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(settings) | set(made_with))
              if made_with.get(k) != settings.get(k) and k not in PATHS]
    if differ:
        raise UserError(f"--resume: {path} was made with other settings or inputs ({'; '.join(differ)}): run "
                        f"without --resume to redo {stage}, or resume with the same flags and files")
    log(args, f"{stage}: finished already with these settings ({path}); skipped")
    return True


# ---- saving a stage's outputs in a safe order --------------------------------------------------------

def save_pretrained(out_dir: str, weights: dict, cfg: ModelConfig, settings: dict, tokenizer_path: str):
    """base.pt and its tokenizer, in an order that leaves a consistent folder at every instant: first what
    was made from the old base goes (and the old base), then the new tokenizer replaces the old one, and
    base.pt comes last. base.pt names its tokenizer by fingerprint; its presence says "pretrained"."""
    remove(*(os.path.join(out_dir, FILES[k]) for k in ("results", "auto", "tuned", "snapshot", "base")),
           state_path(out_dir, "finetune"))
    os.replace(tokenizer_path + ".new", tokenizer_path)
    save_checkpoint(os.path.join(out_dir, FILES["base"]),
                    {"model": weights, "config": asdict(cfg), "seed": settings["seed"],
                     "pretrain": settings, "tokenizer": file_fingerprint(tokenizer_path)})


def save_finetuned(out_dir: str, tuned: dict, original_ffn: dict, cfg: ModelConfig, settings: dict, base_ffn: str,
                   tokenizer):
    """ffn_snapshot.pt and finetuned.pt (and for an --init_from base, which stays where it is, a copy of
    its tokenizer in its own format: tokenizer.model, or tokenizer.json + tokenizer_config.json), in an
    order that leaves a consistent folder at every instant: the old results and fine-tune go first,
    finetuned.pt (whose presence says "fine-tuned") comes last."""
    remove(*(os.path.join(out_dir, FILES[k]) for k in ("results", "auto", "tuned")))
    own_tokenizer = tokenizer.save(out_dir)  # (the toy's is there already: nothing is copied)
    save_checkpoint(os.path.join(out_dir, FILES["snapshot"]), {"ffn": original_ffn})
    save_checkpoint(os.path.join(out_dir, FILES["tuned"]),
                    {"model": {k: v.detach().cpu() for k, v in tuned.items()}, "config": asdict(cfg),
                     "base_ffn": base_ffn, "finetune": settings, "init_from": settings["init_from"],
                     "tokenizer": file_fingerprint(*tokenizer_files(own_tokenizer))})


def finish_stage(args, out_dir: str, stage: str, stop):
    """The stage's outputs are on disk: its resumable state is no longer needed. A Ctrl-C that came with the
    last step or while the outputs were saved stops the run here, before the next stage."""
    if is_main(args):
        remove(state_path(out_dir, stage))
    barrier(args)
    if all_reduce_loss_and_stop(0.0, stop, args)[1]:  # every process asks: any one of them may have been stopped
        raise Interrupted(f"{stage}: Ctrl-C came as the stage ended; it finished and saved its outputs, and the run "
                          "stopped before the next stage (--resume goes on from there)")


def run_files() -> list[str]:
    return [*FILES.values(), FILES["tokenizer"] + ".new", *(state_path("", s) for s in ("pretrain", "finetune"))]


def remove_leftovers(out_dir: str, data_paths: list[str]):
    """The *.tmp files a killed save left behind. Only names this program writes (the run's files and the
    data files in `data_paths`), and only while this run holds the folder's lock, so that no other run's
    file under way is touched."""
    remove(*(os.path.join(out_dir, name + ".tmp") for name in run_files()),
           *(path + ".tmp" for path in data_paths))


def on_disk(out_dir: str) -> str:
    """Which of a run's files are in out_dir now: what a stopped run tells its user."""
    there = [name for name in ["data/", *run_files()] if os.path.exists(os.path.join(out_dir, name))]
    return f"{out_dir} holds {', '.join(there)}" if there else f"nothing of this run is in {out_dir}"


# ---- the resumable state of a stage under way ----------------------------------------------------------

def rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and len(states.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def state_path(out_dir: str, stage: str) -> str:
    return os.path.join(out_dir, f"{stage}_state.pt")


def trained_tensors(model) -> dict:
    """The parameters training changes: all that a resumable state must hold. Under LoRA, the adapters only;
    the frozen base they sit on is named by the fingerprint in the run key instead of copied."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class TrainingState:
    """OUT/<stage>_state.pt: the trained weights, optimizer, scaler, step, the batch sampler's position and
    the RNG states, and `run_key` (what a resumed run must share with the stopped one). An interval checkpoint
    is written one step late, once the next loss has shown its weights are good."""

    def __init__(self, out_dir, stage, run_key, model, optimizer, scaler, batches, args):
        # (a sharded run's optimizer state is saved by parameter name, a plain one's by number: not interchangeable)
        run_key = {**run_key, "fsdp": True} if sharded(args) else run_key
        self.path, self.stage, self.run_key, self.args = state_path(out_dir, stage), stage, run_key, args
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.saved_at, self.due, self.before = None, False, None

    def resume(self, steps: int) -> int:
        """With --resume and a state on disk, load it and return its step; else 0."""
        if not os.path.exists(self.path):
            return 0
        if not self.args.resume:
            log(self.args, f"{self.stage}: starting over; {self.path} is from a stopped run (--resume continues it)")
            return 0
        state = load_checkpoint(self.path, keys=("model", "optimizer", "scaler", "step", "data", "rng", "run"))
        if state["run"] != self.run_key:
            differ = sorted(k for k in set(self.run_key) | set(state["run"])
                            if state["run"].get(k) != self.run_key.get(k))
            raise UserError(f"{self.path} was saved by a run with other settings ({', '.join(differ)}); "
                            "resume with the same settings, or delete it to start over")
        trained = trained_tensors(self.model)
        try:
            taia.check_same_layout(trained, state["model"], "the trained parameters", self.path)
        except ValueError as e:
            raise UserError(f"{e}; delete it to start over") from None
        if sharded(self.args):  # whole tensors in the file: each process takes its shards
            load_whole_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            with torch.no_grad():
                for name, tensor in trained.items():
                    tensor.copy_(state["model"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the stopped run did not use float16
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        set_rng_states(state["rng"])
        self.saved_at = state["step"]
        log(self.args, f"{self.stage}: resuming from {self.path} at step {self.saved_at}/{steps}")
        return self.saved_at

    def position(self) -> dict:
        """Where the batches and random numbers stand."""
        return {"data": self.batches.state_dict(), "rng": rng_states()}

    def before_batch(self):
        """Called before a step draws its batch: remember the position, if a save is due this step."""
        self.before = self.position() if self.due else None

    def save_if_due(self, step: int):
        """Called once the step's loss is known to be finite: the weights before its update are good."""
        if self.due:
            self.save(step, self.before)
            self.due = False

    def after_update(self, done: int, steps: int):
        self.due = bool(self.args.save_interval) and done % self.args.save_interval == 0 and done < steps

    def save(self, step: int, position: dict):
        if sharded(self.args):  # every process sends its shards; rank 0 writes whole tensors
            model, optimizer = gathered_model_state(self.model), gathered_optimizer_state(self.model, self.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        if is_main(self.args):
            trained = trained_tensors(self.model)
            save_checkpoint(self.path, {"model": {k: v.detach() for k, v in model.items() if k in trained},
                                        "optimizer": optimizer,
                                        "scaler": self.scaler.state_dict(), "step": step, **position,
                                        "run": self.run_key})
        self.saved_at = step
        barrier(self.args)

    def stop(self, done: int, steps: int):
        """Ctrl-C: save where the run stands now, and leave with exit status 130."""
        self.save(done, self.position())
        raise Interrupted(f"{self.stage}: stopped at step {done}/{steps}; saved {self.path}. Run the same "
                          "command with --resume to continue")
