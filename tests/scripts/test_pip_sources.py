"""scripts/pip_sources.py: pip's configured package sources become uv flags, each once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pip_sources

SCRIPT = Path(pip_sources.__file__)


def test_every_source_kind_becomes_its_flag_once_in_order() -> None:
    pairs = [("find-links", "/opt/wheels"), ("constraint", "/etc/c.txt"),
             ("extra-index-url", "file:///a/simple file:///b/simple"), ("find-links", "/opt/wheels"),
             ("index-url", "https://mirror/simple"), ("cert", "/etc/ssl/ca.crt"), ("timeout", "180")]
    assert pip_sources.uv_flags(pairs) == [
        "--find-links", "/opt/wheels", "--constraint", "/etc/c.txt", "--extra-index-url", "file:///a/simple",
        "--extra-index-url", "file:///b/simple", "--index-url", "https://mirror/simple"]


def test_reads_pip_config_from_the_environment(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": f"{tmp_path}/w1 {tmp_path}/w2",
           "PIP_EXTRA_INDEX_URL": "file:///x/simple", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, check=True).stdout
    words = out.split()
    flags = sorted(zip(words[::2], words[1::2]))  # pip lists settings in its own order
    assert flags == [("--extra-index-url", "file:///x/simple"), ("--find-links", f"{tmp_path}/w1"),
                     ("--find-links", f"{tmp_path}/w2")]
