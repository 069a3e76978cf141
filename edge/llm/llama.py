"""llama-cpp-python backend of the chat stage, driving the KV cache through the low-level API."""

from __future__ import annotations

import codecs
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edge.config import LlmConfig
from edge.cpu import CpuPolicy
from edge.errors import MissingDependency, ModelError, StageError
from edge.llm.base import Message, ReplyStats
from edge.llm.gguf_header import check_lora_fits, read_gguf_header
from edge.llm.template import ChatFormat, PromptBuilder, bare_words, choose_format
from edge.signals import Flag

_LOGGER = logging.getLogger(__name__)

# Prompt tokens are evaluated in slices this long so that cancel and the deadline are checked
# between slices. For a Phi-3-mini on two x86 cores a slice takes about 1 s and costs ~2% of
# prompt throughput against one 128-token batch; smaller slices would lose batch efficiency.
EVAL_SLICE = 32
# A prefill call evaluates at most this many tokens, so a stream() that follows it waits little,
# in slices this short (one token while another stage computes or is about to), on one thread
# (the CPU policy): it stops within one slice when the reply is wanted (its ``cancel``).
PREFILL_MAX_TOKENS = 64
PREFILL_SLICE = 2

VIEWS_KEPT = 8  # end-of-turn probabilities remembered (by the prompt's tokens up to the words)
_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_*
STATES_KEPT = 4  # evaluated system prompts kept on disk (a pack and its previous version, ...)
STATE_MIN_TOKENS = 64  # a shorter system prompt is evaluated as fast as its state file is read
_LOG_LEVEL_WARN, _LOG_LEVEL_ERROR, _LOG_LEVEL_CONT = 3, 4, 5  # ggml_log_level
_log_tail: deque[str] = deque(maxlen=6)
_log_hook: Any = None
_log_last_level = 0


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependency.for_module("llama_cpp", "llm") from None
    _install_log_hook(llama_cpp)
    return llama_cpp


def import_llama_cpp() -> Any:
    """llama_cpp, with llama.cpp's log routed to ours (for other users of the library)."""
    return _import_llama_cpp()


def last_llama_errors() -> list[str]:
    """llama.cpp's latest error lines (its log is routed to ours, not to stderr)."""
    return list(_log_tail)


