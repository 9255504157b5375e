"""Model directories: resolution, weight loading and the errors for broken inputs."""

import json
import os
import shutil

import numpy as np
import pytest

from mcjax.base import convert
from mcjax.base.loading import ModelLoadError, load_base_model, load_params, resolve_model_dir
from mcjax.config import TINY_LLAMA


def _write_tiny_dir(path, tensors=None):
    """An HF-format dir for TINY_LLAMA with random fp32 weights (or the given tensors)."""
    from safetensors.numpy import save_file

    from mcjax.base.loading import hf_to_params_layout

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA.to_hf_dict()))
    if tensors is None:
        import jax

        from mcjax.base.model import init_params

        expected = jax.eval_shape(lambda: init_params(TINY_LLAMA, jax.random.key(0)))
        rng = np.random.default_rng(0)
        tensors = {}
        for name, (tree_path, layer, transpose) in hf_to_params_layout(TINY_LLAMA).items():
            leaf = expected
            for k in tree_path:
                leaf = leaf[k]
            shape = leaf.shape[1:] if layer is not None else leaf.shape
            shape = shape[::-1] if transpose else shape
            tensors[name] = rng.normal(size=shape).astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def test_local_hf_directory_loads_with_every_weight_in_place(tmp_path):
    tensors = _write_tiny_dir(tmp_path / "m")
    params = load_params(tmp_path / "m", TINY_LLAMA)
    np.testing.assert_array_equal(params["layers"]["q_proj"]["kernel"][2],
                                  tensors["model.layers.2.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["embed"]["embedding"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], tensors["lm_head.weight"].T)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a shipped model .* nor an existing dir"):
        resolve_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_base_model(tmp_path / "empty")


def test_corrupt_model_directory_is_a_clear_error(tmp_path):
    _write_tiny_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_base_model(tmp_path / "m", with_tokenizer=False)

    _write_tiny_dir(tmp_path / "t")
    blob = (tmp_path / "t" / "model.safetensors").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_params(tmp_path / "t", TINY_LLAMA)

    tensors = _write_tiny_dir(tmp_path / "s")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _write_tiny_dir(tmp_path / "s", tensors)
    with pytest.raises(ModelLoadError, match="missing 1 weights"):
        load_params(tmp_path / "s", TINY_LLAMA)

    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    _write_tiny_dir(tmp_path / "s", tensors)
    with pytest.raises(ModelLoadError, match="has shape .* expected"):
        load_params(tmp_path / "s", TINY_LLAMA)

    cfg = TINY_LLAMA.to_hf_dict() | {"model_type": "gpt2"}
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type .gpt2. is not supported"):
        load_base_model(tmp_path / "s", with_tokenizer=False)


def test_wrong_dtype_in_safetensors_is_a_clear_error(tmp_path):
    tensors = _write_tiny_dir(tmp_path / "m")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    _write_tiny_dir(tmp_path / "m", tensors)
    with pytest.raises(ModelLoadError, match=r"'model.norm.weight' has dtype I32; weights must "
                                             r"be floating point"):
        load_params(tmp_path / "m", TINY_LLAMA)


def test_half_precision_weights_load_into_the_config_dtype(tmp_path):
    tensors = _write_tiny_dir(tmp_path / "m")
    _write_tiny_dir(tmp_path / "m", {k: v.astype(np.float16) for k, v in tensors.items()})
    params = load_params(tmp_path / "m", TINY_LLAMA)
    assert params["final_norm"]["scale"].dtype == np.float32
    np.testing.assert_allclose(params["final_norm"]["scale"],
                               tensors["model.norm.weight"].astype(np.float16), rtol=0)


def test_unknown_shipped_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        resolve_model_dir("no-such-model-xyz")


_KILL_AFTER = """
import os, signal, sys
from mcjax.base import convert
n = 0
def hook(name):
    global n
    n += 1
    if n == 40:
        os.kill(os.getpid(), signal.SIGKILL)
convert.convert_gguf(convert.shipped_gguf_path("smollm2-135m"), sys.argv[1], progress=False,
                     _after_tensor=hook)
"""


@pytest.mark.slow
def test_killed_conversion_never_leaves_a_loadable_model(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "cache" / "smollm2-135m"
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, str(target)], timeout=300)
    assert proc.returncode == -9
    assert not target.exists()
    leftovers = [p for p in target.parent.iterdir()]
    assert leftovers and all(p.name.startswith(".smollm2-135m.partial-") for p in leftovers)
    for p in leftovers:  # a half-written temp dir does not load either
        with pytest.raises(ModelLoadError):
            load_base_model(p, with_tokenizer=False)
    # The next conversion succeeds, and refuses to overwrite a finished one.
    convert.convert_gguf(convert.shipped_gguf_path("smollm2-135m"), target, progress=False)
    assert (target / convert.MANIFEST).is_file()
    with pytest.raises(convert.ConversionError, match="already exists"):
        convert.convert_gguf(convert.shipped_gguf_path("smollm2-135m"), target, progress=False)
    shutil.rmtree(tmp_path / "cache")


def test_shipped_name_resolves_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MCJAX_CACHE", os.fspath(tmp_path))
    with pytest.raises(ModelLoadError, match="has not been converted yet"):
        resolve_model_dir("smollm2-135m", convert_if_missing=False)
    assert convert.shipped_model_dir("SmolLM2-135M-Instruct") == tmp_path / "models" / "smollm2-135m"
