"""The paper's baselines and ablations as training options and modes: L2 and EWC pull the weights toward
the base, --ffn_layers (TOA-k) trains exactly the parameters it names, loracl answers each prompt with
the model the prompt is more familiar to, and the experiments that use them run the real programs."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, TINY, run, run_here, write
from infer import FinishedRun, judge

sys.path.insert(0, str(ROOT / "experiments"))
import lab  # noqa: E402
from lab import lowest_prompt_loss  # noqa: E402
from representations import residual_ratio  # noqa: E402

TWO_LAYERS = [*TINY, "--n_layers", "2"]


def train(*args):
    result = run_here("experiments/lab.py", *args)  # (in this process: helpers.run_here)
    assert result.returncode == 0, result.stderr
    return result


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained 2-block tiny model (and its toy world); tests fine-tune copies of it."""
    out = tmp_path_factory.mktemp("base") / "out"
    train("--out_dir", out, *TWO_LAYERS, "--stage", "pretrain", "--pretrain_steps", "3")
    return out


def finetuned(base: Path, tmp_path: Path, name: str, *flags, steps: int = 20, script=None) -> dict:
    """A copy of the base fine-tuned with flags (by experiments/lab.py, run in this process, or by `script`, which
    runs lab.main in a process of its own): its weights."""
    import shutil
    out = Path(shutil.copytree(base, tmp_path / name))
    args = ["--out_dir", out, *TWO_LAYERS, "--stage", "finetune", "--finetune_steps", steps, *flags]
    result = run(str(script), *args) if script else run_here("experiments/lab.py", *args)
    assert result.returncode == 0, result.stderr
    return weights(out / "finetuned.pt")


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory) -> dict:
    """The base fine-tuned without a pull (20 steps): the weights the L2 and EWC tests compare with."""
    return finetuned(base, tmp_path_factory.mktemp("plain"), "plain")


def largest_change(a: dict, b: dict, names=None) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in (names or a))


def test_l2_with_a_huge_weight_keeps_the_weights_at_their_start(base, plain, tmp_path):
    import train
    lr = train.parse_args([]).finetune_lr
    start = weights(base / "base.pt")
    pulled = finetuned(base, tmp_path, "l2", "--l2_weight", "1e6")
    assert largest_change(plain, start) > 5e-3  # plain fine-tuning moves the weights...
    # ...the pull holds every weight within about one step of AdamW (lr) of where it started
    assert largest_change(pulled, start) < lr
    assert largest_change(pulled, start) < largest_change(plain, start) / 10
    # --resume compares the pull's settings: a finished fine-tune made with another weight is refused
    again = run_here("experiments/lab.py", "--out_dir", tmp_path / "l2", *TWO_LAYERS, "--stage", "finetune",
                     "--finetune_steps", 20, "--l2_weight", "1e5", "--resume")
    assert again.returncode == 2 and "l2_weight 1000000.0 -> 100000.0" in again.stderr, again.stderr


def test_ewc_with_zero_fisher_information_is_plain_fine_tuning(base, plain, tmp_path):
    zero_fisher = write(tmp_path / "zero_fisher.py", f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / "experiments")!r})
import torch, lab
from common import run_cli

def zero_fisher(model, *args):
    return {{name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}}

