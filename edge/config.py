"""Configuration: one TOML file plus ``EDGE_VOICE_<SECTION>__<KEY>`` environment overrides.

Every section is a frozen dataclass; each field documents itself (``doc``) and may carry a
range or a set of choices. The loader rejects unknown keys and bad values with one line that
names the file, the key and why, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_origin, get_type_hints

from edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

ENV_PREFIX = "EDGE_VOICE_"
DEVICE_ID_RE = re.compile(r"^[a-z0-9_-]{1,64}$")


def opt(default: Any, doc: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, secret: bool = False) -> Any:
    """A config field with its documentation and constraints."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "secret": secret}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _default_device_id() -> str:
    name = re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().lower())[:64].strip("-")
    return name or "edge"


@dataclass(frozen=True)
class DeviceConfig:
    id: str = opt("", "Device id used in MQTT topics and logs; [a-z0-9_-]. Default: the host name.")
    state_dir: str = opt("", "Directory for models and the MQTT outbox. Default: $EDGE_VOICE_STATE_DIR, "
                         "systemd's $STATE_DIRECTORY, /var/lib/edge-voice as root, else ~/.local/state/edge-voice.")
    models_dir: str = opt("", "Installed models. Default: <state_dir>/models.")
    tags: list = opt([], "Tags advertised in the MQTT status, by which the fleet selects devices for commands "
                     "and rollouts (e.g. ['site:paris', 'booth:phone', 'lang:fr']); each 1-64 letters, "
                     "digits and _ . : = -.")

    @property
    def device_id(self) -> str:
        return self.id or _default_device_id()


@dataclass(frozen=True)
class AudioConfig:
    input_device: str = opt("", "Capture device: a PortAudio index or part of its name; empty for the default; "
                            "file:PATH reads a WAV or raw 16 kHz PCM file or FIFO in real time instead.")
    output_device: str = opt("", "Playback device: a PortAudio index or part of its name; empty for the default; "
                             "file:PATH writes a WAV file instead.")
    input_rate: int = opt(0, "Capture rate to ask the device for; 0 tries 16000 then the device's own rate.",
                          min=0, max=192000)
    queue_chunks: int = opt(100, "Capture queue length in chunks; when full the oldest chunk is dropped and counted.",
                            min=4, max=10000)
    preroll_ms: int = opt(300, "Audio from just before the wake word fired (it fires about 0.1 s after the word "
                          "ends) handed to speech-to-text, so a question said straight after the wake word keeps "
                          "its first word. Longer reaches back into the wake word itself.", min=0, max=3000)
    volume: float = opt(1.0, "Playback gain, 0 to 1.", min=0.0, max=1.0)
    reopen_backoff_max_s: float = opt(30.0, "Longest wait between attempts to reopen a lost device.",
                                      min=1.0, max=600.0)
    input_stall_s: float = opt(5.0, "A microphone that delivers nothing for this long is treated as lost: "
                               "closed, PortAudio re-initialised and the device reopened.", min=1.0, max=120.0)
    echo_cancel: bool = opt(False, "The capture device already removes the device's own sound (a PipeWire or "
                            "PulseAudio echo-cancel source). When false, the microphone is silenced while the "
                            "device's own sound (a reply's tail, a chime) can still be heard and it is "
                            "listening for a question; while it thinks or speaks only the wake word is "
                            "listened for. When true, nothing is silenced.")
    echo_guard_ms: int = opt(200, "Without echo cancellation: how long after the device's own sound has left "
                             "the speaker the microphone stays silenced (room echo, capture latency).",
                             min=0, max=3000)
    aec_engine: str = opt("speex", "Echo cancellation in the daemon, with what it plays as the reference, before "
                          "the wake word and the VAD: speex (the system's libspeexdsp1), webrtc (WebRTC AEC3: "
                          "pip install 'edge-voice[aec]'), or none (a platform echo-cancel source: set "
                          "echo_cancel = true).", choices=("speex", "webrtc", "none"))
    aec_delay_ms: int = opt(0, "Extra delay of the echo beyond the speaker's reported latency (a driver's unreported "
                            "buffer); speex also finds it by itself (aec_auto_delay).", min=0, max=1000)
    aec_input_latency_ms: int = opt(0, "Capture latency: how long before a chunk is delivered its first sample was "
                                    "heard, beyond the chunk itself.", min=0, max=1000)
    aec_tail_ms: int = opt(200, "speex: the echo path length its filter spans (delay mismatch plus the room).",
                           min=20, max=1000)
    aec_auto_delay: bool = opt(True, "speex: find an echo delay the timestamps miss by cross-correlating what was "
                               "played with what was heard.")
    aec_max_delay_ms: int = opt(500, "The longest such delay looked for.", min=50, max=2000)
    aec_converged_db: float = opt(10.0, "Until the canceller removes this much echo (it learns the room during the "
                                  "first replies), the device keeps the echo rule: only the wake word interrupts it "
                                  "and the microphone is silenced after its own sound.", min=0.0, max=60.0)


