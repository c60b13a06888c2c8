"""GGUF files and tokenizer.json checkpoints, as people hold real models now: tiny random Llamas written in
the test with the gguf package's own writer (the way llama.cpp's convert_hf_to_gguf.py writes them: q/k
rows permuted, norms in F32, a byte-level BPE vocabulary in the metadata), each loaded here and checked
against transformers' own GGUF loader, which has its own dequantization and its own tokenizer builder."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import UserError
from helpers import ENV, ROOT, assert_one_line_error, needs_transformers, run, start, transformers

gguf = pytest.importorskip("gguf", reason="needs the gguf package (requirements.txt)")
tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers package (requirements.txt)")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from checkpoints import check_pretrained, pretrained_template  # noqa: E402
from checkpoints.gguf import load_gguf_model, load_gguf_tokenizer, main as export_to_hf  # noqa: E402
from checkpoints.hf import ours_to_hf  # noqa: E402
from data.text import apply_template, encode_example, load_tokenizer  # noqa: E402
from data.tokenizer import HFTokenizer, prompt_template_of  # noqa: E402
from infer import FinishedRun, generate_text, word_end_table  # noqa: E402

pytestmark = needs_transformers  # transformers is the reference every test here compares with
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # SmolLM2's, shorter system
TEXT = ["the river city of Alder sits on the Kell", "Alder trades salt and copper with the hill towns",
        "What is the capital of France? Paris, of course.", "naïve café: 3.14 € — done!\n\tindented  twice"]
SAMPLES = TEXT + ["<|im_start|>user\nhi<|im_end|>", " leading space", "émoji 🙂 and 日本語", ""]
DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 256, 2, 4, 2, 512  # rows of 256: K-quant blocks are 256 values


# ---- a tiny byte-level BPE tokenizer and a tiny Llama, written as GGUF --------------------------------

@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2's kind, SmolLM2's and Llama 3's) trained on TEXT: 3 special tokens,
    256 bytes and some merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT * 10, trainer)
    return tokenizer


def vocabulary(bpe) -> tuple[list[str], list[str]]:
    """The tokens in id order and the merges ("a b"), as convert_hf_to_gguf.py reads them from tokenizer.json."""
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(bpe.get_vocab(with_added_tokens=True), key=bpe.token_to_id)
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@pytest.fixture(scope="module")
def hf_llama(bpe):
    torch.manual_seed(0)
    return lambda tied: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=HIDDEN, vocab_size=bpe.get_vocab_size(), max_position_embeddings=128, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)).eval()


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor (convert_hf_to_gguf.py's tensor map)."""
    name = hf_name.replace("model.layers.", "blk.")
    for hf, ours in GGUF_NAMES.items():
        name = name.replace(hf, ours)
    return name


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


K_LAYOUT = {  # bytes per block of 256 values, and where its float16 scales sit (ggml-common.h)
    Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}