lab.fisher_diagonal = zero_fisher
run_cli(lambda: lab.main(sys.argv[1:]))
""")
    zero = finetuned(base, tmp_path, "zero", "--ewc_weight", "1e6", script=zero_fisher)
    ewc = finetuned(base, tmp_path, "ewc", "--ewc_weight", "1e6", "--ewc_windows", "8")
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # bit for bit
    assert largest_change(ewc, plain) > 1e-3  # a real Fisher does pull


def test_fisher_is_the_mean_squared_gradient_on_pretraining_windows_scaled_to_mean_one(trained):
    import train
    from checkpoints import load_base
    from data.text import load_tokenizer, random_windows, read_lines, token_stream
    args = train.parse_args(["--out_dir", str(trained), *TINY, "--ewc_weight", "1", "--ewc_windows", "3",
                             "--device", "cpu"], lab.EXTENSIONS)
    args.rank, args.world_size = 0, 1  # (what init_distributed sets for one process)
    model, sp, _ = load_base(str(trained), None)
    text = str(trained / "data" / "pretrain.txt")
    fisher = lab.fisher_diagonal(model, args, sp, text, seed=5)
    # The same three windows (the generator train.py seeds with seed + 3), one gradient each, by hand.
    stream = token_stream(read_lines(text), load_tokenizer(str(trained / "tokenizer.model")))
    inputs, targets = random_windows(stream, 3, args.seq_len, torch.Generator().manual_seed(8))
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x, y in zip(inputs, targets):
        model.zero_grad()
        logits = model(x[None])
        F.cross_entropy(logits[0], y).backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad ** 2
    mean = sum(float(f.sum()) for f in expected.values()) / sum(f.numel() for f in expected.values())
    assert fisher.keys() == expected.keys()
    for name in fisher:
        assert torch.allclose(fisher[name], expected[name] / mean, rtol=1e-4, atol=1e-7), name
    assert abs(sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values()) - 1) < 1e-5


def changed(start: dict, tuned: dict) -> set:
    return {k for k in start if not torch.equal(start[k], tuned[k])}


def test_ffn_layers_trains_exactly_the_named_parameters(base, tmp_path):
    start = weights(base / "base.pt")
    ffn_of = {k for k in start if ".ffn." in k}
    ffn_block_0 = {k for k in ffn_of if k.startswith("blocks.0.")}
    attention = {k for k in start if ".attn." in k and "_norm" not in k}
    # Full fine-tuning: everything but the FFN of block 1.
    full = changed(start, finetuned(base, tmp_path, "full", "--ffn_layers", "1", steps=2))
    assert full == set(start) - (ffn_of - ffn_block_0)
    # LoRA: adapters on every attention projection and on block 0's FFN; nothing else moves.
    lora = changed(start, finetuned(base, tmp_path, "lora", "--ffn_layers", "1", "--lora_rank", "2", steps=2))
    assert lora == attention | ffn_block_0
    # TOA under LoRA: the attention projections only; the FFN of 0 blocks under full fine-tuning.
    toa = changed(start, finetuned(base, tmp_path, "toa", "--train_scope", "attn", "--lora_rank", "2", steps=2))
    assert toa == attention
    tof = changed(start, finetuned(base, tmp_path, "tof", "--train_scope", "ffn", "--lora_rank", "2", steps=2))
    assert tof == ffn_of
    none = changed(start, finetuned(base, tmp_path, "no_ffn", "--ffn_layers", "0", steps=2))
    assert none == set(start) - ffn_of


def test_judge_scores_every_example_in_order_with_its_prompt_loss(trained):
    run_ = FinishedRun(str(trained))
    model = run_.build("vanilla")
    examples = [json.loads(line) for line in (trained / "data" / "knowledge.jsonl").read_text().splitlines()[:5]]
    examples.insert(2, {"prompt": "a much longer prompt than the others, to sort it last", "response": "x"})
    judged = judge(model, examples, run_.sp, run_.template, batch_size=2, prompt_loss=True)  # sorted by length
    for i, example in enumerate(examples):
        alone = judge(model, [example], run_.sp, run_.template, prompt_loss=True)
        assert all(bool(alone[m][0]) == bool(judged[m][i]) for m in ("exact", "answer"))
        ids = [run_.sp.bos_id()] + run_.sp.encode(example["prompt"])
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))
        by_hand = F.cross_entropy(logits[0], torch.tensor(ids[1:]))
        assert abs(float(judged["prompt_loss"][i]) - float(by_hand)) < 1e-4, i


def test_loracl_answers_each_prompt_with_the_model_that_finds_it_more_familiar(trained, monkeypatch, tmp_path):
    # The selection itself: per example, the outcome of the lower prompt loss (a tie goes to the first).
    a = {"answer": torch.tensor([True, True, False]), "prompt_loss": torch.tensor([1.0, 3.0, 2.0])}
    b = {"answer": torch.tensor([False, False, True]), "prompt_loss": torch.tensor([2.0, 1.0, 2.0])}
    assert lowest_prompt_loss([a, b])["answer"].tolist() == [True, False, False]
    # Through FinishedRun: loracl scores base and vanilla with their prompt losses and counts, example by example,
    # the outcome of the one with the lower loss. Here base knows examples 0-1 and finds 0 and 2 familiar.
    run_ = FinishedRun(str(trained))
    outcomes = {"base": ([True, True, False, False], [0.5, 2.0, 0.5, 2.0]),
                "vanilla": ([False, False, True, True], [1.0, 1.0, 1.0, 1.0])}

    def scripted(model, examples, sp, template, prompt_loss=False):
        right, loss = outcomes[model]
        return {"exact": torch.tensor(right), "answer": torch.tensor(right), "prompt_loss": torch.tensor(loss)}

    import infer
    monkeypatch.setattr(infer, "judge", scripted)
    monkeypatch.setattr(lab, "judge", scripted)
    monkeypatch.setattr(FinishedRun, "build", lambda self, mode, device="cpu": mode)
    counts = run_.count_correct_per_mode(["loracl", "base", "vanilla"], {"set": [{}] * 4}, extra_modes=lab.LoRACL().modes())
    assert counts["answer", "set", "loracl"] == 2  # example 0 from base (right), 1 vanilla, 2 base, 3 vanilla (right)
    assert counts["answer", "set", "base"] == counts["answer", "set", "vanilla"] == 2
    monkeypatch.undo()
    # Through the lab's eval stage: loracl is reported beside the other modes; plain train.py does not know it.
    import shutil
    out = Path(shutil.copytree(trained, tmp_path / "out"))
    result = run_here("experiments/lab.py", "--out_dir", out, *TINY, "--stage", "eval", "--modes", "loracl,vanilla")
    assert result.returncode == 0, result.stderr
    assert set(json.loads((out / "results.json").read_text())["results"]["ood_test"]) == {"loracl", "vanilla"}
    refused = run_here("train.py", "--out_dir", out, *TINY, "--stage", "eval", "--modes", "loracl")
    assert refused.returncode == 2 and "unknown mode 'loracl'" in refused.stderr, refused.stderr


def test_residual_ratio_is_zero_for_identical_tokens_and_one_without_a_shared_part():
    row = torch.tensor([1.0, -2.0, 3.0])
    assert residual_ratio(row.repeat(4, 1)) < 1e-6
    assert abs(residual_ratio(torch.stack([row, -row])) - 1) < 1e-6
    assert 0 < residual_ratio(torch.stack([row, row + 1])) < 1


EXPERIMENT = ["--seeds", "1", "--jobs", "2", "--train_args", " ".join(map(str, [*TINY, "--pretrain_steps", "2",
              "--finetune_steps", "2", "--ewc_windows", "2"]))]


def test_the_experiments_run_train_py_and_report_what_its_runs_wrote(tmp_path):
    """Each experiment runs in this process (helpers.run_here); the runs it makes are experiments/lab.py
    programs of their own."""
    root = tmp_path / "runs"
    try:  # an optional extra: without it the experiments print their tables only
        import matplotlib  # noqa: F401
        png = ["--png", tmp_path / "toa.png"]
    except ImportError:
        png = []
    toa = run_here("experiments/toa_k.py", "--root", root, *EXPERIMENT, "--json", tmp_path / "toa.json", *png)
    assert toa.returncode == 0, toa.stderr
    assert not png or (tmp_path / "toa.png").read_bytes().startswith(b"\x89PNG")
    points = json.loads((tmp_path / "toa.json").read_text())["points"]
    written = json.loads((root / "seed_0" / "toa1_lora" / "results.json").read_text())["results"]
    assert {(p["setting"], p["mode"], p["set"]) for p in points} >= {("LoRA ffn_layers 1", "taia", "ood_test")}
    assert all(p["answer_match"] == 100 * written[p["set"]][p["mode"]] for p in points
               if p["setting"] == "LoRA ffn_layers 1")
    baselines = run_here("experiments/baselines.py", "--root", root, *EXPERIMENT, "--weights", "1", "--lrs", "1e-3")
    assert baselines.returncode == 0, baselines.stderr
    assert "| L2 | L2 1 (chosen) |" in baselines.stdout and "| LoRACL | lr " in baselines.stdout
    assert (root / "seed_0" / "ewc_1" / "finetuned.pt").exists()
    representations = run_here("experiments/representations.py", "--root", root, *EXPERIMENT)
    assert representations.returncode == 0, representations.stderr
    assert "| 1 |" in representations.stdout  # layer 0 (embeddings) and the one block
    bad = run_here("experiments/baselines.py", "--root", root, *EXPERIMENT, "--weights", "1,x")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --weights")
