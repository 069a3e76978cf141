"""Measure FAQ matchers on a test set of paraphrases and uncovered questions.

    python -m edge.devtools.faq_eval --pack config/packs/harbour-museum \
        --cases tests/data/faq_paraphrases.toml --minilm DIR [--json]

For each method it sweeps the threshold (and the margin over the runner-up entry), keeps the
setting with the best recall among those with precision >= --min-precision, and prints a
table: method, threshold, margin, precision, recall, false answers, per-query latency.

Precision counts every FAQ answer that would be spoken: a right entry for a paraphrase is a
true positive; a wrong entry for a paraphrase, or any entry for an uncovered question, is a
false positive. Recall is right entries over paraphrases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.knowledge.errors import KnowledgeError, Problem
from edge.knowledge.matcher import EntryScore, MatcherSettings, decide

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

__all__ = ["MatchCase", "Outcome", "best_setting", "load_cases", "measure", "outcome"]


@dataclass(frozen=True)
class MatchCase:
    text: str
    faq: str | None  # the entry that answers it; None for an uncovered question
    kind: str


def load_cases(path: str | Path) -> list[MatchCase]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise KnowledgeError(Problem("knowledge.questions", str(path), None, f"cannot read: {err}",
                                     "fix the file")) from None
    cases = [MatchCase(str(c["text"]), str(c["faq"]), str(c.get("kind", ""))) for c in data.get("positive", [])]
    cases += [MatchCase(str(c["text"]), None, str(c.get("kind", ""))) for c in data.get("negative", [])]
    return cases


@dataclass(frozen=True)
class Outcome:
    settings: MatcherSettings
    precision: float
    recall: float
    true_pos: int
    false_pos: int  # FAQ answers that are wrong (a wrong entry, or an uncovered question)
    false_on_negatives: int
    positives: int


def outcome(cases: Sequence[MatchCase], scored: Sequence[Sequence[EntryScore]], s: MatcherSettings) -> Outcome:
    tp = fp = fp_neg = 0
    for case, scores in zip(cases, scored):
        found = decide(scores, s)
        if found is None:
            continue
        if case.faq is not None and found[0] == case.faq:
            tp += 1
        else:
            fp += 1
            fp_neg += case.faq is None
    positives = sum(c.faq is not None for c in cases)
    precision = tp / (tp + fp) if tp + fp else 1.0
    return Outcome(s, precision, tp / positives if positives else 0.0, tp, fp, fp_neg, positives)


THRESHOLDS = tuple(round(0.30 + 0.01 * i, 2) for i in range(66))
MARGINS = (0.0, 0.02, 0.05, 0.1, 0.15)
GATES = (0.05, 0.1, 0.15, 0.2)
NO_GATE = 99.0


def best_setting(cases: Sequence[MatchCase], scored: Sequence[Sequence[EntryScore]], min_precision: float,
                 weight: float, gates: Sequence[float] = (NO_GATE,), cover: float = 0.6) -> Outcome:
    """The setting with the best recall at precision >= min_precision (ties: higher precision)."""
    best: Outcome | None = None
    for g in gates:
        for m in MARGINS:
            for t in THRESHOLDS:
                o = outcome(cases, scored, MatcherSettings(weight, t, m, g, cover))
                if o.precision >= min_precision and (best is None or (o.recall, o.precision) >
                                                     (best.recall, best.precision)):
                    best = o
    return best if best is not None else outcome(cases, scored, MatcherSettings(weight, 1.0, 1.0, gates[0], cover))


def measure(score: Callable[[str], list[EntryScore]],
            cases: Sequence[MatchCase]) -> tuple[list[list[EntryScore]], float]:
    """Entry scores per case and the mean milliseconds per query."""
    for case in cases[:3]:  # warm caches
        score(case.text)
    out: list[list[EntryScore]] = []
    t0 = time.perf_counter()
    for case in cases:
        out.append(score(case.text))
    return out, (time.perf_counter() - t0) / max(1, len(cases)) * 1000


def _as_scores(fn: Callable[[str], dict[str, float]]) -> Callable[[str], list[EntryScore]]:
    return lambda q: [EntryScore(k, v, 0.0, 0.0) for k, v in fn(q).items()]


def _fuzzy_scorer(faq: Sequence[object]) -> Callable[[str], dict[str, float]]:
    from edge.knowledge.text import normalize

    try:
        from rapidfuzz import fuzz

        def ratio(a: str, b: str) -> float:
            return float(fuzz.token_set_ratio(a, b)) / 100.0
    except ImportError:  # the same measure with the standard library, slower
        import difflib

        def ratio(a: str, b: str) -> float:
            sa, sb = set(a.split()), set(b.split())
            inter = " ".join(sorted(sa & sb))
            ra = " ".join(sorted(sa - sb))
            rb = " ".join(sorted(sb - sa))
            t1, t2, t3 = inter, f"{inter} {ra}".strip(), f"{inter} {rb}".strip()
            return max(difflib.SequenceMatcher(None, x, y).ratio() for x, y in ((t1, t2), (t1, t3), (t2, t3)))

    phr = [(e.id, normalize(q)) for e in faq for q in e.questions]  # type: ignore[attr-defined]

    def score(q: str) -> dict[str, float]:
        nq = normalize(q)
        best: dict[str, float] = {}
        for eid, p in phr:
            s = ratio(nq, p)
            if s > best.get(eid, -1.0):
                best[eid] = s
        return best

    return score


def _bm25_scorer(faq: Sequence[object]) -> Callable[[str], dict[str, float]]:
    """BM25 over stemmed content words, scaled by the question's own best possible score."""
    import math
    from collections import Counter

    from edge.knowledge.text import terms

    docs = [(e.id, Counter(terms(q))) for e in faq for q in e.questions]  # type: ignore[attr-defined]
    n = len(docs)
    avg = sum(sum(d.values()) for _, d in docs) / max(1, n)
    df: Counter[str] = Counter()
    for _, d in docs:
        df.update(d.keys())
    k1, b = 1.2, 0.75

    def idf(t: str) -> float:
        return math.log(1 + (n - df.get(t, 0) + 0.5) / (df.get(t, 0) + 0.5))

    def score(q: str) -> dict[str, float]:
        qt = terms(q)
        top = sum(idf(t) for t in set(qt)) or 1.0
        best: dict[str, float] = {}
        for eid, d in docs:
            length = sum(d.values())
            s = sum(idf(t) * d[t] * (k1 + 1) / (d[t] + k1 * (1 - b + b * length / avg)) for t in set(qt) if t in d)
            s /= top * (k1 + 1) / (1 + k1 * (1 - b + b * 1 / avg))
            if s > best.get(eid, -1.0):
                best[eid] = min(1.0, s)
        return best

    return score


