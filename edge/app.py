"""The composition root: one place that builds the pipeline from config, for `run`, `simulate` and `bench`.

:func:`load_stages` resolves every model id first (a device missing two models says so in one
line with one fetch command, before anything slow is loaded), then loads each stage's backend
with the pipeline's one :class:`~edge.cpu.CpuPolicy`. Nothing here downloads.

:class:`Pipeline` holds what one device runs between a microphone and a speaker: the stages,
the conversation, the echo gate, the kiosk glue (buttons, handset, chimes) and, when enabled,
the MQTT bridge whose commands reach them through :class:`~edge.control.Controller`. The daemon
(:mod:`edge.daemon`) adds the live microphone, systemd and device recovery; ``simulate``
(:mod:`edge.simulate`) a WAV file as the microphone and a WAV file as the speaker.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge import __version__, paths
from edge.audio.base import Clock, Speaker
from edge.audio.chunk import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from edge.audio.echo import EchoGate
from edge.config import Config
from edge.control import Controller
from edge.conversation import Conversation
from edge.cpu import CpuPolicy
from edge.errors import EdgeError, ModelError
from edge.events import EventBus
from edge.kiosk import Kiosk
from edge.knowledge.matcher import Embedder
from edge.knowledge.venue import Venue
from edge.llm.base import ChatModel
from edge.signals import CancelScope
from edge.stt.base import Recognizer
from edge.tts.base import Synthesizer
from edge.turn.base import TurnDetector
from edge.wake.base import WakeDetector

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edge.audio.aec import EchoCanceller
    from edge.models.registry import InstalledModel
    from edge.mqtt.client import MqttBridge
    from edge.rollout.manager import RolloutManager
    from edge.stt.vad import TalkOver

_LOGGER = logging.getLogger(__name__)

ROLES = ("wake", "stt", "vad", "llm", "lora", "tts", "faq", "turn")
RELOAD_TIMEOUT_S = 30.0
ECHO_LEARN_S = 5.0  # of the device's own sound, before the echo canceller's estimate is trusted


@dataclass
class Stages:
    wake: WakeDetector | None = None
    recognizer: Recognizer | None = None
    chat: ChatModel | None = None
    synth: Synthesizer | None = None
    embedder: Embedder | None = None  # sentence embeddings for the venue's FAQ matcher
    turn: TurnDetector | None = None  # an audio end-of-turn model ([turn] detector)
    load_ms: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # role -> installed model version

    def close(self) -> None:
        for stage in (self.wake, self.recognizer, self.chat, self.synth, self.turn):
            if stage is not None:
                try:
                    stage.close()
                except Exception:
                    _LOGGER.exception("closing %s failed", type(stage).__name__)


def resolve_models(cfg: Config, roles: tuple[str, ...] = ROLES) -> dict[str, InstalledModel]:
    """Model id → installed model for every role the config uses; one error for all missing."""
    from edge.models.registry import ModelRegistry

    registry = ModelRegistry(cfg.models_dir)
    wanted = {role: mid for role, mid in cfg.model_ids().items() if role in roles}
    found: dict[str, InstalledModel] = {}
    missing: list[tuple[str, ModelError]] = []
    for role, model_id in wanted.items():
        try:
            found[role] = registry.resolve(model_id)
        except ModelError as err:
            missing.append((model_id, err))
    if len(missing) == 1:
        raise missing[0][1]
    if missing:
        ids = " ".join(f"--model {mid}" for mid, _ in missing)
        raise ModelError(
            f"models {', '.join(mid for mid, _ in missing)} are not installed and verified in "
            f"{cfg.models_dir}: run `edge-voice models fetch {ids} --root {cfg.models_dir}`",
            code="model.missing")
    return found


def load_stages(cfg: Config, cpu: CpuPolicy, roles: tuple[str, ...] = ROLES, *,
                llm_path: Path | None = None) -> Stages:
    """Load each stage the config names. ``llm_path`` loads that GGUF instead of ``llm.model``
    (the benchmark's random-weight models)."""
    models = resolve_models(cfg, tuple(r for r in roles if not (r == "llm" and llm_path is not None)))
    stages = Stages(versions={role: m.version for role, m in models.items()})

    def timed(role: str, load: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        obj = load()
        stages.load_ms[role] = ms = round(1000 * (time.monotonic() - t0), 1)
        _LOGGER.info("%s model loaded in %.0f ms", role, ms)
        return obj

    try:
        if "wake" in models:
            from edge.wake import make_wake_detector

            stages.wake = timed("wake", lambda: make_wake_detector(cfg.wake, dict(models["wake"].files)))
        if "stt" in models:
            from edge.stt import make_recognizer

            vad = models["vad"].files if "vad" in models else None
            longest = cfg.turn.max_silence_s if cfg.turn.enabled else None  # what an end-of-turn view may give
            stages.recognizer = timed("stt", lambda: make_recognizer(cfg.stt, models["stt"].files, vad, cpu=cpu,
                                                                     max_silence_s=longest))
        if "llm" in roles and (llm_path is not None or "llm" in models):
            from edge.llm import make_chat_model

            path = llm_path or _gguf(models["llm"])
            adapter = _gguf(models["lora"]) if "lora" in models else None
            state_dir = paths.cache_dir() / "llm-state" if cfg.knowledge.save_prompt_state else None
            stages.chat = timed("llm", lambda: make_chat_model(cfg.llm, path, cpu=cpu, adapter=adapter,
                                                               state_dir=state_dir))
        if "tts" in models:
            from edge.tts import make_synthesizer

            stages.synth = timed("tts", lambda: make_synthesizer(cfg.tts, dict(models["tts"].files), cpu=cpu))
        if "faq" in models:
            from edge.knowledge.embed import MiniLM

            faq = models["faq"]
            stages.embedder = timed("faq", lambda: MiniLM(faq.path("model"), faq.path("vocab")))
        if "turn" in models:
            from edge.turn import make_turn_detector

            files = dict(models["turn"].files)
            stages.turn = timed("turn", lambda: make_turn_detector(cfg.turn.detector, files,
                                                                   threads=cfg.turn.num_threads, cpu=cpu))
    except BaseException:
        stages.close()
        raise
    return stages


def _gguf(model: InstalledModel) -> Path:
    for name, path in model.files.items():
        if name.endswith(".gguf"):
            return path
    raise ModelError(f"model {model.id!r} has no .gguf file", code="model.bad")


def _speak(synth: Synthesizer, text: str) -> np.ndarray:
    pieces = list(synth.synthesize(text, CancelScope()))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)


@dataclass
class Candidate:
    """What a rollout loads and self-tests before it serves visitors: fresh stages for the roles
    it changes (and the voice and speech-to-text the self-test uses; None where the serving stage
    stays), and the venue rebuilt on them when the config has a pack."""

    stages: Stages
    venue: Venue | None = None

    @property
    def wake(self) -> WakeDetector | None:
        return self.stages.wake

    @property
    def recognizer(self) -> Recognizer | None:
        return self.stages.recognizer

    @property
    def chat(self) -> ChatModel | None:
        return self.stages.chat

    @property
    def synth(self) -> Synthesizer | None:
        return self.stages.synth

    @property
    def embedder(self) -> Embedder | None:
        return self.stages.embedder

    def close(self) -> None:
        self.stages.close()


class _RolloutReport:
    """Where the rollout manager's progress goes: events through the bridge's outbox, the status."""

    def __init__(self, bridge: MqttBridge) -> None:
        self.bridge = bridge

    def rollout_event(self, event_type: str, body: dict[str, Any]) -> None:
        self.bridge.publish_record(event_type, body)

    def rollout_status(self, status: dict[str, Any] | None, versions: dict[str, Any]) -> None:
        self.bridge.set_status_fields(rollout=status, versions=versions)


class LogStatus:
    """Where a pipeline without systemd says how it is: the log."""

    def status(self, text: str, state: str | None = None) -> None:
        _LOGGER.info("status: %s", text)

    def refresh_status(self) -> None:
        pass


class Pipeline:
    """One device's pipeline, built in the order its host calls: :meth:`load`, :meth:`connect`,
    :meth:`open`, :meth:`start`; :meth:`close` takes it down again."""

    def __init__(self, cfg: Config, *, clock: Clock, bus: EventBus | None = None,
                 stages: Stages | None = None, status: Any = None, timeline_clock: bool = False) -> None:
        """``timeline_clock``: the clock and the speaker's times are the microphone's timeline
        (a simulation), not ``time.monotonic()``."""
        self.cfg = cfg
        self.clock = clock
        self.bus = bus or EventBus()
        self.cpu = CpuPolicy(share=cfg.llm.share_cores)
        self.stages = stages
        self._own_stages = stages is None
        self.status_sink = status or LogStatus()
        self.gate = EchoGate(cfg.audio.echo_cancel, cfg.audio.echo_guard_ms)
        self.aec: EchoCanceller | None = None
        self._talk_over: TalkOver | None = None  # hears a visitor talking over the device
        self._echo_learned = False
        self._timeline_clock = timeline_clock
        self.speaker: Speaker | None = None
        self.conv: Conversation | None = None
        self.kiosk: Kiosk | None = None
        self.venue: Venue | None = None
        self.bridge: MqttBridge | None = None
        self.rollouts: RolloutManager | None = None
        self.started = time.monotonic()
        self._extra_metrics: Callable[[], dict[str, Any]] = dict

    # -- building -------------------------------------------------------------------------------
    def load(self) -> Stages:
        if self.stages is None:
            self.stages = load_stages(self.cfg, self.cpu)
            _LOGGER.info("models loaded: %s", self.stages.load_ms)
        return self.stages

    @property
    def output_rate(self) -> int:
        synth = self.stages.synth if self.stages is not None else None
        return synth.sample_rate if synth is not None else 16000

    def connect(self, metrics: Callable[[], dict[str, Any]] | None = None) -> None:
        """Start the MQTT bridge, when enabled: commands may arrive before the conversation exists."""
        if metrics is not None:
            self._extra_metrics = metrics
        if not self.cfg.mqtt.enabled:
            return
        from edge.mqtt.client import MqttBridge

        bridge = MqttBridge(self.cfg.mqtt, self.cfg.device_id, self.cfg.state_dir, Controller(self),
                            version=__version__, models=self.cfg.model_ids(), tags=self.cfg.device.tags)
        bridge.set_metrics_source(self.metrics)
        if self.venue is not None:
            bridge.set_knowledge(self.venue.status)
        from edge.rollout.manager import RolloutManager

        # The manager exists before the bridge connects: a retained desired rollout arrives with the
        # connection, and one that found no manager would not be read again until the next one.
        self.rollouts = RolloutManager(self.cfg, self, _RolloutReport(bridge))
        self.bus.subscribe(self.rollouts.on_event)
        self.rollouts.start()  # its reports wait in the bridge's outbox and status until it connects
        self.bridge = bridge
        bridge.start()
        self.bus.subscribe(bridge.publish_event)

    def open(self, speaker: Speaker) -> Conversation:
        """The conversation, speaking through ``speaker``, with the venue's knowledge; the LLM's
        system prompt evaluated (or loaded from disk)."""
        stages = self.load()
        self.speaker = speaker
        self.aec = self._echo_canceller()
        if self.aec is not None:
            speaker.on_played(self.aec.played)
        if self.cfg.conversation.barge_in == "speech":
            from edge.stt.vad import TalkOver

            vad = resolve_models(self.cfg, roles=("vad",))["vad"]
            self._talk_over = TalkOver(self.cfg.stt, next(iter(vad.files.values())),
                                       self.cfg.conversation.barge_in_speech_s)
        self.venue = self._venue(stages)
        if self.bridge is not None and self.venue is not None:
            self.bridge.set_knowledge(self.venue.status)  # the fleet sees which pack, which content
        conv = Conversation(self.cfg, bus=self.bus, clock=self.clock, speaker=speaker, wake=stages.wake,
                            recognizer=stages.recognizer, chat=stages.chat, synth=stages.synth, venue=self.venue,
                            turn_detector=stages.turn)
        self.kiosk = Kiosk(self.cfg, conv, speaker, self.gate)
        self.bus.subscribe(self.kiosk.on_event)
        if stages.wake is not None:
            stages.wake.reset()
        if stages.chat is not None:
            self.status_sink.status("warming the language model")
            stages.chat.warm(self.venue.base_prompt() if self.venue is not None else self.cfg.llm.system_prompt)
        self.conv = conv
        return conv

    def _venue(self, stages: Stages) -> Venue | None:
        """The venue of ``[knowledge] pack``: its FAQ answers synthesized (once, kept on disk) and
        the LLM's grounding. A pack that fails its check stops the start with its first problem."""
        k = self.cfg.knowledge
        if not k.pack:
            return None
        from edge.knowledge.store import resolve_pack
        from edge.knowledge.venue import AnswerAudio, build_venue

        self.status_sink.status("loading the venue's knowledge")
        pack = resolve_pack(k.pack, self.cfg.packs_dir)
        synth, chat = stages.synth, stages.chat
        audio = None
        if synth is not None:
            tts = self.cfg.tts
            voice = f"{tts.model}@{stages.versions.get('tts', '')}/{tts.speaker_id}/{tts.speed}"
            audio = AnswerAudio(paths.cache_dir() / "faq-audio", voice, lambda text: _speak(synth, text))
        return build_venue(pack, faq=k.faq, embedder=stages.embedder,
                           count_tokens=chat.count_tokens if chat is not None else None,
                           budget_tokens=k.prompt_budget_tokens, answer_audio=audio)

    def _echo_canceller(self) -> EchoCanceller | None:
        a = self.cfg.audio
        if a.aec_engine == "none" or a.echo_cancel:  # (a platform echo-cancel source does it)
            return None
        from edge.audio.aec import AecSettings, make_echo_canceller

        return make_echo_canceller(AecSettings(engine=a.aec_engine, delay_ms=a.aec_delay_ms,
                                               input_latency_ms=a.aec_input_latency_ms, tail_ms=a.aec_tail_ms,
                                               auto_delay=a.aec_auto_delay, max_delay_ms=a.aec_max_delay_ms))

    @property
    def echo_converged(self) -> bool:
        """The echo canceller has learned the room (until then the echo rule holds). It stays
        learned: a visitor talking over the device lowers the running estimate without undoing it."""
        if self.aec is None:
            return False
        heard_s = self.aec.with_reference * CHUNK_SAMPLES / SAMPLE_RATE  # the estimate means little before
        if not self._echo_learned and heard_s >= ECHO_LEARN_S and self.aec.erle_db >= self.cfg.audio.aec_converged_db:
            _LOGGER.info("echo canceller: %.0f dB of echo removed; the visitor may talk over the device",
                         self.aec.erle_db)
            self._echo_learned = True
        return self._echo_learned

    def start(self) -> None:
        assert self.conv is not None
        self.conv.start()

    def hear(self, chunk: AudioChunk, *, wait: bool = False) -> None:
        """Microphone audio, without the device's own sound (the echo canceller, on the audio
        thread; until it has learned the room, also the echo gate), to the conversation
        (``wait``: until handled)."""
        conv = self.conv
        assert conv is not None and self.speaker is not None
        if self.aec is not None:
            chunk = self.aec.process(chunk, at=chunk.start / chunk.rate if self._timeline_clock else None)
        if not self.echo_converged:
            chunk = self.gate.admit(chunk, conv.state.value, self.speaker.audible_until)
        elif self._talk_over is not None:
            assert self.aec is not None
            since = self._talk_over.hear(chunk, conv.state.value in ("thinking", "speaking"), self.aec.last_removed_db)
            if since is not None:
                conv.interrupted_by_speech(since)
        if wait:
            conv.process(chunk)
        else:
            conv.feed(chunk)

    def close(self, bridge_timeout: float = 5.0) -> None:
        """Stop the conversation, then the speaker, then the fleet link, then free the models."""
        if self.kiosk is not None:
            self.kiosk.close()
        if self.conv is not None:
            self.conv.stop()
        if self.speaker is not None:
            self.speaker.close()
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.bridge is not None:
            self.bridge.stop(timeout=bridge_timeout)
        if self.stages is not None and self._own_stages:
            self.stages.close()

    # -- what commands change ---------------------------------------------------------------------
    def reload_models(self) -> None:
        """Load fresh stages on the caller's thread; the conversation swaps them in between
        chunks and the old ones are freed."""
        new = load_stages(self.cfg, self.cpu)
        if new.chat is not None:
            new.chat.warm(self.cfg.llm.system_prompt)
        if self.conv is None:
            new.close()
            raise EdgeError("the device is still starting", code="busy")
        old = self.conv.replace_stages(new).result(RELOAD_TIMEOUT_S)
        self.stages, self._own_stages = new, True
        old.close()
        _LOGGER.info("models reloaded")

    # -- rollouts (edge.rollout.manager drives these) -----------------------------------------------
    def rollout(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if self.rollouts is None:
            raise EdgeError("rollouts come over MQTT: enable [mqtt] on this device", code="cmd.unsupported")
        return self.rollouts.request(request)

    def in_turn(self) -> bool:
        conv = self.conv
        return conv is None or not conv.idle()

    def _merged(self, fresh: Stages) -> Stages:
        """The serving stages with the fresh ones in their place."""
        assert self.stages is not None
        new = {name: getattr(fresh, name) for name in ("wake", "recognizer", "chat", "synth", "embedder", "turn")
               if getattr(fresh, name) is not None}
        return dataclasses.replace(self.stages, **new, versions={**self.stages.versions, **fresh.versions},
                                   load_ms={**self.stages.load_ms, **fresh.load_ms})

    def load_candidate(self, roles: tuple[str, ...]) -> Candidate:
        """Fresh stages for ``roles`` and for the voice and speech-to-text (the self-test's mouth and
        ear), from the installed current versions, on the caller's thread; the venue on them."""
        wanted = set(roles) | {"stt", "vad", "tts"}
        if wanted & {"llm", "lora"}:
            wanted |= {"llm", "lora"}
        fresh = load_stages(self.cfg, self.cpu, tuple(r for r in ROLES if r in wanted))
        candidate = Candidate(fresh)
        try:
            if self.cfg.knowledge.pack and self.stages is not None:
                candidate.venue = self._venue(self._merged(fresh))
            if fresh.chat is not None:
                fresh.chat.warm(candidate.venue.base_prompt() if candidate.venue is not None
                                else self.cfg.llm.system_prompt)
        except BaseException:
            fresh.close()
            raise
        finally:
            self.status_sink.refresh_status()
        return candidate

    def adopt(self, candidate: Candidate) -> None:
        """Between turns: the candidate's stages (and venue) serve from now on; those they replace are freed."""
        conv = self.conv
        if conv is None or self.stages is None:
            raise EdgeError("the device is still starting", code="busy")
        merged = self._merged(candidate.stages)
        old = conv.replace_stages(merged).result(RELOAD_TIMEOUT_S)
        if self.cfg.knowledge.pack and candidate.venue is not None:
            conv.venue = self.venue = candidate.venue
            if candidate.chat is None and merged.chat is not None:
                merged.chat.warm(candidate.venue.base_prompt())  # the serving LLM, the new pack's prompt
            if self.bridge is not None:
                self.bridge.set_knowledge(candidate.venue.status)
        self.stages, self._own_stages = merged, True
        for name in ("wake", "recognizer", "chat", "synth", "turn"):
            replaced = getattr(old, name)
            if getattr(candidate.stages, name) is not None and replaced is not None:
                try:
                    replaced.close()
                except Exception:
                    _LOGGER.exception("closing the replaced %s failed", name)
        _LOGGER.info("rollout: new stages in service (%s)", ", ".join(sorted(candidate.stages.versions)))

    def apply_setting(self, key: str, value: Any) -> None:
        """One runtime setting, validated by the command schema, to the object that owns it."""
        conv = self.conv
        if conv is None:
            raise EdgeError("the device is still starting", code="busy")
        if key == "audio.volume" and self.speaker is not None:
            self.speaker.volume = value
        elif key in ("llm.temperature", "llm.top_p") and self.stages is not None and self.stages.chat is not None:
            self.stages.chat.set_sampling(**{key.partition(".")[2]: value})
        conv.apply_settings({key: value})
        self.cfg = conv.cfg

    def handset(self, state: str) -> dict[str, Any]:
        if self.kiosk is None:
            raise EdgeError("the device is still starting", code="busy")
        return self.kiosk.hook(state == "off-hook")

    def metrics(self) -> dict[str, Any]:
        conv, speaker = self.conv, self.speaker
        out: dict[str, Any] = {
            "conversation": conv.state.value if conv else "loading",
            "turns": conv.turns_done if conv else 0,
            "speaker": speaker.state if speaker else "closed",
            "speaker_dropped_blocks": speaker.dropped_blocks if speaker else 0,
            "echo_gated_chunks": self.gate.silenced,
            "echo_cancelled_db": round(self.aec.erle_db, 1) if self.aec is not None else None,
            "models_loaded": self.stages is not None,
        }
        out.update(self._extra_metrics())
        return out
