"""Greedy sampler: equals an argmax loop over full forwards, batches, streams, one compile."""

import numpy as np
import pytest

from mcjax.base import model as base
from mcjax.base.generate import GreedySampler


def _reference_greedy(params, config, prompt, n):
    toks = list(prompt)
    for _ in range(n):
        logits = base.forward(params, config, tokens=np.asarray(toks)[None])
        toks.append(int(np.argmax(logits[0, -1])))
    return toks[len(prompt):]


def test_greedy_generation_equals_argmax_over_full_forwards(tiny_llama):
    config, params = tiny_llama
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, 7)
    sampler = GreedySampler(config, max_new_tokens=9, max_prompt_len=11)
    out, n = sampler.generate(params, prompt)
    assert n.tolist() == [9]
    assert out[0].tolist() == _reference_greedy(params, config, prompt, 9)


def test_batch_of_prompts_of_different_lengths_equals_each_alone(tiny_llama):
    config, params = tiny_llama
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, n) for n in (5, 8, 3)]
    batch = np.zeros((3, 8), np.int32)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    sampler = GreedySampler(config, max_new_tokens=6, max_prompt_len=8)
    out, _ = sampler.generate(params, batch, lengths=[len(p) for p in prompts])
    for i, p in enumerate(prompts):
        alone, _ = sampler.generate(params, p)
        assert out[i].tolist() == alone[0].tolist()


@pytest.mark.parametrize("chunk", [4, 5, 13])
def test_chunked_prefill_equals_argmax_over_full_forwards(tiny_llama, chunk):
    """Prompts prefilled a chunk of slots at a time (13: one chunk; 5: the 11-slot prompt
    padded to 15) against an independent reference, with different prompt lengths."""
    config, params = tiny_llama
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, config.vocab_size, n) for n in (11, 4, 9)]
    batch = np.zeros((3, 11), np.int32)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    sampler = GreedySampler(config, max_new_tokens=7, max_prompt_len=11, prefill_chunk=chunk)
    out, _ = sampler.generate(params, batch, lengths=[len(p) for p in prompts])
    for i, p in enumerate(prompts):
        assert out[i].tolist() == _reference_greedy(params, config, p, 7), i
    with pytest.raises(ValueError, match="prefill_chunk"):
        GreedySampler(config, max_new_tokens=7, max_prompt_len=11, prefill_chunk=0)


def test_stream_yields_the_same_tokens_as_generate_without_recompiling(tiny_llama):
    config, params = tiny_llama
    prompt = np.random.default_rng(2).integers(3, config.vocab_size, 6)
    sampler = GreedySampler(config, max_new_tokens=11, max_prompt_len=6)
    full, _ = sampler.generate(params, prompt)
    chunks = list(sampler.stream(params, prompt, chunk=3))
    assert [len(c) for c in chunks] == [1, 3, 3, 3, 1]
    assert np.concatenate(chunks).tolist() == full[0].tolist()
    assert GreedySampler._advance._cache_size() >= 1
    before = GreedySampler._advance._cache_size()
    list(sampler.stream(params, prompt, chunk=2))
    assert GreedySampler._advance._cache_size() == before


def test_generation_stops_at_eos_and_pads_after_it(tiny_llama):
    config, params = tiny_llama
    prompt = np.random.default_rng(3).integers(3, config.vocab_size, 5)
    free = GreedySampler(config, max_new_tokens=8, max_prompt_len=5)
    out, _ = free.generate(params, prompt)
    eos = int(out[0, 2])  # pretend the third generated token is EOS
    stopping = GreedySampler(config, max_new_tokens=8, max_prompt_len=5, eos_id=eos, pad_id=0)
    out2, n = stopping.generate(params, prompt)
    first = out[0].tolist().index(eos)
    assert n.tolist() == [first + 1]
    assert out2[0, : first + 1].tolist() == out[0, : first + 1].tolist()
    assert (out2[0, first + 1:] == 0).all()


def test_prompt_longer_than_the_sampler_is_a_clear_error(tiny_llama):
    config, params = tiny_llama
    sampler = GreedySampler(config, max_new_tokens=2, max_prompt_len=4)
    with pytest.raises(base.InputError, match="exceeds this sampler's max_prompt_len=4"):
        sampler.generate(params, np.ones(5, np.int32))
    with pytest.raises(base.InputError, match="outside the vocabulary"):
        sampler.generate(params, np.array([config.vocab_size]))