def quantized(w: np.ndarray, kind: Q, rng) -> np.ndarray:
    """w in type kind, as bytes. The gguf package quantizes the simple types; for the K-quants (which it only
    dequantizes) random blocks with small float16 scales stand in for real ones: the test is that both
    readers turn the same bytes into the same weights."""
    if kind == Q.F32:
        return w
    if kind == Q.F16:
        return w.astype(np.float16)
    if kind not in K_LAYOUT:
        return gguf.quants.quantize(w, kind)
    size, scales = K_LAYOUT[kind]
    blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // 256, size), dtype=np.uint8)
    for at in scales:
        blocks[..., at:at + 2] = rng.uniform(1e-4, 3e-4, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(w.shape[0], -1)


def write_gguf(path: Path, model, bpe, types=(Q.F32,), arch="llama", tokens=None, tokenizer_model="gpt2") -> Path:
    """model (a transformers LlamaForCausalLM) as llama.cpp's converter writes it; the 2-D weights take the
    types in turn, the norms stay F32."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base((getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta})["rope_theta"])
    all_tokens, merges = vocabulary(bpe)
    tokens = all_tokens if tokens is None else tokens
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(0)
    matrices = 0
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # stored once, as the embedding
        w = tensor.numpy()
        if "q_proj" in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        if "k_proj" in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        kind = types[matrices % len(types)] if w.ndim == 2 else Q.F32
        matrices += w.ndim == 2
        data = quantized(w, kind, rng)
        writer.add_tensor(gguf_name(name), data, raw_shape=data.shape,
                          raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


EVERY_TYPE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


@pytest.fixture(scope="module")
def files(hf_llama, bpe, tmp_path_factory) -> dict:
    """{"f32": an untied model in float32 (and the transformers model it was written from), "mixed": a tied
    model whose 15 matrices take every supported type in turn}."""
    root = tmp_path_factory.mktemp("gguf")
    f32_model = hf_llama(tied=False)
    return {"f32": (write_gguf(root / "f32.gguf", f32_model, bpe), f32_model),
            "mixed": (write_gguf(root / "mixed.gguf", hf_llama(tied=True), bpe, EVERY_TYPE), None)}


def transformers_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


# ---- weights ----------------------------------------------------------------------------------------------

def test_a_float32_gguf_is_the_model_it_was_written_from(files):
    """The q/k permutation is undone: the logits are the original transformers model's, and the GGUF loader
    of transformers agrees."""
    path, original = files["f32"]
    ours = load_gguf_model(str(path))
    assert not ours.cfg.tie_embeddings and ours.cfg.rope_theta == 100000.0 and ours.cfg.n_kv_heads == KV_HEADS
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(tokens).logits
        assert torch.allclose(ours(tokens), expected, atol=1e-5, rtol=0)
        assert torch.allclose(transformers_gguf(path)(tokens).logits, expected, atol=1e-5, rtol=0)


def test_every_weight_type_dequantizes_as_transformers_does(files):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants Q2_K..Q6_K in one tied model: every tensor equals
    transformers' own dequantization of it, and so do the logits."""
    path, _ = files["mixed"]
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors} == set(EVERY_TYPE)
    ours, theirs = load_gguf_model(str(path)), transformers_gguf(path)
    assert ours.cfg.tie_embeddings and theirs.config.tie_word_embeddings
    reference = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        expected = reference[ours_to_hf(name)]
        assert torch.allclose(tensor, expected, atol=1e-6 * float(expected.abs().max()), rtol=0), name
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert torch.allclose(ours(tokens), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


# ---- the tokenizer ----------------------------------------------------------------------------------------

def assert_same_tokenizer(ours, reference, bos_id=1, eos_id=2):
    """ours (data/tokenizer.py's interface) encodes and decodes as reference (tokenizers or transformers)."""
    for text in SAMPLES:
        ids = ours.encode(text)
        expected = reference.encode(text, add_special_tokens=False)
        assert ids == (expected.ids if hasattr(expected, "ids") else expected), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.encode(SAMPLES) == [ours.encode(t) for t in SAMPLES]  # a list as sentencepiece takes it
    assert (ours.bos_id(), ours.eos_id(), ours.vocab_size()) == (bos_id, eos_id, len(vocabulary_of(reference)))


def vocabulary_of(reference):
    return reference.get_vocab(with_added_tokens=True) if isinstance(reference, tokenizers.Tokenizer) \
        else reference.get_vocab()


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Our prompt ids: BOS + the checkpoint's chat format around the prompt."""
    return [tokenizer.bos_id()] + tokenizer.encode(apply_template(prompt_template_of(tokenizer, "test"), prompt))


def their_chat_ids(tokenizer, prompt: str) -> list[int]:
    """transformers' ids for the same: apply_chat_template with the generation prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if "input_ids" in ids else ids)  # (a dict in transformers >= 5)


def test_the_tokenizer_in_a_gguf_is_the_one_it_was_made_from_and_transformers_reads(files, bpe):
    path, _ = files["f32"]
    ours = load_gguf_tokenizer(str(path))
    assert_same_tokenizer(ours, bpe)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert_same_tokenizer(ours, theirs)
    for prompt in ("What is the capital of France?", "two\nlines"):
        assert chat_ids(ours, prompt) == their_chat_ids(theirs, prompt)
    # Pieces as sentencepiece writes them: "▁" starts a word, a lone byte of a longer character is a byte.
    the, lead_byte = bpe.token_to_id("Ġthe"), bpe.token_to_id("Ã")  # "é" is the bytes C3 A9
    assert ours.id_to_piece(the) == "▁the" and not ours.is_byte(the)
    assert ours.is_byte(lead_byte) and ours.is_control(2) and not ours.is_control(the)
    ends_word = word_end_table(ours)
    assert ends_word[the] and ends_word[2] and ends_word[bpe.token_to_id(".")] and not ends_word[lead_byte]


def test_a_tokenizer_json_directory_reads_as_tokenizers_and_transformers_read_it(bpe, tmp_path):
    """tokenizer.json with tokenizer_config.json beside it (BOS, EOS and the chat template), as transformers
    saves it: the ids and the chat format are transformers' own."""
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": CHATML}))
    ours = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert_same_tokenizer(ours, bpe)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(ours, theirs)
    expected = their_chat_ids(theirs, "Where does salt go?")
    assert chat_ids(ours, "Where does salt go?") == expected
    # Fine-tuning sees the chat prompt, then the response and EOS; the loss starts where the response does.
    ids, start_at = encode_example({"prompt": "Where does salt go?", "response": "to Brena"}, ours,
                                   prompt_template_of(ours, "test"))
    assert ids == expected + bpe.encode("to Brena").ids + [2] and start_at == len(expected)
    # The copy a run keeps reads back the same.
    (tmp_path / "copy").mkdir()
    copy = load_tokenizer(ours.save(str(tmp_path / "copy")))
    assert_same_tokenizer(copy, bpe)
    assert copy.chat_template == CHATML
    # The special ids are the checkpoint's, never assumed: config.json's where tokenizer_config.json names
    # none (the first of several EOS ids, as Llama 3 Instruct lists them), and a folder that names none is refused.
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 0]}))
    from_config = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (from_config.bos_id(), from_config.eos_id()) == (0, 2)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="names no BOS or EOS token"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


