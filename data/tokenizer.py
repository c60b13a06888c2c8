"""Tokenizers in, whatever their file, behind one small interface; the rest of the code never asks which
kind it holds. Two kinds:

- SentencePiece: a sentencepiece `tokenizer.model` (the toy world's, Llama-2's, TinyLlama's), read by
  sentencepiece itself;
- HFTokenizer: a `tokenizer.json` (Llama 3, SmolLM2, Mistral v0.3) read by Hugging Face's `tokenizers`,
  with its special tokens and chat template from `tokenizer_config.json` beside it; or the same built
  from a GGUF file's metadata (checkpoints/gguf.py calls byte_level_bpe).

The interface: encode(text, or a list of texts) -> ids, never adding BOS or EOS (the callers place them);
decode(ids) -> text, special tokens left out; bos_id(), eos_id() (padding is EOS); vocab_size();
id_to_piece(i) in sentencepiece's notation ("▁" starts a word); is_byte(i) (a piece that is part of a
character, not text); is_control(i) (a special token); chat_template (the checkpoint's Jinja template,
or None); save(folder) -> the path of the copy a run keeps; files(path) -> what its copy consists of.
"""
import json
import os
import re
import shutil
from datetime import datetime

import sentencepiece as spm

from common import UserError, atomic_write, write_json, write_text


class SentencePiece(spm.SentencePieceProcessor):
    """sentencepiece's processor as it is (it has the interface already), knowing the file it came from."""
    file_name = "tokenizer.model"
    chat_template = None  # a Hugging Face directory's lives in tokenizer_config.json (see chat_template_in)

    def __init__(self, path: str):
        super().__init__(model_file=path)
        self.path = path

    def save(self, folder: str) -> str:
        """Copy the file into folder (byte for byte: a run's fingerprint names it)."""
        target = os.path.join(folder, self.file_name)
        if os.path.abspath(target) != os.path.abspath(self.path):
            with atomic_write(target) as tmp:
                shutil.copyfile(self.path, tmp)
        return target

    @staticmethod
    def files(path: str) -> list[str]:
        return [path]


# ---- tokenizer.json, through the tokenizers library -------------------------------------------------

