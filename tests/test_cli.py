"""The ``writesae`` command: self-check, argument checks before any heavy import, one-line errors."""

import json
import subprocess
import sys

import pytest

from writesae_plugin.cli import MAMBA2_MODEL_TYPES, UsageError, main


def test_hooks_selfcheck_runs_and_passes(capsys):
    assert main(["hooks", "--length", "70", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.linear_attn.hook_write_key" in out
    assert "capture-only logits vs plain HF" in out and "all checks passed" in out
    assert "FAIL" not in out
    assert "shapes: b = batch;" in out and "p_s = positions hook_state captures" in out  # the shapes' legend


def _one_line_error(err: str, cmd: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"writesae {cmd}: " if cmd else "writesae: "), err
    assert "Traceback" not in err
    return lines[0]


def test_import_and_parsing_import_nothing_heavy(tmp_path):
    """`writesae --help` stays fast: the CLI module, its parser and its checks import no torch/SAELens."""
    d = tmp_path / "d.txt"
    d.write_text("some text\n")
    code = ("import sys; import writesae_plugin.cli as c; p = c.build_parser()\n"
            "for argv in (['hooks'], ['circuit', '--out', 'o'], ['demo'], ['substitute', '--sae', 'writesae-demo:"
            f"L4.H0.write', '--dataset', {str(d)!r}, '--out', 'o'], ['train', '--layer', '0', '--dataset', {str(d)!r}, "
            "'--out', 'o']):\n"
            "    a = p.parse_args(argv); c.VALIDATORS[a.command](a)\n"
            "heavy = [m for m in ('torch', 'sae_lens', 'transformers', 'datasets', 'transformer_lens') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_an_unknown_release_is_a_usage_error_before_anything_heavy(tmp_path):
    """A mistyped release name failed after ~25 s of loading (SAELens' lookup, exit 1); it is refused while the
    arguments are checked, listing the shipped releases. SAELens' own releases and ORG/NAME repos still pass."""
    d = tmp_path / "d.txt"
    d.write_text("some text\n")
    code = ("import sys; import writesae_plugin.cli as c\n"
            f"rc = c.main(['substitute', '--sae', 'writesae-dem:L4.H0.write', '--dataset', {str(d)!r}, '--out', 'o'])\n"
            "assert c.sae_cfg('gemma-scope-2b-pt-res-canonical:layer_0/width_16k/canonical') is None\n"
            "assert c.sae_cfg('some-org/some-saes:layer_0') is None\n"
            "heavy = [m for m in ('torch', 'sae_lens', 'transformers') if m in sys.modules]\n"
            "print(rc, heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "2 []", r.stdout + r.stderr
    assert "unknown release 'writesae-dem'; the shipped releases are ['writesae-demo', 'writesae-demo-mamba2']" \
        in r.stderr


def test_a_refused_train_leaves_no_empty_output_directory(tmp_path, capsys):
    """``train --store`` with a store that does not fit is refused after the output checks made ``--out`` and its
    ``checkpoints/``; they are removed again (a directory that existed before, or holds a file, is kept)."""
    out = tmp_path / "new" / "out"
    assert main(["train", "--store", str(tmp_path / "no-store"), "--layer", "1", "--out", str(out)]) == 2
    assert "not an activation store" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["train", "--store", str(tmp_path / "no-store"), "--layer", "1", "--out", str(kept)]) == 2
    assert kept.is_dir()


def test_a_missing_dataset_is_not_sent_to_the_hub_when_offline(monkeypatch):
    """``--dataset x`` (no such file, not path-like) is tried as a Hub dataset; offline (HF_*_OFFLINE set) that
    took 5 retries and ended in a ConnectionError: it is refused while the arguments are checked."""
    from writesae_plugin.cli import UsageError, check_dataset_arg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="--dataset x: no such file or directory, and not loadable from the Hugging "
                                         "Face Hub with HF_HUB_OFFLINE set"):
        check_dataset_arg("x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    check_dataset_arg("x")  # online: a Hub name passes (loading says what failed)


def test_the_per_atom_mean_is_printed_as_a_sentence():
    from writesae_plugin.cli import _per_atom_line

    nan = float("nan")
    assert _per_atom_line({"mean": nan, "n_clusters": 0, "min_count": 5, "lo": nan, "hi": nan}) == \
        "per-atom mean: no atom has >= 5 firings (fire more: --contexts)"
    assert _per_atom_line({"mean": 0.8, "n_clusters": 7, "min_count": 5, "lo": 0.7, "hi": 0.9}) == \
        "per-atom mean win rate 80.0% [70.0%, 90.0%] over 7 atoms with >= 5 firings"
    assert "NaN" not in _per_atom_line({"mean": 0.8, "n_clusters": 1, "min_count": 5, "lo": nan, "hi": nan})


@pytest.mark.parametrize("argv", [
    ["hooks", "--batch", "0"], ["hooks", "--length", "1"], ["path-patch", "--head", "x", "--out", "o"],
    ["install", "--strata", "abc", "--layer", "0", "--head", "0", "--dataset", "d", "--out", "o"],
    ["install", "--strata", "50-10", "--layer", "0", "--head", "0", "--dataset", "d", "--out", "o"],
    ["make-demo-model", "--steps", "0", "--out", "o"], ["patch", "--n", "0", "--out", "o"],
    ["circuit", "--node-threshold", "-1", "--out", "o"], ["closed-form", "--sae", "s", "--dataset", "d",
                                                          "--out", "o", "--fit-fraction", "1"],
    ["substitute", "--sae", "s", "--dataset", "d", "--out", "o", "--contexts", "0"],
    ["edit-atoms", "--atoms", "-3", "--out", "o"], ["no-such-command"],
    ["train", "--out", "o", "--no-such-option"], ["hooks", "--no-such-option", "x"]])  # named by subcommand
def test_bad_arguments_are_one_line_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line_error(capsys.readouterr().err, argv[0] if argv[0] != "no-such-command" else "")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["circuit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 16)" in out and "(default: 0.02)" in out and "--debug" in out


def test_paths_datasets_and_saes_are_checked_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("def f(x):\n    return x\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    out = str(tmp_path / "out")
    sae = "writesae-demo:L4.H0.write"
    cases = [
        (["demo", "--out", str(tmp_path / "afile" / "sub")], "demo", "not a directory"),
        (["hooks", "--model", str(tmp_path / "no-such-model")], "hooks", "no such model directory"),
        (["hooks", "--model", str(tmp_path)], "hooks", "no config.json"),
        (["substitute", "--sae", sae, "--dataset", str(tmp_path / "empty.txt"), "--out", out], "substitute", "empty"),
        (["substitute", "--sae", sae, "--dataset", str(tmp_path / "latin1.txt"), "--out", out], "substitute",
         "not UTF-8"),
        (["attribute", "--sae", sae, "--dataset", str(tmp_path / "rows.jsonl"), "--out", out], "attribute",
         "--text-column"),
        (["attribute", "--sae", sae, "--dataset", str(tmp_path / "nope.txt"), "--out", out], "attribute",
         "no such file"),
        (["closed-form", "--sae", "writesae-demo:L9.H9.write", "--dataset", str(tmp_path / "ok.txt"), "--out", out],
         "closed-form", "has no SAE 'L9.H9.write'"),
        (["closed-form", "--sae", str(tmp_path), "--dataset", str(tmp_path / "ok.txt"), "--out", out],
         "closed-form", "no cfg.json"),
        (["closed-form", "--sae", sae, "--dataset", str(tmp_path / "ok.txt"), "--out", out, "--atoms", "512"],
         "closed-form", "out of range"),
        (["closed-form", "--sae", sae, "--dataset", str(tmp_path / "ok.txt"), "--out", out, "--t0", "200"],
         "closed-form", "--t0"),
        (["patch", "--out", out, "--task", "copy", "--length", "12", "--source-pos", "11"], "patch", "--source-pos"),
        (["path-patch", "--layer", "2", "--out", out], "path-patch", "go together"),
        (["train", "--model", str(mamba), "--layer", "0", "--write-mode", "delta", "--dataset",
          str(tmp_path / "ok.txt"), "--out", out], "train", "--write-mode raw"),
        (["train", "--layer", "0", "--k", "64", "--d-sae", "32", "--dataset", str(tmp_path / "ok.txt"),
          "--out", out], "train", "--k"),
    ]
    for argv, cmd, needle in cases:
        assert main(argv) == 2, argv
        line = _one_line_error(capsys.readouterr().err, cmd)
        assert needle in line, (argv, line)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError):  # --debug: the exception itself, with its traceback
        main(["--debug", "hooks", "--model", str(tmp_path / "no-such-model")])
    assert "torch" in sys.modules  # (the test process imported it elsewhere; the subprocess test checks the CLI)


def test_sae_of_another_model_is_refused_after_loading_before_running(tmp_path, capsys):
    """A Mamba-2 SAE on the GDN demo model: a clear mismatch, not a KeyError deep in the experiment."""
    from writesae_plugin.demo.run import demo_model_dir

    (tmp_path / "ok.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    sae = "writesae-demo-mamba2:L3.H1.write"
    assert main(["closed-form", "--model", str(demo_model_dir()), "--sae", sae, "--dataset",
                 str(tmp_path / "ok.txt"), "--out", str(tmp_path / "cf"), "--contexts", "2"]) == 2
    line = _one_line_error(capsys.readouterr().err, "closed-form")
    assert "does not fit this model" in line and "family mamba2" in line and "layer 3" in line
    assert main(["patch", "--sae", sae, "--n", "2", "--length", "12", "--out", str(tmp_path / "p")]) == 2
    assert "does not fit" in _one_line_error(capsys.readouterr().err, "patch")
    assert main(["path-patch", "--layer", "2", "--head", "99", "--n", "2", "--out", str(tmp_path / "pp")]) == 2
    assert "--head 99" in _one_line_error(capsys.readouterr().err, "path-patch")
    assert not (tmp_path / "cf").exists() and not (tmp_path / "p").exists()


def test_cli_mamba2_model_types_match_the_adapters():
    from writesae_plugin.adapters import MAMBA2_MODEL_TYPES as ADAPTER_TYPES

    assert set(MAMBA2_MODEL_TYPES) == set(ADAPTER_TYPES)


def test_errors_while_running_are_one_line(tmp_path, capsys, monkeypatch):
    import writesae_plugin.cli as cli

    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser(), "demo", boom))
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1
    line = _one_line_error(capsys.readouterr().err, "demo")
    assert "RuntimeError: kernel exploded second line" in line and "--debug" in line


def _with(parser, name, func):
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    sub.choices[name].set_defaults(func=func)
    return parser


def _subparsers():
    from writesae_plugin.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return sub.choices


def test_every_default_is_in_help(capsys):
    """Every option with a default says it in --help (argparse prints nothing for an option without help text)."""
    import argparse

    missing = []
    for name, p in _subparsers().items():
        fmt = p._get_formatter()
        for action in p._actions:
            if action.required or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            if not action.help or "%(default)" not in fmt._get_help_string(action):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 16)", "(default: 3e-4)" if "3e-4" in out else "(default: 0.0003)", "(default: 512000)",
                  "(default: topk)", "(default: state)", "(default: 90,5,5)", "(default: auto)"):
        assert shown in out, shown


def test_cli_splits_match_the_data_module():
    from writesae_plugin import cli, data

    assert cli.SPLITS == data.SPLITS and cli.TXT_DOCUMENTS == data.TXT_DOCUMENTS
    required = {"substitute": ["--sae", "s", "--dataset", "d"], "closed-form": ["--sae", "s", "--dataset", "d"],
                "attribute": ["--sae", "s", "--dataset", "d"], "dashboard": ["--sae", "s", "--dataset", "d"],
                "install": ["--dataset", "d", "--layer", "0", "--head", "0"], "extract": ["--dataset", "d"]}
    for name, p in _subparsers().items():  # the default (shown in --help as percentages) parses to data's fractions
        if any(a.dest == "splits" for a in p._actions):
            args = p.parse_args(["--out", "o", *required.get(name, [])])
            assert args.splits == data.DEFAULT_SPLIT_FRACTIONS, name


def test_splits_help_and_values_agree(capsys):
    """--help says percentages and shows the default as percentages; percentages are what it takes (fractions
    summing to 1 are read as fractions); anything else is refused."""
    from writesae_plugin.cli import split_shares

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--splits TRAIN,VAL,TEST percentages" in out and "(default: 90,5,5)" in out
    assert split_shares("80,10,10") == pytest.approx((0.8, 0.1, 0.1))
    assert split_shares("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("80,10", "80,10,5", "0.8,0.1,0.05", "-10,60,50"):
        with pytest.raises(Exception, match="summing to 100"):
            split_shares(bad)


def test_experiments_default_to_the_test_split_with_split_and_offset(tmp_path, tiny_tokenizer):
    """substitute / closed-form / install / attribute read --contexts of the test split (documents never used
    for training or validation), after --offset; --split changes it. The prompt commands default to test too."""
    from types import SimpleNamespace

    from writesae_plugin.cli import _contexts, build_parser
    from writesae_plugin.data import split_contexts, split_documents

    docs = [f"doc {i}: " + "alpha beta gamma " * (1 + i % 4) for i in range(400)]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    parser = build_parser()
    base = ["--dataset", str(tmp_path / "d.txt"), "--out", "o", "--contexts", "3", "--context-length", "16"]
    for cmd in (["substitute", "--sae", "s"], ["closed-form", "--sae", "s"], ["attribute", "--sae", "s"],
                ["install", "--layer", "0", "--head", "0"]):
        args = parser.parse_args(cmd + base)
        assert (args.split, args.offset, args.splits) == ("test", 0, (0.9, 0.05, 0.05)), cmd
    for cmd in ("patch", "attribution-patch", "path-patch", "circuit", "edit-atoms"):
        assert parser.parse_args([cmd, "--out", "o"]).split == "test", cmd
    model = SimpleNamespace(tokenizer=tiny_tokenizer)
    args = parser.parse_args(["substitute", "--sae", "s"] + base)
    got = _contexts(model, args)
    stream = [c for c in split_contexts(docs, tiny_tokenizer, 16, "test")]
    assert got.shape == (3, 16) and all((got[i] == stream[i]).all() for i in range(3))
    test_text = "".join(split_documents(docs, "test"))
    for row in got:  # only test-split documents (EOS between them)
        assert all(piece in test_text for piece in tiny_tokenizer.decode(row.tolist()).split("<|endoftext|>"))
    shifted = _contexts(model, parser.parse_args(["substitute", "--sae", "s", "--offset", "2"] + base))
    assert (shifted[0] == stream[2]).all()
    val = _contexts(model, parser.parse_args(["substitute", "--sae", "s", "--split", "validation"] + base))
    assert (val[0] == next(split_contexts(docs, tiny_tokenizer, 16, "validation"))).all()
    with pytest.raises(UsageError, match="after --offset 100000"):
        _contexts(model, parser.parse_args(["substitute", "--sae", "s", "--offset", "100000"] + base))
    with pytest.raises(SystemExit):
        parser.parse_args(["substitute", "--sae", "s", "--splits", "90,5"] + base)


FLA = pytest.mark.skipif(not __import__("importlib.util").util.find_spec("fla"),
                         reason="needs the [fla] extra (scripts/setup.sh installs it)")


def test_fla_cpu_warning_filter_is_exact():
    """The commands and route_cpu_to_torch silence fla's CPU-platform warning, raised by fla's own modules, and no
    other warning: the same text from another module, or another fla warning, still shows."""
    import warnings

    from writesae_plugin import cli
    from writesae_plugin.adapters import fla_cpu

    assert cli.FLA_CPU_WARNING == fla_cpu.FLA_CPU_WARNING  # the CLI mirrors it (it imports no adapters while parsing)
    text = "Triton is not supported on current platform, roll back to CPU."
    for silenced in (cli.expected_warnings_silenced, fla_cpu.fla_cpu_warning_silenced):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with silenced():
                warnings.warn_explicit(text, UserWarning, "hardware.py", 62, module="fla.utils.hardware")
                warnings.warn_explicit(text, UserWarning, "mine.py", 1, module="mypackage.hardware")
                warnings.warn_explicit("Triton is not supported; something else", UserWarning, "hardware.py", 9,
                                       module="fla.utils.hardware")
                warnings.warn_explicit(text, DeprecationWarning, "hardware.py", 7, module="fla.utils.hardware")
            warnings.warn_explicit(text, UserWarning, "hardware.py", 62, module="fla.utils.hardware")  # outside
        shown = [(str(w.message), w.filename) for w in caught]
        assert shown == [(text, "mine.py"), ("Triton is not supported; something else", "hardware.py"),
                         (text, "hardware.py"), (text, "hardware.py")], silenced


@FLA
def test_importing_fla_through_the_project_prints_no_cpu_warning():
    """A fresh process on this CPU machine: route_cpu_to_torch (what hook_model and every command call to import
    fla) prints no "Triton is not supported" warning, while other warnings still print."""
    code = ("import warnings\nfrom writesae_plugin.adapters import route_cpu_to_torch\n"
            "assert route_cpu_to_torch()\nimport fla\nwarnings.warn('another warning')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Triton is not supported" not in r.stderr and "another warning" in r.stderr, r.stderr


def test_hook_inventory_shapes_use_distinct_explained_symbols(tmp_path):
    """Every family's hook inventory (what `writesae hooks` prints): within a shape no symbol stands for two axes
    (hook_state's captured positions are p_s, not Mamba-2's head_dim P), and every symbol is one SHAPE_SYMBOLS
    explains (the legend `writesae hooks` prints)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import load_tiny
    from tiny_mamba_models import build_tiny_mamba
    from tiny_recurrent_models import build_tiny_kimi, build_tiny_xlstm

    from writesae_plugin.adapters import hook_model
    from writesae_plugin.adapters.base import SHAPE_SYMBOLS, shape_symbols

    builders = {"qwen3_5": lambda: load_tiny(tmp_path, "qwen3_5"), "mamba2": lambda: build_tiny_mamba("mamba2"),
                "xlstm": build_tiny_xlstm, "kimi_linear": build_tiny_kimi}
    if __import__("importlib.util").util.find_spec("fla"):
        from tiny_fla_models import build_tiny_deltanet, build_tiny_gla

        builders.update(delta_net=build_tiny_deltanet, gla=build_tiny_gla)
    for family, build in builders.items():
        inventory = dict(hook_model(build()).hook_inventory())
        layer = next(n for n in inventory if n.endswith("hook_state")).rsplit(".", 1)[0]
        for name, desc in inventory.items():
            symbols = shape_symbols(desc)
            if name.startswith(layer + ".hook_write") or name.endswith(("hook_state", "hook_read", "hook_query")):
                assert symbols, (family, name, desc)  # the canonical hooks all state their shape
            assert len(set(symbols)) == len(symbols), (family, name, desc)
            assert set(symbols) <= set(SHAPE_SYMBOLS), (family, name, desc)
        state = shape_symbols(inventory[layer + ".hook_state"])
        assert state[1:3] == ["p_s", "H_s"], (family, state)


def test_every_command_defaults_to_the_shipped_demo_model():
    """Every --model that may be left out means the shipped Gated DeltaNet demo model (not a random-init model), and
    its help says so; _load(None) loads exactly that model."""
    from writesae_plugin import cli
    from writesae_plugin.demo.run import demo_model_dir

    assert cli.DEMO_MODEL == demo_model_dir().resolve()
    commands = []
    for name, p in _subparsers().items():
        for action in p._actions:
            if action.dest == "model" and not action.required:
                assert action.default is None and "the shipped Gated DeltaNet demo model" in action.help, name
                commands.append(name)
    assert {"hooks", "train", "extract", "substitute", "closed-form", "install", "attribute", "dashboard", "patch",
            "circuit"} <= set(commands)
    model, desc = cli._load(None)
    assert desc == str(cli.DEMO_MODEL) and model.tokenizer is not None
    assert model.hf_model.config.model_type == "qwen3_5_text" or "qwen3_5" in model.hf_model.config.model_type


def test_hooks_shows_progress_and_torch_threads_wait_passively():
    """`writesae hooks` (on the shipped model, its default) shows a progress bar on stderr, and the command sets
    OMP_WAIT_POLICY=PASSIVE before torch loads (spinning OpenMP threads made its self-check ~10x slower on a busy
    2-core machine); a policy the user set is kept."""
    code = ("import os, sys\nfrom writesae_plugin import cli\nassert 'torch' not in sys.modules\n"
            "rc = cli.main(['hooks', '--length', '12', '--batch', '1'])\n"
            "print('policy', os.environ.get('OMP_WAIT_POLICY'), rc)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "policy PASSIVE 0" in r.stdout and "all checks passed" in r.stdout
    assert "self-check: 100%" in r.stderr and "check/s" in r.stderr  # the bar, on stderr
    assert "Triton is not supported" not in r.stderr  # (the [fla] extra's CPU warning stays silent)
    quick = code.replace("['hooks', '--length', '12', '--batch', '1']", "['hooks', '--model', '/no/such/model']")
    r = subprocess.run([sys.executable, "-c", quick], capture_output=True, text=True,
                       env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, timeout=600)
    assert "policy ACTIVE 2" in r.stdout, (r.stdout, r.stderr)
