"""The soak run's figures and verdict: from what each item saw, the samples over time, the
daemon's outbox counters and the fleet's database.

Pure functions over plain data, so the rules are tested without a daemon:

- memory, threads and open files grow by comparing, within one process (a boot), the median
  of the first tenth of the samples after warm-up with the median of the last tenth; warm-up
  is the boot's first tenth of answered turns, and at least fifteen: speech-to-text and
  synthesis keep their memory (onnxruntime's arenas) at the high-water mark of the longest
  transcript and clause they have handled, so a fresh process grows in steps while it meets
  new questions and replies, then stays;
- an event is lost when a sequence number between 1 and the last one the device gave out is
  missing from the database; a duplicate is a second copy of an event id;
- a turn that ended in the daemon's log but never reached the database is lost, unless it
  ended within a second before a SIGKILL (handed to the bridge, not yet on disk).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.devtools.soak_proc import Sample


@dataclass
class ItemResult:
    index: int
    kind: str
    clips: tuple[str, ...]
    boot: int
    start_s: float  # seconds since the run began
    end_s: float = 0.0
    expected_answers: int = 0
    answered: int = 0
    expected_wakes: int = 0  # wake words in the item that the wake model catches alone
    wakes: int = 0  # of those, caught
    missed_wakes: int = 0
    false_wakes: int = 0  # wakes nobody said (silence, noise)
    cut: bool = False  # the daemon was killed before the item's turns ended
    stuck: bool = False  # a turn did not end within the bound
    barge: str = ""  # barge items: interrupted, or late (the reply had ended first)
    outcomes: list[str] = field(default_factory=list)  # turn.end outcomes, in order
    turn_ids: list[str] = field(default_factory=list)
    wake_lag_s: list[float] = field(default_factory=list)  # wake word spoken → wake logged
    turn_s: list[float] = field(default_factory=list)  # wake logged → turn.end logged
    note: str = ""


@dataclass(frozen=True)
class Growth:
    boot: int
    turns: int  # answered turns in the boot
    turns_after_warmup: int
    samples: int
    minutes: float
    rss_first_mb: float
    rss_last_mb: float
    rss_growth_pct: float
    rss_max_mb: float
    anon_first_mb: float  # anonymous memory (heap, arenas); the rest of RSS is mapped files
    anon_last_mb: float
    threads_first: float
    threads_last: float
    fds_first: float
    fds_last: float
    cpu_first_pct: float  # of one core, over the first tenth after warm-up
    cpu_last_pct: float


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def growth(boot: int, samples: Sequence[Sample], turn_ends_s: Sequence[float], warmup_frac: float = 0.1,
           min_warmup: int = 15) -> Growth | None:
    """Growth within one boot, after warm-up. ``turn_ends_s``: when the boot's answered turns ended
    (seconds on the samples' clock). None when there are fewer than 10 samples after warm-up."""
    ends = sorted(turn_ends_s)
    warm = max(min_warmup, int(math.ceil(warmup_frac * len(ends))))
    if len(ends) <= warm:
        return None
    after = [s for s in samples if s.boot == boot and s.t >= ends[warm - 1]]
    if len(after) < 10:
        return None
    k = max(2, len(after) // 10)
    first, last = after[:k], after[-k:]

    def cpu_pct(xs: Sequence[Sample]) -> float:
        span = xs[-1].t - xs[0].t
        return round(100 * (xs[-1].cpu_s - xs[0].cpu_s) / span, 1) if span > 0 else math.nan

    rss0, rss1 = _median([s.rss_kb for s in first]), _median([s.rss_kb for s in last])
    return Growth(boot=boot, turns=len(ends), turns_after_warmup=len(ends) - warm, samples=len(after),
                  minutes=round((after[-1].t - after[0].t) / 60, 1), rss_first_mb=round(rss0 / 1024, 1),
                  rss_last_mb=round(rss1 / 1024, 1), rss_growth_pct=round(100 * (rss1 - rss0) / rss0, 2),
                  rss_max_mb=round(max(s.rss_kb for s in after) / 1024, 1),
                  anon_first_mb=round(_median([s.anon_kb for s in first]) / 1024, 1),
                  anon_last_mb=round(_median([s.anon_kb for s in last]) / 1024, 1),
                  threads_first=_median([s.threads for s in first]), threads_last=_median([s.threads for s in last]),
                  fds_first=_median([s.fds for s in first]), fds_last=_median([s.fds for s in last]),
                  cpu_first_pct=cpu_pct(first), cpu_last_pct=cpu_pct(last))


@dataclass(frozen=True)
class Delivery:
    produced: int  # sequence numbers the device gave out (next_seq - 1)
    received: int  # distinct sequence numbers in the database
    lost: int
    lost_seqs: tuple[int, ...]
    duplicates: int  # second copies of an event id, skipped by the store
    seq_conflicts: int  # one sequence number on two different event ids (never expected)
    outbox_dropped: int  # the device's own count of events it had to drop


def delivery(produced: int, seqs: Iterable[int | None], duplicates: int, outbox_dropped: int) -> Delivery:
    got = [s for s in seqs if s is not None]
    distinct = set(got)
    missing = tuple(s for s in range(1, produced + 1) if s not in distinct)
    return Delivery(produced=produced, received=len(distinct & set(range(1, produced + 1))), lost=len(missing),
                    lost_seqs=missing[:50], duplicates=duplicates, seq_conflicts=len(got) - len(distinct),
                    outbox_dropped=outbox_dropped)


def turn_ends_lost(logged: Sequence[tuple[str, float, int]], received: set[str],
                   kills: Sequence[tuple[int, float]], window_s: float = 1.0) -> tuple[list[str], list[str]]:
    """Turns that ended in the log (turn id, time, boot) but are not in the database: (explained by a
    SIGKILL of that boot within ``window_s`` after, unexplained)."""
    killed_at = dict(kills)
    by_kill: list[str] = []
    lost: list[str] = []
    for turn, t, boot in logged:
        if turn in received:
            continue
        k = killed_at.get(boot)
        (by_kill if k is not None and 0 <= k - t <= window_s else lost).append(turn)
    return by_kill, lost


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(round(p * (len(s) - 1))))], 1)

    return {"n": len(s), "p50": q(0.5), "p90": q(0.9), "max": round(s[-1], 1)}


