"""Evaluate a knowledge pack in text mode: FAQ matcher plus a grounded LLM, no audio.

    python -m edge.devtools.knowledge_eval --pack config/packs/harbour-museum \
        --questions config/packs/harbour-museum/questions.toml --gguf MODEL.gguf \
        [--minilm DIR] [--no-faq] [--threads 2] [--json] [--show]

Each question goes to the FAQ matcher first; a match is answered with the entry's answer,
anything else by the LLM with the pack's grounded system prompt (warmed once when the facts
fit the budget). "first audio" here is the first text: the FAQ match time, or the LLM's first
text piece. Prints the eval summary, the prompt's token counts, generation speed and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    from edge.config import LlmConfig
    from edge.knowledge.eval import Answer, evaluate, load_questions
    from edge.knowledge.matcher import FaqMatcher
    from edge.knowledge.pack import load_pack
    from edge.knowledge.prompt import DEFAULT_BUDGET_TOKENS, Grounding
    from edge.llm import make_chat_model
    from edge.signals import Flag

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pack", required=True)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 directory; without it the matcher is lexical")
    ap.add_argument("--no-faq", action="store_true", help="send every question to the LLM")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET_TOKENS)
    ap.add_argument("--kv-type", default="f16", choices=("f16", "q8_0", "q4_0"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--show", action="store_true", help="print each question and answer")
    args = ap.parse_args(argv)

    pack = load_pack(args.pack)
    questions = load_questions(args.questions)
    matcher = None
    if not args.no_faq:
        embedder = None
        if args.minilm:
            from edge.knowledge.embed import MiniLM

            embedder = MiniLM.from_dir(Path(args.minilm))
        matcher = FaqMatcher(pack, embedder)
    cfg = LlmConfig(model=Path(args.gguf).stem, n_ctx=args.n_ctx, n_threads=args.threads, max_tokens=args.max_tokens,
                    temperature=0.0, seed=1, share_cores=False, kv_type=args.kv_type,
                    reply_timeout_s=600.0)
    t0 = time.monotonic()
    model = make_chat_model(cfg, Path(args.gguf))
    load_s = time.monotonic() - t0
    grounding = Grounding(pack, model.count_tokens, budget_tokens=args.budget)
    warm_s = 0.0
    if grounding.fixed:
        t0 = time.monotonic()
        model.warm(grounding.system_prompt().text)
        warm_s = time.monotonic() - t0
    gen_tokens = 0
    gen_s = 0.0

    def answer(question: str) -> Answer:
        nonlocal gen_tokens, gen_s
        t0 = time.perf_counter()
        if matcher is not None:
            m = matcher.match(question)
            if m is not None:
                return Answer(m.entry.answer, "faq", (time.perf_counter() - t0) * 1000, m.entry.id)
        if not grounding.fixed:
            model.warm(grounding.system_prompt(question).text)
        first: float | None = None
        pieces = []
        for piece in model.stream([], question, cancel=Flag()):
            if first is None:
                first = (time.perf_counter() - t0) * 1000
            pieces.append(piece)
        st = model.last_stats
        if st.generated_tokens > 1:
            gen_tokens += st.generated_tokens - 1
            gen_s += st.generate_s
        return Answer("".join(pieces).strip(), "llm", first)

    def show(r: object) -> None:
        if args.show:
            from edge.knowledge.eval import QuestionResult

            assert isinstance(r, QuestionResult)
            mark = "ok " if r.correct else "BAD"
            print(f"{mark} [{r.answer.path}] {r.question.text}\n      -> {r.answer.text}"
                  + (f"   ({r.reason})" if r.reason else ""), file=sys.stderr)

    t0 = time.monotonic()
    report = evaluate(questions, answer, pack.fallback, on_result=show)
    total_s = time.monotonic() - t0
    info = {
        "model": Path(args.gguf).name, "pack": pack.label, "matcher": matcher.method if matcher else "none",
        "prompt_tokens": grounding.full_tokens, "prompt_fixed": grounding.fixed, "load_s": round(load_s, 2),
        "warm_s": round(warm_s, 2), "generation_tokens_per_s": round(gen_tokens / gen_s, 1) if gen_s else None,
        "peak_rss_mb": round(peak_rss_mb()), "eval_s": round(total_s, 1),
    }
    model.close()
    if args.json:
        print(json.dumps({**info, **report.as_dict()}, indent=2))
    else:
        print(" ".join(f"{k}={v}" for k, v in info.items()))
        for line in report.summary_lines():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
