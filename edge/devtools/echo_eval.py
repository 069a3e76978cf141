"""Measure echo cancellation on synthetic echo: ERLE, self-triggered wakes, barge-in, CPU.

    python -m edge.devtools.echo_eval [--replies 50] [--engines none,speex,webrtc] [--gains 0,-10]
                                      [--delay-ms 60] [--json FILE]

The device speaks ``--replies`` replies in the dev Piper voice (about one in five mentions the
wake word, as a kiosk that says "just say hey Jarvis" does); a loudspeaker puts them into the
microphone ``--delay-ms`` later through a synthetic room response, at 0 dB and -10 dB relative to
a visitor's voice at -26 dBFS, over a -65 dBFS noise floor. One continuous stream per condition,
replies 0.8 s apart, so the canceller converges once as it would in a kiosk. Measured, per
engine and echo level, with the real dev wake word model (``config/dev.toml``):

- ERLE: echo energy in over echo energy out, where only the echo plays (first reply apart);
- self-triggered wakes over the replies alone;
- barge-in: a visitor's "hey Jarvis" (espeak-ng and Piper voices) spoken over each reply, 1-2.5 s
  into it; detected when the wake word fires within 1.5 s of the words' end;
- a question asked 0.3 s after a reply ended: its transcript (Whisper tiny.en) against the words;
- CPU: the engine's thread time over the audio it processed while the device spoke.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.audio.aec import AecSettings, EchoCanceller, active_level_dbfs, echo_gain, make_echo, room_impulse_response
from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk

__all__ = ["REPLIES", "Stream", "build_stream", "main"]

VISITOR_DBFS = -26.0
NOISE_DBFS = -65.0
GAP_S = 0.8
HIT_WINDOW_S = 1.5

REPLIES: tuple[str, ...] = (
    "The museum opens at nine in the morning and closes at six in the evening.",
    "The cafe on the ground floor serves lunch until three o'clock.",
    "Tickets cost twelve euros for adults and six euros for children.",
    "The toilets are next to the main staircase on every floor.",
    "You can leave your coat in the cloakroom by the entrance, it is free.",
    "The guided tour starts every hour at the information desk.",
    "The nearest train station is a ten minute walk down the hill.",
    "Bus number four goes to the old harbour every twenty minutes.",
    "There is a lift to the second floor behind the gift shop.",
    "Yes, students get a discount with a valid student card.",
    "If you have another question, just say hey Jarvis.",
    "The special exhibition about ships is on the first floor.",
    "Photography without flash is allowed in most rooms.",
    "The gift shop sells maps, postcards and books about the city.",
    "Hey Jarvis is all you need to say to ask me something else.",
    "The restaurant accepts cards and cash.",
    "Parking costs two euros an hour in the garage across the street.",
    "Dogs are welcome in the garden but not inside the museum.",
    "The outdoor exhibits stay open when it rains.",
    "Lost property is kept at the information desk for a month.",
    "To wake me again, say hey Jarvis and then your question.",
    "The shuttle to the airport leaves from the main square.",
    "The castle is about two kilometres from here.",
    "On Sundays the museum opens at ten.",
    "There is free wifi everywhere in the building.",
    "Audio guides are available in six languages at the desk.",
    "Say hey Jarvis whenever you need me.",
    "The children's workshop starts at two in the afternoon.",
    "The oldest ship in the collection was built in seventeen twenty.",
    "You can buy tickets for tomorrow here or online.",
    "Groups of more than ten people should book in advance.",
    "The terrace on the roof has a view over the whole harbour.",
    "I am sorry, I do not know that, please ask at the desk.",
    "Hey Jarvis, hey Jarvis, that is how you call me.",
    "The exhibition closes one hour before the museum does.",
    "Wheelchairs can be borrowed at the entrance free of charge.",
    "The cinema shows a short film about the harbour every half hour.",
    "The library on the third floor is open to everyone.",
    "The nearest pharmacy is on the corner of Market Street.",
    "The city centre is fifteen minutes away on foot.",
    "Just say hey Jarvis if you want to hear this again.",
    "Lockers for bags are in the basement next to the toilets.",
    "Food and drinks are not allowed in the exhibition rooms.",
    "The last entry is at five o'clock.",
    "Members get in for free all year round.",
    "The map shows the route from here to the lighthouse.",
    "The museum is closed on the first of January.",
    "Hey Jarvis works from anywhere in front of this screen.",
    "The café has vegetarian and vegan dishes every day.",
    "Thank you for visiting, enjoy the rest of your day.",
    "The first floor has the paintings, the second floor the models.",
    "Say hey Jarvis, then ask about opening times, tickets or directions.",
)

QUESTIONS: tuple[str, ...] = (
    "Where is the nearest train station?", "How much is a ticket for a child?",
    "Is there a lift to the second floor?", "When does the last guided tour start?",
    "Can I bring my dog into the garden?", "Where can I leave my coat?",
    "What time does the cafe close?", "Do you sell maps of the old town?",
    "How far is it to the castle?", "Is the museum open on Sunday?",
)


def mentions_wake(text: str) -> bool:
    return "hey jarvis" in text.lower()


@dataclass(frozen=True)
class Stream:
    mic: np.ndarray  # int16: visitor + echo + noise
    device: np.ndarray  # int16 at 16 kHz on the mic's timeline (what the loudspeaker played)
    echo: np.ndarray  # float64, the echo alone
    replies: tuple[tuple[int, int], ...]  # (start, end) samples of each reply
    visitor: tuple[tuple[int, int], ...]  # (start, end) of each visitor phrase (barge-in or question)


def build_stream(replies: Sequence[np.ndarray], visitor: Sequence[np.ndarray | None], *, relative_db: float,
                 delay_s: float, rir: np.ndarray, visitor_at: Callable[[int, int], int],
                 device_dbfs: float, seed: int = 0, gap_s: float = GAP_S) -> Stream:
    """Replies back to back (``gap_s`` apart), each with an optional visitor phrase placed by
    ``visitor_at(i, reply_length)`` samples after the reply starts."""
    parts, spans, vspans = [], [], []
    pos = 0
    for r in replies:
        spans.append((pos, pos + len(r)))
        parts.append(np.concatenate([r, np.zeros(int(gap_s * SAMPLE_RATE), np.int16)]))
        pos += len(parts[-1])
    device = np.concatenate(parts)
    tail = int(2.0 * SAMPLE_RATE)
    device = np.concatenate([device, np.zeros(tail, np.int16)])
    voice = np.zeros(len(device), np.float64)
    for i, (v, (a, b)) in enumerate(zip(visitor, spans)):
        if v is None:
            continue
        at = a + visitor_at(i, b - a)
        n = min(len(v), len(voice) - at)
        voice[at:at + n] += v[:n]
        vspans.append((at, at + n))
    gain = echo_gain(device_dbfs, VISITOR_DBFS, relative_db)
    echo = make_echo(device, delay_s=delay_s, rir=rir, gain=gain)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(device)) * 32768 * 10 ** (NOISE_DBFS / 20)
    mic = np.clip(np.round(voice + echo + noise), -32768, 32767).astype(np.int16)
    return Stream(mic, device, echo, tuple(spans), tuple(vspans))


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    lvl = active_level_dbfs(x)
    return np.clip(np.round(x.astype(np.float64) * 10 ** ((dbfs - lvl) / 20)), -32768, 32767).astype(np.int16)


@dataclass
class Cleaned:
    audio: np.ndarray
    cpu_s: float  # engine thread time
    speaking_s: float  # seconds of audio processed while the far end played


def cancel(stream: Stream, engine: str, tts_audio: Sequence[np.ndarray], tts_rate: int, delay_ms: int) -> Cleaned:
    """Run ``stream.mic`` through an EchoCanceller fed with what the speaker played, as in the
    daemon: the far end at the voice's own rate, timestamped when it leaves the loudspeaker."""
    if engine == "none":
        return Cleaned(stream.mic, 0.0, 0.0)
    ec = EchoCanceller(AecSettings(engine=engine, delay_ms=delay_ms))
    out = np.empty_like(stream.mic)
    block = int(0.02 * tts_rate)
    # The speaker's thread reports each 20 ms block as it leaves the queue, a little ahead of the mic.
    pending = [(a / SAMPLE_RATE + j / tts_rate, x[j:j + block])
               for (a, _), x in zip(stream.replies, tts_audio) for j in range(0, len(x), block)]
    pending.reverse()
    for i in range(0, len(stream.mic) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
        t = i / SAMPLE_RATE
        while pending and pending[-1][0] <= t + 0.1:
            at, x = pending.pop()
            ec.played(x, tts_rate, at)
        out[i:i + CHUNK_SAMPLES] = ec.process(AudioChunk(stream.mic[i:i + CHUNK_SAMPLES].copy(), i), at=t).samples
    speaking = sum(b - a for a, b in stream.replies) / SAMPLE_RATE
    ec.close()
    return Cleaned(out, ec.busy_s, speaking)


def erle_db(stream: Stream, cleaned: np.ndarray, skip_first: bool = True) -> float:
    """10 log10(echo in / residual out) over the replies (plus their tails), visitor-free spans."""
    mask = np.zeros(len(cleaned), bool)
    for k, (a, b) in enumerate(stream.replies):
        if skip_first and k == 0:
            continue
        mask[a:b + int(0.2 * SAMPLE_RATE)] = True
    for a, b in stream.visitor:
        mask[max(a - 1600, 0):b + 8000] = False
    e_in = np.mean(stream.mic[mask].astype(np.float64) ** 2)
    e_out = np.mean(cleaned[mask].astype(np.float64) ** 2)
    return 10 * math.log10(e_in / max(e_out, 1e-9))


def wake_hits(detector: Any, audio: np.ndarray) -> list[float]:
    detector.reset()
    hits: list[float] = []
    for i in range(0, len(audio) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
        hits.extend(h.audio_time for h in detector.process(AudioChunk(audio[i:i + CHUNK_SAMPLES].copy(), i)))
    return hits


def in_spans(t: float, spans: Sequence[tuple[int, int]], after_s: float) -> int | None:
    for k, (a, b) in enumerate(spans):
        if a / SAMPLE_RATE <= t <= b / SAMPLE_RATE + after_s:
            return k
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--config", default="config/dev.toml")
    ap.add_argument("--replies", type=int, default=len(REPLIES))
    ap.add_argument("--engines", default="none,speex,webrtc")
    ap.add_argument("--gains", default="0,-10", help="echo level relative to the visitor, dB")
    ap.add_argument("--delay-ms", type=int, default=60, help="loudspeaker-to-microphone delay of the echo")
    ap.add_argument("--lead-ms", type=int, default=0,
                    help="AecSettings.delay_ms: how far the reference is taken earlier")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--pulse", default="", help="also PulseAudio's module-echo-cancel with these aec_methods "
                    "(e.g. webrtc,speex), in real time, over the first --pulse-replies replies")
    ap.add_argument("--pulse-replies", type=int, default=15)
    args = ap.parse_args(argv)

    from edge.config import load_config
    from edge.devtools.turn_set import espeak_voice, piper_voice
    from edge.models.registry import ModelRegistry
    from edge.wake import make_wake_detector

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cfg = load_config(args.config)
    reg = ModelRegistry()
    detector = make_wake_detector(cfg.wake, dict(reg.resolve(cfg.wake.model).files))
    assert detector is not None
    piper = piper_voice()

    t0 = time.monotonic()
    texts = [REPLIES[i % len(REPLIES)] for i in range(args.replies)]
    replies16 = [piper(t) for t in texts]
    # The far end as the speaker plays it: the voice's own rate (22.05 kHz for joe).
    tts_rate = 22050
    from edge.audio.chunk import resample

    replies_tts = [resample(r, SAMPLE_RATE, tts_rate) for r in replies16]
    replies16 = [resample(r, tts_rate, SAMPLE_RATE) for r in replies_tts]  # what the room hears
    device_dbfs = active_level_dbfs(np.concatenate(replies16))
    wakes = []
    espeak_voices = [("en-us", 150), ("en-gb", 160), ("en-us+f3", 140), ("en-gb+m3", 170)]
    for v, rate in espeak_voices:
        wakes.append(espeak_voice(v, rate)("hey jarvis"))
    wakes.append(piper("Hey Jarvis."))
    wakes = [at_level(w, VISITOR_DBFS) for w in wakes]
    say(f"synthesized {len(replies16)} replies and {len(wakes)} wake words in {time.monotonic() - t0:.0f} s")

    # The wake word alone, no echo: the ceiling for barge-in.
    clean_hits = []
    for w in wakes:
        x = np.concatenate([np.zeros(8000, np.int16), w, np.zeros(24000, np.int16)])
        clean_hits.append(bool(wake_hits(detector, x)))
    rir = room_impulse_response(rt60_s=0.3, seed=7)
    delay_s = args.delay_ms / 1000
    engines = [e for e in args.engines.split(",") if e]
    gains = [float(g) for g in args.gains.split(",")]
    results: dict[str, Any] = {"clean_wake_detected": clean_hits,
                               "wake_voices": [v for v, _ in espeak_voices] + ["piper"]}
    rows = []
    n_wake_replies = sum(mentions_wake(t) for t in texts)
    for g in gains:
        self_stream = build_stream(replies16, [None] * len(replies16), relative_db=g, delay_s=delay_s, rir=rir,
                                   visitor_at=lambda i, n: 0, device_dbfs=device_dbfs, seed=1)
        visitors = [wakes[i % len(wakes)] for i in range(len(replies16))]
        barge = build_stream(replies16, visitors, relative_db=g, delay_s=delay_s, rir=rir,
                             visitor_at=lambda i, n: min(int((1.0 + 0.3 * (i % 6)) * SAMPLE_RATE), max(n - 16000, 0)),
                             device_dbfs=device_dbfs, seed=2)
        for eng in engines:
            c_self = cancel(self_stream, eng, replies_tts, tts_rate, args.lead_ms)
            c_barge = cancel(barge, eng, replies_tts, tts_rate, args.lead_ms)
            self_hits = wake_hits(detector, c_self.audio)
            self_in = [in_spans(t, self_stream.replies, 1.0) for t in self_hits]
            self_wake_mention = sum(1 for k in self_in if k is not None and mentions_wake(texts[k]))
            b_hits = wake_hits(detector, c_barge.audio)
            found = {k for t in b_hits if (k := in_spans(t, barge.visitor, HIT_WINDOW_S)) is not None}
            false_barge = sum(1 for t in b_hits if in_spans(t, barge.visitor, HIT_WINDOW_S) is None)
            by_voice = [0] * len(wakes)
            for k in found:
                by_voice[k % len(wakes)] += 1
            r = {
                "gain_db": g, "engine": eng,
                "erle_db": None if eng == "none" else round(erle_db(self_stream, c_self.audio), 1),
                "erle_first_reply_db": None if eng == "none" else round(erle_db(
                    Stream(self_stream.mic, self_stream.device, self_stream.echo, self_stream.replies[:1], ()),
                    c_self.audio, skip_first=False), 1),
                "self_wakes": len(self_hits), "self_wakes_on_wake_mentions": self_wake_mention,
                "replies": len(replies16), "replies_mentioning_wake": n_wake_replies,
                "barge_in_detected": len(found), "barge_in_trials": len(barge.visitor),
                "barge_in_by_voice": by_voice, "other_wakes_in_barge_stream": false_barge,
                "cpu_pct_while_speaking": (round(100 * c_self.cpu_s / c_self.speaking_s, 2)
                                           if c_self.speaking_s else 0.0),
            }
            rows.append(r)
            say(json.dumps(r))
    results["rows"] = rows
    for method in [m for m in args.pulse.split(",") if m]:
        import tempfile

        k = args.pulse_replies
        for g in gains:
            barge = build_stream(replies16[:k], [wakes[i % len(wakes)] for i in range(k)], relative_db=g,
                                 delay_s=delay_s, rir=rir,
                                 visitor_at=lambda i, n: min(int((1.0 + 0.3 * (i % 6)) * SAMPLE_RATE),
                                                             max(n - 16000, 0)),
                                 device_dbfs=device_dbfs, seed=2)
            with tempfile.TemporaryDirectory() as tmp:
                cleaned, used = pulse_cancel(barge, method, tmp)
            hits = wake_hits(detector, cleaned)
            found = {k2 for t in hits if (k2 := in_spans(t, barge.visitor, HIT_WINDOW_S)) is not None}
            others = sum(1 for t in hits if in_spans(t, barge.visitor, HIT_WINDOW_S) is None)
            mentions = sum(1 for t in hits if (k3 := in_spans(t, barge.replies, 1.0)) is not None
                           and in_spans(t, barge.visitor, HIT_WINDOW_S) is None and mentions_wake(texts[k3]))
            r = {"gain_db": g, "engine": f"pulse-{method}", "erle_db": round(erle_db(barge, cleaned), 1),
                 "erle_first_reply_db": None, "self_wakes": others, "self_wakes_on_wake_mentions": mentions,
                 "replies": k, "replies_mentioning_wake": sum(mentions_wake(t) for t in texts[:k]),
                 "barge_in_detected": len(found), "barge_in_trials": len(barge.visitor),
                 "barge_in_by_voice": [], "other_wakes_in_barge_stream": others,
                 "cpu_pct_while_speaking": round(used, 2)}
            rows.append(r)
            say(json.dumps(r))

    # Questions asked right after a reply: the transcript against the words.
    q_rows = []
    if args.questions:
        from edge.stt import make_recognizer

        rec = make_recognizer(cfg.stt, reg.resolve(cfg.stt.model).files, reg.resolve(cfg.stt.vad_model).files)
        espeak_q = espeak_voice("en-us", 150)
        qs = [at_level(espeak_q(q), VISITOR_DBFS) for q in QUESTIONS[: args.questions]]
        for g in gains:
            # Each question 0.3 s after a reply ends, in a gap long enough for it (no next reply over it).
            st = build_stream(replies16[: len(qs)], qs, relative_db=g, delay_s=delay_s, rir=rir,
                              visitor_at=lambda i, n: n + int(0.3 * SAMPLE_RATE), device_dbfs=device_dbfs, seed=3,
                              gap_s=6.0)
            for eng in engines + ["gate", "no echo"]:
                if eng == "no echo":
                    audio = np.clip(np.round(st.mic - st.echo), -32768, 32767).astype(np.int16)
                else:
                    audio = cancel(st, "none" if eng == "gate" else eng, replies_tts, tts_rate, args.lead_ms).audio
                errs = []
                for (_, b), q in zip(st.replies, QUESTIONS[: args.questions]):
                    seg = audio[b:b + int(6.0 * SAMPLE_RATE)].copy()
                    if eng == "gate":  # today's echo gate: silence until the reply's sound is over + 200 ms
                        seg[: int((delay_s + 0.2) * SAMPLE_RATE)] = 0
                    errs.append(wer(q, transcribe(rec, seg)))
                q_rows.append({"gain_db": g, "engine": eng, "wer_mean": round(float(np.mean(errs)), 3),
                               "questions_with_errors": int(sum(e > 0 for e in errs)), "questions": len(errs)})
                say(json.dumps(q_rows[-1]))
        rec.close()
    results["questions"] = q_rows
    print_table(rows, q_rows, clean_hits)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


def pulse_cancel(stream: Stream, method: str, workdir: str) -> tuple[np.ndarray, float]:
    """Run ``stream`` through PulseAudio's module-echo-cancel (``aec_method=method``) in a private
    server with null sinks, in real time: the device's output is played into the canceller's sink,
    the microphone signal into the sink its source listens to. Returns the cancelled microphone
    (aligned to ``stream.mic``) and the server's CPU use over the run, in % of one core."""
    import os
    import shutil
    import subprocess
    import wave
    from pathlib import Path

    d = Path(workdir)
    for sub in ("home", "run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
        (d / sub).chmod(0o700)
    sock = d / "ctl.sock"
    (d / "pulse.pa").write_text("\n".join([
        f"load-module module-native-protocol-unix auth-anonymous=1 socket={sock}",
        f"load-module module-null-sink sink_name=speaker rate={SAMPLE_RATE} channels=1",
        f"load-module module-null-sink sink_name=micfeed rate={SAMPLE_RATE} channels=1",
        f"load-module module-echo-cancel aec_method={method} source_master=micfeed.monitor sink_master=speaker "
        f"source_name=ec_mic sink_name=ec_speaker rate={SAMPLE_RATE} channels=1 use_master_format=1",
    ]) + "\n")
    env = dict(os.environ, HOME=str(d / "home"), XDG_RUNTIME_DIR=str(d / "run"), PULSE_SERVER=f"unix:{sock}")

    def wav(path: Path, x: np.ndarray) -> None:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(x.astype("<i2").tobytes())

    wav(d / "far.wav", stream.device)
    wav(d / "mic.wav", stream.mic)
    server = subprocess.Popen(["pulseaudio", "-n", "-F", str(d / "pulse.pa"), "--daemonize=no", "--exit-idle-time=-1",
                               "--use-pid-file=no", "--realtime=no", "--log-target=stderr"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(200):
            if sock.exists() and subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("pulseaudio did not start")

        def cpu() -> float:
            f = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        rec = subprocess.Popen(["parec", "-d", "ec_mic", "--format=s16le", f"--rate={SAMPLE_RATE}", "--channels=1",
                                "--raw", "--latency-msec=20", str(d / "out.raw")], env=env)
        procs.append(rec)
        time.sleep(0.5)
        c0, t0 = cpu(), time.monotonic()
        players = [subprocess.Popen(["paplay", "-d", sink, "--latency-msec=20", str(d / f)], env=env)
                   for sink, f in (("ec_speaker", "far.wav"), ("micfeed", "mic.wav"))]
        procs += players
        for p in players:
            p.wait()
        time.sleep(1.0)
        used = 100 * (cpu() - c0) / (time.monotonic() - t0)
        rec.terminate()
        rec.wait()
        out = np.fromfile(d / "out.raw", dtype="<i2").astype(np.int16)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.terminate()
        server.wait()
        shutil.rmtree(d / "run", ignore_errors=True)
    # Align: the recording starts before the players; find the offset of the mic signal in it.
    n = min(len(stream.mic), 20 * SAMPLE_RATE)
    ref = stream.mic[:n].astype(np.float64)
    spec = np.fft.rfft(out[: n + 3 * SAMPLE_RATE].astype(np.float64), 2 * (n + 3 * SAMPLE_RATE))
    corr = np.fft.irfft(spec * np.conj(np.fft.rfft(ref, 2 * (n + 3 * SAMPLE_RATE))))
    lag = int(np.argmax(corr[: 3 * SAMPLE_RATE]))
    aligned = np.zeros_like(stream.mic)
    seg = out[lag: lag + len(stream.mic)]
    aligned[: len(seg)] = seg
    return aligned, used


def transcribe(rec: Any, audio: np.ndarray) -> str:
    from edge.stt.base import UpdateKind

    rec.start([])
    x = np.concatenate([audio, np.zeros(int(2.0 * SAMPLE_RATE), np.int16)])
    for i in range(0, len(x) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
        for u in rec.accept(AudioChunk(x[i:i + CHUNK_SAMPLES].copy(), i)):
            if u.kind == UpdateKind.FINAL:
                return str(u.text)
    f = rec.finish()
    return f.text if f is not None else ""


def _words(text: str) -> list[str]:
    import re

    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))


def print_table(rows: Sequence[dict[str, Any]], q_rows: Sequence[dict[str, Any]], clean: Sequence[bool]) -> None:
    print(f"wake word alone, no echo: {sum(clean)}/{len(clean)} voices detected")
    print()
    print("| echo | engine | ERLE dB (first reply) | self-wakes / replies (on replies saying it) | "
          "barge-in detected | other wakes | CPU while speaking |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        erle = "-" if r["erle_db"] is None else f"{r['erle_db']} ({r['erle_first_reply_db']})"
        print(f"| {r['gain_db']:+.0f} dB | {r['engine']} | {erle} | {r['self_wakes']}/{r['replies']} "
              f"({r['self_wakes_on_wake_mentions']}/{r['replies_mentioning_wake']}) | "
              f"{r['barge_in_detected']}/{r['barge_in_trials']} "
              f"({100 * r['barge_in_detected'] / max(r['barge_in_trials'], 1):.0f} %) | "
              f"{r['other_wakes_in_barge_stream']} | {r['cpu_pct_while_speaking']} % |")
    if q_rows:
        print()
        print("| echo | engine | question right after a reply: mean WER | questions with errors |")
        print("|---|---|---|---|")
        for q in q_rows:
            print(f"| {q['gain_db']:+.0f} dB | {q['engine']} | {q['wer_mean']:.3f} | "
                  f"{q['questions_with_errors']}/{q['questions']} |")


if __name__ == "__main__":
    sys.exit(main())
