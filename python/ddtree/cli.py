"""``ddtree`` command line: ``demo``, ``generate``, ``profile``, ``scale-target``, ``train``, ``info``.

Every mistake in the command line or in the files it names is answered *before any work starts* with
one line ``ddtree: error: ...`` on stderr that names the argument and what is allowed, and exit code 2;
never a traceback. Checked in this order, before any model is loaded: the argument values (the argparse
types below), the folders and files (configs, cost model, tokenizer), the prompt against the tokenizer
and the target's context length, the device and whether the KV cache fits it. What the libraries raise
while loading (transformers, torch, json, the OS) is translated to the same one line.

Values that make no sense are refused, never reinterpreted: ``--temperature`` must be finite and >= 0
(0 = greedy), ``--top-p`` in (0, 1], ``--top-k`` >= 0 (0 = off), ``--max-new-tokens`` >= 1,
``--max-nodes`` >= 0, ``--prompt`` not empty, ``--batch-sizes`` strictly increasing from 1. So are options
the run would ignore: ``--cost-model`` or ``--budget-mode`` without ``--method caddtree``, ``--drafter``
with ``ar``, ``--max-nodes`` with ``ar`` or ``dflash``, ``--top-k``/``--top-p`` when greedy. Prompt
characters the tokenizer has no token for are named in a warning (they become its unknown token) and the
run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from .decode import BUDGET_MODES, METHODS
from .threads import SMALL_MODEL_PARAMS

DEFAULT_MAX_NODES = 64  # generate's --max-nodes


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option that has a default its help line does not already state."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and every option's default in its help line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---- argument values -------------------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def seed_int(text: str) -> int:
    v = _int(text)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {v}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def temperature(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or positive, got {v}")
    return v


def top_p(text: str) -> float:
    v = _float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {v}")
    return v


def method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHODS)}")
    return text


def budget_mode(text: str) -> str:
    if text not in BUDGET_MODES:
        raise argparse.ArgumentTypeError(f"unknown budget mode {text!r}; choose from {', '.join(BUDGET_MODES)}")
    return text


def drafter_block(text: str) -> int:
    from .demo import DRAFTERS

    v = _int(text)
    if v not in DRAFTERS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, DRAFTERS))} (the block sizes of the "
                                         f"shipped drafters), got {v}")
    return v


def device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


DTYPES = ("float32", "bfloat16", "float16")


def dtype(text: str) -> str:
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    name = aliases.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)} (or fp32, bf16, fp16), got {text!r}")
    return name


def threads(text: str) -> int | None:
    """'auto' -> None (decided once the model's size is known), else a positive thread count."""
    return None if text == "auto" else positive_int(text)


def contexts(text: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 128,1024, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"context lengths must be 0 or more, got {text!r}")
    return sorted(set(values))


def batch_sizes(text: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1,4,16,64, got {text!r}") from None
    if values[0] != 1 or any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(
            f"must start at 1 (the per-request curve) and strictly increase, such as 1,4,16,64, got {text!r}")
    return values


# ---- files and folders -----------------------------------------------------------------------------


def _read_config(folder: str, what: str) -> dict:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"{what} folder not found: {folder}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{what} folder has no config.json: {folder}")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} config.json is not valid JSON ({e}): {cfg}") from None
    except OSError as e:
        raise UsageError(f"cannot read the {what} config.json: {e.strerror}: {cfg}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} config.json must hold a JSON object, got {type(data).__name__}: {cfg}")
    return data


def check_target(cfg: dict, folder: str) -> None:
    """What loading the target needs from its config.json: a model type transformers knows, and sizes."""
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not model_type:
        raise UsageError(f"target config.json has no \"model_type\" (such as \"qwen3\" or \"llama\"): {folder}")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"target model_type {model_type!r} is not known to the installed transformers: {folder}")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if k not in cfg]
    if missing:
        raise UsageError(f"target config.json lacks {', '.join(missing)}: {folder}")
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "max_position_embeddings")
    bad = [k for k in sizes if cfg.get(k) is not None and not (isinstance(cfg[k], int) and cfg[k] > 0)]
    if bad:
        raise UsageError(f"target config.json: {', '.join(bad)} must be positive integers: {folder}")


