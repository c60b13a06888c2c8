"""Use a finished run of train.py: build any TAIA mode from its files, talk to it, or score it.

    python infer.py --modes base,vanilla,taia --prompt "Instruction: city for Tofe? Response:"
    python infer.py --modes base,vanilla,taia,taif --eval out/data/ood_test.jsonl

Modes (see taia.py): base (pretrained weights), vanilla (all fine-tuning updates), taia (tuned
attention, original FFN: rebuilt from the FFN snapshot), taif (tuned FFN, original attention), and for
the provenance ablation only-<group> (only that group tuned, the rest base; groups: attention, ffn,
norm, embedding, head), and auto (the point between base and tuned that scores best on --dev).
Experiments add modes of their own through train.py's Extension seam.
"""
import argparse
import filecmp
import json
import os
import sys
import tempfile
from dataclasses import asdict

import torch
import torch.nn.functional as F

import taia
from checkpoints import (check_tokenizer, check_tokenizer_file, config_from_dict, load_base, load_hf_base,
                         model_from_state, run_tokenizer_path)
from common import FILES, OneLineParser, UserError, load_checkpoint, resolve_device, run_cli, write_json
from data.text import (PLAIN_TEMPLATE, apply_template, check_utf8_args, encode_example, example_batch, load_tokenizer,
                       read_examples)
from data.tokenizer import prompt_template_of
from model import Transformer

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # the weights of attention and FFN updates that mode auto tries


