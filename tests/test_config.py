"""Config dataclasses, the registry, overrides and HF config round trips."""

import dataclasses
import json

import pytest

from mcjax import config as C


@pytest.mark.parametrize("name", C.list_configs())
def test_every_registered_config_builds_and_is_hashable(name):
    cfg = C.get_config(name)
    assert cfg.name == name
    hash(cfg)  # static jit argument
    assert cfg.mc.recent_protect < cfg.mc.w_max


def test_tiny_config_uses_a_random_base_with_distinct_dims():
    cfg = C.get_config("tiny")
    b = cfg.base_config
    assert cfg.base == "random"
    dims = [b.vocab_size, b.hidden_size, b.intermediate_size, b.num_heads * b.head_dim]
    assert len(set(dims)) == len(dims)


def test_overrides_parse_types_and_reject_unknown_fields():
    cfg = C.get_config("tiny", ["mc.w_max=512", "train.learning_rate=0.5",
                                "gist.pooling=cls", "eval.history_lengths=1,2"])
    assert cfg.mc.w_max == 512 and cfg.train.learning_rate == 0.5
    assert cfg.gist.pooling == "cls" and cfg.eval.history_lengths == (1, 2)
    with pytest.raises(C.ConfigError, match="unknown field 'nope'"):
        C.get_config("tiny", ["mc.nope=1"])
    with pytest.raises(C.ConfigError, match="cannot parse 'abc' as int"):
        C.get_config("tiny", ["mc.w_max=abc"])
    with pytest.raises(C.ConfigError, match="pooling must be mean|query|cls"):
        C.get_config("tiny", ["gist.pooling=max"])
    with pytest.raises(C.ConfigError, match="unknown config 'nope'"):
        C.get_config("nope")


def test_budget_that_cannot_hold_the_protected_tail_is_rejected():
    with pytest.raises(C.ConfigError, match="cannot hold the protected tail"):
        C.MCConfig(w_max=64, recent_protect=64)


def test_llama_config_round_trips_through_hf_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(C.TINY_LLAMA.to_hf_dict()))
    assert C.LlamaConfig.from_json_file(path) == C.TINY_LLAMA


def test_unsupported_hf_configs_are_clear_errors():
    d = C.TINY_LLAMA.to_hf_dict()
    with pytest.raises(C.ConfigError, match="rope_type 'dynamic' is not implemented"):
        C.LlamaConfig.from_hf_dict(d | {"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}})
    with pytest.raises(C.ConfigError, match="rope_scaling 'llama3' is missing field"):
        C.LlamaConfig.from_hf_dict(d | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(C.ConfigError, match="missing required field 'hidden_size'"):
        C.LlamaConfig.from_hf_dict({k: v for k, v in d.items() if k != "hidden_size"})
    with pytest.raises(C.ConfigError, match="multiple of num_kv_heads"):
        dataclasses.replace(C.TINY_LLAMA, num_kv_heads=3)


def test_config_from_json_inverts_asdict_with_defaults_for_absent_fields():
    from mcjax.config import TINY_LLAMA, ConfigError, config_from_json, get_config, \
        list_configs

    for name in list_configs():
        cfg = get_config(name)
        assert config_from_json(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    tiny = dataclasses.replace(get_config("tiny"), base_config=TINY_LLAMA)
    d = json.loads(json.dumps(dataclasses.asdict(tiny)))
    back = config_from_json(d)
    assert back == tiny and isinstance(back.retrieval.layers, tuple)
    del d["lens"]["query_tokens"]  # written before the field existed: its default
    assert config_from_json(d).lens.query_tokens == 0
    d["lens"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        config_from_json(d)


def test_train_counts_out_of_range_or_not_integers_are_errors():
    """train.steps=-3 used to train nothing and exit 0; a float count was truncated."""
    for item, match in (("train.steps=-3", "train.steps must be >= 1"),
                        ("train.steps=0", "train.steps must be >= 1"),
                        ("train.batch_size=0", "train.batch_size must be >= 1"),
                        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
                        ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
                        ("train.learning_rate=-1e-3", "train.learning_rate must be > 0"),
                        ("train.steps=2.5", "cannot parse")):
        with pytest.raises(C.ConfigError, match=match):
            C.get_config("tiny", [item])
    with pytest.raises(C.ConfigError, match="train.steps must be an integer"):
        C.TrainConfig(steps=2.5)
    assert C.get_config("tiny", ["train.steps=3"]).train.steps == 3