def check_pair(target_cfg: dict, drafter_cfg: dict) -> None:
    """Raise :class:`UsageError` when the drafter cannot run on this target (it shares the target's
    embedding and LM head and reads its layers)."""
    if "dflash_config" not in drafter_cfg or "block_size" not in drafter_cfg:
        raise UsageError("drafter config.json is not a DFlash drafter (no dflash_config / block_size)")
    block = drafter_cfg["block_size"]
    if not isinstance(block, int) or block < 2:
        raise UsageError(f"drafter block_size must be an integer of at least 2 (the root and a drafted token), got {block!r}")
    th, dh = target_cfg.get("hidden_size"), drafter_cfg.get("hidden_size")
    if th != dh:
        raise UsageError(f"drafter hidden size {dh} does not match the target's hidden size {th}")
    tv, dv = target_cfg.get("vocab_size"), drafter_cfg.get("vocab_size")
    if tv != dv:
        raise UsageError(f"drafter vocabulary size {dv} does not match the target's vocabulary size {tv}")
    mask = (drafter_cfg.get("dflash_config") or {}).get("mask_token_id")
    if not isinstance(mask, int) or not 0 <= mask < (tv or 0):
        raise UsageError(f"drafter mask_token_id {mask} is not a token of the target's vocabulary")
    layers = target_cfg.get("num_hidden_layers", 0)
    ids = (drafter_cfg.get("dflash_config") or {}).get("target_layer_ids") or []
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < layers]
    if bad:
        raise UsageError(f"drafter reads target layers {bad}, but the target has {layers} layers")


@contextlib.contextmanager
def _loading(what: str):
    """Translate what a library raises while reading ``what`` into a one-line :class:`UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load {what}: {detail}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _load_tokenizer(folder):
    """The target folder's tokenizer (transformers builds an empty one from a folder without its files)."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"cannot load the target's tokenizer from {folder}: none of {', '.join(TOKENIZER_FILES)} "
                         "is there")
    with _loading(f"the target's tokenizer from {folder}"):
        tok = AutoTokenizer.from_pretrained(folder)
    if len(tok) < 2:
        raise UsageError(f"cannot load the target's tokenizer from {folder}: it has {len(tok)} tokens")
    return tok


def _encode_prompt(tok, prompt: str) -> list[int]:
    """The prompt's token ids; warns (one line) naming the characters the tokenizer has no token for."""
    if not prompt:
        raise UsageError("argument --prompt: must not be empty")
    enc = tok(prompt, return_offsets_mapping=bool(getattr(tok, "is_fast", False)))
    ids = list(enc.input_ids)
    if not ids:
        raise UsageError("argument --prompt: encodes to no tokens")
    unk = tok.unk_token_id
    if unk is not None and unk in ids:
        if "offset_mapping" in enc:
            chars = sorted({prompt[a:b] for t, (a, b) in zip(ids, enc["offset_mapping"]) if t == unk})
            named = ", ".join(repr(c) for c in chars)
        else:
            named = f"{ids.count(unk)} piece(s)"
        print(f"ddtree: warning: the target's tokenizer has no token for {named} in --prompt; "
              f"they become {tok.unk_token!r}", file=sys.stderr)
    return ids


def _check_length(cfg: dict, prompt_len: int, max_new_tokens: int, tree_slots: int) -> None:
    """Refuse a run that would pass the target's trained context (and would size its KV cache by it)."""
    limit = cfg.get("max_position_embeddings")
    need = prompt_len + max_new_tokens + tree_slots
    if isinstance(limit, int) and need > limit:
        raise UsageError(f"the prompt ({prompt_len} tokens) + --max-new-tokens ({max_new_tokens}) + the tree "
                         f"({tree_slots} nodes) need {need} positions, more than the target's "
                         f"max_position_embeddings ({limit}); lower --max-new-tokens or --max-nodes")


