"""Every command and snippet of the README is run (or, where a run is too slow, checked at --help level) here.

How the README is covered, and what makes this file fail when the README changes:

* ``python`` blocks: executed verbatim, in README order, in one namespace, with the few substitutions listed
  in ``PY_BLOCKS`` (each must still match the README text, or the test fails). Names the README leaves to the
  reader are bound first: ``path`` = a tiny random-init Qwen3.5 saved with a tokenizer (``tests/tiny_models.py``),
  ``tokens`` = random ids ``[2, 40]``, ``u``/``w`` = random key/value sides ``[d_k]``/``[d_v]``. ``out/final``
  is the SAE that the README's own ``writesae train`` command (below, small sizes) wrote into the working
  directory. The mamba-ssm block runs on the CPU stand-in ``tests/fake_mamba_ssm.py`` (the real package needs
  CUDA). Adding, removing or reordering a python block fails ``test_every_python_block_is_mapped``.
* ``bash`` blocks: exactly the two set-up commands. They are not run here (one is this test suite itself);
  the test command must be the one ``.ci/run`` runs, the demo command must use the same set-up, and
  ``writesae demo`` must be run by ``tests/test_demo.py``.
* ``sh`` blocks (the torchrun commands of "Scaling out"): each command's ``writesae`` part is checked against its
  ``--help`` here (flags and values); ``tests/test_distributed.py`` runs the same commands with 2 ranks.
* inline ``writesae ...`` commands: every distinct one must be a key of ``COMMANDS`` (and every key must still
  be in the README). ``run`` entries execute the README command through ``writesae_plugin.cli.main`` in
  process, with placeholders bound (``M``/``DIR`` tiny model, ``S`` the trained SAE, ``D``/``corpus.txt`` a
  small text file, ``R``/``out/`` a temp dir, ``L``/``H`` = 1/2) and small sizes appended. ``help`` entries
  are too slow to run here (training a demo model, a demo release, ACDC, the full demo): their flags and
  choices are checked against ``writesae <cmd> --help``; ``writesae demo`` itself runs in ``test_demo.py``.
* backticked repository paths (``adapters/ops.py``, notebook names, ...) must exist and dotted
  ``writesae_plugin.*`` names must resolve.
"""

from __future__ import annotations

import contextlib
import importlib
import linecache
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import LINEAR_KEY_HEAD_DIM, LINEAR_VALUE_HEAD_DIM, make_tiny_model  # noqa: E402

from writesae_plugin.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


PROSE = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)  # the README without its fenced blocks


def inline_commands() -> list[str]:
    """Distinct inline ``writesae ...`` commands (code spans, possibly wrapped over two lines)."""
    spans = re.findall(r"`([^`]+)`", PROSE.replace("\n", " "))
    seen = []
    for s in spans:
        s = " ".join(s.split())
        if s.startswith("writesae ") and s not in seen:
            seen.append(s)
    return seen


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this file runs (restored after): on a shared, busy CPU two threads made the
    commands here up to 5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with a tiny Qwen3.5 (+ tokenizer), a small corpus and ``out/`` from the README's
    ``writesae train`` command (small sizes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("readme")
    text = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1", "import torch",
            "hello world, recurrent models write matrices", "x = f('a b') + f(\"c d\")"] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=240, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_dir = root / "model"
    make_tiny_model("qwen3_5", model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
                            ).save_pretrained(model_dir)
    # 500 one-paragraph documents (446 train, 29 validation, 25 test)
    (root / "corpus.txt").write_text("\n\n".join(f"{t} {i}" for i, t in enumerate(text * 5)))
    cmd = _readme_command("writesae train --model DIR --layer 1")  # the single-dictionary command (out/final)
    argv = _bind(cmd, root) + ["--d-sae", "64", "--k", "4", "--total-samples", "1024", "--batch-size", "256",
                               "--context-length", "32", "--val-contexts", "2", "--val-every", "2", "--aux-k", "8"]
    with _cwd(root):
        assert main(argv) == 0, cmd
    assert (root / "out" / "final" / "cfg.json").is_file()
    return root


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _readme_command(prefix: str) -> str:
    found = [c for c in inline_commands() if c == prefix or c.startswith(prefix + " ")]
    assert found, f"the README no longer has a `{prefix} ...` command"
    return max(found, key=len)


PLACEHOLDERS = {"M": "model", "DIR": "model", "S": "out/final", "D": "corpus.txt", "corpus.txt": "corpus.txt",
                "R": "results-{cmd}", "out/": "out/", "L": "1", "H": "2"}