def _install_log_hook(llama_cpp: Any) -> None:
    """Route llama.cpp's log to ours: warnings to the log, errors kept for the error message."""
    global _log_hook
    if _log_hook is not None:
        return

    def hook(level: int, text: bytes, _user: Any) -> None:
        global _log_last_level
        if level == _LOG_LEVEL_CONT:
            level = _log_last_level
        _log_last_level = level
        msg = text.decode("utf-8", "replace").strip()
        if not msg:
            return
        if level == _LOG_LEVEL_ERROR:
            _log_tail.append(msg)
            _LOGGER.debug("llama.cpp: %s", msg)
        elif level == _LOG_LEVEL_WARN:
            _LOGGER.warning("llama.cpp: %s", msg)

    _log_hook = llama_cpp.llama_log_callback(hook)  # kept referenced: C holds the pointer
    llama_cpp.llama_log_set(_log_hook, ctypes.c_void_p(0))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LlamaChatModel:
    """A ChatModel over one ``llama_cpp.Llama``; all calls come from one worker thread,
    ``cancel`` may be set from any thread and ``close`` may come from another."""

    def __init__(self, cfg: LlmConfig, gguf_path: Path, cpu: CpuPolicy | None = None, *,
                 adapter: Path | None = None, state_dir: Path | None = None) -> None:
        """``adapter``: a LoRA adapter GGUF for this model, applied at ``cfg.adapter_scale``;
        ``state_dir``: where evaluated system prompts are kept (see :meth:`warm`)."""
        llama_cpp = _import_llama_cpp()
        self._lib = llama_cpp
        self.cfg = cfg
        self._cpu = cpu or CpuPolicy(share=cfg.share_cores)
        self.path = gguf_path
        self.adapter = adapter
        self._state_dir = state_dir
        if not gguf_path.is_file():
            raise ModelError(f"{gguf_path}: LLM model file not found; install the model or fix llm.model",
                             code="model.missing")
        lora: dict[str, Any] = {}
        if adapter is not None:
            check_lora_fits(read_gguf_header(adapter), read_gguf_header(gguf_path))
            lora = {"lora_path": str(adapter), "lora_scale": cfg.adapter_scale}
        n_threads = cfg.n_threads or os.cpu_count() or 1
        n_threads_batch = cfg.n_threads_batch or n_threads
        flash_attn = cfg.flash_attn
        if cfg.kv_type != "f16" and not flash_attn:
            # llama.cpp cannot quantize the V cache without flash attention.
            _LOGGER.info("llm.kv_type = %s needs flash attention; enabling it", cfg.kv_type)
            flash_attn = True
        _log_tail.clear()
        t0 = time.monotonic()
        # Every computation runs on this one thread. llama.cpp's OpenMP keeps a team of threads
        # for each thread that calls it, and once a process has more such threads than cores,
        # libgomp's threads sleep at every barrier instead of spinning: generation on 2 cores fell
        # from about 19 to 15 tokens/s when the daemon's responder thread took over from the
        # thread that had loaded and warmed the model.
        self._compute = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-compute")
        try:
            self._llm = self._compute.submit(
                llama_cpp.Llama,
                model_path=str(gguf_path), n_ctx=cfg.n_ctx, n_batch=cfg.n_batch, n_ubatch=cfg.n_batch,
                n_threads=n_threads, n_threads_batch=n_threads_batch, n_gpu_layers=cfg.n_gpu_layers,
                use_mmap=cfg.use_mmap, flash_attn=flash_attn, type_k=_KV_TYPES[cfg.kv_type],
                type_v=_KV_TYPES[cfg.kv_type], seed=self._seed(), verbose=False, **lora,
            ).result()
        except (ValueError, RuntimeError, OSError) as err:
            self._compute.shutdown(wait=False)
            detail = _log_tail[0] if _log_tail else str(err)
            if "context" in str(err):  # the weights loaded; the settings do not fit them
                raise ModelError(f"{gguf_path}: cannot set up the LLM with these settings ({detail}); "
                                 f"check llm.n_ctx, llm.kv_type and llm.n_gpu_layers",
                                 code="model.context") from None
            if adapter is not None and "lora" in (detail + str(err)).lower():
                raise ModelError(f"{adapter}: llama.cpp cannot apply this LoRA adapter to {gguf_path.name} "
                                 f"({detail}); use an adapter made for this model", code="model.adapter") from None
            raise ModelError(f"{gguf_path}: cannot load the LLM model ({detail}); re-install it or "
                             f"choose another model", code="model.invalid") from None
        try:
            self._setup(gguf_path)
        except BaseException:
            self._llm.close()
            self._compute.shutdown(wait=False)
            raise
        _LOGGER.info("LLM %s loaded in %.1f s: chat format %s, n_ctx %d, %d/%d threads, stop tokens %s",
                     gguf_path.name, time.monotonic() - t0, self.format.origin, self.n_ctx, n_threads,
                     n_threads_batch, sorted(self._stop_ids))

    def _setup(self, gguf_path: Path) -> None:
        cfg = self.cfg
        self._vocab = self._lib.llama_model_get_vocab(self._llm.model)
        self._lock = threading.Lock()
        self._closed = False
        # (threads, batch threads) when the CPU policy lets it have every core.
        self._threads = (self._llm.n_threads, self._llm.n_threads_batch)
        self._threads_now = self._threads
        self._turn = 0
        self._system = cfg.system_prompt
        self.n_ctx = self._llm.n_ctx()
        self.last_stats = ReplyStats()
        self._bos_text, self._add_bos = self._bos()
        meta = self._llm.metadata
        eos_text = self._text(self._llm.token_eos())
        self.format: ChatFormat = choose_format(meta.get("tokenizer.chat_template"), cfg.chat_template,
                                                bos_token=self._bos_text, eos_token=eos_text,
                                                where=str(gguf_path))
        self._prompts = PromptBuilder(self.format, bos_token=self._bos_text, eos_token=eos_text)
        self._stop_ids = self._stop_tokens()
        # The template's end of a turn, as the model would write it after the visitor's words.
        self._turn_end_ids = sorted({t for t in map(self._single_token, self.format.stop_texts) if t is not None})
        self._views: dict[tuple[int, ...], float] = {}  # prompt tokens up to the words -> P(end of turn)
        n_train = self._lib.llama_model_n_ctx_train(self._llm.model)
        if cfg.n_ctx > n_train:
            _LOGGER.warning("%s: llm.n_ctx = %d is beyond the model's trained context of %d tokens",
                            gguf_path, cfg.n_ctx, n_train)

    # -- setup helpers ---------------------------------------------------------------------

    def _seed(self) -> int:
        return self._lib.LLAMA_DEFAULT_SEED if self.cfg.seed < 0 else self.cfg.seed & 0xFFFFFFFF

    def _text(self, token: int) -> str:
        """A token's text as stored in the vocabulary ("" for none)."""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace") if token >= 0 else ""

    def _bos(self) -> tuple[str, bool]:
        bos = self._llm.token_bos()
        return self._text(bos), bool(self._lib.llama_vocab_get_add_bos(self._vocab)) and bos >= 0

    def _single_token(self, text: str) -> int | None:
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self._text(ids[0]) == text else None

    def _stop_tokens(self) -> frozenset[int]:
        ids = {self._llm.token_eos(), self._lib.llama_vocab_eot(self._vocab)}
        missing = []
        for text in self.format.stop_texts:
            tok = self._single_token(text)
            if tok is None:
                missing.append(text)
            else:
                ids.add(tok)
        if self.format.stop_texts[0] in missing:
            _LOGGER.warning("%s: the vocabulary has no %s token for the %s chat format; replies end only "
                            "at the model's end-of-sequence token", self.path, self.format.stop_texts[0],
                            self.format.family)
        return frozenset(i for i in ids if i >= 0)

    # -- tokens and KV cache ---------------------------------------------------------------

    def _tokenize_prompt(self, text: str) -> list[int]:
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        with self._lock:
            self._check_open()
            return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StageError("the LLM model is closed", code="llm.closed")

    def _reuse(self, tokens: Sequence[int], keep_last: bool) -> int:
        """Keep the cached KV prefix shared with ``tokens``; returns its length.

        With ``keep_last`` at least the last token is re-evaluated so its logits exist (and
        whatever follows it is dropped); without, a cache that already holds all of ``tokens``
        is left as it is, so warming or prefilling never discards a longer conversation.
        """
        llm = self._llm
        with self._lock:
            self._check_open()
            n = _common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens)
            if keep_last:
                n = min(n, len(tokens) - 1)
            elif n == len(tokens):
                return n
            if n < llm.n_tokens:
                if not llm._ctx.kv_cache_seq_rm(-1, n, -1):
                    n = 0
                    llm.reset()
                llm.n_tokens = n
        return n

    def _eval(self, tokens: Sequence[int], stopped: Callable[[], str | None] | None = None,
              turn: int | None = None, prefill: bool = False, kind: str = "llm-prompt") -> str | None:
        """Evaluate in slices; returns why it stopped early, or None when all were evaluated.

        The CPU policy says how many threads each slice may use; a prefill's slices are
        PREFILL_SLICE tokens, or one token while another stage computes or is expected to (its
        evaluation would be slow, and a reply may be waiting behind it)."""
        i = 0
        while i < len(tokens):
            why = stopped() if stopped else None
            if why is None and turn is not None and turn != self._turn:
                why = "superseded"
            if why:
                return why
            share = self._cpu.llm_share(self._threads, prefill=prefill)
            n = (1 if share.one_token else PREFILL_SLICE) if prefill else EVAL_SLICE
            t0 = time.monotonic()
            with self._lock:
                self._check_open()
                self._decode(tokens[i:i + n], share.threads)
            trace = self._cpu.trace
            if trace is not None:
                trace.add("llm-prefill" if prefill else kind, t0, time.monotonic(),
                          f"{len(tokens[i:i + n])} tokens, {share.threads[0]} threads")
            i += n
        return None

    def _decode(self, tokens: Sequence[int], threads: tuple[int, int]) -> None:
        if threads != self._threads_now:
            self._lib.llama_set_n_threads(self._llm.ctx, *threads)
            self._threads_now = threads
        try:
            self._compute.submit(self._llm.eval, tokens).result()
        except RuntimeError as err:
            # The KV cache now holds an unknown part of the slice: forget it all.
            self._llm.reset()
            self._llm._ctx.kv_cache_clear()
            raise StageError(f"LLM evaluation failed: {err}", code="llm.decode") from None

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _sampler(self) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if self.cfg.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            # llama-cpp-python's own defaults for top-k and min-p.
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(40))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(self.cfg.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(0.05, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(self.cfg.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(self._seed()))
        return chain

    def _fit(self, history: Sequence[Message], user_text: str, max_new: int,
             system: str) -> tuple[list[int], int, int]:
        """Prompt tokens, dropping the oldest history until the reply fits in the context."""
        history = list(history)
        dropped = 0
        while True:
            try:
                text = self._prompts.prompt(system, history, user_text)
            except Exception as err:  # a template's raise_exception, e.g. on roles out of order
                raise StageError(f"the chat template cannot render this conversation: {err}",
                                 code="llm.template") from None
            tokens = self._tokenize_prompt(text)
            room = self.n_ctx - len(tokens)
            if room >= max_new or not history:
                break
            history.pop(0)
            dropped += 1
            while history and history[0].get("role") != "user":  # keep turns whole
                history.pop(0)
                dropped += 1
        if room < 1:
            raise StageError(f"the question and system prompt take {len(tokens)} tokens, more than "
                             f"llm.n_ctx = {self.n_ctx} allows", code="llm.context_full")
        if dropped:
            _LOGGER.warning("dropped the %d oldest history messages to fit llm.n_ctx = %d", dropped, self.n_ctx)
        return tokens, min(max_new, room), dropped

    # -- ChatModel ---------------------------------------------------------------------------

    def warm(self, system_prompt: str) -> None:
        """Evaluate the system prompt once; every turn reuses its KV. With a state directory the
        evaluated prompt is kept on disk, keyed by model, adapter, settings and prompt, and a
        restart loads it instead of evaluating it again (a long venue pack costs a minute of
        prompt evaluation on a Pi-class CPU)."""
        self._turn += 1  # changes the KV cache: an unfinished stream must not continue
        self._system = system_prompt
        t0 = time.monotonic()
        # The last token of the head may merge with the first word of a question.
        tokens = self._tokenize_prompt(self._prompts.head(system_prompt, []))[:-1]
        n = self._reuse(tokens, keep_last=False)
        todo, how = len(tokens) - n, "evaluated"
        if n < len(tokens) and self._state_dir is not None and len(tokens) >= STATE_MIN_TOKENS:
            path = self._state_dir / f"{self._state_key(tokens)}.state"
            if self._load_state(path, tokens):
                n, how = len(tokens), "loaded from disk"
            else:
                self._eval(tokens[n:])
                self._save_state(path, tokens)
                how = "evaluated and saved"
        else:
            self._eval(tokens[n:])
        _LOGGER.info("system prompt: %d tokens (%d %s) in %.2f s", len(tokens), todo, how,
                     time.monotonic() - t0)

    def _state_key(self, tokens: Sequence[int]) -> str:
        st = self.path.stat()
        ident = {"model": [str(self.path), st.st_size, st.st_mtime_ns],
                 "adapter": [str(self.adapter), self.cfg.adapter_scale] if self.adapter else None,
                 "n_ctx": self.n_ctx, "kv": self.cfg.kv_type, "flash": self.cfg.flash_attn or self.cfg.kv_type != "f16",
                 "llama_cpp": getattr(self._lib, "__version__", ""), "tokens": list(tokens)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def _load_state(self, path: Path, tokens: Sequence[int]) -> bool:
        """Load a saved prompt state; False (and the cache cleared) when it is missing or unusable."""
        if not path.is_file():
            return False
        lib, llm = self._lib, self._llm
        buf = (lib.llama_token * self.n_ctx)()
        count = ctypes.c_size_t(0)

        def load() -> bool:
            return bool(lib.llama_state_load_file(llm.ctx, str(path).encode(), buf, self.n_ctx, ctypes.byref(count)))

        with self._lock:
            self._check_open()
            ok = self._compute.submit(load).result() and list(buf[: count.value]) == list(tokens)
            if ok:
                llm.input_ids[: len(tokens)] = tokens
                llm.n_tokens = len(tokens)
            else:
                llm.reset()
                llm._ctx.kv_cache_clear()
        if not ok:
            _LOGGER.warning("saved prompt state %s does not fit this model: evaluating the prompt", path)
            path.unlink(missing_ok=True)
        return ok

    def _save_state(self, path: Path, tokens: Sequence[int]) -> None:
        """Keep the evaluated prompt; the newest few are kept, older ones removed."""
        lib, llm = self._lib, self._llm
        arr = (lib.llama_token * len(tokens))(*tokens)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._check_open()
                ok = self._compute.submit(
                    lambda: bool(lib.llama_state_save_file(llm.ctx, str(tmp).encode(), arr, len(tokens)))).result()
            if not ok:
                raise OSError("llama_state_save_file failed")
            os.replace(tmp, path)
            old = sorted(path.parent.glob("*.state"), key=lambda p: p.stat().st_mtime)[:-STATES_KEPT]
            for stale in old:
                stale.unlink(missing_ok=True)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            _LOGGER.warning("cannot keep the evaluated prompt in %s: %s", path.parent, err)

    def prefill(self, history: list[Message], user_text: str, cancel: Flag | None = None, *,
                system: str | None = None) -> None:
        self._turn += 1
        # The whole prompt as it would be if the visitor stopped now, up to the assistant's header:
        # a recognizer re-decoding the growing utterance gives whole words, and when the next
        # partial differs only the tokens after the shared prefix are evaluated again. If it does
        # not, the reply starts at once. The last token is left for the reply, which needs its logits.
        try:
            text = self._prompts.prompt(self._system if system is None else system, history, user_text.strip())
        except Exception:  # a template that cannot render this: the reply will say so
            return
        tokens = self._tokenize_prompt(text)[:-1]
        n = self._reuse(tokens, keep_last=False)

        def after_others() -> str | None:
            return "cancel" if cancel is not None and cancel.is_set() else None

        end = min(len(tokens), n + PREFILL_MAX_TOKENS)
        # The end-of-turn view costs nothing when the prefill stops once at the end of the words
        # to read it from the logits there (they are the same whoever evaluates those tokens).
        words = self._words_tokens(history, user_text, system) if self._turn_end_ids else []
        at = len(words) if words and tokens[:len(words)] == words and tuple(words) not in self._views else 0
        if n < at <= end:
            if self._eval(tokens[n:at], after_others, prefill=True):
                return
            self._remember_view(words, self._end_probability())
            n = at
        self._eval(tokens[n:end], after_others, prefill=True)

    def _words_tokens(self, history: list[Message], user_text: str, system: str | None) -> list[int]:
        """The prompt's tokens up to the end of the visitor's words (their final punctuation
        dropped), or [] when the template cannot say where they end."""
        words = bare_words(user_text)
        if not words:
            return []
        sys_prompt = self._system if system is None else system
        try:
            prompt = self._prompts.prompt(sys_prompt, history, words)
            at = prompt.find(words, len(self._prompts.head(sys_prompt, history)))
        except Exception:  # a template that cannot render this: no view
            return []
        return self._tokenize_prompt(prompt[:at + len(words)]) if at >= 0 else []

    def _end_probability(self) -> float:
        """P(the template's end-of-turn token) from the logits of the last token evaluated."""
        import numpy as np

        with self._lock:
            self._check_open()
            n_vocab = self._lib.llama_vocab_n_tokens(self._vocab)
            logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._llm.ctx, -1), shape=(n_vocab,))
            z = logits.astype(np.float64)
        z = np.exp(z - z.max())
        return float(z[self._turn_end_ids].sum() / z.sum())

    def _remember_view(self, words: list[int], p: float) -> None:
        self._views[tuple(words)] = p
        while len(self._views) > VIEWS_KEPT:
            self._views.pop(next(iter(self._views)))

    def end_of_turn_probability(self, history: list[Message], user_text: str, *, cancel: Flag | None = None,
                                system: str | None = None) -> float | None:
        if not self._turn_end_ids or (cancel is not None and cancel.is_set()):
            return None  # (a view no longer wanted must not trim the cache back to the visitor's words)
        tokens = self._words_tokens(history, user_text, system)
        if not tokens:
            return None
        if (known := self._views.get(tuple(tokens))) is not None:
            return known  # read by the prefill
        n = self._reuse(tokens, keep_last=True)  # the last word's token is evaluated: its logits are read
        # A view is a prefill (the visitor's words, work that may be thrown away): one thread, and
        # one token at a time beside a decode, so that a cancel waits at most one token. On every
        # core beside another stage's decode one 7-token view took 2.9 s (busy barrier waits).
        if self._eval(tokens[n:], (lambda: "cancel" if cancel is not None and cancel.is_set() else None),
                      prefill=True):
            return None
        p = self._end_probability()
        self._remember_view(tokens, p)
        return p

    def stream(self, history: list[Message], user_text: str, *, cancel: Flag,
               max_tokens: int | None = None, deadline: float | None = None,
               system: str | None = None) -> Iterator[str]:
        t0 = time.monotonic()
        self._turn += 1
        turn = self._turn
        deadline = t0 + self.cfg.reply_timeout_s if deadline is None else deadline
        tokens, max_new, dropped = self._fit(history, user_text, max_tokens or self.cfg.max_tokens,
                                             self._system if system is None else system)
        stats = self.last_stats = ReplyStats(prompt_tokens=len(tokens), dropped_messages=dropped)
        return self._generate(tokens, max_new, cancel, deadline, turn, stats, t0)

    def _generate(self, tokens: list[int], max_new: int, cancel: Flag, deadline: float,
                  turn: int, stats: ReplyStats, t0: float) -> Iterator[str]:
        def stopped() -> str | None:
            if cancel.is_set():
                return "cancel"
            if time.monotonic() >= deadline:
                return "deadline"
            return None

        lib, llm = self._lib, self._llm
        chain = None
        why: str | None = None
        try:
            if turn != self._turn:
                why = "superseded"
                return
            stats.cached_tokens = self._reuse(tokens, keep_last=True)
            why = self._eval(tokens[stats.cached_tokens:], stopped, turn)
            stats.evaluated_tokens = llm.n_tokens - stats.cached_tokens
            stats.prompt_s = time.monotonic() - t0
            chain = self._sampler()
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            started = False
            while why is None:
                t_tok = time.monotonic()
                with self._lock:
                    self._check_open()
                    token = lib.llama_sampler_sample(chain, llm.ctx, -1)
                    end = token in self._stop_ids or lib.llama_vocab_is_eog(self._vocab, token)
                    piece = b"" if end else self._piece(token)
                if stats.generated_tokens:
                    stats.generate_s += time.monotonic() - t_tok
                if end:
                    why = "end"
                    break
                stats.generated_tokens += 1
                text = decoder.decode(piece)
                if not started:
                    text = text.lstrip()  # SentencePiece's leading space, or a template's newline
                    started = bool(text)
                if text:
                    if stats.first_piece_s is None:
                        stats.first_piece_s = time.monotonic() - t0
                    yield text
                why = stopped() or ("superseded" if turn != self._turn else None)
                if why is None and stats.generated_tokens >= max_new:
                    why = "max_tokens"
                if why is None:
                    t_eval = time.monotonic()
                    why = self._eval([token], kind="llm-gen")
                    stats.generate_s += time.monotonic() - t_eval
        except BaseException:
            why = why or "error"
            raise
        finally:
            if chain is not None:
                lib.llama_sampler_free(chain)
            stats.stop = why or "abandoned"
            stats.total_s = time.monotonic() - t0
            _LOGGER.info("reply: %d tokens, stop %s; prompt %d tokens (%d cached) in %.2f s; first piece "
                         "%s s; %.1f tokens/s", stats.generated_tokens, stats.stop, stats.prompt_tokens,
                         stats.cached_tokens, stats.prompt_s,
                         "-" if stats.first_piece_s is None else f"{stats.first_piece_s:.2f}",
                         stats.tokens_per_s)

    def forget(self) -> None:
        """Drop the whole KV cache: the next call evaluates its prompt from scratch."""
        self._turn += 1
        with self._lock:
            self._check_open()
            self._llm.reset()
            self._llm._ctx.kv_cache_clear()

    def set_sampling(self, *, temperature: float | None = None, top_p: float | None = None) -> None:
        # Read once per reply, by _sampler().
        cfg = self.cfg
        self.cfg = dataclasses.replace(cfg, temperature=cfg.temperature if temperature is None else temperature,
                                       top_p=cfg.top_p if top_p is None else top_p)

    def count_tokens(self, text: str) -> int:
        with self._lock:
            self._check_open()
            return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV is currently held."""
        return int(self._llm.n_tokens)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._llm.close()
        self._compute.shutdown(wait=False)