def _check_kv_memory(cfg: dict, positions: int, dtype, device: str, what: str) -> None:
    """Refuse a KV cache larger than the device's memory before allocating it (an allocation that large can
    get the process killed on CPU instead of raising)."""
    import torch

    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_position = 2 * cfg["num_hidden_layers"] * (cfg.get("num_key_value_heads") or heads) * head_dim
    need = per_position * positions * torch.empty(0, dtype=dtype).element_size()
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UsageError(f"{what}: the target's KV cache for {positions} positions needs {need / 1e9:.1f} GB, "
                         f"more than the {device} device's {have / 1e9:.1f} GB")


def _load_cost_model(path: str):
    from .cost import CostModel

    if not Path(path).is_file():
        raise UsageError(f"argument --cost-model: file not found: {path}")
    try:
        return CostModel.load(path)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise UsageError(f"argument --cost-model: {e}") from None


def _check_out_file(path: str) -> None:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"argument --out: {path} is a folder; give a file name such as {out / 'cost.json'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"argument --out: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"argument --out: folder {parent} is not writable")


# ---- device, dtype, threads ------------------------------------------------------------------------


def _device(args) -> str:
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"argument --device: {args.device} given but no CUDA device is available (use cpu)")
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"argument --device: {args.device} given but there are only "
                             f"{torch.cuda.device_count()} CUDA devices")
    return args.device


def _dtype(args, device: str):
    import torch

    name = getattr(args, "dtype", None) or ("bfloat16" if device.startswith("cuda") else "float32")
    if device.startswith("cuda") and name == "float32":
        raise UsageError("argument --dtype: float32 on CUDA is not supported (the CUDA kernels run bfloat16 "
                         "or float16)")
    if device == "cpu" and name != "float32":
        from .timing import cpu_bf16_units

        if not cpu_bf16_units():
            print(f"ddtree: warning: --dtype {name} on a CPU without bf16/fp16 matrix units (AMX, AVX512-BF16): its "
                  f"matmuls are emulated and cost several times float32's (the CPU default); expect a slower run",
                  file=sys.stderr)
    return getattr(torch, name)


