"""The curate tests' shared helpers (loopback HTTP server, image shards, metadata rows, tiny
scorer models) live in this folder; the tests in its sub-folders import them by name."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
