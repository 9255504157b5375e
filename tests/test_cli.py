"""The argument checks every CLI in experiments/ shares (experiments/_cli.py): a bad
argument exits 2 with one clear line before any work starts (issue 33, build item 4)."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import _cli  # noqa: E402
import _train_cli  # noqa: E402
import bench  # noqa: E402


def _exits_2(capsys, call, match):
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


def test_train_clis_check_their_arguments_before_training(tmp_path, capsys, monkeypatch):
    from mcjax.train import loop

    def no_work(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "train_gist", no_work)
    monkeypatch.setattr(loop, "train_lens", no_work)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    work = ["--workdir", str(tmp_path / "w")]

    def run(*argv, lens=False):
        parser = _train_cli.build_parser("doc", gist_workdir=lens)
        return _train_cli.run(parser, list(argv), "train_lens" if lens else "train_gist")

    for argv, match in ((["--workdir", str(a_file)], "--workdir .*not a directory"),
                        (work + ["--set", "train.steps=-3"], "train.steps must be >= 1"),
                        (work + ["--set", "nosuch.x=1"], "unknown field 'nosuch'"),
                        (work + ["--set", "mc.w_max=1.5"], "cannot parse"),
                        (work + ["--stop-after", "0"], "must be >= 1"),
                        (work + ["--eval-batches", "-1"], "must be >= 0"),
                        (work + ["--candidates", "2.5"], "not an integer")):
        _exits_2(capsys, lambda: run(*argv), match)
    _exits_2(capsys, lambda: run(*work, "--gist-params", str(tmp_path / "no.safetensors"),
                                 lens=True), "--gist-params .*no such file")
    assert not (tmp_path / "w").exists()


def test_bench_checks_its_arguments_before_measuring(tmp_path, capsys):
    for argv, match in ((["e2e", "--histories", "-5"], "must be >= 0|must be >= 1"),
                        (["e2e", "--set", "nosuch.x=1"], "unknown field 'nosuch'"),
                        (["e2e", "--iters", "0"], "--iters must be >= 1"),
                        (["base", "--out", str(tmp_path)], "--out .*is a directory"),
                        (["gist", "--tokens", "1.5"], "invalid int value")):
        _exits_2(capsys, lambda: bench.main(argv), match)


def test_shared_types_and_paths(tmp_path):
    import argparse

    assert _cli.count("3") == 3 and _cli.nonneg("0") == 0 and _cli.fraction("0.5") == 0.5
    for f, text in ((_cli.count, "0"), (_cli.count, "2.9"), (_cli.nonneg, "-1"),
                    (_cli.fraction, "1"), (_cli.positive_float, "nan"),
                    (_cli.positive_float, "0")):
        with pytest.raises(argparse.ArgumentTypeError):
            f(text)
    parser = _cli.Parser(prog="x")
    good = tmp_path / "t.txt"
    good.write_text("héllo")
    assert _cli.text_file(parser, str(good), "--f") == "héllo"
    latin = tmp_path / "l.txt"
    latin.write_bytes("h\xe9llo".encode("latin-1"))
    with pytest.raises(SystemExit):
        _cli.text_file(parser, str(latin), "--f")
    assert _cli.output_dir(parser, str(tmp_path / "new" / "deeper"), "--out")
    assert _cli.output_file(parser, str(tmp_path / "new" / "f.json"), "--out")


@pytest.mark.parametrize("name, argv, match", [
    ("export_gist", ["--workdir", "w", "--out", "{tmp}"], "--out .*is a directory"),
    ("kv_reuse", ["--out", "{tmp}/o", "--set", "nosuch.x=1"], "unknown field 'nosuch'"),
    ("kv_reuse", ["--out", "{file}"], "--out .*not a directory"),
    ("parity", ["--out", "{tmp}"], "--out .*is a directory"),
    ("project_aot", ["--out", "{tmp}"], "--out .*is a directory"),
])
def test_the_other_clis_check_their_outputs_and_overrides_first(tmp_path, capsys, name, argv,
                                                                 match):
    import importlib

    (tmp_path / "f").write_text("x")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "f") for a in argv]
    module = importlib.import_module(name)
    _exits_2(capsys, lambda: module.main(argv), match)