def _set_threads(requested: int | None, device: str, num_params: int) -> None:
    """``--threads``: a count as given; 'auto' is one thread for a small model on CPU (its matrices are
    too small to share out), torch's default otherwise."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
    elif device == "cpu" and num_params < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


def _num_params(runner) -> int:
    """The target's parameter count (a runner without a ``model`` counts as large: torch's threads)."""
    model = getattr(runner, "model", None)
    return sum(p.numel() for p in model.parameters()) if model is not None else SMALL_MODEL_PARAMS


# ---- checking a target/drafter pair before loading it ----------------------------------------------


def _pair_folders(args, need_drafter: bool) -> tuple[dict, dict | None]:
    """Resolve --target/--drafter (default: the pair shipped in the package) and check their configs."""
    if args.target is None:
        from .demo import PRETRAINED

        if args.drafter is not None:
            raise UsageError("argument --drafter: given without --target (a drafter belongs to its target)")
        args.target, args.drafter = str(PRETRAINED / "target"), str(PRETRAINED / "drafter")
    target_cfg = _read_config(args.target, "target")
    check_target(target_cfg, args.target)
    drafter_cfg = None
    if need_drafter:
        if not args.drafter:
            raise UsageError(f"argument --drafter: --method {getattr(args, 'method', 'ddtree')} needs a drafter folder")
        drafter_cfg = _read_config(args.drafter, "drafter")
        check_pair(target_cfg, drafter_cfg)
    return target_cfg, drafter_cfg


def _load_models(args, device: str, dtype, need_drafter: bool):
    """Load (target runner, drafter or None); everything was checked before this is called."""
    from transformers.utils import logging as hf_logging

    from .drafter import DFlashDrafter
    from .target import load_target

    hf_logging.disable_progress_bar()  # the stream is the output; no loading bars around it
    with _loading(f"the target from {args.target}"):
        target = load_target(args.target, device=device, dtype=dtype, fast=False if args.no_fast else None)
    drafter = None
    if need_drafter:
        with _loading(f"the drafter from {args.drafter}"):
            drafter = DFlashDrafter.from_pretrained(args.drafter, device=device, dtype=dtype)
    return target, drafter


# ---- subcommands -----------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from . import demo, tiny

    if args.random:
        tok, cfg = tiny.char_tokenizer(), tiny.target_config().to_dict()
    else:
        try:
            tdir, _ = demo.pretrained_pair(args.drafter_block)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        tok, cfg = _load_tokenizer(tdir), _read_config(str(tdir), "target")
    prompt = args.prompt if args.prompt is not None else demo.DEMO_PROMPT
    ids = _encode_prompt(tok, prompt)
    _check_length(cfg, len(ids), args.max_new_tokens, args.max_nodes)
    device = _device(args)
    # The demo's models are tiny (well under SMALL_MODEL_PARAMS): 'auto' means one thread on CPU.
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    demo.run(prompt=prompt, max_new_tokens=args.max_new_tokens, max_nodes=args.max_nodes, seed=args.seed,
             device=device, random=args.random, threads=threads, drafter_block=args.drafter_block)
    return 0


def _refuse_ignored(args) -> None:
    """An option this run would ignore is refused: a silent no-op misleads more than an error does."""
    m = args.method
    if args.cost_model is not None and m != "caddtree":
        raise UsageError(f"argument --cost-model: only --method caddtree reads a cost model (got --method {m})")
    if args.budget_mode is not None and m != "caddtree":
        raise UsageError(f"argument --budget-mode: only --method caddtree has a cost-aware budget (got --method {m})")
    if args.drafter is not None and m == "ar":
        raise UsageError("argument --drafter: --method ar uses no drafter")
    if args.max_nodes is not None and m in ("ar", "dflash"):
        raise UsageError(f"argument --max-nodes: --method {m} has no node budget (ar verifies the root alone, "
                         "dflash one chain of the drafter's block)")
    if args.temperature == 0 and (args.top_k or args.top_p < 1):
        raise UsageError("argument --top-k/--top-p: they shape sampling; give --temperature > 0 with them "
                         "(0, the default, is greedy)")
    if args.max_nodes is None:
        args.max_nodes = DEFAULT_MAX_NODES
    if args.budget_mode is None:
        args.budget_mode = "request"


def cmd_generate(args) -> int:
    need_drafter = args.method != "ar"
    _refuse_ignored(args)
    target_cfg, drafter_cfg = _pair_folders(args, need_drafter)
    cost = _load_cost_model(args.cost_model) if args.cost_model else None
    tok = _load_tokenizer(args.target)
    ids = _encode_prompt(tok, args.prompt)
    tree = {"ar": 0, "dflash": (drafter_cfg or {}).get("block_size", 1) - 1}.get(args.method, args.max_nodes)
    _check_length(target_cfg, len(ids), args.max_new_tokens, tree)
    device = _device(args)
    dtype = _dtype(args, device)
    _check_kv_memory(target_cfg, len(ids) + args.max_new_tokens + tree, dtype, device, "argument --max-new-tokens")

    target, drafter = _load_models(args, device, dtype, need_drafter)
    _set_threads(args.threads, device, _num_params(target))
    from . import decode

    stops = set() if args.ignore_eos else {t for t in _as_list(tok.eos_token_id) + _as_list(target.config.eos_token_id)}
    generated: list[int] = []
    printed = [""]

    def stream(row: int, new: list[int]) -> None:
        generated.extend(new)
        text = tok.decode(generated, skip_special_tokens=True)
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    sys.stdout.write(args.prompt)
    res = decode.generate(target, drafter, [ids], method=args.method, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_nodes=args.max_nodes,
                          cost_model=cost, budget_mode=args.budget_mode, stop_token_ids=sorted(stops), seed=args.seed,
                          on_tokens=stream, threads=None)  # --threads is already applied
    sizes = [n for r in res.rounds for n in r.tree_size]
    n_tok = len(res.tokens[0])
    print("\n--")
    print(f"method {args.method}: acceptance length {res.acceptance_length:.2f} over {len(res.rounds)} rounds; "
          f"tree size mean {res.mean_tree_size:.1f} (min {min(sizes, default=0)}, max {max(sizes, default=0)}); "
          f"{n_tok} tokens in {res.total_s:.2f} s = {n_tok / max(res.total_s, 1e-9):.1f} tokens/s "
          f"(prefill {res.prefill_s * 1e3:.0f} ms) on {target.device}")
    return 0


def cmd_profile(args) -> int:
    if args.vllm:
        return _profile_vllm(args)
    if args.out is None:
        raise UsageError("argument --out: required (only --vllm writes to its cache without one)")
    _check_out_file(args.out)
    args.batch_sizes = args.batch_sizes or [1]
    target_cfg, _ = _pair_folders(args, need_drafter=bool(args.drafter))
    device = _device(args)
    dtype = _dtype(args, device)
    _check_kv_memory(target_cfg, max(args.batch_sizes) * (max(args.contexts) + args.max_nodes + 1), dtype, device,
                     "arguments --contexts, --max-nodes and --batch-sizes")
    target, drafter = _load_models(args, device, dtype, need_drafter=bool(args.drafter))
    _set_threads(args.threads, device, _num_params(target))
    import torch

    from .cost import profile

    contexts_ = args.contexts

    def drafter_round_at(B: int):
        """One drafter round over B requests (a block forward after a one-token context extension) at the
        first context."""
        drafter.reset(B, max(contexts_) + drafter.block_size + 2)
        F = len(drafter.target_layer_ids) * target.hidden_size
        dev = target.device
        feats = torch.randn(B, max(contexts_[0], 1), F, device=dev, dtype=target.dtype)
        target.set_feature_layers(drafter.target_layer_ids)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        drafter.draft(target, zero, feats, torch.full((B,), contexts_[0], device=dev))
        one = feats[:, :1]
        return lambda: drafter.draft(target, zero, one, zero)

    model = profile(target, None, max_nodes=args.max_nodes, contexts=contexts_, repeats=args.repeats,
                    batch_sizes=args.batch_sizes, drafter_round_at=drafter_round_at if drafter is not None else None)
    try:
        model.save(args.out)
    except OSError as e:
        raise UsageError(f"argument --out: cannot write {args.out}: {e.strerror}") from None
    print(f"cost model written to {args.out} (Cd = {model.draft_cost:.3f} ms)")
    return 0


def _profile_vllm(args) -> int:
    """``ddtree profile --vllm``: the costs of vLLM's own steps for the pair, cached where the plugin looks."""
    if args.out is not None:
        _check_out_file(args.out)
    if not args.target or not args.drafter:
        raise UsageError("argument --vllm: give the pair vLLM will serve, --target DIR and --drafter DIR")
    try:
        import vllm.v1  # noqa: F401
    except ImportError:
        raise UsageError("argument --vllm: vLLM is not installed in this Python") from None
    from .vllm.profile import BATCH_SIZES, NODE_GRID, cache_path, profile_engine

    grid = [n for n in NODE_GRID if n <= args.max_nodes]
    sizes = args.batch_sizes or list(BATCH_SIZES)
    model, key = profile_engine(args.target, args.drafter, dtype=args.dtype or "float32",
                                node_grid=grid, batch_sizes=sizes, context=args.contexts[0])
    cached = cache_path(key)
    cached.parent.mkdir(parents=True, exist_ok=True)
    model.save(cached)
    print(f"engine cost model cached as {cached} (the plugin reads it for this pair, dtype, device, threads and vLLM)")
    if args.out is not None:
        model.save(args.out)
        print(f"and written to {args.out}")
    return 0


