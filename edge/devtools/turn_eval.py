"""Measure end-of-turn rules on the pause set: cut-offs and how soon a finished turn ends.

    python -m edge.devtools.turn_eval [--set DIR] [--config config/dev.toml] [--limits 0.6,1.0,1.6]
                                      [--out FILE.json] [--reuse]

Each clip of the pause set (``edge.devtools.turn_set``) is replayed through the real dev
recognizer (silero VAD + Whisper tiny.en, ``VadOfflineRecognizer``), once per endpoint silence
in ``--limits``: the first is today's fixed rule, the others are the longer limits a rule may
wait up to when it thinks the visitor has not finished. At every pause the recognizer reports
(``stt.pause_s`` of silence) the views are read:

- ``audio``: Smart Turn v3.2 on the turn's audio so far (from 0.5 s before the speech, as
  pipecat takes it), and again after 0.4 s of silence (``audio2``);
- ``text``: the LLM's own view, P(end of the user's turn | system prompt + the transcript so far)
  from the dev SmolLM2 GGUF: the probability of the chat template's end-of-turn token right
  after the words (``text_bare``: the same without Whisper's final punctuation).

A rule (``edge.turn.TurnRule``) ends the turn at the pause when the combined probability is at
least ``complete_at``, waits for the long limit when it is below ``incomplete_below``, and
otherwise ends at the fixed silence. A turn that ends before the visitor's last word is a
cut-off; for the others the delay from the true end of speech to the end of the turn (on the
audio timeline; the model's compute time is reported apart) is what moves the first audio.
Thresholds are swept and the setting with the shortest mean delay at <= 5 % cut-offs is chosen
on one voice and checked on the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from edge.devtools.turn_set import LOUD, Clip, default_dir, generate, read_clip
from edge.turn.base import TurnRule

__all__ = ["LlmTurnView", "Pause", "Run", "replay", "end_of_turn", "main"]

PRE_SPEECH_S = 0.5  # audio before the speech start handed to Smart Turn (pipecat's pre_speech_ms)
RECHECK_S = 0.4  # the second look at the audio, this long after the speech ended
TAIL_S = 3.0  # silence fed after each clip
CUT_TOLERANCE_S = 0.05  # a turn ending this little before the last loud sample is not a cut-off


@dataclass(frozen=True)
class Pause:
    notice_s: float  # when the recognizer reported it (audio time)
    speech_end_s: float
    text: str
    restart_s: float | None  # when the voice came back after it (None: it did not)


@dataclass(frozen=True)
class Run:
    clip: str
    limit_s: float
    speech_start_s: float
    pauses: tuple[Pause, ...]
    final_s: float
    final_speech_end_s: float
    final_text: str
    decode_s: float  # Whisper's wall seconds over the clip


# -- the recognizer -------------------------------------------------------------------------

def next_onset(audio: np.ndarray, after_s: float) -> float | None:
    """The first loud sample at least 50 ms after ``after_s``."""
    start = int((after_s + 0.05) * SAMPLE_RATE)
    loud = np.nonzero(np.abs(audio[start:].astype(np.int32)) > LOUD)[0]
    return (start + int(loud[0])) / SAMPLE_RATE if len(loud) else None


def replay(rec: Any, audio: np.ndarray, clip_id: str, limit_s: float) -> Run:
    """Feed ``audio`` (then silence) chunk by chunk to a fresh utterance of ``rec``."""
    from edge.stt.base import UpdateKind

    x = np.concatenate([audio, np.zeros(int(TAIL_S * SAMPLE_RATE), np.int16)])
    rec.start([])
    pauses: list[Pause] = []
    start_s = 0.0
    decode = 0.0
    final = None
    for i in range(0, len(x) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
        for u in rec.accept(AudioChunk(x[i:i + CHUNK_SAMPLES].copy(), i)):
            decode += u.decode_s
            if u.kind == UpdateKind.SPEECH_START and not pauses:
                start_s = u.audio_time
            elif u.kind == UpdateKind.PAUSE and u.speech_end is not None:
                pauses.append(Pause(u.audio_time, u.speech_end, u.text, next_onset(audio, u.speech_end)))
            elif u.kind == UpdateKind.FINAL:
                final = u
        if final is not None:
            break
    if final is None:
        final = rec.finish()
    if final is None:
        return Run(clip_id, limit_s, start_s, tuple(pauses), math.inf, math.inf, "", decode)
    return Run(clip_id, limit_s, start_s, tuple(pauses), final.audio_time,
               final.speech_end if final.speech_end is not None else final.audio_time, final.text, decode)


def recognizer_runs(clips: Sequence[Clip], folder: Path, config: Path, limits: Sequence[float],
                    say: Callable[[str], None]) -> list[Run]:
    from edge.config import load_config
    from edge.models.registry import ModelRegistry
    from edge.stt import make_recognizer

    cfg = load_config(config)
    reg = ModelRegistry()
    files = reg.resolve(cfg.stt.model).files
    vad = reg.resolve(cfg.stt.vad_model).files
    runs = []
    for limit in limits:
        stt = dataclasses.replace(cfg.stt, endpoint_silence_s=limit)
        rec = make_recognizer(stt, files, vad)
        t0 = time.monotonic()
        for c in clips:
            runs.append(replay(rec, read_clip(folder / c.file), c.id, limit))
        rec.close()
        say(f"recognizer, endpoint {limit:.1f} s: {len(clips)} clips in {time.monotonic() - t0:.0f} s")
    return runs


# -- the LLM's view -------------------------------------------------------------------------

class LlmTurnView:
    """P(the user's turn ends here) from a chat model: the probability of the chat template's
    end-of-turn token right after the user's words, read from the logits of their last token.

    The prompt up to the words is what the prefill evaluates anyway; the KV cache is reused up to
    the shared prefix, so a decision costs one evaluated token (the last word's) and a softmax.
    """

    def __init__(self, gguf: Path, system_prompt: str, *, threads: int = 2) -> None:
        import llama_cpp

        from edge.llm.template import PromptBuilder, choose_format

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=256, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        bos = self.llm.token_bos()
        bos_text = llama_cpp.llama_vocab_get_text(vocab, bos).decode() if bos >= 0 else ""
        eos_text = llama_cpp.llama_vocab_get_text(vocab, self.llm.token_eos()).decode()
        fmt = choose_format(self.llm.metadata.get("tokenizer.chat_template"), "auto", bos_token=bos_text,
                            eos_token=eos_text, where=str(gguf))
        self.prompts = PromptBuilder(fmt, bos_token=bos_text, eos_token=eos_text)
        self.system = system_prompt
        ends = []
        for text in fmt.stop_texts:
            ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(ids) == 1:
                ends.append(ids[0])
        self.end_ids = sorted(set(ends))
        self.n_vocab = self.llm.n_vocab()
        self.last_marginal_s = 0.0  # one evaluated token and the softmax
        self.last_total_s = 0.0  # everything past the cached prefix

    def _tokens_to_words(self, history: Sequence[Mapping[str, str]], text: str) -> list[int]:
        from edge.llm.template import clean_content

        words = clean_content(text)
        prompt = self.prompts.prompt(self.system, history, words)  # type: ignore[arg-type]
        head = self.prompts.head(self.system, history)  # type: ignore[arg-type]
        at = prompt.index(words, len(head)) + len(words)
        return self.llm.tokenize(prompt[:at].encode(), add_bos=False, special=True)

    def probability(self, text: str, history: Sequence[Mapping[str, str]] = ()) -> float:
        lib, llm = self._lib, self.llm
        tokens = self._tokens_to_words(history, text)
        t0 = time.perf_counter()
        cached = llm.input_ids[: llm.n_tokens].tolist()
        n = 0
        for a, b in zip(cached, tokens):
            if a != b:
                break
            n += 1
        n = min(n, len(tokens) - 1)  # the last word's token is evaluated: its logits are read
        if n < llm.n_tokens:
            llm._ctx.kv_cache_seq_rm(-1, n, -1)
            llm.n_tokens = n
        if len(tokens) - 1 > n:
            llm.eval(tokens[n:-1])  # what the prefill had evaluated already
        t1 = time.perf_counter()
        llm.eval(tokens[-1:])
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(self.n_vocab,))
        z = logits.astype(np.float64)
        z = np.exp(z - z.max())
        p = float(z[self.end_ids].sum() / z.sum())
        t2 = time.perf_counter()
        self.last_marginal_s, self.last_total_s = t2 - t1, t2 - t0
        return p

    def close(self) -> None:
        self.llm.close()


def bare(text: str) -> str:
    """Without the final punctuation Whisper adds to whatever it heard."""
    return text.rstrip().rstrip(".?!,;:…").rstrip()


# -- views at the pauses --------------------------------------------------------------------

@dataclass
class Costs:
    audio_s: list[float] = dataclasses.field(default_factory=list)
    audio_cpu_s: list[float] = dataclasses.field(default_factory=list)
    text_marginal_s: list[float] = dataclasses.field(default_factory=list)
    text_total_s: list[float] = dataclasses.field(default_factory=list)


def pause_key(clip: str, p: Pause) -> str:
    return f"{clip}@{p.speech_end_s:.3f}"


def read_views(runs: Sequence[Run], clips: Mapping[str, Clip], folder: Path, system_prompt: str,
               say: Callable[[str], None], llm_model: str = "smollm2-135m-instruct",
               ) -> tuple[dict[str, dict[str, float]], Costs]:
    from edge.models.registry import ModelRegistry
    from edge.turn import make_turn_detector

    reg = ModelRegistry()
    detector = make_turn_detector("smart-turn", reg.resolve("smart-turn-v3.2").files, threads=1)
    assert detector is not None
    view = LlmTurnView(reg.resolve(llm_model).path("model"), system_prompt)
    costs = Costs()
    out: dict[str, dict[str, float]] = {}
    audio_cache: dict[str, np.ndarray] = {}
    t0 = time.monotonic()
    for run in runs:
        audio = audio_cache.setdefault(run.clip, np.concatenate([
            read_clip(folder / clips[run.clip].file), np.zeros(int(TAIL_S * SAMPLE_RATE), np.int16)]))
        begin = max(0, int((run.speech_start_s - PRE_SPEECH_S) * SAMPLE_RATE))
        for p in run.pauses:
            key = pause_key(run.clip, p)
            if key in out:
                continue
            v: dict[str, float] = {}
            c0, w0 = time.thread_time(), time.perf_counter()
            v["audio"] = detector.complete_probability(audio[begin:int(p.notice_s * SAMPLE_RATE)])
            costs.audio_s.append(time.perf_counter() - w0)
            costs.audio_cpu_s.append(time.thread_time() - c0)
            later = p.speech_end_s + RECHECK_S
            if p.restart_s is None or p.restart_s > later:
                v["audio2"] = detector.complete_probability(audio[begin:int(later * SAMPLE_RATE)])
            v["text"] = view.probability(p.text)
            costs.text_marginal_s.append(view.last_marginal_s)
            costs.text_total_s.append(view.last_total_s)
            v["text_bare"] = view.probability(bare(p.text) or p.text)
            out[key] = v
    detector.close()
    view.close()
    say(f"views at {len(out)} pauses in {time.monotonic() - t0:.0f} s")
    return out, costs


# -- rules ----------------------------------------------------------------------------------

def lag_s(runs: Iterable[Run], limit: float) -> float:
    """Median of (final reported - speech end) at an endpoint silence: the VAD's own delay."""
    d = [r.final_s - r.final_speech_end_s for r in runs if r.limit_s == limit and math.isfinite(r.final_s)]
    return statistics.median(d) if d else limit


@dataclass(frozen=True)
class Outcome:
    clip: str
    end_s: float  # when the turn ended (audio time)
    cut: bool  # before the visitor's last word
    delay_s: float  # end - true end of speech
    how: str  # "pause" | "silence" | "limit"


def end_of_turn(run: Run, clip: Clip, views: Mapping[str, Mapping[str, float]], rule: TurnRule | None,
                silence_lag: float) -> Outcome:
    """When the turn ends under ``rule`` (None: the fixed silence of ``run``'s own endpoint).

    ``silence_lag``: how long after the silence the VAD reports it (its windows), measured."""
    end, how = run.final_s, "limit"
    if rule is not None:
        for p in run.pauses:
            if p.notice_s >= run.final_s:
                break
            v = views.get(pause_key(run.clip, p), {})
            need = rule.silence_needed(v)
            if need == 0.0:
                end, how = p.notice_s, "pause"
                break
            if need < rule.max_silence_s:
                fires = p.speech_end_s + need + silence_lag
                if p.restart_s is None or p.restart_s > p.speech_end_s + need:
                    end, how = max(fires, p.notice_s), "silence"
                    break
    cut = end < clip.speech_end_s - CUT_TOLERANCE_S
    return Outcome(clip.id, end, cut, end - clip.speech_end_s, how)


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    return float(np.percentile(np.asarray(xs), q))


@dataclass(frozen=True)
class Score:
    n: int
    cut: int
    cut_paused: int
    n_paused: int
    p50_ms: float
    p90_ms: float
    at_pause: int
    mean_ms: float

    @property
    def cut_rate(self) -> float:
        return self.cut / self.n if self.n else math.nan

    @property
    def cut_rate_paused(self) -> float:
        return self.cut_paused / self.n_paused if self.n_paused else math.nan


def score(outcomes: Sequence[Outcome], clips: Mapping[str, Clip]) -> Score:
    delays = [o.delay_s * 1000 for o in outcomes if not o.cut]
    paused = [o for o in outcomes if clips[o.clip].paused]
    return Score(len(outcomes), sum(o.cut for o in outcomes), sum(o.cut for o in paused), len(paused),
                 pct(delays, 50), pct(delays, 90), sum(o.how == "pause" for o in outcomes),
                 float(np.mean(delays)) if delays else math.nan)


def evaluate(runs: Sequence[Run], clips: Mapping[str, Clip], views: Mapping[str, Mapping[str, float]],
             rule: TurnRule | None, limit: float, lag: float, voice: str | None) -> Score:
    chosen = [r for r in runs if r.limit_s == limit and (voice is None or clips[r.clip].voice == voice)]
    return score([end_of_turn(r, clips[r.clip], views, rule, lag) for r in chosen], clips)


WEIGHTS: dict[str, dict[str, float]] = {
    "smart-turn": {"audio": 1.0},
    "smart-turn x2": {"audio2": 1.0},
    "llm": {"text": 1.0},
    "llm (bare)": {"text_bare": 1.0},
    "smart-turn + llm": {"audio": 1.0, "text": 1.0},
    "smart-turn + llm (bare)": {"audio": 1.0, "text_bare": 1.0},
}


def thresholds(views: Mapping[str, Mapping[str, float]], weights: Mapping[str, float], steps: int = 24) -> list[float]:
    """Candidate thresholds: quantiles of the combined probability over every pause, and 0."""
    probe = TurnRule(weights=dict(weights))
    ps = [p for v in views.values() if (p := probe.probability(v)) is not None]
    qs = np.quantile(np.asarray(ps), np.linspace(0, 1, steps + 1)) if ps else np.zeros(0)
    return sorted({0.0, *(float(q) for q in qs)})


def sweep(runs: Sequence[Run], clips: Mapping[str, Clip], views: Mapping[str, Mapping[str, float]],
          weights: Mapping[str, float], limits: Sequence[float], lag06: float, lags: Mapping[float, float],
          voice: str | None, max_cut: float = 0.05) -> tuple[TurnRule, float, Score] | None:
    """The rule with the shortest mean delay whose cut-off rate is at most ``max_cut``: thresholds,
    the silence when unsure (any limit but the last) and the long limit (any but the first)."""
    best: tuple[TurnRule, float, Score] | None = None
    grid = thresholds(views, weights)
    for limit in limits[1:]:
        for mid in [x for x in limits if x < limit]:
            for hi in grid:
                for lo in [x for x in grid if x <= hi]:
                    if lo == hi and mid != limits[0]:
                        continue  # no unsure zone: its silence does not matter
                    rule = TurnRule(complete_at=hi, incomplete_below=lo, silence_s=mid, max_silence_s=limit,
                                    weights=dict(weights))
                    s = evaluate(runs, clips, views, rule, limit, lag06, voice)
                    if s.cut_rate > max_cut:
                        continue
                    key = (s.mean_ms, s.p90_ms, s.cut)
                    if best is None or key < (best[2].mean_ms, best[2].p90_ms, best[2].cut):
                        best = (rule, limit, s)
    return best


# -- report ---------------------------------------------------------------------------------

def row(name: str, s: Score) -> str:
    return (f"| {name} | {s.cut}/{s.n} ({100 * s.cut_rate:.1f} %) | {s.cut_paused}/{s.n_paused} | "
            f"{s.p50_ms:.0f} | {s.p90_ms:.0f} | {s.mean_ms:.0f} | {s.at_pause} |")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--set", type=Path, default=None, help="the pause set (default: <cache>/turn-set; made if missing)")
    ap.add_argument("--config", type=Path, default=Path("config/dev.toml"))
    ap.add_argument("--limits", default="0.6,1.0,1.6", help="endpoint silences: today's first, then longer limits")
    ap.add_argument("--out", type=Path, default=None, help="write runs, views and results as JSON")
    ap.add_argument("--reuse", action="store_true", help="take runs and views from --out instead of measuring")
    ap.add_argument("--llm-model", default="smollm2-135m-instruct",
                    help="the GGUF (model id) whose view is read; thresholds are the model's own")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    folder = args.set or default_dir()
    clip_list = generate(folder, say=say)
    clips = {c.id: c for c in clip_list}
    limits = [float(x) for x in args.limits.split(",")]
    from edge.config import load_config

    saved: dict[str, Any] = {}
    if args.reuse and args.out and args.out.exists():
        saved = json.loads(args.out.read_text(encoding="utf-8"))
    if "runs" in saved:
        runs = [Run(**{**r, "pauses": tuple(Pause(**p) for p in r["pauses"])}) for r in saved["runs"]]
    else:
        runs = recognizer_runs(clip_list, folder, args.config, limits, say)
        if args.out:  # kept at once: the recognizer runs are the long part
            args.out.write_text(json.dumps({"runs": [dataclasses.asdict(r) for r in runs]}, default=str) + "\n",
                                encoding="utf-8")
    if "views" in saved:
        views, costs = saved["views"], Costs(**saved["costs"])
    else:
        views, costs = read_views(runs, clips, folder, load_config(args.config).llm.system_prompt, say,
                                  args.llm_model)
    lags = {limit: lag_s(runs, limit) for limit in limits}
    lag06 = lags[limits[0]] - limits[0]  # the VAD's own delay past the silence
    voices = sorted({c.voice for c in clip_list})
    results: dict[str, Any] = {"lags": lags}
    print("VAD delay (final - speech end), median: "
          + ", ".join(f"{k:.1f} s -> {v * 1000:.0f} ms" for k, v in lags.items()))
    print()
    print("| method | cut-offs (all clips) | cut-offs (paused) | delay p50 ms | p90 ms | mean ms "
          "| ended at the pause |")
    print("|---|---|---|---|---|---|---|")
    for limit in limits:
        for voice in voices + [None]:
            s = evaluate(runs, clips, views, None, limit, lag06, voice)
            print(row(f"fixed silence {limit:.1f} s, {voice or 'both'}", s))
            results[f"fixed {limit} {voice or 'both'}"] = dataclasses.asdict(s)
    chosen: dict[str, Any] = {}
    for name, weights in WEIGHTS.items():
        for train in voices + [None]:
            found = sweep(runs, clips, views, weights, limits, lag06, lags, train)
            if found is None:
                print(f"| {name}: no setting keeps cut-offs <= 5 % on {train or 'both'} | | | | | |")
                continue
            rule, limit, _ = found
            label = (f"{name} (>= {rule.complete_at:.3g} ends, < {rule.incomplete_below:.3g} waits {limit:.1f} s, "
                     f"else {rule.silence_s:.1f} s; "
                     f"chosen on {train or 'both'})")
            for voice in voices + [None]:
                s = evaluate(runs, clips, views, rule, limit, lag06, voice)
                print(row(f"{label}, {voice or 'both'}", s))
                results[f"{name} / {train or 'both'} / {voice or 'both'}"] = {
                    "rule": {"complete_at": rule.complete_at, "incomplete_below": rule.incomplete_below,
                             "silence_s": rule.silence_s, "max_silence_s": limit}, **dataclasses.asdict(s)}
            if train is None:
                chosen[name] = (rule, limit)
    print()
    a, tm, tt = costs.audio_s, costs.text_marginal_s, costs.text_total_s
    audio_total = sum(clips[r.clip].duration_s for r in runs if r.limit_s == limits[0])
    print(f"Smart Turn per call: wall p50 {1000 * pct(a, 50):.0f} ms (p90 {1000 * pct(a, 90):.0f}), "
          f"CPU p50 {1000 * pct(costs.audio_cpu_s, 50):.0f} ms, 1 thread; "
          f"{len(a)} calls over {audio_total:.0f} s of speech = "
          f"{100 * sum(costs.audio_cpu_s) / audio_total:.1f} % of one core")
    print(f"LLM view per decision: one evaluated token + softmax p50 {1000 * pct(tm, 50):.1f} ms "
          f"(p90 {1000 * pct(tm, 90):.1f}); with the words not yet prefilled p50 {1000 * pct(tt, 50):.1f} ms")
    decode = sum(r.decode_s for r in runs if r.limit_s == limits[0])
    print(f"Whisper decodes over the same clips: {decode:.1f} s ({100 * decode / audio_total:.1f} % of one core)")
    # How well each view separates a pause inside the sentence from the end of the question.
    print()
    print("| view | pauses inside the sentence: p50 (p90) | at the end of the question: p50 (p10) |")
    print("|---|---|---|")
    for key in ("audio", "audio2", "text", "text_bare"):
        inside: list[float] = []
        at_end: list[float] = []
        for r in runs:
            if r.limit_s != limits[-1]:
                continue
            c = clips[r.clip]
            for p in r.pauses:
                v = views.get(pause_key(r.clip, p), {})
                if key in v:
                    (at_end if p.speech_end_s >= c.speech_end_s - 0.1 else inside).append(v[key])
        print(f"| {key} | {pct(inside, 50):.2f} ({pct(inside, 90):.2f}), n={len(inside)} | "
              f"{pct(at_end, 50):.2f} ({pct(at_end, 10):.2f}), n={len(at_end)} |")
    if args.out:
        args.out.write_text(json.dumps({
            "runs": [dataclasses.asdict(r) for r in runs], "views": views, "costs": dataclasses.asdict(costs),
            "results": results}, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
