"""Command line: parse -> build the verb's specs (tasa.config) -> call one pipeline function -> print the result.

Errors in the user's input print one line (``tasa: error: ...``) and exit 2.  Flags shared by several verbs
(model and runtime, ``--group-size``, ``--seqlen``, ``--seed``) come from parent parsers, so each has one name,
one default and one help text.  This file is longer than ~400 lines because it holds the argument definitions
and help texts of seven verbs; the dispatch is a few lines per verb.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tasa import __version__
from tasa.allocate.targets import TARGETS
from tasa.config import (ACT_ORDER, AUTO_CHOICE_ITEMS, BETTER_QUANTIZER, CHOICE_COSTS, EXPORT_FORMATS, FLOAT_DTYPES,
                         FLOAT_TARGETS, PLACEMENTS, SCALE_SEARCH, TOKEN_COSTS)
from tasa.errors import TasaError

EPILOG = ("Built-in datasets (wikitext2, gsm8k, arc_easy, arc_challenge, mmlu, mbpp) ship inside tasa; "
          "$TASA_DATA_DIR (a folder with the same layout) overrides them and --data-source hub reads them "
          "from the Hugging Face hub instead.")


GROUP_SIZE_HELP = ("input columns per scale/zero group; -1 = one group per output channel (default: auto, the largest "
                   "of 128, 64, 32, 16 that divides every input size: 64 on SmolLM2, whose hidden size 576 is not a "
                   "multiple of 128)")


def _parent(*adders) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="local HF directory, .gguf file, hub id, or 'smollm2-135m' (embedded default)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, auto (the first GPU when there is one, else the CPU), or several GPUs "
                        "(cuda:0,cuda:1: the decoder layers spread over them in contiguous runs balanced by bytes, "
                        "for a model larger than one GPU's memory; they compute one after another) (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32 on CPU, bfloat16 on GPU); Hessians are summed, GPTQ and "
                        "learned grids computed in float32 in any case (on a CPU with native bfloat16, a bfloat16 "
                        "model's Hessians from bfloat16 products batch by batch). On a CPU that computes bfloat16 "
                        "natively (AVX512-BF16, AMX) bfloat16 quantizes faster, as AutoRound does there by default (docs/RESULTS.md, \"The time "
                        "goal as the issue states it\")")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward batch (default: 8)")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="read the model's weights from disk one decoder layer at a time, for models larger than "
                        "memory: on, off, or auto (when the weights exceed half of the free memory) "
                        "(default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--data-source", choices=["package", "hub"], default=None,
                   help="where the built-in datasets come from: package (the copies shipped with tasa, or "
                        "$TASA_DATA_DIR) or hub (their usual Hugging Face ids, through 'datasets'; cached after "
                        "the first download) (default: $TASA_DATA_SOURCE, else package)")


def _group_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, default=None, help=GROUP_SIZE_HELP)

def _seqlen_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=512,
                   help="tokens per sequence: calibration sequences and WikiText-2 evaluation windows "
                        "(default: 512)")


def _seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed of calibration sequences, probe rows and held-out splits (default: 0)")


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")


def _damp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--damp", type=float, default=0.01,
                   help="dampening added to the Hessian diagonal, as a fraction of its mean (default: 0.01)")


def _target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=sorted(TARGETS), default=None,
                   help="engine the checkpoint must be servable by: gptqmodel (GPTQ, 2/3/4/8 bits), vllm "
                        "(compressed-tensors, 2 to 8 bits, asymmetric only at 4/8), vllm-gptq or sglang (GPTQ, "
                        "symmetric 4/8 bits), compressed-tensors (the format alone); vLLM and SGLang tie q/k/v, "
                        "gate/up and a layer's experts; constrains allocation and export (default: a plan's own "
                        "target, else gptqmodel)")


def _gptq_order_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=ACT_ORDER,
                   help="GPTQ, for every module (a plan's too): quantize columns by decreasing Hessian diagonal "
                        f"(default: {'on' if ACT_ORDER else 'off'}; with static groups it took 11%% off the KL of "
                        "tasa run's 3.5-bit plan with the scale search on, in the same time: docs/RESULTS.md)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=ACT_ORDER,
                   help="GPTQ: fix every group's grid before quantizing, in column order (with --act-order: g_idx "
                        f"stays trivial, as every engine reads it) (default: {'on' if ACT_ORDER else 'off'})")


def _eval_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-limit", type=int, default=50,
                   help="test rows per task, evaluated zero-shot as profiled (default: 50; raise it for accuracy "
                        "figures that mean something: ARC accuracy on 50 rows has a standard error of ~0.07)")
    p.add_argument("--eval-windows", type=int, default=20,
                   help="wikitext2 test windows of --seqlen tokens (default: 20)")


def _scale_search_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale-search", type=int, default=SCALE_SEARCH, metavar="N",
                   help="for every module (a plan's too): try N ranges narrower than each group's plain grid "
                        "(down to half) and keep the one with the least error weighted by the Hessian's diagonal "
                        f"(RTN: plain squared error); 0: off (default: {SCALE_SEARCH})")


def _float_targets_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--float-targets", type=float, default=None, metavar="ALPHA",
                   help="GPTQ with asymmetric calibration (GPTAQ / GPTQ v2): each linear is fitted so that, fed the "
                        "quantized model's inputs, it reproduces the float model's outputs (the float model's inputs "
                        "are kept beside them, one more copy of a layer's inputs); ALPHA in (0, 1] scales the "
                        f"correction toward them (1: the least-squares fit); 0: off (default: {FLOAT_TARGETS:g} for "
                        "GPTQ in one process; off for RTN, learned rounding and --distributed calibration)")


def _learn_rounding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--learn-rounding", type=int, default=0, metavar="STEPS",
                   help="for any plan: instead of GPTQ (or RTN), learn every weight's rounding and each group's "
                        "clipping, decoder layer by decoder layer, so that the quantized layer fed the quantized "
                        "model's inputs reproduces the float layer's outputs (SignRound, AutoRound's method), in "
                        "STEPS signed-gradient steps of one calibration batch each; starts from the grid of "
                        "--scale-search; needs calibration; 0: off (default: 0)")
    p.add_argument("--learn-lr", type=float, default=None, metavar="LR",
                   help="learned rounding's first step size, falling linearly to 0 (default: 1 / STEPS)")
    p.add_argument("--learn-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="learned rounding's steps computed in this dtype: auto is bfloat16 for a float32 model where "
                        "the device computes it natively (CUDA; a CPU with AVX512-BF16/AMX), else the model's own "
                        "(default: auto)")
    p.add_argument("--learn-start", choices=["rtn", "gptq"], default="rtn",
                   help="where learned rounding starts: rtn (the grid of --scale-search, rounded to nearest: "
                        "AutoRound's start) or gptq (each layer quantized by GPTQ with its options, --float-targets "
                        "included, then the same learning on the values GPTQ rounded, on GPTQ's grid with each "
                        "group's scale rescaled; never worse than GPTQ on the layer's calibration) (default: rtn)")
    p.add_argument("--learn-output-kl", action="store_true",
                   help="learned rounding of the last decoder layer minimises the KL divergence of the model's "
                        "next-token distribution (float against quantized, through its final norm and head, on "
                        "whole sequences of about 1024 tokens of a batch a step) instead of the layer output's "
                        "error (default: off)")


def _format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default=None, dest="export_format",
                   help="gptq: packed GPTQ checkpoint (int32 qweight/qzeros, fp16 scales, per-module bits in "
                        "quantize_config.json 'dynamic'); compressed-tensors: llm-compressor's pack-quantized "
                        "format, which vLLM serves at 2 to 8 bits per module (a config group per grid); gguf: one GGUF "
                        "file for llama.cpp, a GGML type per tensor holding tasa's codes exactly, its metadata, "
                        "tokenizer and float tensors from a GGUF of the model (the file it is read from, "
                        "--gguf-template or --llama-cpp; --target llama.cpp); fp: the "
                        "dequantized float model, loadable by plain transformers. The target's rules for the format "
                        "apply (--target vllm --format gptq: vLLM's GPTQ path, 4/8 bits) (default: the format the "
                        "target is served from: gptq for gptqmodel, compressed-tensors for vllm, gguf for llama.cpp)")
    p.add_argument("--gguf-template", default=None, metavar="FILE",
                   help="--format gguf of a Hugging Face model: a GGUF of the same model (e.g. llama.cpp's "
                        "convert_hf_to_gguf.py output) whose metadata, tokenizer and float tensors the export "
                        "carries; checked against the model (default: the model's own GGUF file, else --llama-cpp)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="--format gguf of a Hugging Face model: a llama.cpp checkout; tasa runs its "
                        "convert_hf_to_gguf.py on the model's directory for the template (a temporary 16-bit GGUF, "
                        "removed after; needs 'pip install tasa[gguf]') (default: $LLAMA_CPP_DIR)")


def _allocation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beta", default="0.5",
                   help="weight of perplexity against the task objectives in [0, 1], or ppl-only / task-only "
                        "(default: 0.5)")
    p.add_argument("--task-weights", default=None, help="relative task weights, e.g. gsm8k:2,arc_easy:1")
    p.add_argument("--budget-includes-metadata", action="store_true",
                   help="count scale/zero storage ((16 + bits) / group size per weight) against the budget")


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--granularity", choices=["layer", "module"], default="layer",
                   help="profile (and allocate) whole decoder layers, or every linear module (7x the probes; on "
                        "SmolLM2-135M the module plan scored below the layer plan, see docs/RESULTS.md) "
                        "(default: layer)")
    p.add_argument("--tie-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="mixture-of-experts models at module granularity: the routed experts of a layer are one "
                        "unit (one probe, one bit-width; attention and shared experts get their own), as engines' "
                        "fused MoE kernels need; --no-tie-experts probes and allocates every expert on its own "
                        "(default: tied)")
    p.add_argument("--choice-cost", choices=list(CHOICE_COSTS), default="auto",
                   help="multiple-choice objectives: kl = divergence of the answer distribution from full "
                        "precision, gold = increase of -log p(gold | choices), token-kl = per-token divergence of "
                        f"the next-token distribution on the choices' tokens, auto = token-kl below "
                        f"{AUTO_CHOICE_ITEMS} items (tasa run's 768-token profile), else kl (tasa profile's 4096): "
                        "the one that predicts the answer-distribution ranking of held-out items better at that "
                        "size (docs/RESULTS.md) (default: auto)")
    p.add_argument("--token-cost", choices=list(TOKEN_COSTS), default="kl",
                   help="text objectives (wikitext2, gsm8k solutions): kl = per-token divergence of the next-token "
                        "distribution from full precision, nll = increase of the per-token NLL; kl ranks units "
                        "far more steadily from the same tokens (docs/RESULTS.md) (default: kl)")
    p.add_argument("--probe-quantizer", choices=["rtn", "gptq"], default="rtn",
                   help="how a probe quantizes its unit: rtn (intrinsic sensitivity, the method's default) or gptq "
                        "(the damage GPTQ leaves, with Hessians from the calibration; about 1.6x the profile "
                        "time, see docs/RESULTS.md) (default: rtn)")


def _distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", choices=["ray"], default=None,
                   help="spread the work over a Ray cluster (pip install 'tasa[distributed]'): profile's probes "
                        "(workers each load the model and probe layers whose inputs this process computes once), "
                        "GPTQ's calibration (each worker holds a shard of it; their Hessians are merged here); "
                        "the same results as the serial path to float tolerance (docs/DISTRIBUTED.md) "
                        "(default: serial, here)")
    p.add_argument("--address", default=None,
                   help="with --distributed ray: the cluster's head, e.g. 10.0.0.1:6379 (default: $RAY_ADDRESS, "
                        "else a local Ray instance on this machine's cores)")
    p.add_argument("--workers", type=int, default=None,
                   help="with --distributed ray: workers (default: one per GPU of the cluster with a GPU "
                        "--device, else the cluster's CPU cores // --worker-threads)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="with --distributed ray on CPUs: torch threads (and cores) per worker (default: 1)")
    p.add_argument("--placement", choices=list(PLACEMENTS), default="auto",
                   help="with --distributed ray: task = every worker holds the model and takes whole probes; "
                        "pipeline = each worker holds a slice of the layers and probes flow through them, for "
                        "models one worker cannot hold; auto = pipeline when this machine streams the model "
                        "(--stream), else task (default: auto)")
    p.add_argument("--stages", type=int, default=None,
                   help="with --placement pipeline: stages per pipeline; the workers form workers // STAGES "
                        "pipelines (the last layer and the head run on every probe's last stage, so one long "
                        "pipeline gains little: use the fewest stages whose layers fit a worker) (default: every "
                        "worker in one pipeline)")


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace what OUTPUT_DIR holds: a non-empty directory, or probes made with other settings")


def _runtime(args):
    from tasa.config import Cluster, Runtime

    cluster = Cluster(getattr(args, "distributed", None), getattr(args, "address", None),
                      getattr(args, "workers", None), getattr(args, "worker_threads", 1),
                      getattr(args, "placement", "auto"), getattr(args, "stages", None))
    return Runtime(device=args.device, dtype=args.dtype, batch_size=args.batch_size, progress=not args.quiet,
                   stream=args.stream, cluster=cluster)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tasa", description="Task-aware mixed-precision quantization of LLMs.",
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tasa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model, group, seqlen = _parent(_model_args), _parent(_group_size_arg), _parent(_seqlen_arg)
    sampling = _parent(_seqlen_arg, _seed_arg)
    grid, damp, target = _parent(_grid_args), _parent(_damp_arg), _parent(_target_arg)
    allocation, probes, overwrite = _parent(_allocation_args), _parent(_probe_args), _parent(_overwrite_arg)
    distributed = _parent(_distributed_args)

    q = sub.add_parser("quantize", help="quantize all decoder-layer linears uniformly (GPTQ or RTN)",
                       description="Quantize every linear module of every decoder layer at one bit-width and "
                                   "write the dequantized model (safetensors, loadable by transformers), "
                                   "plan.json and quantize.json.", epilog=EPILOG,
                       parents=[model, group, sampling, grid, damp, target, distributed, overwrite])
    q.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="quantizer (default: gptq)")
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default: 4)")
    _gptq_order_args(q)
    _scale_search_arg(q)
    _float_targets_arg(q)
    _learn_rounding_args(q)
    q.add_argument("--calib", default="wikitext2",
                   help="calibration sources with weights, e.g. wikitext2:0.5,gsm8k:0.5; a name, NAME/SPLIT, "
                        "FILE.txt, FILE.jsonl#FIELD or hf:DATASET?split=S&field=F (default: wikitext2)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default: 128)")
    q.add_argument("--no-true-sequential", action="store_true",
                   help="GPTQ: collect all of a layer's Hessians before quantizing any of its modules")
    q.add_argument("--allow-ragged-groups", action="store_true",
                   help="allow a group size that does not divide an input size (last group shorter)")
    q.add_argument("--plan", default=None,
                   help="plan.json (e.g. from tasa allocate): per-module bits and group sizes; overrides --method, "
                        "--bits, --group-size")
    q.add_argument("--allow-partial-plan", action="store_true",
                   help="keep the linears a --plan leaves out in full precision (default: such a plan is refused); "
                        "the reported average bits count them at their stored bits")
    _format_arg(q)
    q.add_argument("--w8a8", action="store_true",
                   help="compressed-tensors: write the 8-bit modules as W8A8, int8 weights (quantized per output "
                        "channel) with dynamic per-token int8 activations, the scheme vLLM's int8 kernels serve "
                        "(its CPU build serves 8-bit weights only so) (default: weight-only)")
    q.add_argument("--float-dtype", choices=list(FLOAT_DTYPES), default="auto",
                   help="dtype of the tensors left in float (embeddings, head, norms, routers): auto = the source "
                        "checkpoint's half dtype (bfloat16/float16; a GGUF file's: float16), else the compute dtype "
                        "(default: auto)")
    q.add_argument("--max-shard-size", default="1GB",
                   help="largest safetensors shard, e.g. 1GB, 500MB or 5GiB; the export holds one shard in memory "
                        "while it writes (default: 1GB)")
    q.add_argument("--output-dir", required=True, help="directory to write; must be empty unless --overwrite")

    e = sub.add_parser("eval", help="evaluate a model: perplexity and tasks, optionally against a reference",
                       description="Evaluate a model on WikiText-2 perplexity (GPTQ convention: non-overlapping "
                                   "windows of --seqlen tokens of the test split) and on tasks matching lm-eval "
                                   "0.4.x's default tasks: arc_easy, arc_challenge, mmlu (log-likelihood multiple "
                                   "choice: acc, acc_norm, gold-choice log-prob and margin) and gsm8k (greedy "
                                   "chain-of-thought: strict_match, flexible_extract, gold-solution NLL). A task "
                                   "can also be a user task spec file (.yaml/.json, see docs/TASKS.md).",
                       epilog=EPILOG, parents=[model, seqlen])
    e.add_argument("--tasks", default="wikitext2",
                   help="comma-separated: wikitext2, arc_easy, arc_challenge, mmlu, gsm8k or SPEC.yaml "
                        "(default: wikitext2)")
    e.add_argument("--limit", type=int, default=None,
                   help="first N rows of each task's evaluation split (mmlu: of each subject); wikitext2: N "
                        "windows (default: all)")
    e.add_argument("--num-fewshot", type=int, default=None,
                   help="worked examples before each question (default: the task's, 5 for gsm8k, else 0)")
    e.add_argument("--reference", default=None,
                   help="full-precision reference: a model spec or a results JSON written with --log-samples; "
                        "adds flip rates per task and the KL divergence on wikitext2")
    e.add_argument("--kl-topk", type=int, default=256,
                   help="with --log-samples: keep the top-K next-token log-probs per position for later KL "
                        "comparisons (default: 256)")
    e.add_argument("--no-generate", action="store_true",
                   help="skip generation (gsm8k: gold-solution NLL only)")
    e.add_argument("--apply-chat-template", action="store_true",
                   help="wrap each prompt in the model's chat template as one user turn")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="score each continuation as its own sequence instead of sharing its context's KV cache")
    e.add_argument("--log-samples", action="store_true",
                   help="write per-item records (and wikitext2 top-k log-probs) with the results")
    e.add_argument("--output", default=None, help="write results JSON here")
    p = sub.add_parser("profile", help="measure per-layer (or per-module) sensitivity on several objectives",
                       description="For each decoder layer (or linear module) and bit-width, quantize only "
                                   "that unit (RTN, or GPTQ on a calibration) and measure each objective's degradation against the full-precision "
                                   "model (cached layer inputs: the probe of layer l runs layers l..L only). "
                                   "Writes OUTPUT_DIR/sensitivity.json; finished probes are kept in OUTPUT_DIR, "
                                   "so re-running the same command after a kill resumes.", epilog=EPILOG,
                       parents=[model, group, sampling, grid, probes, distributed, overwrite])
    p.add_argument("--objectives", default="wikitext2,gsm8k,arc_easy",
                   help="comma-separated: wikitext2 (log-perplexity), gsm8k (gold-solution NLL), arc_easy, "
                        "arc_challenge, mmlu (-log p(gold | choices)), or task spec files; probe rows come from "
                        "validation/train/dev splits, never evaluation ones (default: wikitext2,gsm8k,arc_easy)")
    p.add_argument("--bits", default="3,4,8", help="candidate bit-widths (default: 3,4,8)")
    p.add_argument("--probe-tokens", type=int, default=4096,
                   help="scored tokens per objective, at least (default: 4096)")
    p.add_argument("--probe-seqlen", type=int, default=128,
                   help="wikitext2 probe window length; shorter windows give more items for intervals and rank "
                        "stability at the same token count (default: 128)")
    p.add_argument("--max-state-gb", type=float, default=4.0,
                   help="RAM budget for the kept layer inputs; past it they are spilled to OUTPUT_DIR/kept-states "
                        "(default: 4)")
    p.add_argument("--batch-tokens", type=int, default=512,
                   help="padded tokens per forward pass; rows of similar length are batched together (default: 512)")
    p.add_argument("--estimator", choices=["measured", "fisher", "autoscheme"], default="measured",
                   help="how sensitivity is estimated: measured probes, or a one-backward-pass estimator: fisher "
                        "(HAWQ-V2-style Fisher trace x squared perturbation) or autoscheme (AutoRound's "
                        "|grad x (W - Q(W))| with all layers quantized) (default: measured)")
    p.add_argument("--compare-estimators", action="store_true",
                   help="with measured probes, also run both estimators and report their Kendall tau against "
                        "the probes and their cost")
    p.add_argument("--calib", default=None,
                   help="with --probe-quantizer gptq: calibration mixture, e.g. wikitext2:0.5,gsm8k:0.5")
    p.add_argument("--nsamples", type=int, default=128, help="with gptq probes: calibration sequences (default: 128)")
    p.add_argument("--layers", default=None, help="probe only these layers, e.g. 0,15,29 (default: all)")
    p.add_argument("--top-k", type=int, default=8, help="K of the report's top-K overlap table (default: 8)")
    p.add_argument("--output-dir", required=True,
                   help="where sensitivity.json, report.md/.html, plots and the probe records go")
    r = sub.add_parser("run", help="profile -> allocate -> quantize -> export -> evaluate -> report, resumable",
                       description="The whole method on one model: measure layer sensitivities on wikitext2 and "
                                   "the tasks, allocate bits per layer under the budget (exact DP), quantize with "
                                   "GPTQ on the calibration mixture, export a checkpoint the target serves, evaluate it against "
                                   "the full-precision model on held-out test rows, and write report.md/.html. "
                                   "Each stage is recorded in OUTPUT_DIR/stages.json under a hash of its inputs: "
                                   "rerunning skips finished stages, a killed run resumes.", epilog=EPILOG,
                       parents=[model, group, sampling, allocation, probes, distributed, target])
    r.add_argument("--tasks", required=True, help="tasks to protect, e.g. gsm8k,arc_easy (or SPEC.yaml files)")
    _format_arg(r)
    r.add_argument("--budget", type=float, required=True, help="average bits per weight, e.g. 3.5")
    r.add_argument("--calib", default=None,
                   help="GPTQ calibration mixture, e.g. wikitext2:0.5,gsm8k:0.5, or 'auto': search the wikitext2 "
                        "share against the tasks (tasa search-mixture) as the run's first stage (default: auto "
                        "when every task is a built-in dataset with calibration rows, else wikitext2)")
    r.add_argument("--mixture-criterion", default="grad-align",
                   choices=["hessian-trace", "grad-align", "measured"],
                   help="with --calib auto: how the mixture is chosen (default: grad-align, the criterion whose "
                        "choice matched measured quality on SmolLM2-135M; see docs/MIXTURE.md)")
    r.add_argument("--bits", default=None,
                   help="candidate bit-widths, each servable by --target (default: those of 3,4,8 the target serves)")
    r.add_argument("--probe-tokens", type=int, default=768,
                   help="scored tokens per objective for the profile; on SmolLM2-135M its plan scored level with "
                        "4096's, which ranks ARC-style choice objectives more steadily at ~5x the time (default: 768)")
    r.add_argument("--nsamples", type=int, default=64,
                   help="GPTQ calibration sequences (default: 64; tasa quantize's 128 scored no better on SmolLM2 "
                        "and takes twice the time, docs/RESULTS.md)")
    r.add_argument("--search-samples", type=int, default=4,
                   help="with --calib auto: sequences per source, and held-out sequences, of the mixture search "
                        "(default: 4; the choice and its cost at 4, 8, 16 and 64 are in docs/RESULTS.md)")
    _eval_size_args(r)
    _gptq_order_args(r)
    _scale_search_arg(r)
    _float_targets_arg(r)
    _learn_rounding_args(r)
    r.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="minutes the run's stages may take: the quantizer is then learned rounding from GPTQ ("
                        f"`{BETTER_QUANTIZER[0]}`), on a CPU that computes bfloat16 natively also the same with "
                        "the model in bfloat16 for the quantize stage, the first whose trial on the first decoder "
                        "layer projects it within the minutes left (the quantized evaluation's share kept), else "
                        "the default; each trial stops at the deadline past which it could not fit, and run.json "
                        "and the report say what was chosen and why (default: no budget, the default quantizer; "
                        "not with --learn-rounding)")
    r.add_argument("--generate", action="store_true",
                   help="also run generation tasks' greedy decoding (GSM8K strict match; slow on a CPU)")
    r.add_argument("--output-dir", required=True, help="run directory (created; reused to resume)")

    m = sub.add_parser("search-mixture", help="choose the calibration mixture of general and task text",
                       description="Score calibration mixtures of a general source and task sources without "
                                   "training: hessian-trace (tr(H_test H_mix^-1) from per-input Hessians, closed "
                                   "form for every ratio), grad-align (cosine between mixture and held-out loss "
                                   "gradients) or measured (GPTQ at --measure-bits per ratio, NLL of held-out "
                                   "task rows). Held-out rows are split from the task's calibration rows; "
                                   "evaluation rows are never used. Writes mixture.json and a report.",
                       epilog=EPILOG, parents=[model, group, sampling, damp, distributed])
    m.add_argument("--general", default="wikitext2", help="general-text source (default: wikitext2)")
    m.add_argument("--task", required=True, help="task source(s), comma-separated, e.g. gsm8k or gsm8k,arc_easy")
    m.add_argument("--heldout-sources", default=None,
                   help="sources whose held-out rows define the target distribution (default: the task sources)")
    m.add_argument("--criterion", default="grad-align",
                   help="hessian-trace, grad-align or measured; a comma list computes several, the first chooses "
                        "(default: grad-align)")
    m.add_argument("--ratios", default=None,
                   help="general-text shares to score, task sources sharing the rest equally "
                        "(default: 0,0.125,0.25,0.5,0.75,0.875,1)")
    m.add_argument("--grid-step", type=float, default=None,
                   help="score the whole simplex over all sources at this step instead (e.g. 0.25)")
    m.add_argument("--nsamples", type=int, default=128, help="sequences per source (default: 128)")
    m.add_argument("--heldout-samples", type=int, default=32, help="held-out target sequences (default: 32)")
    m.add_argument("--heldout-fraction", type=float, default=0.2,
                   help="share of each target's calibration rows held out (default: 0.2)")
    m.add_argument("--no-damping-study", action="store_true",
                   help="hessian-trace: skip the curves at dampings 1e-4..1e-1 (4 more factorisations per input)")
    m.add_argument("--sketch-dim", type=int, default=1 << 16,
                   help="grad-align: count-sketch size per layer (default: 65536)")
    m.add_argument("--measure-bits", type=int, default=3, help="measured: GPTQ bit-width (default: 3)")
    m.add_argument("--output-dir", required=True, help="directory for mixture.json and the report")

    a = sub.add_parser("allocate", help="choose bits per layer from a sensitivity profile under a budget",
                       description="Normalise each objective's costs (by its mean cost at the lowest bit-width), "
                                   "combine them (beta * perplexity + (1 - beta) * tasks), and choose one bit-width "
                                   "per layer minimising the combined cost with the parameter-weighted average "
                                   "bits at most --budget (exact dynamic programming). Writes a plan.json for "
                                   "tasa quantize --plan.", epilog=EPILOG, parents=[allocation, target])
    a.add_argument("--sensitivity", required=True, help="sensitivity.json (or its directory) from tasa profile")
    a.add_argument("--budget", type=float, required=True, help="average bits per weight, e.g. 3.5")
    a.add_argument("--bits", default=None, help="candidate bit-widths (default: all profiled ones)")
    a.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="quantizer (default: gptq)")
    a.add_argument("--module-sensitivity", default=None,
                   help="a module-granularity sensitivity.json: split each layer's bits among its modules "
                        "(intra-layer allocation) under the layer's total")
    a.add_argument("--tie-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="one bit-width per fusion group (q/k/v, gate/up) within a layer (default: as the target "
                        "needs)")
    a.add_argument("--output", required=True, help="plan.json to write")

    w = sub.add_parser("sweep", help="several plans from one profile (budgets x betas), quantized and evaluated",
                       description="Allocate a plan for every budget and beta from one sensitivity profile (as tasa "
                                   "allocate does; OUTPUT_DIR/plans/), GPTQ-quantize each on a fresh model in "
                                   "memory on one calibration, and evaluate it on held-out test rows. Writes "
                                   "OUTPUT_DIR/sweep.json; every finished plan is kept in OUTPUT_DIR/points/, so a "
                                   "killed sweep resumes. With --distributed ray every plan is a Ray task.",
                       epilog=EPILOG, parents=[model, sampling, damp, target, distributed])
    w.add_argument("--sensitivity", required=True, help="sensitivity.json (or its directory) from tasa profile")
    w.add_argument("--budgets", required=True, help="average bits per weight, comma-separated, e.g. 3,3.5,4")
    w.add_argument("--betas", default="0.5",
                   help="weights of perplexity against the tasks, comma-separated numbers in [0, 1] or ppl-only / "
                        "task-only (default: 0.5)")
    w.add_argument("--bits", default=None, help="candidate bit-widths (default: all profiled ones)")
    w.add_argument("--calib", default="wikitext2", help="calibration sources with weights (default: wikitext2)")
    w.add_argument("--nsamples", type=int, default=64, help="calibration sequences (default: 64)")
    _scale_search_arg(w)
    _float_targets_arg(w)
    _gptq_order_args(w)
    w.add_argument("--tasks", default="wikitext2",
                   help="evaluation: wikitext2, arc_easy, arc_challenge, mmlu, gsm8k (gold-solution NLL, no "
                        "generation) or SPEC.yaml, comma-separated (default: wikitext2)")
    _eval_size_args(w)
    w.add_argument("--output-dir", required=True, help="directory to write (an earlier sweep's is resumed)")
    return parser


def _headline(metrics: dict) -> str:
    """A task's headline figure: perplexity, accuracy, or the gold-solution NLL."""
    for key, fmt in (("ppl", "ppl {:.3f}"), ("acc", "acc {:.3f}"), ("gold_nll", "gold NLL {:.3f}")):
        if key in metrics:
            return fmt.format(metrics[key])
    return ""