def _scaled_dtype(text: str) -> str:
    from .scaled_target import STORE_DTYPES

    name = dtype(text)
    if name not in STORE_DTYPES:
        raise argparse.ArgumentTypeError(f"must be bfloat16 or float32 (they hold the base's weights exactly), "
                                         f"got {text!r}")
    return name


def _like(text: str) -> str:
    from .scaled_target import NAMED

    if text.lower() not in NAMED:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(NAMED)}")
    return text.lower()


def cmd_scale_target(args) -> int:
    import shutil

    from . import scaled_target as st

    if (args.like is None) == (args.layers is None):
        raise UsageError("give one of --like NAME (the shape that costs like that model) or --layers N (extra "
                         "layers of the base's own shape)")
    if args.base is None:
        from .demo import PRETRAINED

        args.base = str(PRETRAINED / "target")
    base_cfg = _read_config(args.base, "base target")
    check_target(base_cfg, args.base)
    if "dflash_config" in base_cfg:
        raise UsageError(f"argument --base: {args.base} is a DFlash drafter; give its target")
    if base_cfg["model_type"] != "qwen3":
        raise UsageError(f"argument --base: a Qwen3 target is needed, got model_type {base_cfg['model_type']!r}: "
                         f"{args.base}")
    if not list(Path(args.base).glob("*.safetensors")):
        raise UsageError(f"argument --base: no *.safetensors weights in {args.base}")
    if args.layers is not None and args.layers < base_cfg["num_hidden_layers"]:
        raise UsageError(f"argument --layers: must be at least the base's {base_cfg['num_hidden_layers']} layers, "
                         f"got {args.layers}")
    with _loading(f"the base target's config from {args.base}"):
        shape = st.shape_like(base_cfg, args.like) if args.like else st.layers_only(base_cfg, args.layers)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"argument --out: {args.out} exists and is not an empty folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"argument --out: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"argument --out: folder {parent} is not writable")
    need = st.disk_bytes(base_cfg, shape, args.dtype)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UsageError(f"argument --out: the scaled target needs {need / 1e9:.2f} GB, {parent} has "
                         f"{free / 1e9:.2f} GB free")

    with _loading(f"the base target from {args.base}"):
        try:  # inside: _loading would call a refused placement a failure to load the base
            cfg = st.write_scaled_target(args.base, out, shape, dtype=args.dtype, seed=args.seed, like=args.like)
        except st.NoExactLayout as e:
            raise UsageError(f"argument --like: {e} (--layers N)") from None
    got = st.describe(cfg)
    print(f"wrote {out}: {shape.layers} layers, {shape.heads} query / {shape.kv_heads} KV heads, MLP width "
          f"{shape.intermediate_size} (the base: {base_cfg['num_hidden_layers']}, {base_cfg['num_attention_heads']} / "
          f"{base_cfg.get('num_key_value_heads')}, {base_cfg['intermediate_size']}; the rest is multiplied by zero), "
          f"{args.dtype}, {need / 1e9:.2f} GB")
    print("NOT A REAL MODEL: its logits and hidden states are the base's exactly (real acceptance); its forward "
          "does a larger model's work (real cost)")
    rows = [("scaled target", got)] + ([(args.like, st.describe(st.NAMED[args.like]))] if args.like else [])
    print(f"{'':14s} {'layers':>7s} {'params':>9s} {'GFLOP/token':>12s} {'attn FLOP/ctx token':>20s} "
          f"{'KV values/token':>16s}")
    for name, d in rows:
        print(f"{name:14s} {d['layers']:7d} {d['params'] / 1e6:8.1f}M {d['matmul_flops_per_token'] / 1e9:12.3f} "
              f"{d['attention_flops_per_context_token']:20,d} {d['kv_values_per_token']:16,d}")
    drafters = sorted(str(p.parent) for p in Path(args.base).parent.glob("*/config.json")
                      if "dflash_config" in json.loads(p.read_text()))
    if drafters:
        print("the base's drafters run on it unchanged (same layers at the same indices): "
              + ", ".join(f"--drafter {d}" for d in drafters))
    return 0