@dataclass(frozen=True)
class WakeWord:
    name: str = opt("", "Name reported in the wake event.")
    model: str = opt("", "Word model: a file name inside the wake model's directory, or a path to a custom "
                     "openWakeWord-format ONNX model.")
    threshold: float = opt(0.5, "Score (0..1) at which the word fires.", min=0.0, max=1.0)
    refractory_s: float = opt(2.0, "After firing, ignore this word for this long.", min=0.0, max=60.0)


@dataclass(frozen=True)
class WakeConfig:
    engine: str = opt("openwakeword", "Wake engine.", choices=("openwakeword", "kws", "none"))
    model: str = opt("openwakeword", "Model id (manifest) with the feature models, or with the keyword spotter.")
    words: list = opt([{"name": "hey_jarvis", "model": "hey_jarvis_v0.1.onnx", "threshold": 0.5,
                        "refractory_s": 2.0}], "Wake words for openwakeword: a list of tables (see WakeWord).")
    keywords: list = opt([], "Keywords for the kws engine, as the model's tokens "
                         "(e.g. '▁HE Y ▁J AR VI S @HEY_JARVIS').")
    kws_threshold: float = opt(0.25, "Keyword spotter trigger threshold.", min=0.0, max=1.0)
    kws_score: float = opt(1.0, "Keyword spotter boosting score.", min=0.0, max=10.0)
    num_threads: int = opt(1, "Threads for the wake model.", min=1, max=8)

    def word_list(self) -> list[WakeWord]:
        return [build_section(WakeWord, w, f"wake.words[{i}]") for i, w in enumerate(self.words)]


@dataclass(frozen=True)
class SttConfig:
    engine: str = opt("streaming", "streaming: sherpa-onnx OnlineRecognizer; vad-offline: silero VAD + "
                      "OfflineRecognizer.", choices=("streaming", "vad-offline"))
    model: str = opt("zipformer-en-2023-06-26", "Speech-to-text model id (manifest).")
    vad_model: str = opt("silero-vad", "VAD model id (vad-offline engine).")
    num_threads: int = opt(1, "Threads for speech-to-text.", min=1, max=8)
    endpoint_silence_s: float = opt(0.8, "Silence after speech that ends the question.", min=0.1, max=5.0)
    pause_s: float = opt(0.1, "Silence after which the reply is started speculatively, before the endpoint; it "
                         "is played only if the final transcript is the same (a pause mid-sentence costs "
                         "only the CPU of a reply that is dropped). 0 turns this off.",
                         min=0.0, max=5.0)
    no_speech_timeout_s: float = opt(6.0, "After the wake word, give up if no speech starts within this.",
                                     min=0.5, max=60.0)
    max_utterance_s: float = opt(15.0, "Longest question; it is cut here.", min=1.0, max=60.0)
    partial_interval_s: float = opt(0.3, "How often partial transcripts are produced.", min=0.05, max=5.0)
    vad_threshold: float = opt(0.5, "Silero VAD speech probability threshold.", min=0.05, max=0.95)
    decoding_method: str = opt("greedy_search", "Decoding for transducer models.",
                               choices=("greedy_search", "modified_beam_search"))