def _bind(cmd: str, root: Path) -> list[str]:
    """The README command as argv for ``main`` (without ``writesae``), placeholders bound under ``root``."""
    argv = shlex.split(cmd)[1:]
    out = []
    for a in argv:
        if a in PLACEHOLDERS:
            v = PLACEHOLDERS[a].format(cmd=argv[0])
            a = v if v.isdigit() else str(root / v)
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------------ python blocks
def _use_setup(ns, work):
    g = torch.Generator().manual_seed(0)
    ns.update(path=str(work / "model"), tokens=torch.randint(0, 240, (2, 40), generator=g),
              u=torch.randn(LINEAR_KEY_HEAD_DIM, generator=g), w=torch.randn(LINEAR_VALUE_HEAD_DIM, generator=g))


def _use_check(ns, work):
    model, tokens, cache = ns["model"], ns["tokens"], ns["cache"]
    assert "blocks.1.linear_attn.hook_write" in cache and "blocks.1.linear_attn.hook_state" in cache
    clean = model(tokens)
    edited = model.run_with_edits(tokens, [ns["WriteEdit"](layer=1, pos=30, head=2, key=ns["u"], value=ns["w"])])
    assert torch.equal(edited[:, :30], clean[:, :30]) and not torch.equal(edited[:, 30:], clean[:, 30:])
    nn_logits = ns["logits"]  # the nnsight edit of the key factor alone
    assert torch.equal(nn_logits[:, :30], clean[:, :30]) and not torch.equal(nn_logits[0, 30:], clean[0, 30:])
    assert torch.equal(nn_logits[1], clean[1])
    ns["clean"] = clean
    assert ns["ids"].shape == (2, model.to_tokens(["def f(x):", "the quick brown fox jumps"]).shape[1] + 8)
    assert ns["hf_twin"] is not model.hf_model and torch.equal(ns["hf_twin"](tokens).logits, clean)


def _sae_check(ns, work):
    assert torch.equal(ns["logits"], ns["clean"])  # "== clean logits, bit for bit" (with the error term)
    assert "blocks.1.linear_attn.hook_write.hook_sae_acts_post" in ns["cache"]
    assert "blocks.1.linear_attn.hook_write" in ns["model"].acts_to_saes  # add_sae spliced it
    ns["model"].reset_saes()


def _mamba_setup(ns, work):
    import fake_mamba_ssm

    ns.update(tok=None, tokens=torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1)),
              tiny_mamba_ssm=fake_mamba_ssm.tiny_mamba_ssm)


def _mamba_check(ns, work):
    from fake_mamba_ssm import unfused_copy

    model, tokens = ns["model"], ns["tokens"]
    with torch.no_grad():  # the same tiny model (seed 0), never hooked
        full = unfused_copy(ns["tiny_mamba_ssm"]())(torch.cat([tokens, ns["next_id"]], 1)).logits
    assert torch.allclose(ns["logits"], full[:, :-1], atol=1e-5)
    assert torch.allclose(ns["next_logits"][:, -1], full[:, -1], atol=1e-5)
    assert "blocks.1.mixer.hook_write_key" in model.hook_dict


#: README python blocks in order: (first line, substitutions (README text -> run text), set-up, check)
PY_BLOCKS = [
    ("from transformers import AutoModelForCausalLM, AutoTokenizer", {}, _use_setup, _use_check),
    ("import writesae_plugin", {}, None, _sae_check),
    ("from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel", {
        # mamba-ssm needs CUDA: its CPU stand-in with the same classes, and a tiny random model
        "from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel":
            "from fake_mamba_ssm import MambaLMHeadModel",
        'MambaLMHeadModel.from_pretrained("state-spaces/mamba2-370m", device="cuda")': "tiny_mamba_ssm()",
    }, _mamba_setup, _mamba_check),
]


def test_every_python_block_is_mapped():
    blocks = code_blocks("python")
    assert len(blocks) == len(PY_BLOCKS), "a README python block was added or removed: map it in PY_BLOCKS"
    for block, (first, subs, _, _) in zip(blocks, PY_BLOCKS):
        assert block.splitlines()[0].startswith(first), "README python blocks changed order: update PY_BLOCKS"
        for old in subs:
            assert old in block, f"substitution target no longer in the README: {old!r}"


def test_python_blocks_run_in_order(work):
    test_every_python_block_is_mapped()
    ns: dict = {"__name__": "readme"}
    with _cwd(work), torch.no_grad():
        for i, (block, (_, subs, setup, check)) in enumerate(zip(code_blocks("python"), PY_BLOCKS)):
            for old, new in subs.items():
                block = block.replace(old, new)
            if setup:
                setup(ns, work)
            name = f"<README python block {i}>"  # nnsight reads a trace's source back through linecache
            linecache.cache[name] = (len(block), None, block.splitlines(True), name)
            exec(compile(block, name, "exec"), ns)
            check(ns, work)