def latency_over_time(first_audio_ms: Sequence[float], parts: int = 10) -> list[dict[str, Any]]:
    """The run's answered turns in ``parts`` consecutive groups: p50/p90 of each."""
    n = len(first_audio_ms)
    out = []
    for k in range(parts):
        a, b = k * n // parts, (k + 1) * n // parts
        if b > a:
            out.append({"turns": f"{a + 1}-{b}", **percentiles(first_audio_ms[a:b])})
    return out


@dataclass(frozen=True)
class Limits:
    rss_growth_pct: float = 5.0
    threads_growth: float = 2.0  # more threads in the last tenth than the first (medians)
    fds_growth: float = 4.0
    min_turns_judged: int = 15  # answered turns after warm-up in the boot whose growth is judged


def verdict(report: dict[str, Any], limits: Limits) -> list[str]:
    """Every violated rule, one line each; empty when the run passed."""
    fails = []
    t = report["turns"]
    if t["answered"] < t["expected_answers"]:
        fails.append(f"{t['expected_answers'] - t['answered']} of {t['expected_answers']} expected answer(s) missing "
                     f"(items {', '.join(map(str, t['unanswered_items'][:20]))})")
    w = report["wakes"]
    if w["missed"]:
        fails.append(f"{w['missed']} missed wake word(s) that the wake model catches alone "
                     f"(items {', '.join(map(str, w['missed_items'][:20]))})")
    if report["stuck"]:
        fails.append(f"{len(report['stuck'])} stuck turn(s): no turn.end within the bound (items "
                     f"{', '.join(str(s['item']) for s in report['stuck'][:20])})")
    ev = report["events"]
    if ev["lost"]:
        fails.append(f"{ev['lost']} event(s) lost: sequence numbers {ev['lost_seqs'][:20]} never reached the fleet")
    if ev["seq_conflicts"]:
        fails.append(f"{ev['seq_conflicts']} sequence number(s) on two different events")
    if ev["outbox_dropped"]:
        fails.append(f"the device dropped {ev['outbox_dropped']} event(s) from its outbox")
    if ev["turn_ends_lost"]:
        fails.append(f"{len(ev['turn_ends_lost'])} turn(s) ended on the device and never reached the fleet")
    if ev["outbox_left"]:
        fails.append(f"{ev['outbox_left']} event(s) still in the outbox after the run")
    r = report["restarts"]
    if r["unexpected_exits"]:
        fails.append(f"the daemon exited {len(r['unexpected_exits'])} time(s) by itself: {r['unexpected_exits'][:5]}")
    if r["not_back"]:
        fails.append("the daemon did not come back after a restart")
    if r["final_exit"] not in (0, None):
        fails.append(f"the daemon's clean stop exited with {r['final_exit']}")
    g = report["resources"].get("judged")
    if g is None:
        fails.append("no process lived long enough to judge its memory "
                     f"({limits.min_turns_judged} answered turns after warm-up needed)")
    else:
        if g["rss_growth_pct"] >= limits.rss_growth_pct:
            fails.append(f"RSS grew {g['rss_growth_pct']:.1f} % after warm-up in boot {g['boot']} "
                         f"({g['rss_first_mb']} → {g['rss_last_mb']} MB; limit {limits.rss_growth_pct:g} %)")
        if g["threads_last"] - g["threads_first"] > limits.threads_growth:
            fails.append(f"threads grew from {g['threads_first']:g} to {g['threads_last']:g} in boot {g['boot']}")
        if g["fds_last"] - g["fds_first"] > limits.fds_growth:
            fails.append(f"open files grew from {g['fds_first']:g} to {g['fds_last']:g} in boot {g['boot']}")
    return fails