@dataclass(frozen=True)
class LlmConfig:
    model: str = opt("phi3-mini-4k-instruct-q4_0", "LLM model id (manifest; a GGUF).")
    system_prompt: str = opt(
        "You are a helpful voice assistant in a public kiosk. Answer in one or two short spoken "
        "sentences. No lists, no markdown.", "System prompt; commands cannot change it.")
    chat_template: str = opt("auto", "auto: the GGUF's own template, else Phi-3's; phi3: always Phi-3's.",
                             choices=("auto", "phi3"))
    n_ctx: int = opt(2048, "Context window in tokens.", min=256, max=131072)
    n_threads: int = opt(0, "Generation threads; 0 = all cores.", min=0, max=64)
    n_threads_batch: int = opt(0, "Prompt-processing threads; 0 = same as n_threads.", min=0, max=64)
    share_cores: bool = opt(True, "Use one thread fewer while speech-to-text or text-to-speech computes: "
                            "llama.cpp's threads stall each other when another stage takes one's core.")
    n_batch: int = opt(256, "Prompt batch size.", min=8, max=4096)
    n_gpu_layers: int = opt(0, "Layers offloaded to the GPU (Jetson); -1 for all.", min=-1, max=1000)
    use_mmap: bool = opt(False, "Map the model file instead of reading it into memory.")
    flash_attn: bool = opt(False, "Use flash attention.")
    kv_type: str = opt("q4_0", "KV cache type; q8_0 and q4_0 turn flash attention on. Phi-3-mini's 2048-token "
                       "cache takes 768 MB at f16, 408 MB at q8_0, 216 MB at q4_0, at the same speed: q4_0 is "
                       "what lets the whole daemon fit a 4 GB Raspberry Pi 5; q8_0 is closer to f16 where "
                       "memory allows.", choices=("f16", "q8_0", "q4_0"))
    max_tokens: int = opt(96, "Longest reply in tokens.", min=1, max=4096)
    reply_timeout_s: float = opt(20.0, "Stop generating after this many seconds.", min=1.0, max=600.0)
    temperature: float = opt(0.3, "Sampling temperature; 0 is greedy.", min=0.0, max=2.0)
    top_p: float = opt(0.9, "Nucleus sampling.", min=0.0, max=1.0)
    seed: int = opt(-1, "Sampling seed; -1 for random.")
    memory_tokens: int = opt(768, "Conversation memory per session, in tokens; oldest turns drop first.",
                             min=0, max=65536)
    session_idle_s: float = opt(120.0, "Forget the conversation after this long without a turn.",
                                min=0.0, max=86400.0)
    fallback_reply: str = opt("Sorry, I have no answer to that.", "Spoken when the model produces nothing.")
    adapter: str = opt("", "A LoRA adapter for this model (a manifest model id of kind lora, a GGUF adapter "
                       "made for llm.model); empty: none.")
    adapter_scale: float = opt(1.0, "How strongly the adapter applies (1: as trained).", min=0.0, max=4.0)


@dataclass(frozen=True)
class TtsConfig:
    model: str = opt("piper-en-us-lessac-medium", "Text-to-speech voice model id (manifest).")
    speaker_id: int = opt(0, "Speaker id for multi-speaker voices.", min=0, max=10000)
    speed: float = opt(1.0, "Speaking rate.", min=0.5, max=2.0)
    num_threads: int = opt(1, "Threads for text-to-speech.", min=1, max=8)
    first_clause_min_words: int = opt(3, "Speak the first clause as soon as it has this many words and a "
                                      "clause break.", min=1, max=50)
    first_clause_max_words: int = opt(3, "If the first clause reaches this many words with no break, speak it "
                                      "anyway.", min=1, max=100)


