"""The ``writesae`` command."""

import pytest

from writesae_plugin.cli import main


def test_hooks_selfcheck_runs_and_passes(capsys):
    assert main(["hooks", "--length", "70", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.linear_attn.hook_write_key" in out
    assert "capture-only logits vs plain HF" in out and "all checks passed" in out
    assert "FAIL" not in out


def test_bad_arguments():
    assert main(["hooks", "--length", "1"]) == 2
    with pytest.raises(SystemExit):
        main(["no-such-command"])