def _beta_weights(args) -> tuple[float | str, tuple[tuple[str, float], ...] | None]:
    """--beta (a number or a preset) and --task-weights NAME:WEIGHT,..."""
    try:
        beta = args.beta if args.beta in ("ppl-only", "task-only") else float(args.beta)
        weights = (tuple((k, float(v)) for k, v in (x.split(":") for x in _names(args.task_weights)))
                   if args.task_weights else None)
    except ValueError:
        raise TasaError("--beta is a number or a preset, --task-weights NAME:WEIGHT,...") from None
    return beta, weights


def _names(text: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str | None, flag: str) -> list[int] | None:
    """A comma-separated list of integers (None for no text); a bad entry is a one-line error."""
    if not text:
        return None
    try:
        return [int(x) for x in _names(text)]
    except ValueError:
        raise TasaError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "data_source", None):
        os.environ["TASA_DATA_SOURCE"] = args.data_source  # read by tasa.data.store, as the Python API does
    import transformers

    from tasa import pipeline  # heavy imports after argument parsing, so --help is fast

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bars report progress

    from tasa.config import (AllocationSpec, CalibSpec, EvalSpec, ExportSpec, MixtureSpec, ProfileSpec,
                             QuantizeSpec, RunSpec, SweepSpec)

    if args.command == "quantize":
        spec = QuantizeSpec(method=args.method, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                            act_order=args.act_order, static_groups=args.static_groups, damp=args.damp,
                            true_sequential=not args.no_true_sequential,
                            allow_ragged_groups=args.allow_ragged_groups, scale_search=args.scale_search,
                            learn_rounding=args.learn_rounding, learn_lr=args.learn_lr,
                            learn_dtype=args.learn_dtype, float_targets=args.float_targets,
                            learn_start=args.learn_start, learn_output_kl=args.learn_output_kl)
        calib = CalibSpec.parse(args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        res = pipeline.quantize(args.model, args.output_dir, spec, calib, plan=args.plan,
                                export=ExportSpec(args.export_format, args.target, args.max_shard_size,
                                                  args.float_dtype, args.gguf_template, args.llama_cpp,
                                                  args.w8a8),
                                runtime=_runtime(args),
                                overwrite=args.overwrite, allow_partial_plan=args.allow_partial_plan)
        s = {**res.record, "output_dir": str(res.output_dir)}
        how = (f"group size {s['quant_spec']['group_size']}{' (auto)' if args.group_size is None else ''}"
               if s["quant_spec"]
               else f"plan: bits {', '.join(map(str, s['plan_bits']))}")
        print(f"quantized {len(s['modules'])} modules ({s['quantizer']}, {s['average_bits']:g} bits, {how}) "
              f"in {s['seconds']['quantize']:.1f} s -> {s['output_dir']} ({s['format']}, "
              f"{s['size_bytes'] / 2**20:.1f} MiB of weights)")
        if s["unquantized_modules"]:
            print(f"{len(s['unquantized_modules'])} linears left out of the plan stay at {s['unquantized_bits']} bits: "
                  f"{s['average_bits']:.4g} bits on average over all linears, {s['planned_average_bits']:g} over "
                  "the planned ones")
        if s["format"] == "compressed-tensors":
            print(f"compressed-tensors checkpoint for {s['target']}: a config group per grid in config.json's "
                  "quantization_config")
        if s["format"] == "gptq":
            print(f"GPTQ checkpoint for {s['target']}; per-module bits are in quantize_config.json 'dynamic'")
            if len(s["plan_bits"]) > 1:
                print("note: plain transformers/optimum loading ignores 'dynamic' and would read every module at "
                      "the default bit-width; load it with GPTQModel (backend=BACKEND.TORCH), vLLM/SGLang "
                      "(their targets) or tasa")
    elif args.command == "eval":
        tasks = _names(args.tasks)
        spec = EvalSpec(tasks=tuple(tasks), limit=args.limit, num_fewshot=args.num_fewshot, seqlen=args.seqlen,
                        kl_topk=args.kl_topk, apply_chat_template=args.apply_chat_template,
                        generate=not args.no_generate, prefix_cache=not args.no_prefix_cache,
                        log_samples=args.log_samples)
        res = pipeline.evaluate(args.model, spec, output=args.output, reference=args.reference,
                                runtime=_runtime(args)).record
        rows = [("task", "metric", "value", "stderr")]
        for task, metrics in res["results"].items():
            for k, v in metrics.items():
                if k.endswith("_stderr"):
                    continue
                err = metrics.get(f"{k}_stderr")
                rows.append((task, k, f"{v:.4f}" if isinstance(v, float) else str(v),
                             f"{err:.4f}" if isinstance(err, float) else ""))
        _print_table(rows)
        if args.output:
            print(f"results written to {args.output}")
    elif args.command == "run":
        beta, weights = _beta_weights(args)
        spec = RunSpec(tasks=tuple(_names(args.tasks)), budget=args.budget, calib=args.calib,
                       mixture_criterion=args.mixture_criterion, bits=_ints(args.bits, "--bits"), beta=beta,
                       task_weights=weights, budget_includes_metadata=args.budget_includes_metadata,
                       target=args.target or "gptqmodel", group_size=args.group_size,
                       probe_tokens=args.probe_tokens,
                       choice_cost=args.choice_cost, token_cost=args.token_cost,
                       probe_quantizer=args.probe_quantizer, granularity=args.granularity,
                       tie_experts=args.tie_experts, export_format=args.export_format,
                       gguf_template=args.gguf_template, llama_cpp=args.llama_cpp, nsamples=args.nsamples,
                       search_samples=args.search_samples, seqlen=args.seqlen, seed=args.seed,
                       eval_limit=args.eval_limit, eval_windows=args.eval_windows, generate=args.generate,
                       scale_search=args.scale_search, act_order=args.act_order,
                       static_groups=args.static_groups, learn_rounding=args.learn_rounding,
                       learn_lr=args.learn_lr, learn_dtype=args.learn_dtype, float_targets=args.float_targets,
                       learn_start=args.learn_start, learn_output_kl=args.learn_output_kl,
                       time_budget=args.time_budget)
        s = pipeline.run(args.model, args.output_dir, spec, _runtime(args)).record
        ran = ", ".join(s["ran"]) or "none (all stages up to date)"
        print(f"stages run: {ran}; total recorded time {sum(s['seconds'].values()):.0f} s; calibration {s['calib']}")
        print(f"checkpoint: {Path(s['output_dir']) / 'model'}; report: {s['report']}")
    elif args.command == "search-mixture":
        try:
            ratios = [float(x) for x in _names(args.ratios)] if args.ratios else None
        except ValueError:
            raise TasaError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from None
        spec = MixtureSpec(general=args.general, tasks=tuple(_names(args.task)),
                           targets=tuple(_names(args.heldout_sources)) if args.heldout_sources else None,
                           criteria=tuple(_names(args.criterion)), ratios=tuple(ratios) if ratios else None,
                           grid_step=args.grid_step, nsamples=args.nsamples, seqlen=args.seqlen,
                           heldout_samples=args.heldout_samples, heldout_fraction=args.heldout_fraction,
                           damp=args.damp, damping_study=not args.no_damping_study, sketch_dim=args.sketch_dim,
                           measure_bits=args.measure_bits, group_size=args.group_size, seed=args.seed)
        res = pipeline.search_mixture(args.model, args.output_dir, spec, _runtime(args))
        s = {**res.record, "output_dir": str(res.output_dir)}
        rows = [("weights (" + ", ".join(s["sources"]) + ")", *s["results"])]
        for j, w in enumerate(s["grid"]):
            rows.append((" ".join(f"{x:g}" for x in w),
                         *(f"{r['values'][j]:.5g}{' *' if list(w) == r['best'] else ''}" for r in s["results"].values())))
        _print_table(rows)
        print(f"chosen by {s['criteria'][0]}: --calib {s['calib']}  ({s['output_dir']}/mixture.json, "
              f"{s['seconds']['total']:.0f} s)")
    elif args.command == "sweep":
        try:
            budgets = tuple(float(x) for x in _names(args.budgets))
            betas = tuple(b if b in ("ppl-only", "task-only") else float(b) for b in _names(args.betas))
        except ValueError:
            raise TasaError("--budgets are numbers; --betas numbers or ppl-only / task-only") from None
        bits = _ints(args.bits, "--bits")
        spec = SweepSpec(budgets=budgets, betas=betas, bits=tuple(bits) if bits else None,
                         target=args.target or "gptqmodel",
                         quantize=QuantizeSpec(damp=args.damp, scale_search=args.scale_search,
                                               act_order=args.act_order, static_groups=args.static_groups,
                                               float_targets=args.float_targets),
                         calib=CalibSpec.parse(args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed),
                         evaluation=EvalSpec(tasks=tuple(_names(args.tasks)), limit=args.eval_limit,
                                             windows=args.eval_windows, seqlen=args.seqlen, generate=False))
        r = pipeline.sweep(args.model, args.sensitivity, args.output_dir, spec, _runtime(args)).record
        for row in r["rows"]:
            scores = ", ".join(f"{t} {_headline(m)}" for t, m in row["results"].items())
            print(f"{row['plan']}: {row['average_bits']:.3f} bits, {scores}")
        print(f"{len(r['rows'])} plans ({r['measured_this_run']} measured now) -> {Path(args.output_dir) / 'sweep.json'}")
    elif args.command == "allocate":
        bits = _ints(args.bits, "--bits")
        beta, weights = _beta_weights(args)
        spec = AllocationSpec(budget=args.budget, bits=tuple(bits) if bits else None, beta=beta,
                              task_weights=weights, budget_includes_metadata=args.budget_includes_metadata,
                              method=args.method, target=args.target or "gptqmodel", tie_fused=args.tie_fused)
        s = pipeline.allocate_bits(args.sensitivity, args.output, spec,
                                   module_sensitivity=args.module_sensitivity).summary
        per_layer = " ".join(f"{b:g}" for b in s["layer_bits"].values())
        print(f"bits per layer{' (average of its modules)' if s['intra_layer'] else ''}: {per_layer}")
        print(f"average weight bits {s['average_weight_bits']:.4f}, with scale/zero storage "
              f"{s['effective_bits_with_metadata']:.4f} (budget {s['budget']:g}"
              f"{' incl. metadata' if s['budget_includes_metadata'] else ''}) -> {s['output']}")
        pos = {o: p for o, p in s["predicted"].items() if "gap_position" in p}
        if pos:
            lo, hi = next(iter(pos.values()))["between"]
            print(f"profile's additive prediction (layer plan): 0 = uniform {hi}-bit, 1 = uniform {lo}-bit: "
                  + ", ".join(f"{o} {p['gap_position']:.2f}" for o, p in pos.items()))
    elif args.command == "profile":
        from tasa.profile.stats import top_k

        calib = (CalibSpec.parse(args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
                 if args.calib else None)
        layers = _ints(args.layers, "--layers")
        spec = ProfileSpec(objectives=tuple(_names(args.objectives)), bits=tuple(_ints(args.bits, "--bits") or ()),
                           granularity=args.granularity, group_size=args.group_size, sym=not args.asym,
                           probe_tokens=args.probe_tokens, probe_seqlen=args.probe_seqlen, seed=args.seed,
                           batch_tokens=args.batch_tokens, estimator=args.estimator, choice_cost=args.choice_cost,
                           token_cost=args.token_cost, probe_quantizer=args.probe_quantizer, calib=calib,
                           layers=tuple(layers) if layers is not None else None, max_state_gb=args.max_state_gb,
                           compare_estimators=args.compare_estimators, tie_experts=args.tie_experts)
        res = pipeline.profile(args.model, args.output_dir, spec, _runtime(args), overwrite=args.overwrite,
                               top_k=args.top_k)
        s = {**res.record, "output_dir": str(res.output_dir)}
        rows = [("objective", "bits", "most sensitive units (cost)", "split-half tau")]
        for obj, per_bits in s["costs"].items():
            for b, c in per_bits.items():
                order = top_k(c["cost"], min(3, len(c["cost"])))
                top = ", ".join(f"{s['units'][i]['name']} ({c['cost'][i]:.3g})" for i in order)
                rows.append((obj, b, top, f"{s['stability'][obj][b]:.2f}"))
        _print_table(rows)
        print(f"sensitivity of {len(s['units'])} units written to {s['output_dir']}/sensitivity.json "
              f"in {s['seconds']['total']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tasa").setLevel(logging.INFO)
    try:
        code = run(argv)
    except TasaError as e:
        print(f"tasa: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("tasa: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
