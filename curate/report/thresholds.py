"""The score thresholds a filter step applied, read from its resolved settings (`_config.yaml`)
and interpreted by the filter's own rule table (`curate.metadata.filter.RULES`: which column a
rule tests and which way), so the report draws exactly what the filter did."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.metadata.filter import RULES

SCORE_COLUMNS = ("aesthetic", "pwatermark", "punsafe", "similarity")  # LAION's score columns


@dataclass(frozen=True)
class Threshold:
    rule: str  # filter setting and ledger reason, e.g. "watermark"
    column: str  # LAION column it tests, e.g. "pwatermark"
    value: float
    keep_high: bool  # True: rows with column >= value are kept; False: rows with column <= value

    @property
    def keep_text(self) -> str:
        return f"keep {self.column} {'≥' if self.keep_high else '≤'} {self.value:g}"

    def side_text(self, side: str) -> str:
        """"kept (aesthetic ≥ 4.5)" / "dropped (aesthetic < 4.5)"."""
        op = ("≥" if self.keep_high else "≤") if side == "kept" else ("<" if self.keep_high else ">")
        return f"{side} ({self.column} {op} {self.value:g})"

    def drop_sql(self, expr: str) -> str:
        """SQL true for the values of `expr` the rule drops."""
        return f"{expr} {'<' if self.keep_high else '>'} {self.value!r}"


def score_thresholds(settings: dict[str, Any]) -> list[Threshold]:
    """The active rules of a filter's settings that test one score column, in rule order."""
    out = []
    for name, rule in RULES.items():
        value = settings.get(name)
        # a rule on one score column as it is (its SQL is the bare column: "{0}")
        if value is None or rule.value != "{0}" or len(rule.columns) != 1 or rule.columns[0] not in SCORE_COLUMNS:
            continue
        out.append(Threshold(name, rule.columns[0], float(value), keep_high=rule.op == "<"))
    return out