class FinishedRun:
    """What fine-tuning leaves in out_dir: the tokenizer, the tuned weights, the FFN snapshot, and the
    base (base.pt, or for a fine-tune of a Hugging Face model that directory; init_from: where it is
    now, if it moved). Checks that the files belong together, then builds any mode from them."""

    def __init__(self, out_dir: str, init_from: str | None = None):
        self.out_dir = out_dir
        tokenizer_path = run_tokenizer_path(out_dir)  # tokenizer.model, or a tokenizer.json/GGUF base's tokenizer.json
        self.sp = load_tokenizer(tokenizer_path)
        tuned = load_checkpoint(os.path.join(out_dir, FILES["tuned"]), keys=("model", "config", "base_ffn"))
        init_from = init_from or tuned.get("init_from")
        if init_from:
            cfg, state = load_hf_base(init_from)
            base = {"model": state, "config": asdict(cfg)}
        else:
            base = load_checkpoint(os.path.join(out_dir, FILES["base"]))
        self.snapshot = load_checkpoint(os.path.join(out_dir, FILES["snapshot"]), keys=("ffn",))["ffn"]
        if base["config"] != tuned["config"]:
            raise UserError(f"{FILES['tuned']} in {out_dir} and its base {init_from or FILES['base']} are different "
                            "models")
        self.cfg = config_from_dict(base["config"])
        check_tokenizer(self.sp, self.cfg)
        check_tokenizer_file(tokenizer_path, tuned, os.path.join(out_dir, FILES["tuned"]))
        if not init_from:
            check_tokenizer_file(tokenizer_path, base, os.path.join(out_dir, FILES["base"]))
        self.base, self.tuned = base["model"], tuned["model"]
        # The three files must belong together: the snapshot and the fine-tune name the same base FFN.
        base_ffn = {k: v for k, v in self.base.items() if taia.is_ffn(k)}
        if not (taia.fingerprint(self.snapshot) == tuned["base_ffn"] == taia.fingerprint(base_ffn)):
            raise UserError(f"{out_dir}: {FILES['snapshot']}, {FILES['tuned']} and {init_from or FILES['base']} do "
                            "not come from one run (the FFN fingerprints differ)")
        self.seed = base.get("seed")
        self.meta = {"pretrain": base.get("pretrain"), "finetune": tuned.get("finetune")}
        # Prompts are wrapped in the template the model was fine-tuned with.
        self.template = (tuned.get("finetune") or {}).get("template") or PLAIN_TEMPLATE
        self.auto = None  # the point choose_auto picked on a dev set, for mode "auto"

    def build(self, mode: str, device="cpu") -> Transformer:
        if mode == "auto":
            if self.auto is None:
                raise UserError("mode auto picks its point on a dev set: give --dev FILE.jsonl")
            return self.build_point(self.auto["weights"], device)
        if mode == "taia":  # the method as deployed: tuned model, original FFN put back
            return taia.rebuild(model_from_state(self.cfg, self.tuned, device), self.snapshot)
        try:
            if mode.startswith("only-"):  # the provenance ablation: one group tuned, everything else base
                state = taia.mix(self.base, self.tuned, {mode.removeprefix("only-")})
            else:
                state = taia.combine(self.base, self.tuned, mode)
        except ValueError as e:  # an unknown mode; only-embedding on a model whose head is the embedding
            raise UserError(f"mode {mode}: {e}") from None
        return model_from_state(self.cfg, state, device)

    def build_point(self, weights: dict, device="cpu") -> Transformer:
        """Any point between base and tuned (taia.interpolate), from the tensors already in memory."""
        try:
            state = taia.interpolate(self.base, self.tuned, weights)
        except ValueError as e:
            raise UserError(f"weights {weights}: {e}") from None
        return model_from_state(self.cfg, state, device)

    def score_grid(self, examples: list[dict], device="cpu", values=GRID) -> dict:
        """{(a_attention, a_ffn): {"exact", "answer"}} for every pair of values; the other groups keep their
        tuned values, as in TAIA. (1, 0) is TAIA, (1, 1) vanilla, (0, 1) TAIF."""
        return {(a, f): self.score_point({"attention": a, "ffn": f}, examples, device) for a in values for f in values}

    def score_point(self, weights: dict, examples: list[dict], device="cpu") -> dict:
        return score(self.build_point(weights, device), examples, self.sp, self.template)

    def choose_auto(self, dev_path: str, device="cpu", per_layer: bool = False, save: bool = True) -> str:
        """Mode auto: pick the grid point with the best answer match on a dev set (ties go to the point
        nearest TAIA's corner); with per_layer, then try every grid value for each layer's FFN weight in
        turn, keeping a change only if the dev score rises. Never give it the test set. The choice is
        written to out_dir/auto.json (with save); returns a line saying what was chosen."""
        dev = read_examples(dev_path)
        grid = self.score_grid(dev, device)
        (a, f), best = max(grid.items(), key=lambda kv: (kv[1]["answer"], -abs(kv[0][0] - 1) - abs(kv[0][1])))
        weights, best = {"attention": a, "ffn": f}, best["answer"]
        if per_layer:
            ffn = [f] * self.cfg.n_layers
            for layer in range(self.cfg.n_layers):
                for value in GRID:
                    trial = ffn[:layer] + [value] + ffn[layer + 1:]
                    answer = self.score_point({"attention": a, "ffn": trial}, dev, device)["answer"]
                    if answer > best:
                        ffn, best = trial, answer
            weights = {"attention": a, "ffn": ffn}
        self.auto = {"weights": weights, "dev": os.path.abspath(dev_path), "dev_answer_match": best}
        if save:
            write_json(os.path.join(self.out_dir, FILES["auto"]), self.auto)
        return f"auto: attention {a}, ffn {weights['ffn']} (answer match {100 * best:.1f}% on {dev_path})"

    def count_correct_per_mode(self, modes: list[str], eval_sets: dict, device="cpu", extra_modes=None) -> dict:
        """{(metric, set name, mode): examples right} for both metrics of count_correct(), every mode and set.
        extra_modes: {mode: function(run, examples, device) -> judge()'s dict}, modes an extension adds."""
        counts = {}
        for mode in modes:
            judge_mode = (extra_modes or {}).get(mode)
            model = None if judge_mode else self.build(mode, device)
            for name, examples in eval_sets.items():
                judged = judge_mode(self, examples, device) if judge_mode else judge(model, examples, self.sp,
                                                                                     self.template)
                for metric in ("exact", "answer"):
                    counts[metric, name, mode] = int(judged[metric].sum())
        return counts


class Pretrained(FinishedRun):
    """A pretrained checkpoint as it is (--init_from with --modes base): no run folder, mode base only, prompts
    in the checkpoint's own chat format (else verbatim)."""

    def __init__(self, init_from: str, device="cpu"):
        self.model, self.sp, _ = load_base("", init_from, device)
        self.cfg, self.auto = self.model.cfg, None
        self.template = prompt_template_of(self.sp, init_from) or PLAIN_TEMPLATE

    def build(self, mode: str, device="cpu") -> Transformer:
        if mode != "base":
            raise UserError(f"mode {mode}: a pretrained checkpoint alone has mode base only")
        return self.model.to(device)