def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each of the 256 bytes: the alphabet byte-level BPE vocabularies are
    spelled in ("Ġ" is the space byte, "Ċ" the newline)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_OF = {char: byte for byte, char in byte_alphabet().items()}
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece's byte fallback, also in Metaspace tokenizer.json


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the ids of its BOS and EOS tokens and its chat template, which a
    tokenizer.json does not hold itself (tokenizer_config.json, config.json or a GGUF file's metadata do)."""
    file_name = "tokenizer.json"
    config_name = "tokenizer_config.json"

    def __init__(self, tokenizer, bos_id: int, eos_id: int, chat_template: str | None, where: str):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, i in (("BOS", bos_id), ("EOS", eos_id)):
            if not 0 <= i < size:
                raise UserError(f"{where}: the {name} token id {i} is not in the tokenizer's {size} tokens")
        self._bos, self._eos, self._size = bos_id, eos_id, size
        self.special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self.byte_level = "ByteLevel" in repr(tokenizer.decoder)  # GPT-2's byte alphabet, else sentencepiece's "▁"
        self.pieces = None  # (piece, is_byte) of every id, made when first asked for

    def encode(self, text):
        if isinstance(text, str):
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return [e.ids for e in self.tokenizer.encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def bos_id(self) -> int:
        return self._bos

    def eos_id(self) -> int:
        return self._eos

    def vocab_size(self) -> int:
        return self._size

    def piece(self, i: int) -> tuple[str, bool]:
        """Token i in sentencepiece's notation, and whether it is a byte rather than text. A byte-level
        token is turned back into its bytes: a leading space becomes "▁", and bytes that are not whole
        UTF-8 characters make a byte piece."""
        if self.pieces is None:
            self.pieces = [self.spell(self.tokenizer.id_to_token(n) or "") for n in range(self._size)]
        return self.pieces[i]

    def spell(self, token: str) -> tuple[str, bool]:
        if not self.byte_level:
            return token, bool(BYTE_PIECE.fullmatch(token))
        if not all(char in BYTE_OF for char in token):  # an added token written as plain text
            return token, False
        try:
            text = bytes(BYTE_OF[char] for char in token).decode("utf-8")
        except UnicodeDecodeError:
            return token, True
        return ("▁" + text[1:] if text.startswith(" ") else text), False

    def id_to_piece(self, i: int) -> str:
        return self.piece(i)[0]

    def is_byte(self, i: int) -> bool:
        return self.piece(i)[1]

    def is_control(self, i: int) -> bool:
        return i in self.special

    def save(self, folder: str) -> str:
        """tokenizer.json and tokenizer_config.json, as transformers writes them (AutoTokenizer loads the
        folder), naming the BOS and EOS tokens and holding the chat template."""
        token = self.tokenizer.id_to_token
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(self._bos),
                  "eos_token": token(self._eos), "pad_token": token(self._eos), "clean_up_tokenization_spaces": False}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        path = os.path.join(folder, self.file_name)
        write_text(path, self.tokenizer.to_str())
        write_json(os.path.join(folder, self.config_name), config)
        return path

    @classmethod
    def files(cls, path: str) -> list[str]:
        return [path, os.path.join(os.path.dirname(path), cls.config_name)]


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def chat_template_in(folder: str) -> str | None:
    """The chat template of a Hugging Face directory: tokenizer_config.json's chat_template (a string, or a
    list of named ones: "default"), or chat_template.jinja (where transformers >= 4.43 writes it)."""
    template = (read_json(os.path.join(folder, HFTokenizer.config_name), {}) or {}).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = os.path.join(folder, "chat_template.jinja")
    if not template and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template if isinstance(template, str) and template else None


def special_id(tokenizer, folder: str, name: str) -> int | None:
    """The id of the bos or eos token: tokenizer_config.json names the token ("<s>", or {"content": "<s>"});
    else generation_config.json or config.json give its id (the first, where a list gives several)."""
    token = (read_json(os.path.join(folder, HFTokenizer.config_name), {}) or {}).get(f"{name}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str):
        i = tokenizer.token_to_id(token)
        if i is None:
            raise UserError(f"{folder}: the {name} token {token!r} of tokenizer_config.json is not in tokenizer.json")
        return i
    for file in ("generation_config.json", "config.json"):
        i = (read_json(os.path.join(folder, file), {}) or {}).get(f"{name}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        if type(i) is int:
            return i
    return None


def load_tokenizer_json(path: str) -> HFTokenizer:
    """A tokenizer.json and what its folder says of it (see special_id, chat_template_in)."""
    from tokenizers import Tokenizer
    folder = os.path.dirname(path) or "."
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers reports every malformed file as a bare Exception
        raise UserError(f"{path} is not a tokenizers file ({str(e).splitlines()[0][:200]})") from None
    ids = {name: special_id(tokenizer, folder, name) for name in ("bos", "eos")}
    missing = [name.upper() for name, i in ids.items() if i is None]
    if missing:
        raise UserError(f"{folder} names no {' or '.join(missing)} token (tokenizer_config.json, "
                        "generation_config.json or config.json): they cannot be guessed")
    return HFTokenizer(tokenizer, ids["bos"], ids["eos"], chat_template_in(folder), path)


def load_tokenizer(path: str):
    """A sentencepiece tokenizer.model, or a tokenizer.json (with tokenizer_config.json beside it)."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        return load_tokenizer_json(path)
    try:
        return SentencePiece(path)
    except (RuntimeError, OSError) as e:
        raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None


def tokenizer_files(path: str) -> list[str]:
    """The files a tokenizer at path consists of (to name it by content)."""
    return (HFTokenizer if path.endswith(".json") else SentencePiece).files(path)


# ---- byte-level BPE from a vocabulary and merges (a GGUF file's "gpt2" tokenizer) ---------------------

# How a vocabulary's text is cut into words before merging, by llama.cpp's name for it (tokenizer.ggml.pre);
# it decides the ids, so one not listed here is refused rather than guessed.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(name: str):
    from tokenizers import Regex, pre_tokenizers as pt
    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex, then bytes -> alphabet
    splits = {
        "default": gpt2, "gpt2": gpt2,
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), gpt2]),  # SmolLM's tokenizer.json
        **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), pt.Sequence([  # Llama 3's own regex, then bytes
            pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pt.ByteLevel(add_prefix_space=False, use_regex=False)])),
    }
    if name not in splits:
        raise ValueError(f"tokenizer.ggml.pre {name!r} is a way of splitting text this loader does not know "
                         f"(known: {', '.join(sorted(splits))})")
    return splits[name]


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], split: str):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2's kind; Llama 3's and SmolLM's) from its vocabulary
    in id order, its merges ("a b", best first) and llama.cpp's token types (3: control, a special token;
    4: user-defined, matched whole in text)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    alphabet = byte_alphabet()
    spelled = [t if all(c in BYTE_OF for c in t) else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    if len(vocab) != len(tokens):
        raise ValueError("the vocabulary lists a token twice")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("a merge is not two tokens separated by one space")
    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # tokenizers reports every inconsistency (a merge of unknown tokens) as a bare Exception
        raise ValueError(f"its vocabulary and merges do not fit together ({e})") from None
    tokenizer.pre_tokenizer = pre_tokenizer(split)
    tokenizer.decoder = decoders.ByteLevel()
    types = list(token_types) or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == 4])
    return tokenizer


# ---- a chat template as a prompt template ------------------------------------------------------------

PLACEHOLDER = "\ue000prompt\ue000"  # private-use characters: no chat template writes them


def chat_prompt_template(chat_template: str, bos_token: str | None, eos_token: str | None, where: str) -> str:
    """The "{prompt}" template a chat model was trained with: its Jinja chat template rendered for one user
    turn and the start of the assistant's reply (as transformers' apply_chat_template renders it), with
    the user's text as a placeholder. A BOS the template writes itself is left out: encode_example puts
    the BOS id first, so the ids are those of apply_chat_template."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        text = env.from_string(chat_template).render(
            messages=[{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True,
            bos_token=bos_token or "", eos_token=eos_token or "")
    except jinja2.TemplateError as e:
        raise UserError(f"{where}: cannot render its chat template ({e}); give --template") from None
    if text.count(PLACEHOLDER) != 1:
        raise UserError(f"{where}: its chat template does not show the user's message as it is; give --template")
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return text.replace(PLACEHOLDER, "{prompt}")


def prompt_template_of(tokenizer, where: str) -> str | None:
    """The tokenizer's chat template as a "{prompt}" template, or None when it has none."""
    if not tokenizer.chat_template:
        return None
    piece = tokenizer.tokenizer.id_to_token if isinstance(tokenizer, HFTokenizer) else tokenizer.id_to_piece
    return chat_prompt_template(tokenizer.chat_template, piece(tokenizer.bos_id()), piece(tokenizer.eos_id()), where)