def summary_lines(report: dict[str, Any]) -> list[str]:
    t, w, ev, r = report["turns"], report["wakes"], report["events"], report["restarts"]
    res, lat, b = report["resources"], report["latency"], report["barge_in"]
    lines = [
        f"soak: {t['items']} turns ({', '.join(f'{v} {k}' for k, v in t['kinds'].items())}), seed {report['seed']}, "
        f"{report['wall_s'] / 60:.1f} min",
        f"  answered        {t['answered']}/{t['expected_answers']} expected "
        f"(+{t['cut_by_kill']} cut by a SIGKILL, not expected); outcomes {t['outcomes']}; "
        f"{t['visitors']} visitor(s), {t['sessions']} session(s)",
        f"  wake words      {w['caught']}/{w['expected']} caught, {w['missed']} missed, {w['false']} false; "
        f"lag spoken → logged p50 {w['lag_s'].get('p50', '-')} s, max {w['lag_s'].get('max', '-')} s",
        f"  barge-in        {b['interrupted']} interrupted a reply, {b['late']} came after the reply had ended",
        f"  stuck turns     {len(report['stuck'])} (bound {report['settings']['stuck_s']:g} s); "
        f"wake → turn.end p50 {report['turn_s'].get('p50', '-')} s, max {report['turn_s'].get('max', '-')} s",
        f"  restarts        {r['kills']} SIGKILL(s) → {r['restarts']} restart(s), back (ready) in p50 "
        f"{r['ready_s'].get('p50', '-')} s, max {r['ready_s'].get('max', '-')} s; "
        f"{len(r['unexpected_exits'])} unexpected exit(s); {sum(k.get('outbox') or 0 for k in r['killed'])} "
        "event(s) were waiting in the outbox when killed",
        f"  broker          {report['broker']['restarts']} stop/start(s), down {report['broker']['down_s']} s; "
        f"{report['broker']['answered_while_down']} turn(s) answered while it was down",
        f"  events          {ev['produced']} produced, {ev['received']} received, {ev['lost']} lost, "
        f"{ev['duplicates']} duplicate(s) removed by id; {len(ev['turn_ends_lost_to_kill'])} turn.end(s) "
        f"lost with a SIGKILL before reaching the outbox",
        f"  outbox          max {report['outbox']['max']} waiting, {ev['outbox_left']} left at the end",
    ]
    for g in res["boots"]:
        mark = " (judged)" if res.get("judged") and res["judged"]["boot"] == g["boot"] else ""
        lines.append(f"  boot {g['boot']:<3}        {g['turns']} turns, {g['minutes']} min after warm-up: RSS "
                     f"{g['rss_first_mb']} → {g['rss_last_mb']} MB ({g['rss_growth_pct']:+.2f} %; anonymous "
                     f"{g['anon_first_mb']} → {g['anon_last_mb']} MB), threads "
                     f"{g['threads_first']:g} → {g['threads_last']:g}, open files {g['fds_first']:g} → "
                     f"{g['fds_last']:g}, CPU {g['cpu_first_pct']:g} → {g['cpu_last_pct']:g} % of a core{mark}")
    lines.append(f"  first audio     p50 {lat['all'].get('p50', '-')} ms, p90 {lat['all'].get('p90', '-')} ms; "
                 "by tenth of the run (p50): " + " ".join(str(x.get("p50")) for x in lat["over_time"]))
    fails = report["failures"]
    lines.append("PASS" if not fails else "FAIL: " + "; ".join(fails))
    return lines


def to_json(report: dict[str, Any]) -> str:
    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        raise TypeError(type(o).__name__)

    return json.dumps(report, indent=1, default=default)
