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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge import __version__, paths
from edge.audio.base import Clock, Speaker
from edge.audio.chunk import AudioChunk
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
from edge.wake.base import WakeDetector

if TYPE_CHECKING:
    from edge.models.registry import InstalledModel
    from edge.mqtt.client import MqttBridge

_LOGGER = logging.getLogger(__name__)

ROLES = ("wake", "stt", "vad", "llm", "lora", "tts", "faq")
RELOAD_TIMEOUT_S = 30.0


@dataclass
class Stages:
    wake: WakeDetector | None = None
    recognizer: Recognizer | None = None
    chat: ChatModel | None = None
    synth: Synthesizer | None = None
    embedder: Embedder | None = None  # sentence embeddings for the venue's FAQ matcher
    load_ms: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # role -> installed model version

    def close(self) -> None:
        for stage in (self.wake, self.recognizer, self.chat, self.synth):
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
            stages.recognizer = timed("stt", lambda: make_recognizer(cfg.stt, models["stt"].files, vad, cpu=cpu))
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
                 stages: Stages | None = None, status: Any = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.bus = bus or EventBus()
        self.cpu = CpuPolicy(share=cfg.llm.share_cores)
        self.stages = stages
        self._own_stages = stages is None
        self.status_sink = status or LogStatus()
        self.gate = EchoGate(cfg.audio.echo_cancel, cfg.audio.echo_guard_ms)
        self.speaker: Speaker | None = None
        self.conv: Conversation | None = None
        self.kiosk: Kiosk | None = None
        self.venue: Venue | None = None
        self.bridge: MqttBridge | None = None
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
        bridge.start()
        self.bus.subscribe(bridge.publish_event)
        self.bridge = bridge

    def open(self, speaker: Speaker) -> Conversation:
        """The conversation, speaking through ``speaker``, with the venue's knowledge; the LLM's
        system prompt evaluated (or loaded from disk)."""
        stages = self.load()
        self.speaker = speaker
        self.venue = self._venue(stages)
        if self.bridge is not None and self.venue is not None:
            self.bridge.set_knowledge(self.venue.status)  # the fleet sees which pack, which content
        conv = Conversation(self.cfg, bus=self.bus, clock=self.clock, speaker=speaker, wake=stages.wake,
                            recognizer=stages.recognizer, chat=stages.chat, synth=stages.synth, venue=self.venue)
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

    def start(self) -> None:
        assert self.conv is not None
        self.conv.start()

    def hear(self, chunk: AudioChunk, *, wait: bool = False) -> None:
        """Microphone audio, through the echo gate, to the conversation (``wait``: until handled)."""
        conv = self.conv
        assert conv is not None and self.speaker is not None
        chunk = self.gate.admit(chunk, conv.state.value, self.speaker.audible_until)
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
            "models_loaded": self.stages is not None,
        }
        out.update(self._extra_metrics())
        return out