@dataclass(frozen=True)
class ConversationConfig:
    mode: str = opt("wake", "wake: the wake word starts a turn; push-to-talk: only a command or button; "
                    "handset: off-hook starts a session.", choices=("wake", "push-to-talk", "handset"))
    barge_in: str = opt("wake", "What interrupts the device while it thinks or speaks: wake (the wake word), "
                        "speech (also a visitor who talks over it for barge_in_speech_s; needs echo "
                        "cancellation, audio.aec_engine), none.", choices=("wake", "speech", "none"))
    barge_in_speech_s: float = opt(0.6, "barge_in = speech: this much speech over the device's voice interrupts it "
                                   "and becomes the next question.", min=0.2, max=5.0)
    follow_up_s: float = opt(0.0, "After a reply, listen this long for a follow-up without the wake word.",
                             min=0.0, max=60.0)
    greeting: str = opt("Hello, how can I help?", "Spoken when a handset is lifted.")
    chime_wake: bool = opt(False, "Play a short rising chime when listening starts after the wake word or "
                           "push-to-talk.")
    chime_end: bool = opt(False, "Play a short falling chime when the device stops listening and waits for the "
                          "wake word again.")
    button_chip: str = opt("", "GPIO chip of a push-to-talk button (e.g. /dev/gpiochip0; needs the gpiod "
                           "package). Empty: no button.")
    button_line: str = opt("", "The button's GPIO line: an offset (17) or a line name (GPIO17).")
    button_active_low: bool = opt(True, "The button pulls its line low when pressed (wired to ground).")
    hook_chip: str = opt("", "GPIO chip of a handset's hook switch (handset mode). Empty: the hook comes "
                         "only from commands.")
    hook_line: str = opt("", "The hook switch's GPIO line: an offset or a line name.")
    hook_active_low: bool = opt(True, "The hook line reads low while the handset is off the hook.")
    gpio_bias: str = opt("pull-up", "Bias for the button and hook lines.",
                         choices=("as-is", "pull-up", "pull-down", "disabled"))
    gpio_debounce_ms: int = opt(20, "Debounce for the button and hook lines.", min=0, max=1000)


@dataclass(frozen=True)
class TurnConfig:
    llm_view: bool = opt(True, "At the pause, ask the LLM whether the words so far are a finished turn: the "
                         "probability of its end-of-turn token after them, from the logits the prefill "
                         "computes anyway (no extra model).")
    detector: str = opt("none", "An audio end-of-turn model as a second view: none, or smart-turn (pipecat's Smart "
                        "Turn v3.2 on the last 8 s; one core, 30-140 ms a call).", choices=("none", "smart-turn"))
    model: str = opt("smart-turn-v3.2", "The audio end-of-turn model id (manifest).")
    num_threads: int = opt(1, "Threads for the audio model.", min=1, max=4)
    llm_weight: float = opt(1.0, "Weight of the LLM's view in the combined log-odds.", min=0.0, max=10.0)
    audio_weight: float = opt(1.0, "Weight of the audio model's view.", min=0.0, max=10.0)
    complete_at: float = opt(0.5, "At or above this combined probability that the sentence is finished, the "
                             "turn ends at the pause. An LLM's probabilities are its own: calibrate them on the "
                             "pause set with python -m edge.devtools.turn_eval --llm-model ID (SmolLM2-135M: 2e-5, "
                             "in config/dev.toml); the default ends early only when the model is sure.",
                             min=0.0, max=1.0)
    incomplete_below: float = opt(0.0, "Below this the sentence is taken as unfinished and the turn ends only after "
                                  "max_silence_s of silence; in between, after stt.endpoint_silence_s. The "
                                  "default never waits longer than the fixed silence.", min=0.0, max=1.0)
    max_silence_s: float = opt(1.6, "The silence an unfinished sentence is given before the turn ends anyway.",
                               min=0.2, max=5.0)
    enabled: bool = opt(True, "Decide the end of the turn at the pause; false: always stt.endpoint_silence_s.")


