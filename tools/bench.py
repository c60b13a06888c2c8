"""How fast is model.py, next to Hugging Face's LlamaForCausalLM, and what do TAIA's own steps cost?

    python tools/bench.py                    # tiny Llama (the toy preset), on the GPU if there is one
    python tools/bench.py --device all       # CPU, and CUDA if present
    python tools/bench.py --dim 512 --n_layers 4 --hidden_dim 2048 --seq_len 256   # matmuls dominate
    python tools/bench.py --json bench.json  # also write every figure as JSON

Three measurements, each on the same weights for every contender:
  1. a training step (forward, cross-entropy, backward, AdamW): tokens/s, ours against Hugging Face,
     and model FLOP/s as a fraction of a large fp32 matrix multiply timed alongside it;
  2. greedy decoding of --new_tokens after a --prompt_len prompt with the KV cache, against
     `LlamaForCausalLM.generate`, and against our own decoding without the cache;
  3. `taia.snapshot` and `taia.rebuild` against a plain clone of the FFN tensors, and the bytes kept.

Method: everything runs in this one process. Each contender is warmed up, then the contenders take
turns (A B C, C B A, ...) so that a change in machine load hits all of them alike, and every figure is
the median over --repeats. Calls shorter than MIN_SAMPLE_S are timed in batches, as timeit does.
transformers is only a development dependency: without it the Hugging Face columns read
"not installed" and everything else still runs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import taia  # noqa: E402
from checkpoints.hf import save_hf  # noqa: E402
from common import OneLineParser, UserError, run_cli  # noqa: E402
from model import ModelConfig, Transformer, flops_per_token  # noqa: E402
from tools.timing import (NOT_INSTALLED, adamw, compiled_copy, cpu_model, first_difference, fmt,  # noqa: E402
                          import_transformers, positive_int, publish, race, ratio, table, training_step)



# ---- command line ---------------------------------------------------------------------------------

def batch_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def parse_args(argv=None):
    toy = ModelConfig()  # the defaults are the toy preset's sizes
    p = OneLineParser(prog="tools/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dim", type=positive_int, default=toy.dim, help=f"width of the residual stream (default {toy.dim})")
    a("--n_layers", type=positive_int, default=toy.n_layers, help=f"blocks (default {toy.n_layers})")
    a("--n_heads", type=positive_int, default=toy.n_heads, help=f"query heads (default {toy.n_heads})")
    a("--n_kv_heads", type=positive_int, help="key/value heads, fewer for grouped-query attention (default n_heads)")
    a("--hidden_dim", type=positive_int, default=toy.hidden_dim, help=f"SwiGLU width (default {toy.hidden_dim})")
    a("--vocab_size", type=positive_int, default=toy.vocab_size, help=f"vocabulary (default {toy.vocab_size})")
    a("--batch", type=positive_int, default=8, help="training sequences per step (default 8)")
    a("--seq_len", type=positive_int, default=256, help="training sequence length (default 256)")
    a("--prompt_len", type=positive_int, default=32, help="decoding prompt length (default 32)")
    a("--new_tokens", type=positive_int, default=256, help="tokens decoded after the prompt (default 256)")
    a("--decode_batches", type=batch_list, default=[1, 8], metavar="B1,B2",
      help="batch sizes to decode at, comma-separated (default 1,8)")
    a("--repeats", type=positive_int, default=5, help="timed samples per contender; the median is reported (default 5)")
    a("--warmup", type=positive_int, default=2, help="untimed calls per contender first (default 2)")
    a("--gemm_size", type=positive_int,
      help="n for the n x n x n fp32 matmul that measures this machine's rate (default 2048 on CPU, 8192 on CUDA)")
    a("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice, one per core)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "all"],
      help="where to run: auto = CUDA if present, else CPU (default); all = CPU, and CUDA if present")
    a("--train_run", metavar="CONTENDERS", nargs="?", const=",".join(TRAIN_RUNS),
      help="instead: time the default `python train.py` end to end, per stage, once per contender (comma-separated "
           f"from {', '.join(TRAIN_RUNS)}; default all: minutes each), and check they give the same results")
    a("--train_args", default="", metavar="ARGS", help="with --train_run: more train.py flags for every run")
    a("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = p.parse_args(argv)
    if args.train_run is not None:
        args.train_run = args.train_run.split(",")
        unknown = sorted(set(args.train_run) - set(TRAIN_RUNS))
        if unknown:
            p.error(f"--train_run: unknown contender {unknown[0]!r} (choose from {', '.join(TRAIN_RUNS)})")
    try:
        args.cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                               hidden_dim=args.hidden_dim, vocab_size=args.vocab_size,
                               max_seq_len=max(args.seq_len, args.prompt_len + args.new_tokens))
    except ValueError as e:
        p.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    gpu = torch.cuda.is_available()
    args.devices = {"auto": ["cuda" if gpu else "cpu"], "cpu": ["cpu"], "cuda": ["cuda"],
                    "all": ["cpu"] + ["cuda"] * gpu}[args.device]
    return args


# ---- the contenders -----------------------------------------------------------------------------------

def models(cfg: ModelConfig, device: str, transformers, seed: int = 0):
    """Ours with a fresh random initialisation, and LlamaForCausalLM holding exactly the same weights
    (None without transformers). The weights go through a Hugging Face directory, as a user's would."""
    torch.manual_seed(seed)
    ours = Transformer(cfg).to(device)
    if transformers is None:
        return ours, None
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
    return ours, hf


