"""Tessera core: the leaf package every stage imports (config, run folders, atomic writes,
ledger, code-shard format, VQ wrapper, Ray start-up). It imports no stage package."""
import os

# No hub is reachable on the machines this toolkit targets: fail fast instead of retrying,
# and stop albumentations (pulled in by img2dataset) from asking PyPI for updates on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
