"""`mcjax.nets`, the one place that resolves GistNet / LensNet params: each source (untrained,
a params file, a training workdir, shipped) gives the params and their provenance, and each
refuses what does not fit the config instead of guessing."""

import ast
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from mcjax import assets, nets
from mcjax.checkpoint import Checkpointer
from mcjax.config import TINY_LLAMA, ConfigError, config_to_json, get_config, override
from mcjax.errors import CheckpointError, CheckpointMismatchError
from mcjax.train import steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(get_config("tiny"), base_config=TINY_LLAMA)


@pytest.fixture(scope="module")
def trained(cfg):
    """Params that differ from the untrained init (as training leaves them)."""
    return {p: jax.tree.map(lambda x: np.asarray(x) * 1.5 + 0.25, nets.untrained_params(cfg, p))
            for p in nets.PARTS}


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _workdir(path, cfg, params, extra=None, step=3):
    ckpt = Checkpointer(path)
    ckpt.save(step, steps.init_state(params, steps.make_optimizer(cfg.train)),
              {"epoch": 0, "cursor": 0}, cfg, extra)
    ckpt.wait()
    ckpt.close()
    return path


def _params_file(path, cfg, params, part, **card):
    out = assets.save_params_safetensors(params, path, {"part": part})
    assets.write_card(out, {"format": assets.FORMAT, "part": part,
                            "config": config_to_json(cfg), **card})
    return out


# --------------------------------------------------------------------------- untrained


def test_untrained_params_are_the_trainers_init_of_the_seed(cfg):
    for part in nets.PARTS:
        _equal(nets.untrained_params(cfg, part), nets.init_params(cfg, part))
        nets.check_params(nets.untrained_params(cfg, part), cfg, part)
    other = jax.tree.leaves(nets.untrained_params(cfg, "gist", seed=cfg.train.seed + 1))
    assert not all(np.array_equal(a, b) for a, b in
                   zip(other, jax.tree.leaves(nets.untrained_params(cfg, "gist"))))
    # the trainers get fresh arrays (they donate them), sessions share one set
    assert nets.untrained_params(cfg, "lens") is nets.untrained_params(cfg, "lens")
    assert nets.init_params(cfg, "lens") is not nets.init_params(cfg, "lens")
    with pytest.raises(ConfigError, match="base_config"):
        nets.untrained_params(dataclasses.replace(cfg, base_config=None), "gist")
    with pytest.raises(ValueError, match="part must be"):
        nets.init_params(cfg, "reader")


def test_default_params_are_untrained_when_asked_and_keep_given_params(cfg, trained):
    gist, lens, prov = nets.default_params(cfg, None, None, None, untrained=True)
    assert prov == {"gist": {"source": "untrained", "seed": cfg.train.seed},
                    "lens": {"source": "untrained", "seed": cfg.train.seed}}
    _equal(gist, nets.untrained_params(cfg, "gist"))
    gist, lens, prov = nets.default_params(cfg, trained["gist"], trained["lens"], None)
    assert prov == {} and gist is trained["gist"] and lens is trained["lens"]


# --------------------------------------------------------------------------- params files


def test_a_params_file_loads_with_its_card_as_provenance(cfg, trained, tmp_path):
    path = _params_file(tmp_path / "g.safetensors", cfg, trained["gist"], "gist", step=7,
                        source={"workdir": "runs/g"})
    params, prov = nets.load_params_file(path, cfg, "gist")
    _equal(params, trained["gist"])
    assert prov["source"] == "params_file" and prov["path"] == str(path.absolute())
    assert prov["step"] == 7 and prov["seed"] == cfg.train.seed
    assert prov["card"] == str(assets.card_path(path).absolute())
    assert prov["card_source"] == {"workdir": "runs/g"}
    assert nets.source_identity(cfg, params_file=path) == {
        "source": "params_file", "path": str(path.absolute()), "step": 7}
    _equal(nets.load_identified(nets.source_identity(cfg, params_file=path), cfg, "gist"),
           trained["gist"])


