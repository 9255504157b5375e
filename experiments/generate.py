"""Stream a text (and a question) through a MegaContext session and print the answer.

The main job (`make run`). Loads the embedded SmolLM2-135M-Instruct (converted from the
shipped GGUF on first use) or any local Llama-family HF directory, feeds the prompt — a
text file of any length plus an optional question — into a `mcjax.runtime.Session`, and
streams the greedy answer, followed by a compact focus map (which spans of the history the
working context holds as raw tokens, LOD1 or LOD2 gists) and a telemetry summary.

Focus (`--focus-policy`): "lens" (default: LensNet; the shipped v2 reads the question and
each block's retrieval relevance), "retrieval" (training-free, query-aware: the newest
tokens' queries score every history block's read-pass keys, SPEC §2.6), or the baselines
"recency" / "random". GistNet / LensNet come from training workdirs (`--gist-checkpoint`,
`--lens-checkpoint`); without them both are the shipped ones (mcjax/assets/, when they fit
the config), else untrained — the output says which, plainly; `--untrained` forces the
random init. `--mode base` streams the plain base model over the whole prompt instead. `--compare-window` also answers with the plain base model
over the last w_max tokens (the sliding window MegaContext must beat).

`--demo` (what `make run` does): a held-out corpus document of --demo-tokens tokens with a
fact planted at --demo-depth and a question about it at the end — far outside the recent
window — answered by MegaContext and by the sliding window side by side.

Examples:
  python experiments/generate.py --demo
  python experiments/generate.py --prompt "The capital of France is"
  python experiments/generate.py --prompt-file book.txt --question "Who is the narrator?" \\
      --chat --gist-checkpoint runs/gist --lens-checkpoint runs/lens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

EXAMPLE_PROMPT = "The capital of France is"


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="shipped model name or local HF directory (default: %(default)s)")
    parser.add_argument("--mode", choices=["megacontext", "base"], default="megacontext",
                        help="MegaContext session, or the plain base model over the whole "
                             "prompt (default: %(default)s)")
    parser.add_argument("--prompt", default=None,
                        help=f"text to continue (with neither --prompt, --prompt-file nor "
                             f"--question: the example {EXAMPLE_PROMPT!r})")
    parser.add_argument("--prompt-file", help="read the prompt (a document, UTF-8 text) "
                                              "from this file")
    parser.add_argument("--question", default=None,
                        help="appended after the prompt/document, e.g. a question about it; "
                             "alone, the question is the whole prompt")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template as a user turn")
    parser.add_argument("--max-new-tokens", type=_cli.count, default=48)
    parser.add_argument("--chunk", type=_cli.count, default=4,
                        help="base mode: tokens decoded per streamed chunk")
    parser.add_argument("--config", default=None,
                        help="megacontext mode: registered experiment config (default: the "
                             "model's own, smollm2_135m_cpu / qwen25_coder_05b_cpu; "
                             "smollm2_135m_cpu for a local directory)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field; repeatable")
    parser.add_argument("--gist-checkpoint", default=None,
                        help="train_gist / train_joint workdir with the GistNet to use")
    parser.add_argument("--lens-checkpoint", default=None,
                        help="train_lens / train_joint workdir with the LensNet to use")
    parser.add_argument("--untrained", action="store_true",
                        help="use the untrained GistNet (default without --gist-checkpoint: "
                             "the shipped GistNet in mcjax/assets/ when it fits --config)")
    parser.add_argument("--feed-chunk", type=_cli.count, default=4096,
                        help="feed the prompt in pieces of this many tokens (progress shown; "
                             "the result does not depend on it)")
    parser.add_argument("--focus-policy", default=None,
                        choices=["retrieval", "lens", "recency", "random"],
                        help="where refocus scores come from (default: lens when a trained "
                             "LensNet fits the config — shipped or --lens-checkpoint — else "
                             "retrieval; the header line says which)")
    parser.add_argument("--compare-window", action="store_true",
                        help="also answer with the plain base model over the last w_max "
                             "prompt tokens (the sliding-window baseline)")
    parser.add_argument("--demo", action="store_true",
                        help="the long-document demo: a held-out corpus document with a "
                             "planted fact and a question about it (implies --compare-window)")
    parser.add_argument("--demo-tokens", type=_cli.count, default=12288,
                        help="demo document length in tokens (default: %(default)s)")
    parser.add_argument("--demo-depth", type=_cli.fraction, default=0.1,
                        help="where the fact sits, as a fraction of the document "
                             "(default: %(default)s)")
    parser.add_argument("--demo-seed", type=_cli.nonneg, default=0)
    parser.add_argument("--debug-invariants", action="store_true",
                        help="check every working-context invariant after each refocus")
    parser.add_argument("--telemetry", default=None,
                        help="write one JSON line per refocus event to this file (checked "
                             "writable before anything runs)")
    return parser


def _demo_ids(model, args, parser):
    """The demo prompt: held-out corpus text with a planted fact, then the question."""
    import numpy as np

    from mcjax import data

    # the held-out split exactly as training and evaluation tokenize it (scoring.load_frozen)
    corpus = data.tokenized_corpus(model.encode, args.model, "held_out",
                                   separator=model.config.eos_token_id or 0, progress=True)
    rng = np.random.default_rng(args.demo_seed)
    ex = data.make_retrieval_example(model.encode, args.demo_tokens, rng,
                                     haystack=corpus.tokens, depth=args.demo_depth,
                                     phrasing=2, key_digits=5)
    ids = [int(i) for i in ex.tokens]
    a, b = ex.needle_span
    print(f"[demo: {len(ids)} tokens of held-out corpus text; planted at tokens {a}-{b}: "
          f"{model.decode(ids[a:b]).strip()!r}; the question ends the prompt: "
          f"{model.decode(ids[-16:]).strip()!r}; expected answer: {ex.key}]", file=sys.stderr)
    return ids, model.decode(ids), ex


def prompt_text(args, parser) -> str:
    """The prompt: the --prompt-file's text or --prompt, then --question after a blank
    line; the question alone when it is all that is given; the example prompt when
    nothing is (never silently prepended to a question)."""
    if args.prompt_file is not None and args.prompt is not None:
        parser.error("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        text = _cli.text_file(parser, args.prompt_file, "--prompt-file")
    elif args.prompt is not None:
        text = args.prompt
    else:
        text = "" if args.question else EXAMPLE_PROMPT
    if args.question:
        text = f"{text.rstrip()}\n\n{args.question}" if text.strip() else args.question
    if not text.strip():
        parser.error("the prompt is empty")
    return text


def _prompt_ids(model, args, parser) -> tuple[list[int], str]:
    text = args.prompt_text
    if args.chat:
        ids = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = [int(i) for i in model.encode(text)]
    return ids, text


class _Printer:
    """Prints a growing continuation; decodes it whole so multi-byte characters print once."""

    def __init__(self, model):
        self.model, self.tokens, self.shown = model, [], ""

    def add(self, chunk) -> None:
        eos = self.model.config.eos_token_id
        self.tokens.extend(int(t) for t in chunk)
        text = self.model.decode([t for t in self.tokens if t != eos])
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def _echo(text: str, args) -> None:
    if args.chat:
        return
    if len(text) <= 600:
        sys.stdout.write(text)
    else:
        sys.stdout.write(f"[... {len(text)} characters ...]{text[-200:]}")


def run_base(model, ids, text, args) -> int:
    from mcjax.base.generate import GreedySampler

    if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
        print(f"note: {len(ids)} prompt tokens + {args.max_new_tokens} new exceed the model's "
              f"trained context of {model.config.max_position_embeddings}", file=sys.stderr)
    sampler = GreedySampler(model.config, max_new_tokens=args.max_new_tokens,
                            max_prompt_len=len(ids), eos_id=model.config.eos_token_id)
    print(f"[{model.path.name}: plain base model, {len(ids)} prompt tokens, greedy]",
          file=sys.stderr)
    _echo(text, args)
    t0, printer = time.perf_counter(), _Printer(model)
    for chunk in sampler.stream(model.params, ids, chunk=args.chunk):
        printer.add(chunk)
    dt = time.perf_counter() - t0
    print(f"\n[{len(printer.tokens)} tokens in {dt:.2f}s incl. compile]", file=sys.stderr)
    return 0


def _network_lines(provenance: dict, untrained: tuple[str, ...]) -> list[str]:
    lines = []
    for part, name in (("gist", "GistNet"), ("lens", "LensNet")):
        source = provenance.get(part, {})
        if source.get("source") == "checkpoint":
            how = f" ({source['chosen_by']})" if source.get("chosen_by") else ""
            lines.append(f"[{name}: checkpoint {source['path']} step {source['step']}{how}]")
        elif source.get("source") == "shipped":
            lines.append(f"[{name}: shipped {source.get('path')} (step {source.get('step')})]")
    if untrained:
        names = " and ".join({"gist": "GistNet", "lens": "LensNet"}[p] for p in untrained)
        flags = " / ".join(f"--{p}-checkpoint" for p in untrained)
        effects = [{"gist": "gists are not summaries",
                    "lens": "focus decisions are arbitrary"}[p] for p in untrained]
        lines.append(f"[note: {names} {'is' if len(untrained) == 1 else 'are'} UNTRAINED (no "
                     f"{flags} given): {' and '.join(effects)} until trained checkpoints are "
                     f"used]")
    return lines


def run_megacontext(model, ids, text, args, parser) -> int:
    import dataclasses

    import numpy as np

    from mcjax.errors import CheckpointError
    from mcjax.config import ConfigError
    from mcjax.runtime import Session
    from mcjax.nets import shipped_lens
    from mcjax.working_context import CapacityError

    cfg = args.cfg
    if args.model != cfg.base:  # a local directory: checkpoints must name the same base
        cfg = dataclasses.replace(cfg, base=args.model)
    if args.focus_policy is None:  # an untrained LensNet's focus would be arbitrary
        trained_lens = args.lens_checkpoint is not None or (
            not args.untrained and shipped_lens(dataclasses.replace(
                cfg, base_config=model.config)) is not None)
        args.focus_policy = "lens" if trained_lens else "retrieval"
    mc = cfg.mc
    need = len(ids) + args.max_new_tokens + mc.block_size
    max_tokens = max(mc.w_max, 1 << (need - 1).bit_length())
    events = []
    try:
        session = Session.from_checkpoints(
            model, cfg, gist_checkpoint=args.gist_checkpoint,
            lens_checkpoint=args.lens_checkpoint, max_tokens=max_tokens,
            untrained=args.untrained, focus_policy=args.focus_policy,
            debug_invariants=args.debug_invariants, on_event=events.append)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{model.path.name}: MegaContext session ({cfg.name}): w_max={mc.w_max}, "
          f"K={mc.block_size}, {mc.num_levels} gist levels, positions {mc.position_scheme}, "
          f"focus {args.focus_policy}; {len(ids)} prompt tokens, greedy]", file=sys.stderr)
    for line in _network_lines(session.provenance, session.untrained):
        print(line, file=sys.stderr)

    t0 = time.perf_counter()
    try:
        step = max(1, args.feed_chunk)
        for start in range(0, len(ids), step):
            session.feed(np.asarray(ids[start:start + step], np.int32))
            if len(ids) > step:
                tree = session.tree()
                print(f"[fed {tree.num_tokens}/{len(ids)} tokens: "
                      f"{', '.join(f'{n} LOD{l}' for l, n in enumerate(tree.counts))}]",
                      file=sys.stderr)
        session.sync()
    except CapacityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_feed = time.perf_counter() - t0
    answer_map = session.focus_map(0)  # what the WC holds as the answer begins
    _echo(text, args)
    printer = _Printer(model)
    t1 = time.perf_counter()
    for chunk in session.stream(args.max_new_tokens, eos_id=model.config.eos_token_id):
        printer.add(chunk[0])
    t_gen = time.perf_counter() - t1
    n = len(printer.tokens)
    print(f"\n[{n} tokens in {t_gen:.2f}s after {t_feed:.2f}s of ingest + layout + prefill "
          f"(both incl. compile)]", file=sys.stderr)
    answers = {"megacontext": printer.shown}
    if args.compare_window or args.demo:
        from mcjax.eval.baselines import sliding_window_generate

        t2 = time.perf_counter()
        out = sliding_window_generate(model.config, model.params, [np.asarray(ids)], mc.w_max,
                                      args.max_new_tokens, model.config.eos_token_id)
        eos = model.config.eos_token_id
        answers["sliding_window"] = model.decode([int(t) for t in out[0] if t != eos])
        print(f"\nsliding window (plain base model over the last {mc.w_max} prompt tokens, "
              f"{time.perf_counter() - t2:.2f}s):{answers['sliding_window']}")
    if getattr(args, "expected", None) is not None:
        import re

        pattern = re.compile(rf"(?<!\d){re.escape(args.expected)}(?!\d)")
        verdict = {k: ("right" if pattern.search(v) else "wrong") for k, v in answers.items()}
        print("\nexpected " + args.expected + ": " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in verdict.items()))

    session.flush()  # the answer joins the history (telemetry below counts its refocuses)
    print("\nfocus map when the answer started (the working context's view of the history, "
          "oldest first):")
    print(answer_map)
    if events:
        actions = sum(e.num_expand[0] + e.num_collapse[0] for e in events)
        last = events[-1]
        refocus_s = [e.timings["refocus_s"] for e in (events[1:] or events)]
        print(f"telemetry: {len(events)} refocuses, {actions} focus actions, "
              f"{sum(e.append_collapses[0] + e.headroom_collapses[0] for e in events)} "
              f"budget collapses, {sum(e.kv_reused[0] for e in events)} append-only; now "
              f"{last.num_tokens[0]} tokens in {sum(last.lod_histogram[0])} slots "
              f"(budget use {last.budget_use[0]:.0%}, LOD histogram {last.lod_histogram[0]}); "
              f"median refocus {1e3 * float(np.median(refocus_s)):.0f} ms "
              f"(first one incl. compile: {1e3 * events[0].timings['refocus_s']:.0f} ms)")
    if args.telemetry_file is not None:  # opened before anything ran (main)
        with args.telemetry_file as f:
            for e in events:
                f.write(json.dumps(e.to_dict()) + "\n")
    return 0


def check_args(parser, args) -> None:
    """Everything checked before the model loads (one line, exit 2 on a bad argument):
    the prompt file's text, the telemetry file (opened now, so the telemetry cannot be
    lost after the answer), the config and every --set override (in both modes)."""
    from mcjax.base.convert import canonical_name
    from mcjax.config import config_for_model

    if args.demo:
        if args.mode != "megacontext" or args.prompt_file or args.prompt or args.chat:
            parser.error("--demo builds its own prompt for a MegaContext session: no "
                         "--prompt / --prompt-file / --chat / --mode base")
        if args.question:
            parser.error("--demo asks its own question")
        if args.demo_tokens < 256:
            parser.error("--demo-tokens must be >= 256")
        args.prompt_text = None
    else:
        args.prompt_text = prompt_text(args, parser)
    if args.mode == "base" and (args.config or args.overrides or args.gist_checkpoint
                                or args.lens_checkpoint or args.compare_window
                                or args.focus_policy or args.untrained):
        parser.error("--mode base runs the plain base model: --config / --set / "
                     "--*-checkpoint / --focus-policy / --untrained / --compare-window "
                     "apply to --mode megacontext")
    _cli.net_paths(parser, args, workdirs=("gist_checkpoint", "lens_checkpoint"))
    name = args.config or config_for_model(canonical_name(args.model) or args.model)
    args.cfg = _cli.checked_config(parser, name, args.overrides)
    args.telemetry_file = None
    if args.telemetry:
        _cli.output_file(parser, args.telemetry, "--telemetry")
        try:
            args.telemetry_file = open(args.telemetry, "w")
        except OSError as e:
            parser.error(f"--telemetry {args.telemetry}: {e.strerror}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    from mcjax.base.loading import load_base_model

    model = load_base_model(args.model)
    args.expected = None
    if args.demo:
        ids, text, example = _demo_ids(model, args, parser)
        args.expected = example.key
    else:
        ids, text = _prompt_ids(model, args, parser)
    if args.mode == "base":
        return run_base(model, ids, text, args)
    return run_megacontext(model, ids, text, args, parser)


if __name__ == "__main__":
    raise SystemExit(main())
