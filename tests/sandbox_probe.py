"""Run inside unit_sandbox.py: prove the restrictions hold, then run the real inference stack.

Prints one JSON object: ``checks`` (each restriction observed from inside, True when it
holds), ``work`` (what each library produced) and ``errors`` (anything that raised).
Arguments: MODELS_DIR SPEECH_WAV, laid out as the test binds them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import sys
import time
import traceback
import wave
from pathlib import Path

import numpy as np

libc = ctypes.CDLL(None, use_errno=True)
libc.personality.argtypes = [ctypes.c_ulong]
libc.unshare.argtypes = [ctypes.c_int]


def _bound_back_under(root: str) -> set[str]:
    """First path parts under ``root`` of what the sandbox binds back: this checkout, Python."""
    names = set()
    for path in (os.path.realpath(Path(__file__).parents[1]), os.path.realpath(sys.base_prefix)):
        rel = os.path.relpath(path, root)
        if not rel.startswith(".."):
            names.add(rel.split(os.sep)[0])
    return names


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as err:
        return err.errno or -1
    return 0


def _c_errno(rc: int) -> int:
    return ctypes.get_errno() if rc == -1 else 0


def _status(field: str) -> str:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def restrictions(state_dir: str) -> dict[str, bool]:
    def write(path: str) -> None:
        with open(path, "w") as f:
            f.write("x")

    def raw_socket(family: int, kind: int = socket.SOCK_DGRAM) -> None:
        socket.socket(family, kind).close()

    checks = {
        "non-root user": os.getuid() != 0,
        "in audio group": 29 in os.getgroups(),
        "no capabilities": int(_status("CapEff"), 16) == 0 and int(_status("CapBnd"), 16) == 0,
        "no new privileges": _status("NoNewPrivs") == "1",
        "seccomp filters installed": _status("Seccomp") == "2",
        "umask 0077": os.umask(0o077) == 0o077,
        "ProtectSystem: /etc read-only": _errno_of(lambda: write("/etc/edge-voice-probe")) == errno.EROFS,
        "ProtectSystem: /usr read-only": _errno_of(lambda: write("/usr/edge-voice-probe")) == errno.EROFS,
        "StateDirectory writable": _errno_of(lambda: write(os.path.join(state_dir, "outbox.probe"))) == 0,
        # Empty but for the way to a checkout that lives in /tmp (bound back, read-only, by the sandbox).
        "PrivateTmp: /tmp empty and writable": set(os.listdir("/tmp")) <= _bound_back_under("/tmp")
        and _errno_of(lambda: write("/tmp/p")) == 0,
        "ProtectHome: /home empty": not os.path.isdir("/home") or os.listdir("/home") == [],
        "ProtectKernelTunables: /proc/sys read-only":
            _errno_of(lambda: write("/proc/sys/kernel/hostname")) in (errno.EROFS, errno.EACCES),
        "ProtectProc: other users' processes invisible": not os.path.exists("/proc/1"),
        "DevicePolicy: /dev/null usable": _errno_of(lambda: open("/dev/null", "rb").close()) == 0,
        "DevicePolicy: /dev/kmsg denied": _errno_of(lambda: open("/dev/kmsg", "rb").close())
        in (errno.EPERM, errno.EACCES),
        "MemoryDenyWriteExecute: W+X mmap refused": _errno_of(
            lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)) == errno.EPERM,
        "RestrictAddressFamilies: AF_PACKET refused": _errno_of(lambda: raw_socket(socket.AF_PACKET))
        == errno.EAFNOSUPPORT,
        "RestrictAddressFamilies: AF_NETLINK refused": _errno_of(
            lambda: raw_socket(socket.AF_NETLINK, socket.SOCK_RAW)) == errno.EAFNOSUPPORT,
        "RestrictAddressFamilies: AF_UNIX allowed": _errno_of(lambda: raw_socket(socket.AF_UNIX)) == 0,
        "RestrictNamespaces: unshare(CLONE_NEWUSER) refused": _c_errno(libc.unshare(0x10000000)) == errno.EPERM,
        "LockPersonality: personality(PER_LINUX32) refused": _c_errno(libc.personality(0x0008)) == errno.EPERM,
        "SystemCallFilter ~@resources: sched_setaffinity refused":
            _errno_of(lambda: os.sched_setaffinity(0, {0})) == errno.EPERM,
        "SystemCallFilter ~@privileged: setuid refused": _errno_of(lambda: os.setuid(os.getuid())) == errno.EPERM,
    }
    return checks


def loopback_tcp() -> str:
    """What MQTT needs: an AF_INET connection over loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=5)
    conn, _ = server.accept()
    client.sendall(b"ping")
    data = conn.recv(4)
    for s in (client, conn, server):
        s.close()
    return data.decode()