def test_a_params_file_of_another_architecture_a_missing_card_or_a_damaged_file_is_refused(
        cfg, trained, tmp_path):
    path = _params_file(tmp_path / "g.safetensors", cfg, trained["gist"], "gist")
    wider = override(cfg, {"gist.width": cfg.gist.width * 2})
    with pytest.raises(CheckpointMismatchError, match="--gist-params .* do not match"):
        nets.load_params_file(path, wider, "gist", f"--gist-params {path}")
    with pytest.raises(CheckpointMismatchError, match="do not match the configured LensNet"):
        nets.load_params_file(path, cfg, "lens")
    bare = assets.save_params_safetensors(trained["lens"], tmp_path / "bare.safetensors")
    with pytest.raises(assets.AssetError, match="no card"):
        nets.load_params_file(bare, cfg, "lens")
    params, prov = nets.load_params_file(bare, cfg, "lens", card_required=False)  # warm start
    assert prov["card"] is None and prov["step"] is None
    _equal(params, trained["lens"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(assets.AssetError, match="sha256"):
        nets.load_params_file(path, cfg, "gist")
    with pytest.raises(assets.AssetError, match="does not exist"):
        nets.load_params_file(tmp_path / "none.safetensors", cfg, "gist")


# --------------------------------------------------------------------------- workdirs


def test_a_workdir_gives_its_nets_at_the_recorded_step_with_the_run_as_provenance(
        cfg, trained, tmp_path):
    joint = _workdir(tmp_path / "joint", cfg, {"gist": trained["gist"], "lens": trained["lens"]},
                     {"run": "train_joint"})
    assert nets.checkpoint_parts(joint) == ("train_joint", ("gist", "lens"))
    for part in nets.PARTS:
        params, prov = nets.load_trained_params(joint, cfg, part)
        _equal(params, trained[part])
        assert prov == {"source": "checkpoint", "path": str(joint.absolute()), "step": 3,
                        "run": "train_joint", "gistnet": None, "seed": cfg.train.seed}
    identity = nets.source_identity(cfg, workdir=joint)
    assert identity == {"source": "checkpoint", "path": str(joint.absolute()), "step": 3}
    _equal(nets.load_identified(identity, cfg, "gist"), trained["gist"])
    found = nets.from_workdirs(cfg, lens_workdir=joint)  # the LensNet's own GistNet
    _equal(found["gist"][0], trained["gist"])
    assert found["gist"][1]["chosen_by"] == nets.LENS_GISTNET


def test_a_workdir_of_another_setup_without_the_part_or_missing_is_refused(
        cfg, trained, tmp_path):
    gist_run = _workdir(tmp_path / "gist", cfg, {"gist": trained["gist"]})
    with pytest.raises(CheckpointError, match="holds no lens params"):
        nets.load_trained_params(gist_run, cfg, "lens")
    with pytest.raises(CheckpointMismatchError, match="gist.width: checkpoint"):
        nets.load_trained_params(gist_run, override(cfg, {"gist.width": 2 * cfg.gist.width}),
                                 "gist")
    other = dataclasses.replace(TINY_LLAMA, vocab_size=TINY_LLAMA.vocab_size + 6)
    other_run = _workdir(tmp_path / "other", dataclasses.replace(cfg, base_config=other),
                         {"gist": trained["gist"]})
    with pytest.raises(CheckpointMismatchError, match="base_config.vocab_size"):
        nets.load_trained_params(other_run, cfg, "gist")
    # the base model's dtype is how it computes, not what the params mean
    f16 = dataclasses.replace(cfg, base_config=dataclasses.replace(TINY_LLAMA, dtype="float16"))
    nets.load_trained_params(gist_run, f16, "gist")
    with pytest.raises(CheckpointError, match="does not exist"):
        nets.load_trained_params(tmp_path / "nowhere", cfg, "gist")
    with pytest.raises(CheckpointError, match="does not exist"):
        nets.checkpoint_parts(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no EMA"):
        nets.load_trained_params(gist_run, cfg, "gist", ema=True)
    with pytest.raises(ValueError, match="not both"):
        nets.source_identity(cfg, workdir=gist_run, params_file=tmp_path / "g.safetensors")


def test_a_lensnets_gistnet_is_the_one_its_run_names_while_it_exists(cfg, trained, tmp_path):
    path = _params_file(tmp_path / "g.safetensors", cfg, trained["gist"], "gist", step=5)
    named = {"run": "train_lens", "gistnet": nets.source_identity(cfg, params_file=path)}
    params, prov = nets.lens_gistnet(named, cfg)
    _equal(params, trained["gist"])
    assert prov["source"] == "params_file" and prov["chosen_by"] == nets.LENS_GISTNET
    seeded = {"run": "train_lens", "gistnet": {"source": "untrained", "seed": 5}}
    params, prov = nets.lens_gistnet(seeded, cfg)
    _equal(params, nets.untrained_params(cfg, "gist", seed=5))
    assert prov == {"source": "untrained", "seed": 5, "chosen_by": nets.LENS_GISTNET}
    gone = {"run": "train_lens", "gistnet": {"source": "checkpoint",
                                             "path": str(tmp_path / "gone"), "step": 1}}
    assert nets.lens_gistnet(gone, cfg) is None
    assert nets.lens_gistnet({"run": "train_lens"}, cfg) is None


# --------------------------------------------------------------------------- shipped


def test_shipped_params_are_used_only_when_their_card_fits_the_config(cfg, trained, tmp_path):
    gist = _params_file(tmp_path / "gist.safetensors", cfg, trained["gist"], "gist", step=9)
    params, prov = nets.shipped_gist(cfg, gist)
    _equal(params, trained["gist"])
    assert prov == {"source": "shipped", "path": str(gist),
                    "card": str(assets.card_path(gist)), "step": 9}
    for change in ({"mc.block_size": 2 * cfg.mc.block_size}, {"gist.width": 2 * cfg.gist.width},
                   {"mc.sink_blocks": cfg.mc.sink_blocks + 1}):
        assert nets.shipped_gist(override(cfg, change), gist) is None, change
    assert nets.shipped_gist(dataclasses.replace(cfg, base="another-model"), gist) is None
    lens = _params_file(tmp_path / "lens.safetensors", cfg, trained["lens"], "lens")
    _equal(nets.shipped_lens(cfg, lens)[0], trained["lens"])
    assert nets.shipped_lens(override(cfg, {"gist.width": 2 * cfg.gist.width}), lens) is None
    assert nets.shipped_gist(cfg, tmp_path / "absent.safetensors") is None
    # a card that fits but params that do not are refused, not served
    card = json.loads(assets.card_path(gist).read_text())
    wrong = assets.save_params_safetensors(trained["lens"], tmp_path / "wrong.safetensors")
    assets.write_card(wrong, {k: v for k, v in card.items() if k != "sha256"})
    with pytest.raises(CheckpointMismatchError, match="shipped gist params .* do not match"):
        nets.shipped_gist(cfg, wrong)


def test_the_shipped_nets_do_not_fit_another_base_model(cfg):
    assert nets.shipped_gist(cfg) is None and nets.shipped_lens(cfg) is None  # tiny


# --------------------------------------------------------------------------- layering


def _imports(module: Path) -> set[str]:
    """Every mcjax module `module` imports, at module level or deferred."""
    out = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mcjax"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mcjax")}
    return out


def test_checkpoint_and_assets_import_neither_each_other_nor_the_resolver():
    lower = {"checkpoint": ROOT / "mcjax" / "checkpoint.py",
             "assets": ROOT / "mcjax" / "assets" / "__init__.py"}
    for name, path in lower.items():
        others = {f"mcjax.{n}" for n in lower if n != name} | {"mcjax.nets"}
        assert not _imports(path) & others, (name, _imports(path) & others)
    # and the runtime reads no evaluation module
    for path in (ROOT / "mcjax" / "runtime").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("mcjax.eval")}, path
