"""From files to token tensors: the toy's sentencepiece tokenizer (reading any tokenizer: data/tokenizer.py),
JSONL examples, batches and the two batch samplers train.py draws from.

Formats (the toy world writes these; a user's own data takes the same form):
- pretraining text: a plain UTF-8 file, one document per line (of any length);
- examples: JSONL, one {"prompt": str, "response": str} object per line (Alpaca's
  {"instruction", "input", "output"} is accepted too). The model sees
  BOS + template(prompt) + " " + response + EOS, and the fine-tuning loss counts only the response and
  EOS. The template is train.py's --template, else a chat model's own chat format, else "{prompt}" (the
  prompt verbatim).
Only regular files are read. Text that UTF-8 cannot encode (a stray byte, a lone surrogate escaped in
JSON) is refused with its file and line, before sentencepiece fails on it.
"""
import io
import json
import os

import sentencepiece as spm
import torch

from common import UserError, write_text
from data.tokenizer import load_tokenizer  # noqa: F401 (the programs' one way to read a tokenizer file)


def check_utf8(text: str, where: str) -> str:
    """sentencepiece (and every file a run writes) takes UTF-8 only, yet a Python str can hold what UTF-8
    cannot encode: a lone surrogate from a JSON escape such as "\\ud800", or a byte that was not UTF-8 in
    a file read with surrogateescape or in a command-line argument (Python keeps it as U+DC80..U+DCFF)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(e.object[e.start])
        what = f"the byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"a lone surrogate U+{char:04X}"
        raise UserError(f"{where} is not valid UTF-8 text ({what})") from None
    return text


def check_utf8_args(args: dict):
    """Every text and path flag of a program (vars() of its parsed arguments) is UTF-8 text."""
    for name, value in args.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                check_utf8(text, f"--{name}")


def read_text_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is reported with its line number. Only a
    regular file is read: a named pipe or a device (/dev/stdin, /dev/zero) would wait for a writer that
    never comes, or never end."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"cannot read {path}: not a regular file (a folder, a named pipe or a device)")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        check_utf8(line, f"{path}:{number}")
    return lines


def read_lines(path: str) -> list[str]:
    lines = [line.rstrip("\n") for line in read_text_lines(path) if line.strip()]
    if not lines:
        raise UserError(f"{path} holds no text")
    return lines


def read_examples(path: str) -> list[dict]:
    """JSONL -> [{"prompt", "response"}]; a malformed line is reported with its file and line number."""
    examples = []
    for number, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        except RecursionError:  # json gives up on arrays or objects nested ~1,000 deep
            raise UserError(f"{path}:{number}: JSON nested too deeply to read") from None
        if isinstance(row, dict) and "instruction" in row and "output" in row:  # Alpaca
            if not all(isinstance(row.get(k, ""), str) for k in ("instruction", "input", "output")):
                raise UserError(f'{path}:{number}: "instruction", "input" and "output" must be strings')
            prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
            row = {"prompt": prompt, "response": row["output"]}
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("response"), str)):
            raise UserError(f'{path}:{number}: expected an object with string "prompt" and "response"')
        for key in ("prompt", "response"):
            check_utf8(row[key], f'{path}:{number}: "{key}"')
        examples.append({"prompt": row["prompt"], "response": row["response"]})
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


SENTENCEPIECE_MAX_BYTES = 4192  # the trainer's max_sentence_length: it skips any longer line, silently


def tokenizer_sentences(lines: list[str]):
    """The lines as the tokenizer trainer takes them: a line longer than SENTENCEPIECE_MAX_BYTES (a whole
    document on one line) goes in pieces, cut at a space where there is one, never inside a character.
    Whole, it would be skipped, and a text of only such lines would leave the trainer nothing."""
    for line in lines:
        data = line.encode("utf-8")
        while len(data) > SENTENCEPIECE_MAX_BYTES:
            cut = data.rfind(b" ", 1, SENTENCEPIECE_MAX_BYTES + 1)
            if cut < 1:
                cut = SENTENCEPIECE_MAX_BYTES
                while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: step back to the character's start
                    cut -= 1
            yield data[:cut].decode("utf-8")
            data = data[cut:]
        yield data.decode("utf-8")


def train_tokenizer(lines: list[str], path: str, vocab_size: int):
    """Train a small BPE sentencepiece model on the pretraining text and write it to `path`."""
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=tokenizer_sentences(lines), model_writer=buffer, model_type="bpe",
            vocab_size=vocab_size, character_coverage=1.0,
            byte_fallback=True,  # any UTF-8 text encodes, even unseen characters
            hard_vocab_limit=False, bos_id=1, eos_id=2, pad_id=-1, unk_id=0, minloglevel=2,
            num_threads=1)  # one thread: the same corpus gives the same tokenizer every time
    except RuntimeError as e:  # e.g. a vocabulary too small for the text's characters
        raise UserError(f"cannot train the tokenizer: {str(e).splitlines()[0]}") from None
    write_text(path, buffer.getvalue(), mode="wb")


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
        raise UserError(f"the template must contain {{prompt}} exactly once: {template!r}")
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


# ---- samplers: the same global batch on every process (each takes its own share of it) -------------

class WindowBatches:
    """Pretraining: random windows of the packed token stream."""

    def __init__(self, stream: torch.Tensor, n_windows: int, seq_len: int, seed: int):
        self.stream, self.n_windows, self.seq_len = stream, n_windows, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self):
        return random_windows(self.stream, self.n_windows, self.seq_len, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])


class ExampleBatches:
    """Fine-tuning: shuffled epochs of examples, padded to the longest in the batch (targets -100 on
    padding and prompts)."""

    def __init__(self, encoded: list, batch_size: int, pad_id: int, seed: int):
        self.encoded, self.batch_size, self.pad_id = encoded, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order = []  # example indices still to come in this epoch

    def next(self):
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.encoded), generator=self.generator).tolist()
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return example_batch([self.encoded[i] for i in batch], pad_id=self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