# ---- 1. training step ---------------------------------------------------------------------------------

def bench_training(args, device: str, transformers) -> dict:
    cfg = args.cfg
    ours, hf = models(cfg, device, transformers)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_of(logits):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    # The same loss computed outside both models, so only the models differ. use_cache=False: a
    # training forward has no use for HF's KV cache, and building one would only slow HF down.
    forwards = {"ours": (ours, lambda: ours(inputs))}
    if hf is not None:
        forwards["hf"] = (hf, lambda: hf(input_ids=inputs, use_cache=False).logits)
    contenders = {}
    for name, (model, forward) in forwards.items():
        model.train()
        contenders[name] = training_step(forward, loss_of, adamw(model))
    loss_diff = None
    if hf is not None:  # a check that the race is fair: same weights, same loss
        with torch.no_grad():
            loss_ours, loss_hf = (loss_of(forward()).item() for _, forward in forwards.values())
        loss_diff = abs(loss_ours - loss_hf)

    # The matmul that measures this machine's rate takes turns with the training steps, so a change
    # in load while we measure moves the yardstick and the steps alike.
    n = args.gemm_size or (8192 if device == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    contenders["gemm"] = lambda: torch.mm(a, b)
    seconds = race(contenders, args, device)

    gemm_rate = 2 * n ** 3 / seconds["gemm"]
    per_token = flops_per_token(cfg, args.seq_len)
    step_tokens = args.batch * args.seq_len
    tokens_per_s = {name: step_tokens / seconds[name] if name in seconds else None for name in ("ours", "hf")}
    flop_rate = {name: None if tps is None else tps * per_token for name, tps in tokens_per_s.items()}
    return {"tokens_per_step": step_tokens,
            "ms_per_step": {name: 1000 * seconds[name] if name in seconds else None for name in ("ours", "hf")},
            "tokens_per_s": tokens_per_s,
            "ours_over_hf": ratio(tokens_per_s["ours"], tokens_per_s["hf"]),
            "flops_per_token": per_token,
            "flop_per_s": flop_rate,
            "gemm": {"n": n, "flop_per_s": gemm_rate},
            "fraction_of_gemm": {name: None if rate is None else rate / gemm_rate for name, rate in flop_rate.items()},
            "loss_diff": loss_diff}


# ---- 2. greedy decoding ------------------------------------------------------------------------------

def bench_decoding(args, device: str, transformers) -> dict:
    ours, hf = models(args.cfg, device, transformers, seed=1)
    ours.eval()
    compiled, compile_error = compiled_copy(ours)
    if hf is not None:
        hf.eval()
        # No end-of-sequence token, so HF decodes every one of --new_tokens, as we do; min_new_tokens
        # guards the same thing should a default EOS come back from somewhere.
        hf.generation_config.eos_token_id = None
    results = {}
    for batch in args.decode_batches:
        prompt = torch.randint(0, args.cfg.vocab_size, (batch, args.prompt_len), device=device)
        new = args.new_tokens
        contenders = {"ours_cached": lambda: ours.generate(prompt, new),
                      "ours_uncached": lambda: ours.generate(prompt, new, use_cache=False)}
        if compiled is not None:
            contenders["ours_compiled"] = lambda: compiled.generate(prompt, new)
        if hf is not None:
            # An explicit all-ones attention mask: left to itself, generate takes every prompt token
            # equal to pad_token_id for padding and masks it out.
            contenders["hf"] = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                   min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        # Check the contenders do the same work before timing them: every row decodes `new` tokens.
        outputs = {name: fn() for name, fn in contenders.items()}
        for name, out in outputs.items():
            if out.shape != (batch, args.prompt_len + new):
                raise RuntimeError(f"{name} decoded {out.shape[1] - args.prompt_len} tokens, not {new}")
        seconds = race(contenders, args, device)
        # Decoded tokens per second; the time includes the prompt's prefill, as a user waits for it too.
        tokens_per_s = {name: batch * new / seconds[name] if name in seconds else None
                        for name in ("ours_cached", "ours_uncached", "ours_compiled", "hf")}
        results[f"batch_{batch}"] = {
            "tokens_per_s": tokens_per_s,
            "cached_over_hf": ratio(tokens_per_s["ours_cached"], tokens_per_s["hf"]),
            "compiled_over_hf": ratio(tokens_per_s["ours_compiled"], tokens_per_s["hf"]),
            "compile_error": compile_error,
            "compiled_differs_from": first_difference(outputs["ours_cached"], outputs["ours_compiled"], args.prompt_len)
                                     if compiled is not None else None,
            "cached_over_uncached": ratio(tokens_per_s["ours_cached"], tokens_per_s["ours_uncached"]),
            # Greedy decoding can part ways where two logits nearly tie and float rounding differs;
            # after that the continuations differ. None: identical throughout.
            "uncached_differs_from": first_difference(outputs["ours_cached"], outputs["ours_uncached"], args.prompt_len),
            "hf_differs_from": first_difference(outputs["ours_cached"], outputs["hf"], args.prompt_len)
                                if hf is not None else None}
    return results


# ---- 3. TAIA's own costs -------------------------------------------------------------------------------

def bench_taia(args, device: str) -> dict:
    torch.manual_seed(2)
    model = Transformer(args.cfg).to(device)
    # The FFN counted from the modules themselves, not through taia.is_ffn, so the byte check is independent.
    ffn_bytes = sum(p.nbytes for block in model.blocks for p in block.ffn.parameters())
    ffn = {name: p for name, p in model.named_parameters() if taia.is_ffn(name)}
    snap = taia.snapshot(model)
    # On CUDA the snapshot goes to host memory and rebuild comes back from it, while the plain copy
    # stays on the GPU: there the ratios include the PCIe transfer.
    seconds = race({"plain_copy": lambda: {name: p.detach().clone() for name, p in ffn.items()},
                    "snapshot": lambda: taia.snapshot(model),
                    "rebuild": lambda: taia.rebuild(model, snap)}, args, device)
    return {"ms": {name: 1000 * s for name, s in seconds.items()},
            "snapshot_over_copy": seconds["snapshot"] / seconds["plain_copy"],
            "rebuild_over_copy": seconds["rebuild"] / seconds["plain_copy"],
            "ffn_tensors": len(ffn),
            "ffn_bytes": ffn_bytes,
            "snapshot_bytes": sum(t.nbytes for t in snap.values())}


# ---- 4. the default run, end to end -----------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# How the CPU's cores can be used: train.py's default, the two fixed thread counts, two processes.
TRAIN_RUNS = {"auto": ["--threads", "auto"], "1": ["--threads", "1"],
              "cores": ["--threads", str(os.cpu_count())], "2x1": ["--threads", "1"]}


def bench_train_runs(args) -> dict:
    """Each contender runs the real train.py, alone, in a fresh directory; its "wall time:" line gives
    the per-stage seconds, and its results.json is compared with the first contender's."""
    runs, first = {}, None
    for name in args.train_run:
        with tempfile.TemporaryDirectory() as out:
            launcher = TORCHRUN_2 if name == "2x1" else [sys.executable]
            command = launcher + [os.path.join(ROOT, "train.py"), "--out_dir", out, *TRAIN_RUNS[name],
                                  *args.train_args.split()]
            started = time.time()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise UserError(f"--train_run {name}: train.py failed: {last}")
            wall = [line for line in done.stdout.splitlines() if line.startswith("wall time: ")][-1]
            stages = dict(part.rsplit(" ", 2)[:2] for part in wall[len("wall time: "):].split(", "))
            with open(os.path.join(out, "results.json")) as f:
                results = json.load(f)["results"]
        first = first or results
        runs[name] = {"command": " ".join(launcher[1:] + ["train.py", *TRAIN_RUNS[name]]),
                      "seconds": {stage: float(s) for stage, s in stages.items()},
                      "elapsed": time.time() - started, "same_results": results == first}
    return runs


def train_run_report(runs: dict, cpu: str) -> str:
    stages = list(next(iter(runs.values()))["seconds"])
    rows = [["train.py, seconds", *stages, "same results"]]
    rows += [[run["command"], *(f"{run['seconds'][s]:.1f}" for s in stages), "yes" if run["same_results"] else "NO"]
             for run in runs.values()]
    return f"CPU: {cpu}\n\n" + table(rows)


# ---- report -------------------------------------------------------------------------------------------

def report(results: dict, args) -> str:
    cfg = args.cfg
    lines = [f"CPU: {results['cpu']}",
             f"torch {results['torch']}, transformers {results['transformers'] or NOT_INSTALLED}; "
             f"dim {cfg.dim}, n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, n_kv_heads {cfg.n_kv_heads}, "
             f"hidden_dim {cfg.hidden_dim}, vocab_size {cfg.vocab_size}; median of {args.repeats} after "
             f"{args.warmup} warm-up"]
    for device, r in results["devices"].items():
        t, d, ta = r["train"], r["decode"], r["taia"]
        lines += ["", f"== {device}" + (f" ({r['threads']} thread{'s' * (r['threads'] != 1)})" if device == "cpu" else "")]
        lines += ["", table([
            [f"training step, {args.batch} x {args.seq_len} tokens, AdamW", "ours", "Hugging Face", "ours/HF"],
            ["tokens/s", fmt(t["tokens_per_s"]["ours"]), fmt(t["tokens_per_s"]["hf"]), fmt(t["ours_over_hf"], ".2f", "x")],
            ["ms/step", fmt(t["ms_per_step"]["ours"], ".1f"), fmt(t["ms_per_step"]["hf"], ".1f"), ""],
            [f"GFLOP/s at {t['flops_per_token'] / 1e6:.1f} MFLOP/token", fmt(t["flop_per_s"]["ours"] / 1e9, ".1f"),
             fmt(None if t["flop_per_s"]["hf"] is None else t["flop_per_s"]["hf"] / 1e9, ".1f"), ""],
            [f"of fp32 GEMM ({t['gemm']['n']}^3: {t['gemm']['flop_per_s'] / 1e9:.1f} GFLOP/s)",
             fmt(t["fraction_of_gemm"]["ours"], ".0%"), fmt(t["fraction_of_gemm"]["hf"], ".0%"), ""]])]
        if t["loss_diff"] is not None:
            lines.append(f"(same weights: |loss ours - loss HF| = {t['loss_diff']:.1e})")
        rows = [[f"greedy decoding, tokens/s ({args.prompt_len} prompt + {args.new_tokens} new)",
                 "ours cached", "ours compiled", "ours uncached", "HF generate", "cached/HF", "compiled/HF",
                 "cached/uncached", "tokens as HF's"]]
        for name, b in d.items():
            rows.append([name.replace("_", " "), fmt(b["tokens_per_s"]["ours_cached"]),
                         "failed" if b["compile_error"] else fmt(b["tokens_per_s"]["ours_compiled"]),
                         fmt(b["tokens_per_s"]["ours_uncached"]), fmt(b["tokens_per_s"]["hf"]),
                         fmt(b["cached_over_hf"], ".2f", "x"),
                         "" if b["compile_error"] else fmt(b["compiled_over_hf"], ".2f", "x"),
                         fmt(b["cached_over_uncached"], ".2f", "x"),
                         "not compared" if b["tokens_per_s"]["hf"] is None else "identical" if b["hf_differs_from"] is None
                         else f"differ from token {b['hf_differs_from']}"])
        lines += ["", table(rows)]
        lines += [f"(note: at {name.replace('_', ' ')} our {pair} tokens differ from token {b[key]}: a near-tie of "
                  "two logits, or a bug)" for key, pair in (("uncached_differs_from", "cached and uncached"),
                                                             ("compiled_differs_from", "compiled and eager"))
                  for name, b in d.items() if b[key] is not None]
        lines += [f"(ours compiled: not measured, torch.compile failed here: {b['compile_error']})"
                  for b in list(d.values())[:1] if b["compile_error"]]
        lines += ["", table([
            [f"TAIA, {ta['ffn_tensors']} FFN tensors", "ms", "vs plain copy"],
            ["plain copy {k: v.clone()}", f"{ta['ms']['plain_copy']:.3f}", "1.00x"],
            ["taia.snapshot", f"{ta['ms']['snapshot']:.3f}", f"{ta['snapshot_over_copy']:.2f}x"],
            ["taia.rebuild", f"{ta['ms']['rebuild']:.3f}", f"{ta['rebuild_over_copy']:.2f}x"]])]
        lines.append(f"snapshot {ta['snapshot_bytes']:,} bytes, FFN {ta['ffn_bytes']:,} bytes: "
                     + ("equal" if ta["snapshot_bytes"] == ta["ffn_bytes"] else "DIFFERENT"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.train_run:
        runs = bench_train_runs(args)
        publish({"cpu": cpu_model(), "train_runs": runs}, train_run_report(runs, cpu_model()), args.json)
        return runs
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers = import_transformers()
    results = {"cpu": cpu_model(), "torch": torch.__version__,
               "transformers": transformers and transformers.__version__,
               "config": asdict(args.cfg), "batch": args.batch, "seq_len": args.seq_len,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "warmup": args.warmup, "devices": {}}
    for device in args.devices:
        results["devices"][device] = {"threads": torch.get_num_threads(),
                                      "train": bench_training(args, device, transformers),
                                      "decode": bench_decoding(args, device, transformers),
                                      "taia": bench_taia(args, device)}
    return publish(results, report(results, args), args.json)


if __name__ == "__main__":
    run_cli(main)
