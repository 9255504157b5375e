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
    ("diagnose_passkey", ["rank", "--out", "{tmp}"], "--out .*is a directory"),
    ("diagnose_passkey", ["answer", "--out", "{tmp}/o.json", "--set", "nosuch.x=1"],
     "unknown field 'nosuch'"),
    ("diagnose_passkey", ["trace", "--case", "30"], "case index 30 is not below --cases 24"),
    ("diagnose_passkey", ["trace", "--case", "0", "--length", "256"], "do not exceed W_max"),
    ("diagnose_passkey", ["rank", "--query-windows", "32,32", "--out", "{tmp}/o.json"],
     "repeated values"),
    ("paired_nll", ["{tmp}", "{tmp}"], "A .*no per_window_nll.npz"),
])
def test_the_other_clis_check_their_outputs_and_overrides_first(tmp_path, capsys, name, argv,
                                                                 match):
    import importlib

    (tmp_path / "f").write_text("x")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "f") for a in argv]
    module = importlib.import_module(name)
    _exits_2(capsys, lambda: module.main(argv), match)


@pytest.mark.parametrize("name, argv", [
    ("diagnose_passkey", ["--help"]), ("diagnose_passkey", ["rank", "--help"]),
    ("diagnose_passkey", ["answer", "--help"]), ("diagnose_passkey", ["trace", "--help"]),
    ("paired_nll", ["--help"]),
])
def test_the_diagnostic_clis_have_help(capsys, name, argv):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(argv)
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_paired_nll_pairs_two_runs_window_by_window(tmp_path, capsys):
    import numpy as np

    import paired_nll

    rng = np.random.default_rng(0)
    full = rng.normal(3.0, 0.1, 16)
    trunc = full + 0.2
    runs = {}
    for name, shift in (("a", 0.0), ("b", -0.05)):
        d = tmp_path / name
        d.mkdir()
        arrays = {"window/offset": np.arange(16), "nll/lod1/full": full,
                  "nll/lod1/truncation": trunc, "nll/lod1/gistnet": full + 0.15 + shift}
        np.savez(d / "per_window_nll.npz", **arrays)
        runs[name] = arrays
    rows = paired_nll.paired_rows(runs["a"], runs["b"], "gistnet")
    assert [r["layout"] for r in rows] == ["lod1"]
    np.testing.assert_allclose(rows[0]["b_minus_a"]["mean"], -0.05)
    np.testing.assert_allclose([rows[0]["gap_recovered_a"], rows[0]["gap_recovered_b"]],
                               [0.25, 0.5])
    assert paired_nll.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "lod1" in capsys.readouterr().out
    np.savez(tmp_path / "c.npz", **{**runs["a"], "window/offset": np.arange(16) + 1})
    _exits_2(capsys, lambda: paired_nll.main([str(tmp_path / "a"), str(tmp_path / "c.npz")]),
             "different windows")