# ---- through the programs -------------------------------------------------------------------------------

def launch(program: str, *args) -> subprocess.Popen:
    """Start train.py, infer.py, or with "-m" the GGUF -> Hugging Face command (python -m checkpoints.gguf)."""
    if program != "-m":
        return start(program, *args)
    return subprocess.Popen([sys.executable, "-m", "checkpoints.gguf", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_a_gguf_and_a_tokenizer_json_directory_then_infer(files, tmp_path):
    """train.py --init_from FILE.gguf in the model's chat format; the run keeps tokenizer.json, and infer.py
    reproduces its evaluation. The same model written out as a Hugging Face directory (python -m
    checkpoints.gguf), which transformers loads, fine-tunes the same way with its tokenizer.json."""
    path, _ = files["mixed"]
    rows = [{"prompt": f"Where does {a} go?", "response": b} for a, b in (("copper", "to Alder"), ("salt", "to Brena"))]
    ft, ev = write_jsonl(tmp_path / "ft.jsonl", rows * 4), write_jsonl(tmp_path / "ev.jsonl", rows)
    hf_dir = tmp_path / "hf"
    export_to_hf([str(path), str(hf_dir)])  # python -m checkpoints.gguf (its command line: the test below)
    common = ["--finetune", ft, "--eval", ev, "--finetune_steps", "2", "--finetune_batch", "4", "--micro_batch", "4",
              "--modes", "base,vanilla,taia", "--device", "cpu"]
    runs = {"gguf": start("train.py", "--init_from", path, "--out_dir", tmp_path / "out_gguf", *common),
            "hf": start("train.py", "--init_from", hf_dir, "--out_dir", tmp_path / "out_hf", *common)}
    for process in runs.values():
        result = finish(process)
        assert result.returncode == 0, result.stderr
    out = tmp_path / "out_gguf"
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "finetuned.pt"}
    assert not (out / "tokenizer.model").exists()
    tuned = torch.load(out / "finetuned.pt", weights_only=True)
    assert tuned["finetune"]["template"] == pretrained_template(str(path)) and "<|im_start|>user\n" in \
        tuned["finetune"]["template"]
    snapshot = torch.load(out / "ffn_snapshot.pt", weights_only=True)["ffn"]
    base = load_gguf_model(str(path)).state_dict()
    assert all(torch.equal(snapshot[k], base[k]) for k in snapshot)  # the FFN as the file holds it
    # Both routes saw the same model and tokenizer: the same fine-tuned weights.
    hf_tuned = torch.load(tmp_path / "out_hf" / "finetuned.pt", weights_only=True)["model"]
    assert all(torch.allclose(tuned["model"][k], hf_tuned[k], atol=1e-5) for k in hf_tuned)
    exported = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.tensor([[1, 5, 9, 265, 300]])
    with torch.no_grad():
        assert torch.allclose(exported(tokens).logits, load_gguf_model(str(path))(tokens), atol=1e-5)
    # infer.py reads the run's tokenizer.json and template; the checkpoint alone, without a run, is mode base.
    prompt = ["--prompt", "Where does salt go?", "--max_new_tokens", "6"]
    tuned_run = launch("infer.py", "--out_dir", out, "--modes", "taia", *prompt)
    alone = launch("infer.py", "--init_from", path, "--modes", "base", *prompt, "--out_dir", tmp_path / "none")
    finished = FinishedRun(str(out))
    assert finished.template == tuned["finetune"]["template"] and isinstance(finished.sp, HFTokenizer)
    expected = generate_text(finished.build("taia"), finished.sp, "Where does salt go?", 6, template=finished.template)
    assert finish(tuned_run).stdout == expected + "\n"
    expected = generate_text(load_gguf_model(str(path)), finished.sp, "Where does salt go?", 6,
                             template=finished.template)
    assert finish(alone).stdout == expected + "\n"
    assert_one_line_error(run("infer.py", "--init_from", path, "--modes", "taia", *prompt,
                              "--out_dir", tmp_path / "none"), "--modes base only")
    assert not (tmp_path / "none").exists()


# ---- bad files: one line, exit status 2, nothing written ---------------------------------------------------

def other_architecture(d, model, bpe):
    return write_gguf(d / "qwen.gguf", model, bpe, arch="qwen2")


def unknown_type(d, model, bpe):
    path = write_gguf(d / "unknown.gguf", model, bpe, (Q.Q8_0,))
    reader = gguf.GGUFReader(str(path), "r+")  # the type field of the first quantized tensor's header
    next(t for t in reader.tensors if t.tensor_type == Q.Q8_0).field.parts[4][0] = 99
    reader.data.flush()
    return path


def unsupported_type(d, model, bpe):
    """IQ4_NL: a type gguf knows (18 bytes per 32 values) that this loader does not read."""
    path = write_gguf(d / "iq4.gguf", model, bpe, (Q.Q4_0,))
    reader = gguf.GGUFReader(str(path), "r+")
    next(t for t in reader.tensors if t.tensor_type == Q.Q4_0).field.parts[4][0] = int(Q.IQ4_NL)
    reader.data.flush()
    return path


def truncated(d, model, bpe):
    path = write_gguf(d / "cut.gguf", model, bpe)
    path.write_bytes(path.read_bytes()[:path.stat().st_size * 2 // 3])
    return path


def tokenizer_too_small(d, model, bpe):
    return write_gguf(d / "small.gguf", model, bpe, tokens=vocabulary(bpe)[0][:-1])


def sentencepiece_in_gguf(d, model, bpe):
    return write_gguf(d / "spm.gguf", model, bpe, tokenizer_model="llama")


BAD = {other_architecture: "general.architecture is 'qwen2': only Llama models",
       unknown_type: "has weight type 99, which the gguf package does not know",
       unsupported_type: "is IQ4_NL: the weight types read are F32",
       truncated: "it is cut short",
       tokenizer_too_small: "tokenizer has 319 pieces, the model 320: they do not belong together",
       sentencepiece_in_gguf: "its tokenizer is sentencepiece's kind"}


def test_a_bad_gguf_is_one_line_and_nothing_is_written(hf_llama, bpe, tmp_path):
    """Each case as a library call (the UserError the programs print), and four of them through the three
    programs that read a GGUF file (each program's start costs seconds)."""
    model = hf_llama(tied=True)
    data = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": "a", "response": "b"}])
    programs = [lambda path, out: ("train.py", "--init_from", path, "--out_dir", out, "--finetune", data,
                                   "--eval", data),
                lambda path, out: ("infer.py", "--init_from", path, "--modes", "base", "--prompt", "hi",
                                   "--out_dir", out),
                lambda path, out: ("-m", path, out)]
    commands = []
    for i, (make, expected) in enumerate(BAD.items()):
        path = make(tmp_path, model, bpe)
        with pytest.raises(UserError, match=re.escape(expected)):
            check_pretrained(str(path))
        if make in (truncated, unknown_type, other_architecture, tokenizer_too_small):
            commands.append((programs[len(commands) % len(programs)](path, tmp_path / f"out_{i}"), expected))
    for pair in (commands[i:i + 2] for i in range(0, len(commands), 2)):  # two at a time: one per core
        for process, (args, expected) in [(launch(*args), (args, expected)) for args, expected in pair]:
            try:
                assert_one_line_error(finish(process), expected)
            except AssertionError as e:
                raise AssertionError(f"{args}: {e}") from None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out_")]  # not even the folders