# -------------------------------------------------------------------------------------------------- bash blocks
def test_setup_commands_are_the_ones_ci_and_the_demo_test_run():
    blocks = [b.strip() for b in code_blocks("bash")]
    demo, tests = "bash scripts/setup.sh && .venv/bin/writesae demo", "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert blocks == [demo, tests], "the README keeps exactly two set-up commands: the main job and the tests"
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci  # not run here: it is this very test suite
    assert demo.split("&&")[0] == tests.split("&&")[0]  # the same set-up
    assert 'writesae = "writesae_plugin.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert 'main(["demo"' in (ROOT / "tests" / "test_demo.py").read_text()  # `writesae demo` runs there


# -------------------------------------------------------------------------------------------- inline commands
SMALL = ["--contexts", "2", "--context-length", "24"]
PAIRS = ["--n", "2", "--length", "24"]
#: README command -> ("run", extra argv appended to the bound README command) | ("help", reason)
COMMANDS = {
    "writesae hooks": ("run", ["--length", "40", "--batch", "1"]),
    "writesae train --model DIR --layer 1 --head 2 --site write --dataset corpus.txt --out out/":
        ("run", None),  # run by the `work` fixture (its SAE feeds the python blocks)
    "writesae train": ("run", None),
    "writesae extract --model DIR --layers 1,2 --heads all --site write --dataset corpus.txt --out store/":
        ("run", ["--contexts", "12", "--context-length", "32", "--contexts-per-shard", "8", "--forward-batch", "4"]),
    "writesae train --store store/ --layer 1 --head 2 --site write --out out2/":
        ("run", ["--val-contexts", "2", "--total-samples", "128", "--batch-size", "32", "--d-sae", "32", "--k", "4",
                 "--aux-k", "8", "--val-every", "2"]),
    "writesae train --model DIR --layers 1,2 --heads all --site write --dataset corpus.txt --out cells-out/":
        ("run", ["--val-contexts", "2", "--total-samples", "96", "--batch-size", "32", "--d-sae", "16", "--k", "4",
                 "--aux-k", "8", "--val-every", "2", "--context-length", "24"]),
    "writesae substitute --model M --sae S --dataset D --out R": ("run", SMALL + ["--max-firings", "6"]),
    "writesae closed-form --model M --sae S --dataset D --out R": ("run", SMALL + ["--n-tokens", "2"]),
    "writesae install --model M --dataset D --out R --layer L --head H":
        ("run", SMALL + ["--strata", "3-10", "--targets", "1", "--new-tokens", "3"]),
    "writesae attribute --model M --sae S --dataset D --out R": ("run", SMALL + ["--max-per-atom", "2"]),
    "writesae dashboard --model M --sae S --dataset D --out R":
        ("run", SMALL + ["--max-pages", "2", "--effect-firings", "1", "--value-firings", "1"]),
    # the circuit commands default to the shipped model and release
    "writesae patch": ("run", PAIRS),
    "writesae attribution-patch": ("run", PAIRS),
    "writesae path-patch": ("run", PAIRS + ["--layer", "4", "--head", "0"]),
    "writesae edit-atoms": ("run", PAIRS + ["--atoms", "0", "--controls", "2"]),
    "writesae circuit": ("help", "edges + ACDC take over a minute even at --n 2"),
    "writesae demo": ("help", "run end to end by tests/test_demo.py (--quick)"),
    "writesae demo --arch qwen3_5": ("help", "one architecture of the demo; the demo runs in tests/test_demo.py"),
    "writesae demo --arch mamba2": ("help", "one architecture of the demo; the demo runs in tests/test_demo.py"),
    "writesae make-demo-model": ("help", "trains a tokenizer and a model: about a minute even at --steps 1"),
    "writesae make-demo-model --arch mamba2": ("help", "as make-demo-model"),
    "writesae make-demo-release --model DIR": ("help", "trains the shipped SAE release (many minutes)"),
}


def test_every_inline_command_is_mapped():
    readme = set(inline_commands())
    assert readme - set(COMMANDS) == set(), "README commands not covered: add them to COMMANDS"
    assert set(COMMANDS) - readme == set(), "COMMANDS lists commands the README no longer has"


RUN = [c for c, (how, extra) in COMMANDS.items() if how == "run" and extra is not None]
HELP = [c for c, (how, _) in COMMANDS.items() if how == "help"]


@pytest.mark.parametrize("cmd", RUN)
def test_readme_command_runs(cmd, work, capsys):
    argv = _bind(cmd, work)
    if "--out" not in argv and argv[0] != "hooks":
        argv += ["--out", str(work / ("results-" + argv[0]))]
    with _cwd(work):
        if "--store" in argv and not (work / "store" / "manifest.json").exists():  # run alone: extract first
            extract = _readme_command("writesae extract")
            assert main(_bind(extract, work) + COMMANDS[extract][1]) == 0
        assert main(argv + COMMANDS[cmd][1]) == 0, cmd
    if cmd == "writesae hooks":
        out = capsys.readouterr().out
        assert "hook_write_key" in out and "all checks passed" in out


@pytest.mark.parametrize("cmd", HELP)
def test_readme_command_matches_its_help(cmd, capsys):
    """Too slow to run here (reason in COMMANDS): its subcommand, flags and values must be what --help offers."""
    argv = shlex.split(cmd)[1:]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])  # argparse checks each flag's value (choices, types) before reaching --help
    assert exc.value.code == 0, cmd
    help_text = capsys.readouterr().out
    for a in argv[1:]:
        if a.startswith("--"):
            assert a in help_text, f"{cmd}: {a} is not an option of `writesae {argv[0]}`"