def main(argv: Sequence[str] | None = None) -> int:
    from edge.knowledge.matcher import EMBEDDING_SETTINGS, LEXICAL_SETTINGS, FaqMatcher
    from edge.knowledge.pack import load_pack

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pack", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--minilm", help="directory with model.safetensors and vocab.txt of all-MiniLM-L6-v2")
    ap.add_argument("--min-precision", type=float, default=0.97)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--errors", action="store_true", help="list the misses and false answers of the defaults")
    args = ap.parse_args(argv)
    pack = load_pack(args.pack)
    cases = load_cases(args.cases)
    rows: list[dict[str, object]] = []

    def row(name: str, scored: list[list[EntryScore]], ms: float, weight: float, gates: Sequence[float],
            cover: float = 0.6, fixed: MatcherSettings | None = None) -> None:
        o = (outcome(cases, scored, fixed) if fixed is not None
             else best_setting(cases, scored, args.min_precision, weight, gates, cover))
        rows.append({"method": name, "ms_per_query": round(ms, 2), **o.__dict__,
                     "settings": o.settings.__dict__})
        if args.errors and fixed is not None:
            for case, scores in zip(cases, scored):
                found = decide(scores, fixed)
                got = found[0] if found else None
                if got != case.faq:
                    top = max(scores, key=lambda e: e.combined(fixed.embedding_weight)) if scores else None
                    detail = (f"top={top.entry_id} lex={top.lexical:.2f} emb={top.embedding:.2f} "
                              f"fact_adv={top.fact_advantage:+.2f}") if top else ""
                    print(f"  [{name}] {case.text!r} want={case.faq} got={got} {detail}", file=sys.stderr)

    lexical = FaqMatcher(pack)
    scored, ms = measure(lexical.scores, cases)
    row("lexical: TF-IDF cosine", scored, ms, 0.0, (NO_GATE,))
    row("lexical: TF-IDF + fact gate", scored, ms, 0.0, GATES, LEXICAL_SETTINGS.cover)
    row("lexical: TF-IDF + fact gate, defaults", scored, ms, 0.0, (), fixed=LEXICAL_SETTINGS)
    scored, ms = measure(_as_scores(_bm25_scorer(pack.faq)), cases)
    row("lexical: BM25 (scaled to 0..1)", scored, ms, 0.0, (NO_GATE,))
    scored, ms = measure(_as_scores(_fuzzy_scorer(pack.faq)), cases)
    row("fuzzy: token-set ratio", scored, ms, 0.0, (NO_GATE,))
    load_s = 0.0
    if args.minilm:
        from edge.knowledge.embed import MiniLM

        t0 = time.perf_counter()
        model = MiniLM.from_dir(Path(args.minilm))
        load_model_s = time.perf_counter() - t0
        matcher = FaqMatcher(pack, model)
        load_s = time.perf_counter() - t0
        scored, ms = measure(matcher.scores, cases)
        row("embedding: MiniLM-L6 cosine", scored, ms, 1.0, (NO_GATE,))
        for w in (0.5, 0.6, 0.7):
            row(f"combined: {w:.1f} embedding + {1 - w:.1f} TF-IDF", scored, ms, w, (NO_GATE,))
        row("combined 0.6/0.4 + fact gate", scored, ms, 0.6, GATES, EMBEDDING_SETTINGS.cover)
        row("combined 0.6/0.4 + fact gate, defaults", scored, ms, 0.6, (), fixed=EMBEDDING_SETTINGS)
        t0 = time.perf_counter()
        for case in cases:
            model.embed(case.text)
        embed_ms = (time.perf_counter() - t0) / len(cases) * 1000
    if args.json:
        print(json.dumps({"pack": pack.label, "cases": len(cases), "embedding_load_s": round(load_s, 2),
                          "rows": rows}, indent=2))
        return 0
    n_pos = sum(c.faq is not None for c in cases)
    print(f"{pack.label}: {n_pos} paraphrases, {len(cases) - n_pos} uncovered questions; "
          f"best recall at precision >= {args.min_precision} unless 'defaults'")
    print("| method | threshold | margin | fact gate | precision | recall | false FAQ answers | ms/query |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["settings"]
        assert isinstance(st, dict)
        gate = "-" if st["fact_gate"] >= NO_GATE else f"{st['fact_gate']:.2f}"
        print(f"| {r['method']} | {st['threshold']:.2f} | {st['margin']:.2f} | {gate} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} ({r['true_pos']}/{r['positives']}) | {r['false_pos']} | {r['ms_per_query']} |")
    if load_s:
        print(f"embedding model: loaded in {load_model_s:.2f} s; pack's phrasings, answers and facts embedded in "
              f"{load_s - load_model_s:.2f} s; {embed_ms:.2f} ms per question embedding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