@dataclass(frozen=True)
class KnowledgeConfig:
    pack: str = opt("", "The venue's knowledge pack: the id of a pack installed with `edge-voice packs install`, or "
                    "a pack directory. Empty: no venue knowledge (the LLM is told llm.system_prompt).")
    faq: bool = opt(True, "Answer a question that matches one of the pack's FAQ entries with that entry's answer "
                    "(synthesized ahead of time), without the LLM.")
    faq_model: str = opt("minilm-l6-v2", "Sentence-embedding model id (manifest) for the FAQ matcher; empty: "
                         "word overlap only (fewer paraphrases recognised).")
    prompt_budget_tokens: int = opt(1200, "The most tokens of facts that go into the LLM's system prompt. A pack "
                                    "within it gets one prompt for every question, evaluated once; a larger "
                                    "pack gets the facts most relevant to each question.", min=50, max=32768)
    save_prompt_state: bool = opt(True, "Keep the evaluated system prompt (the LLM's KV cache) on disk, so a "
                                  "restart loads it instead of evaluating the pack's facts again.")


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = opt(False, "Connect to an MQTT broker.")
    host: str = opt("localhost", "Broker host name.")
    port: int = opt(1883, "Broker port.", min=1, max=65535)
    prefix: str = opt("edge", "Topic prefix.")
    device_id: str = opt("", "Device id in topics; [a-z0-9_-]. Default: device.id, else the host name.")
    client_id: str = opt("", "MQTT client id; default edge-voice-<device id>.")
    protocol: str = opt("5", "MQTT protocol version.", choices=("5", "3.1.1"))
    keepalive_s: int = opt(30, "Keep-alive interval.", min=5, max=3600)
    username: str = opt("", "User name.")
    password: str = opt("", "Password (prefer password_file or EDGE_VOICE_MQTT__PASSWORD).", secret=True)
    password_file: str = opt("", "File holding the password (e.g. a systemd credential).")
    tls: bool = opt(False, "Use TLS.")
    ca_file: str = opt("", "CA certificate for the broker.")
    cert_file: str = opt("", "Client certificate (mutual TLS).")
    key_file: str = opt("", "Client key (mutual TLS).")
    outbox_max: int = opt(10000, "Events kept on disk while the broker is away; oldest dropped first.",
                          min=10, max=10_000_000)
    metrics_interval_s: float = opt(60.0, "Seconds between metrics messages.", min=1.0, max=86400.0)
    ha_discovery: bool = opt(False, "Publish Home Assistant discovery config.")
    ha_prefix: str = opt("homeassistant", "Home Assistant discovery prefix.")