def torchrun_commands() -> list[str]:
    lines = [ln.strip() for block in code_blocks("sh") for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/torchrun ")]


def shell_commands() -> list[str]:
    """Every shell command the README gives to run as is: the lines of its bash and sh blocks (each part of an
    ``&&`` chain) and inline code spans that start with a program path or ``pip``/``python``/``torchrun``."""
    lines = [ln.strip() for lang in ("bash", "sh") for block in code_blocks(lang) for ln in block.splitlines()]
    cmds = [part.strip() for ln in lines if ln and not ln.startswith("#") for part in ln.split("&&")]
    spans = {" ".join(s.split()) for s in re.findall(r"`([^`]+)`", PROSE.replace("\n", " "))}
    return cmds + sorted(s for s in spans if re.match(r"\.venv/bin/\S+( |$)|(pip|python|torchrun|bash|source) ", s))


def test_shell_commands_run_as_written_after_the_setup():
    """After `bash scripts/setup.sh` (which made the environment these tests run in) each command's program
    exists as written: the environment's programs by their `.venv/bin/` path (none by a bare name that only an
    activated environment would find), scripts by their path; bare `writesae ...` commands are explained."""
    bin_dir = Path(sys.prefix) / "bin"  # the set-up's .venv (the README's test command runs the tests from it)
    for cmd in shell_commands():
        prog = shlex.split(cmd)[0]
        if prog == "bash":
            assert (ROOT / shlex.split(cmd)[1]).is_file(), cmd
        elif prog == "source":
            assert (ROOT / shlex.split(cmd)[1]).is_file() or shlex.split(cmd)[1] == ".venv/bin/activate", cmd
        else:
            assert prog.startswith(".venv/bin/"), f"README command needs the environment's path: {cmd}"
            assert (bin_dir / prog.removeprefix(".venv/bin/")).is_file(), f"the set-up installs no {prog}: {cmd}"
    assert len(torchrun_commands()) == 4
    assert "run as `.venv/bin/writesae ...`" in " ".join(PROSE.split())  # the note on the bare writesae commands


def test_torchrun_commands_match_their_help(capsys):
    cmds = torchrun_commands()
    assert len(cmds) == 4, cmds  # extract, train --parallel cells / data, several nodes
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[argv.index("-m") + 1] == "writesae_plugin.cli", cmd
        sub = [a for a in argv[argv.index("-m") + 2:] if a != "..."]
        with pytest.raises(SystemExit) as exc:
            main(sub + ["--help"])
        assert exc.value.code == 0, cmd
        help_text = capsys.readouterr().out
        assert all(a in help_text for a in sub[1:] if a.startswith("--")), cmd


# ------------------------------------------------------------------------------------ paths and names it cites
TOP = ("adapters/", "writesae_plugin/", "tests/", "scripts/", "benchmarks/", "notebooks/", "docs/")


def test_cited_paths_and_names_exist():
    spans = {" ".join(s.split()) for s in re.findall(r"`([^`]+)`", PROSE.replace("\n", " "))}
    spans |= set(re.findall(r"\]\(([^)]+)\)", README))  # markdown links
    missing = []
    for s in spans:
        if s.startswith(TOP) and " " not in s and not s.startswith("writesae_plugin."):
            if not (ROOT / s).exists():
                missing.append(s)
        elif s.endswith(".ipynb") and "/" not in s and not (ROOT / "notebooks" / s).exists():
            missing.append(s)
        elif s.endswith(".py") and "/" not in s.strip("/") and " " not in s and s[0].isalpha():
            if not any(ROOT.glob(f"*/{s}")) and not any(ROOT.glob(f"*/*/{s}")):
                missing.append(s)
        if re.fullmatch(r"[\w./-]+\.(md|py|ipynb)", s) and "/" in s:  # a relative link must stay in the repository
            target = (ROOT / s).resolve()
            if ROOT not in target.parents or not target.exists():
                missing.append(s)
    assert not missing, f"the README cites files that do not exist in the repository: {sorted(set(missing))}"
    for name in re.findall(r"`(writesae_plugin(?:\.\w+)+)", README):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for p in parts[i:]:
                obj = getattr(obj, p)
            break
        else:
            raise AssertionError(name)


def test_delta_writes_are_marked_gated_deltanet_only():
    """Mamba-2 refuses ``write_mode="delta"`` (its two writes coincide): every README mention of the delta write
    mode says, within two lines, that it is for Gated DeltaNet."""
    lines = README.splitlines()
    for i, line in enumerate(lines):
        if re.search(r'write_mode="delta"|--write-mode delta|delta writes', line):
            near = " ".join(lines[max(0, i - 2): i + 3])
            assert "Gated DeltaNet" in near, f"README line {i + 1}: delta writes without 'Gated DeltaNet only'"


def test_nothing_cites_the_team_spec_users_do_not_have():
    """The method document users get is docs/method.md; the team's working spec is not in the repository or
    the package, so no source, test, notebook or doc may point at it."""
    banned = ("MATH" + ".md", "shared/" + "docs")
    skip = {".venv", ".git", "build", "dist", "writesae_results", "results", "__pycache__", "node_modules"}
    hits = []
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        for name in files:
            if Path(name).suffix in {".py", ".md", ".ipynb", ".toml", ".sh", ".cfg", ".txt"}:
                text = Path(dirpath, name).read_text(errors="replace")
                hits += [f"{Path(dirpath, name).relative_to(ROOT)}: {b}" for b in banned if b in text]
    assert not hits, f"cite docs/method.md instead: {hits}"


# ------------------------------------------------------------------------------------ defaults the README states
def _parser_default(command: str, dest: str):
    from writesae_plugin.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    p = sub.choices[command]
    action = next(a for a in p._actions if a.dest == dest)
    return p._get_value(action, action.default) if isinstance(action.default, str) else action.default


def test_defaults_the_readme_states_are_the_code_defaults():
    """Each default the README states (a CLI option's, or a size of the demo and its recipes) is the one the code
    has: a user who runs the command as the README says gets what the README describes."""
    from writesae_plugin.demo.build import DemoRecipe
    from writesae_plugin.demo.release import release_recipe
    from writesae_plugin.demo.run import DemoSize

    prose = " ".join(PROSE.split())
    size, recipe, release = DemoSize(), DemoRecipe(), release_recipe("qwen3_5")
    stated = {  # README text -> (the value it states, the code's)
        "On the shipped GDN model (n = 16 pairs) `writesae patch`": (16, _parser_default("patch", "n")),
        "(`--split`, default train)": ("train", _parser_default("extract", "split")),
        "`--device auto` (the default)": ("auto", _parser_default("train", "device")),
        "(90% / 5% / 5%: `--splits 90,5,5`": ((0.9, 0.05, 0.05), _parser_default("train", "splits")),
        "(default size, 48 held-out contexts of 128 tokens": ((48, 128), (size.contexts, size.context_length)),
        "`writesae demo` (16 held-out contexts of 128 tokens": ((16, 128), (size.dashboard_contexts,
                                                                            size.context_length)),
        "its 24 most frequently firing atoms on the 16 held-out contexts": ((24, 16), (size.dashboard_pages,
                                                                                       size.dashboard_contexts)),
        "at its four strongest firings": (4, size.dashboard_firings),
        "(seed 0, 900 steps of 16 x 256 tokens": ((0, 900, 16, 256), (recipe.seed, recipe.steps, recipe.batch_size,
                                                                      recipe.context_length)),
        "TopK k = 16, 512 atoms": ((16, 512), (release.k, release.d_sae)),
    }
    for text, (readme, code) in stated.items():
        assert text in prose, f"the README no longer says {text!r}: update this test"
        assert readme == code, f"README {text!r}: {readme} but the code's default is {code}"
