"""Every mistake on the ``ddtree`` command line is answered before any work starts, with one line
``ddtree: error: ...`` that names the argument, exit code 2 and no traceback.

Most cases call ``ddtree.cli.main`` in this process (fast: no model is loaded when the arguments or files
are refused, which is itself what these tests check); a few run ``python -m ddtree`` in a subprocess to
check the real entry point.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddtree
from ddtree.cli import build_parser, main
from models import save_pair, tiny_drafter, tiny_target

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target, drafter = save_pair(root, "qwen3", seed=5, block_size=4)
    # Drafters that do not fit the target: another hidden size, another vocabulary.
    tiny_drafter(tiny_target("qwen3", hidden_size=32, head_dim=8).config).save_pretrained(root / "wrong_hidden")
    tiny_drafter(tiny_target("qwen3", vocab_size=64).config).save_pretrained(root / "wrong_vocab")
    return root, str(target), str(drafter)


def error_line(capsys, *args) -> str:
    """Run the CLI; assert one error line on stderr, nothing on stdout, exit code 2; return the line."""
    code = main(list(args))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("ddtree: error: "), err
    assert out == "", out
    return lines[0]


def generate(pair, *extra) -> list[str]:
    _, target, drafter = pair
    return ["generate", "--target", target, "--drafter", drafter, "--prompt", "ab", "--device", "cpu", *extra]


# ---- values that make no sense are refused, naming the argument and what is allowed -------------------

BAD_VALUES = [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be at least 1"),
    (["--max-new-tokens", "ten"], "--max-new-tokens: must be an integer"),
    (["--max-nodes", "-3"], "--max-nodes: must be 0 or more"),
    (["--top-k", "-1"], "--top-k: must be 0 or more"),
    (["--temperature", "-1"], "--temperature: must be 0 (greedy) or positive"),
    (["--temperature", "nan"], "--temperature: must be a finite number"),
    (["--temperature", "inf"], "--temperature: must be a finite number"),
    (["--top-p", "5"], "--top-p: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p: must be a finite number"),
    (["--seed", "-1"], "--seed: must be in [0, 2**63)"),
    (["--device", "tpu"], "--device: must be cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "--dtype: must be one of float32, bfloat16, float16"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--threads", "many"], "--threads: must be an integer"),
    (["--method", "medusa"], "unknown method 'medusa'; choose from ar, dflash, ddtree, caddtree"),
    (["--method", "caddtree", "--budget-mode", "padded"],
     "--budget-mode: unknown budget mode 'padded'; choose from request, batch, ragged"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("extra, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_generate_bad_values(pair, capsys, extra, message):
    assert message in error_line(capsys, *generate(pair, *extra))


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens: must be at least 1"),
    (["--max-nodes", "-1"], "--max-nodes: must be 0 or more"),
    (["--prompt", ""], "--prompt: must not be empty"),
    (["--device", "tpu"], "--device: must be cpu, cuda or cuda:N"),
    (["--threads", "-2"], "--threads: must be at least 1"),
    (["--drafter-block", "12"], "--drafter-block: must be one of 8, 16 (the block sizes of the shipped drafters), got 12"),
    (["--drafter-block", "b16"], "--drafter-block: must be an integer, got 'b16'"),
])
def test_demo_bad_values(capsys, extra, message):
    assert message in error_line(capsys, "demo", "--device", "cpu", *extra)


def test_generate_needs_a_prompt(capsys):
    assert "the following arguments are required: --prompt" in error_line(capsys, "generate")
    assert "--prompt: must not be empty" in error_line(capsys, "generate", "--prompt", "", "--device", "cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the answer on a machine without a GPU")
@pytest.mark.parametrize("command", ["demo", "generate"])
def test_cuda_without_a_gpu(pair, capsys, command):
    args = ["demo"] if command == "demo" else generate(pair)[:-2]
    line = error_line(capsys, *args, "--device", "cuda")
    assert "--device: cuda given but no CUDA device is available" in line


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_refusals(pair, capsys):
    args = generate(pair)[:-2]
    assert "--dtype: float32 on CUDA is not supported" in error_line(capsys, *args, "--device", "cuda", "--dtype", "fp32")
    beyond = f"cuda:{torch.cuda.device_count()}"
    assert f"--device: {beyond} given but there are only" in error_line(capsys, *args, "--device", beyond)


def test_cost_model_only_with_caddtree(pair, capsys, tmp_path):
    line = error_line(capsys, *generate(pair, "--method", "ddtree", "--cost-model", str(tmp_path / "c.json")))
    assert "--cost-model: only --method caddtree reads a cost model (got --method ddtree)" in line


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be an object, got list"),
    ('{"format": "something-else"}', "not a ddtree cost model"),
])
def test_bad_cost_model_file(pair, capsys, tmp_path, content, message):
    path = tmp_path / "cost.json"
    if content is not None:
        path.write_text(content)
    line = error_line(capsys, *generate(pair, "--method", "caddtree", "--cost-model", str(path)))
    assert line.startswith("ddtree: error: argument --cost-model: ") and message in line, line


@pytest.mark.parametrize("extra, message", [
    (["--method", "dflash", "--max-nodes", "8"], "--max-nodes: --method dflash has no node budget"),
    (["--method", "ar"], "--drafter: --method ar uses no drafter"),
    (["--top-k", "5"], "--top-k/--top-p: they shape sampling; give --temperature > 0"),
    (["--top-p", "0.9"], "--top-k/--top-p: they shape sampling; give --temperature > 0"),
    (["--budget-mode", "batch"], "--budget-mode: only --method caddtree has a cost-aware budget (got --method ddtree)"),
    (["--budget-mode", "request", "--method", "dflash"],
     "--budget-mode: only --method caddtree has a cost-aware budget"),
])
def test_options_the_run_would_ignore(pair, capsys, extra, message):
    assert message in error_line(capsys, *generate(pair, *extra))
    if extra[:2] == ["--method", "dflash"]:  # and ar, which takes no drafter either
        line = error_line(capsys, "generate", "--target", pair[1], "--prompt", "x", "--method", "ar", *extra[2:])
        assert "--max-nodes: --method ar has no node budget" in line


def test_tree_longer_than_the_target_context(pair, capsys):
    line = error_line(capsys, *generate(pair, "--max-nodes", str(10**9)))
    assert "max_position_embeddings (4096)" in line and "--max-nodes" in line


def test_drafter_without_target(pair, capsys):
    assert "--drafter: given without --target" in error_line(capsys, "generate", "--drafter", pair[2], "--prompt", "x")


# ---- bad folders and files ---------------------------------------------------------------------------


def _copy_target(pair, tmp_path, edit) -> str:
    folder = tmp_path / "target"
    shutil.copytree(pair[1], folder)
    cfg = folder / "config.json"
    text = edit(json.loads(cfg.read_text()))
    cfg.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(folder)


def _without(cfg, key):
    cfg.pop(key)
    return cfg


@pytest.mark.parametrize("edit, message", [
    (lambda c: _without(c, "model_type"), 'target config.json has no "model_type"'),
    (lambda c: {**c, "model_type": "no-such-model"}, "target model_type 'no-such-model' is not known"),
    (lambda c: _without(c, "vocab_size"), "target config.json lacks vocab_size"),
    (lambda c: {**c, "hidden_size": "64"}, "hidden_size must be positive integers"),
    (lambda c: "{truncated", "target config.json is not valid JSON"),
    (lambda c: "[]", "target config.json must hold a JSON object, got list"),
], ids=["no_model_type", "unknown_model_type", "no_vocab_size", "str_hidden_size", "not_json", "a_list"])
def test_bad_target_config(pair, capsys, tmp_path, edit, message):
    target = _copy_target(pair, tmp_path, edit)
    assert message in error_line(capsys, "generate", "--target", target, "--drafter", pair[2], "--prompt", "x",
                                 "--device", "cpu")


@pytest.mark.parametrize("which", ["target", "drafter"])
def test_folder_without_weights(pair, capsys, tmp_path, which):
    _, target, drafter = pair
    folder = tmp_path / which
    shutil.copytree({"target": target, "drafter": drafter}[which], folder,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    args = {"target": target, "drafter": drafter, which: str(folder)}
    line = error_line(capsys, "generate", "--target", args["target"], "--drafter", args["drafter"], "--prompt", "x",
                      "--device", "cpu")
    assert f"cannot load the {which} from {folder}" in line


def test_profile_kv_cache_beyond_memory(pair, capsys, tmp_path):
    line = error_line(capsys, "profile", "--target", pair[1], "--contexts", str(10**12), "--device", "cpu",
                      "--out", str(tmp_path / "c.json"))
    assert "arguments --contexts, --max-nodes and --batch-sizes: the target's KV cache for" in line and "GB" in line


def test_target_without_tokenizer(pair, capsys, tmp_path):
    folder = tmp_path / "target"
    folder.mkdir()
    shutil.copy(Path(pair[1]) / "config.json", folder)
    line = error_line(capsys, "generate", "--target", str(folder), "--method", "ar", "--prompt", "x", "--device", "cpu")
    assert f"cannot load the target's tokenizer from {folder}" in line


@pytest.mark.parametrize("case, message", [
    ("missing_target", "target folder not found"),
    ("missing_drafter", "drafter folder not found"),
    ("wrong_hidden", "hidden size 32 does not match the target's hidden size 64"),
    ("wrong_vocab", "vocabulary size 64 does not match"),
])
def test_drafter_target_mismatch(pair, capsys, case, message):
    root, target, drafter = pair
    if case == "missing_target":
        target = str(root / "nope")
    else:
        drafter = str(root / {"missing_drafter": "nope"}.get(case, case))
    line = error_line(capsys, "generate", "--target", target, "--drafter", drafter, "--prompt", "x", "--device", "cpu")
    assert message in line


def test_profile_bad_contexts_and_out(pair, capsys, tmp_path):
    _, target, drafter = pair
    base = ["profile", "--target", target, "--device", "cpu"]
    assert "--contexts: must be comma-separated integers" in error_line(capsys, *base, "--out", "c.json",
                                                                         "--contexts", "abc")
    assert "--contexts: context lengths must be 0 or more" in error_line(capsys, *base, "--out", "c.json",
                                                                         "--contexts", "8,-1")
    assert "--repeats: must be at least 1" in error_line(capsys, *base, "--out", "c.json", "--repeats", "0")
    for bad in ("4,16", "1,4,4", "1,16,4", "0,1", "1,-4"):
        line = error_line(capsys, *base, "--out", "c.json", "--batch-sizes", bad)
        assert ("--batch-sizes: must start at 1 (the per-request curve) and strictly increase, such as 1,4,16,64, "
                f"got {bad!r}") in line
    assert "--batch-sizes: must be comma-separated integers" in error_line(capsys, *base, "--out", "c.json",
                                                                           "--batch-sizes", "1,x")
    # A cache that fits one request but not the largest batch: the batch size multiplies it.
    line = error_line(capsys, *base, "--out", str(tmp_path / "c.json"), "--contexts", str(10**6),
                      "--batch-sizes", "1,100000")
    assert "arguments --contexts, --max-nodes and --batch-sizes: the target's KV cache" in line
    missing = tmp_path / "no" / "such" / "folder" / "cost.json"
    assert f"--out: folder {missing.parent} does not exist" in error_line(capsys, *base, "--out", str(missing))
    assert f"--out: {tmp_path} is a folder" in error_line(capsys, *base, "--out", str(tmp_path))


def test_profile_out_and_vllm(pair, capsys, tmp_path):
    _, target, drafter = pair
    assert "--out: required (only --vllm writes to its cache without one)" in error_line(
        capsys, "profile", "--target", target, "--device", "cpu")
    assert "--vllm: give the pair vLLM will serve, --target DIR and --drafter DIR" in error_line(
        capsys, "profile", "--vllm", "--target", target)
    try:
        import vllm.v1  # noqa: F401
    except ImportError:  # the main test environment: no vLLM
        assert "--vllm: vLLM is not installed in this Python" in error_line(
            capsys, "profile", "--vllm", "--target", target, "--drafter", drafter)


def test_train_bad_values(capsys, tmp_path):
    assert "--target-steps: must be at least 1" in error_line(capsys, "train", "--out", str(tmp_path),
                                                              "--target-steps", "0")
    assert "the following arguments are required: --out" in error_line(capsys, "train")
    assert "--hidden must be a multiple of 64" in error_line(capsys, "train", "--out", str(tmp_path), "--hidden", "100")
    # The drafter-only mode uses its target unchanged: what would shape or train a target is refused.
    from ddtree.demo import PRETRAINED

    shipped = str(PRETRAINED / "target")
    for option, value in (("--hidden", "64"), ("--layers", "3"), ("--target-steps", "10")):
        line = error_line(capsys, "train", "--target", shipped, "--out", str(tmp_path), option, value)
        assert f"argument {option}: shapes or trains the target, so not with --target" in line
    line = error_line(capsys, "train", "--target", str(tmp_path), "--out", str(tmp_path / "d"))
    assert "argument --target:" in line and "no config.json and model.safetensors" in line


# ---- what is not refused: a warning, then the run ------------------------------------------------------


def test_characters_outside_the_vocabulary_are_named(capsys):
    code = main(["generate", "--prompt", "héllo ✓ x", "--method", "ar", "--max-new-tokens", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.strip().splitlines() == [
        "ddtree: warning: the target's tokenizer has no token for 'é', '✓' in --prompt; they become '<unk>'"]
    assert out.startswith("héllo ✓ x")


# ---- the real entry point and --help --------------------------------------------------------------------


def test_subprocess_errors_have_no_traceback(pair):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for args in (generate(pair, "--top-k", "-1"), ["nonsense"]):
        r = subprocess.run([sys.executable, "-m", "ddtree", *args], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and r.stdout == "", r
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ddtree: error: "), r.stderr


def _options(parser):
    """(subcommand, action) for every option of every subcommand."""
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                yield name, p, action


def test_every_help_entry_has_a_line_and_its_default():
    parser = build_parser()
    for name, p, action in _options(parser):
        assert action.help, f"ddtree {name} {action.option_strings[0]} has no help text"
        if action.default is not None and action.default is not False:  # (0 and 0.0 are defaults to show)
            line = p._get_formatter()._get_help_string(action)
            assert "default" in line, (name, action.option_strings)


def test_info_names_the_torch_it_was_built_with(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch_built    {ddtree.info()['torch_built']}" in out
    assert ddtree.info()["torch_built"] == torch.__version__


def test_import_under_another_torch_names_both_versions(tmp_path):
    """A copy of the installed package whose build record names another torch refuses to import, naming both
    versions and the fix (rather than failing on a missing torch library)."""
    package = Path(ddtree.__file__).parent
    shutil.copytree(package, tmp_path / "ddtree", ignore=shutil.ignore_patterns("__pycache__", "pretrained"))
    (tmp_path / "ddtree" / "_build_info.py").write_text('TORCH_VERSION = "2.0.0+cu999"\n')
    r = subprocess.run([sys.executable, "-c", "import ddtree"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)), cwd=tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "built against torch 2.0.0+cu999" in last and f"this Python has torch {torch.__version__}" in last
    assert "pip install torch==2.0.0" in last and "rebuild" in last


@pytest.mark.parametrize("block_size", [1, "8"])
def test_drafter_block_size(pair, capsys, tmp_path, block_size):
    folder = tmp_path / "drafter"
    shutil.copytree(pair[2], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "block_size": block_size}))
    line = error_line(capsys, "generate", "--target", pair[1], "--drafter", str(folder), "--prompt", "x", "--device", "cpu")
    assert "drafter block_size must be an integer of at least 2" in line and repr(block_size) in line


def test_bf16_on_a_cpu_without_bf16_units_warns_in_one_line(monkeypatch, capsys):
    """Forcing bfloat16 on a CPU that emulates it costs several times float32: one warning line, then the run."""
    import argparse

    from ddtree import cli, timing

    monkeypatch.setattr(timing, "cpu_bf16_units", lambda: [])
    assert cli._dtype(argparse.Namespace(dtype="bfloat16"), "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.startswith("ddtree: warning: --dtype bfloat16") and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(timing, "cpu_bf16_units", lambda: ["AMX-BF16"])
    cli._dtype(argparse.Namespace(dtype="bfloat16"), "cpu")
    cli._dtype(argparse.Namespace(dtype=None), "cpu")  # the CPU default, float32: never a warning
    monkeypatch.setattr(timing, "cpu_bf16_units", lambda: [])
    cli._dtype(argparse.Namespace(dtype="float32"), "cpu")
    assert capsys.readouterr().err == ""


def test_device_name_says_the_cpu_units():
    from ddtree import timing

    name = timing.device_name("cpu")
    assert torch.backends.cpu.get_cpu_capability() in name
    assert ("no bf16 matrix units" in name) == (not timing.cpu_bf16_units())
