"""Output safety (DESIGN §10): file modes follow the umask, nothing blipctl did not write is deleted, a full disk
during a checkpoint is reported and cleaned up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import micro_config, micro_tokenizer

from blip.atomic import write_json
from blip.checkpoint import export_hf, save_checkpoint
from blip.model.blip import BLIP


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    tok = micro_tokenizer()
    return BLIP(micro_config(tok)), tok


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_take_the_umask(tmp_path: Path, micro, umask: int):
    """Files 0666 & ~umask and directories 0777 & ~umask, like cp or tar (mkstemp/mkdtemp would give 0600/0700)."""
    model, tok = micro
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        ck = save_checkpoint(model, tok, tmp_path / "ck")
        hf, _ = export_hf(model, tok, tmp_path / "hf")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask
    for d in (ck, hf):
        assert _mode(d) == 0o777 & ~umask, d
        for f in d.iterdir():
            assert _mode(f) == 0o666 & ~umask, f
