"""From files to token tensors: the sentencepiece tokenizer, JSONL examples, batches.

Formats (the toy world writes these; a user's own data takes the same form):
- pretraining text: a plain UTF-8 file, one document per line;
- examples: JSONL, one {"prompt": str, "response": str} object per line (Alpaca's
  {"instruction", "input", "output"} is accepted too). The model sees
  BOS + template(prompt) + " " + response + EOS, and the fine-tuning loss counts only the response and
  EOS. The template is "{prompt}" (the prompt verbatim) unless train.py's --template says otherwise.
"""
import io
import json
import os

import sentencepiece as spm
import torch


class DataError(ValueError):
    """Bad input data: the programs print the message on one line and exit with status 2."""


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not lines:
        raise DataError(f"{path} holds no text")
    return lines


def read_examples(path: str) -> list[dict]:
    """JSONL -> [{"prompt", "response"}]; a malformed line is reported with its file and line number."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "instruction" in row and "output" in row:  # Alpaca
            if not all(isinstance(row.get(k, ""), str) for k in ("instruction", "input", "output")):
                raise DataError(f'{path}:{number}: "instruction", "input" and "output" must be strings')
            prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
            row = {"prompt": prompt, "response": row["output"]}
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("response"), str)):
            raise DataError(f'{path}:{number}: expected an object with string "prompt" and "response"')
        examples.append({"prompt": row["prompt"], "response": row["response"]})
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def train_tokenizer(lines: list[str], path: str, vocab_size: int):
    """Train a small BPE sentencepiece model on the pretraining text and write it to `path`."""
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True,  # any UTF-8 text encodes, even unseen characters
            hard_vocab_limit=False, bos_id=1, eos_id=2, pad_id=-1, unk_id=0, minloglevel=2,
            num_threads=1)  # one thread: the same corpus gives the same tokenizer every time
    except RuntimeError as e:  # e.g. a vocabulary too small for the text's characters
        raise DataError(f"cannot train the tokenizer: {str(e).splitlines()[0]}") from None
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None


def token_stream(lines: list[str], sp) -> torch.Tensor:
    """All documents as one long 1-D tensor, each wrapped in BOS ... EOS, for packed pretraining."""
    ids = []
    for doc in sp.encode(lines):
        ids += [sp.bos_id(), *doc, sp.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    """`batch` random windows of seq_len + 1 tokens: inputs are [:-1], next-token targets [1:]."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
    chunk = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


PLAIN_TEMPLATE = "{prompt}"


def check_template(template: str) -> str:
    if template.count("{prompt}") != 1:
        raise DataError(f"the template must contain {{prompt}} exactly once: {template!r}")
    return template


def apply_template(template: str, prompt: str) -> str:
    return template.replace("{prompt}", prompt)


def encode_example(example: dict, sp, template: str = PLAIN_TEMPLATE) -> tuple[list[int], int]:
    """Token ids of BOS + template(prompt) + response + EOS, and where the response starts."""
    prompt = [sp.bos_id()] + sp.encode(apply_template(template, example["prompt"]))
    # sentencepiece marks a word start with a leading "▁", so encoding the response on its own gives
    # the same pieces as encoding it after a space: prompt + " " + response.
    return prompt + sp.encode(example["response"]) + [sp.eos_id()], len(prompt)


def example_batch(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded (inputs, targets); targets are -100 (ignored) except on response tokens and EOS."""
    width = max(len(ids) for ids, _ in encoded) - 1
    inputs = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    targets = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, start) in enumerate(encoded):
        ids = torch.tensor(ids)
        inputs[row, :len(ids) - 1] = ids[:-1]
        # target[t] is the token after input[t]; the first response token is predicted at start - 1.
        targets[row, start - 1:len(ids) - 1] = ids[start:]
    return inputs, targets