def read_wav(path: str) -> np.ndarray:
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def wake(models: str, audio: np.ndarray) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # worker threads must start under the filter (clone3 → clone)
    d = os.path.join(models, "openwakeword")
    sess = {n: ort.InferenceSession(os.path.join(d, f"{n}.onnx"), opts, providers=["CPUExecutionProvider"])
            for n in ("melspectrogram", "embedding_model", "hey_jarvis_v0.1")}
    pcm = (audio * 32767).astype(np.float32)[None, :]
    mel = sess["melspectrogram"].run(None, {"input": pcm})[0].squeeze() / 10 + 2
    windows = np.stack([mel[i:i + 76] for i in range(0, len(mel) - 76 + 1, 8)])[:, :, :, None].astype(np.float32)
    emb = sess["embedding_model"].run(None, {"input_1": windows})[0].reshape(-1, 96)
    emb = np.concatenate([np.zeros((max(0, 16 - len(emb)), 96), np.float32), emb])[-16:]
    return float(sess["hey_jarvis_v0.1"].run(None, {"x.1": emb[None].astype(np.float32)})[0].squeeze())


def transcribe(models: str, audio: np.ndarray) -> str:
    import sherpa_onnx

    d = os.path.join(models, "whisper-tiny.en")
    rec = sherpa_onnx.OfflineRecognizer.from_whisper(
        encoder=os.path.join(d, "tiny.en-encoder.int8.onnx"), decoder=os.path.join(d, "tiny.en-decoder.int8.onnx"),
        tokens=os.path.join(d, "tiny.en-tokens.txt"), language="en", task="transcribe", num_threads=2)
    stream = rec.create_stream()
    stream.accept_waveform(16000, audio)
    rec.decode_stream(stream)
    return stream.result.text.strip()


TIMINGS: dict[str, float] = {}


def generate(models: str) -> str:
    from llama_cpp import Llama

    # verbose=False installs llama.cpp's log callback: a ctypes (libffi) closure, the classic
    # casualty of MemoryDenyWriteExecute.
    t0 = time.monotonic()
    threads = int(os.environ.get("PROBE_LLM_THREADS", "2"))  # 2: worker threads start under the filter
    llm = Llama(model_path=os.path.join(models, "llm.gguf"), n_ctx=256, n_threads=threads, n_batch=64,
                use_mmap=False, verbose=False, seed=1)
    t1 = time.monotonic()
    out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    TIMINGS["llm_load"], TIMINGS["llm_generate"] = round(t1 - t0, 2), round(time.monotonic() - t1, 2)
    return out["choices"][0]["text"]


def main() -> int:
    models, speech = sys.argv[1], sys.argv[2]
    result: dict = {"checks": restrictions(os.environ["STATE_DIRECTORY"]), "work": {}, "errors": {},
                    "seconds": {}}
    audio = read_wav(speech)
    for name, fn in (("tcp", loopback_tcp), ("wake", lambda: wake(models, audio)),
                     ("stt", lambda: transcribe(models, audio)), ("llm", lambda: generate(models))):
        t0 = time.monotonic()
        try:
            result["work"][name] = fn()
        except BaseException:  # report everything; the test decides
            result["errors"][name] = traceback.format_exc()
        result["seconds"][name] = round(time.monotonic() - t0, 2)
    import resource

    result["seconds"].update(TIMINGS)

    result["maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