def cmd_train(args) -> int:
    from . import train

    return train.main(args.rest, parser_class=_Parser)


def cmd_info(args) -> int:
    import ddtree

    for key, value in ddtree.info().items():
        print(f"{key:14s} {value}")
    return 0


# ---- parser ----------------------------------------------------------------------------------------


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is available, else cpu)")
    p.add_argument("--threads", type=threads, default="auto", metavar="N|auto",
                   help=f"CPU threads for torch; auto: 1 for a model under {SMALL_MODEL_PARAMS // 10**6}M parameters "
                        "on CPU (more threads only add hand-off time there), torch's own choice otherwise")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", type=dtype, default=None,
                   help=f"one of {', '.join(DTYPES)} (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-fast", action="store_true",
                   help="use the Hugging Face runner even where the fast CUDA runner supports the target")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_DRAFTER_BLOCK, DRAFTERS

    parser = _Parser(prog="ddtree", description="Speculative decoding with diffusion draft trees.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run every method on the shipped tiny trained pair (no download)",
                       description="Run ar, dflash, ddtree and caddtree on the tiny character-level pair shipped "
                                   "with ddtree and print each one's acceptance length, speed and the first draft "
                                   "tree. CaDDTree's cost model is measured for the pair on this machine at the "
                                   "first run (a few seconds) and cached. About 30 s on one CPU core.")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="text to continue (default: the start of a Python method)")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=96, help="tokens to generate per method")
    p.add_argument("--max-nodes", type=nonnegative_int, metavar="N", default=64,
                   help="DDTree's node budget and CaDDTree's cap")
    p.add_argument("--random", action="store_true", help="a randomly initialised pair instead of the trained one")
    p.add_argument("--drafter-block", type=drafter_block, metavar="N", default=DEMO_DRAFTER_BLOCK,
                   help=f"which shipped drafter: block size {' or '.join(map(str, DRAFTERS))} (with --random, the random "
                        f"drafter's block size) (default: {DEMO_DRAFTER_BLOCK}, where the tree methods gain most over "
                        "the chain)")
    p.add_argument("--seed", type=seed_int, metavar="N", default=0, help="seed of the random pair and of sampling")
    _run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming",
                       description="Continue --prompt with the target, drafting with the drafter, and stream the "
                                   "text; then print the acceptance length, tree sizes and speed.")
    p.add_argument("--target", metavar="DIR", help="target model folder (Hugging Face layout, with tokenizer) (default: the "
                                    "tiny pair shipped with ddtree, a character-level model of Python code)")
    p.add_argument("--drafter", metavar="DIR", help="DFlash drafter folder, needed by every method but ar (default: the shipped "
                                     "drafter when --target is not given)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (required, not empty)")
    p.add_argument("--method", type=method, metavar="METHOD", default="ddtree", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--temperature", type=temperature, metavar="T", default=0.0, help="0 = greedy; > 0 samples (exactly the target's distribution)")
    p.add_argument("--top-k", type=nonnegative_int, metavar="K", default=0, help="keep the k most probable tokens when sampling (0 = off)")
    p.add_argument("--top-p", type=top_p, metavar="P", default=1.0, help="nucleus sampling mass, in (0, 1] (1 = off)")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=128, help="stop after this many new tokens")
    p.add_argument("--max-nodes", type=nonnegative_int, metavar="N", default=None,
                   help=f"DDTree's node budget, CaDDTree's cap; ar and dflash have none (default: {DEFAULT_MAX_NODES})")
    p.add_argument("--cost-model", default=None, metavar="JSON", help="cost model JSON from `ddtree profile`, for --method caddtree "
                                                      "(default: an estimate from the target's size and the device)")
    p.add_argument("--budget-mode", type=budget_mode, metavar="MODE", default=None,
                   help=f"one of {', '.join(BUDGET_MODES)}, for --method caddtree: price each request's verify on its "
                        "own, one node count for the padded batch, or the batch's best nodes under a ragged cost; "
                        "this command runs one prompt, where the three agree (default: request)")
    p.add_argument("--seed", type=seed_int, metavar="N", default=0, help="seed for sampling")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-sequence token")
    _run_options(p)
    _model_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("profile", help="measure the verification cost curve and write a cost model JSON",
                       description="Time the target's tree verification over a grid of tree sizes and context "
                                   "lengths (and the drafter's round) and write the cost model CaDDTree reads.")
    p.add_argument("--target", metavar="DIR", help="target model folder (default: the tiny pair shipped with ddtree)")
    p.add_argument("--drafter", metavar="DIR", help="drafter folder, to measure its round cost (default: estimated)")
    p.add_argument("--max-nodes", type=nonnegative_int, metavar="N", default=256, help="largest tree size measured")
    p.add_argument("--contexts", type=contexts, default="128,1024,4096", metavar="L1,L2,...",
                   help="context lengths measured, comma-separated")
    p.add_argument("--repeats", type=positive_int, metavar="N", default=10, help="timed repeats per point (the median is kept)")
    p.add_argument("--batch-sizes", type=batch_sizes, default=None, metavar="1,B2,...",
                   help="batch sizes whose padded verify cost (B requests x (n+1) slots) is measured, from 1 and "
                        "increasing, e.g. 1,4,16,64 (default 1; with --vllm 1,4,16,64); the ragged cost is modelled "
                        "from them (no runner has a varlen verify)")
    p.add_argument("--out", metavar="FILE", help="output JSON file (its folder must exist); required without --vllm")
    p.add_argument("--vllm", action="store_true",
                   help="measure vLLM's own engine steps for the pair (--target, --drafter; in this process, vLLM "
                        "installed) at batch sizes 1,4,16,64 (or --batch-sizes) and 0-32 nodes (up to --max-nodes), "
                        "at the first of --contexts, and cache the model where the vLLM plugin looks for it")
    _run_options(p)
    _model_options(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("scale-target", help="write the shipped target plus dead weight that costs like a named model",
                       description="Write a Qwen3 checkpoint folder whose logits and hidden states are the base "
                                   "target's bit for bit (a drafter for the base accepts as much) but whose forward "
                                   "costs like a larger model: extra heads, MLP units and layers whose output "
                                   "projections are zero. NOT A REAL MODEL.")
    p.add_argument("--like", type=_like, metavar="NAME", default=None,
                   help="the named model to cost like (its layers, KV cache and attention widths, parameters and "
                        "matmul FLOPs per token): qwen3-0.6b or qwen3-1.7b; the base's layers are widened, placed "
                        "so that this CPU's BLAS sums them exactly as the base (checked before writing)")
    p.add_argument("--layers", type=positive_int, metavar="N", default=None,
                   help="instead of --like: N layers of the base's own shape (at least the base's; exact on any "
                        "BLAS, but thousands of layers cost per-layer overheads a real model does not have)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty; its parent must exist)")
    p.add_argument("--base", metavar="DIR", default=None,
                   help="the Qwen3 target to scale (default: the tiny target shipped with ddtree)")
    p.add_argument("--dtype", type=_scaled_dtype, default="bfloat16",
                   help="weights' storage dtype: bfloat16 or float32 (the base's weights must fit it exactly)")
    p.add_argument("--seed", type=seed_int, metavar="N", default=0, help="seed of the extra layers' random weights")
    p.set_defaults(func=cmd_scale_target)

    p = sub.add_parser("train", help="train the tiny char-level target + DFlash drafter pair (the demo's default)",
                       add_help=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="how this install was built: version, torch, CUDA kernels and archs",
                       description="Print the ddtree version, the torch it was built against and runs with, and "
                                   "whether CUDA kernels are compiled in (and for which GPU archs).")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:  # its options belong to ddtree.train's own parser
            return cmd_train(argparse.Namespace(rest=argv[1:]))
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"ddtree: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("ddtree: error: out of memory; lower --max-nodes or --max-new-tokens, or use a smaller model",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError: the GPU's memory
            raise
        print(f"ddtree: error: out of memory on the GPU ({str(e).splitlines()[0]}); lower --max-nodes or "
              "--max-new-tokens, or use a smaller model", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