def test_main_job_says_which_nets_are_untrained_and_what_that_means():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "generate.py")
    spec = importlib.util.spec_from_file_location("generate_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    ckpt = {"source": "checkpoint", "path": "runs/gist", "step": 320}
    lines = cli._network_lines({"gist": ckpt, "lens": {"source": "untrained"}}, ("lens",))
    assert lines[0] == "[GistNet: checkpoint runs/gist step 320]"
    assert "LensNet is UNTRAINED" in lines[1] and "focus decisions are arbitrary" in lines[1]
    assert "gists are not summaries" not in lines[1]  # GistNet is trained here
    both = cli._network_lines({}, ("gist", "lens"))
    assert "GistNet and LensNet are UNTRAINED" in both[0]
    assert "gists are not summaries and focus decisions are arbitrary" in both[0]
    assert cli._network_lines({"gist": ckpt, "lens": ckpt}, ()) == [
        "[GistNet: checkpoint runs/gist step 320]", "[LensNet: checkpoint runs/gist step 320]"]


def _cli_module(name):
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    spec = importlib.util.spec_from_file_location(f"{name}_cli",
                                                  os.path.join(root, "experiments", f"{name}.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


class _Loaded(Exception):
    """Raised instead of loading the model: the CLI got past its argument checks."""


def test_generate_checks_every_argument_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Issue 33: a bad argument exits 2 with one clear line before any work (the model
    never loads): a telemetry path that is a directory (the telemetry used to be lost after
    the answer), unknown or mistyped --set overrides in either mode, missing / binary /
    directory prompt files, numbers out of range."""
    import mcjax.base.loading as loading

    def no_model(*a, **k):
        raise _Loaded()

    monkeypatch.setattr(loading, "load_base_model", no_model)
    cli = _cli_module("generate")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02")
    bad = [(["--telemetry", str(tmp_path)], "--telemetry .*is a directory"),
           (["--telemetry", str(binary / "x.jsonl")], "--telemetry .*cannot be written"),
           (["--mode", "base", "--set", "nosuch.x=1"], "--mode base .*--set"),
           (["--set", "nosuch.x=1"], "unknown field 'nosuch'"),
           (["--set", "mc.w_max=abc"], "cannot parse"),
           (["--set", "train.steps=-3"], "train.steps must be >= 1"),
           (["--prompt-file", str(tmp_path / "missing.txt")], "no such file"),
           (["--prompt-file", str(tmp_path)], "not a regular file"),
           (["--prompt-file", str(binary)], "binary file"),
           (["--prompt", "a", "--prompt-file", str(binary)], "not both"),
           (["--max-new-tokens", "0"], "must be >= 1"),
           (["--max-new-tokens", "2.9"], "not an integer"),
           (["--feed-chunk", "-4"], "must be >= 1"),
           (["--demo", "--demo-depth", "1.5"], r"not in \[0, 1\)"),
           (["--demo", "--question", "q"], "asks its own question")]
    for argv, match in bad:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert __import__("re").search(match, err), (argv, err)
    telemetry = tmp_path / "t" / "events.jsonl"
    (tmp_path / "t").mkdir()
    with pytest.raises(_Loaded):  # good arguments: on to the model
        cli.main(["--telemetry", str(telemetry), "--set", "mc.w_max=1024"])
    assert telemetry.exists()  # opened before the work: its events cannot be lost


def test_a_question_alone_is_the_whole_prompt(tmp_path):
    """`--question Q` without a prompt used to be prefixed with the example prompt
    "The capital of France is"; now the question is the prompt, and the example is used
    only when nothing at all is given."""
    cli = _cli_module("generate")
    parser = cli.build_parser()

    def text(*argv):
        return cli.prompt_text(parser.parse_args(list(argv)), parser)

    assert text("--question", "Who wrote it?") == "Who wrote it?"
    assert text() == cli.EXAMPLE_PROMPT
    doc = tmp_path / "doc.txt"
    doc.write_text("A story.\n")
    assert text("--prompt-file", str(doc), "--question", "Q?") == "A story.\n\nQ?"
    assert text("--prompt", "Hi", "--question", "Q?") == "Hi\n\nQ?"