def parse_modes(text: str, dev: str | None = None, eval_files=(), extra_modes=()) -> list[str]:
    """The modes named in text (comma-separated). Mode auto needs a dev set, and never one it reports."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    known = set(taia.MODES) | {"only-" + g for g in taia.GROUPS} | {"auto", *extra_modes}
    bad = [m for m in modes if m not in known]
    if bad or not modes:
        raise UserError(f"unknown mode {bad[0] if bad else text!r}: choose from {', '.join(sorted(known))}")
    if "auto" in modes and not dev:
        raise UserError("mode auto picks its point on a dev set: give --dev FILE.jsonl")
    same = [f for f in eval_files if dev and os.path.isfile(dev) and os.path.isfile(f) and filecmp.cmp(dev, f, False)]
    if same:  # by content: a copy or a hard link of the test set is the test set
        raise UserError(f"--dev {dev} holds the same examples as a reported set: choosing on the set you report is "
                        "choosing on the test set")
    return modes


# ---- scoring ----------------------------------------------------------------------------------------

def word_end_table(sp) -> torch.Tensor:
    """For every piece id: does it end the word before it? (EOS, a piece that starts a new word with
    sentencepiece's "▁" marker, or punctuation.)"""
    table = torch.zeros(sp.vocab_size(), dtype=torch.bool)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        table[i] = i == sp.eos_id() or piece.startswith("▁") or (piece.isascii() and not piece.isalnum()
                                                                 and not sp.is_byte(i) and not sp.is_control(i))
    return table


def score(model: Transformer, examples: list[dict], sp, template: str = PLAIN_TEMPLATE,
          batch_size: int = 128) -> dict:
    """{"exact", "answer"}: the share of examples right under each metric (see count_correct)."""
    counts = count_correct(model, examples, sp, template, batch_size)
    return {metric: n / len(examples) for metric, n in counts.items()}


def count_correct(model: Transformer, examples: list[dict], sp, template: str = PLAIN_TEMPLATE,
                  batch_size: int = 128) -> dict:
    """How many examples' greedy continuations are right, in the two senses of judge()."""
    judged = judge(model, examples, sp, template, batch_size)
    return {metric: int(judged[metric].sum()) for metric in ("exact", "answer")}


@torch.no_grad()
def judge(model: Transformer, examples: list[dict], sp, template: str = PLAIN_TEMPLATE,
          batch_size: int = 128, prompt_loss: bool = False) -> dict:
    """Per example, in the examples' order, whether its greedy continuation is right in two senses:
    - "exact": exactly the response, then EOS (the model answers and stops);
    - "answer": starts with the response as whole words (answer extraction, as the paper's evaluations
      read an answer out of a longer output; "Paris is the city..." counts, "Parisian" does not);
    and with prompt_loss, "prompt_loss": the mean next-token loss on the prompt's own tokens (after BOS),
    how familiar the prompt is to the model. Computed in one teacher-forced pass: greedy decoding
    reproduces the reference if and only if every reference token is the argmax given the reference
    tokens before it."""
    device = next(model.parameters()).device
    ends_word = word_end_table(sp).to(device)
    encoded = [encode_example(e, sp, template) for e in examples]
    for ids, _ in encoded:
        if len(ids) - 1 > model.cfg.max_seq_len:
            raise UserError(f"an example of {len(ids) - 1} tokens exceeds max_seq_len {model.cfg.max_seq_len}")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # batches of similar lengths
    judged = {metric: torch.zeros(len(encoded), dtype=torch.bool) for metric in ("exact", "answer")}
    if prompt_loss:
        judged["prompt_loss"] = torch.zeros(len(encoded))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        inputs, targets = example_batch([encoded[r] for r in rows], pad_id=sp.eos_id())
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        predicted = logits.argmax(-1)
        is_eos = targets == sp.eos_id()  # the position right after the response
        hit = (predicted == targets) | (targets == -100)
        response_ok = (hit | is_eos).all(dim=1)
        stops_word = (ends_word[predicted] | ~is_eos).all(dim=1)
        index = torch.tensor(rows)
        judged["exact"][index] = hit.all(dim=1).cpu()
        judged["answer"][index] = (response_ok & stops_word).cpu()
        if prompt_loss:
            judged["prompt_loss"][index] = mean_prompt_loss(logits, inputs, [encoded[r][1] for r in rows]).cpu()
    return judged


def mean_prompt_loss(logits: torch.Tensor, inputs: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Per row, the mean loss of predicting the prompt's tokens after BOS (inputs[1:start]) from the ones
    before them: position t predicts input t + 1."""
    on_prompt = torch.zeros_like(inputs, dtype=torch.bool)
    for row, start in enumerate(starts):
        on_prompt[row, :start - 1] = True
    next_tokens = inputs.roll(-1, dims=1)
    losses = F.cross_entropy(logits[on_prompt], next_tokens[on_prompt], reduction="none")
    row_of = on_prompt.nonzero()[:, 0]  # the row each prompt position's loss belongs to
    total = torch.zeros(len(starts), device=logits.device).index_add_(0, row_of, losses)
    return total / on_prompt.sum(1).clamp(min=1)


def accuracies(counts: dict, eval_sets: dict) -> dict:
    """FinishedRun.count_correct_per_mode's counts as {metric: {set name: {mode: share right}}}, each set's
    size from eval_sets."""
    results = {}
    for (metric, name, mode), n in counts.items():
        results.setdefault(metric, {}).setdefault(name, {})[mode] = n / len(eval_sets[name])
    return results


def evaluate(run: FinishedRun, modes: list[str], eval_sets: dict, device="cpu", extra_modes=None, rank: int = 0,
             world_size: int = 1, total=lambda counts: counts) -> dict:
    """{metric: {set name: {mode: share right}}}. Under torchrun each process scores its share of every set
    (rank, world_size) and `total` sums the counts over processes."""
    mine = {name: examples[rank::world_size] for name, examples in eval_sets.items()}
    return accuracies(total(run.count_correct_per_mode(modes, mine, device, extra_modes)), eval_sets)


def format_table(results: dict, modes: list[str], title: str) -> str:
    """One row per evaluation set, one column per mode, accuracies in percent."""
    width = max(len(name) for name in [*results, title]) + 2
    cols = [max(9, len(m)) + 2 for m in modes]
    lines = [f"{title:<{width}}" + "".join(f"{m:>{c}}" for m, c in zip(modes, cols))]
    for name, row in results.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * row[m]:>{c - 1}.1f}%" for m, c in zip(modes, cols)))
    return "\n".join(lines)


def print_results(results: dict, modes: list[str]):
    print(format_table(results["answer"], modes, "answer match"))
    print(format_table(results["exact"], modes, "exact match"))


def read_eval_sets(paths: list[str]) -> dict:
    """{name: examples} for JSONL files, each named by its file name without the extension."""
    sets = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in sets:
            raise UserError(f"two --eval files are named {name}: rename one, results are reported by file name")
        sets[name] = read_examples(path)
    return sets


# ---- generating -------------------------------------------------------------------------------------

def generate_text(model: Transformer, sp, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0, template: str = PLAIN_TEMPLATE) -> str:
    ids = [sp.bos_id()] + sp.encode(apply_template(template, prompt))
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    if max_new_tokens <= 0:
        raise UserError(f"the prompt ({len(ids)} tokens) leaves no room within max_seq_len {model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, sp.eos_id(),
                         torch.Generator(device).manual_seed(seed))
    new = [t for t in out[0, len(ids):].tolist() if t != sp.eos_id()]
    return sp.decode(new)


def compile_decoding(model: Transformer) -> str | None:
    """Transformer.compile_decoding, tried at once on a short prompt. Where torch.compile cannot build its
    kernels (a CPU machine without a C++ compiler, say), decoding stays eager (slower, the same tokens)
    and the reason is returned; None when the compiled step works."""
    model.compile_decoding()
    try:
        model.generate(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), 2)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        model.compiled_step = None
        reason = (str(e.inner_exception).strip() or "no message").splitlines()[0][:200]
        return f"{type(e.inner_exception).__name__}: {reason}"
    return None


# ---- the program --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="where train.py left base.pt, finetuned.pt, "
                   "ffn_snapshot.pt and tokenizer.model (default: out)")
    p.add_argument("--init_from", metavar="DIR|FILE.gguf", help="the Hugging Face directory or GGUF file a "
                   "--init_from fine-tune started from, when it has moved since training; with --modes base alone, "
                   "that checkpoint as it is (no run needed)")
    p.add_argument("--modes", "--mode", default="base,vanilla,taia,taif",
                   help="comma-separated modes: each --prompt is answered by every one, each --eval file scored "
                        "by every one (default: base,vanilla,taia,taif; each mode is a model built in memory, so "
                        "name only what you need on a large model, e.g. --modes taia)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to continue (wrapped in the fine-tuning "
                   "--template, if any); repeat for several")
    p.add_argument("--eval", action="append", default=[], metavar="FILE.jsonl",
                   help='print answer-match and exact-match accuracy on {"prompt", "response"} lines; repeat for '
                        'several files')
    p.add_argument("--json", metavar="FILE", help="also write the --eval results to FILE as JSON")
    p.add_argument("--dev", metavar="FILE.jsonl", help="for mode auto: the set it picks its point on (never the "
                   "test set); the choice is written to OUT_DIR/auto.json")
    p.add_argument("--auto_per_layer", action="store_true", help="mode auto: after the grid, tune each layer's "
                   "FFN weight on the dev set too")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling when --temperature > 0")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or mps (default: auto)")
    p.add_argument("--compile", action="store_true", help="decode through a torch.compile'd step with a static KV "
                   "cache (same tokens, several times faster at batch 1 once compiled; without a working compiler "
                   "it says so and decodes as usual)")
    args = p.parse_args(argv)
    check_utf8_args(vars(args))  # prompts and paths: the tokenizer and the files we write take UTF-8 only
    if not args.prompt and not args.eval:
        p.error("give --prompt TEXT or --eval FILE.jsonl")
    # nan fails every comparison, so it fails these too; a --max_new_tokens or --top_k beyond the model's
    # length or vocabulary is cut to it.
    if (not 0 <= args.temperature < float("inf") or args.max_new_tokens < 1
            or (args.top_k is not None and args.top_k < 1)):
        p.error("--temperature must be >= 0 and finite, --max_new_tokens and --top_k >= 1")
    if not 0 <= args.seed < 2 ** 63:
        p.error(f"--seed must be from 0 to 2**63 - 1, not {args.seed}")  # a torch seed is a 64-bit integer
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")
    args.device = resolve_device(args.device)
    args.modes = parse_modes(args.modes, args.dev, args.eval)
    if args.auto_per_layer and "auto" not in args.modes:
        p.error("--auto_per_layer tunes mode auto: add auto to --modes")
    if "auto" in args.modes:  # its choice goes to OUT_DIR/auto.json: a folder it cannot write fails now, not later
        try:
            tempfile.TemporaryFile(dir=args.out_dir).close()
        except OSError as e:
            p.error(f"mode auto writes its choice to {args.out_dir}/auto.json: {e.strerror or e}")
    if args.init_from and args.modes != ["base"] and not os.path.isfile(os.path.join(args.out_dir, FILES["tuned"])):
        p.error(f"--init_from without a fine-tuned run in --out_dir {args.out_dir} is the checkpoint as it is: "
                "--modes base only (train.py --init_from makes the other modes)")
    return args


def check_json_target(args):
    """--json replaces only an earlier result of its own kind ({"results": ...}), never a file this command
    reads (a checkpoint, the tokenizer, an --eval or --dev file) or any other file of the run."""
    if not args.json or not os.path.exists(args.json):
        return
    inputs = [*args.eval, args.dev, *(os.path.join(args.out_dir, name) for name in FILES.values())]
    if any(path and os.path.exists(path) and os.path.samefile(path, args.json) for path in inputs):
        raise UserError(f"--json {args.json} is one of this command's inputs or the run's files: write the results "
                        "elsewhere")
    earlier = None
    if os.path.isfile(args.json):  # (a named pipe would never answer)
        try:
            with open(args.json, encoding="utf-8") as f:
                earlier = json.load(f)
        except (OSError, ValueError, RecursionError):
            pass
    if not (isinstance(earlier, dict) and set(earlier) == {"results"}):
        raise UserError(f"--json {args.json} exists and is not an earlier result of infer.py --json: not overwritten")


def main(argv=None):
    args = parse_args(argv)
    check_json_target(args)
    if args.init_from and args.modes == ["base"]:
        run = Pretrained(args.init_from, args.device)
    else:
        run = FinishedRun(args.out_dir, args.init_from)
    if "auto" in args.modes:
        print(run.choose_auto(args.dev, args.device, args.auto_per_layer))
    if args.eval:
        results = evaluate(run, args.modes, read_eval_sets(args.eval), args.device)
        print_results(results, args.modes)
        if args.json:
            write_json(args.json, {"results": results})  # {"answer"|"exact": {set: {mode: accuracy}}}
    for mode in args.modes if args.prompt else []:
        model = run.build(mode, args.device)
        failed = compile_decoding(model) if args.compile else None
        if failed:
            print(f"--compile: torch.compile failed ({failed}); decoding without it", file=sys.stderr)
        for prompt in args.prompt:
            text = generate_text(model, run.sp, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                 run.template)
            print(text if len(args.modes) == 1 else f"{mode:>8}: {text}")


if __name__ == "__main__":
    run_cli(main)
