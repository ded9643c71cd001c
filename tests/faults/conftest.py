"""The fault-injection suite: every long-running command is killed at random points (and has a
Ray worker killed mid-task), rerun, and compared with an uninterrupted run. See harness.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "curate"))  # httpserver, image shard helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # the code-shard folder writer
