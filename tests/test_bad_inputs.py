"""Bad input files, generated here, fed to every `omni` command that takes a path.

Each case must end within seconds with exit status 2 and exactly one stderr line, ``error: PATH: what``, no
traceback, and leave the files it was given (and any run or output directory) as they were. The CLI runs in
process (``main(argv)``) for speed; a SIGALRM deadline turns a hang (a FIFO opened for reading, a parser doing
unbounded work) into a failure instead of a stuck test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import omnicore
from omnicore.cli.main import main

MiB = 1 << 20
DEADLINE_S = 20  # generous: a hang, not a speed check
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- running the CLI with a deadline

class Hung(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def deadline(seconds: int):
    def expire(signum, frame):
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def omni(capfd, *argv: str) -> tuple[int, str, str]:
    capfd.readouterr()
    with deadline(DEADLINE_S):
        rc = main(list(argv))
    out, err = capfd.readouterr()
    return rc, out, err


def tree_state(*roots: Path) -> dict[str, str]:
    """A fingerprint of every entry under ``roots`` without opening anything but regular files (a FIFO would
    block): content hashes of small files, size and mtime of large ones, the kind and mode of the rest."""
    state: dict[str, str] = {}
    for root in roots:
        if not os.path.lexists(root):
            state[str(root)] = "absent"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [""] + dirnames + filenames:
                p = Path(dirpath, name) if name else Path(dirpath)
                st = os.lstat(p)
                key = f"{oct(st.st_mode)}:{st.st_size}:{st.st_mtime_ns}"
                if stat.S_ISREG(st.st_mode) and st.st_size < MiB and os.access(p, os.R_OK):
                    key += ":" + hashlib.sha256(p.read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    key += ":" + os.readlink(p)
                state[str(p)] = key
    return state


def assert_refused(capfd, argv: list[str], names: str, watch: list[Path], says: str | None = None) -> str:
    """Exit 2, one ``error:`` line naming ``names`` (and saying ``says``), nothing under ``watch`` changed."""
    before = tree_state(*watch)
    rc, out, err = omni(capfd, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}; stderr: {err!r}"
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], f"{names!r} not named in {lines[0]!r}"
    assert says is None or says in lines[0], f"{says!r} not said in {lines[0]!r}"
    assert tree_state(*watch) == before, "an input, run or output directory was changed"
    return lines[0]


# ---------------------------------------------------------------- the corpus

def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is a few bytes: only the header is ever read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _billion_laughs() -> str:
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, 10):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return text


# Bytes no reader may accept, whatever it expects; "huge" is sparse (no disk), over every size cap.
GENERIC = {
    "binary": bytes(range(256)) * 16,
    "utf16": "seed: 1\n".encode("utf-16"),
    "latin1": "description: caf\xe9\n".encode("latin-1"),
    "huge": None,
    "directory": None,
    "fifo": None,
    "unreadable": None,
    "dangling_link": None,
}
RECIPE_ONLY = {
    "deep_nesting": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep_block_nesting": "".join(" " * i + f"k{i}:\n" for i in range(500)) + " " * 500 + "v: 1\n",
    "alias_bomb": _billion_laughs(),
    "alias_cycle": "a: &x [*x]\n",
    "alias_chain": "".join(f"l{i}: &l{i} [{'x' if i == 0 else f'*l{i - 1}'}]\n" for i in range(200)),
    "many_nodes": "prompts: [" + "x, " * 200_000 + "]\n",
    "python_tag": "seed: !!python/object/apply:os.system ['true']\n",
    "big_integer": "seed: " + "1" * 5000 + "\n",
    "bad_timestamp": "seed: 2024-13-45\n",
    "control_char": "seed: 1\x07\n",
    "merge_key": "base: &b {seed: 1}\nother:\n  <<: *b\n",
    "syntax": "model:\n  backbone: {type: mamba2\n",
}
JSON_ONLY = {
    "deep_json": "[" * 100_000 + "]" * 100_000,
    "big_integer_json": '{"caption": "x", "codes": [' + "1" * 5000 + "]}\n",
    "not_json": '{"caption": \n',
}


# What the message must say for each kind (the kind of failure, not only that there was one).
SAYS = {
    "binary": "binary", "utf16": "UTF-16", "latin1": "not UTF-8", "huge": "limit", "directory": "directory",
    "fifo": "named pipe", "unreadable": "ermission", "dangling_link": "not found",
    "deep_nesting": "levels deep", "deep_block_nesting": "levels deep", "alias_bomb": "aliases expand",
    "alias_cycle": "alias refers", "alias_chain": "levels deep", "many_nodes": "values",
    "python_tag": "unsupported tag", "big_integer": "digits", "bad_timestamp": "invalid value",
    "control_char": "not allowed", "merge_key": "merge keys", "syntax": "invalid YAML",
    "deep_json": "nested too deeply", "big_integer_json": "digits", "not_json": "invalid JSON",
}


def _materialize(p: Path, kind: str, content) -> Path:
    if kind == "huge":
        with open(p, "wb") as f:
            f.truncate(17 * MiB)
    elif kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "unreadable":
        p.write_text("seed: 1\n")
        p.chmod(0)
    elif kind == "dangling_link":
        p.symlink_to(p.parent / "no-such-target")
    else:
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _unreadable_even_as_root(kind: str, monkeypatch) -> None:
    """chmod 000 does not stop root: there, opening the "unreadable" file fails as it would for anyone else."""
    if kind != "unreadable" or not IS_ROOT:
        return
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.fspath(path).rsplit("/", 1)[-1].startswith(("unreadable", "image_unreadable")):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


@dataclass
class Env:
    root: Path
    model: Path
    run: Path  # an existing run directory that must stay untouched
    corpus: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    omnicore.build("quickstart").save(root / "model")
    (root / "run").mkdir()
    (root / "run" / "note.txt").write_text("a run directory that nothing may touch\n")
    corpus = root / "corpus"
    corpus.mkdir()
    return Env(root, root / "model", root / "run", corpus)


@pytest.fixture(autouse=True)
def _in_tmp(env, monkeypatch):
    monkeypatch.chdir(env.root)  # a command that wrote to the cwd (runs/...) would show in the fingerprint


def _watch(env: Env, *extra: Path) -> list[Path]:
    return [env.corpus, env.model, env.run, env.root / "runs", *extra]


# ---------------------------------------------------------------- recipes

RECIPE_KINDS = list(GENERIC) + list(RECIPE_ONLY)


def _recipe_file(env: Env, kind: str) -> Path:
    p = env.corpus / f"{kind}.yaml"
    if not os.path.lexists(p):
        _materialize(p, kind, {**GENERIC, **RECIPE_ONLY}[kind])
    return p


@pytest.mark.parametrize("kind", RECIPE_KINDS)
def test_bad_recipe_file(env, capfd, monkeypatch, kind):
    _unreadable_even_as_root(kind, monkeypatch)
    bad = str(_recipe_file(env, kind))
    for argv in (["recipe", "validate", bad],
                 ["recipe", "run", bad, "--run-dir", str(env.run), "--device", "cpu"],
                 ["pretokenize", str(_good_folder(env)), "--out", str(env.corpus / "out.jsonl"), "--recipe", bad]):
        assert_refused(capfd, argv, bad.rsplit("/", 1)[-1], _watch(env), SAYS[kind])


@pytest.mark.parametrize("kind", ["binary", "fifo", "directory", "alias_bomb", "deep_nesting", "huge", "missing"])
def test_bad_parent_recipe_is_named(env, capfd, kind):
    parent = env.corpus / f"{kind}.yaml" if kind == "missing" else _recipe_file(env, kind)
    child = env.corpus / f"child_of_{kind}.yaml"
    child.write_text(f"extends: {parent.name}\nseed: 3\n")
    line = assert_refused(capfd, ["recipe", "validate", str(child)], parent.name, _watch(env),
                          SAYS.get(kind, "no such recipe"))
    if kind == "missing":
        assert str(child) in line  # the child's extends line is where to look


def test_bad_override_value_is_bounded(env, capfd):
    deep = "seed=" + "[" * 5000 + "]" * 5000
    assert_refused(capfd, ["recipe", "validate", "quickstart", deep], "override", _watch(env))
    bomb = "description=" + "{" + _billion_laughs().replace("\n", ", ") + "}"
    assert_refused(capfd, ["recipe", "validate", "quickstart", bomb], "override", _watch(env))


def test_shipped_recipes_use_no_yaml_aliases():
    """Recipes may use anchors and aliases (bounded, above); the shipped ones use none, so none depends on them."""
    import yaml

    for c in omnicore.list_components("recipe"):
        events = yaml.parse(Path(c.factory).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events), c.name


# ---------------------------------------------------------------- model directories

def _model_variant(env: Env, kind: str) -> Path:
    """A copy of the good model directory with one thing wrong (unchanged files are symlinks)."""
    d = env.corpus / f"model_{kind}"
    if os.path.lexists(d):
        return d
    if kind == "missing_dir":
        return d
    if kind == "a_file":
        d.write_text("not a directory\n")
        return d
    if kind == "fifo_dir":
        os.mkfifo(d)
        return d
    d.mkdir()
    for f in env.model.iterdir():
        (d / f.name).symlink_to(f)
    config = json.loads((env.model / "config.json").read_text())

    def set_config(text: str | bytes) -> None:
        (d / "config.json").unlink()
        (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())

    def set_weights(data: bytes | None) -> None:
        (d / "model.safetensors").unlink()
        if data is not None:
            (d / "model.safetensors").write_bytes(data)

    weights = (env.model / "model.safetensors").read_bytes()
    if kind == "config_binary":
        set_config(bytes(range(256)) * 4)
    elif kind == "config_not_json":
        set_config('{"format": "omnicore-model", ')
    elif kind == "config_deep":
        set_config("[" * 100_000 + "]" * 100_000)
    elif kind == "config_deep_ok_json":
        set_config(json.dumps({**config, "note": json.loads("[" * 200 + "]" * 200)}))
    elif kind == "config_list":
        set_config("[1, 2, 3]")
    elif kind == "config_wrong_type":
        config["model"]["max_caption_tokens"] = "many"
        set_config(json.dumps(config))
    elif kind == "config_wrong_param_type":
        config["model"]["backbone"]["params"]["d_model"] = "wide"
        set_config(json.dumps(config))
    elif kind == "config_huge_dims":
        config["model"]["backbone"]["params"].update(d_model=65536, n_layer=64)
        set_config(json.dumps(config))
    elif kind == "config_tied_wrong":
        config["tied"] = ["x"]
        set_config(json.dumps(config))
    elif kind == "config_missing":
        (d / "config.json").unlink()
    elif kind == "config_fifo":
        (d / "config.json").unlink()
        os.mkfifo(d / "config.json")
    elif kind == "weights_garbage":
        set_weights(bytes(range(256)) * 64)
    elif kind == "weights_truncated":
        set_weights(weights[: len(weights) // 2])
    elif kind == "weights_pickle":  # a torch pickle under the safetensors name: never unpickled
        (d / "model.safetensors").unlink()
        torch.save({"a": torch.zeros(2)}, d / "model.safetensors")
    elif kind == "weights_missing":
        set_weights(None)
    elif kind == "weights_fifo":
        set_weights(None)
        os.mkfifo(d / "model.safetensors")
    elif kind == "weights_directory":
        set_weights(None)
        (d / "model.safetensors").mkdir()
    elif kind == "weights_wrong_shapes":  # every name present, one tensor of another shape
        from safetensors.torch import load_file, save_file

        state = load_file(str(env.model / "model.safetensors"))
        name = max(state, key=lambda k: state[k].numel())
        state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:], dtype=state[name].dtype)
        set_weights(None)
        save_file(state, str(d / "model.safetensors"))
    elif kind == "adapters_garbage":
        (d / "adapters.safetensors").unlink()
        (d / "adapters.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")
    else:
        raise AssertionError(kind)
    return d


MODEL_SAYS = {
    "missing_dir": "does not exist", "a_file": "not a directory", "fifo_dir": "not a directory",
    "config_binary": "binary", "config_not_json": "invalid JSON", "config_deep": "nested too deeply",
    "config_deep_ok_json": "levels deep", "config_list": "JSON object", "config_wrong_type": "max_caption_tokens",
    "config_wrong_param_type": "d_model", "config_huge_dims": "describes a model", "config_tied_wrong": "tied",
    "config_missing": "no config.json", "config_fifo": "named pipe", "weights_garbage": "unreadable safetensors",
    "weights_truncated": "unreadable safetensors", "weights_pickle": "unreadable safetensors",
    "weights_missing": "not found", "weights_fifo": "named pipe", "weights_directory": "directory",
    "weights_wrong_shapes": "size mismatch", "adapters_garbage": "unreadable safetensors",
}
MODEL_KINDS = ["missing_dir", "a_file", "fifo_dir", "config_binary", "config_not_json", "config_deep",
               "config_deep_ok_json", "config_list", "config_wrong_type", "config_wrong_param_type",
               "config_huge_dims", "config_tied_wrong", "config_missing", "config_fifo", "weights_garbage",
               "weights_truncated", "weights_pickle", "weights_missing", "weights_fifo", "weights_directory",
               "weights_wrong_shapes", "adapters_garbage"]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_bad_model_directory(env, capfd, kind):
    d = str(_model_variant(env, kind))
    out = env.corpus / "out"
    for argv in (["ask", "-", "What color is it?", "--model", d, "--device", "cpu"],
                 ["generate", "a red circle", "--model", d, "--out", str(out), "--device", "cpu"],
                 ["pretokenize", str(_good_folder(env)), "--out", str(out / "codes.jsonl"), "--model", d,
                  "--device", "cpu"]):
        assert_refused(capfd, argv, d, _watch(env, out), MODEL_SAYS[kind])


# ---------------------------------------------------------------- images

IMAGE_KINDS = {
    "text": b"hello, not an image\n",
    "empty": b"",
    "truncated": None,
    "huge_dimensions": _png(9000, 9000),  # 81 M pixels: refused by omnicore before PIL's own guard
    "decompression_bomb": _png(100_000, 100_000),  # 10**10 pixels: PIL's DecompressionBombError
    "unsupported_format": None,
    **{k: v for k, v in GENERIC.items() if k not in ("utf16", "latin1")},
}


IMAGE_SAYS = {"text": "not an image", "empty": "not an image", "binary": "not an image", "huge": "not an image",
              "truncated": "truncated", "huge_dimensions": "9000x9000 pixels", "decompression_bomb": "pixels",
              "unsupported_format": "not an image"}


def _image_file(env: Env, kind: str) -> Path:
    p = env.corpus / f"image_{kind}.png"
    if os.path.lexists(p):
        return p
    if kind == "truncated":
        from PIL import Image

        Image.new("RGB", (64, 64), "red").save(p)
        p.write_bytes(p.read_bytes()[:60])
    elif kind == "unsupported_format":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(env.corpus / "tmp.pcx")
        (env.corpus / "tmp.pcx").rename(p)
    else:
        _materialize(p, kind, IMAGE_KINDS[kind])
    return p


@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_bad_image(env, capfd, monkeypatch, kind):
    _unreadable_even_as_root(kind, monkeypatch)
    bad = str(_image_file(env, kind))
    # the image is checked before the model loads: a missing model directory is never reached
    assert_refused(capfd, ["ask", bad, "What color is it?", "--model", str(env.corpus / "no-model"),
                           "--device", "cpu"], bad, _watch(env), IMAGE_SAYS.get(kind, SAYS.get(kind)))


# ---------------------------------------------------------------- data files (pretokenize folder, recipes)

def _good_folder(env: Env) -> Path:
    d = env.corpus / "good_folder"
    if not d.exists():
        from PIL import Image

        d.mkdir()
        Image.new("RGB", (32, 32), "red").save(d / "a.png")
        (d / "a.txt").write_text("a red square\n")
    return d


def _bad_folder(env: Env, kind: str) -> tuple[Path, Path]:
    """An image+caption folder with one bad file; returns (folder, the bad file)."""
    d = env.corpus / f"folder_{kind}"
    if kind in ("missing", "fifo", "a_file"):
        if not os.path.lexists(d):
            if kind == "fifo":
                os.mkfifo(d)
            elif kind == "a_file":
                d.write_text("x\n")
        return d, d
    if not d.exists():
        from PIL import Image

        d.mkdir()
        Image.new("RGB", (32, 32), "red").save(d / "a.png")
        (d / "a.txt").write_text("a red square\n")
    if kind.startswith("caption_"):
        (d / "b.png").write_bytes((d / "a.png").read_bytes())
        bad = d / "b.txt"
        if not os.path.lexists(bad):
            if kind == "caption_fifo":
                os.mkfifo(bad)
            else:
                bad.write_bytes(GENERIC[kind.removeprefix("caption_")])
        return d, bad
    if kind.startswith("image_"):
        bad = d / "b.png"
        if not bad.exists():
            bad.write_bytes(_image_file(env, kind[6:]).read_bytes())
            (d / "b.txt").write_text("a bad image\n")
        return d, bad
    if kind.startswith("captions_jsonl_"):
        bad = d / "captions.jsonl"
        content = {**GENERIC, **JSON_ONLY}[kind[15:]]
        if not os.path.lexists(bad):
            bad.write_bytes(content if isinstance(content, bytes) else content.encode())
        return d, bad
    raise AssertionError(kind)


FOLDER_SAYS = {"missing": "does not exist", "fifo": "named pipe", "a_file": "a file, not a folder",
               **{f"caption_{k}": SAYS[k] for k in ("binary", "utf16", "latin1", "fifo")},
               **{f"image_{k}": IMAGE_SAYS[k] for k in ("text", "truncated", "huge_dimensions", "decompression_bomb")},
               **{f"captions_jsonl_{k}": SAYS[k] for k in ("binary", "deep_json", "big_integer_json", "not_json")}}
FOLDER_KINDS = ["missing", "fifo", "a_file", "caption_binary", "caption_utf16", "caption_latin1", "caption_fifo",
                "image_text", "image_truncated", "image_huge_dimensions", "image_decompression_bomb",
                "captions_jsonl_binary", "captions_jsonl_deep_json", "captions_jsonl_big_integer_json",
                "captions_jsonl_not_json"]


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_bad_pretokenize_folder(env, capfd, kind):
    folder, bad = _bad_folder(env, kind)
    out = env.corpus / "codes.jsonl"
    assert_refused(capfd, ["pretokenize", str(folder), "--out", str(out), "--model", str(env.model),
                           "--device", "cpu"], bad.name, _watch(env, out), FOLDER_SAYS[kind])


# Data files have no size cap (datasets are large): a huge file of NUL bytes is refused as binary.
DATA_SAYS = {"huge": "binary", "dangling_link": "does not exist"}
DATA_KINDS = ["binary", "utf16", "latin1", "huge", "directory", "fifo", "dangling_link", "deep_json",
              "big_integer_json", "not_json"]


def _data_file(env: Env, kind: str, suffix: str) -> Path:
    p = env.corpus / f"data_{kind}{suffix}"
    if not os.path.lexists(p):
        _materialize(p, kind, {**GENERIC, **JSON_ONLY}[kind])
    return p


def _data_recipe(env: Env, name: str, task: str, data: dict) -> Path:
    p = env.corpus / f"{name}.yaml"
    stage = {"name": "s", "tasks": {task: {"batch_size": 2, "data": data}},
             "train": {"roles": ["heads.image" if task == "t2i" else "heads.text"]}, "optimizer": {"lr": 1e-3},
             "steps": 1}
    p.write_text(json.dumps({"extends": "quickstart", "stages": [stage]}))
    return p


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("dataset", ["t2i_jsonl", "llava_json", "llava_jsonl"])
def test_bad_dataset_file_in_recipe(env, capfd, kind, dataset):
    """The recipe run fails on the data file with one line naming it, and leaves no run directory behind."""
    suffix = ".jsonl" if dataset != "llava_json" else ".json"
    bad = _data_file(env, kind, suffix)
    params = {"path": str(bad)} if dataset == "t2i_jsonl" else {"json_path": str(bad)}
    recipe = _data_recipe(env, f"{dataset}_{kind}", "t2i" if dataset == "t2i_jsonl" else "mmu",
                          {"type": "t2i_jsonl" if dataset == "t2i_jsonl" else "llava_json", "params": params})
    run = env.corpus / f"run_{dataset}_{kind}"
    assert_refused(capfd, ["recipe", "run", str(recipe), "--run-dir", str(run), "--device", "cpu"], bad.name,
                   [env.model, *[env.corpus / n for n in os.listdir(env.corpus) if n.startswith("data_")]],
                   DATA_SAYS.get(kind, SAYS[kind]))
    assert not run.exists()


@pytest.mark.parametrize("kind", ["binary", "utf16", "latin1", "huge", "directory", "fifo", "dangling_link"])
def test_bad_prompts_file_in_recipe(env, capfd, kind):
    bad = _data_file(env, kind, ".txt")
    recipe = env.corpus / f"prompts_{kind}.yaml"
    recipe.write_text(json.dumps({"inference": {"task": "t2i", "model": str(env.model),
                                                "inputs": {"prompts_file": str(bad)}}}))
    run = env.corpus / f"run_prompts_{kind}"
    assert_refused(capfd, ["recipe", "run", str(recipe), "--run-dir", str(run), "--device", "cpu"], bad.name,
                   [env.model, bad], SAYS[kind])


def test_recipe_run_leaves_run_dir_alone_when_an_input_file_is_bad(env, capfd):
    bad = _data_file(env, "binary", ".txt")
    recipe = env.corpus / "prompts_binary_run.yaml"
    recipe.write_text(json.dumps({"inference": {"task": "t2i", "model": str(env.model),
                                                "inputs": {"prompts_file": str(bad)}}}))
    assert_refused(capfd, ["recipe", "run", str(recipe), "--run-dir", str(env.run), "--device", "cpu"], bad.name,
                   _watch(env))


# ---------------------------------------------------------------- mistyped commands and options (part 2)

@pytest.mark.parametrize("argv, message", [
    (["convrt"], "No such command 'convrt'"),
    (["recipe", "validate", "quickstart", "--bogus"], "No such option: --bogus"),
    (["generate", "--model", "m"], "Missing argument"),
    (["ask", "-", "q"], "Missing option '--model'"),
    (["generate", "a", "--model", "m", "--n", "three"], "Invalid value for '--n'"),
    (["ask", "-", "q", "--model", "m", "--temperature", "hot"], "Invalid value for '--temperature'"),
])
def test_usage_errors_exit_2_with_usage(capfd, argv, message):
    rc, out, err = omni(capfd, *argv)
    assert rc == 2, err
    assert err.startswith("Usage: omni") and message in err and "Traceback" not in out + err
    assert "error: UsageError" not in err


# ---------------------------------------------------------------- impossible option values (part 3)

@pytest.mark.parametrize("argv", [
    ["generate", "a", "--n", "0"],
    ["generate", "a", "--batch-size", "0"],
    ["generate", "a", "--temperature", "-1"],
    ["generate", "a", "--temperature", "nan"],
    ["generate", "a", "--top-k", "0"],
    ["generate", "a", "--top-p", "0"],
    ["generate", "a", "--top-p", "1.5"],
    ["generate", "a", "--guidance-scale", "inf"],
    ["generate", "a", "--seed", str(2**70)],
    ["generate", "a", "--device", "toaster"],
    ["ask", "-", "q", "--max-new-tokens", "-1"],
    ["ask", "-", "q", "--max-new-tokens", "0"],
    ["ask", "-", "q", "--temperature", "-1"],
    ["ask", "-", "q", "--dtype", "half"],
    ["generate", "a", "--dtype", "int8"],
    ["pretokenize", ".", "--out", "o.jsonl", "--batch-size", "0"],
    ["pretokenize", ".", "--out", "o.jsonl", "--image-size", "0"],
])
def test_impossible_option_values_are_refused_before_loading(env, capfd, argv):
    option = argv[-2]  # each case ends with the option under test and its value
    # the model directory does not exist: the option's error must come first
    line = assert_refused(capfd, [*argv, "--model", str(env.corpus / "no-model")], option, _watch(env))
    assert line.startswith(f"error: {option}"), line


def test_recipe_run_option_values(env, capfd):
    line = assert_refused(capfd, ["recipe", "run", "quickstart", "--nproc-per-node", "0"], "--nproc-per-node",
                          _watch(env))
    assert line.startswith("error: --nproc-per-node")
    afile = env.corpus / "run_is_a_file"
    afile.write_text("x\n")
    assert_refused(capfd, ["recipe", "run", "quickstart", "--run-dir", str(afile)], "--run-dir", _watch(env))


LONG = "a red circle on the left " * 5  # 30 tokens; the quick-start model reads 8


def test_generate_says_once_that_long_prompts_are_cut(env, capfd, tmp_path):
    rc, out, err = omni(capfd, "generate", LONG, "a red circle", LONG + "now", "--model", str(env.model), "--out",
                        str(tmp_path / "out"), "--batch-size", "1", "--n", "2", "--device", "cpu")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(r"warning: 2 of 3 prompts have more than 8 tokens \(the longest \d+\); "
                                            r"the model reads only the first 8 tokens of each \(max_caption_tokens\)",
                                            lines[0]), err


def test_generate_images_warns_once_per_call(env):
    from omnicore.model.layout import CaptionTruncatedWarning

    model = omnicore.load(env.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate_images([LONG, LONG + "again", "a red circle"], n_per_prompt=2, batch_size=2, seed=0)
    truncation = [w for w in caught if issubclass(w.category, CaptionTruncatedWarning)]
    assert len(truncation) == 1 and "first 8 tokens" in str(truncation[0].message)


def test_ask_refuses_a_question_longer_than_the_model_reads(env, capfd):
    assert_refused(capfd, ["ask", "-", "What color is it " * 100, "--model", str(env.model), "--device", "cpu"],
                   "question", _watch(env))


def test_ask_says_when_the_answer_is_cut_to_the_positions_left(env, capfd):
    rc, out, err = omni(capfd, "ask", "-", "What color is it " * 20, "--model", str(env.model), "--device", "cpu",
                        "--max-new-tokens", "100")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: max_new_tokens 100:") and "59 answer tokens" in lines[0]


# ---------------------------------------------------------------- released-checkpoint conversion

CHECKPOINT_SAYS = {"binary": "weights-only", "utf16": "weights-only", "latin1": "weights-only", "huge": "weights-only",
                   "directory": "directory", "fifo": "named pipe", "dangling_link": "not found"}


@pytest.mark.parametrize("kind", list(CHECKPOINT_SAYS))
def test_bad_checkpoint_to_convert(env, capfd, kind):
    """`omni convert omnimamba` reads the release first: a file that is not one is refused, no output written."""
    bad = _data_file(env, kind, ".pth")
    out = env.corpus / f"converted_{kind}"
    assert_refused(capfd, ["convert", "omnimamba", "--checkpoint", str(bad), "--tokenizer", str(bad), "--vq", str(bad),
                           "--dino", str(bad), "--siglip", str(bad), "--out", str(out)], bad.name,
                   [env.model, env.run], CHECKPOINT_SAYS[kind])
    assert not out.exists()


@pytest.mark.parametrize("kind", ["binary", "directory", "fifo", "dangling_link"])
def test_bad_model_dir_to_export(env, capfd, kind):
    bad = _data_file(env, kind, ".model")
    out = env.corpus / f"exported_{kind}.pth"
    assert_refused(capfd, ["export", "omnimamba", str(bad), "--out", str(out)], bad.name, [env.model, env.run])
    assert not out.exists()