@dataclass(frozen=True)
class RolloutConfig:
    public_key: str = opt("", "The fleet's Ed25519 public key (PEM), installed at provisioning "
                          "(scripts/provision --fleet-key). A rollout's release manifest must carry a valid "
                          "signature by its private key. Empty: rollouts are refused.")
    mirrors: list = opt([], "Mirrors a rollout may fetch from: http(s) URL prefixes "
                        "(e.g. ['https://mirror.example.org/edge/']). A rollout naming any other mirror is "
                        "refused. Empty: rollouts are refused.")
    confirm_deadline_s: float = opt(600.0, "From the switch to a new version, how long loading it and its self-test "
                                    "may take; past this the device switches back by itself.",
                                    min=10.0, max=86400.0)
    bandwidth_kbps: int = opt(0, "Download limit for rollouts in kilobits per second; 0: no limit. Downloads "
                              "also pause while a visitor is speaking or being answered.", min=0, max=10_000_000)
    selftest_text: str = opt("Where can I buy a ticket for the museum?",
                             "The self-test's question: the voice says it, speech-to-text must hear it (within "
                             "selftest_max_wer), the LLM answers it and the voice says the answer.")
    selftest_max_wer: float = opt(0.5, "Highest word error rate of the self-test's transcript.", min=0.0, max=1.0)
    selftest_max_ms: int = opt(30000, "A self-test that takes longer than this fails: a new version too slow for "
                               "this device is switched back.", min=1, max=3_600_000)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = opt("info", "Log level.", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    wake: WakeConfig = field(default_factory=WakeConfig)
    stt: SttConfig = field(default_factory=SttConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="<defaults>", compare=False)

    @property
    def state_dir(self) -> Path:
        from edge import paths

        return Path(self.device.state_dir) if self.device.state_dir else paths.state_dir()

    @property
    def models_dir(self) -> Path:
        from edge import paths

        if self.device.models_dir:
            return Path(self.device.models_dir)
        if self.device.state_dir:
            return Path(self.device.state_dir) / "models"
        return paths.models_dir()

    @property
    def device_id(self) -> str:
        return self.mqtt.device_id or self.device.device_id

    @property
    def packs_dir(self) -> Path:
        """Installed knowledge packs: <state_dir>/packs."""
        return self.state_dir / "packs"

    def model_ids(self) -> dict[str, str]:
        """The model ids this config needs, by role."""
        ids = {}
        if self.wake.engine != "none":
            ids["wake"] = self.wake.model
        ids["stt"] = self.stt.model
        if self.stt.engine == "vad-offline" or self.conversation.barge_in == "speech":
            ids["vad"] = self.stt.vad_model  # (also what hears a visitor talking over the device)
        ids["llm"] = self.llm.model
        if self.llm.adapter:
            ids["lora"] = self.llm.adapter
        ids["tts"] = self.tts.model
        if self.turn.enabled and self.turn.detector != "none":
            ids["turn"] = self.turn.model
        if self.knowledge.pack and self.knowledge.faq:
            ids["faq"] = self.knowledge.faq_model
        return {k: v for k, v in ids.items() if v}


SECTIONS: dict[str, type] = {k: v for k, v in get_type_hints(Config).items() if k != "source"}


class _Where:
    """Where a value came from: the file, or the environment variable that overrode it."""

    def __init__(self, source: str, origins: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.origins = origins or {}

    def error(self, key: str, why: str) -> ConfigError:
        origin = self.origins.get(key)
        if origin:
            return ConfigError(f"environment variable {origin}: {key}: {why}")
        return ConfigError(f"{self.source}: {key}: {why}")


def _coerce(value: Any, typ: Any, key: str, meta: Mapping[str, Any], where: _Where) -> Any:
    origin = get_origin(typ) or typ
    if typ is bool:
        if not isinstance(value, bool):
            raise where.error(key, f"expected true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(key, f"expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(key, f"expected a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise where.error(key, f"expected a string, got {value!r}")
    elif origin is list:
        if not isinstance(value, list):
            raise where.error(key, f"expected a list, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise where.error(key, f"{value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise where.error(key, f"{value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise where.error(key, f"{value!r} is above the maximum {hi}")
    return value


def build_section(cls: type, table: Any, name: str, source: str = "config",
                  origins: Mapping[str, str] | None = None) -> Any:
    where = _Where(source, origins)
    if not isinstance(table, dict):
        raise where.error(name, "expected a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise where.error(f"{name}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(fields))})")
    values = {k: _coerce(v, hints[k], f"{name}.{k}", fields[k].metadata, where) for k, v in table.items()}
    return cls(**values)


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``EDGE_VOICE_LLM__N_CTX=4096`` → ``{"llm": {"n_ctx": 4096}}``; values parse as TOML.

    Also returns ``{"llm.n_ctx": "EDGE_VOICE_LLM__N_CTX"}`` so errors can name the variable.
    """
    out: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word is a string
        out.setdefault(section, {})[key] = value
        names[f"{section}.{key}"] = name
    return out, names


def load_config(path: str | os.PathLike | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge environment overrides, validate. Raises ConfigError naming the problem."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found", code="config.missing") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot read config file: {err}", code="config.unreadable") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML: {err}") from None
    overrides, origins = _env_overrides(environ)
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ConfigError(f"environment: {ENV_PREFIX}{section.upper()}__...: unknown section "
                              f"(known: {', '.join(SECTIONS)})")
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"{source}: {section}: expected a table")
        current.update(values)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown section (known: {', '.join(SECTIONS)})")
    sections = {name: build_section(cls, data.get(name, {}), name, source, origins)
                for name, cls in SECTIONS.items()}
    cfg = Config(**sections, source=source)
    for key, value in (("device.id", cfg.device.id), ("mqtt.device_id", cfg.mqtt.device_id)):
        if value and not DEVICE_ID_RE.match(value):
            raise ConfigError(f"{source}: {key}: {value!r} must be 1-64 characters of a-z, 0-9, _ and -")
    cfg.wake.word_list()  # validate the nested tables now, not at start-up of the wake stage
    for i, url in enumerate(cfg.rollout.mirrors):
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s?#@]+(/\S*)?$", url):
            raise ConfigError(f"{source}: rollout.mirrors[{i}]: {url!r} is not an http(s) URL of a mirror")
    if cfg.turn.incomplete_below > cfg.turn.complete_at:
        raise ConfigError(f"{source}: turn.incomplete_below ({cfg.turn.incomplete_below:g}) must not exceed "
                          f"turn.complete_at ({cfg.turn.complete_at:g})")
    if cfg.turn.max_silence_s < cfg.stt.endpoint_silence_s:
        raise ConfigError(f"{source}: turn.max_silence_s ({cfg.turn.max_silence_s:g}) must be at least "
                          f"stt.endpoint_silence_s ({cfg.stt.endpoint_silence_s:g})")
    if cfg.conversation.barge_in == "speech" and cfg.audio.aec_engine == "none" and not cfg.audio.echo_cancel:
        raise ConfigError(f"{source}: conversation.barge_in = \"speech\" needs echo cancellation: set "
                          "audio.aec_engine (speex or webrtc) or audio.echo_cancel = true")
    return cfg


def redacted(cfg: Config) -> dict[str, Any]:
    """The config as a dict with secrets replaced, for logs and ``check``."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        values = {}
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            values[f.name] = "***" if f.metadata.get("secret") and v else v
        out[name] = values
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "[\n" + "".join(
                "  { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in item.items()) + " },\n"
                for item in value) + "]"
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def example_toml() -> str:
    """Every key with its default and documentation: the source of config/example.toml."""
    lines = [
        "# edge-voice configuration: every key, with its default.",
        "# Any key can be overridden by an environment variable EDGE_VOICE_<SECTION>__<KEY>,",
        "# e.g. EDGE_VOICE_MQTT__HOST=broker.local. Unknown keys are an error.",
        "# Generated by `python -m edge.config`; keep it in sync (a test checks).",
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]"]
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            extra = []
            if f.metadata.get("choices"):
                extra.append("one of: " + ", ".join(map(str, f.metadata["choices"])))
            if f.metadata.get("min") is not None or f.metadata.get("max") is not None:
                extra.append(f"range {f.metadata.get('min')}..{f.metadata.get('max')}")
            for line in _wrap(doc + (f" ({'; '.join(extra)})" if extra else "")):
                lines.append(f"# {line}")
            factory = cast(Callable[[], Any], f.default_factory)
            default = f.default if f.default is not dataclasses.MISSING else factory()
            lines.append(f"{f.name} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 96) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


if __name__ == "__main__":
    print(example_toml(), end="")
