"""`r3rl verify-logs LOG [LOG ...]`: the R3 verdict from evidence logs alone, as a regression job uses it.

    r3rl verify-logs rank0.log rank1.log --json verdict.json      # exit 0 pass, 1 fail

It reads the contract lines (r3rl and miles print the same formats), anywhere within a log line, so timestamps and
logger prefixes are fine:
    R3 wrapper: replay_forward branch taken (rank R, n_tokens=N, topk=K, replay_idx_sum=S)   (and replay_backward)
    R3 check (rank R, stage STAGE): n_tokens=N mismatch=M (P%)
    R3 mismatch tokens (N) > threshold (M)                                                   (the check's failure)

Verdict pass iff, over all the logs together (one file per rank, or one file for all ranks):
  - some rank was seen, and every rank seen has a replay_forward and a replay_backward wrapper line with n_tokens > 0
    in total, and at least one check line; every (rank, stage) with check lines checked n_tokens > 0 in total;
  - no check line has mismatch > threshold * n_tokens (the check's own rule), and its P% agrees with M/N;
  - no "R3 mismatch tokens" failure line, and no line that starts a contract line but does not parse.
The threshold is `threshold`, else $R3RL_TEST_R3_THRESHOLD, else $MILES_TEST_R3_THRESHOLD, else 1e-2.

A log that cannot be read is a fail reason (the evidence is missing). A usage mistake is a ValueError, which the
command reports in one line with exit 2, never mistaken for a verdict: a binary file given as a log (a NUL byte in
its first 64 KiB), a --threshold outside [0, 1], a --json path that is a directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from r3rl.check import Stage, resolve_threshold
from r3rl.commands.textfile import check_text

__all__ = ["verify_logs", "WRAPPER_RE", "CHECK_RE", "FAILURE_RE"]

_STAGES = "|".join(s.value for s in Stage)
WRAPPER_RE = re.compile(
    rf"R3 wrapper: ({_STAGES}) branch taken \(rank (\d+), n_tokens=(\d+), topk=(\d+), replay_idx_sum=(-?\d+)\)")
CHECK_RE = re.compile(
    rf"R3 check \(rank (\d+), stage ({_STAGES})\): n_tokens=(\d+) mismatch=(\d+) \((\d+(?:\.\d+)?)%\)")
FAILURE_RE = re.compile(r"R3 mismatch tokens \((\d+)\) > threshold \((\d+(?:\.\d+)?)\)")
_STARTS = ("R3 wrapper:", "R3 check (", "R3 mismatch tokens")
_MAX_LISTED = 20  # offending lines listed per kind in the report


def verify_logs(paths: Sequence[str | Path], threshold: float | None = None) -> dict:
    """Parse the evidence lines of `paths` and return the report: {"verdict": "pass"|"fail", "reasons": [...],
    "threshold", "files", "ranks": {rank: {"wrapper": {stage: {lines, n_tokens}}, "check": {stage: {lines,
    n_tokens, mismatch, max_fraction}}}}, "above_threshold", "failures", "malformed"}."""
    if not paths:
        raise ValueError("verify-logs: give at least one log file")
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"--threshold is a fraction of tokens in [0, 1]: got {threshold}")
    thr = resolve_threshold(threshold)
    report: dict = {"verdict": "fail", "reasons": [], "threshold": thr, "files": [], "ranks": {},
                    "above_threshold": [], "failures": [], "malformed": []}
    reasons: list[str] = report["reasons"]
    for path in map(Path, paths):
        check_text(path, utf8=False, limit=1 << 16)  # a binary file given as a log: a usage error (exit 2), named
        try:
            n_lines, n_evidence = _scan(path, thr, report)
        except OSError as e:
            reasons.append(f"cannot read {path}: {e.strerror or e}")
            continue
        report["files"].append({"path": str(path), "lines": n_lines, "evidence_lines": n_evidence})

    ranks = report["ranks"]
    if not ranks:
        reasons.append("no R3 wrapper or check lines in " + ", ".join(str(p) for p in paths))
    for rank, r in sorted(ranks.items(), key=lambda kv: int(kv[0])):
        for stage in Stage:
            w = r["wrapper"].get(stage.value)
            if w is None:
                reasons.append(f"rank {rank}: no '{stage.value}' wrapper line")
            elif w["n_tokens"] == 0:
                reasons.append(f"rank {rank}: '{stage.value}' wrapper lines replayed n_tokens=0")
        if not r["check"]:
            reasons.append(f"rank {rank}: no R3 check line")
        for stage, c in r["check"].items():
            if c["n_tokens"] == 0:
                reasons.append(f"rank {rank}: stage {stage} check lines checked n_tokens=0")
    if report["above_threshold"]:
        worst = max(report["above_threshold"], key=lambda x: x["fraction"])
        reasons.append(f"{len(report['above_threshold'])} check line(s) above the threshold {thr:g}; worst at "
                       f"{worst['where']}: mismatch={worst['mismatch']} of n_tokens={worst['n_tokens']} "
                       f"({worst['fraction']:.4g})")
    if report["failures"]:
        first = report["failures"][0]
        reasons.append(f"{len(report['failures'])} 'R3 mismatch tokens' failure line(s); first at {first['where']}: "
                       f"{first['text']}")
    if report["malformed"]:
        first = report["malformed"][0]
        reasons.append(f"{len(report['malformed'])} malformed evidence line(s); first at {first['where']}: "
                       f"{first['problem']}")
    for key in ("above_threshold", "failures", "malformed"):
        report[key] = report[key][:_MAX_LISTED]
    report["verdict"] = "fail" if reasons else "pass"
    return report


# --- private -----------------------------------------------------------------------------------------------------
def _scan(path: Path, thr: float, report: dict) -> tuple[int, int]:
    ranks = report["ranks"]
    n_lines = n_evidence = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for n_lines, line in enumerate(f, 1):
            if "R3 " not in line:
                continue
            where = f"{path}:{n_lines}"
            parsed = 0
            for m in WRAPPER_RE.finditer(line):
                stage, rank, n_tok = m.group(1), m.group(2), int(m.group(3))
                w = _rank(ranks, rank)["wrapper"].setdefault(stage, {"lines": 0, "n_tokens": 0})
                w["lines"] += 1
                w["n_tokens"] += n_tok
                parsed += 1
            for m in CHECK_RE.finditer(line):
                rank, stage, n_tok, mis, pct = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)
                c = _rank(ranks, rank)["check"].setdefault(
                    stage, {"lines": 0, "n_tokens": 0, "mismatch": 0, "max_fraction": 0.0})
                frac = mis / n_tok if n_tok else 0.0
                c["lines"] += 1
                c["n_tokens"] += n_tok
                c["mismatch"] += mis
                c["max_fraction"] = max(c["max_fraction"], frac)
                if mis > n_tok:
                    report["malformed"].append({"where": where, "problem": f"mismatch={mis} > n_tokens={n_tok}"})
                elif abs(100.0 * frac - float(pct)) > 0.5 * 10 ** -_decimals(pct) + 1e-9:
                    report["malformed"].append({"where": where, "problem": f"printed {pct}% but mismatch/n_tokens = "
                                                                           f"{mis}/{n_tok} = {100.0 * frac:.4f}%"})
                if mis > thr * n_tok:
                    report["above_threshold"].append({"where": where, "rank": int(rank), "stage": stage,
                                                      "n_tokens": n_tok, "mismatch": mis, "fraction": frac})
                parsed += 1
            for m in FAILURE_RE.finditer(line):
                report["failures"].append({"where": where, "text": m.group(0)})
                parsed += 1
            starts = sum(line.count(s) for s in _STARTS)
            if starts > parsed:
                report["malformed"].append({"where": where, "problem": "a line starts an R3 evidence line but does "
                                                                       f"not match its format: {line.strip()[:200]!r}"})
            n_evidence += parsed
    return n_lines, n_evidence


def _rank(ranks: dict, rank: str) -> dict:
    return ranks.setdefault(str(int(rank)), {"wrapper": {}, "check": {}})


def _decimals(number: str) -> int:
    return len(number.split(".", 1)[1]) if "." in number else 0
